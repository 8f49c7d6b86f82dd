"""The embedded default dataset: a synthetic data-to-text task in the style of E2E NLG.

Each input is a restaurant's attributes written as an E2E meaning representation
(``name[The Eagle], eatType[pub], food[French], ...``); each reference is one English
description of it. References come from many sentence plans (which attribute opens, how the rest
are grouped into clauses and sentences) and several wordings per attribute, so different
references of one input differ the way human ones do: scored against the others, an input's
first reference gets a corpus BLEU in the range real E2E shows (about 58; see
``tests/data/test_sources.py``). Everything is deterministic from the seed.

This is synthetic data, made so that the quickstart runs offline. Point ``--data`` at the real
E2E NLG data (``--data e2e_nlg --preset e2e`` with hub access, or a local CSV with ``mr`` and
``ref`` columns) for results comparable with the LoRA paper.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = [
    "The Eagle", "The Mill", "Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns Cambridge",
    "Clowns", "Cocum", "Cotto", "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House",
    "Strada", "Taste of Cambridge", "The Cambridge Blue", "The Cricketers", "The Dumpling Tree",
    "The Golden Curry", "The Golden Palace", "The Olive Grove", "The Phoenix", "The Plough",
    "The Punter", "The Rice Boat", "The Twenty Two", "The Vaults", "The Waterman", "Wildwood",
    "Zizzi", "The Wrestlers", "Travellers Rest Beefeater", "The Copper Kettle", "The Red Lion",
]
NEAR = [
    "Burger King", "Café Adriatic", "Café Brazil", "Café Rouge", "Café Sicilia", "Clare Hall",
    "Crowne Plaza Hotel", "Express by Holiday Inn", "Rainbow Vegetarian Café", "Raja Indian Cuisine",
    "Ranch", "The Bakers", "The Portland Arms", "The Six Bells", "The Sorrento", "All Bar One",
    "Yippee Noodle Bar", "Avalon", "The Rice Boat", "Crowne Plaza Hotel", "Café Adriatic",
]
EAT_TYPES = ["restaurant", "coffee shop", "pub"]
FOODS = ["French", "Italian", "English", "Chinese", "Indian", "Japanese", "Fast food"]
PRICES = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
RATINGS = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
AREAS = ["city centre", "riverside"]
ORDER = ["name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"]

INSTRUCTION = "Describe the restaurant in one or two sentences, using every attribute given."


@dataclass(frozen=True)
class Example:
    mr: dict[str, str]

    @property
    def text(self) -> str:
        return ", ".join(f"{k}[{self.mr[k]}]" for k in ORDER if k in self.mr)


def sample_mr(rng: random.Random) -> dict[str, str]:
    mr = {"name": rng.choice(NAMES)}
    optional = {
        "eatType": lambda: rng.choice(EAT_TYPES), "food": lambda: rng.choice(FOODS),
        "priceRange": lambda: rng.choice(PRICES), "customer rating": lambda: rng.choice(RATINGS),
        "area": lambda: rng.choice(AREAS), "familyFriendly": lambda: rng.choice(["yes", "no"]),
        "near": lambda: rng.choice([n for n in NEAR if n != mr["name"]]),
    }
    k = rng.randint(3, 7)
    for key in sorted(rng.sample(list(optional), k), key=ORDER.index):
        mr[key] = optional[key]()
    return mr


# --- wordings of one attribute -------------------------------------------------------------------

def _price(v: str, rng: random.Random) -> str:
    named = {"cheap": ["cheap", "low-priced", "inexpensive"], "moderate": ["moderately priced", "mid-priced", "moderate"],
             "high": ["expensive", "high-priced", "pricey"]}
    level = {"cheap": ["low", "cheap", "affordable"], "moderate": ["moderate", "average", "reasonable"],
             "high": ["high", "expensive", "steep"]}
    if v in named:
        return rng.choice([f"{rng.choice(named[v])} food", f"a {v} price range", f"prices that are {rng.choice(level[v])}"])
    return rng.choice([f"prices {v}", f"a price range of {v}", f"meals costing {v}", f"an average price of {v}"])


def _rating(v: str, rng: random.Random) -> str:
    return rng.choice([f"a {v} customer rating", f"a customer rating of {v}", f"a {v} rating from customers",
                       f"been rated {v} by customers", f"{v} customer reviews"])


def _family(v: str, rng: random.Random) -> str:
    if v == "yes":
        return rng.choice(["is family friendly", "is kid friendly", "welcomes children", "is suitable for families",
                           "is child-friendly", "is great for families"])
    return rng.choice(["is not family friendly", "does not welcome children", "is not kid friendly",
                       "is adults only", "is not suitable for families", "is not child-friendly"])


def _area(v: str, rng: random.Random) -> str:
    if v == "riverside":
        return rng.choice(["in the riverside area", "by the river", "on the riverside", "in riverside", "near the river"])
    return rng.choice(["in the city centre", "in the centre of the city", "in the centre of town", "in the city center",
                       "downtown"])


def _food(v: str, rng: random.Random) -> str:
    if v == "Fast food":
        return rng.choice(["fast food", "fast food dishes", "burgers and fries"])
    return rng.choice([f"{v} food", f"{v} cuisine", f"{v} dishes", f"{v} meals"])


def _near(v: str, rng: random.Random) -> str:
    return rng.choice([f"near {v}", f"close to {v}", f"next to {v}", f"not far from {v}", f"by {v}"])


def _eat(v: str) -> str:
    return v


# --- sentence plans ------------------------------------------------------------------------------

def _clauses(mr: dict[str, str], keys: list[str], rng: random.Random, subj: str) -> list[str]:
    """Independent clauses about ``subj`` for the given attributes."""
    out = []
    for k in keys:
        v = mr[k]
        if k == "food":
            out.append(f"{subj} {rng.choice(['serves', 'offers', 'provides', 'has'])} {_food(v, rng)}")
        elif k == "priceRange":
            out.append(f"{subj} {rng.choice(['has', 'offers', 'comes with'])} {_price(v, rng)}")
        elif k == "customer rating":
            r = _rating(v, rng)
            out.append(f"{subj} {'has ' if not r.startswith('been') else 'has '}{r}")
        elif k == "familyFriendly":
            out.append(f"{subj} {_family(v, rng)}")
        elif k == "area":
            out.append(f"{subj} is {_area(v, rng)}")
        elif k == "near":
            out.append(f"{subj} is {rng.choice(['located', 'situated', 'found'])} {_near(v, rng)}")
        elif k == "eatType":
            out.append(f"{subj} is a {_eat(v)}")
    return out


def _join(clauses: list[str], rng: random.Random) -> str:
    if len(clauses) == 1:
        return clauses[0]
    if len(clauses) == 2 or rng.random() < 0.5:
        return ", ".join(clauses[:-1]) + rng.choice([" and ", ", and "]) + clauses[-1]
    return ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _pronoun_chain(clauses: list[str], name: str, rng: random.Random) -> list[str]:
    """Split clauses into sentences; later sentences refer back with 'It' or 'This place'."""
    sentences, i = [], 0
    while i < len(clauses):
        n = rng.choice([1, 2, 2, 3])
        group = clauses[i:i + n]
        sentences.append(_join(group, rng))
        i += n
    subj_words = ["It", "It", "The venue", "This place"]
    result = []
    for j, s in enumerate(sentences):
        head, found, tail = s.partition(name)
        if found:  # the first mention: the name in sentence one, a back-reference after it
            s = head + (name if j == 0 else rng.choice(subj_words)) + tail.replace(name, "it")
        result.append(s[0].upper() + s[1:] + ".")
    return result


def realise(mr: dict[str, str], rng: random.Random) -> str:
    """One English description of ``mr`` from a randomly chosen sentence plan."""
    name = mr["name"]
    rest = [k for k in ORDER[1:] if k in mr]
    plan = rng.random()
    head = ""
    if "eatType" in mr and plan < 0.3:
        # "X is a cheap French pub in the riverside area ..."
        descr = mr["eatType"]
        used = ["eatType"]
        if "food" in mr and rng.random() < 0.6:
            descr = ("fast food" if mr["food"] == "Fast food" else mr["food"]) + " " + descr
            used.append("food")
        if "priceRange" in mr and mr["priceRange"] in ("cheap", "moderate", "high") and rng.random() < 0.5:
            descr = {"cheap": "cheap", "moderate": "moderately priced", "high": "expensive"}[mr["priceRange"]] + " " + descr
            used.append("priceRange")
        art = "an" if descr[0].lower() in "aeiou" else "a"
        head = f"{name} is {art} {descr}"
        if "area" in mr and rng.random() < 0.5:
            head += " " + _area(mr["area"], rng)
            used.append("area")
        rest = [k for k in rest if k not in used]
    elif "eatType" in mr and plan < 0.45:
        descr = mr["eatType"]
        used = ["eatType"]
        if "food" in mr and rng.random() < 0.5:
            descr += " serving " + _food(mr["food"], rng)
            used.append("food")
        head = f"There is a {descr} called {name}" if rng.random() < 0.5 else f"{name} is a {descr}"
        rest = [k for k in rest if k not in used]
    elif "area" in mr and plan < 0.6:
        head = f"Located {_area(mr['area'], rng)}, {name}"
        rest = [k for k in rest if k != "area"]
        rng.shuffle(rest)
        clauses = _clauses(mr, rest, rng, name)
        if not clauses:
            return head + " is a place to eat."
        first = clauses[0].replace(name + " ", "", 1)
        return " ".join(_pronoun_chain([f"{head} {first}"] + clauses[1:], name, rng))
    if rng.random() < 0.5:
        rng.shuffle(rest)
    clauses = _clauses(mr, rest, rng, name)
    if head:
        clauses = [head] + clauses
    if not clauses:
        return f"{name} is a place to eat."
    return " ".join(_pronoun_chain(clauses, name, rng))


def generate(seed: int = 0, n_train: int = 3000, n_dev: int = 200, n_test: int = 200,
             refs_train: int = 2, refs_eval: int = 6) -> dict[str, list[dict[str, str]]]:
    """Rows ``{"mr", "ref"}`` per split; one row per reference, as in the E2E NLG files. Inputs are
    distinct across splits, so dev and test are held out."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for split, n, n_refs in (("train", n_train, refs_train), ("validation", n_dev, refs_eval), ("test", n_test, refs_eval)):
        rows = []
        while len(rows) < n * n_refs:
            ex = Example(sample_mr(rng))
            if ex.text in seen:
                continue
            seen.add(ex.text)
            rows.extend({"mr": ex.text, "ref": realise(ex.mr, rng)} for _ in range(n_refs))
        splits[split] = rows
    return splits
