"""The layering, checked on the source: no import cycle among engine modules, the plugin API
(``peftlab/plugin/``) imports nothing else from peftlab, no import runs against the stage order
(:data:`STAGES`), the engine never imports the built-in plugins, and built-in plugins import only
from ``peftlab`` itself. Imports inside functions count;
imports under ``if TYPE_CHECKING:`` do not (they never run)."""

import ast
import inspect
from pathlib import Path

import pytest

from peftlab.plugin import hookspecs

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "peftlab"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports when it runs (absolute names; relative imports are resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return out


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {m: {i for i in runtime_imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_the_graph_is_not_empty():
    assert len(MODULES) > 30 and "peftlab.plugin.spec" in GRAPH["peftlab.registry"]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_engine_modules():
    # the top-level package re-exports the author API and is imported by no engine module
    engine = {m: deps - {"peftlab"} for m, deps in GRAPH.items() if m != "peftlab"}
    assert cycles(engine) == []


#: the engine's stages, in the order data flows; a module may import its own stage and earlier ones
STAGES = [
    ("peftlab.plugin", "peftlab.toolkit"),
    ("peftlab.registry", "peftlab.cachedir", "peftlab.probe", "peftlab.host", "peftlab.defaults", "peftlab.atomic", "peftlab.readback",
     "peftlab.intervals",
     "peftlab.hub", "peftlab.gitinfo",
     "peftlab.provenance", "peftlab.architectures", "peftlab.record"),
    ("peftlab.quantize", "peftlab.adapt", "peftlab.data", "peftlab.kernels", "peftlab.cache"),
    ("peftlab.evaluate",),
    ("peftlab.cell",),
    ("peftlab.sweep",),
    ("peftlab.report",),
    ("peftlab.analyses",),
    ("peftlab.gpu",),
    ("peftlab.cli",),
    ("peftlab.contract",),  # the contract tests, shipped: they may use anything above
]


def stage_of(module: str) -> int | None:
    for i, prefixes in enumerate(STAGES):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_every_engine_module_has_a_stage():
    assert sorted(m for m in MODULES if m != "peftlab" and stage_of(m) is None) == []


def backward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() if m != "peftlab"
                  for d in deps if d != "peftlab" and (stage_of(d) or 0) > (stage_of(m) or 0))


def test_the_stage_checker_sees_an_arrow_running_back():
    assert backward_imports({"peftlab.evaluate.generate": {"peftlab.cell.run"}}) == [
        "peftlab.evaluate.generate -> peftlab.cell.run"]
    assert backward_imports({"peftlab.cell.run": {"peftlab.evaluate.generate"}}) == []


def test_no_import_runs_against_the_stage_order():
    assert backward_imports(GRAPH) == []


def imports_top_level(path: Path) -> bool:
    """``import peftlab`` or ``from peftlab import ...`` anywhere in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "peftlab":
            return True
        if isinstance(node, ast.Import) and any(a.name == "peftlab" for a in node.names):
            return True
    return False


def test_no_engine_module_imports_the_top_level_package():
    """``import peftlab`` is for users and plugins; inside, modules import each other directly."""
    assert sorted(m for m, p in MODULES.items() if m != "peftlab" and imports_top_level(p)) == []


def test_the_plugin_api_is_a_leaf():
    for m, p in MODULES.items():
        if m == "peftlab.plugin" or m.startswith("peftlab.plugin."):
            outside = sorted(i for i in runtime_imports(p)
                             if i.startswith("peftlab") and not (i == "peftlab.plugin" or i.startswith("peftlab.plugin.")))
            assert outside == [], f"{m} imports {outside}"


def test_the_engine_never_imports_the_built_in_plugins():
    for m, p in MODULES.items():
        assert not any(i.startswith("peftlab_plugins") for i in runtime_imports(p)), m


@pytest.mark.parametrize("path", sorted((ROOT / "plugins").glob("*.py")), ids=lambda p: p.name)
def test_built_in_plugins_import_only_the_public_api(path):
    used = {i for i in runtime_imports(path) if i.startswith("peftlab")}
    # `from peftlab import X` records "peftlab" and "peftlab.X": only the core's and the toolkit's names
    import peftlab
    import peftlab.toolkit

    public = {f"peftlab.{n}" for n in peftlab.__all__} | {f"peftlab.toolkit.{n}" for n in peftlab.toolkit.__all__}
    assert sorted(used - {"peftlab", "peftlab.toolkit"} - public) == []


def test_the_toolkit_imports_only_the_plugin_api():
    outside = {i for i in runtime_imports(PACKAGE / "toolkit.py") if i.startswith("peftlab")}
    assert sorted(i for i in outside if not i.startswith("peftlab.plugin")) == []


def test_the_core_is_small():
    import peftlab

    assert len(peftlab.__all__) <= 16, peftlab.__all__


SPECS = [n for n in dir(hookspecs) if n.startswith("peftlab_")]


@pytest.mark.parametrize("name", SPECS)
def test_every_hook_is_typed_and_documents_its_parameters(name):
    fn = getattr(hookspecs, name)
    sig = inspect.signature(fn)
    doc = inspect.getdoc(fn) or ""
    assert sig.return_annotation is not inspect.Signature.empty and "Any" not in str(sig.return_annotation)
    assert ":returns:" in doc or sig.return_annotation in ("None", None)
    for param in sig.parameters:
        assert f":param {param}:" in doc, f"{name} does not document {param}"


def test_the_old_kernels_name_says_where_the_quantization_kernels_went():
    import peftlab.kernels

    with pytest.raises(AttributeError, match=r"peftlab\.toolkit\.blockwise\.pack_bits"):
        peftlab.kernels.pack_bits  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        peftlab.kernels.nothing_here  # noqa: B018


def test_every_public_name_and_method_has_a_docstring():
    import peftlab
    import peftlab.toolkit

    missing = []
    for mod in (peftlab, peftlab.toolkit):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not isinstance(obj, frozenset) and not (inspect.getdoc(obj) or "").strip():
                missing.append(f"{mod.__name__}.{name}")
            if inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                    if not attr.startswith("_") and callable(fn) and not (fn.__doc__ or "").strip():
                        missing.append(f"{mod.__name__}.{name}.{attr}")
    assert missing == []


def test_the_readme_architecture_names_every_part_of_the_tree():
    """The README's architecture block names each subpackage and top-level module of peftlab/ (and
    nothing that is gone), so the front door's map matches the tree."""
    import re

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Architecture", 1)[1].split("```")[1]
    parts = {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    named = set(re.findall(r"[a-z_]+/|[a-z_]+\.py", block))
    assert sorted(parts - named) == []
    anywhere = {p.name for p in PACKAGE.rglob("*.py")} | {p.name + "/" for p in PACKAGE.rglob("*") if p.is_dir()}
    assert sorted(n for n in named if n.endswith(".py") and n not in anywhere) == []
