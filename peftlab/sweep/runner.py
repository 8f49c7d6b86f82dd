"""Running a sweep: every cell in its own process, one record per cell, resumable.

Where cells run is behind :class:`peftlab.sweep.executors.Executor` (one module per executor in
:mod:`peftlab.sweep.executors`); which finished records count as done is
:mod:`peftlab.sweep.resume`'s rule; the folder's layout belongs to :mod:`peftlab.sweep.store`.

``--jobs N`` runs N workers at once (one GPU each, or an equal share of the CPU threads each).

Re-running a sweep skips cells whose record says ``ok`` or ``skipped`` and was made here (this
host, the same torch, transformers, bitsandbytes and peftlab; any thread count); failed, missing or damaged cells
run again, and so do records from elsewhere (committed reference results in a fresh clone) unless
``reuse_foreign``; ``force`` re-runs everything.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab.host import PluginHost
from peftlab.sweep.executors.base import Executor, cell_identity, own_record
from peftlab.sweep.executors.local import LocalProcessExecutor
from peftlab.sweep.experiment import Experiment, PlannedCell
from peftlab.sweep.resume import DONE, here, same_place
from peftlab.sweep.seed_rule import SeedRule
from peftlab.sweep.seeds import Row, extra_cells, next_cells, shortfall
from peftlab.sweep.seeds import rows as seed_rows
from peftlab.sweep.store import CellFiles, ResultsStore


def sweep(exp: Experiment, out: Path, *, host: PluginHost, executor: Executor | None = None, force: bool = False,
          reuse_foreign: bool = False, progress: bool = True, command: str | None = None,
          log: Callable[[str], None] | None = None, jobs: int = 1) -> list[dict[str, Any]]:
    """Plan, validate and run every cell of ``exp`` into ``out``; returns the planned cells'
    records (old and new). A finished record made on another host or with other versions is run
    again here, unless ``reuse_foreign``; it stays in place until its replacement is written.
    ``jobs`` cells run at once with the local executor (see :func:`job_slots`)."""
    from tqdm.auto import tqdm

    from peftlab.provenance import versions

    log = log or (lambda s: print(s, file=sys.stderr))
    cells = exp.cells(host)  # everything is validated before anything runs
    if executor is None:
        from peftlab.cell.models import ModelConfig

        device = ModelConfig(**exp.base.get("model", {})).resolved_device()
        executor = LocalProcessExecutor(progress=progress, jobs=jobs, device_type=device.type)
    store = ResultsStore(out)
    with store.locked():
        store.open(exp.name, exp.path, command, versions()["peftlab"],
                   extra={**({"budget": exp.budget.to_dict()} if exp.budget else {}),
                          **({"seeds": exp.seeds.to_dict()} if exp.seeds else {}),
                          **({"tune": exp.tune.to_dict()} if exp.tune else {})})
        place = here(exp)
        if exp.tune is not None:
            cells = tuned_cells(exp, cells, store, host, executor, place, reuse_foreign, log, progress)
        rows = seed_rows(exp.seeds, cells) if exp.seeds else []
        scan = store.scan()
        todo, done, foreign = [], 0, 0
        for c in cells:
            prior = scan.records.get(c.cell_id)
            if counts(prior, place, reuse_foreign=reuse_foreign, force=force):
                done += 1
            elif c.skip_reason:
                _finish(host, store, own_record(c, "skipped", c.skip_reason), settings=c.settings, experiment=exp.name)
                done += 1
            else:
                foreign += finished(prior, force)
                todo.append(c)
        log(header(exp, host, len(cells), done, len(todo)))
        extra = extra_cells(rows)
        if extra:
            log(f"  up to {len(extra)} more cell(s): a row whose 95% interval of {exp.seeds.until} is wider than "
                f"+-{exp.seeds.half_width:g} gets another seed, up to {exp.seeds.max} seeds a row")
        planned_files = {store.record_path(c.cell_id) for c in [*cells, *extra]}
        for path, why in scan.damaged.items():
            log(f"  damaged record {path} ({why}): " + ("its cell runs again" if path in planned_files
                                                        else "not a cell of this experiment; left as it is"))
        planned_ids = {c.cell_id for c in [*cells, *extra]}
        unplanned = sorted(cid for cid in scan.records if cid not in planned_ids)
        if unplanned:  # never averaged with this plan's cells of the same label; nothing deleted
            aside = [store.set_aside(cid) for cid in unplanned][0]
            log(f"  {len(unplanned)} record(s) in {store.folder / 'cells'} belong to no cell of this plan (an earlier "
                f"version of the experiment or of peftlab's cell settings, e.g. {unplanned[0]}): moved with their "
                f"files to {aside}, so the report does not average them with this plan's cells")
        if foreign:
            log(f"  {foreign} finished cell(s) were made on another host, device or versions (committed "
                "results, for one); running them here. --reuse-foreign keeps them instead.")
        bar = tqdm(total=len(todo), desc=f"sweep {exp.name}", unit="cell", disable=not progress or not (todo or rows),
                   dynamic_ncols=True, position=0)
        settings = host.settings.to_dict()

        def files(cell: PlannedCell) -> CellFiles:
            outputs = {"predictions": str(store.predictions_path(cell.cell_id)),
                       "adapter": str(store.adapter_path(cell.cell_id)) if exp.save_adapters != "none" else None}
            return store.write_inputs(cell.cell_id, {**cell_identity(cell), "settings": cell.settings,
                                                     "host": settings, "outputs": outputs})

        def on_record(cell: PlannedCell, f: CellFiles, rec: dict[str, Any]) -> None:
            if rec.get("run_id") != f.run_id:  # no worker wrote it (executors return what a worker wrote)
                store.write_record(rec)
            _finish(host, store, rec, write=False, settings=cell.settings, experiment=exp.name)
            bar.update(1)
            bar.write(f"  {cell.label}: {rec['status']}" + (f" ({rec['reason']})" if rec.get("reason") else ""), file=sys.stderr)

        try:
            executor.run_all(todo, files, on_record)
            if rows:
                tried = {c.cell_id for c in todo}  # grows as the rule runs cells: what ran here counts, --force or not
                added = more_seeds(exp.seeds, rows, store, executor, files, on_record, bar, log, tried=tried,
                                   counted=lambda rec: (rec.get("cell_id") in tried and rec["status"] in DONE)
                                   or counts(rec, place, reuse_foreign=reuse_foreign, force=force))
                cells = [*cells, *added]
        finally:
            bar.close()
        records = store.scan().records
        if exp.save_adapters == "best":
            keep_best_adapter(store, records, exp.best_by, log)
        return [records[c.cell_id] for c in cells if c.cell_id in records]


def finished(prior: dict[str, Any] | None, force: bool) -> bool:
    """Whether a cell's existing record says it finished (and ``--force`` does not run it anyway)."""
    return prior is not None and prior["status"] in DONE and not force


def counts(prior: dict[str, Any] | None, place: dict[str, str], *, reuse_foreign: bool, force: bool) -> bool:
    """Whether a cell's existing record stands for it (the cell does not run again): finished, and
    made here (or anywhere, with ``reuse_foreign``; a skipped cell anywhere)."""
    return finished(prior, force) and (reuse_foreign or prior["status"] == "skipped" or same_place(prior, place))


def more_seeds(rule: SeedRule, rows: list[Row], store: ResultsStore, executor: Executor, files, on_record, bar,
               log: Callable[[str], None], *, tried: set[str], counted: Callable[[dict[str, Any]], bool]) -> list[PlannedCell]:
    """The ``[seeds]`` rule after the grid: every wide row's next seed, round by round, until no row
    is wide or has seeds left (:mod:`peftlab.sweep.seeds`). Returns every extra-seed cell with a
    record that counts or that ran here (the rows' cells beyond the grid's that the report shows)."""
    while True:
        records = store.scan().records
        batch = next_cells(rule, rows, records, counted, tried)
        if not batch:
            break
        log(f"  another seed for {len(batch)} row(s) whose interval of {rule.until} is wider than "
            f"+-{rule.half_width:g}: " + "; ".join(c.label for c in batch))
        tried.update(c.cell_id for c in batch)
        bar.total += len(batch)
        bar.refresh()
        executor.run_all(batch, files, on_record)
    records = store.scan().records
    left = shortfall(rule, rows, records, counted)
    if left:
        log(f"  {len(left)} row(s) had all {rule.max} seeds and are still wider than +-{rule.half_width:g}: "
            + "; ".join(left))
    extra = extra_cells(rows)
    return [c for c in extra if c.cell_id in tried or (c.cell_id in records and counted(records[c.cell_id]))]


def tuned_cells(exp: Experiment, cells: list[PlannedCell], store: ResultsStore, host: PluginHost, executor: Executor,
                place: dict[str, str], reuse_foreign: bool, log: Callable[[str], None],
                progress: bool) -> list[PlannedCell]:
    """Run the experiment's tuning (:mod:`peftlab.sweep.tuner`) into ``tuning/`` and return the grid's
    cells at the chosen settings. A trial's record counts when it finished here (or anywhere, with
    ``reuse_foreign``); ``--force`` re-runs the grid, not the tuning (delete ``tuning/`` for that)."""
    from peftlab.sweep.tuner import DIVERGED, FOLDER, apply_chosen, outcome, run_tuning

    settings = host.settings.to_dict()

    def done(prior: dict[str, Any] | None) -> bool:
        if prior is None:
            return False
        finished = prior["status"] in DONE or outcome(prior, exp.tune.metric)[0] == DIVERGED
        return finished and (reuse_foreign or same_place(prior, place))

    def write_inputs(trials: ResultsStore, cell: PlannedCell, link: dict[str, Any]) -> CellFiles:
        return trials.write_inputs(cell.cell_id, {**cell_identity(cell), "settings": cell.settings, "host": settings,
                                                  "outputs": {"predictions": str(trials.predictions_path(cell.cell_id)),
                                                              "adapter": None}, "tune": link})

    log(f"peftlab sweep {exp.name} ({exp.path}): tuning before the grid, into {store.folder / FOLDER}")
    def observed(trials: ResultsStore, cell: PlannedCell, rec: dict[str, Any]) -> None:
        _finish(host, trials, rec, write=False, settings=cell.settings, experiment=exp.name, top=store.folder)

    found, failed = run_tuning(exp.tune, cells, store.folder / FOLDER, host=host, executor=executor, place=place,
                               done=done, log=log, write_inputs=write_inputs, progress=progress,
                               batch=len(getattr(executor, "slots", ())) or 1, finished=observed)
    return apply_chosen(cells, found, exp.tune, failed)


def keep_best_adapter(store: ResultsStore, records: dict[str, dict[str, Any]], by: str,
                      log: Callable[[str], None]) -> None:
    """Of the adapters the cells saved, keep the one with the highest ``by`` and delete the rest."""
    import shutil

    scored = [(r[by], cid) for cid, r in records.items()
              if r.get("status") == "ok" and isinstance(r.get(by), (int, float)) and store.adapter_path(cid).is_dir()]
    if not scored:
        log(f"  save_adapters = best: no finished cell has {by}; no adapter kept")
        return
    best = max(scored)[1]
    for _, cid in scored:
        if cid != best:
            shutil.rmtree(store.adapter_path(cid))
    log(f"  kept the adapter of the best cell by {by}: {store.adapter_path(best)}")


def _finish(host: PluginHost, store: ResultsStore, rec: dict[str, Any], write: bool = True, *,
            settings: dict[str, Any] | None = None, experiment: str = "", top: Path | None = None) -> None:
    """Store ``rec`` (unless a worker did) and tell the ``peftlab_cell_finished`` observers."""
    import copy

    if write:
        store.write_record(rec)
    files = {"record": store.record_path(rec["cell_id"])}
    for key, name in (("predictions.file", "predictions"), ("adapter.saved", "adapter")):
        if rec.get(key):
            files[name] = store.folder / rec[key]
    try:
        host.hook.peftlab_cell_finished(record=dict(rec), settings=copy.deepcopy(settings or {}), experiment=experiment,
                                        folder=str((top or store.folder).resolve()),
                                        files={k: str(p.resolve()) for k, p in files.items() if p.exists()})
    except Exception as exc:  # an observer must not stop the sweep
        print(f"peftlab: warning: a peftlab_cell_finished hook failed: {exc!r}", file=sys.stderr)


def finished_sweep(host: PluginHost, experiment: str, folder: Path, report: Path) -> None:
    """Tell the ``peftlab_sweep_finished`` observers (after the report is written)."""
    try:
        host.hook.peftlab_sweep_finished(experiment=experiment, folder=str(folder.resolve()), report=str(report.resolve()))
    except Exception as exc:
        print(f"peftlab: warning: a peftlab_sweep_finished hook failed: {exc!r}", file=sys.stderr)


def header(exp: Experiment, host: PluginHost, total: int, done: int, todo: int) -> str:
    from peftlab.cell.models import ModelConfig
    from peftlab.provenance import device_name, versions

    plugins = ", ".join(f"{r['name']} {r['version'] or ''}".strip() + ("" if r["status"] == "ok" else f" [{r['status']}]")
                        for r in host.table())
    dev = ModelConfig(**exp.base.get("model", {})).resolved_device()
    v = versions()
    return (f"peftlab sweep {exp.name} ({exp.path}): {total} cells, {done} already done, {todo} to run\n"
            f"  device: {device_name(dev)}\n"
            f"  versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "\n"
            f"  plugins: {plugins}")
