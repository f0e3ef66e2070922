"""The documentation's code runs: every python block of docs/guide.md is executed, in order, in
one namespace, against the in-memory broker (no RabbitMQ); README.md's python blocks compile.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from types import CodeType
from typing import Any

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "guide.md"
README = ROOT / "README.md"

NO_RUN = "no-run"  # ```python no-run: needs a real broker or a process; compiled, not run
# ```python xfail: shows intended behaviour that a known bug in service/ breaks (the HTML comment
# above the block names it). It must fail on an assert: once the bug is fixed this test fails
# until the marker is removed, as a strict xfail would.
XFAIL = "xfail"
MAX_NO_RUN = 3  # skipping is the exception: keep such blocks few
WITHOUT_RUNNABLE_CODE = {"Running"}  # `burrow run` and App.run need a broker and a process
_SECTION = re.compile(r"^## (?:\d+\. )?(?P<title>.+)$", re.M)
_FENCE = re.compile(
    r"^```(?P<lang>python\S*)(?P<info>[^\n]*)\n(?P<code>.*?)^```[ \t]*$", re.M | re.S
)


@dataclass(frozen=True)
class Block:
    """One fenced python block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the block's first line of code
    info: str  # what follows ```python on the fence line, stripped
    code: str

    @property
    def expected_to_fail(self) -> bool:
        """Whether a known bug makes one of its asserts fail."""
        return self.info == XFAIL

    @property
    def runs(self) -> bool:
        """Whether the docs test executes it (else it is only compiled)."""
        return self.info != NO_RUN

    def compile(self) -> CodeType:
        """Compile as top-level code where `await` is allowed; tracebacks show the .md line."""
        # Padding with newlines makes line numbers in errors those of the Markdown file.
        source = "\n" * (self.line - 1) + self.code
        code: CodeType = compile(
            source,
            str(self.path.relative_to(ROOT)),
            "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            dont_inherit=True,  # the guide's code must not lean on this module's __future__
        )
        return code


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of `path`, in order."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        assert match["lang"] == "python", f"{path.name}: fence ```{match['lang']} is not python"
        line = text.count("\n", 0, match.start("code")) + 1
        found.append(Block(path, line, match["info"].strip(), match["code"]))
    return found


async def run_block(block: Block, namespace: dict[str, Any]) -> None:
    """Execute one block in `namespace`, awaiting it if it awaits."""
    # With top-level await allowed, eval returns a coroutine for code that awaits.
    outcome = eval(block.compile(), namespace)  # our own documentation, nothing foreign
    if inspect.iscoroutine(outcome):
        await outcome


async def run_blocks(blocks: list[Block]) -> dict[str, Any]:
    """Execute the runnable blocks in one namespace, then await the `test_*` they define."""
    namespace: dict[str, Any] = {"__name__": "docs_guide"}
    for block in blocks:
        if not block.runs:
            continue
        if not block.expected_to_fail:
            await run_block(block, namespace)
            continue
        try:
            await run_block(block, namespace)
        except AssertionError:
            continue
        raise AssertionError(
            f"{block.path.name}:{block.line}: the block marked {XFAIL} passes; remove the marker"
        )
    tests = [
        value
        for name, value in namespace.items()
        if name.startswith("test_") and inspect.iscoroutinefunction(value)
    ]
    for test in tests:
        await test()
    namespace["__tests_run__"] = [test.__name__ for test in tests]
    return namespace


async def test_guide_examples_run_against_the_in_memory_broker() -> None:
    """Every runnable block of the guide executes (its asserts hold), then its test_* pass."""
    namespace = await run_blocks(python_blocks(GUIDE))
    assert namespace["__tests_run__"], "the testing section defines no test_* function"


def test_guide_skips_only_marked_blocks_and_they_compile() -> None:
    """Only ```python no-run blocks are skipped; they are few and still compile."""
    blocks = python_blocks(GUIDE)
    assert {block.info for block in blocks} <= {"", NO_RUN, XFAIL}
    skipped = [block for block in blocks if not block.runs]
    assert len(skipped) <= MAX_NO_RUN, [block.line for block in skipped]
    for block in skipped:
        block.compile()


def test_guide_states_how_its_examples_run() -> None:
    """The guide opens with the convention its examples follow, as an HTML comment."""
    head = GUIDE.read_text(encoding="utf-8").split("\n# ", 1)[0]
    assert "<!--" in head
    assert "tests/contract/test_docs_examples.py" in head
    assert NO_RUN in head


def test_every_guide_section_shows_running_code() -> None:
    """Each section of the guide has a block that runs, except the one about processes."""
    blocks = python_blocks(GUIDE)
    text = GUIDE.read_text(encoding="utf-8")
    starts = [(text.count("\n", 0, m.start()) + 1, m["title"]) for m in _SECTION.finditer(text)]
    assert len(starts) >= 10
    bounds = [*(line for line, _ in starts[1:]), text.count("\n") + 2]
    for (start, title), end in zip(starts, bounds, strict=True):
        runnable = [b for b in blocks if start < b.line < end and b.runs]
        assert runnable or title in WITHOUT_RUNNABLE_CODE, f"section {title!r} runs no code"


def test_readme_python_blocks_compile() -> None:
    """Each python block of the README is valid Python (top-level await allowed)."""
    blocks = python_blocks(README)
    assert blocks
    for block in blocks:
        block.compile()
