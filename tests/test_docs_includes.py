"""The documentation's included files and relative links exist.

The benchmark pages include the reports that the benchmark scripts write
(``examples/benchmarks/results/``, ``examples/benchmarks/research/``) with MyST's
``{include}`` directive, and link figures and other pages by relative paths. A report
moved or renamed by a re-run, or a page moved, would break them silently in the rendered
site (Sphinx warns about a missing include, not about every missing link target), so these
tests read every Markdown page under ``docs/`` and check each path. Pure Python: no jax.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Build outputs and the notebooks copied in by docs/conf.py are not sources of the docs.
SKIP_DIRS = {"_build", "notebooks"}

# ```{include} path   (or ~~~ / ::: fences, any fence length, optional spaces)
INCLUDE = re.compile(r"^\s*(?:`{3,}|~{3,}|:{3,})\s*\{include\}\s+(\S+)\s*$", re.M)
# The directive's options that follow it: ":relative-images:" and the like.
OPTION = re.compile(r"^\s*:([\w-]+):(.*)$")
# Inline links and images: [text](target) and ![alt](target "title").
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# Reference-style definitions: [label]: target
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
# Fenced code blocks whose content is not Markdown (bash, python, ...): links there are text.
CODE_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")


def _pages() -> list[Path]:
    return sorted(
        p for p in DOCS.rglob("*.md")
        if not SKIP_DIRS.intersection(p.relative_to(DOCS).parts[:-1])
    )


def _strip_code(text: str) -> str:
    """The text without code: fenced code blocks and inline code spans.

    A directive's fence (```` ```{note} ````) is not code: its content is Markdown, so it
    is kept, and its closing fence is told apart from the opening fence of a code block.
    """
    out, directives, code = [], [], None
    for line in text.splitlines():
        m = CODE_FENCE.match(line)
        if code is not None:  # inside a code block: blank until its closing fence
            if m and m.group(2)[0] == code[0] and len(m.group(2)) >= len(code) \
                    and not m.group(3).strip():
                code = None
            out.append("")
            continue
        if m and m.group(3).strip().startswith("{"):
            directives.append(m.group(2))  # a directive opens
        elif m and not m.group(3).strip() and directives and m.group(2) == directives[-1]:
            directives.pop()  # the innermost directive closes
        elif m:
            code = m.group(2)  # a code block opens
            out.append("")
            continue
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"`[^`\n]*`", "", text)  # inline code: `[x](y)` is not a link


def _includes(page: Path) -> list[tuple[str, dict[str, str]]]:
    """(path, options) of every include directive of the page."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found = []
    for i, line in enumerate(lines):
        m = INCLUDE.match(line)
        if not m:
            continue
        options = {}
        for opt in lines[i + 1:]:
            o = OPTION.match(opt)
            if not o:
                break
            options[o.group(1)] = o.group(2).strip()
        found.append((m.group(1), options))
    return found


def _is_relative(target: str) -> bool:
    return not (
        re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)  # http:, mailto:, project:, ...
        or target.startswith(("#", "/", "{"))
    )


def _links(text: str) -> list[str]:
    text = _strip_code(text)
    return [t for t in LINK.findall(text) + REF_DEF.findall(text) if _is_relative(t)]


def _target_path(base: Path, target: str) -> Path:
    path = unquote(target.split("#", 1)[0].split("?", 1)[0])
    return (base / path).resolve()


PAGES = _pages()


def test_docs_has_pages():
    assert DOCS / "index.md" in PAGES
    assert any(p.parent.name == "benchmarks" for p in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_included_files_exist(page):
    missing = [
        path for path, _ in _includes(page)
        if not (page.parent / path).resolve().is_file()
    ]
    assert not missing, f"{page.relative_to(ROOT)} includes missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_relative_links_exist(page):
    missing = [
        t for t in _links(page.read_text(encoding="utf-8"))
        if not _target_path(page.parent, t).exists()
    ]
    assert not missing, f"{page.relative_to(ROOT)} links missing targets: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_links_of_included_files_exist(page):
    """A relative link in an included file resolves where Sphinx looks for it.

    With ``:relative-images:`` an image path is relative to the included file; without it,
    and for every other link, it is relative to the including page.
    """
    missing = []
    for path, options in _includes(page):
        included = (page.parent / path).resolve()
        if not included.is_file():
            continue  # reported by test_included_files_exist
        text = _strip_code(included.read_text(encoding="utf-8"))
        for m in LINK.finditer(text):
            target = m.group(1)
            if not _is_relative(target):
                continue
            image = m.group(0).startswith("!")
            base = included.parent if image and "relative-images" in options else page.parent
            if not _target_path(base, target).exists():
                missing.append(f"{included.relative_to(ROOT)}: {target}")
    assert not missing, f"{page.relative_to(ROOT)} includes files with broken links: {missing}"


def test_parsers_find_what_they_should(tmp_path):
    """The patterns above on a small page: what counts as an include and as a link."""
    page = tmp_path / "page.md"
    page.write_text(
        "```{include} ../a/report.md\n:heading-offset: 2\n:relative-images:\n```\n"
        "See [the guide](guide.md#anchor), ![a plot](../fig.png \"title\"),\n"
        "[a site](https://example.org), [a section](#here) and `[not](a-link.md)`.\n"
        "[ref]: other.md\n"
        "```bash\necho [not a link](either.md)\n```\n",
        encoding="utf-8",
    )
    assert _includes(page) == [
        ("../a/report.md", {"heading-offset": "2", "relative-images": ""})
    ]
    assert _links(page.read_text(encoding="utf-8")) == [
        "guide.md#anchor", "../fig.png", "other.md"
    ]


README = ROOT / "README.md"


def test_readme_links_exist_and_it_is_short():
    text = README.read_text(encoding="utf-8")
    missing = [t for t in _links(text) if not _target_path(ROOT, t).exists()]
    assert not missing, f"README.md links missing targets: {missing}"
    assert len(text.splitlines()) <= 200


def test_readme_renders_with_its_tables_and_images():
    """Rendered as GitHub does (CommonMark with tables): every table is a table, every
    image a PNG file in the repository."""
    markdown_it = pytest.importorskip("markdown_it")
    text = README.read_text(encoding="utf-8")
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(text)
    rows = [line for line in _strip_code(text).splitlines() if re.match(r"^\|[-: |]+\|$", line)]
    assert html.count("<table>") == len(rows) >= 2  # each |---| line opened a table
    images = re.findall(r'<img src="([^"]+)"', html)
    assert images, "the README shows its results plot"
    for src in images:
        path = _target_path(ROOT, src)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src


def test_readme_results_table_is_the_study_results_file():
    """The README's results table is the one the curvature-pairs study writes, row for row
    (``final_loss.md``), so its numbers cannot drift from the results file."""
    text = README.read_text(encoding="utf-8")
    results = (ROOT / "examples/benchmarks/research/final_loss/final_loss.md").read_text(
        encoding="utf-8")
    start = text.index("| task | SGD + momentum |")
    table = text[start:text.index("\n\n", start)].splitlines()
    assert len(table) >= 4
    assert "\n".join(table) in results
