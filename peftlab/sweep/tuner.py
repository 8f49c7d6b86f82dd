"""Tuning before the grid: each method's searched settings chosen on validation data by Optuna.

The grid's cells that differ only by seed form a *group* (one method at its settings). For every
group the searched settings that apply to it (``train.lr`` to all, ``lora.alpha`` to LoRA's) are
tuned in an Optuna study: a TPE sampler seeded afresh for every trial (:func:`sampler_for`), and,
when judged by the
validation loss, a successive-halving pruner fed by the trials themselves during training. Every
trial is a cell: its settings are the group's with the trial's values, trained with the group's
lowest seed and judged on the validation split (the source's ``validation``, else
``tune-holdout``; never the split the grid is scored on). Its record lands in
``results/<experiment>/tuning/cells/`` and runs through the sweep's own executor.

Resuming: the studies live in ``tuning/optuna.journal`` (Optuna's journal storage, one study per
group and machine); a trial whose record is already there, made here, is told from it rather
than run again, and a trial that was running when the sweep died is asked again with the same
values; the trials after it draw what an uninterrupted tuning's would have. The best finished trial of each group gives the settings its grid cells run with; the
choice is a function of the records (:func:`best`), so the report makes the same one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from peftlab.plugin.errors import ValidationError
from peftlab.sweep.experiment import PlannedCell, cell_id, describe
from peftlab.sweep.tune_config import Param, TuneConfig

JOURNAL = "optuna.journal"
SUMMARY = "summary.json"  # per group: the search, its trials' cell ids, the chosen values (what reports read)
FOLDER = "tuning"
#: how trials are drawn (:func:`sampler_for`); part of a study's name, so a study drawn another way
#: is not continued as if it had been drawn this way
DRAWS = "tpe, seed + trial index"
#: a trial's outcome, from its record
COMPLETE, PRUNED, DIVERGED, FAILED = "complete", "pruned", "diverged", "failed"


@dataclass
class Group:
    """The grid cells of one method at its settings, differing only by seed: tuned together."""

    key: str  # a hash of the settings they share, the searched ones left out
    label: str
    settings: dict[str, Any]  # the trials' starting point: the cell with the lowest seed
    axes: dict[str, Any]
    params: tuple[Param, ...]  # the searched settings that apply to this method
    cells: list[PlannedCell]
    split: str = ""  # what its trials are judged on (tuning_split), set by plan_check


def applies(param: Param, settings: dict[str, Any]) -> bool:
    """Whether ``param`` is a setting of the cell: a section's field, or a setting of its adapter or
    quantizer."""
    comp = param.component
    return comp is None or comp in (settings.get("adapter"), settings.get("quantizer"))


def set_value(settings: dict[str, Any], param: Param, value: Any) -> None:
    comp = param.component
    if comp is None:
        settings.setdefault(param.key.partition(".")[0], {})[param.setting] = value
    elif settings.get("adapter") == comp:
        settings.setdefault("adapter_params", {})[param.setting] = value
    else:
        settings.setdefault("quantizer_params", {})[param.setting] = value


def _without(settings: dict[str, Any], params: tuple[Param, ...]) -> dict[str, Any]:
    out = copy.deepcopy(settings)
    out.get("train", {}).pop("seed", None)
    for p in params:
        if p.component is None:
            out.get(p.key.partition(".")[0], {}).pop(p.setting, None)
        else:
            for table in ("adapter_params", "quantizer_params"):
                out.get(table, {}).pop(p.setting, None)
    return out


def groups(tune: TuneConfig, cells: list[PlannedCell]) -> list[Group]:
    """The tuned groups of the planned cells, in plan order; a vetoed cell and a method no searched
    setting applies to are not tuned."""
    out: dict[str, Group] = {}
    for c in cells:
        params = tuple(p for p in tune.space if applies(p, c.settings))
        if c.skip_reason or not params:
            continue
        key = hashlib.sha256(json.dumps(_without(c.settings, params), sort_keys=True, default=str).encode()).hexdigest()[:12]
        g = out.get(key)
        if g is None:
            out[key] = Group(key, c.group, c.settings, {k: v for k, v in c.axes.items() if k != "train.seed"}, params, [c])
        else:
            g.cells.append(c)
            if c.settings["train"]["seed"] < g.settings["train"]["seed"]:
                g.settings = c.settings
    return list(out.values())


def metric_name(metric: str) -> str:
    """The metric plugin a ``metric.<name>[.<score>]`` column comes from."""
    return metric.removeprefix("metric.").split(".")[0]


def trial_settings(tune: TuneConfig, group: Group, values: dict[str, Any], split: str) -> dict[str, Any]:
    """A trial's cell: the group's settings with ``values``, judged on ``split``."""
    s = copy.deepcopy(group.settings)
    for p in group.params:
        set_value(s, p, values[p.key])
    data, ev = s.setdefault("data", {}), s.setdefault("eval", {})
    data.update(eval_source=None, eval_split=split, eval_limit=tune.eval_limit, eval_sample="random")
    ev["forgetting"] = "none"  # what a trial is judged by is the validation split alone
    if tune.metric == "loss":
        ev.update(metrics=[], metric_params={}, loss=True, generate=False, before=False)
    else:
        name = metric_name(tune.metric)
        ev.update(metrics=[name], metric_params={k: v for k, v in ev.get("metric_params", {}).items() if k == name},
                  loss=False, generate=True, before=False)
    return s


def tuning_split(tune: TuneConfig, settings: dict[str, Any]) -> str:
    """``tune.split`` resolved: ``auto`` is the source's ``validation`` split where it has one, else
    ``tune-holdout``; a named split must exist (checked when the trials are planned)."""
    from peftlab.data.sources import DataConfig, open_source
    from peftlab.data.splits import TUNE_HOLDOUT

    if tune.split not in ("auto", "validation"):
        return tune.split
    cfg = DataConfig(**settings.get("data", {}))
    found = open_source(cfg.source, "data.source", cfg.splits, cfg.seed)
    if "validation" in found:
        return "validation"
    if tune.split == "validation":
        raise ValidationError("tune.split", "validation", f"a split of {cfg.source} ({', '.join(found)}), auto, or "
                              f"{TUNE_HOLDOUT}")
    return TUNE_HOLDOUT


def plan_check(tune: TuneConfig, cells: list[PlannedCell], host) -> list[Group]:
    """Every group's trials, at the edges of the space, are valid cells (names, settings, data),
    before anything runs; returns the groups, each with the split its trials are judged on."""
    from peftlab.cell.config import CellConfig
    from peftlab.cell.run import preflight
    from peftlab.data.splits import check_source

    out = groups(tune, cells)
    live = [c for c in cells if not c.skip_reason]
    for p in tune.space:  # a misspelt component would leave its method untuned without a word
        if live and not any(applies(p, c.settings) for c in live):
            names = sorted({str(c.settings.get(k)) for c in live for k in ("adapter", "quantizer") if c.settings.get(k)})
            raise ValidationError(f"tune.space.{p.key}", p.component, "a setting of a planned cell: a section's field, "
                                  f"or <component>.<setting> for a component the grid runs ({', '.join(names)})")
    checked: set[str] = set()
    for g in out:
        g.split = tuning_split(tune, g.settings)
        for edge in (0, -1):
            values = {p.key: p.bounds()[edge] for p in g.params}
            try:
                cfg = CellConfig.from_dict(trial_settings(tune, g, values, g.split))
                preflight(cfg, host)
                key = json.dumps(cfg.to_dict()["data"], sort_keys=True, default=str)
                if key not in checked:
                    check_source(cfg.data)
                    checked.add(key)
            except ValidationError as exc:
                raise ValidationError(f"tune ({g.label}, {describe(values)}): {exc.field}", exc.value, exc.allowed) from None
    return out


# -- outcomes, from records ---------------------------------------------------------------------------

def outcome(rec: dict[str, Any], metric: str) -> tuple[str, float | None]:
    """(outcome, value) of a trial's record: complete with its validation value, pruned with the
    last loss it reported, diverged, or failed."""
    if rec.get("status") == "failed":
        return (DIVERGED if str(rec.get("reason", "")).startswith("training diverged") else FAILED), None
    if rec.get("status") != "ok":
        return FAILED, None
    if rec.get("train.stopped_at"):
        curve = json.loads(rec.get("tune.curve") or "[]")
        return PRUNED, (curve[-1][1] if curve else None)
    value = rec.get("loss.eval" if metric == "loss" else metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return FAILED, None
    return COMPLETE, float(value)


def best(trials: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The best complete trial's record (lowest loss, highest metric; the first of equals)."""
    done = [(v, i, r) for i, r in enumerate(trials) for o, v in [outcome(r, metric)] if o == COMPLETE]
    if not done:
        return None
    sign = 1 if metric == "loss" else -1
    return min(done, key=lambda t: (sign * t[0], t[1]))[2]


def chosen_values(rec: dict[str, Any]) -> dict[str, Any]:
    return json.loads(rec["tune.params"])


def apply_chosen(cells: list[PlannedCell], found: dict[str, dict[str, Any]], tune: TuneConfig,
                 failed: dict[str, str]) -> list[PlannedCell]:
    """The grid's cells at their group's tuned values (axes and labels say them); a group whose
    tuning found nothing keeps its cells, skipped with the reason."""
    by_cell = {c.cell_id: g for g in groups(tune, cells) for c in g.cells}
    out = []
    for c in cells:
        g = by_cell.get(c.cell_id)
        if g is None:
            out.append(c)
            continue
        if g.key in failed:
            out.append(replace(c, skip_reason=failed[g.key]))
            continue
        values = found[g.key]
        settings = copy.deepcopy(c.settings)
        for p in g.params:
            set_value(settings, p, values[p.key])
        axes = {**c.axes, **{f"tuned.{p.key}": values[p.key] for p in g.params}}
        from peftlab.cell.config import CellConfig

        full = CellConfig.from_dict(settings).to_dict()
        out.append(PlannedCell(cell_id(full), describe(axes), full, axes, c.skip_reason))
    return out


# -- the studies ---------------------------------------------------------------------------------------

def place_key(place: dict[str, str]) -> str:
    from peftlab.sweep.resume import _cores_only

    text = json.dumps({k: _cores_only(v) if k == "device" else v for k, v in place.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def study_name(tune: TuneConfig, group: Group, place: dict[str, str]) -> str:
    """One study per group, search (space, judge, budget, sampler) and machine: a changed search
    starts a study of its own (a trial whose cell already has a record here still reads it). A
    larger ``trials`` goes on with the study while the random start-up count it implies stays (it
    is part of how the trials are drawn: 6 trials and 9 start TPE after 2 and 3)."""
    search = {k: v for k, v in tune.to_dict().items() if k != "trials"}
    search["startup_trials"] = tune.n_startup
    search["draws"] = DRAWS
    search = hashlib.sha256(json.dumps(search, sort_keys=True).encode()).hexdigest()[:8]
    return f"{group.key}-{search}@{place_key(place)}"


def sampler_for(tune: TuneConfig, index: int):
    """The TPE sampler that draws a study's ``index``-th trial (counting those a dead sweep left
    running only once, by the values they are asked again with): seeded with ``tune.seed + index``.

    One sampler per study seeded once would restart its random stream whenever a sweep resumes, and
    a resumed study in its random start-up phase would draw its first trial's values again. Seeded
    by the trial's place, every draw is a function of the seed, the index and the finished trials
    (TPE's model of them), whether the sweep ran through or was killed and resumed."""
    import optuna

    return optuna.samplers.TPESampler(seed=tune.seed + index, n_startup_trials=tune.n_startup)


def drawn(study) -> int:
    """How many of the study's trials took the sampler's draws or an enqueued re-ask's: all but the
    interrupted ones (:func:`recover` fails them without a record and asks their values again)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if not (t.state == TrialState.FAIL and "cell_id" not in t.user_attrs))


def make_pruner(rungs: list[int], reduction: int):
    """Successive halving whose rungs (``min_resource`` x ``reduction``^k) are the steps the trials
    report at; no pruning without rungs. Optuna keeps a study's pruner in the object, not in the
    storage: the trial's worker builds the same one from its link (``rungs``, ``reduction``)."""
    import optuna

    if not rungs:
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=rungs[0], reduction_factor=reduction)


def open_studies(tune: TuneConfig, gs: list[Group], folder: Path, place: dict[str, str]):
    """group key -> its Optuna study in ``folder/optuna.journal`` (created or resumed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / JOURNAL)))
    studies = {}
    for g in gs:
        sampler = sampler_for(tune, 0)
        pruner = make_pruner(tune.rungs(g.settings["train"]["steps"] or 0), tune.reduction)
        study = optuna.create_study(study_name=study_name(tune, g, place), storage=storage, sampler=sampler,
                                    pruner=pruner, load_if_exists=True,
                                    direction="minimize" if tune.minimise else "maximize")
        if not study.get_trials(deepcopy=False):  # a new study: its start points first (queued once, in the journal)
            for point in tune.start_for(g.params):
                study.enqueue_trial(point)
        studies[g.key] = study
    return studies


def told(study) -> list:
    """The study's trials told from a record (:func:`tell` marks them); a trial a dead sweep left
    running is not one."""
    return [t for t in study.get_trials(deepcopy=False) if "cell_id" in t.user_attrs and t.state.is_finished()]


def tell(study, trial, rec: dict[str, Any], metric: str, replay: bool) -> str:
    """Tell the study what the trial's record says; ``replay``: a record made before this trial
    (its reported losses are reported again, so the pruner sees them)."""
    from optuna.trial import TrialState

    what, value = outcome(rec, metric)
    if replay:
        for step, loss in json.loads(rec.get("tune.curve") or "[]"):
            trial.report(loss, step)
            trial.should_prune()  # as the worker did: the pruner marks the rung, so later trials compete with it
    trial.set_user_attr("outcome", what)
    trial.set_user_attr("cell_id", rec["cell_id"])
    if what == COMPLETE:
        study.tell(trial, value)
    elif what in (PRUNED, DIVERGED):  # a diverged rate is a bad rate: the sampler learns from it as from a pruned one
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)
    return what


def recover(study, group: Group) -> None:
    """Trials a dead sweep left running: failed as interrupted, their values asked again first."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)  # no cell_id: not counted (told)
        study.enqueue_trial({p.key: t.params[p.key] for p in group.params if p.key in t.params})


@dataclass(frozen=True)
class Trial:
    group: Group
    cell: PlannedCell
    link: dict[str, Any]  # what the worker needs to report to the study
    optuna_trial: Any


def run_tuning(tune: TuneConfig, cells: list[PlannedCell], folder: Path, *, host, executor, place: dict[str, str],
               done: Callable[[dict[str, Any] | None], bool], log: Callable[[str], None],
               write_inputs: Callable[[Any, PlannedCell, dict[str, Any]], Any], progress: bool = True,
               batch: int = 1, finished: Callable[[Any, PlannedCell, dict[str, Any]], None] | None = None,
               ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Run every group's trials into the store at ``folder``; returns (group key -> chosen values,
    group key -> why nothing was chosen). ``done(record)``: whether an existing trial record counts
    (finished here). ``batch``: trials asked at once (the executor's jobs). ``finished(store, cell,
    record)``: called for each trial that ran."""
    from tqdm.auto import tqdm

    from peftlab.sweep.store import ResultsStore

    store = ResultsStore(folder)
    gs = plan_check(tune, cells, host)
    if not gs:
        return {}, {}
    studies = open_studies(tune, gs, folder, place)
    for g in gs:
        recover(studies[g.key], g)
    total = tune.trials * len(gs)
    left = {g.key: tune.trials - len(told(studies[g.key])) for g in gs}
    log(f"  tuning {len(gs)} group(s), {tune.trials} trials each ({total - sum(max(0, n) for n in left.values())} "
        f"done), by {tune.metric} on split {', '.join(sorted({g.split for g in gs}))}: "
        + "; ".join(p.describe() for p in tune.space))
    bar = tqdm(total=total, initial=total - sum(max(0, n) for n in left.values()), desc="tune", unit="trial",
               disable=not progress, dynamic_ncols=True, position=0)
    journal = str((folder / JOURNAL).resolve())
    try:
        while any(n > 0 for n in left.values()):
            pending = [g for g in gs if left[g.key] > 0]
            per_group = max(1, math.ceil(batch / len(pending)))
            asked: list[Trial] = []
            for g in pending:
                study = studies[g.key]
                for _ in range(min(per_group, left[g.key])):
                    study.sampler = sampler_for(tune, drawn(study))
                    ot = study.ask()
                    values = {p.key: p.suggest(ot) for p in g.params}
                    settings = trial_settings(tune, g, values, g.split)
                    from peftlab.cell.config import CellConfig

                    full = CellConfig.from_dict(settings).to_dict()
                    axes = {**g.axes, **{f"trial.{p.key}": values[p.key] for p in g.params}}
                    cell = PlannedCell(cell_id(full), f"{g.label} trial {ot.number}: {describe(values)}", full, axes)
                    steps = full["train"]["steps"] or 0
                    link = {"journal": journal, "study": study.study_name, "trial_id": ot._trial_id,
                            "trial": ot.number, "group": g.label, "params": values, "metric": tune.metric,
                            "rungs": tune.rungs(steps), "reduction": tune.reduction}
                    asked.append(Trial(g, cell, link, ot))
                    left[g.key] -= 1
            scan = store.scan().records
            fresh = []
            for t in asked:
                prior = scan.get(t.cell.cell_id)
                if done(prior):
                    what = tell(studies[t.group.key], t.optuna_trial, prior, tune.metric, replay=True)
                    bar.update(1)
                    bar.write(f"  {t.cell.label}: {what} (record kept)", file=sys.stderr)
                else:
                    fresh.append(t)
            by_id = {t.cell.cell_id: t for t in fresh}
            if len(by_id) < len(fresh):  # two trials that round to one cell: the first runs, the rest read it
                seen: set[str] = set()
                dupes = [t for t in fresh if t.cell.cell_id in seen or seen.add(t.cell.cell_id)]
                fresh = [t for t in fresh if t not in dupes]
            else:
                dupes = []

            def on_record(cell: PlannedCell, f, rec: dict[str, Any], by_id=by_id) -> None:
                t = by_id[cell.cell_id]
                if rec.get("run_id") != f.run_id:
                    store.write_record(rec)
                what = tell(studies[t.group.key], t.optuna_trial, rec, tune.metric, replay=False)
                if finished is not None:
                    finished(store, cell, rec)
                bar.update(1)
                bar.write(f"  {cell.label}: {what}" + (f" ({rec['reason']})" if rec.get("reason") else ""), file=sys.stderr)

            executor.run_all([t.cell for t in fresh], lambda c, by_id=by_id: write_inputs(store, c, by_id[c.cell_id].link),
                             on_record)
            if dupes:
                scan = store.scan().records
                for t in dupes:
                    tell(studies[t.group.key], t.optuna_trial, scan[t.cell.cell_id], tune.metric, replay=True)
                    bar.update(1)
    finally:
        bar.close()
    records = store.scan().records
    found, failed, summary = {}, {}, []
    for g in gs:
        mine = sorted(told(studies[g.key]), key=lambda t: t.number)
        ids = [t.user_attrs["cell_id"] for t in mine]
        trials = [records[i] for i in ids if i in records]
        pick = best(trials, tune.metric)
        summary.append({"group": g.label, "key": g.key, "study": studies[g.key].study_name,
                        "space": [p.describe() for p in g.params], "trials": ids,
                        "chosen": chosen_values(pick) if pick else None,
                        "value": outcome(pick, tune.metric)[1] if pick else None,
                        "chosen_cell": pick["cell_id"] if pick else None})
        if pick is None:
            kinds = [outcome(r, tune.metric)[0] for r in trials]
            failed[g.key] = (f"tuning found no setting that trained to the end ({len(trials)} trials: "
                             + ", ".join(f"{kinds.count(k)} {k}" for k in (PRUNED, DIVERGED, FAILED) if kinds.count(k))
                             + f"); see {folder}")
        else:
            found[g.key] = chosen_values(pick)
            log(f"  {g.label}: {describe(found[g.key])} ({tune.metric} {outcome(pick, tune.metric)[1]:.4g}, "
                f"trial {mine[ids.index(pick['cell_id'])].number})")  # this study's number, not the record's own
    from peftlab.atomic import write_text_atomic

    write_text_atomic(folder / SUMMARY, json.dumps({"tune": tune.to_dict(), "groups": summary}, indent=2,
                                                   default=str) + "\n")
    return found, failed
