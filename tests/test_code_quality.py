"""The shape of the code: imports point down with no cycles, one package per method, documented public API.

Every check parses the source (ast); nothing is imported, so a broken module cannot hide from them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gigaseg"

#: the packages of gigaseg that make up a method, below gigaseg.methods
METHOD_PACKAGES = ("baselines", "fcos", "glnet", "icnet", "magnet", "patchgd")

#: modules above the methods: they may import them (the user's entry points)
ENTRY_POINTS = ("gigaseg.api", "gigaseg.cli", "gigaseg.commands", "gigaseg.bench", "gigaseg.methods")


def module_name(path: Path) -> str:
    parts = ("gigaseg",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


MODULES = {module_name(path): path for path in SRC.rglob("*.py")}


def imports_of(module: str) -> set[str]:
    """The gigaseg modules ``module`` imports, at the top or inside functions (relative imports resolved)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            # a module importing its own package (``from . import x``) is not an edge
            if name and name != module and name != "gigaseg" and not module.startswith(name + "."):
                found.add(name)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def method_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "methods" and parts[2] in METHOD_PACKAGES else None


def test_shared_machinery_imports_no_method():
    shared = [m for m in GRAPH if not m.startswith(ENTRY_POINTS)]
    wrong = {m: sorted(t for t in GRAPH[m] if t.startswith("gigaseg.methods")) for m in shared}
    assert {m: t for m, t in wrong.items() if t} == {}


def test_a_method_imports_no_other_method():
    wrong = {}
    for module, targets in GRAPH.items():
        own = method_of(module)
        if own is not None:
            others = sorted(t for t in targets if method_of(t) not in (None, own))
            if others:
                wrong[module] = others
    assert wrong == {}


#: the layers of the README's layout, top to bottom: a module imports only its own layer or lower ones
LAYERS = (
    ("gigaseg.__main__", "gigaseg.cli", "gigaseg.commands"),
    ("gigaseg.bench",),
    ("gigaseg.api",),
    ("gigaseg.methods",),
    ("gigaseg.methods.registry",),
    ("gigaseg.training",),
    ("gigaseg.inference",),
    ("gigaseg.nn",),
    ("gigaseg.data.synth",),
    ("gigaseg.data",),
    ("gigaseg.data.labels",),
    ("gigaseg.metrics", "gigaseg.detection_metrics", "gigaseg.budget", "gigaseg.export"),
    ("gigaseg.viewer",),
    ("gigaseg.io",),
    ("gigaseg.geometry",),
    ("gigaseg.errors", "gigaseg.memory", "gigaseg.progress"),
)


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific prefix of ``module``."""
    best, depth = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = index, prefix.count(".")
    assert best is not None, f"{module} belongs to no layer of the README's layout"
    return best


def test_imports_point_down_the_readme_layers():
    upward = {}
    for module, targets in GRAPH.items():
        if module == "gigaseg":
            continue
        up = sorted(t for t in targets if layer_of(t) < layer_of(module))
        if up:
            upward[module] = up
    assert upward == {}


def test_the_registry_imports_no_method():
    assert not {t for t in GRAPH["gigaseg.methods.registry"] if method_of(t)}


@pytest.mark.parametrize("method", METHOD_PACKAGES)
def test_each_method_is_one_package_with_model_recipe_predictor(method):
    for part in ("__init__", "model", "recipe", "predictor"):
        assert f"gigaseg.methods.{method}.{part}".removesuffix(".__init__") in MODULES
    # the network imports no training or inference code, and nothing of its own package's recipe/predictor
    model_imports = GRAPH[f"gigaseg.methods.{method}.model"]
    assert not {t for t in model_imports if t.startswith(("gigaseg.training", "gigaseg.inference"))}
    assert not {t for t in model_imports if t.endswith((".recipe", ".predictor"))}
    # the package registers itself
    init = MODULES[f"gigaseg.methods.{method}"].read_text()
    assert re.search(r"\bregister\(", init)


# --------------------------------------------------------------------------- docstrings


#: methods that implement a contract documented on its base class (their Args/Returns are there)
CONTRACT_METHODS = {"prepare", "band_context", "predict_block", "check_options", "extra_repr", "set_epoch"}


def _returns_value(function: ast.FunctionDef) -> bool:
    if function.returns is not None:
        return not (isinstance(function.returns, ast.Constant) and function.returns.value is None)
    return any(isinstance(node, ast.Return) and node.value is not None for node in _own_nodes(function))


def _own_nodes(function: ast.FunctionDef):
    """The nodes of ``function``'s body, not those of functions, lambdas or classes defined inside it."""
    stack = list(function.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _is_generator(function: ast.FunctionDef) -> bool:
    return any(isinstance(node, (ast.Yield, ast.YieldFrom)) for node in _own_nodes(function))


def _parameters(function: ast.FunctionDef) -> list[str]:
    args = function.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return [n for n in names if n not in ("self", "cls")]


def _decorated_as_property(function: ast.FunctionDef) -> bool:
    names = {getattr(d, "id", getattr(d, "attr", "")) for d in function.decorator_list}
    return bool(names & {"property", "cached_property", "setter", "overload"})


def docstring_problems(path: Path) -> list[str]:
    """Public functions, classes and methods of ``path`` whose docstrings lack what the style asks."""
    problems = []
    tree = ast.parse(path.read_text())

    def check_function(function: ast.FunctionDef, where: str, in_class: bool) -> None:
        doc = ast.get_docstring(function)
        if doc is None:
            problems.append(f"{where}: no docstring")
            return
        if _decorated_as_property(function) or (in_class and function.name in CONTRACT_METHODS):
            return
        if _parameters(function) and "Args:" not in doc:
            problems.append(f"{where}: no Args:")
        if _is_generator(function):
            if "Yields:" not in doc:
                problems.append(f"{where}: no Yields:")
        elif _returns_value(function) and "Returns:" not in doc:
            problems.append(f"{where}: no Returns:")

    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            check_function(node, f"{path.name}:{node.lineno} {node.name}", in_class=False)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            where = f"{path.name}:{node.lineno} class {node.name}"
            if doc is None:
                problems.append(f"{where}: no docstring")
            init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            if init is not None and _parameters(init) and "Args:" not in (doc or "") + (ast.get_docstring(init) or ""):
                problems.append(f"{where}: no Args: for its constructor")
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                    check_function(item, f"{path.name}:{item.lineno} {node.name}.{item.name}", in_class=True)
    return problems


@pytest.mark.parametrize("module", sorted(MODULES))
def test_public_functions_and_classes_document_args_and_returns(module):
    assert docstring_problems(MODULES[module]) == []


#: what a quoted measurement looks like: a result file, or a score, a speed or a peak with its number
MEASURED = re.compile(
    r"benchmarks/results"
    r"|\b(m?IoU|F1|accuracy)\s*(of\s*|=\s*|:\s*)?0?\.\d{2,}"
    r"|\b0?\.\d{2,}\s*(m?IoU|F1|accuracy)\b"
    r"|\b\d+(\.\d+)?\s*(Mpx/s|fps|it/s)\b"
    r"|\bpeak(ed|s)?\s*(RSS\s*)?(at\s*|of\s*)?\d+(\.\d+)?\s*[GM]i?B\b"
    r"|\bmeasured\b[^.]*\d",
    re.IGNORECASE,
)


def docstrings(path: Path):
    tree = ast.parse(path.read_text())
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield getattr(node, "lineno", 1), doc


def test_the_measurement_pattern_catches_quoted_results():
    for text in (
        "scores 0.171 mIoU against",
        "mIoU 0.31",
        "at 0.73 Mpx/s",
        "peaked 2.09 GB with",
        "see benchmarks/results/glnet_memory.md",
        "Measured on scenes 4x the side: 0.42",
    ):
        assert MEASURED.search(text), text
    for text in ("a 2 GB budget", "calibrated on measured peaks", "focal loss with gamma 3"):
        assert not MEASURED.search(text), text


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_docstring_quotes_a_measured_result(module):
    found = [f"{line}: {m.group(0)!r}" for line, doc in docstrings(MODULES[module]) for m in MEASURED.finditer(doc)]
    assert found == []
