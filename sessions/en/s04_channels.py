#!/usr/bin/env python3
"""s04 Channels: every platform becomes one InboundMessage.

The same agent answers on Telegram and Feishu too. Each platform's message
becomes one InboundMessage; a message bus hands it to a worker thread, which
runs the turn in that chat's own session with a ChatReply as its `out`, and
sends the reply back through the channel it came from. Only allow-listed or
paired senders get through, and commands they ask for wait for the
operator's approval at the terminal.

New here:
  [s04] Output: who reads a turn — TerminalOutput, log, print_in_background, Burst,
      print_held_lines
  [s04] Channels: every platform becomes one InboundMessage — InboundMessage, ChannelError,
      split_message, open_fence, find_cut, Channel, TerminalChannel, allow_list
  [s04] Telegram: long polling with python-telegram-bot — TelegramChannel
  [s04] Feishu / Lark: a webhook in, HTTPS calls out — FeishuWebhook, WebhookServer,
      FeishuChannel
  [s04] Who may talk: allow lists and pairing — Pairing
  [s04] Approvals for remote chats — ApprovalQueue, ChatReply
  [s04] The bus: from channels to worker threads, and replies back — MessageBus
  [s04] Commands: channels, pairing, approvals — show_channels, pair, show_approvals,
      approve_request, deny_request, answer_request
  [s01] The REPL: one table of commands — shut_down
Changed here:
  stream_reply — words go to `out`, the terminal or a chat's reply
  print_usage — the usage line is a note on `out`
  agent_turn — takes `out`: who reads this turn
  compact_and_retry — passes `out` on
  finish_turn — says its verdicts on `out`
  run_tool_calls — notes and approvals go through `out`
  SessionStore — maps each remote chat to its session (`keys`, for_key); a lock for the workers
  check_index — checks the `keys` map too
  ContextGuard — its notes go to the turn's `out`
  Repl — holds the bus too
  main — starts the channels and the bus, and stops them on the way out
Carried from earlier:
  [s01] Configuration · [s01] Errors, by type · [s01] The agent loop
  [s02] Tools: where they may reach · [s02] Tools: the handlers · [s02] Exec approvals
  [s02] Tools: what the model sees, and the dispatch table
  [s03] Sessions: append on write, replay on read
  [s03] Context: count, and summarize before it overflows · [s03] Commands: sessions and context
  [s01] The REPL: one table of commands

Run:  python sessions/en/s04_channels.py
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
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
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
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


SECTION = "s04 Channels"
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
SYSTEM_PROMPT = ("You are a helpful assistant that people reach from a terminal or a chat app. "
                 "Be concise. "
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


def stream_reply(client: anthropic.Anthropic, messages: list,
                 out: TerminalOutput) -> anthropic.types.Message:
    """Send the conversation; pass text on as it arrives; return the whole message."""
    with client.messages.stream(model=MODEL_ID, max_tokens=MAX_TOKENS, system=SYSTEM_PROMPT,
                                tools=TOOLS, messages=messages) as stream:
        for text in stream.text_stream:
            out.say(text, end="")
        return stream.get_final_message()


def print_usage(message: anthropic.types.Message, out: TerminalOutput) -> None:
    u = message.usage
    read, written = u.cache_read_input_tokens or 0, u.cache_creation_input_tokens or 0
    prompt = u.input_tokens + read + written  # the whole prompt; `cached` of it came from cache
    cached = f"{read}" + (f" / written to cache {written}" if written else "")
    out.note(f"[tokens in {prompt} / out {u.output_tokens} / cached {cached}"
             f" · stop {message.stop_reason}]")


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
               guard: ContextGuard | None = None, out: TerminalOutput | None = None) -> str | None:
    """One turn: as many model calls as the tools need. Returns the reply text, or
    None when the turn ended early (rolled back to the last consistent point).
    The session is saved at every consistent point. `out` is who reads the turn:
    the terminal, or a remote chat's reply (s04)."""
    guard, out = guard or ContextGuard(client), out or TERMINAL
    guard.check(session, user_text, out)
    messages = session.messages
    consistent = list(messages)  # the last point at which the history is whole
    add_user_text(messages, user_text)
    words_pending = True  # the person's words are not part of `consistent` yet
    compacted_once = False
    for _ in range(MAX_TOOL_ROUNDS):
        try:
            message = stream_reply(client, messages, out)
        except anthropic.APIError as exc:
            messages[:] = consistent  # roll back to the last consistent point
            if is_context_overflow(exc) and not compacted_once:
                compacted_once = True
                if compact_and_retry(session, guard, consistent, user_text, words_pending, out):
                    continue
            out.say(f"\n{describe_api_error(exc)}")
            return None
        except KeyboardInterrupt:
            messages[:] = consistent
            print("\n(interrupted; that turn was dropped)")
            return None
        except Exception as exc:  # the stream broke off: a dropped connection, bad tool JSON
            messages[:] = consistent
            out.say(f"\n(the reply broke off, {type(exc).__name__}: {printable(str(exc))[:200]}; "
                    "that turn was dropped)")
            return None
        guard.observe(session, message.usage)  # the prompt's real size, for the next check
        text = "".join(block.text for block in message.content if block.type == "text")
        if text:
            out.say()  # end the streamed line
        print_usage(message, out)
        reason = message.stop_reason
        if reason == "model_context_window_exceeded" and not compacted_once:
            compacted_once = True
            if compact_and_retry(session, guard, consistent, user_text, words_pending, out):
                continue
        if reason == "tool_use":
            results, interrupted = run_tool_calls(message.content, out)
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
        reply = finish_turn(messages, consistent, message, text, out)
        session.save()
        return reply
    out.say(f"(stopped after {MAX_TOOL_ROUNDS} model calls in one turn; "
            "send a message to let it go on)")
    return None


def compact_and_retry(session: Session, guard: ContextGuard, consistent: list, user_text: str,
                      words_pending: bool, out: TerminalOutput) -> bool:
    """The API said the prompt is too long: compact the consistent history, put
    the person's words back if they were not in it yet, and let the turn retry once."""
    as_it_was = list(session.messages)
    session.messages[:] = consistent
    if not guard.compact(session, "the model's context window overflowed", out=out):
        session.messages[:] = as_it_was  # no retry: the caller goes on from where it was
        return False
    consistent[:] = session.messages
    if words_pending:
        add_user_text(session.messages, user_text)
    return True


def finish_turn(messages: list, consistent: list, message: anthropic.types.Message,
                text: str, out: TerminalOutput) -> str | None:
    """Keep a final reply that has text and ended normally or was cut off; drop anything else."""
    reason = message.stop_reason
    if reason == "refusal":
        out.say("(the model declined to answer; that turn was dropped)")
    elif not text:
        out.say(f"(empty reply, stop reason {reason}; that turn was dropped)")
    else:
        if reason == "max_tokens":
            out.say(f"(reply cut off: it reached MAX_TOKENS={MAX_TOKENS})")
        elif reason != "end_turn":
            out.say(f"(stopped: {reason})")
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


def run_tool_calls(content: list, out: TerminalOutput) -> tuple[list, bool]:
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
            out.note(f"  → {name} {args if len(args) <= 100 else args[:97] + '...'}")
            try:
                text, is_error = run_tool(block.name, block.input, out.approve)
            except KeyboardInterrupt:
                text, is_error, interrupted = "interrupted by the person", True, True
            out.note(f"  {'✗' if is_error else '←'} {preview(text)}")
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
    written when one of those changes, not on every turn. It also maps each
    remote chat to its session ("keys").
    """

    def __init__(self, root: Path):
        self.root = root
        self.index_path = root / "sessions.json"
        self.by_key: dict[str, Session] = {}  # remote chats' sessions, open in memory
        self.lock = threading.RLock()  # worker threads and the terminal share the index
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
            log(f"[sessions] {self.index_path} is not valid ({exc}); "
                f"moved it to {aside.name} and rebuilt it from the session files")
            index = {"current": None, "sessions": {}}
        for path in sorted(self.root.glob("*.jsonl")):  # files the index does not know yet
            if SESSION_ID.fullmatch(path.stem):
                index["sessions"].setdefault(path.stem, {"label": None, "created": now_iso()})
        if "keys" not in index:  # an index written by s03, which had no remote chats
            index["keys"] = {}
        return index

    def write_index(self) -> None:
        with self.lock:
            text = json.dumps(self.index, indent=2, ensure_ascii=False) + "\n"
            write_atomic(self.index_path, text)

    def path(self, session_id: str) -> Path:
        return self.root / f"{session_id}.jsonl"

    def create(self, label: str | None = None, key: str | None = None) -> Session:
        session_id = self.new_file()
        with self.lock:
            self.index["sessions"][session_id] = {"label": label, "created": now_iso()}
            if key is None:
                self.index["current"] = session_id  # the terminal resumes this one next time
            else:
                self.index["keys"][key] = session_id
            self.write_index()
        return Session(self, session_id, [])

    def for_key(self, key: str, fresh: bool = False) -> Session:
        """The session of one remote chat, opened once and kept in memory; created
        on first contact, or anew when `fresh` (the chat sent /new)."""
        with self.lock:
            if key in self.by_key and not fresh:
                return self.by_key[key]
            keys = self.index["keys"]
            # s04 names a chat "telegram:direct:42", s05 on "agent:main:telegram:direct:42":
            # each finds the chat the other one kept, so going back and forth loses nothing.
            session_id = (keys.get(key) or keys.get(f"agent:{AGENT_ID}:{key}")
                          or keys.get(key.removeprefix(f"agent:{AGENT_ID}:")))
            if fresh or session_id is None or not self.path(session_id).exists():
                session = self.create(key, key=key)
            else:
                session = Session(self, session_id, self.replay(session_id))
            self.by_key[key] = session
            return session

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
                    log(f"[sessions] {path.name}:{number}: skipped a corrupt or half-written line")
                    damaged = True
                    continue
                message = clean_message(record.get("message")) if kind == "message" else None
                if message:
                    add_message(messages, message)
                elif kind == "snapshot" and isinstance(record.get("messages"), list):
                    messages = [m for m in map(clean_message, record["messages"]) if m]
                else:
                    log(f"[sessions] {path.name}:{number}: skipped a record of unknown shape")
                    damaged = True
        messages, notes = repair_history(messages)
        for problem in notes:
            log(f"[sessions] {path.name}: {problem}")
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
            log(f"[sessions] {path.name}: rewritten from what could be read; the original "
                f"is kept as {kept.name}")
        except OSError as exc:
            log(f"[sessions] {path.name}: not rewritten ({exc.strerror}); the same lines "
                "will be skipped next time")

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
        """Session ids matching an id, an id prefix, or a label prefix (any case).
        A remote chat's current session is left out: that chat is still using it."""
        q, remote = query.lower(), set(self.index["keys"].values())
        return [sid for sid, entry in self.index["sessions"].items() if sid not in remote and
                (sid == query or sid.startswith(query)
                 or (entry.get("label") or "").lower().startswith(q))]

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
    keys = index.get("keys", {})
    if not isinstance(keys, dict) or not all(isinstance(v, str) and SESSION_ID.fullmatch(v)
                                             for v in keys.values()):
        raise ValueError("'keys' must map chats to session ids")


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

    def check(self, session: Session, user_text: str, out: TerminalOutput) -> None:
        """Before a turn: compact if the prompt, with the new words, would pass the limit."""
        tokens = self.estimate(session, user_text)
        if tokens > self.limit * COUNT_MARGIN:  # close: worth one request for the real number
            probe = list(session.messages)
            add_user_text(probe, user_text)
            tokens, _ = self.count(probe)
        if tokens > self.limit:
            if self.compact(session, f"{tokens:,} tokens is over the limit of {self.limit:,}",
                            out=out):
                self.still_over(session, user_text, out.note)

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

    def compact(self, session: Session, why: str, keep_exchanges: int | None = None,
                out: TerminalOutput | None = None) -> bool:
        """Summarize the older part with the model, keep the recent part, record a snapshot."""
        out = out or TERMINAL
        messages = session.messages
        cut = self.cut_point(messages, keep_exchanges)
        if cut is None:
            kept = (f" (it keeps your last {plural(keep_exchanges, 'exchange')})"
                    if keep_exchanges else "")
            out.note(f"[context] nothing to compact yet{kept}")
            return False
        out.note(f"[context] compacting ({why}): summarizing {plural(cut, 'older message')}")
        try:
            reply = self.client.messages.create(
                model=MODEL_ID, max_tokens=2048, system=SUMMARY_PROMPT,
                messages=[{"role": "user", "content": render_for_summary(messages[:cut])}])
        except anthropic.APIError as exc:
            out.say(f"Compaction failed: {describe_api_error(exc)}")
            return False
        except KeyboardInterrupt:
            print("\n(compaction interrupted; the session is as it was)")
            return False
        summary = "".join(b.text for b in reply.content if b.type == "text").strip()
        if not summary:
            out.say("Compaction failed: the model returned an empty summary.")
            return False
        before = len(messages)
        # The summary opens the first kept turn, so the history still starts with the person.
        first = [{"type": "text", "text": f"{SUMMARY_PREFIX}\n{summary}"}]
        first += as_blocks(messages[cut]["content"])
        session.replace([{"role": "user", "content": first}] + messages[cut + 1:], "compaction")
        session.prompt_tokens = None  # the next check estimates the new, shorter history
        out.note(f"[context] compacted: {before} messages -> {len(session.messages)}")
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


# --- [s04] Output: who reads a turn -------------------------------------------
# A turn typed at the terminal prints as before. A turn for a remote chat runs on
# a worker thread; its words go back to that chat, and the terminal only gets
# dim log lines. agent_turn is handed the object that knows which (`out`), so
# nothing deep in a turn has to guess where its words go.
console_lock = threading.Lock()
at_prompt = threading.Event()  # set while the REPL waits for the person to type
held_lines: list[str] = []     # background lines that arrived while a terminal turn printed
PROMPT = "You > "


class TerminalOutput:
    """The person at the keyboard: words stream to the screen, notes are dim,
    and a command that needs approval is asked about right here."""

    def say(self, text: str = "", end: str = "\n") -> None:
        print(printable(text, keep_lines=True), end=end, flush=True)

    def note(self, text: str) -> None:
        print(dim(text))

    def approve(self, command: str) -> None:
        approve_at_terminal(command)


TERMINAL = TerminalOutput()


def log(text: str) -> None:
    """A dim line for the operator, from any thread: what the gateway is doing."""
    if threading.current_thread() is threading.main_thread():
        print(dim(text))
    else:
        print_in_background(dim(text))


def print_in_background(line: str) -> None:
    """Print a line from another thread without wrecking what the person types:
    at the prompt, it goes above the prompt and the prompt is drawn again; while
    a terminal turn is printing, it waits until that turn is done."""
    with console_lock:
        if not at_prompt.is_set():
            held_lines.append(line)
        elif sys.stdin.isatty() and "readline" in sys.modules:
            sys.stdout.write(f"\r\033[K{line}\n{PROMPT}{readline.get_line_buffer()}")
            sys.stdout.flush()
        else:  # not a terminal: end the prompt's line, print, and show the prompt again
            sys.stdout.write(f"\n{line}\n{PROMPT}")
            sys.stdout.flush()


class Burst:
    """One terminal line per burst: after a line, more of the same kind within `quiet` seconds
    are only counted, and the next line says how many. A flood (of strangers, of refused
    requests) cannot push what matters off the operator's screen."""

    def __init__(self, quiet: float = 30.0):
        self.quiet, self.until, self.count = quiet, 0.0, 0
        self.lock = threading.Lock()

    def line(self, text: str) -> str | None:
        """The line to print now (with a count of what was held back), or None."""
        with self.lock:
            if time.monotonic() < self.until:
                self.count += 1
                return None
            self.until = time.monotonic() + self.quiet
            held, self.count = self.count, 0
        return f"{text} (and {held} more like it before)" if held else text


def print_held_lines() -> None:
    with console_lock:
        for line in held_lines:
            print(line)
        held_lines.clear()


# --- [s04] Channels: every platform becomes one InboundMessage ----------------
@dataclass
class InboundMessage:
    """One message from any platform, in one shape. Past the channel that made
    it, nothing looks at a platform's own format again (it stays in `raw`)."""
    channel: str                # "terminal", "telegram", "feishu"
    account: str                # which bot or app received it
    peer: str                   # where the reply goes: a chat, or the sender of a direct message
    sender: str                 # who wrote it: the platform's id for the person
    text: str
    sender_name: str = ""
    is_group: bool = False      # a group chat, or a direct one
    thread: str | None = None   # a Telegram forum topic
    media: str | None = None    # "photo", "file"...: something came along with the words
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def session_key(self) -> str:
        """One session per chat: "telegram:direct:42", "feishu:group:oc_7",
        "telegram:group:-100:topic:3"."""
        key = f"{self.channel}:{'group' if self.is_group else 'direct'}:{self.peer}"
        return f"{key}:topic:{self.thread}" if self.thread else key

    def prompt_text(self) -> str:
        """What the model reads: the words, and a note when a file came along (not opened yet)."""
        media = f"[they also sent a {self.media}, which this gateway cannot open]" \
            if self.media else ""
        return "\n".join(part for part in (self.text, media) if part)


class ChannelError(Exception):
    """A platform refused or failed a call; the message says what to check."""


FENCE = "```"


def split_message(text: str, limit: int) -> list[str]:
    """Cut a long reply into parts of at most `limit` characters, in order.

    Each cut goes at a paragraph break if one is in the second half of the part,
    else at a line break, else between words; and outside ``` code blocks when
    possible. A code block too long for one part is cut at a line inside it,
    closed at the end of the part and opened again at the top of the next."""
    parts, text = [], text.strip()
    while len(text) > limit:
        cut, skip = find_cut(text, limit - len("\n" + FENCE))
        head, text = text[:cut].rstrip(), text[cut + skip:].lstrip("\n")
        fence = open_fence(head)
        if fence and len(fence) < limit // 4:
            head += "\n" + FENCE
            text = f"{fence}\n{text}"
        if head:
            parts.append(head)
    if text:
        parts.append(text)
    return parts


def open_fence(text: str) -> str | None:
    """The opening line of a ``` block that is still open at the end of text."""
    opening = None
    for line in text.splitlines():
        if line.lstrip().startswith(FENCE):
            opening = None if opening else line.strip()
    return opening


def find_cut(text: str, limit: int) -> tuple[int, int]:
    """Where to cut within text[:limit]: (position, length of the separator there)."""
    window = text[:limit]
    for earliest, outside_code in ((limit // 2, True), (1, True), (1, False)):
        for separator in ("\n\n", "\n", " "):
            position = window.rfind(separator)
            while position >= earliest:
                if not outside_code or open_fence(window[:position]) is None:
                    return position, len(separator)
                position = window.rfind(separator, 0, position)
    return limit, 0  # one word longer than a whole part: cut it


class Channel:
    """What every platform provides: start receiving (each message becomes an
    InboundMessage handed to on_message), send a reply back, stop."""
    name = "channel"
    max_text = 4000  # the longest message the platform takes; longer replies are split

    def __init__(self):
        self.state, self.detail, self.last_error = "off", "not started", None
        self.on_message = None

    def start(self, on_message) -> None:
        raise NotImplementedError

    def send(self, message: InboundMessage, text: str) -> None:
        raise NotImplementedError

    def typing(self, message: InboundMessage):
        """Show that a reply is being written; returns the function that stops it."""
        return lambda: None

    def stop(self) -> None:
        pass

    def switch_off(self, why: str) -> None:
        self.state, self.detail = "off", why
        log(f"[{self.name}] off: {why}")

    def status(self) -> str:
        return f"{self.name} {self.state}" + (f" ({self.detail})" if self.state == "off" else "")


class TerminalChannel(Channel):
    """The person at the keyboard. Its turns run in the main thread, where Ctrl-C
    and the approval prompt live, so its messages skip the bus."""
    name = "terminal"

    def start(self, on_message) -> None:
        self.state, self.detail = "on", "this window"

    def send(self, message: InboundMessage, text: str) -> None:
        print_in_background("\n".join(printable(line) for line in text.split("\n")))


def allow_list(value: str | None) -> set[str]:
    """A comma-separated setting as a set: "42, 77" -> {"42", "77"}."""
    return {x.strip() for x in (value or "").split(",") if x.strip()}


# --- [s04] Telegram: long polling with python-telegram-bot --------------------
TELEGRAM_BOT_TOKEN = os.getenv("TELEGRAM_BOT_TOKEN") or ""
TELEGRAM_API_BASE = (os.getenv("TELEGRAM_API_BASE") or "https://api.telegram.org").rstrip("/")
TELEGRAM_ALLOW_FROM = allow_list(os.getenv("TELEGRAM_ALLOW_FROM"))  # user ids; others must pair
TELEGRAM_POLL_TIMEOUT = 25  # seconds one getUpdates call may wait for news (long polling)
POLL_BACKOFF_START = 1.0    # seconds to wait after a failed poll; doubled after each failure
POLL_BACKOFF_MAX = 60.0
TELEGRAM_MEDIA = ("photo", "document", "voice", "audio", "video", "video_note", "sticker",
                  "location")


class TelegramChannel(Channel):
    """A Telegram bot. The library is asyncio, so the channel runs its own event
    loop in a background thread; other threads hand it calls with call()."""
    name = "telegram"
    max_text = 4096

    def __init__(self, token: str, api_base: str):
        super().__init__()
        self.token, self.api_base = token, api_base
        self.account = ""  # the bot's username, learned from getMe
        self.telegram = self.bot = self.loop = self.thread = self.poller = None

    def start(self, on_message) -> None:
        self.on_message = on_message
        if not self.token:
            self.state, self.detail = "off", "no TELEGRAM_BOT_TOKEN in .env"
            return
        import telegram  # loaded only when Telegram is configured: it costs start-up time
        self.telegram = telegram
        self.bot = telegram.Bot(self.token, base_url=f"{self.api_base}/bot")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="telegram",
                                       daemon=True)
        self.thread.start()
        self.state, self.detail = "starting", "connecting to the Bot API"
        self.poller = asyncio.run_coroutine_threadsafe(self.poll(), self.loop)

    async def poll(self) -> None:
        """Ask for new messages, forever. After a failure wait before asking again,
        twice as long each time up to POLL_BACKOFF_MAX, so a broken API is not
        hammered; log one line when polling starts failing and one when it works again."""
        errors = self.telegram.error
        offset, delay, failures = None, 0.0, 0
        while True:
            try:
                if not self.account:
                    await self.bot.initialize()  # getMe: which bot this token belongs to
                    self.account = self.bot.username
                    self.state, self.detail = "on", f"@{self.account}, long polling"
                updates = await self.bot.get_updates(offset=offset, timeout=TELEGRAM_POLL_TIMEOUT,
                                                     allowed_updates=["message"])
            except errors.InvalidToken:
                self.switch_off("Telegram does not know this TELEGRAM_BOT_TOKEN; "
                                "check it with @BotFather")
                return
            except errors.TelegramError as exc:  # 5xx, 409 Conflict, 429, network down
                failures += 1
                delay = min(POLL_BACKOFF_MAX, delay * 2 or POLL_BACKOFF_START)
                self.last_error = printable(f"{type(exc).__name__}: {exc}")
                if failures == 1:
                    log(f"[telegram] polling failed ({self.last_error}); "
                        "retrying, waiting longer each time")
                self.state = "retrying"
                self.detail = f"{failures} failed polls; next in {delay:g} s"
                await asyncio.sleep(delay)
                continue
            if failures:
                log(f"[telegram] polling works again after {failures} failed tries")
                failures, delay = 0, 0.0
            self.state, self.detail = "on", f"@{self.account}, long polling"
            for update in updates:
                offset = update.update_id + 1  # the next call confirms it: it is not sent again
                message = self.to_inbound(update)
                if message:
                    self.on_message(message)

    def to_inbound(self, update) -> InboundMessage | None:
        m = update.message
        if m is None or m.from_user is None or m.from_user.is_bot:
            return None  # an edit, a channel post, another bot: not a person writing to us
        media = next((kind for kind in TELEGRAM_MEDIA if getattr(m, kind)), None)
        text = (m.text or m.caption or "").replace(f"@{self.account}", "").strip()
        return InboundMessage(channel="telegram", account=self.account, peer=str(m.chat.id),
                              sender=str(m.from_user.id), text=text,
                              sender_name=m.from_user.full_name, is_group=m.chat.type != "private",
                              thread=str(m.message_thread_id) if m.is_topic_message else None,
                              media=media, raw=update.to_dict())

    def call(self, coroutine, timeout: float = 30):
        """Run one Bot API call on the channel's loop from another thread, and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def send(self, message: InboundMessage, text: str) -> None:
        if self.loop is None or self.state == "off":
            raise ChannelError(f"Telegram is off ({self.detail})")
        where = {"message_thread_id": int(message.thread)} if message.thread else {}
        for number, part in enumerate(split_message(text, self.max_text)):
            quote = {}
            if message.is_group and number == 0 and "message" in message.raw:
                # in a group, the first part answers the message it replies to
                quote = {"reply_parameters": self.telegram.ReplyParameters(
                    message.raw["message"]["message_id"], allow_sending_without_reply=True)}
            self.call(self.bot.send_message(chat_id=int(message.peer), text=part, **where,
                                            **quote))

    def typing(self, message: InboundMessage):
        where = {"message_thread_id": int(message.thread)} if message.thread else {}

        async def keep_typing() -> None:
            while True:
                try:
                    await self.bot.send_chat_action(chat_id=int(message.peer), action="typing",
                                                    **where)
                except self.telegram.error.TelegramError:
                    pass  # only a courtesy: the reply is what matters
                await asyncio.sleep(4)  # Telegram shows "typing..." for about five seconds

        return asyncio.run_coroutine_threadsafe(keep_typing(), self.loop).cancel

    def stop(self) -> None:
        if self.poller is None:
            return
        self.poller.cancel()  # ends a waiting getUpdates at once, not after its long-poll timeout
        try:
            self.call(self.bot.shutdown(), timeout=3)
        except Exception:
            pass  # stopping anyway
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=3)
        self.state, self.detail = "off", "stopped"


# --- [s04] Feishu / Lark: a webhook in, HTTPS calls out -----------------------
FEISHU_APP_ID = os.getenv("FEISHU_APP_ID") or ""
FEISHU_APP_SECRET = os.getenv("FEISHU_APP_SECRET") or ""
FEISHU_VERIFICATION_TOKEN = os.getenv("FEISHU_VERIFICATION_TOKEN") or ""
FEISHU_WEBHOOK_PORT = number_setting("FEISHU_WEBHOOK_PORT", 18790, 0, 65535)
FEISHU_DOMAIN = os.getenv("FEISHU_DOMAIN") or "feishu"  # "lark": Feishu's international edition
FEISHU_API_BASE = (os.getenv("FEISHU_API_BASE") or "").rstrip("/")
FEISHU_ALLOW_FROM = allow_list(os.getenv("FEISHU_ALLOW_FROM"))  # open_ids; others must pair
FEISHU_API_BASES = {"feishu": "https://open.feishu.cn", "lark": "https://open.larksuite.com"}
FEISHU_TOKEN_MARGIN = 300  # fetch a new tenant token this many seconds before the old one expires
FEISHU_TOKEN_ERRORS = {99991661, 99991663, 99991668}  # tenant token missing, invalid or expired
MAX_WEBHOOK_BODY = 1_000_000  # bytes; a bigger POST is refused unread
FEISHU_ID = re.compile(r"[\w-]{1,128}")  # open_id, chat_id: they end up in session keys and logs
WEBHOOK_READ_TIMEOUT = 10     # seconds a client may stay silent mid-request before it is dropped
MAX_WEBHOOK_REQUESTS = 16     # requests handled at once; more are refused with 503 at once


class FeishuWebhook(BaseHTTPRequestHandler):
    """Feishu POSTs events here. It listens on 127.0.0.1: put a tunnel or a
    reverse proxy in front, and give Feishu that public URL."""
    timeout = WEBHOOK_READ_TIMEOUT  # a slow or silent client cannot hold a thread for ever

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_WEBHOOK_BODY:
            return self.reply_json(413 if length > 0 else 400, {"error": "bad or too large body"})
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, RecursionError):
            return self.reply_json(400, {"error": "the body is not JSON"})
        self.reply_json(*self.server.channel.handle_event(body))

    def reply_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass  # no line per request on the terminal


class WebhookServer(ThreadingHTTPServer):
    """One thread per request, but never more than MAX_WEBHOOK_REQUESTS at once."""
    daemon_threads = True  # a slow or stuck client never holds up the exit

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_WEBHOOK_REQUESTS)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            except OSError:
                pass
            return self.shutdown_request(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        log(f"[feishu] a webhook request from {client_address[0]} failed: "
            f"{printable(repr(sys.exc_info()[1]))}")


class FeishuChannel(Channel):
    """A Feishu (or Lark) bot: events arrive at the webhook; replies go out
    through the open API with a tenant token that is cached until shortly
    before it expires."""
    name = "feishu"
    max_text = 4000  # Feishu takes much longer texts; parts this long still read well in a chat

    def __init__(self, app_id: str, app_secret: str, verification_token: str, port: int,
                 api_base: str):
        super().__init__()
        self.app_id, self.app_secret = app_id, app_secret
        self.verification_token, self.port, self.api_base = verification_token, port, api_base
        self.httpx = self.http = self.server = None
        self.token, self.token_expires = "", 0.0
        self.token_lock = threading.Lock()
        self.seen_events = deque(maxlen=1000)  # Feishu delivers an event again if it missed our 200
        self.refusals = Burst()  # anyone can post here: refused events are one line per burst

    def start(self, on_message) -> None:
        self.on_message = on_message
        if not (self.app_id and self.app_secret):
            self.state, self.detail = "off", "no FEISHU_APP_ID / FEISHU_APP_SECRET in .env"
            return
        if not self.verification_token:
            return self.switch_off("no FEISHU_VERIFICATION_TOKEN: "
                                   "without it anyone could post events")
        if not self.api_base:
            return self.switch_off(f"FEISHU_DOMAIN must be feishu or lark, not {FEISHU_DOMAIN!r}")
        try:
            self.server = WebhookServer(("127.0.0.1", self.port), FeishuWebhook)
        except OSError as exc:
            return self.switch_off(f"cannot listen on 127.0.0.1:{self.port} ({exc.strerror}); "
                                   "set FEISHU_WEBHOOK_PORT to a free port")
        import httpx  # loaded only when Feishu is configured
        self.httpx, self.http = httpx, httpx.Client(timeout=15)
        self.server.channel = self
        threading.Thread(target=self.server.serve_forever, name="feishu-webhook",
                         daemon=True).start()
        self.state = "on"
        self.detail = f"webhook on http://127.0.0.1:{self.port}/, API {self.api_base}"

    def handle_event(self, body) -> tuple[int, dict]:
        """Answer one webhook POST: (HTTP status, JSON body). Never raises."""
        try:
            if "encrypt" in body:
                return 400, {"error": "encrypted events are not supported: "
                                      "clear the Encrypt Key in the console"}
            verifying = body.get("type") == "url_verification"
            token = body.get("token") if verifying else body["header"].get("token")
            if not secrets.compare_digest(str(token or ""), self.verification_token):
                line = self.refusals.line("[feishu] refused an event with a wrong "
                                          "verification token")
                if line:
                    log(line)
                return 403, {"error": "wrong verification token"}
            if verifying:
                return 200, {"challenge": body.get("challenge")}  # Feishu checks the URL once
            if body["header"].get("event_type") != "im.message.receive_v1":
                return 200, {}
            message, event_id = self.to_inbound(body), body["header"].get("event_id")
            if event_id in self.seen_events:
                return 200, {}
            self.seen_events.append(event_id)
            self.on_message(message)
            return 200, {}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            line = self.refusals.line(f"[feishu] refused a malformed event "
                                      f"({type(exc).__name__}: {printable(str(exc))})")
            if line:
                log(line)
            return 400, {"error": "malformed event"}

    def to_inbound(self, body: dict) -> InboundMessage:
        m, sender = body["event"]["message"], body["event"]["sender"]["sender_id"]["open_id"]
        if not all(isinstance(x, str) and FEISHU_ID.fullmatch(x) for x in (sender, m["chat_id"])):
            raise ValueError("open_id and chat_id must be ids like ou_... and oc_...")
        is_group = m["chat_type"] != "p2p"
        kind = m.get("message_type")
        text = json.loads(m.get("content") or "{}").get("text", "") if kind == "text" else ""
        text = re.sub(r"@_user_\d+\s*", "", text).strip()  # "@_user_1": a mention of the bot
        return InboundMessage(channel="feishu", account=self.app_id,
                              peer=m["chat_id"] if is_group else sender, sender=sender, text=text,
                              is_group=is_group, media=None if kind == "text" else kind, raw=body)

    def tenant_token(self, refresh: bool = False) -> str:
        with self.token_lock:
            if refresh or time.monotonic() >= self.token_expires:
                data = self.post("/open-apis/auth/v3/tenant_access_token/internal",
                                 {"app_id": self.app_id, "app_secret": self.app_secret})
                if data.get("code") != 0:
                    raise ChannelError("Feishu refused FEISHU_APP_ID / FEISHU_APP_SECRET: "
                                       f"{data.get('msg')}")
                self.token = data["tenant_access_token"]
                self.token_expires = time.monotonic() + data["expire"] - FEISHU_TOKEN_MARGIN
            return self.token

    def post(self, path: str, body: dict, **kwargs) -> dict:
        try:
            response = self.http.post(f"{self.api_base}{path}", json=body, **kwargs)
            return response.json()
        except self.httpx.HTTPError as exc:
            raise ChannelError(f"cannot reach {self.api_base}: {exc}")
        except ValueError:
            raise ChannelError(f"{self.api_base}{path} answered {response.status_code} "
                               "without JSON")

    def send(self, message: InboundMessage, text: str) -> None:
        if self.http is None:
            raise ChannelError(f"Feishu is off ({self.detail})")
        # A direct chat is addressed by the person's open_id, a group by its chat_id.
        id_type = "chat_id" if message.is_group else "open_id"
        for part in split_message(text, self.max_text):
            content = json.dumps({"text": part}, ensure_ascii=False)
            for refresh in (False, True):  # a token the server no longer takes: a new one, once
                data = self.post("/open-apis/im/v1/messages",
                                 {"receive_id": message.peer, "msg_type": "text",
                                  "content": content}, params={"receive_id_type": id_type},
                                 headers={"Authorization": f"Bearer {self.tenant_token(refresh)}"})
                if data.get("code") not in FEISHU_TOKEN_ERRORS:
                    break
            if data.get("code") != 0:
                raise ChannelError(f"Feishu refused the message: {data.get('code')} "
                                   f"{data.get('msg')}")

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
        if self.http:
            self.http.close()


# --- [s04] Who may talk: allow lists and pairing ------------------------------
PAIRING_FILE = STATE_DIR / "pairing.json"
PAIRING_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0, O, 1 or I to misread
PAIRING_TTL = 3600         # seconds a pairing code stays valid
MAX_PENDING_PAIRINGS = 20  # per channel; a new stranger past this pushes out the oldest request
PAIRING_REPLY = ("Hello! I only talk with people my operator has approved. Your pairing code is "
                 "{code}. Ask the operator to run /pair approve {code} (it expires in an hour).")


class Pairing:
    """Who may talk: the allow lists from .env, plus senders the operator paired.

    pairing.json in the state folder holds {"approved": {channel: [sender ids]},
    "requests": [...]}. A file that cannot be read is moved aside and nobody new
    is let in (fail closed)."""

    def __init__(self, allow_from: dict[str, set]):
        self.allow_from = allow_from
        self.lock = threading.Lock()
        self.data = self.load()

    def load(self) -> dict:
        empty = {"version": 1, "approved": {}, "requests": []}
        if not PAIRING_FILE.exists():
            return empty
        try:
            data = json.loads(PAIRING_FILE.read_text(encoding="utf-8"))
            if not isinstance(data["approved"], dict) or not isinstance(data["requests"], list) \
                    or not all(isinstance(ids, list) for ids in data["approved"].values()):
                raise ValueError("'approved' must map channels to lists and 'requests' be a list")
            data["requests"] = [r for r in data["requests"] if isinstance(r, dict)
                                and all(isinstance(r.get(k), str) for k in ("code", "channel",
                                                                            "sender", "peer"))
                                and isinstance(r.get("created"), (int, float))]
            return data
        except (ValueError, KeyError, TypeError, RecursionError, OSError) as exc:
            aside = PAIRING_FILE.with_name(f"pairing.corrupt-{int(time.time())}.json")
            PAIRING_FILE.replace(aside)
            log(f"[pairing] {PAIRING_FILE} is not valid ({exc}); moved it to {aside.name}. "
                "Paired senders must pair again.")
            return empty

    def save(self) -> None:
        write_atomic(PAIRING_FILE, json.dumps(self.data, indent=2, ensure_ascii=False) + "\n")

    def is_allowed(self, channel: str, sender: str) -> bool:
        with self.lock:
            return sender in self.allow_from.get(channel, set()) or \
                sender in self.data["approved"].get(channel, [])

    def live_requests(self) -> list:
        now = time.time()
        self.data["requests"] = [r for r in self.data["requests"]
                                 if now - r["created"] < PAIRING_TTL]
        return self.data["requests"]

    def request(self, message: InboundMessage) -> str | None:
        """A new code for this sender, or None when they have one already (or were denied
        within the hour). When too many strangers wait, the oldest request gives way: a
        flood of strangers cannot keep one real person from pairing for an hour."""
        with self.lock:
            requests = self.live_requests()
            if any(r["channel"] == message.channel and r["sender"] == message.sender
                   for r in requests):
                return None
            waiting = [r for r in requests if r["channel"] == message.channel
                       and not r.get("denied")]  # a denied sender stays denied for the hour
            if len(waiting) >= MAX_PENDING_PAIRINGS:
                requests.remove(waiting[0])
            code = "".join(secrets.choice(PAIRING_ALPHABET) for _ in range(8))
            requests.append({"code": code, "channel": message.channel, "sender": message.sender,
                             "name": message.sender_name, "peer": message.peer,
                             "created": time.time()})
            self.save()
            return code

    def decide(self, code: str, approve: bool) -> dict | None:
        """Approve or deny a pending request by its code; returns the request, or None."""
        with self.lock:
            request = next((r for r in self.live_requests()
                            if r["code"] == code.upper() and not r.get("denied")), None)
            if request is None:
                return None
            if approve:
                self.data["requests"].remove(request)
                approved = self.data["approved"].setdefault(request["channel"], [])
                if request["sender"] not in approved:
                    approved.append(request["sender"])
            else:
                request["denied"] = True  # kept until it expires: no new code for them at once
            self.save()
            return request

    def pending(self) -> list:
        with self.lock:
            return [r for r in self.live_requests() if not r.get("denied")]


# --- [s04] Approvals for remote chats -----------------------------------------
APPROVAL_TIMEOUT = number_setting("APPROVAL_TIMEOUT", 120.0, 0.1)  # seconds to wait for /approve


class ApprovalQueue:
    """Commands that a remote chat's turn wants to run wait here until the
    operator answers at the terminal (/approve ID, /deny ID). No answer within
    APPROVAL_TIMEOUT seconds counts as a deny, and the chat is told."""

    def __init__(self):
        self.lock = threading.Lock()
        self.waiting: dict[str, dict] = {}
        self.numbers = count(1)

    def wait_for_operator(self, command: str, reply: ChatReply) -> str:
        """Block the asking worker until an answer: "once", "always", "deny" or "timeout"."""
        with self.lock:
            request = {"id": str(next(self.numbers)), "command": command,
                       "who": reply.message.session_key, "asked": time.time(),
                       "answer": "deny", "answered": threading.Event()}
            self.waiting[request["id"]] = request
        rid, shown = request["id"], printable(command)
        print_in_background(f"[approval {rid}] {request['who']} wants to run: {shown}\n"
                            f"  /approve {rid} (or /approve {rid} always) or /deny {rid}; "
                            f"denied in {APPROVAL_TIMEOUT:g} s without an answer")
        reply.channel.send(reply.message,
                           f"Waiting for the operator to approve this command: {command}")
        answered = request["answered"].wait(APPROVAL_TIMEOUT)
        with self.lock:
            self.waiting.pop(rid, None)
        if answered:
            return request["answer"]
        print_in_background(f"[approval {rid}] no answer in {APPROVAL_TIMEOUT:g} s: denied")
        reply.channel.send(reply.message, f"The operator did not answer within {APPROVAL_TIMEOUT:g}"
                                          f" s, so this command did not run: {command}")
        return "timeout"

    def resolve(self, request_id: str, answer: str) -> dict | None:
        with self.lock:
            request = self.waiting.pop(request_id, None)
        if request:
            request["answer"] = answer
            request["answered"].set()
        return request

    def pending(self) -> list:
        with self.lock:
            return list(self.waiting.values())


class ChatReply:
    """The `out` of a turn for a remote chat: words are gathered and sent when the
    turn ends, notes go to the operator's log, and a command that needs approval
    waits for the operator at the terminal. "always" covers this agent's chats."""

    def __init__(self, message: InboundMessage, channel: Channel, approvals: ApprovalQueue,
                 agent_id: str = AGENT_ID):
        self.message, self.channel, self.approvals = message, channel, approvals
        self.scope = f"chats:{agent_id}"  # an "always" given here never covers the terminal
        self.parts: list[str] = []

    def say(self, text: str = "", end: str = "\n") -> None:
        self.parts.append(text + end)

    def note(self, text: str) -> None:
        log(f"[{self.message.session_key}] {text}")

    def approve(self, command: str) -> None:
        if is_always_approved(command, self.scope):
            return
        answer = self.approvals.wait_for_operator(command, self)
        if answer == "always":
            remember_always(command, self.scope)
        elif answer == "deny":
            raise ToolError("the operator denied this command. Do not retry it; "
                            "ask the person what they want instead.")
        elif answer == "timeout":
            raise ToolError(f"nobody approved this command within {APPROVAL_TIMEOUT:g} s, "
                            "so it did not run. Do not retry it now.")

    def text(self) -> str:
        return "".join(self.parts).strip()


# --- [s04] The bus: from channels to worker threads, and replies back ---------
AGENT_WORKERS = 4        # remote turns that may run at once (each in a different session)
MAX_WAITING_TURNS = 5    # messages one chat may have waiting; more get a "busy" answer
SHUTDOWN_GRACE = 5.0     # seconds remote turns in progress get to finish when the gateway stops
REMOTE_HELP = "Send me a message and I will answer. /new starts a fresh conversation."
BUSY_REPLY = "I am still working on your earlier messages; send this one again when I answer."


class MessageBus:
    """Carries InboundMessages from the channels to worker threads, and replies back.

    Messages of one session wait in line (its turns never overlap); different
    sessions run on different workers at the same time, but one sender never
    holds more than one worker. publish() never blocks, so a channel's receiving
    thread is never held up by a turn."""

    def __init__(self, client: anthropic.Anthropic, store: SessionStore, guard: ContextGuard,
                 channels: dict[str, Channel], pairing: Pairing, approvals: ApprovalQueue):
        self.client, self.store, self.guard = client, store, guard
        self.channels, self.pairing, self.approvals = channels, pairing, approvals
        self.waiting: dict[str, deque] = {}  # session key -> its messages not yet answered
        self.ready = queue.Queue()           # session keys that have a message and no worker yet
        self.busy_senders: dict[str, list] = {}  # sender -> session keys parked until it is free
        self.told_busy: set[str] = set()     # chats told "busy" since their line last emptied
        self.strangers = Burst()             # one terminal line per burst of strangers
        self.lock = threading.Lock()
        for number in range(AGENT_WORKERS):
            threading.Thread(target=self.work, name=f"agent-worker-{number}", daemon=True).start()

    def publish(self, message: InboundMessage) -> None:
        key = message.session_key
        allowed = self.pairing.is_allowed(message.channel, message.sender)
        if message.is_group and not allowed:  # a stranger in a group: never queued
            return self.refuse(message, self.channels[message.channel])
        with self.lock:
            line = self.waiting.get(key)
            if line is not None and allowed and message.text.strip() == "/new":
                line.clear()  # a fresh start: what was waiting is not answered in the new session
            if line is not None and len(line) >= MAX_WAITING_TURNS:
                if allowed and key not in self.told_busy:  # once per line, from a short thread
                    self.told_busy.add(key)
                    threading.Thread(target=self.send_quietly, args=(message, BUSY_REPLY),
                                     daemon=True).start()
                return
            if line is not None:  # a worker is on this session: line up behind it
                line.append(message)
                return
            self.waiting[key] = deque([message])
        self.ready.put(key)

    def work(self) -> None:
        while True:
            key = self.ready.get()
            while True:
                with self.lock:
                    if not self.waiting[key]:
                        del self.waiting[key]
                        self.told_busy.discard(key)
                        break
                    first = self.waiting[key][0]
                    sender = f"{first.channel}:{first.sender}"
                    if sender in self.busy_senders:  # their other chat has a worker: wait for it
                        self.busy_senders[sender].append(key)
                        break
                    self.busy_senders[sender] = []
                    message = self.waiting[key].popleft()
                try:
                    self.handle(message)
                except Exception as exc:  # a failed send, a bug: log it, go on with the next
                    log(f"[{key}] not answered: {type(exc).__name__}: {printable(str(exc))}")
                finally:
                    with self.lock:
                        for parked in self.busy_senders.pop(sender):
                            self.ready.put(parked)

    def wait_until_idle(self, timeout: float) -> bool:
        """Wait (up to timeout) until no message is waiting or being answered."""
        deadline = time.monotonic() + timeout
        while self.waiting and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.waiting

    def handle(self, message: InboundMessage) -> None:
        channel, text = self.channels[message.channel], message.prompt_text()
        if not self.pairing.is_allowed(message.channel, message.sender):
            return self.refuse(message, channel)
        who = printable(f"{message.sender_name or message.sender} ({message.sender})")
        log(f"[{message.session_key}] {who}: {printable(preview(text))}")
        if text in ("/start", "/help"):
            return channel.send(message, REMOTE_HELP)
        if text == "/new":
            self.store.for_key(message.session_key, fresh=True)
            return channel.send(message, "Started a new conversation.")
        if not text:
            return
        session = self.store.for_key(message.session_key)
        reply = ChatReply(message, channel, self.approvals)
        stop_typing = channel.typing(message)
        try:
            agent_turn(self.client, session, text, self.guard, reply)
        finally:
            stop_typing()
        answer = reply.text() or "(no reply)"
        channel.send(message, answer)
        log(f"[{message.session_key}] replied ({len(answer)} characters)")

    def refuse(self, message: InboundMessage, channel: Channel) -> None:
        """A sender on no list: a pairing code in a direct chat (once), silence in a group.
        The terminal gets one line per burst of strangers, however many write."""
        who = printable(f"{message.channel} user {message.sender_name or '?'} ({message.sender})")
        code = None if message.is_group else self.pairing.request(message)
        if code:
            channel.send(message, PAIRING_REPLY.format(code=code))
        if code:
            line = self.strangers.line(f"[pairing] {who} asks to talk: /pair approve {code} "
                                       f"or /pair deny {code}")
        else:
            where = "in a group (pairing works in a direct chat)" if message.is_group else \
                "again (a request of theirs is pending or was denied)"
            line = self.strangers.line(f"[pairing] ignored {who} {where}")
        if line:  # None: counted, and shown with the next line (/pair lists who waits)
            print_in_background(line if code else dim(line))

    def send_quietly(self, message: InboundMessage, text: str) -> None:
        try:
            self.channels[message.channel].send(message, text)
        except Exception as exc:
            log(f"[{message.session_key}] could not send: {printable(str(exc))}")


# --- [s04] Commands: channels, pairing, approvals -----------------------------
def show_channels(repl: Repl, arg: str) -> None:
    for channel in repl.bus.channels.values():
        error = f"; last error: {printable(channel.last_error)}" if channel.last_error else ""
        print(f"  {channel.name:<9} {channel.state:<9} {channel.detail}{error}")


def pair(repl: Repl, arg: str) -> None:
    action, _, code = arg.partition(" ")
    code = code.strip()
    if not action:
        requests = repl.bus.pairing.pending()
        for r in requests:
            minutes = (time.time() - r["created"]) / 60
            who = printable(f"{r['channel']} user {r.get('name') or '?'} ({r['sender']})")
            print(f"  {r['code']}  {who}, asked {minutes:.0f} min ago")
        if not requests:
            print("No pairing requests.")
    elif action in ("approve", "deny") and code:
        request = repl.bus.pairing.decide(code, approve=action == "approve")
        who = printable(f"{request['channel']} user {request['sender']}") if request else ""
        if request is None:
            print(f"No pending pairing request has the code {printable(code)!r}; "
                  "/pair lists them.")
        elif action == "deny":
            print(f"Denied {who}.")
        else:
            print(f"Approved {who}: they can talk to the agent now.")
            where = InboundMessage(channel=request["channel"], account="", peer=request["peer"],
                                   sender=request["sender"], text="")
            repl.bus.send_quietly(where, "You are approved. Send your message again.")
    else:
        print("Usage: /pair, /pair approve CODE, /pair deny CODE")


def show_approvals(repl: Repl, arg: str) -> None:
    waiting = repl.bus.approvals.pending()
    for request in waiting:
        age = time.time() - request["asked"]
        print(f"  {request['id']}  {request['who']} wants to run: "
              f"{printable(request['command'])}  ({age:.0f} s ago)")
    if not waiting:
        print("No commands are waiting for approval.")


def approve_request(repl: Repl, arg: str) -> None:
    request_id, _, always = arg.partition(" ")
    if always.strip() not in ("", "always"):
        print("Usage: /approve ID, or /approve ID always")
        return
    answer_request(repl, request_id, "always" if always.strip() else "once")


def deny_request(repl: Repl, arg: str) -> None:
    answer_request(repl, arg.strip(), "deny")


def answer_request(repl: Repl, request_id: str, answer: str) -> None:
    request = repl.bus.approvals.resolve(request_id, answer) if request_id else None
    if request:
        verb = "Denied" if answer == "deny" else "Approved"
        print(f"{verb} for {request['who']}: {printable(request['command'])}")
    else:
        print(f"No command is waiting with id {printable(request_id)!r}; /approvals lists them.")


# --- [s01] The REPL: one table of commands ------------------------------------
@dataclass
class Repl:
    """What the REPL's commands work on."""
    client: anthropic.Anthropic
    session: Session
    guard: ContextGuard
    bus: MessageBus


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
    "/channels": (show_channels, "", "each channel: on or off (and why), last error"),
    "/pair": (pair, "[approve|deny CODE]", "senders waiting to be paired; approve or deny one"),
    "/approvals": (show_approvals, "", "commands from remote chats waiting for you"),
    "/approve": (approve_request, "ID [always]", "let a waiting command run (always: from now on)"),
    "/deny": (deny_request, "ID", "refuse a waiting command"),
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


def shut_down(bus: MessageBus) -> None:
    """Deny what waits for approval, give remote turns a moment, stop the channels."""
    for request in bus.approvals.pending():
        bus.approvals.resolve(request["id"], "deny")  # nobody is left to answer it
    if bus.waiting:
        print(dim(f"(letting {plural(len(bus.waiting), 'remote conversation')} finish, "
                  f"at most {SHUTDOWN_GRACE:g} s; Ctrl-C to stop now)"))
    try:
        bus.wait_until_idle(SHUTDOWN_GRACE)
    except KeyboardInterrupt:
        pass
    for channel in bus.channels.values():
        channel.stop()  # Telegram stops polling at once; the Feishu webhook closes
    print_held_lines()


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
    store, guard = SessionStore(SESSIONS_ROOT / AGENT_ID), ContextGuard(client)
    channels = {"terminal": TerminalChannel(),
                "telegram": TelegramChannel(TELEGRAM_BOT_TOKEN, TELEGRAM_API_BASE),
                "feishu": FeishuChannel(FEISHU_APP_ID, FEISHU_APP_SECRET, FEISHU_VERIFICATION_TOKEN,
                                        FEISHU_WEBHOOK_PORT,
                                        FEISHU_API_BASE or FEISHU_API_BASES.get(FEISHU_DOMAIN, ""))}
    pairing = Pairing({"telegram": TELEGRAM_ALLOW_FROM, "feishu": FEISHU_ALLOW_FROM})
    bus = MessageBus(client, store, guard, channels, pairing, ApprovalQueue())
    for channel in channels.values():
        channel.start(bus.publish)
    print("Channels: " + " · ".join(channel.status() for channel in channels.values()))
    repl = Repl(client, store.resume(), guard, bus)
    print(session_line(repl.session, "resumed" if repl.session.messages else "new"))
    print("Type a message, /help for commands, quit to leave.")
    while True:
        print_held_lines()
        at_prompt.set()  # from now until Enter, background lines print above the prompt
        try:
            user_text = input(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        finally:
            at_prompt.clear()
        if not user_text:
            continue
        if user_text.lower() in ("quit", "exit"):
            break
        if user_text.startswith("/"):
            run_command(repl, user_text)
            continue
        agent_turn(client, repl.session, user_text, repl.guard)
    shut_down(bus)
    print("Bye.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
