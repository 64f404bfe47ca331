"""Helpers shared by the tests and by tests/make_transcript.py.

- section_files / sections_from: the section files that exist, so tests of an
  idea from section N run against N and every later section automatically.
- isolated_env: an environment in which the developer's own .env and shell
  cannot change a result (every variable .env.example names is set, to "" when
  the test does not care; python-dotenv never overrides a variable that is set).
- load_section: import a section file by path as a fresh module.
- run_section: run a section as a learner would (subprocess, piped stdin) and
  rebuild the transcript a terminal would show.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import count
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECTIONS_DIR = REPO / "sessions" / "en"
WORKSPACE_SAMPLE = REPO / "workspace"

# Every prompt at which a section reads a line from the person. The transcript
# rebuilder puts the typed line after each one, as a terminal would echo it.
PROMPTS = ("You > ", "  Allow? [o]nce / [a]lways / [d]eny > ")

_module_ids = count(1)


def section_files() -> list[Path]:
    return sorted(SECTIONS_DIR.glob("s[0-9][0-9]_*.py"))


def section_id(path: Path) -> str:
    return path.name[:3]


def sections_from(first: str) -> list[Path]:
    """Section files from `first` (e.g. "s02") to the last one that exists."""
    return [p for p in section_files() if section_id(p) >= first]


def whole_process_only(path: Path, first: str) -> None:
    """Whole-process runs cost about a second each (the SDK's import), so a test that starts
    the section as a subprocess runs on the section where its idea lands and on the newest
    one, which carries every idea; it is skipped on the sections between, where in-process
    tests cover the idea."""
    sections = sections_from(first)
    if path not in (sections[0], sections[-1]):
        pytest.skip(
            "whole-process run: first and newest section only (in-process tests cover this one)"
        )


def env_example_names() -> list[str]:
    names = []
    for line in (REPO / ".env.example").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=", line)
        if m and m.group(1) not in names:
            names.append(m.group(1))
    return names


# Variables the SDK itself reads; a developer's shell must not leak them in.
SDK_VARS = (
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_PROFILE",
    "ANTHROPIC_CONFIG_DIR",
    "ANTHROPIC_CUSTOM_HEADERS",
    "ANTHROPIC_IDENTITY_TOKEN",
    "ANTHROPIC_IDENTITY_TOKEN_FILE",
    "ANTHROPIC_FEDERATION_RULE_ID",
    "ANTHROPIC_ORGANIZATION_ID",
    "ANTHROPIC_LOG",
)


def section_env_values(workspace: Path, base_url: str | None, **extra: str) -> dict[str, str]:
    """The variables a test run sets: all of .env.example (blank), then ours."""
    values = {name: "" for name in env_example_names()}
    # More keys (s09): numbered, so .env.example names them in prose; a shell's are blanked too.
    values.update({f"{name}_{n}": "" for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")
                   for n in range(2, 10)})
    # GATEWAY_PORT 0: each run's gateway (s05 on) takes a free port: parallel tests never collide.
    values.update(
        {
            "WORKSPACE_DIR": str(workspace),
            "STATE_DIR": str(state_of(workspace)),
            "NO_COLOR": "1",
            "GATEWAY_PORT": "0",
        }
    )
    if base_url is not None:
        values.update({"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "test-key"})
    values.update(extra)
    return values


def isolated_env(workspace: Path, base_url: str | None, **extra: str) -> dict[str, str]:
    """A full environment for a subprocess."""
    env = {k: v for k, v in os.environ.items() if k not in SDK_VARS}
    env.update(section_env_values(workspace, base_url, **extra))
    env.update(
        {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
    )
    return env


class Clock:
    """A clock that stands still until the test moves it: `clock.now` is a datetime or a number
    of seconds, `clock()` reads it, and advance(minutes=5) moves either kind."""

    def __init__(self, start):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, **delta):
        step = timedelta(**delta)
        self.now += step if isinstance(self.now, datetime) else step.total_seconds()
        return self.now


def telegram_env(tg, **extra: str) -> dict[str, str]:
    """The variables that point a section at a fake Telegram (tests/fake_telegram.py)."""
    return {"TELEGRAM_BOT_TOKEN": tg.token, "TELEGRAM_API_BASE": tg.api_base, **extra}


def state_of(workspace: Path) -> Path:
    """The state folder the tests give a workspace: beside it, never inside it."""
    return workspace.parent / "state"


def main_store(module):
    """The default agent's session store of a section (s03 on)."""
    return module.SessionStore(module.SESSIONS_ROOT / module.AGENT_ID)


# The tracked sample files of workspace/, and nothing else: a test never sees what a learner
# made while following the lessons (tests/test_repo.py checks this list against git).
SAMPLE_FILES = (
    "AGENTS.md",
    "BOOTSTRAP.md",
    "CRON.json",
    "HEARTBEAT.md",
    "IDENTITY.md",
    "MEMORY.md",
    "SOUL.md",
    "TOOLS.md",
    "USER.md",
    "skills/example-skill/SKILL.md",
)


_samples: dict[str, bytes] = {}


def sample_bytes(name: str) -> bytes:
    """A sample file as committed (git's copy, so a learner's edits to workspace/ never reach a
    test), or the file on disk where there is no git checkout (an unpacked archive)."""
    if not _samples:
        names = "".join(f"HEAD:workspace/{n}\n" for n in SAMPLE_FILES).encode()
        try:
            out = subprocess.run(
                ["git", "cat-file", "--batch"],
                input=names,
                cwd=REPO,
                capture_output=True,
                check=True,
            ).stdout
            for n in SAMPLE_FILES:
                header, _, out = out.partition(b"\n")
                size = int(header.split()[2])
                _samples[n], out = out[:size], out[size + 1 :]
        except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
            _samples.update({n: (WORKSPACE_SAMPLE / n).read_bytes() for n in SAMPLE_FILES})
    return _samples[name]


def copy_workspace(dest: Path) -> Path:
    """A fresh workspace holding the tracked samples only, as committed."""
    for name in SAMPLE_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(sample_bytes(name))
    return dest


_compiled: dict[Path, tuple[tuple[int, int], object]] = {}  # path -> ((mtime_ns, size), code)


def load_section(path: Path):
    """Import a section file as a new module (its configuration is read now). The source is
    compiled once per test process (no __pycache__ is written), then run afresh each time."""
    info = path.stat()
    key = (info.st_mtime_ns, info.st_size)
    if _compiled.get(path, (None,))[0] != key:
        _compiled[path] = (key, compile(path.read_bytes(), str(path), "exec", dont_inherit=True))
    name = f"section_{path.stem}_{next(_module_ids)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(_compiled[path][1], module.__dict__)
    return module


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    transcript: str


def rebuild_transcript(stdout: str, inputs: list[str]) -> str:
    """Put each typed line after the prompt that read it, as a terminal shows it."""
    out, pos, remaining = [], 0, list(inputs)
    pattern = re.compile("|".join(re.escape(p) for p in PROMPTS))
    while remaining:
        m = pattern.search(stdout, pos)
        if not m:
            break
        out.append(stdout[pos : m.end()])
        out.append(remaining.pop(0) + "\n")
        pos = m.end()
    out.append(stdout[pos:])
    return "".join(out)


def run_section(
    path: Path, inputs: list[str], env: dict[str, str], timeout: float = 60, cwd: Path | None = None
) -> Run:
    """Run a section file with piped input from another directory, as a learner could: a
    whole process of its own (forked from a warm process that imported the libraries once,
    unless WARM_RUNS=0)."""
    cwd = cwd or Path(env["WORKSPACE_DIR"]).parent
    stdin = "".join(line + "\n" for line in inputs)
    if os.environ.get("WARM_RUNS") == "0":
        proc = subprocess.run(
            [sys.executable, str(path)],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=str(cwd),
            encoding="utf-8",
        )
        return Run(
            proc.returncode, proc.stdout, proc.stderr, rebuild_transcript(proc.stdout, inputs)
        )
    code, stdout, stderr = WARM.run(path, stdin, env, cwd, timeout)
    return Run(code, stdout, stderr, rebuild_transcript(stdout, inputs))


class WarmProcess:
    """tests/warm.py, started once per test worker (or per make_transcript run); each run is
    a fork of it. start() hands it a run and returns the child's pid; finish() waits for the
    exit status. One run at a time: start() takes the lock, finish() gives it back."""

    def __init__(self):
        self.proc = None
        self.lock = threading.Lock()
        self.buffer, self.status = b"", None

    def line(self, timeout: float | None) -> dict | None:
        """The warm process's next JSON line, or None when none comes within `timeout`."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            if not select.select([fd], [], [], timeout)[0]:
                return None
            piece = os.read(fd, 4096)
            if not piece:
                raise RuntimeError("tests/warm.py ended")
            self.buffer += piece
        text, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(text)

    def start(self, path: Path, env: dict, cwd: Path, files: dict) -> int:
        self.lock.acquire()
        try:
            if self.proc is None or self.proc.poll() is not None:
                clean = {k: v for k, v in os.environ.items() if k not in SDK_VARS}
                self.proc = subprocess.Popen(
                    [sys.executable, str(REPO / "tests" / "warm.py")],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=clean,
                    cwd=str(REPO),
                )
                self.buffer = b""
            job = {"path": str(path), "env": env, "cwd": str(cwd)}
            job.update({name: str(file) for name, file in files.items()})
            self.proc.stdin.write(json.dumps(job).encode() + b"\n")
            self.proc.stdin.flush()
            self.status = None
            return self.line(None)["pid"]
        except BaseException:
            self.lock.release()
            raise

    def poll(self) -> int | None:
        """The exit status if the run has ended, else None (never waits)."""
        if self.status is None:
            done = self.line(0)
            self.status = None if done is None else done["status"]
        return self.status

    def finish(self, pid: int, timeout: float) -> int:
        try:
            if self.poll() is None:
                done = self.line(timeout)
                if done is None:
                    os.kill(pid, signal.SIGKILL)  # a hung section: its status line follows
                    self.line(None)
                    raise subprocess.TimeoutExpired(str(pid), timeout)
                self.status = done["status"]
            return self.status
        finally:
            self.lock.release()

    def run(self, path: Path, stdin: str, env: dict, cwd: Path, timeout: float):
        with tempfile.TemporaryDirectory() as tmp:
            files = {name: Path(tmp) / name for name in ("stdin", "stdout", "stderr")}
            files["stdin"].write_text(stdin, encoding="utf-8")
            for name in ("stdout", "stderr"):
                files[name].touch()
            code = self.finish(self.start(path, env, cwd, files), timeout)
            return (
                code,
                files["stdout"].read_text(encoding="utf-8"),
                files["stderr"].read_text(encoding="utf-8"),
            )


WARM = WarmProcess()


def drive_repl(module, inputs: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run a section's main() in-process, typing `inputs` at its prompts.

    Returns (exit code, transcript). After the last input, input() raises
    EOFError, exactly like Ctrl-D. An input of KeyboardInterrupt raises it. A
    callable input is called at the prompt and types what it returns, so a test
    can wait there for something (a message from a fake chat) before typing.
    """
    remaining = list(inputs)

    def fake_input(prompt: str = "") -> str:
        print(prompt, end="")
        if not remaining:
            raise EOFError
        line = remaining.pop(0)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        if callable(line):
            line = line()
        print(line)
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    try:
        code = module.main()
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().out


def assert_valid_history(messages: list) -> None:
    """The rules the real Messages API enforces on the list we send next."""
    assert messages, "history is empty"
    assert messages[0]["role"] == "user", "history must start with a user message"
    for i, msg in enumerate(messages):
        assert msg["role"] in ("user", "assistant"), msg
        if i:
            assert msg["role"] != messages[i - 1]["role"], (
                f"two {msg['role']} messages in a row at {i}"
            )
        content = msg["content"]
        assert content, f"empty content at {i}"
        if isinstance(content, list):
            for block in content:
                if block.get("type") == "text":
                    assert block["text"], f"empty text block at {i}"
        tool_ids = [
            b["id"] for b in content if isinstance(content, list) and b.get("type") == "tool_use"
        ]
        if tool_ids:
            assert i + 1 < len(messages), f"tool_use at {i} has no answer"
            answer = messages[i + 1]["content"]
            result_ids = [
                b.get("tool_use_id")
                for b in answer
                if isinstance(answer, list) and b.get("type") == "tool_result"
            ]
            assert sorted(result_ids) == sorted(tool_ids), (
                f"tool_use ids {tool_ids} answered by {result_ids}"
            )


def new_conversation(module):
    """What this section's agent_turn takes as its conversation: a plain list up
    to s02; from s03 on, a Session that saves itself."""
    if hasattr(module, "SessionStore"):
        return main_store(module).create()
    return []


def history_of(conversation) -> list:
    return conversation if isinstance(conversation, list) else conversation.messages


def wait_for(condition, timeout: float = 10, what: str = "condition"):
    """Call condition() until it returns something true (returned); fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Screen:
    """What the terminal has shown so far, read while a section's REPL is still running
    (drive_repl's callable inputs run at the prompt, on the test's thread)."""

    def __init__(self, capsys):
        self.capsys, self.text = capsys, ""

    def wait_for(self, needle: str, timeout: float = 10) -> str:
        def seen():
            self.text += self.capsys.readouterr().out
            return needle in self.text

        wait_for(seen, timeout, repr(needle))
        return self.text
