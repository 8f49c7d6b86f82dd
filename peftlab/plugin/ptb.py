"""The COCO caption code's tokenization, which the E2E NLG scorer applies before METEOR, ROUGE-L
and CIDEr: Stanford's PTBTokenizer (CoreNLP 3.4.1, ``-preserveLines -lowerCase``), then every token
in :data:`COCO_PUNCTUATION` dropped.

Two ways to get it, same tokens on the text E2E systems write (tested against each other):

- ``"java"``: the real tokenizer, the ``stanford-corenlp-3.4.1.jar`` that pycocoevalcap ships, run
  once for a whole batch of texts. Exact by construction; needs ``java`` on the PATH.
- ``"python"``: a port of the tokenizer rules English descriptions meet: lowercase, "£" written
  as ``#`` and "€" as ``$``, contractions split (``is n't``, ``it 's``, ``ca n't``), ``can not``,
  quotes as PTB writes them, brackets as ``-lrb-``, dashes and ellipses normalised, numbers
  (``20-25``, ``3.5``, ``1,000``), hyphenated words, abbreviations (``st.``, ``u.s.a.``) kept whole.

``"auto"`` takes Java where it is installed and the port elsewhere; :func:`ptb_backend` says which.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

#: tokens the COCO caption code removes after tokenizing (it lists the brackets upper-case, so
#: the lower-cased ``-lrb-`` it gets with ``-lowerCase`` stays, as it does in the official scorer)
COCO_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"])

BACKENDS = ("auto", "java", "python")


def corenlp_jar() -> Path | None:
    """The PTB tokenizer jar pycocoevalcap ships, or None where pycocoevalcap is not installed."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        jar = Path(root) / "tokenizer" / "stanford-corenlp-3.4.1.jar"
        if jar.is_file():
            return jar
    return None


def ptb_backend(backend: str = "auto") -> str:
    """"java" or "python": what :func:`ptb_tokenize` with ``backend`` uses on this machine."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed: one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "java" if shutil.which("java") and corenlp_jar() else "python"
    return backend


#: texts already tokenized, per backend: a sweep scores the same references in every cell (and
#: before and after training), and each Java call starts a JVM; at most :data:`REMEMBERED` texts
_SEEN: dict[tuple[str, str], list[str]] = {}
REMEMBERED = 200_000


def ptb_tokenize(texts: list[str], backend: str = "auto") -> list[list[str]]:
    """COCO's tokens of each text: PTB-tokenized, lower-cased, punctuation removed. Texts
    tokenized before in this process are not tokenized again (each line is tokenized on its own,
    so a text's tokens do not depend on the others)."""
    which = ptb_backend(backend)
    fresh = list(dict.fromkeys(t for t in texts if (which, t) not in _SEEN))
    if len(_SEEN) + len(fresh) > REMEMBERED:
        _SEEN.clear()
        fresh = list(dict.fromkeys(texts))
    if fresh:
        lines = _java_lines(fresh) if which == "java" else [" ".join(_port(t)) for t in fresh]
        for t, line in zip(fresh, lines):
            _SEEN[(which, t)] = [w for w in line.split(" ") if w and w not in COCO_PUNCTUATION]
    return [list(_SEEN[(which, t)]) for t in texts]


def _java_lines(texts: list[str]) -> list[str]:
    java, jar = shutil.which("java"), corenlp_jar()
    if not java or not jar:
        missing = "java (a JRE on the PATH)" if not java else "pycocoevalcap (pip install pycocoevalcap)"
        raise RuntimeError(f"the Java PTB tokenizer needs {missing}")
    if not texts:
        return []
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as fh:
        # one text a line: every line break Python knows (\r, \f, \u2028, ...) becomes a space, or
        # the tokenizer would split a text in two and every later text would shift by a line
        fh.write("\n".join(" ".join(t.splitlines()) for t in texts))
    try:
        out = subprocess.run([java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                              "-preserveLines", "-lowerCase", fh.name],
                             capture_output=True, check=True, encoding="utf-8").stdout
    finally:
        Path(fh.name).unlink(missing_ok=True)
    lines = out.split("\n")
    if len(lines) > len(texts) and lines[-1] == "":
        lines.pop()
    if len(lines) != len(texts):  # a text that is all whitespace is still one (empty) line
        raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(texts)} texts")
    return lines


# ---- the port ------------------------------------------------------------------------------

_CHARS = {"£": " # ", "€": " $ ", "—": " -- ", "–": " -- ", "…": " ... ", "½": " 1/2 ", "¼": " 1/4 ",
          "¾": " 3/4 ", "“": ' `` ', "”": " '' ", "‘": " ` ", "’": "'", "\u00a0": " "}
_ABBREV = {"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "prof.", "mt.", "ave.", "rd.", "co.",
           "corp.", "inc.", "ltd.", "no.", "vs.", "etc.", "jan.", "feb.", "mar.", "apr.", "jun.",
           "jul.", "aug.", "sep.", "sept.", "oct.", "nov.", "dec.", "e.g.", "i.e.", "approx."}
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_TOKEN = re.compile(r"""
    (?P<num>[$#]\d+(?:[.,:/-]\d+)*)                      # $20 -> $ 20
  | (?P<initials>(?:[^\W\d_]\.){2,})                      # u.s.a.
  | (?P<word>(?:[^\W_]|(?<=\d)[.,:/](?=\d)|(?<=[^\W_])[-'](?=[^\W_]))+(?:\.(?!\.))?)
                                                          # family-friendly, 20-25, 3.5, 1,000, st.
  | (?P<dots>\.{3,})
  | (?P<dashes>-{2,})
  | (?P<marks>[?!]+)
  | (?P<other>\S)
""", re.VERBOSE)
_CLITIC = re.compile(r"(?i)^(.+?)(n't|'s|'re|'ll|'d|'m|'ve)$")


def _port(text: str) -> list[str]:
    for ch, rep in _CHARS.items():
        text = text.replace(ch, rep)
    tokens: list[str] = []  # tokenized in the original case (it decides sentence ends), then lowered
    for m in _TOKEN.finditer(text):
        kind, tok = m.lastgroup, m.group()
        if kind == "word":
            tokens.extend(_word(tok.lower()))
        elif kind == "num":
            tokens.extend([tok[0], tok[1:]])
        elif kind == "dots":
            tokens.append("...")
        elif kind == "other" and tok in "\"'":  # opening after a space or bracket, else closing
            opening = m.start() == 0 or text[m.start() - 1].isspace() or text[m.start() - 1] in "([{"
            tokens.append(("``" if tok == '"' else "`") if opening else ("''" if tok == '"' else "'"))
        else:
            tokens.append(_BRACKETS.get(tok, tok).lower())
    return tokens


def _word(tok: str) -> list[str]:
    tail: list[str] = []
    if tok.endswith(".") and tok not in _ABBREV:
        tok, tail = tok[:-1], ["."]
    if tok in _SPLIT_WORDS:
        return [*_SPLIT_WORDS[tok], *tail]
    m = _CLITIC.match(tok)
    if m:
        stem, clitic = m.groups()
        return [stem, clitic, *tail]
    return [tok, *tail]
