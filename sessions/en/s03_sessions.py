#!/usr/bin/env python3
"""s03 Sessions & context: JSONL append, replay, compact.

Every message is appended to a JSONL file as it happens, and replayed at
start-up, so a conversation survives a restart, a crash, and a torn last
line. Before each turn a ContextGuard estimates the prompt from what the last
call reported; past a share of the model's window it asks the model to
summarize the older part, keeps the recent part, and records the result, so
the context never overflows. /compact does the same on request.

New here:
  [s01] The agent loop — compact_and_retry
  [s03] Sessions: append on write, replay on read — is_valid_block, clean_message, add_message,
      tool_use_ids, repair_history, plural, Session, SessionStore, check_index, now_iso
  [s03] Context: count, and summarize before it overflows — characters, estimate_tokens,
      is_context_overflow, render_for_summary, turn_starts, ContextGuard
  [s03] Commands: sessions and context — session_line, new_session, list_sessions,
      switch_session, show_context, compact_now
Changed here:
  describe_api_error — names an overflow that compaction could not fix
  agent_turn — takes a Session, saves at each consistent point, lets the guard check and compact
  Repl, main — the REPL holds a session and the guard, resumed at start
Carried from earlier:
  [s01] Configuration · [s01] Errors, by type · [s01] The agent loop
  [s02] Tools: where they may reach · [s02] Tools: the handlers · [s02] Exec approvals
  [s02] Tools: what the model sees, and the dispatch table
  [s01] The REPL: one table of commands

Run:  python sessions/en/s03_sessions.py
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import anthropic
from dotenv import load_dotenv

try:
    import readline  # noqa: F401  (arrow keys and history for input(), where available)
except ImportError:
    pass


# --- [s01] Configuration ------------------------------------------------------
# .env sits at the repository root; variables already set in the environment win.
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
KEY_FROM_SHELL = bool(os.getenv("ANTHROPIC_API_KEY"))  # read before .env: where a bad key came from
load_dotenv(REPO_ROOT / ".env")


def number_setting(name: str, default: int | float, lowest: float = 1,
                   highest: float = float("inf")) -> int | float:
    """A number from .env or the environment, of the default's type, from lowest to highest.
    Anything else ends the program with a sentence and exit status 2, not a traceback."""
    text = os.getenv(name) or str(default)
    try:
        value = type(default)(text)
        if lowest <= value <= highest:  # also false for nan
            return value
    except ValueError:
        pass
    kind = "a whole number" if isinstance(default, int) else "a number"
    top = "" if highest == float("inf") else f" and at most {highest}"
    print(f"{name}={text!r} in .env or the environment: expected {kind} of at least {lowest}"
          f"{top} (the default is {default}).", file=sys.stderr)
    sys.exit(2)


SECTION = "s03 Sessions"
MODEL_ID = os.getenv("MODEL_ID") or "claude-sonnet-5-5"
API_KEY = os.getenv("ANTHROPIC_API_KEY") or ""
BASE_URL = os.getenv("ANTHROPIC_BASE_URL") or ""
MAX_TOKENS = number_setting("MAX_TOKENS", 8192)
SDK_MAX_RETRIES = 2  # the SDK itself retries 429, 5xx and dropped connections this often
WORKSPACE_DIR = Path(os.getenv("WORKSPACE_DIR") or REPO_ROOT / "workspace").resolve()
# The gateway's own files (approvals, sessions, tokens...): never inside the workspace.
STATE_DIR = Path(os.getenv("STATE_DIR") or REPO_ROOT / ".state").resolve()
MAX_TOOL_ROUNDS = 25        # model calls in one turn before the loop stops asking
BASH_TIMEOUT = number_setting("BASH_TIMEOUT", 30.0, 0.1, 300)
BASH_MAX_TIMEOUT = 300      # the model may ask for more time, never more than this
MAX_TOOL_OUTPUT = 20_000    # characters (or bytes) of one tool result; longer: the middle is cut
AGENT_ID = "main"
SESSIONS_ROOT = STATE_DIR / "sessions"  # one folder per agent: sessions/<agent id>/
CONTEXT_WINDOW = number_setting("CONTEXT_WINDOW", 1_000_000, 100)  # tokens the model reads at once
COMPACT_THRESHOLD = number_setting("COMPACT_THRESHOLD", 0.75, 0.1, 0.95)  # compact past this share
SYSTEM_PROMPT = ("You are a helpful assistant talking to one person in a terminal. Be concise. "
                 "You have tools to read and change files in your workspace (a folder on this "
                 "machine) and to run shell commands there; paths are relative to it.")

# Where older versions kept state inside the workspace: moved to STATE_DIR at start-up, and
# reserved: no tool may write there, or what it wrote would be taken for state.
OLD_STATE_PLACES = [(WORKSPACE_DIR / ".state", STATE_DIR),
                    (WORKSPACE_DIR / "gateway.json", STATE_DIR / "gateway.json")]

USE_COLOR = sys.stdout.isatty() and not os.getenv("NO_COLOR")


def dim(text: str) -> str:
    return f"\033[2m{text}\033[0m" if USE_COLOR else text


def make_client() -> anthropic.Anthropic:
    """The API client, or a one-sentence exit when nothing says where to send requests."""
    if not API_KEY and not BASE_URL:
        print("No API key: set ANTHROPIC_API_KEY in .env (copy .env.example to .env), "
              "or set ANTHROPIC_BASE_URL to a local Anthropic-compatible server.", file=sys.stderr)
        sys.exit(2)
    # A local server ignores the key, but the SDK wants one to build its headers.
    return anthropic.Anthropic(api_key=API_KEY or "local", base_url=BASE_URL or None,
                               max_retries=SDK_MAX_RETRIES)


# --- [s01] Errors, by type ----------------------------------------------------
def describe_api_error(exc: anthropic.APIError) -> str:
    """One readable line for a failed call, chosen by exception class and
    `error.type`, never by searching the message text."""
    if isinstance(exc, anthropic.APITimeoutError):
        return f"The request to {BASE_URL or 'the API'} timed out. Try again."
    if isinstance(exc, anthropic.APIConnectionError):
        return f"Cannot reach {BASE_URL or 'api.anthropic.com'}: is the network or local server up?"
    if not isinstance(exc, anthropic.APIStatusError):
        return f"API error: {exc}"
    kind = exc.type or ""  # `error.type` from the body; also set for errors sent mid-stream
    if isinstance(exc, anthropic.AuthenticationError) or kind == "authentication_error":
        where = "your shell's environment (it wins over .env)" if KEY_FROM_SHELL else ".env"
        return f"The API rejected the key (401). Check ANTHROPIC_API_KEY in {where}."
    if isinstance(exc, anthropic.PermissionDeniedError) or kind == "permission_error":
        return "This key may not use that model or feature (403)."
    if isinstance(exc, anthropic.NotFoundError) or kind == "not_found_error":
        return f"Not found (404): is MODEL_ID={MODEL_ID} a model this endpoint serves?"
    if isinstance(exc, anthropic.RateLimitError) or kind == "rate_limit_error":
        return "Rate limited (429): wait a moment, then send again."
    if isinstance(exc, anthropic.OverloadedError) or kind == "overloaded_error":
        return "The API is overloaded (529): try again in a moment."
    if is_context_overflow(exc):
        return ("The conversation is too long for the model, even after compaction: "
                "/new starts a fresh one.")
    label = f"{exc.status_code} {kind}".strip()
    return f"API error ({label}): {exc.api_message or exc.message}"


# --- [s01] The agent loop -----------------------------------------------------
def printable(text: str, keep_lines: bool = False) -> str:
    """Text that is safe to show at a terminal. Every character Python does not call printable
    (C0 and C1 controls such as ESC, DEL, bidi overrides such as U+202E, zero-width and other
    format characters) is shown as its escape, the way repr() writes it: ESC as \\x1b. A reply
    or a command can then never move the cursor, erase a line or recolour what the person
    reads. keep_lines: newlines and tabs stay as they are (a reply's lines), else they too
    are shown as \\n and \\t (one line that must stay one line)."""
    if text.isprintable():
        return text
    kept = "\n\t" if keep_lines else ""
    return "".join(ch if ch.isprintable() or ch in kept else repr(ch)[1:-1] for ch in text)


def stream_reply(client: anthropic.Anthropic, messages: list) -> anthropic.types.Message:
    """Send the conversation; print text as it arrives; return the whole message."""
    with client.messages.stream(model=MODEL_ID, max_tokens=MAX_TOKENS, system=SYSTEM_PROMPT,
                                tools=TOOLS, messages=messages) as stream:
        for text in stream.text_stream:
            print(printable(text, keep_lines=True), end="", flush=True)  # the model's words
        return stream.get_final_message()


def print_usage(message: anthropic.types.Message) -> None:
    u = message.usage
    read, written = u.cache_read_input_tokens or 0, u.cache_creation_input_tokens or 0
    prompt = u.input_tokens + read + written  # the whole prompt; `cached` of it came from cache
    cached = f"{read}" + (f" / written to cache {written}" if written else "")
    print(dim(f"[tokens in {prompt} / out {u.output_tokens} / cached {cached}"
              f" · stop {message.stop_reason}]"))


def assistant_content(message: anthropic.types.Message) -> list:
    """The reply as history blocks: text and tool_use, never an empty text block."""
    blocks = []
    for block in message.content:
        if block.type == "text" and block.text:
            blocks.append({"type": "text", "text": block.text})
        elif block.type == "tool_use":
            tool_input = block.input if isinstance(block.input, dict) else {}  # API needs an object
            blocks.append({"type": "tool_use", "id": block.id, "name": block.name,
                           "input": tool_input})
    return blocks


def as_blocks(content) -> list:
    """Message content as a list of blocks (the API also accepts a plain string)."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def add_user_text(messages: list, user_text: str) -> None:
    """Append the person's words. After an interrupted tool exchange the history
    already ends with a user message (the tool results): join it, so roles alternate."""
    if messages and messages[-1]["role"] == "user":
        joined = as_blocks(messages[-1]["content"]) + [{"type": "text", "text": user_text}]
        messages[-1] = {"role": "user", "content": joined}
    else:
        messages.append({"role": "user", "content": user_text})


def agent_turn(client: anthropic.Anthropic, session: Session, user_text: str,
               guard: ContextGuard | None = None) -> str | None:
    """One turn: as many model calls as the tools need. Returns the reply text, or
    None when the turn ended early (rolled back to the last consistent point).
    The session is saved at every consistent point."""
    guard = guard or ContextGuard(client)
    guard.check(session, user_text)
    messages = session.messages
    consistent = list(messages)  # the last point at which the history is whole
    add_user_text(messages, user_text)
    words_pending = True  # the person's words are not part of `consistent` yet
    compacted_once = False
    for _ in range(MAX_TOOL_ROUNDS):
        try:
            message = stream_reply(client, messages)
        except anthropic.APIError as exc:
            messages[:] = consistent  # roll back to the last consistent point
            if is_context_overflow(exc) and not compacted_once:
                compacted_once = True
                if compact_and_retry(session, guard, consistent, user_text, words_pending):
                    continue
            print(f"\n{describe_api_error(exc)}")
            return None
        except KeyboardInterrupt:
            messages[:] = consistent
            print("\n(interrupted; that turn was dropped)")
            return None
        except Exception as exc:  # the stream broke off: a dropped connection, bad tool JSON
            messages[:] = consistent
            print(f"\n(the reply broke off, {type(exc).__name__}: {printable(str(exc))[:200]}; "
                  "that turn was dropped)")
            return None
        guard.observe(session, message.usage)  # the prompt's real size, for the next check
        text = "".join(block.text for block in message.content if block.type == "text")
        if text:
            print()  # end the streamed line
        print_usage(message)
        reason = message.stop_reason
        if reason == "model_context_window_exceeded" and not compacted_once:
            compacted_once = True
            if compact_and_retry(session, guard, consistent, user_text, words_pending):
                continue
        if reason == "tool_use":
            results, interrupted = run_tool_calls(message.content)
            # The call and its results join the history together: it is whole again.
            messages.append({"role": "assistant", "content": assistant_content(message)})
            messages.append({"role": "user", "content": results})
            consistent = list(messages)
            words_pending = False
            session.save()
            if interrupted:
                print("(interrupted; what the tools did so far is kept in the history)")
                return None
            continue
        reply = finish_turn(messages, consistent, message, text)
        session.save()
        return reply
    print(f"(stopped after {MAX_TOOL_ROUNDS} model calls in one turn; "
          "send a message to let it go on)")
    return None


def compact_and_retry(session: Session, guard: ContextGuard, consistent: list, user_text: str,
                      words_pending: bool) -> bool:
    """The API said the prompt is too long: compact the consistent history, put
    the person's words back if they were not in it yet, and let the turn retry once."""
    as_it_was = list(session.messages)
    session.messages[:] = consistent
    if not guard.compact(session, "the model's context window overflowed"):
        session.messages[:] = as_it_was  # no retry: the caller goes on from where it was
        return False
    consistent[:] = session.messages
    if words_pending:
        add_user_text(session.messages, user_text)
    return True


def finish_turn(messages: list, consistent: list, message: anthropic.types.Message,
                text: str) -> str | None:
    """Keep a final reply that has text and ended normally or was cut off; drop anything else."""
    reason = message.stop_reason
    if reason == "refusal":
        print("(the model declined to answer; that turn was dropped)")
    elif not text:
        print(f"(empty reply, stop reason {reason}; that turn was dropped)")
    else:
        if reason == "max_tokens":
            print(f"(reply cut off: it reached MAX_TOKENS={MAX_TOKENS})")
        elif reason != "end_turn":
            print(f"(stopped: {reason})")
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        return text
    messages[:] = consistent  # an unusable reply: back to the last consistent point
    return None


# --- [s02] Tools: where they may reach ----------------------------------------
class ToolError(Exception):
    """A failure the model should read and act on; sent back with is_error: true."""


def safe_path(raw: str) -> Path:
    """Resolve a path the model gave; refuse anything outside the workspace.

    resolve() follows symlinks first, so a link that points outside is caught
    by the same is_relative_to check as "../x" or "/etc/passwd".
    """
    if not isinstance(raw, str) or not raw.strip():
        raise ToolError("path must be a non-empty string, relative to the workspace")
    try:
        path = (WORKSPACE_DIR / raw).resolve()
    except (OSError, ValueError) as exc:
        raise ToolError(f"bad path {raw!r}: {exc}")
    if not path.is_relative_to(WORKSPACE_DIR):
        raise ToolError(f"{raw!r} is outside the workspace; use a path inside {WORKSPACE_DIR}")
    if path.name == ".env":
        raise ToolError(f"{raw!r} is private: .env files hold secrets and are off limits")
    lowered = str(path).casefold()  # macOS and Windows do not tell .state from .STATE
    if any(lowered == str(old).casefold() or lowered.startswith(str(old).casefold() + os.sep)
           for old, _ in OLD_STATE_PLACES):
        # Where older versions kept state: what a tool wrote there would be taken for state.
        raise ToolError(f"{raw!r} is reserved: older versions kept the gateway's state there")
    return path


def prepare_folders() -> str | None:
    """Create the workspace and the owner-only state folder, and move state an older run
    left inside the workspace. Returns a sentence saying what to fix when they cannot be used."""
    if STATE_DIR.is_relative_to(WORKSPACE_DIR) or WORKSPACE_DIR.is_relative_to(STATE_DIR):
        return (f"STATE_DIR ({STATE_DIR}) and WORKSPACE_DIR ({WORKSPACE_DIR}) overlap, so the "
                "tools could reach the gateway's state: set them to two separate folders.")
    fresh = not STATE_DIR.exists()  # old state is taken over once: into a new state folder
    try:
        WORKSPACE_DIR.mkdir(parents=True, exist_ok=True)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        os.chmod(STATE_DIR, 0o700)
        probe = STATE_DIR / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        return (f"cannot use STATE_DIR {STATE_DIR} ({exc.strerror}): make it writable, "
                "or set STATE_DIR to another folder.")
    for old, new in OLD_STATE_PLACES:
        if old.exists() and fresh:
            move_old_state(old, new)
        elif old.exists():  # appeared later: maybe planted by a command; never taken for state
            print(dim(f"[state] {old} is not used: the gateway's state is in {STATE_DIR}. "
                      "Delete it when you no longer need it."))
    return None


def move_old_state(old: Path, new: Path) -> None:
    """State an earlier version kept in the workspace moves out, with a line (only when the
    state folder is new: later, a file there could have been put by a command the model ran)."""
    entries = list(old.iterdir()) if old.is_dir() else [old]
    moved = 0
    for entry in entries:
        target = new / entry.name if old.is_dir() else new
        if target.exists() or entry.is_symlink():
            continue  # what is there already wins; a link is never state (it could lead to /usr)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(entry), str(target))
        moved += 1
        for folder, dirs, files in os.walk(target):  # state is owner-only (links not followed)
            for path in [folder, *(os.path.join(folder, f) for f in files)]:
                if not os.path.islink(path):
                    os.chmod(path, 0o700 if os.path.isdir(path) else 0o600)
    if old.is_dir() and not any(old.iterdir()):
        old.rmdir()
    print(dim(f"[state] moved {moved} item(s) from {old} to {new}"))


def truncate(text: str, limit: int = MAX_TOOL_OUTPUT) -> str:
    """Keep the head and the tail of long output, and say how much was cut."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 2 // 3], text[-(limit // 3):]
    cut = len(text) - len(head) - len(tail)
    return f"{head}\n\n[... {cut} characters cut from the middle of {len(text)} ...]\n\n{tail}"


def write_atomic(path: Path, text: str, private: bool = True) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target:
    a crash leaves either the old file or the new one, never half of one.

    private: owner-only (0600), as the gateway's state files must be. The file tools pass
    False: an existing file keeps its mode, a new one gets the usual mode for the umask
    (0644 under umask 022). The text is written as it is: no newline is translated.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else None
    if not private:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)  # an existing file keeps its mode
        except FileNotFoundError:
            pass
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never write through something already there. 0o666 lets the umask decide,
    # as it does for any new file; fchmod then sets the mode the file must have, if any.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


READ_MAX_BYTES = MAX_TOOL_OUTPUT  # read_file reads at most this much: a larger file's head and tail
EDIT_MAX_BYTES = 1_000_000        # edit_file reads and rewrites a whole file: not a larger one


def read_bytes(path: Path, raw: str, limit: int) -> tuple[bytes, bytes, int]:
    """Read a regular file, at most `limit` bytes: (all of it, b"", 0), or for a larger one
    (its head, its tail, how many bytes between them were left out). Memory stays at `limit`
    whatever the file's size. Only a regular file: a FIFO blocks its reader until someone
    writes, a device may never end. O_NONBLOCK makes even opening a FIFO return at once,
    and fstat() looks at what was really opened, so a file swapped for a FIFO after
    safe_path() is refused all the same (O_NOFOLLOW: and so is a link that appeared since)."""
    if path.is_dir():
        raise ToolError(f"{raw} is a directory; use list_dir")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ToolError(f"file not found: {raw}")
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ToolError(f"{raw} is not a regular file (a FIFO, socket or device)")
        if size <= limit:
            return f.read(limit), b"", 0
        head = f.read(limit * 2 // 3)
        f.seek(size - limit // 3)
        tail = f.read(limit // 3)
    return head, tail, size - len(head) - len(tail)


def read_text(path: Path, raw: str, limit: int = EDIT_MAX_BYTES) -> str:
    """A whole UTF-8 file as it is (\r\n stays \r\n); refuses one over `limit` bytes."""
    data, _, cut = read_bytes(path, raw, limit)
    if cut:
        raise ToolError(f"{raw} is larger than the {limit} bytes this tool works on; "
                        "change it with a command instead (bash, e.g. sed)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolError(f"{raw} is not a UTF-8 text file")


# --- [s02] Tools: the handlers ------------------------------------------------
def read_file(path: str) -> str:
    head, tail, cut = read_bytes(safe_path(path), path, READ_MAX_BYTES)
    # A cut falls anywhere, even inside a character: the broken bytes at its edges are dropped.
    head_text = head.decode("utf-8", errors="replace").rstrip("\ufffd" if cut else "")
    if "\ufffd" in head_text:
        raise ToolError(f"{path} is not a UTF-8 text file")
    if not cut:
        return head_text
    tail_text = tail.decode("utf-8", errors="replace").lstrip("\ufffd")
    return (f"{head_text}\n\n[... {cut} bytes left out here; read them a part at a time with "
            f"bash: grep -n WORD {path}, or head -n / tail -n ...]\n\n{tail_text}")


def write_file(path: str, content: str) -> str:
    target = safe_path(path)
    if target.is_dir():
        raise ToolError(f"{path} is a directory")
    write_atomic(target, content, private=False)
    return f"wrote {len(content.encode('utf-8'))} bytes to {path}"


def edit_file(path: str, old_text: str, new_text: str) -> str:
    target = safe_path(path)
    text = read_text(target, path, EDIT_MAX_BYTES)
    count = text.count(old_text) if old_text else 0
    if count == 0 and "\r\n" in text and "\n" in old_text and "\r" not in old_text:
        # Windows line endings: the model quotes lines with \n. Match them as \r\n, and give
        # the new text the same endings, so the file keeps one style.
        old_text, new_text = (re.sub(r"(?<!\r)\n", "\r\n", t) for t in (old_text, new_text))
        count = text.count(old_text)
    if count == 0:
        raise ToolError(f"old_text not found in {path}; read the file and quote it exactly")
    if count > 1:
        raise ToolError(f"old_text occurs {count} times in {path}; "
                        "include more context so it is unique")
    write_atomic(target, text.replace(old_text, new_text, 1), private=False)
    return f"edited {path}: replaced 1 occurrence"


def describe_entry(entry: Path) -> str:
    """One line of list_dir. A link says where it leads, without following it out."""
    if entry.is_symlink():
        target = Path(os.path.realpath(entry))
        if not target.exists():
            return f"{entry.name}  (broken link)"
        if not target.is_relative_to(WORKSPACE_DIR):
            return f"{entry.name}  (link to outside the workspace)"
        return f"{entry.name}  (link to {target.relative_to(WORKSPACE_DIR)})"
    if entry.is_dir():
        return f"{entry.name}/"
    info = entry.lstat()
    kind = f"{info.st_size} bytes" if stat.S_ISREG(info.st_mode) else "FIFO, socket or device"
    return f"{entry.name}  ({kind})"


def list_dir(path: str = ".") -> str:
    target = safe_path(path)
    if not target.is_dir():
        raise ToolError(f"not a directory: {path}")
    lines = []
    for entry in sorted(target.iterdir()):
        if entry.name == ".env":
            continue  # secrets: not even the name is shown
        lines.append(describe_entry(entry))
    return truncate("\n".join(lines)) or "(empty)"  # a folder of a million files stays readable


# --- [s02] Exec approvals -----------------------------------------------------
APPROVALS_FILE = STATE_DIR / "exec-approvals.json"
APPROVAL_PROMPT = "  Allow? [o]nce / [a]lways / [d]eny > "
ANSWERS = {"o": "once", "once": "once", "a": "always", "always": "always",
           "d": "deny", "deny": "deny"}
# Characters that make a command line more than one plain program with plain words: shell
# operators, expansions, quoting by backslash, comments (#) and negation (!).
SHELL_OPERATORS = re.compile(r"[;&|<>`$(){}\n\\#!]")
GLOB_CHARACTERS = re.compile(r"[*?\[]")
NUMBER = re.compile(r"[+-]?[0-9]+[A-Za-z]{0,3}")  # 5, +5, -5, 10K, 2MiB: counts and sizes


@dataclass(frozen=True)
class ReadOnlyProgram:
    """One entry of the allow list: how a program may be called to run without asking.

    options: every option it may take, spelled out in full (an abbreviation of a long option
    is not on the list), each with the kind of value it takes: None (no value), "number",
    "text", "pattern" (grep's) or "path". None instead of a table: the program reads no
    options at all (echo: every word is text). operands: what its other words are: "path",
    "text", "+format" (date), or None when it takes none. pattern_first: the first operand
    is the pattern unless -e gave one (grep). dash_number: -NUM is a count (head -5).
    Anything else (an option not listed, a value of the wrong kind, a path outside the
    workspace, a FIFO) means "ask the person", never "run".

    Why this is still not a sandbox: it only decides which commands may run *without
    asking*. Whatever the person approves runs with all of their rights: it can read
    ~/.ssh, reach the network or delete the workspace. And even a command let through here
    is checked before it runs, not while it runs: between safe_path() resolving a path and
    the program opening it, another process could swap a folder for a symlink that points
    out (a race no check made in advance can close), and a hard link inside the workspace
    looks like any other file. A boundary that holds is enforced by the kernel while the
    command runs: a container, or bubblewrap (a mount namespace in which only the workspace
    exists), or Landlock (the process itself gives up access to every path but the
    workspace, for it and every child) would hold even for an approved command.
    """
    options: dict | None
    operands: str | None
    pattern_first: bool = False
    dash_number: bool = False


def option_table(spec: str) -> dict[str, str | None]:
    """'-n=number --lines=number -q' -> {'-n': 'number', '--lines': 'number', '-q': None}"""
    return {name: kind or None for name, _, kind in (word.partition("=") for word in spec.split())}


COUNT_OPTIONS = ("-n=number --lines=number -c=number --bytes=number -q --quiet --silent "
                 "-v --verbose -z --zero-terminated")
# The programs that run without asking, with every option each may take (GNU coreutils, grep
# and file). Left out on purpose, so they ask: recursion (ls -R, grep -r/-R, du -a), link
# following (-L, --dereference, ls -H), options that read a list of names or patterns from a
# file (date -f, file -f, grep -f, wc/du --files0-from, du -X), tail -f and --retry (they
# never end), date -s and a date operand (they set the clock), date -d (TZ="file" in its text
# opens a file), file -m/-C/-z (a magic file to load or write, decompressors to run).
READ_ONLY_PROGRAMS = {
    "ls": ReadOnlyProgram(option_table(
        "-a --all -A --almost-all -l -h --human-readable -1 -d --directory -F --classify -p "
        "-t -S -r --reverse -i --inode -s --size -n --numeric-uid-gid -g -o -G --no-group "
        "-c -u -U -v -X -b --escape -N --literal -Q --quote-name"), "path"),
    "cat": ReadOnlyProgram(option_table(
        "-A --show-all -b --number-nonblank -e -E --show-ends -n --number -s --squeeze-blank "
        "-t -T --show-tabs -u -v --show-nonprinting"), "path"),
    "head": ReadOnlyProgram(option_table(COUNT_OPTIONS), "path", dash_number=True),
    "tail": ReadOnlyProgram(option_table(COUNT_OPTIONS), "path", dash_number=True),
    "wc": ReadOnlyProgram(option_table(
        "-c --bytes -m --chars -l --lines -L --max-line-length -w --words"), "path"),
    "grep": ReadOnlyProgram(option_table(
        "-e=pattern --regexp=pattern -i --ignore-case -v --invert-match -w --word-regexp "
        "-x --line-regexp -F --fixed-strings -E --extended-regexp -G --basic-regexp "
        "-n --line-number -c --count -l --files-with-matches -L --files-without-match "
        "-H --with-filename -h --no-filename -o --only-matching -q --quiet --silent "
        "-s --no-messages -b --byte-offset -I -a --text -m=number --max-count=number "
        "-A=number --after-context=number -B=number --before-context=number "
        "-C=number --context=number"), "path", pattern_first=True, dash_number=True),
    "pwd": ReadOnlyProgram({}, None),
    "echo": ReadOnlyProgram(None, "text"),
    "date": ReadOnlyProgram(option_table(
        "-u --utc --universal -R --rfc-email -r=path --reference=path"), "+format"),
    "stat": ReadOnlyProgram(option_table(
        "-c=text --format=text --printf=text -t --terse -f --file-system"), "path"),
    "du": ReadOnlyProgram(option_table(
        "-s --summarize -h --human-readable --si -c --total -k -m -b --apparent-size "
        "-x --one-file-system -d=number --max-depth=number"), "path"),
    "file": ReadOnlyProgram(option_table(
        "-b --brief -i --mime --mime-type --mime-encoding -h --no-dereference "
        "-k --keep-going -N --no-pad"), "path"),
}
# Refused outright, whatever the person answers. A denylist is not a security
# boundary (there are endless ways to spell a command); it only catches the
# obvious disasters. The boundary is the approval prompt. Each reason completes
# the sentence "refused: this command ...".
DANGEROUS_PATTERNS = [
    (r"\brm\s+(-\w*\s+)*-\w*[rR]\w*\s+(-\w+\s+)*(/|~|\*|\.{1,2}/?)(\s|$)",
     "deletes /, ~, . or * recursively"),
    (r"\bmkfs(\.\w+)?\b", "formats a file system"),
    (r"\bdd\b.*\bof=/dev/", "writes a raw device"),
    (r">\s*/dev/(sd|nvme|hd|disk)", "overwrites a disk device"),
    (r":\(\)\s*\{\s*:\|:&\s*\};:", "starts a fork bomb"),
    (r"\b(shutdown|reboot|halt|poweroff)\b", "stops the machine"),
    (r"\b(curl|wget)\b[^|]*\|\s*(sudo\s+)?(ba|z)?sh\b", "runs a script straight from the network"),
    (r"\bchmod\s+(-\w+\s+)*-R\s+\d*7\d*\s+/", "opens up permissions across the system"),
]


def dangerous_reason(command: str) -> str | None:
    for pattern, reason in DANGEROUS_PATTERNS:
        if re.search(pattern, command):
            return reason
    return None


def is_plain_command(command: str) -> bool:
    """No shell operators, globs, ~ or characters that are not printable: what is left is
    split into words by bash exactly as shlex.split() splits it."""
    return (command.isprintable() and "~" not in command
            and not SHELL_OPERATORS.search(command) and not GLOB_CHARACTERS.search(command))


def parse_arguments(program: ReadOnlyProgram, words: list[str]) -> list[tuple[str, str]] | None:
    """Read a program's arguments the way its getopt does: clusters (-la), glued values (-n5,
    --lines=5), a value in the next word (-n 5), `--`, -NUM. Returns a (kind, value) pair per
    option value and per operand, or None when any word is not on the program's list."""
    found, operands, words = [], [], list(words)
    options_ended = program.options is None
    while words:
        word = words.pop(0)
        if options_ended or word == "-" or not word.startswith("-"):
            operands.append(word)  # GNU programs take options after operands too: keep going
        elif word == "--":
            options_ended = True
        elif word.startswith("--"):
            name, has_value, value = word.partition("=")
            if name not in program.options:
                return None  # unknown, or an abbreviation of a long option
            kind = program.options[name]
            if kind is None and has_value:
                return None
            if kind is not None:
                if not has_value:
                    if not words:
                        return None
                    value = words.pop(0)
                found.append((kind, value))
        elif program.dash_number and re.fullmatch(r"-[0-9]+", word):
            continue
        else:
            letters = word[1:]
            while letters:
                name, letters = "-" + letters[0], letters[1:]
                if name not in program.options:
                    return None
                kind = program.options[name]
                if kind is None:
                    continue
                if not letters:  # the value is the next word
                    if not words:
                        return None
                    letters = words.pop(0)
                found.append((kind, letters))  # the rest of the word is the value: -f../x
                break
    if program.pattern_first and operands and all(kind != "pattern" for kind, _ in found):
        found.append(("pattern", operands.pop(0)))
    if operands and program.operands is None:
        return None
    return found + [(program.operands, operand) for operand in operands]


def is_safe_argument(kind: str, value: str) -> bool:
    if kind == "number":
        return NUMBER.fullmatch(value) is not None
    if kind in ("text", "pattern"):
        return True  # never opened; is_plain_command has already checked every character
    if kind == "+format":
        return value.startswith("+")  # any other date operand sets the clock
    if kind != "path":
        return False
    try:
        path = safe_path(value)
    except ToolError:
        return False
    try:
        mode = path.stat().st_mode
    except OSError:
        return True  # not there: the program will say so
    # A FIFO blocks the reader until the timeout, and a device may never end.
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def is_read_only(command: str) -> bool:
    """True when the command is one plain call of a READ_ONLY_PROGRAMS program, with options
    from its list only, and every path it names inside the workspace: it runs without asking."""
    if not is_plain_command(command):
        return False
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    if not words or words[0] not in READ_ONLY_PROGRAMS:
        return False
    arguments = parse_arguments(READ_ONLY_PROGRAMS[words[0]], words[1:])
    return arguments is not None and all(is_safe_argument(k, v) for k, v in arguments)


def load_approvals() -> list[dict]:
    """The stored "always" answers: [{"command": the exact text approved, "scope": who said
    so}]. A file of any other shape (a corrupt one, or version 1's wide globs) approves
    nothing: it is moved aside with one line, not lost."""
    if not APPROVALS_FILE.exists():
        return []
    try:
        data = json.loads(APPROVALS_FILE.read_text(encoding="utf-8"))
        entries = data.get("always") if data.get("version") == 2 else None
        if isinstance(entries, list) and all(
                isinstance(e, dict) and set(e) == {"command", "scope", "files"}
                and isinstance(e["command"], str) and isinstance(e["scope"], str)
                and isinstance(e["files"], dict) for e in entries):
            return entries
        problem = 'is not {"version": 2, "always": [{"command", "scope", "files"}, ...]}'
    except (ValueError, AttributeError, RecursionError, OSError) as exc:  # not JSON, a folder...
        problem = f"cannot be read ({type(exc).__name__})"
    aside = APPROVALS_FILE.with_name(f"exec-approvals.corrupt-{time.time_ns()}.json")
    APPROVALS_FILE.replace(aside)
    print(dim(f"[approvals] {APPROVALS_FILE} {problem}; moved it to {aside.name}. "
              "Nothing is approved until you answer \"always\" again."))
    return []


def is_always_approved(command: str, scope: str) -> bool:
    """Only the exact command, from the same scope, while the files it named when it was
    approved are unchanged: "always" for `cat notes.md` never covers `cat notes.md ../.env`,
    and "always" for `bash test.sh` stops when test.sh changes or goes away."""
    for entry in load_approvals():
        if entry["command"] == command and entry["scope"] == scope:
            now = file_hashes(command)
            return all(now.get(name) == digest for name, digest in entry["files"].items())
    return False


def remember_always(command: str, scope: str) -> None:
    entry = {"command": command, "scope": scope, "files": file_hashes(command)}
    entries = [e for e in load_approvals() if e["command"] != command or e["scope"] != scope]
    write_atomic(APPROVALS_FILE, json.dumps({"version": 2, "always": entries + [entry]},
                                            indent=2) + "\n")


OUTPUT_REDIRECT = re.compile(r"(\d*|&)>>?\|?")  # > >> 2> &> >| ... : the next word is written


def file_hashes(command: str) -> dict[str, str]:
    """A fingerprint of the workspace files a command names (a script it runs, say). The model
    can rewrite them with write_file, so an approval holds only while they stay the same.
    A file the command writes to (`> out.txt`) or creates (`touch new.txt`) is not one of them:
    only files that exist now are fingerprinted, never a redirect's target."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    hashes, skip_next = {}, False
    for word in words:
        redirect = OUTPUT_REDIRECT.match(word)
        if skip_next or redirect:
            skip_next = bool(redirect) and redirect.end() == len(word)  # `> out`, not `>out`
            continue
        word = word.lstrip("<") or word  # `<input.txt` is read: fingerprint it
        try:
            path = safe_path(word)
            if path.is_file():  # a regular file (never a FIFO), its first megabyte
                with open(path, "rb") as f:
                    hashes[word] = hashlib.sha256(f.read(EDIT_MAX_BYTES)).hexdigest()
        except (ToolError, OSError):
            continue
    return hashes


def shown_command(command: str) -> str:
    """The command as the person must see it to judge it: escaped, long blank runs counted
    (they could push the start of the command off the screen), a long one as head ... tail."""
    text = re.sub(r" {4,}", lambda m: f"[{len(m.group())} spaces]", printable(command))
    if len(text) > 300:
        text = f"{text[:200]} [... {len(text) - 280} characters ...] {text[-80:]}"
    return text


def ask_person(command: str) -> str:
    """Ask at the terminal: "once", "always" or "deny". Ctrl-D is a deny; Ctrl-C is not caught
    here, so it drops the turn like Ctrl-C anywhere else; any other answer asks again."""
    print(f"  The model wants to run ({len(command)} characters): {shown_command(command)}")
    print("  (always: this exact command, from now on, while the files it names stay as they are)")
    while True:
        try:
            answer = input(APPROVAL_PROMPT).strip().lower()
        except EOFError:
            print()
            return "deny"
        except KeyboardInterrupt:
            print()  # the ^C stays on the prompt's line; what the turn says next starts below
            raise
        if answer in ANSWERS:
            return ANSWERS[answer]
        print("  Please answer o (run it once), a (always) or d (deny).")


def check_command(command: str, approve) -> None:
    """Raise ToolError unless this command may run now. `approve(command)` decides
    what is neither refused nor read-only: it returns, or raises ToolError."""
    reason = dangerous_reason(command)
    if reason:
        raise ToolError(f"refused: this command {reason}. It is never run, even with approval.")
    if is_read_only(command):
        return
    approve(command)


def approve_at_terminal(command: str) -> None:
    """The person at the terminal decides: a stored "always", or the prompt."""
    if is_always_approved(command, "terminal"):
        print(dim("  (runs without asking: you answered 'always' for this exact command)"))
        return
    answer = ask_person(command)
    if answer == "always":
        remember_always(command, "terminal")
        print(dim(f"  (stored in {APPROVALS_FILE.name}: this exact command runs without asking)"))
    elif answer == "deny":
        raise ToolError("the person denied this command. Do not retry it; "
                        "ask them what they want instead.")


# What a command inherits: these names (and LC_*), nothing else. A list of names to drop
# would miss secrets with other names (DATABASE_URL, GITHUB_PAT, a password inside
# ANTHROPIC_BASE_URL), and BASH_ENV or an exported BASH_FUNC_ls%% would change what even a
# plain `ls` runs.
CHILD_ENV_NAMES = {"PATH", "HOME", "LANG", "LANGUAGE", "TERM", "TZ", "USER", "LOGNAME", "SHELL",
                   "TMPDIR"}


def child_environment() -> dict:
    """The environment for shell commands: the variables CHILD_ENV_NAMES and LC_* name, and a
    PATH with only absolute folders outside the workspace, so `cat` can never mean a ./cat
    written there."""
    env = {name: value for name, value in os.environ.items()
           if name in CHILD_ENV_NAMES or re.fullmatch(r"LC_[A-Z]+", name)}
    folders = [folder for folder in env.get("PATH", "").split(os.pathsep) if os.path.isabs(folder)
               and not Path(os.path.realpath(folder)).is_relative_to(WORKSPACE_DIR)]
    env["PATH"] = os.pathsep.join(folders) or os.defpath  # an empty PATH would mean "."
    return env


class OutputKeeper:
    """The head and the tail of a command's output, and a count of what fell between them.
    Memory stays at `limit` bytes whatever the command prints (`yes` for the whole timeout)."""

    def __init__(self, limit: int):
        self.head, self.tail = bytearray(), bytearray()
        self.head_limit, self.tail_limit = limit * 2 // 3, limit // 3
        self.total = 0

    def keep(self, stream) -> None:
        """Read the stream to its end (in a thread of its own, while the command runs)."""
        for chunk in iter(lambda: stream.read1(65536), b""):
            self.total += len(chunk)
            room = self.head_limit - len(self.head)
            self.head += chunk[:max(room, 0)]
            self.tail += chunk[max(room, 0):]
            del self.tail[:-self.tail_limit]  # keep only the last tail_limit bytes

    def text(self) -> str:
        dropped = self.total - len(self.head) - len(self.tail)
        head, tail = (part.decode("utf-8", errors="replace") for part in (self.head, self.tail))
        if not dropped:
            return head + tail
        return f"{head}\n\n[... {dropped} bytes cut from the middle of {self.total} ...]\n\n{tail}"


def bash(command: str, timeout: float | None = None) -> str:
    """Run a command that check_command has let through (run_tool makes sure of that)."""
    limit = min(float(timeout or BASH_TIMEOUT), BASH_MAX_TIMEOUT)
    # A new session makes the command the leader of its own process group, so
    # one killpg() stops it and every child it started.
    proc = subprocess.Popen(["bash", "-c", command], cwd=WORKSPACE_DIR, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=child_environment(), start_new_session=True)
    output = OutputKeeper(MAX_TOOL_OUTPUT)
    reader = threading.Thread(target=output.keep, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=limit)
        status = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {limit:g}s; the command and its children were killed"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing it started outlives it
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    reader.join(1)  # a child that left the group (setsid) may hold the pipe: wait 1 s at most
    text = output.text()
    return f"{status}\n{text}" if text else status


# --- [s02] Tools: what the model sees, and the dispatch table -----------------
TOOLS = [
    {"name": "bash", "description": "Run a shell command in the workspace and return its exit "
     "code and output. Commands that change things wait for the person's approval.",
     "input_schema": {"type": "object", "properties": {
         "command": {"type": "string", "description": "The command line, run with bash -c."},
         "timeout": {"type": "number", "description": "Seconds before it is killed (default "
                     f"{BASH_TIMEOUT:g}, at most {BASH_MAX_TIMEOUT})."}},
         "required": ["command"]}},
    {"name": "read_file", "description": "Read a UTF-8 text file in the workspace.",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string", "description": "Path relative to the workspace."}},
         "required": ["path"]}},
    {"name": "write_file", "description": "Create or overwrite a text file in the workspace.",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string", "description": "Path relative to the workspace."},
         "content": {"type": "string", "description": "The whole new content."}},
         "required": ["path", "content"]}},
    {"name": "edit_file", "description": "Replace one exact, unique piece of text in a file.",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string", "description": "Path relative to the workspace."},
         "old_text": {"type": "string",
                      "description": "Text that occurs exactly once in the file."},
         "new_text": {"type": "string", "description": "What replaces it."}},
         "required": ["path", "old_text", "new_text"]}},
    {"name": "list_dir", "description": "List a folder of the workspace.",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string",
                  "description": "Folder relative to the workspace (default: the root)."}},
         "required": []}},
]
TOOL_HANDLERS = {"bash": bash, "read_file": read_file, "write_file": write_file,
                 "edit_file": edit_file, "list_dir": list_dir}
JSON_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool,
              "object": dict}


def check_arguments(name: str, tool_input: dict) -> None:
    """Compare the model's arguments with the tool's schema before calling it."""
    schema = next(t["input_schema"] for t in TOOLS if t["name"] == name)
    if not isinstance(tool_input, dict):
        raise ToolError(f"{name} takes an object of arguments")
    missing = [k for k in schema["required"] if k not in tool_input]
    unknown = [k for k in tool_input if k not in schema["properties"]]
    if missing or unknown:
        raise ToolError(f"{name}: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}; "
                        f"it takes {list(schema['properties'])}")
    for key, value in tool_input.items():
        expected = schema["properties"][key]["type"]
        is_bool = isinstance(value, bool) and expected != "boolean"  # True is an int to Python
        if not isinstance(value, JSON_TYPES[expected]) or is_bool:
            raise ToolError(f"{name}: {key} must be a {expected}")


def run_tool(name: str, tool_input: dict, approve=approve_at_terminal) -> tuple[str, bool]:
    """Run one tool call. Returns (content, is_error); never raises for a tool's failure.
    A shell command passes the approval gate first; `approve` is who decides."""
    if name not in TOOL_HANDLERS:
        return f"unknown tool {name!r}; the tools are {', '.join(TOOL_HANDLERS)}", True
    try:
        check_arguments(name, tool_input)
        if name == "bash":
            check_command(tool_input["command"], approve)
        return TOOL_HANDLERS[name](**tool_input), False
    except ToolError as exc:
        return str(exc), True
    except OSError as exc:
        return f"{name} failed: {exc.strerror or exc}", True
    except Exception as exc:  # a bug in a handler still answers the tool_use
        return f"{name} crashed: {type(exc).__name__}: {exc}", True


def preview(text: str) -> str:
    """The first line of a result, escaped (printable) and cut to fit one terminal line."""
    lines = text.splitlines() or [""]
    first = printable(lines[0])
    first = first if len(first) <= 80 else first[:77] + "..."
    return first + (f"  (+{len(lines) - 1} lines)" if len(lines) > 1 else "")


def run_tool_calls(content: list, approve=approve_at_terminal) -> tuple[list, bool]:
    """Answer every tool_use block with a tool_result, in order.

    Ctrl-C stops the tool that is running and skips the rest, but each call
    still gets its result, so the history stays one the API accepts.
    Returns (tool_result blocks, interrupted).
    """
    results, interrupted = [], False
    for block in content:
        if block.type != "tool_use":
            continue
        if interrupted:
            text, is_error = "not run: the person interrupted the turn", True
        else:
            args = printable(json.dumps(block.input, ensure_ascii=False))
            name = printable(block.name)
            print(dim(f"  → {name} {args if len(args) <= 100 else args[:97] + '...'}"))
            try:
                text, is_error = run_tool(block.name, block.input, approve)
            except KeyboardInterrupt:
                text, is_error, interrupted = "interrupted by the person", True, True
            print(dim(f"  {'✗' if is_error else '←'} {preview(text)}"))
        results.append({"type": "tool_result", "tool_use_id": block.id,
                        "content": text or "(no output)", "is_error": is_error})
    return results, interrupted


# --- [s03] Sessions: append on write, replay on read --------------------------
BLOCK_FIELDS = {"text": {"text": str}, "tool_use": {"id": str, "name": str, "input": dict},
                "tool_result": {"tool_use_id": str}}  # the block types a session holds


def is_valid_block(block) -> bool:
    fields = BLOCK_FIELDS.get(block.get("type")) if isinstance(block, dict) else None
    return fields is not None and all(isinstance(block.get(k), t) for k, t in fields.items())


def clean_message(message) -> dict | None:
    """A message from disk as the API will accept it, or None. Blocks of an unknown or
    broken shape (a hand-edited file, a bug) are dropped, not sent."""
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        return None
    content = message.get("content")
    if isinstance(content, str):
        return message if content else None
    if not isinstance(content, list):
        return None
    blocks = [b for b in content if is_valid_block(b)]
    if not blocks:
        return None
    return message if len(blocks) == len(content) else {"role": message["role"], "content": blocks}


def add_message(messages: list, message: dict) -> None:
    """Append while replaying. Two user lines in a row are one message that grew
    (add_user_text joined the person's words to the tool results): join them."""
    if messages and messages[-1]["role"] == message["role"] == "user":
        joined = as_blocks(messages[-1]["content"]) + as_blocks(message["content"])
        messages[-1] = {"role": "user", "content": joined}
    else:
        messages.append(message)


def tool_use_ids(message: dict) -> list:
    return [b["id"] for b in as_blocks(message["content"]) if b.get("type") == "tool_use"]


def repair_history(messages: list) -> tuple[list, list]:
    """Make a replayed history one the API accepts; return it with notes on what changed.

    Lines lost to corruption can leave a tool_use without its result, a result
    without its call, or two messages of one role in a row. Nothing that is
    whole is dropped: missing results are filled in as errors.
    """
    notes, fixed = [], []
    for message in messages:
        blocks = [b for b in as_blocks(message["content"])
                  if b.get("type") != "text" or b.get("text")]
        if message["role"] == "user":
            previous = fixed[-1] if fixed and fixed[-1]["role"] == "assistant" else None
            expected = set(tool_use_ids(previous)) if previous else set()
            orphans = [b for b in blocks if b.get("type") == "tool_result"
                       and b.get("tool_use_id") not in expected]
            if orphans:
                notes.append(f"dropped {plural(len(orphans), 'tool result')} whose call was lost")
                blocks = [b for b in blocks if b not in orphans]
        if not blocks or (not fixed and message["role"] == "assistant"):
            continue
        content = message["content"] if blocks == as_blocks(message["content"]) else blocks
        if fixed and fixed[-1]["role"] == message["role"]:
            joined = as_blocks(fixed[-1]["content"]) + blocks
            fixed[-1] = {"role": message["role"], "content": joined}
        else:
            fixed.append({"role": message["role"], "content": content})
    for i, message in enumerate(fixed):
        if message["role"] != "assistant" or not tool_use_ids(message):
            continue
        if i + 1 == len(fixed):
            fixed.append({"role": "user", "content": []})
        answer = as_blocks(fixed[i + 1]["content"])
        answered = {b.get("tool_use_id") for b in answer if b.get("type") == "tool_result"}
        missing = [tid for tid in tool_use_ids(message) if tid not in answered]
        if missing:
            notes.append(f"answered {plural(len(missing), 'tool call')} that had no result")
            filler = [{"type": "tool_result", "tool_use_id": tid, "is_error": True,
                       "content": "no result: the gateway stopped before this tool finished"}
                      for tid in missing]
            fixed[i + 1] = {"role": "user", "content": filler + answer}
    return fixed, notes


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class Session:
    """One conversation: its id, its messages, and how much of them is on disk.

    `saved` messages are in the file; of the last of them, `saved_blocks` blocks.
    Saving appends what is past that point, so a save costs what is new, never
    a pass over the whole history."""

    def __init__(self, store: SessionStore, session_id: str, messages: list):
        self.store, self.id, self.messages = store, session_id, messages
        self.mark_saved()
        self.prompt_tokens = None  # the prompt's size as the last API call reported it
        self.counted = 0           # how many messages that prompt held

    def mark_saved(self) -> None:
        self.saved = len(self.messages)
        self.saved_blocks = as_blocks(self.messages[-1]["content"]) if self.messages else []

    def save(self) -> None:
        self.store.append_new(self)

    def replace(self, messages: list, reason: str) -> None:
        """Swap in a rewritten history (a compaction) and record it as a snapshot."""
        self.messages[:] = messages
        self.store.write_snapshot(self, reason)


class SessionStore:
    """One append-only JSONL file per session, plus an index written atomically.

    Each line is one record: {"type": "message", "message": {...}} appends a
    message; {"type": "snapshot", "messages": [...]} replaces the history so far
    (written by a compaction). Replaying the lines in order rebuilds the list.
    The index (sessions.json) holds labels and which session is current; it is
    written when one of those changes, not on every turn.
    """

    def __init__(self, root: Path):
        self.root = root
        self.index_path = root / "sessions.json"
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.index = self.load_index()

    def load_index(self) -> dict:
        """The index, or one rebuilt from the session files if it is missing or unreadable.
        Fields it does not know (a later section's) are kept as they are."""
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
            check_index(index)
        except FileNotFoundError:
            index = {"current": None, "sessions": {}}
        except (ValueError, TypeError, RecursionError) as exc:
            aside = self.index_path.with_name(f"sessions.corrupt-{int(time.time())}.json")
            self.index_path.replace(aside)
            print(dim(f"[sessions] {self.index_path} is not valid ({exc}); "
                      f"moved it to {aside.name} and rebuilt it from the session files"))
            index = {"current": None, "sessions": {}}
        for path in sorted(self.root.glob("*.jsonl")):  # files the index does not know yet
            if SESSION_ID.fullmatch(path.stem):
                index["sessions"].setdefault(path.stem, {"label": None, "created": now_iso()})
        return index

    def write_index(self) -> None:
        write_atomic(self.index_path, json.dumps(self.index, indent=2, ensure_ascii=False) + "\n")

    def path(self, session_id: str) -> Path:
        return self.root / f"{session_id}.jsonl"

    def create(self, label: str | None = None) -> Session:
        session_id = self.new_file()
        self.index["sessions"][session_id] = {"label": label, "created": now_iso()}
        self.index["current"] = session_id
        self.write_index()
        return Session(self, session_id, [])

    def new_file(self) -> str:
        """A fresh session id and its empty file, created exclusively: two sessions started in
        the same second that draw the same suffix can never end up sharing one file."""
        while True:
            session_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
            try:
                os.close(os.open(self.path(session_id), os.O_CREAT | os.O_EXCL, 0o600))
                return session_id
            except FileExistsError:
                continue  # taken: draw again

    def open(self, session_id: str) -> Session:
        session = Session(self, session_id, self.replay(session_id))
        if self.index.get("current") != session_id:  # the index changes: write it
            self.index["current"] = session_id
            self.write_index()
        return session

    def resume(self) -> Session:
        """The session used last (after a rebuilt index: the one changed last), or a new one."""
        current = self.index.get("current")
        if current not in self.index["sessions"] or not self.path(current).exists():
            newest = self.listing()
            current = newest[0][0] if newest else None
        return self.open(current) if current else self.create()

    def replay(self, session_id: str) -> list:
        path, messages, damaged = self.path(session_id), [], False
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    kind = record["type"]
                except (ValueError, KeyError, TypeError, RecursionError):
                    print(dim(f"[sessions] {path.name}:{number}: "
                              "skipped a corrupt or half-written line"))
                    damaged = True
                    continue
                message = clean_message(record.get("message")) if kind == "message" else None
                if message:
                    add_message(messages, message)
                elif kind == "snapshot" and isinstance(record.get("messages"), list):
                    messages = [m for m in map(clean_message, record["messages"]) if m]
                else:
                    print(dim(f"[sessions] {path.name}:{number}: "
                              "skipped a record of unknown shape"))
                    damaged = True
        messages, notes = repair_history(messages)
        for problem in notes:
            print(dim(f"[sessions] {path.name}: {problem}"))
        if damaged or notes:
            self.rewrite_repaired(path, messages)
        return messages

    def rewrite_repaired(self, path: Path, messages: list) -> None:
        """Said once, not at every start: the file becomes one snapshot of what could be
        read, and the original is kept beside it (not a .jsonl, so never listed)."""
        kept = path.with_name(f"{path.stem}.damaged-{secrets.token_hex(3)}.bak")
        try:
            shutil.copyfile(path, kept)
            os.chmod(kept, 0o600)
            write_atomic(path, json.dumps({"type": "snapshot", "ts": now_iso(), "reason": "repair",
                                           "messages": messages}, ensure_ascii=False) + "\n")
            print(dim(f"[sessions] {path.name}: rewritten from what could be read; the "
                      f"original is kept as {kept.name}"))
        except OSError as exc:
            print(dim(f"[sessions] {path.name}: not rewritten ({exc.strerror}); "
                      "the same lines will be skipped next time"))

    def append(self, session_id: str, records: list) -> None:
        """Append records, one JSON object a line, and fsync: a crash tears at most the last."""
        path = self.path(session_id)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # end a torn line, so it cannot swallow this record
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def append_new(self, session: Session) -> None:
        """Append what is new since the last save. Messages are only ever added at the
        end, except that the open user message may grow; its new blocks are written as
        one more user line, which replay joins back on. Anything else is a rewrite,
        recorded as a snapshot."""
        messages, n = session.messages, session.saved
        records = []
        if n > len(messages):
            return self.write_snapshot(session, "rewrite")
        if n:
            old, now = session.saved_blocks, as_blocks(messages[n - 1]["content"])
            if now != old:
                if messages[n - 1]["role"] != "user" or now[:len(old)] != old:
                    return self.write_snapshot(session, "rewrite")
                grown = {"role": "user", "content": now[len(old):]}
                records.append({"type": "message", "ts": now_iso(), "message": grown})
        records += [{"type": "message", "ts": now_iso(), "message": m} for m in messages[n:]]
        if records:
            self.append(session.id, records)
            session.mark_saved()

    def write_snapshot(self, session: Session, reason: str) -> None:
        self.append(session.id, [{"type": "snapshot", "ts": now_iso(), "reason": reason,
                                  "messages": session.messages}])
        session.mark_saved()

    def find(self, query: str) -> list[str]:
        """Session ids matching an id, an id prefix, or a label prefix (any case)."""
        q = query.lower()
        return [sid for sid, entry in self.index["sessions"].items()
                if sid == query or sid.startswith(query)
                or (entry.get("label") or "").lower().startswith(q)]

    def listing(self) -> list[tuple[str, dict, float]]:
        """(id, index entry, last change) of every session, newest first. The time comes
        from the file, which every save touches, so the index need not be rewritten for it."""
        rows = []
        for sid, entry in self.index["sessions"].items():
            try:
                rows.append((sid, entry, self.path(sid).stat().st_mtime))
            except OSError:
                continue  # its file is gone: nothing to list
        return sorted(rows, key=lambda row: row[2], reverse=True)


def check_index(index) -> None:
    """Raise ValueError when sessions.json does not have the shape this section reads. Every
    id must look like one: an id becomes a file name ("../../x" must never)."""
    if not isinstance(index, dict) or not isinstance(index.get("sessions"), dict):
        raise ValueError("no 'sessions' object")
    current = index.get("current")
    if current is not None and not (isinstance(current, str) and SESSION_ID.fullmatch(current)):
        raise ValueError("'current' must be a session id or null")
    if not all(SESSION_ID.fullmatch(sid) and isinstance(e, dict)
               for sid, e in index["sessions"].items()):
        raise ValueError("every session must have an id like 20261121-093000-7f3a and an object")


SESSION_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{4}")  # what new_file() makes


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --- [s03] Context: count, and summarize before it overflows ------------------
SUMMARY_PREFIX = ("[Summary of the earlier part of this conversation, "
                  "written when it was compacted]")
SUMMARY_PROMPT = ("You summarize conversations between a person and an assistant with tools. "
                  "Keep every fact, decision, file name, open task and preference that later "
                  "turns may need. Be brief.")
KEEP_EXCHANGES = 4  # /compact keeps this many of the person's last messages and what followed
COUNT_MARGIN = 0.9  # past this share of the limit, the estimate is checked with count_tokens


def characters(value) -> int:
    return len(json.dumps(value, ensure_ascii=False))


def estimate_tokens(messages: list) -> int:
    """A rough count when the API cannot count: about three characters a token, erring high."""
    return (characters(messages) + len(SYSTEM_PROMPT) + characters(TOOLS)) // 3


def is_context_overflow(exc: anthropic.APIError) -> bool:
    """The API's overflow signal: a 400 invalid_request_error whose message begins
    "prompt is too long". The type narrows it first; the message prefix is the
    documented way to tell this 400 from the others."""
    return (isinstance(exc, anthropic.BadRequestError) and exc.type == "invalid_request_error"
            and (exc.api_message or "").lower().startswith("prompt is too long"))


def render_for_summary(messages: list) -> str:
    """The older part as plain text: tool calls and results shortened, so it fits one request."""
    lines = []
    for message in messages:
        for block in as_blocks(message["content"]):
            if block.get("type") == "text":
                lines.append(f"{message['role'].title()}: {block['text']}")
            elif block.get("type") == "tool_use":
                lines.append(f"Assistant called {block['name']} {json.dumps(block['input'])[:500]}")
            elif block.get("type") == "tool_result":
                lines.append(f"Tool result: {str(block.get('content'))[:1000]}")
    return truncate("\n".join(lines), limit=CONTEXT_WINDOW * 2)


def turn_starts(messages: list) -> list[int]:
    """Where the person's turns begin: user messages with words and no tool results.
    Cutting there never separates a tool_use from its tool_result."""
    starts = []
    for i, message in enumerate(messages):
        blocks = as_blocks(message["content"]) if message["role"] == "user" else []
        if any(b.get("type") == "text" for b in blocks) and \
                not any(b.get("type") == "tool_result" for b in blocks):
            starts.append(i)
    return starts


class ContextGuard:
    """Keeps the prompt below COMPACT_THRESHOLD of the model's window.

    Before a turn it estimates the prompt from what the last API call reported
    (its `usage`) plus the characters added since: no request of its own. Only
    when that estimate comes near the limit does it ask count_tokens for the
    real number; a local server without that endpoint gets a character
    estimate instead (once it answers 404, it is not asked again).
    """

    def __init__(self, client: anthropic.Anthropic):
        self.client = client
        self.can_count = True

    @property
    def limit(self) -> int:
        return int(CONTEXT_WINDOW * COMPACT_THRESHOLD)

    def count(self, messages: list) -> tuple[int, str]:
        if self.can_count:
            try:
                counted = self.client.messages.count_tokens(
                    model=MODEL_ID, system=SYSTEM_PROMPT, tools=TOOLS, messages=messages)
                return counted.input_tokens, "counted by the API"
            except anthropic.APIStatusError as exc:
                if exc.status_code in (404, 405, 501):
                    self.can_count = False  # this endpoint has no token counting
            except anthropic.APIConnectionError:
                pass
        return estimate_tokens(messages), "estimated from characters"

    def observe(self, session: Session, usage) -> None:
        """After a call: remember how big the prompt was, and how many messages it held."""
        session.prompt_tokens = (usage.input_tokens + (usage.cache_read_input_tokens or 0)
                                 + (usage.cache_creation_input_tokens or 0))
        session.counted = len(session.messages)

    def estimate(self, session: Session, user_text: str) -> int:
        """The next prompt's size: the last reported one plus what was added since, or,
        for a session no call has seen yet, a character estimate of all of it."""
        if session.prompt_tokens is None or session.counted > len(session.messages):
            session.prompt_tokens, session.counted = estimate_tokens(session.messages), len(
                session.messages)
        added = characters(session.messages[session.counted:]) + len(user_text)
        return session.prompt_tokens + added // 3

    def check(self, session: Session, user_text: str) -> None:
        """Before a turn: compact if the prompt, with the new words, would pass the limit."""
        tokens = self.estimate(session, user_text)
        if tokens > self.limit * COUNT_MARGIN:  # close: worth one request for the real number
            probe = list(session.messages)
            add_user_text(probe, user_text)
            tokens, _ = self.count(probe)
        if tokens > self.limit:
            if self.compact(session, f"{tokens:,} tokens is over the limit of {self.limit:,}"):
                self.still_over(session, user_text, lambda text: print(dim(text)))

    def still_over(self, session: Session, user_text: str, say) -> None:
        """After a compaction: if the turn that is kept, with the new words, is itself past the
        limit, say so (the API may refuse the turn) instead of staying silent."""
        left = self.estimate(session, user_text)
        if left > self.limit:
            say(f"[context] still about {left:,} tokens after compacting: the last exchange "
                "alone passes the limit, and the API may refuse it (/new starts afresh)")

    def cut_point(self, messages: list, keep_exchanges: int | None = None) -> int | None:
        """Where the kept part starts: at the start of one of the person's turns. Asked
        for by name (/compact): keep the last `keep_exchanges` turns. Automatic: keep
        as many recent turns as fit in a quarter of the limit, at least the last one."""
        starts = [i for i in turn_starts(messages) if i > 0]
        if keep_exchanges is not None:
            return starts[-keep_exchanges] if len(starts) >= keep_exchanges else None
        sizes = [characters(m) for m in messages]
        kept, budget = len(messages), self.limit // 4 * 3  # in characters, about 3 a token
        for i in reversed(starts):
            if sum(sizes[i:kept]) > budget:
                break
            budget -= sum(sizes[i:kept])
            kept = i
        return kept if kept < len(messages) else (starts[-1] if starts else None)

    def compact(self, session: Session, why: str, keep_exchanges: int | None = None) -> bool:
        """Summarize the older part with the model, keep the recent part, record a snapshot."""
        messages = session.messages
        cut = self.cut_point(messages, keep_exchanges)
        if cut is None:
            kept = (f" (it keeps your last {plural(keep_exchanges, 'exchange')})"
                    if keep_exchanges else "")
            print(dim(f"[context] nothing to compact yet{kept}"))
            return False
        print(dim(f"[context] compacting ({why}): summarizing "
                  f"{plural(cut, 'older message')}"))
        try:
            reply = self.client.messages.create(
                model=MODEL_ID, max_tokens=2048, system=SUMMARY_PROMPT,
                messages=[{"role": "user", "content": render_for_summary(messages[:cut])}])
        except anthropic.APIError as exc:
            print(f"Compaction failed: {describe_api_error(exc)}")
            return False
        except KeyboardInterrupt:
            print("\n(compaction interrupted; the session is as it was)")
            return False
        summary = "".join(b.text for b in reply.content if b.type == "text").strip()
        if not summary:
            print("Compaction failed: the model returned an empty summary.")
            return False
        before = len(messages)
        # The summary opens the first kept turn, so the history still starts with the person.
        first = [{"type": "text", "text": f"{SUMMARY_PREFIX}\n{summary}"}]
        first += as_blocks(messages[cut]["content"])
        session.replace([{"role": "user", "content": first}] + messages[cut + 1:], "compaction")
        session.prompt_tokens = None  # the next check estimates the new, shorter history
        print(dim(f"[context] compacted: {before} messages -> {len(session.messages)}"))
        return True


# --- [s03] Commands: sessions and context -------------------------------------
def session_line(session: Session, how: str) -> str:
    label = session.store.index["sessions"].get(session.id, {}).get("label")
    return (f"Session {session.id}{f' ({label})' if label else ''}: {how}, "
            f"{plural(len(session.messages), 'message')}")


def new_session(repl: Repl, arg: str) -> None:
    repl.session = repl.session.store.create(arg or None)
    print(session_line(repl.session, "new"))


def list_sessions(repl: Repl, arg: str) -> None:
    for sid, entry, changed in repl.session.store.listing():
        mark = "*" if sid == repl.session.id else " "
        label = f" ({entry['label']})" if entry.get("label") else ""
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(changed))
        print(f"  {mark} {sid}{label}  updated {when}")


def switch_session(repl: Repl, arg: str) -> None:
    matches = repl.session.store.find(arg) if arg else []
    if len(matches) == 1:
        repl.session = repl.session.store.open(matches[0])
        print(session_line(repl.session, "switched"))
    elif not arg:
        print("Usage: /switch <id, id prefix or label prefix>")
    elif not matches:
        print(f"No session matches {arg!r}; /list shows them.")
    else:
        print(f"{arg!r} matches {len(matches)} sessions: {', '.join(matches)}. Say which.")


def show_context(repl: Repl, arg: str) -> None:
    session, guard = repl.session, repl.guard
    tokens, how = guard.count(session.messages) if session.messages else (0, "empty")
    print(f"Context: {tokens:,} tokens ({how}) of a {CONTEXT_WINDOW:,}-token window; "
          f"compaction at {guard.limit:,} ({COMPACT_THRESHOLD:.0%}); "
          f"{plural(len(session.messages), 'message')}")


def compact_now(repl: Repl, arg: str) -> None:
    repl.guard.compact(repl.session, "asked for with /compact", keep_exchanges=KEEP_EXCHANGES)


# --- [s01] The REPL: one table of commands ------------------------------------
@dataclass
class Repl:
    """What the REPL's commands work on."""
    client: anthropic.Anthropic
    session: Session
    guard: ContextGuard


def show_help(repl: Repl, arg: str) -> None:
    usage = {name: f"{name} {args}".strip() for name, (_, args, _) in COMMANDS.items()}
    width = min(max(len("quit, exit"), *map(len, usage.values())), 24)  # a longer one overruns
    print("Commands:")
    for name, (_, _, text) in COMMANDS.items():
        print(f"  {usage[name]:<{width}}  {text}")
    print(f"  {'quit, exit':<{width}}  leave (Ctrl-D and Ctrl-C work too)")
    print("Anything else is sent to the model.")


# The dispatch-table idea of s02, applied to the REPL: /name -> (handler, arguments, help).
COMMANDS = {
    "/new": (new_session, "[label]", "start a new session (the old one stays on disk)"),
    "/list": (list_sessions, "", "list the sessions, newest first"),
    "/switch": (switch_session, "X", "switch to a session by id, id prefix or label prefix"),
    "/context": (show_context, "", "how full the model's context window is"),
    "/compact": (compact_now, "", f"summarize all but the last {KEEP_EXCHANGES} exchanges now"),
    "/help": (show_help, "", "show this list"),
}


def run_command(repl: Repl, line: str) -> None:
    name, _, arg = line.partition(" ")
    if name not in COMMANDS:
        print(f"Unknown command {name}; /help lists the commands.")
        return
    handler = COMMANDS[name][0]
    try:
        handler(repl, arg.strip())
    except Exception as exc:  # a command's bug is one line; the REPL (and its gateway) goes on
        print(f"{name} failed: {type(exc).__name__}: {printable(str(exc))}")


def main() -> int:
    client = make_client()
    problem = prepare_folders()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # a non-UTF-8 byte becomes U+FFFD, not a crash
    print(f"{SECTION} · model {MODEL_ID} · base URL {BASE_URL or 'https://api.anthropic.com'}")
    print(f"Workspace: {WORKSPACE_DIR} ({len(TOOLS)} tools) · state: {STATE_DIR}")
    repl = Repl(client, SessionStore(SESSIONS_ROOT / AGENT_ID).resume(), ContextGuard(client))
    print(session_line(repl.session, "resumed" if repl.session.messages else "new"))
    print("Type a message, /help for commands, quit to leave.")
    while True:
        try:
            user_text = input("You > ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not user_text:
            continue
        if user_text.lower() in ("quit", "exit"):
            break
        if user_text.startswith("/"):
            run_command(repl, user_text)
            continue
        agent_turn(client, repl.session, user_text, repl.guard)
    print("Bye.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
