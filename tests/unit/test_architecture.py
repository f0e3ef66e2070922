"""Unit tests of the package's shape: no import cycle, one vocabulary, seams that do not inherit.

They read the source (with `ast`), so an import inside a function counts as much as one at the
top of a module: a cycle hidden that way still makes every change cost twice.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

import service
from service import testing, transport

__all__: list[str] = []

PACKAGE = Path(service.__file__).parent
VOCABULARY = "service.vocabulary"


def _module_name(path: Path) -> str:
    return "service" if path.stem == "__init__" else f"service.{path.stem}"


MODULES = {_module_name(path): path for path in sorted(PACKAGE.glob("*.py"))}
_TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _imported(name: str, tree: ast.Module) -> set[str]:
    """The modules of `service` that module `name` imports, anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package (it is flat)
                base = ".".join(["service", *filter(None, [node.module])])
            else:
                base = node.module or ""
            if base == "service":
                # `from service import x`: the module service.x if there is one, else a name
                # of the package itself (which runs service/__init__ and all it imports).
                for alias in node.names:
                    submodule = f"service.{alias.name}"
                    found.add(submodule if submodule in MODULES else "service")
            elif base in MODULES:
                found.add(base)
    found.discard(name)
    return found


GRAPH = {name: _imported(name, tree) for name, tree in _TREES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that ends where it starts, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            found = visit(target)
            if found is not None:
                return found
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start)
        if found is not None:
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The cycle check reports a planted cycle (so an empty report means something)."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_scan_sees_function_level_and_package_imports() -> None:
    """`from service import <module>` and imports inside functions are edges of the graph."""
    tree = ast.parse(
        "from service import codec, Client\n"
        "def f():\n"
        "    from service.topology import Names\n"
        "    import service.types\n"
    )
    assert _imported("service.x", tree) == {
        "service",
        "service.codec",
        "service.topology",
        "service.types",
    }


def test_no_import_cycle_in_the_package() -> None:
    """No module of service/ imports itself back, counting imports inside functions."""
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that are documentation, not values."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }


def _protocol_literals(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, text) of every string value that spells a protocol word (`x-…`, `traceparent`),
    including the literal parts of f-strings."""
    documentation = _docstrings(tree)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in documentation
            and (node.value.startswith("x-") or node.value == "traceparent")
        ):
            yield node.lineno, node.value


def test_every_protocol_word_is_spelled_only_in_the_vocabulary() -> None:
    """Every `x-…` literal and `traceparent` is spelled once, in service/vocabulary.py."""
    elsewhere = [
        f"{MODULES[name].name}:{line}: {text!r}"
        for name, tree in _TREES.items()
        if name != VOCABULARY
        for line, text in _protocol_literals(tree)
    ]
    assert elsewhere == [], "spell these through service.vocabulary:\n" + "\n".join(elsewhere)
    spelled = [text for _, text in _protocol_literals(_TREES[VOCABULARY])]
    assert spelled, "the scan found no literal in the vocabulary itself"
    assert len(spelled) == len(set(spelled)), "a word is defined twice in the vocabulary"


def _amqp_links() -> list[type]:
    """The concrete aiormq link classes of service.transport (the ones that supervise a
    connection), whatever they are called."""
    return [
        cls
        for _, cls in inspect.getmembers(transport, inspect.isclass)
        if cls.__module__ == transport.__name__
        and hasattr(cls, "_supervise")
        and not inspect.isabstract(cls)
    ]


def test_the_memory_link_is_not_an_amqp_link() -> None:
    """testing.MemoryLink implements the link seam itself; it inherits no aiormq code."""
    links = _amqp_links()
    assert links, "no class of service.transport has `_supervise`"
    assert not [cls.__name__ for cls in links if issubclass(testing.MemoryLink, cls)]
