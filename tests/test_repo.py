"""The repository around the sections: README, configuration, samples, CI."""

import ast
import json
import re
import subprocess
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from harness import REPO, SAMPLE_FILES, env_example_names, sample_bytes, section_files

# Conventions the sections honour but that are not project settings.
CONVENTIONS = {"NO_COLOR"}


def variables_read(path) -> set[str]:
    """Names passed to os.getenv / os.environ.get / os.environ[...] / number_setting in a
    section file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = ast.unparse(node.func)
            if func in ("os.getenv", "os.environ.get", "number_setting"):
                names.add(node.args[0].value)
        if (
            isinstance(node, ast.Subscript)
            and ast.unparse(node.value) == "os.environ"
            and isinstance(node.slice, ast.Constant)
        ):
            names.add(node.slice.value)
    return names


def test_env_example_lists_exactly_what_the_sections_read():
    read = set().union(*(variables_read(p) for p in section_files())) - CONVENTIONS
    listed = set(env_example_names())
    assert read - listed == set(), (
        f"read by a section but not in .env.example: {sorted(read - listed)}"
    )
    assert listed - read == set(), (
        f"in .env.example but read by no section: {sorted(listed - read)}"
    )


def test_env_example_default_model():
    assert "MODEL_ID=claude-sonnet-5-5" in (REPO / ".env.example").read_text(encoding="utf-8")


def test_readme_quick_start_in_order():
    """Clone and cd, a virtual environment, install, .env, run s01: in that order."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    steps = [
        "git clone",
        "&& cd ",
        "python3 -m venv .venv && . .venv/bin/activate",
        "pip install -r requirements.txt",
        "cp .env.example .env",
        "python sessions/en/s01_agent_loop.py",
        "pip install -r requirements.txt -r requirements-dev.txt && python -m pytest",
    ]
    positions = [quick.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), positions


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    command = "pip install -r requirements.txt -r requirements-dev.txt && python -m pytest"
    assert command in readme
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert command in ci.splitlines()


def test_requirements_are_exactly_the_curriculum_dependencies():
    def names(file):
        lines = (REPO / file).read_text(encoding="utf-8").splitlines()
        return {
            re.split(r"[<>=\s]", line.strip())[0].lower()
            for line in lines
            if line.strip() and not line.startswith("#")
        }

    assert names("requirements.txt") == {
        "anthropic",
        "python-dotenv",
        "websockets",
        "croniter",
        "python-telegram-bot",
        "httpx",
    }
    assert "pytest" in names("requirements-dev.txt")


def test_gitignore_keeps_secrets_and_state_out():
    ignore = (REPO / ".gitignore").read_text(encoding="utf-8").split()
    for entry in (".env", ".state/", "workspace/memory/", ".venv/", "__pycache__/"):
        assert entry in ignore


def test_no_section_imports_another_file_of_the_project():
    for path in section_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0 and not (node.module or "").startswith(
                    ("s0", "s1", "tests", "sessions")
                )
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not re.match(r"s\d\d_", alias.name), f"{path.name} imports {alias.name}"


def test_workspace_samples_exist():
    for name in (
        "SOUL.md",
        "IDENTITY.md",
        "TOOLS.md",
        "USER.md",
        "HEARTBEAT.md",
        "BOOTSTRAP.md",
        "AGENTS.md",
        "MEMORY.md",
        "CRON.json",
        "skills/example-skill/SKILL.md",
    ):
        assert sample_bytes(name).decode("utf-8").strip(), name


def test_sample_skill_has_name_and_description():
    text = sample_bytes("skills/example-skill/SKILL.md").decode("utf-8")
    front = text.split("---")[1]
    assert re.search(r"^name: example-skill$", front, flags=re.M)
    assert re.search(r"^description: \S", front, flags=re.M)


def test_sample_cron_jobs_are_valid_and_none_is_in_the_past():
    from croniter import croniter

    jobs = json.loads(sample_bytes("CRON.json"))["jobs"]
    assert {job["schedule"]["kind"] for job in jobs} == {"at", "every", "cron"}
    assert len({job["id"] for job in jobs}) == len(jobs)
    for job in jobs:
        schedule = job["schedule"]
        assert job["payload"]["kind"] in ("agent_turn", "system_event")
        if schedule["kind"] == "cron":
            assert croniter.is_valid(schedule["expr"])
            ZoneInfo(schedule["tz"])
        elif schedule["kind"] == "every":
            assert schedule["seconds"] > 0
            datetime.fromisoformat(schedule["anchor"])
        else:
            assert datetime.fromisoformat(schedule["at"]) > datetime.now(timezone.utc), job["id"]


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs a git checkout")
def test_tests_copy_exactly_the_tracked_sample_files():
    tracked = subprocess.run(
        ["git", "ls-files", "workspace"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    assert sorted(f"workspace/{name}" for name in SAMPLE_FILES) == sorted(tracked)


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs a git checkout")
def test_tracked_files_include_no_state_or_secrets():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    assert ".env" not in tracked
    assert not [f for f in tracked if f.startswith((".state/", "workspace/memory/"))]


def test_tools_md_describes_only_tools_that_exist():
    """workspace/TOOLS.md tells the model about its tools: each one it names must be real."""
    sections = [p for p in section_files() if p.name >= "s02"]
    if not sections:
        pytest.skip("no section with tools yet")
    text = sample_bytes("TOOLS.md").decode("utf-8")
    named = set(re.findall(r"^- `(\w+)`", text, flags=re.M))
    source = sections[-1].read_text(encoding="utf-8")
    tree = ast.parse(source)
    tool_names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", "") == "TOOL_HANDLERS" for t in node.targets
        ):
            keys = {k.value for k in node.value.keys if k is not None}
            spread = None in node.value.keys  # {**TOOL_HANDLERS, ...} keeps the earlier ones
            tool_names = tool_names | keys if spread else keys
    assert named and named <= tool_names, (
        f"TOOLS.md names {sorted(named - tool_names)}, which do not exist"
    )
