"""The ``peftlab`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peftlab.cli.common import host_for
from peftlab.plugin.errors import PeftlabError


def _cmd_plugins(args: argparse.Namespace) -> int:
    table = host_for(args).table()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"{'name':12} {'status':8} {'distribution':24} components")
    for r in table:
        dist = f"{r['distribution'] or '-'} {r['version'] or ''}".strip()
        comps = "; ".join(f"{k}: {', '.join(v)}" for k, v in r["components"].items()) or "-"
        if r.get("refused"):
            comps += "; refused: " + "; ".join(f"{c} ({why})" for c, why in r["refused"].items())
        status = r["status"] if r["status"] != "error" else f"error: {r['error']}"
        print(f"{r['name']:12} {status:8} {dist:24} {comps}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """One installed plugin against the contract: each component built with its defaults and
    probed (:mod:`peftlab.probe`), the way every command checks it when the plugin loads; with
    ``--full`` also the contract tests shipped in :mod:`peftlab.contract`, on its components only."""
    records = {r["name"]: r for r in host_for(args).table()}
    r = records.get(args.plugin)
    if r is None:
        print(f"peftlab check: no plugin {args.plugin!r} is installed; installed: {', '.join(records) or '(none)'}",
              file=sys.stderr)
        return 2
    print(f"plugin {r['name']} ({r['distribution'] or 'in-process'} {r['version'] or ''}): {r['status']}".rstrip())
    if r["status"] == "disabled":
        return 1
    for kind, names in r["components"].items():
        for name in names:
            print(f"  ok       {kind} {name}")
    for component, why in r["refused"].items():
        print(f"  refused  {component}: {why}")
    if r["status"] == "error":
        print(f"  error    {r['error']}")
    ok = r["status"] == "ok" and not r["refused"]
    rest = list(args.pytest_args)  # argparse hands everything after the plugin's name here
    own, pytest_args = (rest[: rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
    if [a for a in own if a != "--full"]:
        print(f"peftlab check: unrecognized arguments {own}; pytest's go after --", file=sys.stderr)
        return 2
    if not (args.full or "--full" in own):
        if r["components"]:
            print(f"The full contract tests (train, save, reload, merge through each component): "
                  f"peftlab check {args.plugin} --full")
        return 0 if ok else 1
    import subprocess
    from importlib.util import find_spec

    if find_spec("pytest") is None:
        print("peftlab check --full needs pytest: pip install 'peftlab[test]'", file=sys.stderr)
        return 2
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "peftlab.contract.plugin", "--pyargs",
                           "peftlab.contract", "--peftlab-plugin",
                           args.plugin, "-q", "-p", "no:cacheprovider", *pytest_args])
    return done.returncode if ok else 1


def _cmd_list(args: argparse.Namespace) -> int:
    registry = getattr(host_for(args), args.kind)
    if getattr(args, "name", None):
        return _describe(registry, args.name, args.json)
    for spec in registry:
        params = ", ".join(f"{k}={v}" for k, v in spec.params.items())
        print(f"{spec.name:14} {spec.summary}" + (f"  [{params}]" if params else ""))
    return 0


def _describe(registry, name: str, as_json: bool) -> int:
    """Every option of one component: name, type, default (the preset's), bounds and meaning."""
    from peftlab.plugin.settings import describe_schema

    spec = registry.get(name)
    schema = getattr(spec.factory, "Settings", None)
    rows = [vars(o) for o in describe_schema(schema, spec.params)] if schema else []
    cls = spec.factory
    traits = {"provider": registry.provider(name), "summary": spec.summary}
    if registry.kind == "adapter":
        traits.update({"size_setting": getattr(cls, "size_setting", None), "trains_base": getattr(cls, "trains_base", False),
                       "mergeable": getattr(cls, "mergeable", False), "peft_type": getattr(cls, "peft_type", None),
                       "grad_checkpointing": getattr(cls, "supports_grad_checkpointing", True)})
    if as_json:
        print(json.dumps({"name": name, **traits, "options": rows}, indent=2, default=str))
        return 0
    print(f"{name}: {spec.summary}")
    print("  " + ", ".join(f"{k}={v}" for k, v in traits.items() if k not in ("summary",)))
    if not schema:
        print("  (its settings are not declared as a schema; it takes: "
              + (", ".join(f"{k}={v!r}" for k, v in spec.params.items()) or "none") + ")")
        return 0
    width = max(len(r["name"]) for r in rows) if rows else 0
    for r in rows:
        bounds = f", {r['bounds']}" if r["bounds"] else ""
        print(f"  {r['name']:{width}}  {r['type']}{bounds}; default {r['default']!r}\n  {'':{width}}  {r['help']}")
    return 0


def _cmd_quantizers(args: argparse.Namespace) -> int:
    host = host_for(args)
    if args.name:
        return _describe(host.quantizers, args.name, args.json)
    if not args.report:
        for spec in host.quantizers:
            print(f"{spec.name:20} {spec.summary}")
        return 0
    from peftlab.analyses.quantizers import quantizer_table, report_markdown, to_markdown
    from peftlab.atomic import write_text_atomic

    real = None
    if args.model:
        from peftlab.analyses.quantizers import model_weights

        real = model_weights(args.model)
    df = quantizer_table(host, rows=args.rows, cols=args.cols, repeats=args.repeats, real=real)
    if args.json:
        print(df.to_json(orient="records", indent=2))
    else:
        print(to_markdown(df))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "quantizers.csv", df.to_csv(index=False))
        cmd = " ".join(["peftlab", *args.argv])
        write_text_atomic(out / "report.md", report_markdown(df, rows=args.rows, cols=args.cols, repeats=args.repeats, model=args.model, command=cmd))
        print(f"wrote {out / 'report.md'} and {out / 'quantizers.csv'}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftlab", description=__doc__)
    p.add_argument("--strict-plugins", action="store_true",
                   help="fail when any plugin fails to load (same as PEFTLAB_STRICT_PLUGINS=1)")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("plugins", help="list loaded plugins and what they provide")
    sp.add_argument("--json", action="store_true", help="print the table as JSON")
    sp.set_defaults(func=_cmd_plugins)
    sc = sub.add_parser("check", help="check one installed plugin's components against the contract")
    sc.add_argument("plugin", help="the plugin's entry-point name (as `peftlab plugins` lists it)")
    sc.add_argument("--full", action="store_true", help="also run the contract tests (pytest) on its components: "
                    "train, save, reload and merge through each on tiny models")
    sc.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST_ARG",
                    help="with --full: what follows -- goes to pytest")
    sc.set_defaults(func=_cmd_check)
    sq = sub.add_parser("quantizers", help="list quantizers, or compare them with --report")
    sq.add_argument("name", nargs="?", help="list this quantizer's options: type, default, bounds, meaning")
    sq.add_argument("--report", action="store_true", help="measure bits, storage, error and throughput")
    sq.add_argument("--json", action="store_true", help="print the options, or the --report table, as JSON")
    sq.add_argument("--rows", type=_positive, default=1024, help="--report: rows of the random test weight")
    sq.add_argument("--cols", type=_positive, default=1024, help="--report: columns of the random test weight")
    sq.add_argument("--repeats", type=_positive, default=3, help="--report: timed repeats per measurement (the best is kept)")
    sq.add_argument("--out", help="also write report.md and quantizers.csv into this folder")
    sq.add_argument("--model", help="also measure the error on this model's linear weights (e.g. smollm2-135m)")
    sq.set_defaults(func=_cmd_quantizers)
    for kind in ("adapters", "metrics"):
        sk = sub.add_parser(kind, help=f"list the registered {kind}, or one {kind[:-1]}'s options")
        sk.add_argument("name", nargs="?", help=f"list this {kind[:-1]}'s options: type, default, bounds, meaning")
        sk.add_argument("--json", action="store_true", help="print the options as JSON")
        sk.set_defaults(func=_cmd_list, kind=kind)
    from peftlab.cli.run import add_parser
    from peftlab.cli.score import add_parsers as add_score_parsers
    from peftlab.cli.sweep import add_parsers
    from peftlab.cli.tools import add_parsers as add_tool_parsers

    add_parser(sub)
    add_parsers(sub)
    add_score_parsers(sub)
    add_tool_parsers(sub)
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: a positive integer")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # a sweep's KEY=VALUE overrides may come anywhere, after --out too
        if getattr(args, "command", None) == "sweep" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv
    try:
        return args.func(args)
    except PeftlabError as exc:
        print(f"peftlab: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full or read-only disk, a vanished folder: say which file, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"peftlab: error: {exc.strerror or exc}{where}; nothing half-written was kept", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
