"""The reader's map: every section can be found in by its headers, its docstring and its commands.

Run for every section file that exists, so s06-s10 are checked as they are added:
- each `# --- [sNN] Title ---` header carries the section that first has that title;
- the module docstring's "New here" / "Changed here" lists are the top-level functions and
  classes added or changed since the previous section (from the two files' ASTs), each new one
  under the header it is defined in, and "Carried from earlier" names the earlier headers in
  file order;
- /help is printed from the one command table, and the REPL dispatches through it.
"""

import ast
import re

import pytest

from harness import section_files, section_id

SECTIONS = section_files()
HEADER = re.compile(r"^# --- \[(s\d\d)\] (.+?) -+$")


def headers(source: str) -> list[tuple[str, str, int]]:
    """(tag, title, line number) of every section header, in file order."""
    found = []
    for number, line in enumerate(source.splitlines(), 1):
        if line.startswith("# --- "):
            m = HEADER.match(line)
            assert m, f"line {number}: a header must read '# --- [sNN] Title ---': {line}"
            found.append((m.group(1), m.group(2), number))
    return found


def top_level(source: str) -> dict[str, tuple[str, int]]:
    """Top-level functions and classes -> (a dump of their AST, first line)."""
    return {
        node.name: (ast.dump(node), node.lineno)
        for node in ast.parse(source).body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }


def header_of(line: int, heads: list) -> str:
    """The header a line falls under, as '[sNN] Title'."""
    owner = None
    for tag, title, number in heads:
        if number < line:
            owner = f"[{tag}] {title}"
    return owner or "(before the first header)"


def expected_map(before: str, after: str) -> dict:
    old, new, heads = top_level(before), top_level(after), headers(after)
    sid = None
    added: dict[str, set] = {}
    for name in new.keys() - old.keys():
        added.setdefault(header_of(new[name][1], heads), set()).add(name)
    changed = {name for name in new.keys() & old.keys() if new[name][0] != old[name][0]}
    return {"new": added, "changed": changed, "heads": heads, "sid": sid}


def docstring_lists(source: str) -> dict:
    """The docstring's lists: header -> names (New), names (Changed), headers (Carried)."""
    doc = ast.get_docstring(ast.parse(source), clean=False) or ""
    parts = {"new": {}, "changed": set(), "carried": []}
    part, entry = None, None
    for line in doc.splitlines():
        if line in ("New here:", "Changed here:", "Carried from earlier:"):
            part = {
                "New here:": "new",
                "Changed here:": "changed",
                "Carried from earlier:": "carried",
            }[line]
            continue
        if not line.startswith("  ") or part is None:
            part = None
            continue
        if part == "carried":  # "[s04] Output · Channels · ...": an item without a tag has
            tag = None  # the line's, and may be the header's title up to its colon
            for item in (h.strip() for h in line.split(" · ") if h.strip()):
                if item.startswith("["):
                    tag, _, item = item[1:].partition("] ")
                parts["carried"].append((tag, item))
            continue
        if not line.startswith("    "):  # an entry; deeper indentation continues the last one
            entry, _, rest = line.strip().partition(" — ")
            if part == "new":
                parts["new"].setdefault(entry, set())
        else:
            rest = line.strip()
        if part == "new":
            parts["new"][entry] |= {n.strip() for n in rest.split(",") if n.strip()}
        elif line.startswith("    "):
            continue  # the rest of a "why"
        else:
            parts["changed"] |= {n.strip() for n in entry.split(",") if n.strip()}
    return parts


@pytest.mark.parametrize("path", SECTIONS, ids=section_id)
def test_each_header_names_the_section_that_introduced_it(path):
    first: dict[str, str] = {}
    for earlier in SECTIONS[: SECTIONS.index(path) + 1]:
        for tag, title, _ in headers(earlier.read_text(encoding="utf-8")):
            first.setdefault(title, section_id(earlier))
    for tag, title, number in headers(path.read_text(encoding="utf-8")):
        assert tag == first[title], (
            f"{path.name}:{number}: '{title}' first appears in {first[title]}"
        )


@pytest.mark.parametrize("path", SECTIONS, ids=section_id)
def test_the_docstring_is_a_map_of_the_file(path):
    index = SECTIONS.index(path)
    source = path.read_text(encoding="utf-8")
    before = SECTIONS[index - 1].read_text(encoding="utf-8") if index else ""
    expected, listed = expected_map(before, source), docstring_lists(source)
    assert listed["new"] == expected["new"], (
        f"'New here' should list, under each header: {expected['new']}"
    )
    assert listed["changed"] == expected["changed"], (
        f"'Changed here' should name exactly: {sorted(expected['changed'])}"
    )
    carried = [f"[{tag}] {title}" for tag, title, _ in expected["heads"] if tag < section_id(path)]
    by_tag: dict[str, list] = {}  # each earlier section's headers, in file order
    for tag, title, _ in expected["heads"]:
        if tag < section_id(path):
            by_tag.setdefault(tag, []).append(title)
    shown: dict[str, list] = {}
    for tag, item in listed["carried"]:
        shown.setdefault(tag, []).append(item)
    assert sorted(shown) == sorted(by_tag) and all(
        len(shown[tag]) == len(titles)
        and all(item in (title, title.split(":")[0]) for item, title in zip(shown[tag], titles))
        for tag, titles in by_tag.items()
    ), f"'Carried from earlier' should be (a title may stop at its colon): {carried}"
    doc = ast.get_docstring(ast.parse(source), clean=False)
    assert len(doc.splitlines()) <= 45, "the map stays short: at most about 40 lines"
    assert f"python sessions/en/{path.name}" in doc, "the docstring says how to run the file"


@pytest.mark.parametrize("path", SECTIONS, ids=section_id)
def test_help_is_printed_from_the_one_command_table(path, load, monkeypatch, capsys):
    mod = load(path)
    assert isinstance(mod.COMMANDS, dict) and "/help" in mod.COMMANDS
    for name, entry in mod.COMMANDS.items():
        handler, args, text = entry
        assert re.fullmatch(r"/[a-z][\w-]*", name) and callable(handler) and text, name
    mod.show_help(None, "")
    shown = capsys.readouterr().out
    listed = re.findall(r"^  (/[a-z][\w-]*)", shown, flags=re.M)
    assert listed == list(mod.COMMANDS), "/help shows every command of the table, in order"
    # No command is dispatched outside the table: the REPL never compares a line with "/...".
    source = path.read_text(encoding="utf-8")
    main = next(n for n in ast.parse(source).body if getattr(n, "name", "") == "main")
    assert not re.search(r'== "/[a-z]', ast.get_source_segment(source, main))


@pytest.mark.parametrize("path", SECTIONS, ids=section_id)
def test_a_command_that_fails_is_one_line_and_the_repl_goes_on(path, load, monkeypatch, capsys):
    mod = load(path)

    def broken(repl, arg):
        raise ValueError("a bug\x1b[2J")

    monkeypatch.setitem(mod.COMMANDS, "/help", (broken, "", "broken on purpose"))
    mod.run_command(None, "/help now")
    assert capsys.readouterr().out == "/help failed: ValueError: a bug\\x1b[2J\n"
