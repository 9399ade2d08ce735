"""The documentation, checked from the files alone: no server, and ComfyUI is never imported.

* Every node the pack registers (the classes in ``nodes/__init__.py``'s ``NODE_LIST``, their IDs read from
  each class's ``io.Schema(node_id=...)`` in ``nodes/*.py``) has a help page ``web/docs/<NodeID>.md``, which
  the ComfyUI frontend shows in its node help panel, and a heading in ``docs/nodes.md``; every input of its
  schema is named in both.
* Every relative link (markdown links and images, HTML ``src`` / ``href``) in the README, ``docs/*.md`` and
  ``ARCHITECTURE.md`` points at a file in the repository, and every ``#anchor`` at a heading of its page.
* The README stays short, with the Quick start and the two set-up commands on its first screen, and its
  sections in order.
* The generated sections live in the docs pages, not in the README.
"""
from __future__ import annotations

import ast
import re
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NODES_PAGE = REPO / "docs" / "nodes.md"
HELP_DIR = REPO / "web" / "docs"
PAGES = sorted((REPO / "docs").glob("*.md")) + [REPO / "ARCHITECTURE.md", README]
README_MAX_LINES = 250
FIRST_SCREEN_LINES = 40
README_SECTIONS = ["Quick start", "Nodes", "Workflows", "Live mode", "Performance", "Reference", "Licence"]
GENERATED = {"docs/performance.md": "performance", "docs/live.md": "live-figures", "docs/scale.md": "scale-figures"}


# --- the nodes, read from their source ---------------------------------------------------------

def _name(func: ast.expr) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _input_names(expr: ast.expr, functions: dict, where: str) -> list[str]:
    """The input names an element of a schema's ``inputs=[...]`` list declares: ``io.X.Input("name", ...)``
    directly, or through a helper function of the same module that returns one."""
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "Input":
        first = expr.args[0] if expr.args else None
        assert isinstance(first, ast.Constant) and isinstance(first.value, str), f"{where}: an input without a literal name"
        return [first.value]
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in functions:
        names = [n for node in ast.walk(functions[expr.func.id]) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Attribute) and node.func.attr == "Input"
                 for n in _input_names(node, functions, where)]
        assert names, f"{where}: {expr.func.id}() declares no input"
        return names
    raise AssertionError(f"{where}: cannot read the input {ast.unparse(expr)!r}; teach tests/test_docs.py this form")


def schemas() -> dict[str, dict]:
    """Class name -> {"node_id", "inputs", "file"} for every class in nodes/*.py that builds an ``io.Schema``."""
    found = {}
    for path in sorted((REPO / "nodes").glob("*.py")):
        tree = ast.parse(path.read_text())
        functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            for call in ast.walk(cls):
                if isinstance(call, ast.Call) and _name(call.func) == "Schema":
                    keywords = {k.arg: k.value for k in call.keywords}
                    node_id = keywords.get("node_id")
                    assert isinstance(node_id, ast.Constant), f"{path.name} {cls.name}: node_id is not a literal"
                    inputs = keywords.get("inputs")
                    elements = inputs.elts if isinstance(inputs, ast.List) else []
                    where = f"{path.name} {cls.name}"
                    names = [n for e in elements for n in _input_names(e, functions, where)]
                    assert cls.name not in found, f"{cls.name} builds two schemas"
                    found[cls.name] = {"node_id": node_id.value, "inputs": names, "file": path.name}
    return found


def registered_classes() -> list[str]:
    """The class names in ``NODE_LIST = [...]`` of nodes/__init__.py (what extension.py hands to ComfyUI)."""
    tree = ast.parse((REPO / "nodes" / "__init__.py").read_text())
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NODE_LIST" for t in stmt.targets):
            return [e.id for e in stmt.value.elts]
    raise AssertionError("nodes/__init__.py has no NODE_LIST")


SCHEMAS = schemas()
NODES = {SCHEMAS[c]["node_id"]: SCHEMAS[c]["inputs"] for c in registered_classes() if c in SCHEMAS}


def test_the_registered_node_ids_are_found_two_ways():
    classes = registered_classes()
    assert classes and len(set(classes)) == len(classes)
    # Every registered class has a schema, and every schema's class is registered: no node is missed.
    assert set(classes) == set(SCHEMAS), (sorted(set(classes) ^ set(SCHEMAS)))
    # The same IDs by plain text search of the sources: the parser above cannot have skipped one.
    by_text = {m for p in (REPO / "nodes").glob("*.py") for m in re.findall(r'node_id="([^"]+)"', p.read_text())}
    assert set(NODES) == by_text and len(NODES) == len(classes)
    assert all(NODES.values()), "a node with no inputs: is the parser reading its schema?"


# --- markdown helpers -------------------------------------------------------------------------

def strip_code_blocks(text: str) -> str:
    """The text with fenced code blocks blanked (line count kept)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def headings(text: str) -> list[tuple[int, int, str]]:
    """(line index, level, text) of every markdown heading outside code blocks."""
    found = []
    for i, line in enumerate(strip_code_blocks(text).splitlines()):
        m = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            found.append((i, len(m.group(1)), m.group(2)))
    return found


def anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens, repeats -1, -2."""
    seen: dict[str, int] = {}
    out = set()
    for _, _, heading in headings(text):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(text: str) -> list[str]:
    text = strip_code_blocks(text)
    found = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)      # [text](x), ![alt](x)
    found += re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']+)["']""", text)       # <img src>, <a href>
    return found


def is_external(target: str) -> bool:
    return bool(re.match(r"[a-z][a-z0-9+.-]*:", target, re.I))    # http:, https:, mailto:, ...


def section(text: str, title_pattern: str) -> str:
    """The lines under the first heading matching ``title_pattern``, down to the next heading of its level or
    above."""
    lines, hs = text.splitlines(), headings(text)
    for k, (i, level, title) in enumerate(hs):
        if re.search(title_pattern, title):
            end = next((j for j, lv, _ in hs[k + 1:] if lv <= level), len(lines))
            return "\n".join(lines[i:end])
    raise AssertionError(f"no heading matching {title_pattern!r}")


# --- the node pages -------------------------------------------------------------------------------

@pytest.mark.parametrize("node_id", sorted(NODES))
def test_every_node_has_a_help_page_naming_its_inputs(node_id):
    page = HELP_DIR / f"{node_id}.md"
    assert page.is_file(), f"web/docs/{node_id}.md is missing: the node help panel would be empty"
    text = page.read_text()
    assert text.strip() and text.lstrip().startswith("# "), f"web/docs/{node_id}.md needs a title"
    missing = [name for name in NODES[node_id] if f"**{name}**" not in text]      # its own bullet, not prose
    assert not missing, f"web/docs/{node_id}.md does not name the inputs {missing}"
    # Served at /extensions/<pack>/docs/: a link relative to the repository would not resolve there.
    relative = [t for t in links(text) if not is_external(t)]
    assert not relative, f"web/docs/{node_id}.md has relative links {relative}"


def test_there_is_no_help_page_for_a_node_that_does_not_exist():
    pages = {p.stem for p in HELP_DIR.glob("*.md")}
    assert pages == set(NODES), f"help pages without a node: {sorted(pages - set(NODES))}"


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_the_nodes_page_has_every_node_and_every_input(node_id):
    text = NODES_PAGE.read_text()
    body = section(text, rf"`{re.escape(node_id)}`")
    missing = [name for name in NODES[node_id] if f"`{name}`" not in body]
    assert not missing, f"docs/nodes.md, section of {node_id}: inputs not documented: {missing}"


# --- links ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    text = page.read_text()
    broken = []
    for target in links(text):
        if is_external(target):
            continue
        path_part, _, fragment = target.partition("#")
        path_part = urllib.parse.unquote(path_part)
        resolved = (page.parent / path_part).resolve() if path_part else page
        if REPO.resolve() not in (resolved, *resolved.parents) or not resolved.exists():
            broken.append(f"{target} (no such file)")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved.read_text()):
            broken.append(f"{target} (no heading '#{fragment}' in {resolved.relative_to(REPO.resolve())})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"
    if page == README:
        assert len(links(text)) >= 20, "the README's links were not found: is links() still reading them?"


# --- the README's shape ------------------------------------------------------------------------------

def test_the_readme_is_short_with_the_quick_start_on_its_first_screen():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it to {README_MAX_LINES}"
    top = [(i, title) for i, level, title in headings(text) if level == 2]
    titles = [title for _, title in top]
    assert [t for t in titles if t in README_SECTIONS] == README_SECTIONS, \
        f"README sections out of order or missing: {titles}, expected {README_SECTIONS} in this order"
    quick_line = next(i for i, title in top if title == "Quick start")
    assert quick_line < FIRST_SCREEN_LINES, f"'## Quick start' is at line {quick_line + 1}"
    opening = "\n".join(lines[:quick_line])
    picture = re.search(r'<img src="([^"]+\.(?:png|jpg))" width="(\d+)"', opening)
    assert picture, "the README opens with one picture, an <img> with a width (a full-width one fills the screen)"
    assert int(picture.group(2)) <= 640 and (REPO / picture.group(1)).is_file()
    quick = section(text, r"^Quick start$")
    # Install, the weights, the first image and both set-up commands all on the first screen.
    first_screen = "\n".join(lines[:FIRST_SCREEN_LINES])
    for must in ("custom_nodes", "models/checkpoints", "Browse Templates", "bash scripts/demo.sh",
                 "bash scripts/test.sh"):
        assert must in quick and must in first_screen, f"`{must}` is not in the Quick start's first screen"


def test_the_generated_sections_are_in_the_docs_pages_not_the_readme():
    readme = README.read_text()
    for page, marker in GENERATED.items():
        text = (REPO / page).read_text()
        start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
        assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end), page
        assert start not in readme and end not in readme, f"README.md still holds the {marker} section"
    # The fleet bench writes the same text into its results .md and into docs/scale.md (tests/test_fastpath_bench.py
    # and tests/test_live_bench.py check the other two pages against their generators).
    text = (REPO / "docs" / "scale.md").read_text()
    start, end = "<!-- scale-figures:start -->", "<!-- scale-figures:end -->"
    figures = text[text.index(start) + len(start):text.index(end)].strip()
    rendered = [p.read_text().split("\n\n", 1)[1].strip() for p in (REPO / "bench" / "results" / "scale").glob("*.md")]
    assert rendered and figures in rendered, \
        "docs/scale.md's figures are stale: run `python bench/scale_bench.py --render <results.json> --page docs/scale.md`"
