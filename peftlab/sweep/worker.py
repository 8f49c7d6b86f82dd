"""``python -m peftlab.sweep.worker INPUTS.json RECORD.json``: run one planned cell in this process
and write its complete record once, atomically. The sweep starts one per cell, so a crash here is
one failed row, not a failed sweep. A cell that raises is recorded as ``failed`` with the error.
The plugin host is built from the sweep's own settings (strict mode, disabled plugins), carried in
the inputs, not from this process's environment."""

from __future__ import annotations

import argparse
import sys
import traceback


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftlab.sweep.worker")
    p.add_argument("inputs")
    p.add_argument("record")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    import os
    from pathlib import Path

    from peftlab.cell.config import CellConfig
    from peftlab.cell.run import CellOutputs, base_record, run_cell
    from peftlab.host import HostSettings, load_host
    from peftlab.plugin.errors import PeftlabError
    from peftlab.sweep.store import write_record_file

    if os.environ.get("PEFTLAB_NUM_THREADS"):  # this worker's share of the cores (sweep --jobs)
        import torch

        torch.set_num_threads(int(os.environ["PEFTLAB_NUM_THREADS"]))
    from peftlab.readback import DamagedFile, read_json

    try:
        spec = read_json(args.inputs, "cell inputs")
    except DamagedFile as exc:  # no identity to write a record under: the sweep records the cell as failed
        print(f"peftlab worker: {exc}", file=sys.stderr)
        return 2
    cfg = CellConfig.from_dict(spec["settings"])
    ident = {k: spec[k] for k in ("cell_id", "label", "group", "axes", "run_id")}
    reporter = None
    try:
        host = load_host(HostSettings.from_dict(spec["host"]))
        out = spec.get("outputs") or {}
        outputs = CellOutputs(predictions=Path(out["predictions"]) if out.get("predictions") else None,
                              adapter=Path(out["adapter"]) if out.get("adapter") else None)
        link = spec.get("tune")
        reporter = TrialReporter(link) if link else None
        rec = run_cell(cfg, host, progress=not args.no_progress, outputs=outputs,
                       on_step=reporter.on_step if reporter and reporter.rungs else None)
        if reporter:
            rec.update(reporter.fields())
        folder = Path(args.record).resolve().parent.parent  # results/<experiment>/: keep paths relative to it
        for key in ("predictions.file", "adapter.saved"):
            if key in rec:
                rec[key] = str(Path(rec[key]).resolve().relative_to(folder))
    except PeftlabError as exc:
        rec = {**base_record(cfg), "status": "failed", "reason": str(exc), **(reporter.fields() if reporter else {})}
    except Exception as exc:  # a bug or a library error: keep the last frames for the reader
        frames = traceback.format_exception(exc)[-3:]
        reason = f"{type(exc).__name__}: {exc}"
        if out_of_memory(exc):
            reason = f"out of memory (the cell needs more than this machine or its limits give it): {reason}"
        rec = {**base_record(cfg), "status": "failed", "reason": reason[:2000],
               "error.traceback": "".join(frames)[-2000:], **(reporter.fields() if reporter else {})}
        traceback.print_exc()
    if os.environ.get("PEFTLAB_SWEEP_JOBS"):
        rec["sweep.jobs"] = int(os.environ["PEFTLAB_SWEEP_JOBS"])
    write_record_file(args.record, {**ident, **rec})
    return 0


class TrialReporter:
    """A tuning trial's link to its Optuna study (``inputs["tune"]``, written by
    :mod:`peftlab.sweep.tuner`): at each of the pruner's rungs the validation loss is reported to
    the study, and training stops where the pruner says so. Where the study's journal cannot be
    opened here (a cluster node without the results folder), the trial runs unpruned and says so."""

    def __init__(self, link: dict):
        self.link, self.rungs, self.curve, self.note = link, set(link.get("rungs") or ()), [], ""
        self.trial = None
        if self.rungs:
            try:
                import optuna

                optuna.logging.set_verbosity(optuna.logging.WARNING)
                storage = optuna.storages.JournalStorage(
                    optuna.storages.journal.JournalFileBackend(link["journal"]))
                from peftlab.sweep.tuner import make_pruner

                study = optuna.load_study(study_name=link["study"], storage=storage,
                                          pruner=make_pruner(sorted(self.rungs), link["reduction"]))
                self.trial = optuna.trial.Trial(study, link["trial_id"])  # the trial the sweep asked for
            except Exception as exc:  # noqa: BLE001 - any failure to reach the study: run the trial whole
                self.rungs, self.note = set(), f"not pruned: the study could not be opened ({type(exc).__name__}: {exc})"

    def on_step(self, steps: int, loss) -> bool:
        if steps not in self.rungs:
            return False
        value = float(loss())
        self.curve.append([steps, value])
        self.trial.report(value, steps)
        return bool(self.trial.should_prune())

    def fields(self) -> dict:
        import json

        out = {"tune.group": self.link["group"], "tune.trial": self.link["trial"], "tune.study": self.link["study"],
               "tune.params": json.dumps(self.link["params"], sort_keys=True), "tune.metric": self.link["metric"],
               "tune.curve": json.dumps(self.curve)}
        if self.note:
            out["tune.note"] = self.note
        return out


def out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's CPU allocator or CUDA's."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc)))


if __name__ == "__main__":
    sys.exit(main())
