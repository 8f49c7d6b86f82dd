"""``peftlab sweep`` (run an experiment's grid) and ``peftlab report`` (re-render from records)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peftlab.cli.common import positive_int


def add_parsers(sub) -> None:
    p = sub.add_parser("sweep", help="run an experiment file's grid into results/<name>/ (resumable)")
    p.add_argument("experiment", help="an experiment TOML file (see experiments/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="train.steps=20, model.name=tiny-llama, grid.train.seed=0,1, name=...")
    p.add_argument("--out", help="results folder (default results/<experiment name>)")
    p.add_argument("--force", action="store_true", help="re-run cells that already have a record")
    p.add_argument("--reuse-foreign", action="store_true",
                   help="count finished records made on another host or with other versions as done")
    p.add_argument("--plan", action="store_true", help="validate and list the cells; run nothing")
    p.add_argument("--executor", choices=["local", "ray", "slurm"],
                   help="where cells run (default: the experiment's [executor] kind, else local)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="local: cells at once on this machine, one GPU each or an equal share of the CPU cores each")
    p.add_argument("--ray-address", help="ray: the cluster to join (default: start a local instance)")
    p.add_argument("--partition", help="slurm: the partition")
    p.add_argument("--time-min", type=int, help="slurm: each cell's time limit in minutes (default 60)")
    p.add_argument("--gpus-per-cell", type=int, help="ray, slurm (default: 1 on CUDA, else 0)")
    p.add_argument("--cpus-per-cell", type=int, help="ray, slurm (default: 1 with a GPU, else this machine's cores)")
    p.add_argument("--mem-gb", type=int, help="slurm: memory per cell")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch threads of each cell (default: the "
                   "cores, or an equal share of them with --jobs); fewer where anything else runs on the machine")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_sweep)
    r = sub.add_parser("report", help="re-render report.md, tables and plots of a results folder")
    r.add_argument("folder", help="a results folder (results/<experiment>)")
    r.set_defaults(func=run_report)


def run_sweep(args: argparse.Namespace) -> int:
    from peftlab.cell.models import ModelConfig
    from peftlab.cli.common import host_for
    from peftlab.report.sweep_report import render
    from peftlab.sweep.executors import build_executor
    from peftlab.sweep.executors.settings import ExecutorSettings
    from peftlab.sweep.experiment import load_experiment
    from peftlab.sweep.runner import finished_sweep, sweep

    host = host_for(args)
    exp = load_experiment(args.experiment, args.overrides)
    if args.plan:
        cells = exp.cells(host)
        tuned = set()
        if exp.tune is not None:
            from peftlab.sweep.tuner import plan_check

            for g in plan_check(exp.tune, cells, host):
                print(f"tune  {g.label}: {exp.tune.trials} trials of {'; '.join(p.describe() for p in g.params)}")
                tuned.update(c.cell_id for c in g.cells)
        for c in cells:
            print(f"{c.cell_id}  {c.label}" + (f"  [skipped: {c.skip_reason}]" if c.skip_reason else "")
                  + ("  [its id changes with the tuned values]" if c.cell_id in tuned else ""))
        print(f"{len(cells)} cells" + (f", {len(tuned)} of them at settings tuning chooses" if tuned else ""),
              file=sys.stderr)
        if exp.seeds is not None:
            from peftlab.sweep.seeds import extra_cells, rows

            print(f"and up to {len(extra_cells(rows(exp.seeds, cells)))} more: a row whose 95% interval of "
                  f"{exp.seeds.until} is wider than +-{exp.seeds.half_width:g} gets another seed, up to "
                  f"{exp.seeds.max} a row", file=sys.stderr)
        return 0
    out = Path(args.out or Path("results") / exp.name)
    command = " ".join(["peftlab", *args.argv])
    settings = ExecutorSettings.from_sources(exp.executor, {
        "kind": args.executor, "jobs": args.jobs, "ray_address": args.ray_address, "partition": args.partition,
        "time_min": args.time_min, "gpus_per_cell": args.gpus_per_cell, "cpus_per_cell": args.cpus_per_cell,
        "mem_gb": args.mem_gb})
    device = ModelConfig(**exp.base.get("model", {})).resolved_device()
    executor = build_executor(settings, device.type, out, progress=not args.no_progress, threads=args.threads)
    try:
        records = sweep(exp, out, host=host, executor=executor, force=args.force, reuse_foreign=args.reuse_foreign,
                        progress=not args.no_progress, command=command)
    except KeyboardInterrupt:
        print(f"\npeftlab: interrupted. Every finished cell is kept in {out}/cells; run the same command again "
              f"to resume:\n  {command}", file=sys.stderr)
        return 130
    report = render(out)
    finished_sweep(host, exp.name, out, report)
    failed = sum(r.get("status") == "failed" for r in records)
    print(f"wrote {report} ({len(records)} cells, {failed} failed)", file=sys.stderr)
    return 1 if failed else 0


def run_report(args: argparse.Namespace) -> int:
    from peftlab.report.sweep_report import render

    print(f"wrote {render(args.folder)}", file=sys.stderr)
    return 0
