"""``peftlab score`` (rescore stored predictions) and ``peftlab export`` (the official scorer's format)."""

from __future__ import annotations

import argparse
import sys


def add_parsers(sub) -> None:
    p = sub.add_parser("score", help="rescore a results folder's stored predictions with metric plugins "
                       "(no model needed) and update its tables")
    p.add_argument("folder", help="a results folder (results/<experiment>), or one predictions file "
                   "(peftlab run --predictions FILE): its scores are printed")
    p.add_argument("--metrics", required=True, help="comma-separated metric names, e.g. e2e or bleu-e2e,nist")
    p.add_argument("--mset", action="append", metavar="METRIC:KEY=VALUE", help="a metric setting")
    p.set_defaults(func=run_score)
    e = sub.add_parser("export", help="write stored predictions and grouped references in the official E2E "
                       "scorer's text format (one folder per cell)")
    e.add_argument("folder", help="a results folder (results/<experiment>), or one predictions file "
                   "(peftlab run --predictions FILE)")
    e.add_argument("--out", required=True, help="where to write <cell_id>/predictions.txt and references.txt")
    e.set_defaults(func=run_export)


def run_score(args: argparse.Namespace) -> int:
    from peftlab.cli.common import host_for, metric_names, metric_settings
    from peftlab.report.sweep_report import render
    from peftlab.sweep.rescore import is_predictions_file, rescore

    records = rescore(args.folder, metric_names(args.metrics), host_for(args), metric_settings(args.mset),
                      log=lambda s: print(s, file=sys.stderr))
    if is_predictions_file(args.folder):
        print("\n".join(f"{k} {v:.4f}" for k, v in records[0].items() if k != "file"))
        return 0
    print(f"rescored {len(records)} cells; report: {render(args.folder)}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from peftlab.sweep.rescore import export

    written = export(args.folder, args.out)
    for preds, refs in written:
        print(f"{preds}  {refs}")
    print("check with the official scorer: python measure_scores.py -p REFERENCES PREDICTIONS", file=sys.stderr)
    return 0
