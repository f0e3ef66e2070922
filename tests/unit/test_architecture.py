"""Unit tests of the package's shape: layers, no import cycle, one vocabulary, one AMQP boundary.

They read the source (with `ast`), so an import inside a function counts as much as one at the
top of a module: a layer crossed or a cycle hidden that way still makes every change cost twice.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

import service
from service import testing
from service._amqp import transport

__all__: list[str] = []

PACKAGE = Path(service.__file__).parent
VOCABULARY = "service._protocol.vocabulary"

# The layers, lowest first (docs/architecture.md). A module imports from its own unit or from a
# unit of a lower layer, never from a higher one nor from another unit of its own layer.
LAYERS: list[tuple[str, ...]] = [
    ("service._protocol",),  # words, errors, settings, codec, envelope, builders: no I/O
    ("service._observe", "service._stores"),  # logs and metrics; job and key stores
    ("service._amqp",),  # the link seam, the AMQP transport, the shim
    ("service._serving", "service._calling"),  # dispatch … settle; client internals
    ("service._outbox",),  # the transactional outbox and inbox (PostgreSQL)
    ("service._runtime", "service.blocking"),  # App and its HTTP port; the sync client
    ("service.gateway", "service.testing"),  # the HTTP face; the in-memory broker
    ("service.cli",),  # the `burrow` command
    ("service",),  # the public surface (service/__init__.py)
    ("service.example",),  # the example service, written as a user writes one
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
# Only the AMQP unit may import the AMQP libraries.
AMQP_LIBRARIES = ("aio_pika", "aiormq", "pamqp")
AMQP_UNIT = "service._amqp"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
_TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def unit_of(module: str) -> str:
    """The layer unit a module of `service` belongs to: the longest unit that prefixes it."""
    best = ""
    for unit in RANK:
        if (module == unit or module.startswith(unit + ".")) and len(unit) > len(best):
            best = unit
    assert best, f"{module} belongs to no layer: add its package to LAYERS"
    return best


def _imports(tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    """(module, names) of every absolute import in `tree`, anywhere in its body."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module, [alias.name for alias in node.names]


def _imported(name: str, tree: ast.Module) -> set[str]:
    """The modules of `service` that module `name` imports, anywhere in its body."""
    found: set[str] = set()
    for module, names in _imports(tree):
        if module != "service" and not module.startswith("service."):
            continue
        # `from pkg import x`: the module pkg.x if there is one, else a name of pkg itself
        # (which runs pkg/__init__ and all it imports).
        for alias in names or [""]:
            submodule = f"{module}.{alias}"
            found.add(submodule if alias and submodule in MODULES else module)
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
    """`from service._protocol import <module>` and imports inside functions are graph edges."""
    tree = ast.parse(
        "from service._protocol import codec\n"
        "from service import Client\n"
        "def f():\n"
        "    from service._protocol.topology import Names\n"
        "    import service._protocol.types\n"
    )
    assert _imported("service.x", tree) == {
        "service",
        "service._protocol.codec",
        "service._protocol.topology",
        "service._protocol.types",
    }


def test_every_module_belongs_to_a_layer() -> None:
    """Every module of the package is in one unit of LAYERS (a new package must be placed)."""
    assert {unit_of(name) for name in MODULES} == set(RANK)


def _crossings(graph: dict[str, set[str]]) -> list[str]:
    """Each import that goes up a layer or sideways into another unit of the same layer."""
    found = []
    for name, targets in sorted(graph.items()):
        here = unit_of(name)
        for target in sorted(targets):
            there = unit_of(target)
            if there != here and RANK[there] >= RANK[here]:
                found.append(f"{name} → {target}")
    return found


def test_the_layer_check_sees_an_upward_and_a_sideways_import() -> None:
    """The layer check reports a planted upward and sideways import (so silence means something)."""
    planted = {
        "service._protocol.codec": {"service._amqp.link"},
        "service._serving.dispatcher": {"service._calling.client", "service._protocol.codec"},
    }
    assert _crossings(planted) == [
        "service._protocol.codec → service._amqp.link",
        "service._serving.dispatcher → service._calling.client",
    ]


def test_no_import_goes_up_a_layer_or_across_one() -> None:
    """No module imports from a higher layer, nor from another unit of its own layer."""
    crossings = _crossings(GRAPH)
    assert crossings == [], "imports against the layers:\n" + "\n".join(crossings)


@pytest.mark.parametrize("library", AMQP_LIBRARIES)
def test_only_the_amqp_unit_imports_the_amqp_libraries(library: str) -> None:
    """aio-pika, aiormq and pamqp are imported only under service/_amqp/."""
    importers = sorted(
        name
        for name, tree in _TREES.items()
        if unit_of(name) != AMQP_UNIT
        for module, _ in _imports(tree)
        if module == library or module.startswith(library + ".")
    )
    assert importers == [], f"{library} imported outside {AMQP_UNIT}: {importers}"
    assert any(
        module.split(".")[0] == library
        for name, tree in _TREES.items()
        if unit_of(name) == AMQP_UNIT
        for module, _ in _imports(tree)
    ), f"the scan found no import of {library} at all"


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
    """Every `x-…` literal and `traceparent` is spelled once, in service/_protocol/vocabulary.py."""
    elsewhere = [
        f"{MODULES[name].name}:{line}: {text!r}"
        for name, tree in _TREES.items()
        if name != VOCABULARY
        for line, text in _protocol_literals(tree)
    ]
    assert elsewhere == [], "spell these through the vocabulary:\n" + "\n".join(elsewhere)
    spelled = [text for _, text in _protocol_literals(_TREES[VOCABULARY])]
    assert spelled, "the scan found no literal in the vocabulary itself"
    assert len(spelled) == len(set(spelled)), "a word is defined twice in the vocabulary"


def _amqp_links() -> list[type]:
    """The concrete aiormq link classes of service._amqp.transport (the ones that supervise a
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
    assert links, "no class of service._amqp.transport has `_supervise`"
    assert not [cls.__name__ for cls in links if issubclass(testing.MemoryLink, cls)]
