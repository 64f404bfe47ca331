"""Play a lesson's "Try it" and print what the terminals show, as tests/test_lessons.py checks it.

Usage: python tests/make_transcript.py s01              print it
       python tests/make_transcript.py s01 --write      put it into the lesson's Try it blocks
       python tests/make_transcript.py --all --in-place     (or: s02 s05 --in-place)
             play every lesson (or those named) in this repository's own workspace/ and state
             folder, in order, exactly as a learner would (tests/test_learner_path.py does it on a
             copy of the repository)

A script (tests/transcripts.py) lists runs of the section; each run is a list of steps:
a string is typed at the section's prompt; a callable gets what the section printed so far
and returns the line to type; ("say", text) is sent by the person in the fake chat, who then
waits for the bot's reply; ("say_no_reply", text) does not wait; ("wait", text) waits until
the section has printed text. A script with "chat": "telegram" runs the section against the
fake Bot API, and the Try it shows that chat's terminal as a block of its own.
"""

from __future__ import annotations

import codecs
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_anthropic import FakeAnthropic  # noqa: E402
from fake_telegram import (  # noqa: E402
    DEFAULT_PORT,
    SCRIPT_TOKEN,
    SCRIPT_USERNAME,
    FakeTelegram,
    TelegramUser,
)
from harness import PROMPTS, REPO, WARM, copy_workspace, isolated_env, section_files  # noqa: E402
from transcripts import (  # noqa: E402
    SHOWN_BASE_URL,
    SHOWN_GATEWAY_PORT,
    SHOWN_PAIRING_CODE,
    SHOWN_TOKEN,
    SHOWN_WORKSPACE,
    TRANSCRIPTS,
)


SHOWN_PORTS: dict[int, int] = {}  # a fake's port in this run -> the one a learner has


class WarmChild:
    """A section forked from the warm process (tests/harness.py's WARM: the libraries are
    imported once, not once a run), with what a Popen offers here: stdin is a FIFO that is
    written line by line; stdout and stderr are files, read as they grow."""

    def __init__(self, path: Path, env: dict, cwd: Path):
        self.folder = tempfile.TemporaryDirectory()
        files = {name: Path(self.folder.name) / name for name in ("stdin", "stdout", "stderr")}
        os.mkfifo(files["stdin"])
        files["stdout"].touch()
        files["stderr"].touch()
        # Read and write: opening does not wait for the child, and closing it is its EOF.
        self.stdin = open(os.open(files["stdin"], os.O_RDWR), "w", encoding="utf-8", buffering=1)
        self.stdout = self  # read(1) below
        self.out_file = open(files["stdout"], "rb")
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.stderr = SimpleNamespace(read=lambda: files["stderr"].read_text(encoding="utf-8"))
        self.pending, self.code, self.finished, self.lock = "", None, False, threading.Lock()
        self.pid = WARM.start(path, env, cwd, files)

    def read(self, _size: int = 1) -> str:
        """The next character of the section's output, or "" once it has ended."""
        while not self.pending:
            piece = self.out_file.read(4096)
            if piece:
                self.pending = self.decoder.decode(piece)
            elif self.code is not None or self.poll() is not None:
                self.pending = self.decoder.decode(self.out_file.read(), final=True)
                if not self.pending:
                    return ""
            else:
                time.sleep(0.005)
        char, self.pending = self.pending[0], self.pending[1:]
        return char

    def poll(self) -> int | None:
        with self.lock:
            if self.code is None and not self.finished:
                self.code = WARM.poll()
        return self.code

    def wait(self, timeout: float) -> int:
        """The exit status; this also lets the warm process take its next run."""
        with self.lock:
            if not self.finished:
                self.finished = True
                self.code = WARM.finish(self.pid, timeout)
        return self.code


class Section:
    """A section running as a learner runs it, typed at line by line: each line is sent
    when the section waits at a prompt, so the transcript puts it where a terminal would."""

    def __init__(self, path: Path, env: dict, cwd: Path):
        if os.environ.get("WARM_RUNS") != "0":
            self.proc = WarmChild(path, env, cwd)
        else:
            self.proc = subprocess.Popen(
                [sys.executable, str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=str(cwd),
                text=True,
                encoding="utf-8",
                bufsize=0,
            )
        self.out, self.typed, self.changed = "", [], threading.Condition()
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        while True:
            piece = self.proc.stdout.read(1)
            with self.changed:
                if not piece:
                    self.changed.notify_all()
                    return
                self.out += piece
                self.changed.notify_all()

    def wait_for(self, condition, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not condition(self.out):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self.reader.is_alive():
                    raise TimeoutError(f"waited for {what}; the section printed:\n{self.out}")
                self.changed.wait(min(left, 0.2))

    def at_prompt(self, out: str) -> bool:
        """Waiting at a prompt that nothing was typed at yet."""
        last = self.typed[-1][0] if self.typed else -1
        return out.endswith(PROMPTS) and len(out) > last

    def type(self, line: str) -> None:
        self.wait_for(self.at_prompt, "a prompt")
        time.sleep(0.05)  # let lines that are on their way land before the typed one
        self.wait_for(self.at_prompt, "a prompt")
        with self.changed:
            self.typed.append((len(self.out), line))
        self.proc.stdin.write(line + "\n")

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        self.proc.stdin.close()
        code = self.proc.wait(timeout)
        self.reader.join(5)
        return code, self.proc.stderr.read()

    def transcript(self) -> str:
        """The output with each typed line after its prompt. A prompt that was drawn again
        below a background line, with nothing typed at it, disappears, as it does in a
        terminal (where the line is printed over it)."""
        parts, start = [], 0
        typed_at = dict(self.typed)
        for match in re.finditer("|".join(re.escape(p) for p in PROMPTS), self.out):
            end = match.end()
            if end in typed_at:
                parts.append(self.out[start:end] + typed_at[end] + "\n")
                start = end
            elif self.out.startswith("\n", end):
                parts.append(self.out[start : match.start()])
                start = end + 1
        parts.append(self.out[start:])
        return "".join(parts)


def play(script: dict, path: Path, env: dict, cwd: Path, shown_command: str) -> list[str]:
    """Run the script's runs; return the blocks a lesson shows (the section's, then a chat's)."""
    tg = user = None
    blocks, chat_block = [], []
    if script.get("chat") == "telegram":
        tg = FakeTelegram(SCRIPT_TOKEN, SCRIPT_USERNAME).start()
        SHOWN_PORTS[tg.http.port] = DEFAULT_PORT
        user = TelegramUser(tg, show_typing=False)
        env = dict(env, **user.env())
        chat_block.append("$ python tests/fake_telegram.py")
        user.show_banner()
    try:
        for steps in script["runs"]:
            section = Section(path, env, cwd)
            if user:
                section.wait_for(lambda out: "Type a message" in out, "the banner")
                user.wait_for_gateway()
            for step in steps:
                if isinstance(step, str):
                    section.type(step)
                elif callable(step):
                    section.wait_for(section.at_prompt, "a prompt")
                    section.type(step(section.out))
                elif step[0] in ("say", "say_no_reply"):
                    user.say(step[1])
                    if step[0] == "say":
                        user.wait_for_reply()
                elif step[0] == "wait":
                    section.wait_for(lambda out, text=step[1]: text in out, repr(step[1]))
                elif step[0] == "reply":
                    user.wait_for_reply()
            code, err = section.finish()
            if code != 0 or "Traceback" in err:
                raise RuntimeError(f"{path.name} exited {code}:\n{err}")
            blocks.append(shown_command + "\n" + section.transcript().rstrip("\n"))
    finally:
        if tg:
            tg.stop()
    if user:
        chat_block.append(user.transcript.rstrip("\n"))
        return ["\n".join(blocks), "\n".join(chat_block)]
    return ["\n".join(blocks)]


def make_transcript(section: str, in_place: bool = False) -> list[str]:
    """The Try it blocks of one lesson, as they are shown (or, in_place, just played)."""
    path = next(p for p in section_files() if p.name.startswith(section))
    script = TRANSCRIPTS[section]
    api = FakeAnthropic().start()
    api.script(*script["steps"])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if in_place:  # the repository's own workspace and state folder, as a learner has
                workspace, state, cwd = REPO / "workspace", REPO / ".state", REPO
                env = isolated_env(workspace, api.base_url, **script.get("env", {}))
                env.update(WORKSPACE_DIR="", STATE_DIR="")
            else:
                workspace = copy_workspace(Path(tmp) / "workspace")
                state, cwd = Path(tmp) / "state", REPO
                env = isolated_env(workspace, api.base_url, **script.get("env", {}))
            shown_env = " ".join(f"{k}={v}" for k, v in script.get("shown_env", {}).items())
            command = f"$ {shown_env + ' ' if shown_env else ''}python {path.relative_to(REPO)}"
            setup = []
            for name, content in script.get("files", {}).items():  # files the learner wrote first
                folder, _, rest = name.partition("/")
                target = {".state": state, "workspace": workspace}[folder] / rest
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
                setup.append(f"$ cat > {name} <<'EOF'\n{content}EOF")
            blocks = play(script, path, env, cwd, command)
            if setup:
                blocks[0] = "\n".join(setup) + "\n" + blocks[0]
            for shown in sorted(state.glob(script.get("show", "-"))):
                blocks[0] += (
                    f"\n$ cat .state/{shown.relative_to(state)}\n" + shown.read_text().rstrip("\n")
                )
            return [normalize(block, workspace, api.base_url) + "\n" for block in blocks]
    finally:
        api.stop()


def normalize(text: str, workspace: Path, base_url: str) -> str:
    """What differs from run to run, shown as fixed example values."""
    text = text.replace(
        str(workspace.parent / "state"), SHOWN_WORKSPACE.rsplit("/", 1)[0] + "/.state"
    )
    text = text.replace(str(REPO / ".state"), SHOWN_WORKSPACE.rsplit("/", 1)[0] + "/.state")
    text = text.replace(str(workspace), SHOWN_WORKSPACE).replace(base_url, SHOWN_BASE_URL)
    # The fakes and the gateway listen on free ports with fresh tokens in a test.
    text = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{shown_port(int(m.group(1)))}", text)
    text = re.sub(r"#token=[\w-]+", f"#token={SHOWN_TOKEN}", text)
    text = re.sub(
        r"(pairing code is |/pair (?:approve|deny) |^  )[A-HJ-NP-Z2-9]{8}\b",
        lambda m: m.group(1) + SHOWN_PAIRING_CODE,
        text,
        flags=re.M,
    )
    # Session ids and timestamps differ on every run: show fixed example values.
    text = re.sub(r"\b\d{8}-\d{6}-[0-9a-f]{4}\b", "20261121-093000-7f3a", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", "2026-11-21T09:30:00+0000", text)
    text = re.sub(r"updated \d{4}-\d\d-\d\d \d\d:\d\d", "updated 2026-11-21 09:30", text)
    return text


def shown_port(port: int) -> int:
    """A fake's port as the learner's default; any other (the gateway's) as the gateway's."""
    if port in (DEFAULT_PORT, SHOWN_GATEWAY_PORT):
        return port
    return SHOWN_PORTS.get(port, SHOWN_GATEWAY_PORT)


def write_into_lesson(section: str, blocks: list[str]) -> Path:
    """Replace the first ```text blocks under "## Try it" in the section's lesson."""
    lesson = next(p for p in section_files() if p.name.startswith(section)).with_suffix(".md")
    text = lesson.read_text(encoding="utf-8")
    position = text.index("## Try it")
    for block in blocks:
        start = text.index("```text\n", position) + len("```text\n")
        end = text.index("```", start)
        text = text[:start] + block + text[end:]
        position = start + len(block) + 3
    lesson.write_text(text, encoding="utf-8")
    return lesson


if __name__ == "__main__":
    chosen = [word for word in sys.argv[1:] if re.fullmatch(r"s\d\d", word)]
    if "--all" in sys.argv or "--in-place" in sys.argv:  # play them in order (s01 ... or chosen)
        for path in section_files():
            if "--all" in sys.argv or path.name[:3] in chosen:
                make_transcript(path.name[:3], in_place="--in-place" in sys.argv)
        sys.exit(0)
    made = make_transcript(sys.argv[1])
    if "--write" in sys.argv:
        print(f"wrote the Try it blocks of {write_into_lesson(sys.argv[1], made)}")
    else:
        print("\n".join(made), end="")
