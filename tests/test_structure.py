"""The shape of the house: no two modules import each other in a loop (function-level imports
included), no module of the package grows past what one reader holds in mind, and no test
module imports another (shared helpers live in helpers.py and reference.py)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the distribution's packages: mlxflux/, and convert/ and presets/ installed inside it
PACKAGES = {"mlxflux": ROOT / "mlxflux", "mlxflux.convert": ROOT / "convert",
            "mlxflux.presets": ROOT / "presets"}  # fmt: skip
MAX_LINES = 450


def modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__)."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = (path, path.name == "__init__.py")
    return out


def imports(name: str, path: Path, is_package: bool, known) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (a `from X import Y`
    whose Y is a module counts as importing Y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.add(target)
    return found


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
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
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_loop_finder_finds_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert loops(graph) == [["a", "b", "c"]]
    assert loops({"a": {"b"}, "b": set()}) == []


def test_no_modules_import_each_other_in_a_loop():
    known = modules()
    graph = {name: imports(name, path, pkg, known) for name, (path, pkg) in known.items()}
    assert graph["mlxflux.models.transformer"] >= {"mlxflux.blocks", "mlxflux.kernels"}
    assert loops(graph) == []


def test_no_module_of_the_package_is_over_450_lines():
    long = {str(path.relative_to(ROOT)): n for path, _ in modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert long == {}


def test_no_test_module_imports_another():
    tests = Path(__file__).parent
    for path in tests.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                names = [node.module or ""] + [a.name for a in node.names]
                assert not any(n.startswith("test_") for n in names), (path.name, names)


def test_the_wheel_lists_every_package():
    """setuptools installs only the packages pyproject.toml names: a folder with an __init__.py
    left out is missing from a plain `pip install .` (the editable install hides it)."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = {name for name, (_, is_package) in modules().items() if is_package}
    assert found == listed
    assert {k: ROOT / v for k, v in tool["package-dir"].items()} == {
        k: v for k, v in PACKAGES.items() if k != "mlxflux"
    }
