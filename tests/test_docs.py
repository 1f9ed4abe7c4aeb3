"""The documentation's code runs: every ```python block of the README and of docs/ is executed.

Each page's blocks run in order in one namespace (a page may build on its earlier blocks), in a fresh
temporary directory, so the examples cannot drift from the code. A block that cannot run here (a model
from the Hub, a GPU, several hosts) is preceded by `<!-- docs-test: skip REASON -->` and reported as a
skipped test with that reason (docs/about-docs.md documents the marker). The README's method table is
checked to be exactly what `jaxmerge methods --markdown` prints.
"""

from __future__ import annotations

import contextlib
import io
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)]
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\b(?P<reason>.*?)-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the marker's reason, or None

    @property
    def name(self) -> str:
        return f"{_shown(self.page)}:{self.line}"


def _shown(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


def python_blocks(page: Path) -> list[Block]:
    """The page's ```python blocks, in order, each with the skip marker's reason when one precedes it."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    previous = ""  # the last non-blank line outside a code block
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            if lines[i].strip():
                previous = lines[i]
            i += 1
            continue
        fence, start = opening.group("fence"), i
        body = []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if opening.group("info").lower() in ("python", "py"):
            marker = SKIP.match(previous)
            reason = marker.group("reason").strip() if marker else None
            if marker and not reason:
                raise AssertionError(f"{_shown(page)}:{start + 1}: a docs-test skip marker needs a reason")
            blocks.append(Block(page, start + 1, textwrap.dedent("\n".join(body)), reason))
        previous = ""
    return blocks


BLOCKS = {page: python_blocks(page) for page in PAGES}
RUNNABLE = [page for page, blocks in BLOCKS.items() if any(b.skip is None for b in blocks)]
SKIPPED = [b for blocks in BLOCKS.values() for b in blocks if b.skip is not None]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_page_code_runs(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in BLOCKS[page]:
        if block.skip is not None:
            continue
        # Compiled with the page's name and line, so a failure's traceback points into the page.
        code = compile("\n" * (block.line) + block.code, str(block.page), "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(code, namespace)
            except Exception as err:
                raise AssertionError(f"the code block at {block.name} failed: {type(err).__name__}: {err}") from err


@pytest.mark.parametrize("block", SKIPPED, ids=[b.name for b in SKIPPED])
def test_marked_blocks_are_skipped_with_their_reason(block: Block):
    pytest.skip(f"{block.name}: {block.skip}")


def test_the_guides_have_code_that_runs():
    """Each user's guide shows runnable code (a guide turned all prose or all skipped would fail here)."""
    guides = ["README.md", "docs/guides/peft.md", "docs/guides/jax.md", "docs/guides/mergekit/index.md",
              "docs/guides/from-disk.md", "docs/guides/learned.md", "docs/guides/sharding.md",
              "docs/guides/reliability.md"]
    for guide in guides:
        assert ROOT / guide in RUNNABLE, f"{guide} has no runnable ```python block"


def test_the_parser_finds_blocks_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        Text.

        ```python
        x = 1
        ```

        <!-- docs-test: skip needs a model from the Hub -->
        ```python
        load("org/model")
        ```

        ```text
        <!-- docs-test: skip not a marker: inside a text block -->
        ```
        - a list item:

          ```python
          y = x + 1
          ```
        """))
    blocks = python_blocks(page)
    assert [(b.code.strip(), b.skip) for b in blocks] == [
        ("x = 1", None), ('load("org/model")', "needs a model from the Hub"), ("y = x + 1", None)]
    page.write_text("<!-- docs-test: skip -->\n```python\npass\n```\n")
    with pytest.raises(AssertionError, match="needs a reason"):
        python_blocks(page)


def test_readme_method_table_is_the_generated_one():
    """The README's table between the methods markers is what `jaxmerge methods --markdown` prints now."""
    import argparse

    from jaxmerge.cli import _methods

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _methods(argparse.Namespace(name=None, markdown=True))
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- methods:begin[^>]*-->\n(.*?)<!-- methods:end -->", readme, flags=re.S)
    assert table, "README.md lacks the <!-- methods:begin --> ... <!-- methods:end --> markers"
    assert table.group(1) == out.getvalue(), "README's method table is stale: paste `jaxmerge methods --markdown`"
