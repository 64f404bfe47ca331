"""The path a learner really walks: every section on one workspace and one state folder,
in order and back; the lessons' Try it played in the repository's own workspace; and the
tests still passing afterwards. Sections added later join these tests without edits."""

import re
import shutil
import subprocess
import sys
import threading

from fake_anthropic import last_user_text, reply
from fake_telegram import FakeTelegram
from harness import (
    REPO,
    copy_workspace,
    isolated_env,
    load_section,
    run_section,
    section_files,
    section_id,
    telegram_env,
)

SECTIONS = section_files()


def listing_commands(path) -> list[str]:
    """The commands of a section's table that take no argument: the ones that show state."""
    module = load_section(path)
    return [name for name, (_, args, _) in module.COMMANDS.items() if not args]


def keeps_sessions(path) -> bool:
    return section_id(path) >= "s03"


def test_every_section_reads_what_any_other_wrote(tmp_path, fake_api):
    """s01..sNN in order, then back from sNN to s01, on one workspace and state folder: each
    run has a terminal turn, a Telegram message (from s04 on) and every listing command."""
    workspace = copy_workspace(tmp_path / "workspace")
    tg = FakeTelegram().start()
    env = isolated_env(workspace, fake_api.base_url, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    answered = threading.Event()

    def gated_echo(body):
        """The terminal's turn waits (mid-stream) until the Telegram turn has been answered,
        so both happen in every run whatever the timing."""
        text = last_user_text(body)
        gate = answered if text.startswith("terminal") else None
        return reply(f"(fake) you said: {text}", gate=gate)

    fake_api.default = gated_echo
    order = SECTIONS + SECTIONS[::-1][1:]
    previous = None
    try:
        for run_number, path in enumerate(order):
            sid = section_id(path)
            words = f"terminal {sid} run {run_number}"
            remote = sid >= "s04"
            if remote:
                sent_before = len(tg.sent)
                tg.push(tg.private_message(f"telegram {sid} run {run_number}", user_id=42))
                threading.Thread(
                    target=lambda n=sent_before: (tg.wait_for_sent(n + 1, 20), answered.set()),
                    daemon=True,
                ).start()
            else:
                answered.set()
            requests_before = len(fake_api.requests)
            run = run_section(path, [words, *listing_commands(path), "quit"], env, timeout=60)
            answered.clear()
            problem = f"{path.name} (run {run_number}): {run.stderr[-2000:]}"
            assert run.returncode == 0, problem
            assert "Traceback" not in run.stdout + run.stderr, problem
            assert f"(fake) you said: {words}" in run.stdout, problem
            if remote:
                assert tg.sent[-1]["text"] == f"(fake) you said: telegram {sid} run {run_number}"
            assert fake_api.rejected == [], fake_api.rejected  # every request one the API takes
            mine = [r for r in fake_api.requests[requests_before:] if last_user_text(r) == words]
            assert len(mine) == 1, problem
            if previous is not None and keeps_sessions(previous) and keeps_sessions(path):
                earlier = f"terminal {section_id(previous)} run {run_number - 1}"
                history = str(mine[0]["messages"])
                assert earlier in history, f"{path.name} did not resume {previous.name}'s session"
            previous = path
    finally:
        tg.stop()


def test_the_tests_pass_after_the_learner_played_every_lesson(tmp_path):
    """Copy the repository, play the lessons' Try its in its own workspace/ and state folder
    (as a learner would, no WORKSPACE_DIR or STATE_DIR set), then run tests that read the
    workspace in that copy: they must not see what the lessons left behind."""
    copy = tmp_path / "repo"
    for part in ("sessions", "tests", "workspace", ".env.example", "pytest.ini", "README.md"):
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, copy / part)
    # The lessons whose Try it leaves files behind in workspace/ or the state folder a test
    # could trip on (drafts, gateway.json, memory notes, CRON.json and HEARTBEAT.md, and the
    # newest); every Try it is replayed on its own by tests/test_lessons.py.
    leave_files = ["s02", "s05", "s06", "s07", section_files()[-1].name[:3]]
    play = subprocess.run(
        [sys.executable, str(copy / "tests" / "make_transcript.py"), *leave_files, "--in-place"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert play.returncode == 0, play.stderr[-3000:]
    assert (copy / ".state").is_dir() and list((copy / "workspace").iterdir())
    suite = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-o",
            "addopts=",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_s02_tool_use.py",
            "tests/test_s05_gateway_routing.py",
            "-k",
            "list_dir or file_tools or defaults_are_written",
        ],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert suite.returncode == 0, suite.stdout[-3000:]
    assert re.search(r"\d+ passed", suite.stdout) and "failed" not in suite.stdout
