"""The package's shape, read from its source with ``ast`` (nothing is imported): no import cycle, no
module over 600 lines, no class over 400.

An import counts wherever it is written (at module level or inside a function, where a cycle only
waits for its first call); imports under ``if TYPE_CHECKING:`` do not run and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

PACKAGE = Path(__file__).resolve().parents[2] / "optimizely_odp_ext"
NAME = PACKAGE.name
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400
LONG_MODULES_ALLOWED: Set[str] = set()  # none left: _import.py shares its sending with bulk.py (_sending.py)


def modules() -> Dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> List[ast.AST]:
    """Every import statement of ``tree``, except those under ``if TYPE_CHECKING:``."""
    out: List[ast.AST] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for branch in node.orelse:
                visit(branch)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def imports_of(name: str, path: Path, known: Dict[str, Path]) -> Set[str]:
    """The package's modules that ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: Set[str] = set()
    for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        assert isinstance(node, ast.ImportFrom)
        base: Optional[str] = node.module
        if node.level:
            anchor = package.split(".")
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        if base is None:
            continue
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in known else base)
    return {t for t in targets if t in known and t != name}


def graph() -> Dict[str, Set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycle(edges: Dict[str, Set[str]]) -> List[str]:
    """One import cycle (its modules, the first repeated at the end), or [] when there is none."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_the_package() -> None:
    edges = graph()
    assert f"{NAME}._lifecycle" in edges[f"{NAME}._celery"]  # relative imports are resolved
    assert f"{NAME}.testing._server" in edges[f"{NAME}.testing"]
    assert f"{NAME}.extension" in edges[f"{NAME}.testing._helpers"]  # a function-level import counts


def test_no_import_cycle_in_the_package() -> None:
    assert find_cycle(graph()) == []


def test_the_lifecycle_imports_no_host_glue() -> None:
    glue = {f"{NAME}._celery", f"{NAME}._gunicorn", f"{NAME}._uwsgi"}
    assert graph()[f"{NAME}._lifecycle"] & glue == set()


def test_no_module_over_600_lines_and_no_class_over_400() -> None:
    long_modules, long_classes = [], []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES and name not in LONG_MODULES_ALLOWED:
            long_modules.append(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - start + 1 > MAX_CLASS_LINES:
                    long_classes.append(f"{name}.{node.name}")
    assert long_modules == []
    assert long_classes == []


# Issue 17: components that own their state, not one bag every piece writes to. The options records
# are exempt: their fields are the user's options, one each, read-only.
MAX_CLASS_ATTRIBUTES = 20
MANY_ATTRIBUTES_ALLOWED = {"Options", "InstallOptions"}


def _own_attributes(node: ast.ClassDef) -> Set[str]:
    """What one class body declares: its ``__slots__``, its annotated fields (a dataclass's, a record's)
    and every ``self.X`` it stores to."""
    names = {item.target.id for item in node.body
             if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
             and "ClassVar" not in ast.dump(item.annotation)}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in sub.targets):
            slots = ast.literal_eval(sub.value)
            names.update({slots} if isinstance(slots, str) else set(slots))
        targets = sub.targets if isinstance(sub, ast.Assign) else (
            [sub.target] if isinstance(sub, (ast.AnnAssign, ast.AugAssign)) else [])
        for target in targets:
            for item in ast.walk(target):
                if (isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store)
                        and isinstance(item.value, ast.Name) and item.value.id == "self"):
                    names.add(item.attr)
    return names - {"__dict__", "__weakref__"}


def class_attributes() -> Dict[str, Set[str]]:
    """Class name -> every attribute its instances get: its own, and its package bases' (mixins)."""
    classes: Dict[str, ast.ClassDef] = {}
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                assert node.name not in classes, f"two classes named {node.name}: name them apart"
                classes[node.name] = node

    def attributes(name: str) -> Set[str]:
        node = classes[name]
        found = _own_attributes(node)
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                found |= attributes(base.id)
        return found

    return {name: attributes(name) for name in classes}


def test_the_attribute_count_sees_slots_stores_and_mixins() -> None:
    found = class_attributes()
    assert {"_cond", "low_water", "waiters"} <= found["FlushBarrier"]  # __slots__
    assert "_api_key" in found["FakeOdpServer"]  # self.X = ...
    assert found["EventManager"] >= found["CallerQueue"] | found["Scheduler"]  # bases in the package


def test_no_class_holds_more_than_20_attributes() -> None:
    over = {name: len(names) for name, names in class_attributes().items()
            if len(names) > MAX_CLASS_ATTRIBUTES and name not in MANY_ATTRIBUTES_ALLOWED}
    assert over == {}
