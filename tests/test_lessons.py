"""Lesson checks: every claim a lesson makes about its code is checked against the code.

Run for every section that exists, so a new section is checked automatically:
- each ```python snippet occurs verbatim in the section file (a line holding only
  `...` marks an elision: the parts around it must appear in order);
- "What changed from sNN" opens with "Read these first" (at most seven items, each
  with why), then lists exactly the top-level functions, classes, methods and
  UPPER_CASE constants added, changed and removed (from the ASTs), grouped by area;
- the "Try it" blocks are what the terminals show for its script in tests/transcripts.py;
- the lesson opens with the diff -u command that shows what this section adds;
- the lesson has its motto, diagram and "How OpenClaw does it" table;
- the README's learning-path table names every section with its real line count.
"""

import ast
import re

import pytest

from harness import REPO, section_files, section_id
from make_transcript import make_transcript
from transcripts import TRANSCRIPTS

SECTIONS = section_files()
ids = [section_id(p) for p in SECTIONS]


def lesson_of(path):
    return path.with_suffix(".md")


def fenced_blocks(markdown: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", markdown, flags=re.S | re.M)


def heading_section(markdown: str, heading_start: str) -> str:
    """The text under the first `## ` heading that starts with heading_start."""
    m = re.search(
        rf"^## {re.escape(heading_start)}.*?$(.*?)(?=^## |\Z)", markdown, flags=re.S | re.M
    )
    assert m, f"no '## {heading_start}' heading"
    return m.group(1)


def definitions(source: str) -> dict[str, str]:
    """Top-level functions, classes, methods and UPPER_CASE constants -> a dump of their AST."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = ast.dump(node)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        found[f"{node.name}.{item.name}"] = ast.dump(item)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id.isupper():
                    found[target.id] = ast.dump(node.value)
    return found


def computed_changes(before: str, after: str) -> set[tuple[str, str]]:
    old, new = definitions(before), definitions(after)
    changes = {("added", n) for n in new.keys() - old.keys()}
    changes |= {("removed", n) for n in old.keys() - new.keys()}
    changes |= {("changed", n) for n in new.keys() & old.keys() if new[n] != old[n]}
    return changes


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_lesson_exists_with_its_parts(path):
    lesson = lesson_of(path).read_text(encoding="utf-8")
    title = lesson.splitlines()[0]
    assert title.startswith(f"# {section_id(path)}"), title
    assert re.search(r"^> \S", lesson, flags=re.M), "a one-line motto as a quote under the title"
    index = SECTIONS.index(path)
    if index:  # the command that shows exactly what this section adds, near the top
        diff = f"diff -u sessions/en/{SECTIONS[index - 1].name} sessions/en/{path.name}"
        assert diff in "\n".join(lesson.splitlines()[:12]), f"the lesson opens with: {diff}"
    assert fenced_blocks(lesson, ""), "an ASCII diagram in a plain ``` block"
    for heading in (
        "Key concepts",
        "Code walkthrough",
        "What changed from",
        "Try it",
        "How OpenClaw does it",
    ):
        heading_section(lesson, heading)
    table = heading_section(lesson, "How OpenClaw does it")
    assert table.count("\n|") >= 4, "a table with a header and at least three rows"


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_snippets_are_verbatim(path):
    code = path.read_text(encoding="utf-8")
    snippets = fenced_blocks(lesson_of(path).read_text(encoding="utf-8"), "python")
    assert snippets, "the walkthrough shows code"
    for snippet in snippets:
        parts = re.split(r"^[ \t]*\.\.\.[ \t]*\n", snippet, flags=re.M)
        pos = 0
        for part in parts:
            index = code.find(part.rstrip("\n"), pos)
            assert index >= 0, f"not verbatim in {path.name}:\n{part}"
            pos = index + len(part.rstrip("\n"))


def inventory(block: str) -> set[tuple[str, str]]:
    """The (verb, name) pairs of a change list. Each "- " line names symbols in backticks after
    a verb (added, changed, removed); a name starting with "." is a method of the last class
    named before it on that line; what follows " — " is prose and is not read."""
    listed = set()
    for line in block.splitlines():
        if not line.startswith("- "):
            continue
        verb, owner = None, None
        for word, name in re.findall(r"\b(added|changed|removed)\b|`([\w.]+)`",
                                     line.split(" — ")[0]):
            if word:
                verb = word
                continue
            assert verb, f"a name before any verb (added, changed, removed): {line}"
            if name.startswith("."):
                assert owner, f"a method with no class before it: {line}"
                name = owner + name
            else:
                owner = name
            listed.add((verb, name))
    return listed


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_change_list_matches_the_code(path):
    """"What changed" opens with at most seven things to read first, each with its why; then
    every added, changed and removed symbol, grouped, one line per class or area."""
    lesson = lesson_of(path).read_text(encoding="utf-8")
    index = SECTIONS.index(path)
    source = path.read_text(encoding="utf-8")
    before = SECTIONS[index - 1].read_text(encoding="utf-8") if index else ""
    expected = computed_changes(before, source)
    previous = section_id(SECTIONS[index - 1]) if index else "nothing"
    block = heading_section(lesson, f"What changed from {previous}")
    first, _, rest = block.partition("### Everything else")
    assert "### Read these first" in first and rest, (
        "What changed has a '### Read these first' list, then '### Everything else'")
    items = re.findall(r"^\d+\. (.*)$", first, flags=re.M)
    assert 1 <= len(items) <= 7, "Read these first: one to seven items"
    known = set(definitions(source)) | set(definitions(before))
    for item in items:
        names = re.findall(r"`([\w.]+)`", item.split(" — ")[0])
        assert names and " — " in item, f"an item names a symbol, then ' — ' and why: {item}"
        assert set(names) <= known, f"not in the code: {set(names) - known}"
    listed = inventory(rest)
    missing, extra = expected - listed, listed - expected
    assert not missing and not extra, (
        f"missing from the lesson: {sorted(missing)}; not in the code: {sorted(extra)}"
    )


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_try_it_is_a_real_transcript(path):
    assert section_id(path) in TRANSCRIPTS, (
        "every section has a Try it script in tests/transcripts.py"
    )
    lesson = lesson_of(path).read_text(encoding="utf-8")
    blocks = fenced_blocks(heading_section(lesson, "Try it"), "text")
    made = make_transcript(section_id(path))
    assert blocks[: len(made)] == made, (
        f"the Try it blocks of {path.stem}.md are not what the section prints; "
        f"regenerate them with: python tests/make_transcript.py {section_id(path)} --write"
    )


def test_readme_table_matches_the_sections():
    """One row per section: its file, how many lines it adds to the one before, its lines."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\|\s*(s\d\d)\s*\|.*?\((sessions/en/s\d\d_\w+\.py)\).*?\|\s*\+(\d+)\s*\|\s*(\d+)\s*\|\s*$",
        readme,
        flags=re.M,
    )
    assert rows, "README has a learning-path table"
    table = {sid: (file, int(adds), int(lines)) for sid, file, adds, lines in rows}
    assert sorted(table) == sorted(section_id(p) for p in SECTIONS), "one row per section"
    previous = 0
    for path in SECTIONS:
        file, adds, lines = table[section_id(path)]
        assert file == str(path.relative_to(REPO)), file
        real = len(path.read_text(encoding="utf-8").splitlines())
        assert abs(lines - real) <= real * 0.05, f"{path.name}: README says {lines}, it has {real}"
        added = real - previous
        assert abs(adds - added) <= max(20, added * 0.1), f"{path.name}: adds {added}, not {adds}"
        previous = real
