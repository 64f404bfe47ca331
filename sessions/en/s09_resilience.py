#!/usr/bin/env python3
"""s09 Resilience: the retry onion.

A failed model call is classified by type and handled by the layer that can help: the same
call again (overloaded, 5xx), another key after a cooldown (auth, billing, rate limit), a
fallback model; an overflow compacts (s03). Only the failed call repeats, never a tool; when
nothing free answers, the key free soonest is tried once. A session keeps the key it last used.

New here:
  [s09] Profiles: several keys, each with its cooldowns — Profile, load_profiles, Cooldowns
  [s09] The retry onion: classify, then retry, switch or fall back — NoResponse, NextProfile,
      failure_kind, headers_of, retry_after, Shown, Onion, shown_clock, shown_seconds, call_model
  [s09] Commands: profiles, cooldowns, simulate-failure, stats — shown_model, show_profiles,
      show_cooldowns, simulate_model_failure, show_stats
Changed here:
  make_client, agent_turn — every model call goes through the onion; the SDK's retries are off
  print_usage, main — the key and model that answered; how many profiles and fallbacks there are
  simulate_failure — s08's command also takes a failure class, for the next model call
Carried from earlier:
  [s01] Configuration · [s01] Errors, by type · [s01] The agent loop
  [s02] Tools: where they may reach · [s02] Tools: the handlers · [s02] Exec approvals
  [s02] Tools: what the model sees, and the dispatch table
  [s03] Sessions: append on write, replay on read
  [s03] Context: count, and summarize before it overflows · [s03] Commands: sessions and context
  [s04] Output: who reads a turn · [s04] Channels: every platform becomes one InboundMessage
  [s04] Telegram: long polling with python-telegram-bot
  [s04] Feishu / Lark: a webhook in, HTTPS calls out
  [s04] Who may talk: allow lists and pairing · [s04] Approvals for remote chats
  [s04] The bus: from channels to worker threads, and replies back
  [s04] Commands: channels, pairing, approvals
  [s05] Agents and bindings: which agent answers, in which session
  [s05] The gateway: JSON-RPC 2.0 over WebSocket, and a chat page
  [s05] Commands: gateway and routing
  [s06] The prompt: layers from files, a prefix the API can cache
  [s06] Memory: notes on disk, an index that finds them
  [s06] Skills: an index in the prompt, the body on use
  [s06] Commands: soul, prompt, memory, search, skills
  [s07] Heartbeat: the agent speaks first, when there is something to say
  [s07] Cron: jobs from CRON.json, on time, in their time zone · [s07] Commands: heartbeat and cron
  [s08] Delivery: write ahead, then send
  [s08] Inbound: on disk before the platform hears "received"
  [s08] Commands: queue, failed, retry, simulate-failure · [s01] The REPL: one table of commands

Run:  python sessions/en/s09_resilience.py
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import random
import re
import resource
import secrets
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from pathlib import Path
from zoneinfo import ZoneInfo

import anthropic
from dotenv import load_dotenv
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

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


SECTION = "s09 Resilience"
MODEL_ID = os.getenv("MODEL_ID") or "claude-sonnet-5-5"
API_KEY = os.getenv("ANTHROPIC_API_KEY") or ""
BASE_URL = os.getenv("ANTHROPIC_BASE_URL") or ""
MAX_TOKENS = number_setting("MAX_TOKENS", 8192)
SDK_MAX_RETRIES = 0  # s09: the onion retries, by class; SDK retries would multiply with it
WORKSPACE_DIR = Path(os.getenv("WORKSPACE_DIR") or REPO_ROOT / "workspace").resolve()
# The gateway's own files (approvals, sessions, tokens...): never inside the workspace.
STATE_DIR = Path(os.getenv("STATE_DIR") or REPO_ROOT / ".state").resolve()
MAX_TOOL_ROUNDS = 25        # model calls in one turn before the loop stops asking
BASH_TIMEOUT = number_setting("BASH_TIMEOUT", 30.0, 0.1, 300)
BASH_MAX_TIMEOUT = 300      # the model may ask for more time, never more than this
MAX_TOOL_OUTPUT = 20_000    # characters (or bytes) of one tool result; longer: the middle is cut
AGENT_ID = "main"  # the default agent; gateway.json can name more
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
    if not API_KEY and not BASE_URL and not PROFILES_FILE.exists():
        print("No API key: set ANTHROPIC_API_KEY in .env (copy .env.example to .env), "
              "or set ANTHROPIC_BASE_URL to a local Anthropic-compatible server.", file=sys.stderr)
        sys.exit(2)
    try:  # s09: the retry onion stands where one client stood; each profile has its own
        return Onion(load_profiles())
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)


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


def stream_reply(client: anthropic.Anthropic, messages: list, out: TerminalOutput,
                 agent: Agent | None = None,
                 prompt: Prompt | None = None) -> anthropic.types.Message:
    """Send the conversation; pass text on as it arrives; return the whole message.
    An agent from gateway.json brings its own model and its own tools. The system prompt is
    the turn's, built for that agent and the channel `out` speaks for (s06): a stable part the
    API caches, then what changes. The top-level cache_control puts a second breakpoint on the
    last block of the conversation, so each call reads what the call before it cached."""
    agent = agent or DEFAULT_AGENT
    prompt = prompt or build_prompt(agent, out.channel_name, out.skill)
    with client.messages.stream(model=agent.model, max_tokens=MAX_TOKENS, system=prompt.blocks(),
                                tools=agent.tool_schemas() or anthropic.omit, messages=messages,
                                cache_control=CACHE_BREAKPOINT) as stream:
        for text in stream.text_stream:
            out.say(text, end="")
        return stream.get_final_message()


def print_usage(message: anthropic.types.Message, out: TerminalOutput) -> None:
    u = message.usage
    read, written = u.cache_read_input_tokens or 0, u.cache_creation_input_tokens or 0
    prompt = u.input_tokens + read + written  # the whole prompt; `cached` of it came from cache
    cached = f"{read}" + (f" / written to cache {written}" if written else "")
    where = ROUTE_NOTES.pop(message.id, "")  # s09: a call another profile or model answered
    where = f"{where} · " if where else ""
    out.note(f"[{where}tokens in {prompt} / out {u.output_tokens} / cached {cached}"
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
               guard: ContextGuard | None = None, out: TerminalOutput | None = None,
               agent: Agent | None = None) -> str | None:
    """One turn: as many model calls as the tools need. Returns the reply text, or
    None when the turn ended early (rolled back to the last consistent point).
    The session is saved at every consistent point. `out` is who reads the turn:
    the terminal, or a remote chat's reply (s04); `agent` picks model and tools (s05)."""
    guard, out = guard or ContextGuard(client), out or TERMINAL
    prompt = build_prompt(agent or DEFAULT_AGENT, out.channel_name, out.skill)  # s06: once a turn
    guard.check(session, user_text, out, agent, prompt)
    messages = session.messages
    consistent = list(messages)  # the last point at which the history is whole
    add_user_text(messages, user_text)
    words_pending = True  # the person's words are not part of `consistent` yet
    compacted_once = False
    for _ in range(MAX_TOOL_ROUNDS):
        try:
            message = call_model(client, session, messages, out, agent, prompt)  # s09: the onion
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
            results, interrupted = run_tool_calls(message.content, out,
                                                  agent.tools if agent else None)
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


def run_tool(name: str, tool_input: dict, approve=approve_at_terminal,
             allowed: list | None = None, out: TerminalOutput | None = None) -> tuple[str, bool]:
    """Run one tool call. Returns (content, is_error); never raises for a tool's failure.
    A shell command passes the approval gate first; `approve` is who decides. `allowed`
    is the agent's tool list: a tool it does not have is refused like an unknown one.
    A tool of TURN_TOOLS is also handed the turn's `out`: which chat asked (s07)."""
    if name not in TOOL_HANDLERS or (allowed is not None and name not in allowed):
        known = TOOL_HANDLERS if allowed is None else allowed
        return f"unknown tool {name!r}; the tools are {', '.join(known) or 'none'}", True
    try:
        check_arguments(name, tool_input)
        if name == "bash":
            check_command(tool_input["command"], approve)
        if name in ("write_file", "edit_file") and is_prompt_file(tool_input["path"]):
            approve(f"{name} {tool_input['path']}")  # s06: the prompt is files: ask, as for bash
        extra = {"out": out} if name in TURN_TOOLS else {}
        return TOOL_HANDLERS[name](**tool_input, **extra), False
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


def run_tool_calls(content: list, out: TerminalOutput,
                   allowed: list | None = None) -> tuple[list, bool]:
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
                text, is_error = run_tool(block.name, block.input, out.approve, allowed, out)
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
        self.flushed: set[str] = set()  # sessions whose memory was flushed since they compacted

    @property
    def limit(self) -> int:
        return int(CONTEXT_WINDOW * COMPACT_THRESHOLD)

    def count(self, messages: list, agent: Agent | None = None, prompt: Prompt | None = None,
              ask: bool = True) -> tuple[int, str]:
        """The prompt as stream_reply sends it (s06): the agent's model and tools, and the
        layered system prompt (the turn's, else the terminal's). ask=False: estimate only."""
        agent = agent or DEFAULT_AGENT
        system, tools = (prompt or build_prompt(agent, "terminal")).blocks(), agent.tool_schemas()
        if self.can_count and ask:
            try:
                counted = self.client.messages.count_tokens(
                    model=agent.model, system=system, tools=tools or anthropic.omit,
                    messages=messages)
                return counted.input_tokens, "counted by the API"
            except anthropic.APIStatusError as exc:
                if exc.status_code in (404, 405, 501):
                    self.can_count = False  # this endpoint has no token counting
            except anthropic.APIConnectionError:
                pass
        return characters([messages, system, tools]) // 3, "estimated from characters"

    def observe(self, session: Session, usage) -> None:
        """After a call: remember how big the prompt was, and how many messages it held."""
        session.prompt_tokens = (usage.input_tokens + (usage.cache_read_input_tokens or 0)
                                 + (usage.cache_creation_input_tokens or 0))
        session.counted = len(session.messages)

    def estimate(self, session: Session, user_text: str, agent: Agent | None = None,
                 prompt: Prompt | None = None) -> int:
        """The next prompt's size: the last reported one plus what was added since, or,
        for a session no call has seen yet, a character estimate of all of it."""
        if session.prompt_tokens is None or session.counted > len(session.messages):
            session.prompt_tokens, session.counted = self.count(  # s06: the whole prompt
                session.messages, agent, prompt, ask=False)[0], len(session.messages)
        added = characters(session.messages[session.counted:]) + len(user_text)
        return session.prompt_tokens + added // 3

    def check(self, session: Session, user_text: str, out: TerminalOutput,
              agent: Agent | None = None, prompt: Prompt | None = None) -> None:
        """Before a turn: compact if the prompt, with the new words, would pass the limit.
        Close to the limit but not past it (s06), once until the next compaction: a silent
        turn first lets the model save what must outlive the summary. The prompt counted is
        the turn's (s06): its system blocks, the agent's model and tools."""
        tokens = self.estimate(session, user_text, agent, prompt)
        if tokens > self.limit * COUNT_MARGIN:  # close: worth one request for the real number
            probe = list(session.messages)
            add_user_text(probe, user_text)
            tokens, _ = self.count(probe, agent, prompt)
            if tokens <= self.limit and session.id not in self.flushed:
                self.flushed.add(session.id)
                flush_memory(self.client, session.messages, out, agent or DEFAULT_AGENT, prompt)
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
        self.flushed.discard(session.id)  # close to the limit again, memory is flushed again
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
    tokens, how = guard.count(session.messages, repl.agent) if session.messages else (0, "empty")
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
    channel_name = "terminal"   # the channel the turn is for: the prompt names it (s06)
    skill: Skill | None = None  # a skill started with /<name>: its SKILL.md joins this turn

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
    route: Route | None = field(default=None, repr=False)  # set once, when the bus takes it
    inbound: str | None = field(default=None, repr=False)  # s08: its file until it is answered

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
    """A platform refused or failed a call; the message says what to check. s08: `kind` says
    whether trying again can help ("transient") or not ("permanent"), and retry_after how many
    seconds the platform asked us to wait. Each channel decides, from its own library's
    exception types and status codes."""

    def __init__(self, message: str, kind: str = "transient", retry_after: float = 0.0):
        super().__init__(message)
        self.kind, self.retry_after = kind, retry_after


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
    delivery: Delivery | None = None  # s08: set for chats: what they are sent goes through it

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

    def stream(self, message: InboundMessage, text: str) -> None:
        """A piece of the reply as it is written: chats wait for the whole, the gateway streams."""

    def deliver_reply(self, message: InboundMessage, text: str) -> None:
        """The turn's answer. For a chat it is one more message; the gateway answers the
        request that is waiting for it."""
        self.deliver(message, text)

    def deliver(self, message: InboundMessage, text: str) -> None:
        """s08: a message for a chat goes into the delivery queue (on disk) and is sent from
        there; without a queue (the terminal, the gateway) it is sent at once."""
        if self.delivery:
            self.delivery.enqueue(message, text)
        else:
            self.send(message, text)

    def failed(self, message: InboundMessage, exc: Exception) -> None:
        """The message could not be answered. A chat waits for nothing (the log says it);
        the gateway has a request waiting."""

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
            try:
                self.call(self.bot.send_message(chat_id=int(message.peer), text=part, **where,
                                                **quote))
            except Exception as exc:
                raise self.classify(exc) from exc

    def classify(self, exc: Exception) -> ChannelError:
        """s08: what a failed call means for trying again, by the library's exception types.
        BadRequest (400: chat not found), Forbidden (403: bot blocked), InvalidToken (401, 404)
        and ChatMigrated will fail the same way next time; RetryAfter (429) says how long to
        wait; NetworkError, TimedOut, a 5xx (python-telegram-bot raises NetworkError for
        those) or a call that took too long may pass."""
        errors, text = self.telegram.error, f"{type(exc).__name__}: {exc}"
        if isinstance(exc, errors.RetryAfter):
            with warnings.catch_warnings():  # an int now, a timedelta in a later version
                warnings.simplefilter("ignore")
                after = exc.retry_after
            return ChannelError(text, retry_after=getattr(after, "total_seconds", lambda: after)())
        if isinstance(exc, (errors.BadRequest, errors.Forbidden, errors.InvalidToken,
                            errors.ChatMigrated)):
            return ChannelError(text, "permanent")
        return ChannelError(text)

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
FEISHU_RATE_LIMITED = 99991400  # s08: "request trigger frequency limit" (429; 400 on old APIs)
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
            self.on_message(message)  # s08: on disk first; a failed write is no 200, and
            self.seen_events.append(event_id)  # Feishu's next try is not taken for a repeat
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
            data = response.json()
        except self.httpx.HTTPError as exc:
            raise ChannelError(f"cannot reach {self.api_base}: {exc}")  # transient
        except ValueError:
            data = {"code": None, "msg": "an answer without JSON"}
        return self.check(response.status_code, response.headers, data)

    def check(self, status: int, headers, data: dict) -> dict:
        """s08: 429, 5xx and Feishu's rate-limit code may pass (after x-ogw-ratelimit-reset or
        Retry-After seconds, when given); any other 4xx is permanent, except a tenant token
        the server no longer takes (send() fetches a new one)."""
        if status == 429 or status >= 500 or data.get("code") == FEISHU_RATE_LIMITED:
            wait = headers.get("x-ogw-ratelimit-reset") or headers.get("retry-after") or ""
            raise ChannelError(f"Feishu answered {status} ({data.get('msg')}); try again later",
                               retry_after=float(wait) if wait.isdigit() else 0.0)
        code = data.get("code")
        if code is None or status >= 400 and code not in FEISHU_TOKEN_ERRORS:
            raise ChannelError(f"Feishu refused the call: {status} {data.get('code')} "
                               f"{data.get('msg')}", "permanent")
        return data

    def send(self, message: InboundMessage, text: str) -> None:
        if self.http is None:
            raise ChannelError(f"Feishu is off ({self.detail})")
        # A direct chat is addressed by the person's open_id, a group by its chat_id.
        id_type = "chat_id" if message.is_group else "open_id"
        once = {"uuid": message.raw["uuid"]} if "uuid" in message.raw else {}  # s08
        for part in split_message(text, self.max_text):
            content = json.dumps({"text": part}, ensure_ascii=False)
            for refresh in (False, True):  # a token the server no longer takes: a new one, once
                data = self.post("/open-apis/im/v1/messages",
                                 {"receive_id": message.peer, "msg_type": "text",
                                  "content": content, **once},
                                 params={"receive_id_type": id_type},
                                 headers={"Authorization": f"Bearer {self.tenant_token(refresh)}"})
                if data.get("code") not in FEISHU_TOKEN_ERRORS:
                    break
            if data.get("code") != 0:
                raise ChannelError(f"Feishu refused the message: {data.get('code')} "
                                   f"{data.get('msg')}", "transient" if data.get("code")
                                   in FEISHU_TOKEN_ERRORS else "permanent")

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
                       "who": reply.key, "asked": time.time(),
                       "answer": "deny", "answered": threading.Event()}
            self.waiting[request["id"]] = request
        rid, shown = request["id"], printable(command)
        print_in_background(f"[approval {rid}] {request['who']} wants to run: {shown}\n"
                            f"  /approve {rid} (or /approve {rid} always) or /deny {rid}; "
                            f"denied in {APPROVAL_TIMEOUT:g} s without an answer")
        reply.channel.deliver(reply.message,
                              f"Waiting for the operator to approve this command: {command}")
        answered = request["answered"].wait(APPROVAL_TIMEOUT)
        with self.lock:
            self.waiting.pop(rid, None)
        if answered:
            return request["answer"]
        print_in_background(f"[approval {rid}] no answer in {APPROVAL_TIMEOUT:g} s: denied")
        reply.channel.deliver(reply.message, f"The operator did not answer within "
                                             f"{APPROVAL_TIMEOUT:g} s, so this command did not "
                                             f"run: {command}")
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
                 agent_id: str = AGENT_ID, key: str | None = None):
        self.message, self.channel, self.approvals = message, channel, approvals
        self.scope = f"chats:{agent_id}"  # an "always" given here never covers the terminal
        self.key = key or message.session_key  # the label of this chat in the log
        self.parts: list[str] = []
        self.channel_name, self.skill = message.channel, None  # what the prompt is built for

    def say(self, text: str = "", end: str = "\n") -> None:
        self.parts.append(text + end)
        self.channel.stream(self.message, text + end)  # the gateway passes it on as it comes

    def note(self, text: str) -> None:
        log(f"[{self.key}] {text}")

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

    def __init__(self, client: anthropic.Anthropic, router: Router, guard: ContextGuard,
                 channels: dict[str, Channel], pairing: Pairing, approvals: ApprovalQueue):
        self.client, self.router, self.guard = client, router, guard
        self.stores: dict[str, SessionStore] = {}  # agent id -> its sessions
        self.channels, self.pairing, self.approvals = channels, pairing, approvals
        self.waiting: dict[str, deque] = {}  # session key -> its messages not yet answered
        self.ready = queue.Queue()           # session keys that have a message and no worker yet
        self.busy_senders: dict[str, list] = {}  # sender -> session keys parked until it is free
        self.told_busy: set[str] = set()     # chats told "busy" since their line last emptied
        self.strangers = Burst()             # one terminal line per burst of strangers
        self.inbox: Inbox | None = None      # s08: messages on disk until answered
        self.delivery: Delivery | None = None  # s08: replies on disk until sent
        self.lock = threading.Lock()
        for number in range(AGENT_WORKERS):
            threading.Thread(target=self.work, name=f"agent-worker-{number}", daemon=True).start()

    def store_for(self, agent_id: str) -> SessionStore:
        """Each agent keeps its sessions in its own folder: sessions/<agent id>/."""
        with self.lock:
            if agent_id not in self.stores:
                self.stores[agent_id] = SessionStore(SESSIONS_ROOT / agent_id)
            return self.stores[agent_id]

    def route(self, message: InboundMessage) -> Route:
        """Which agent answers, in which session. A gateway client may name the agent."""
        return self.router.resolve(message, message.raw.get("agent_id")
                                   if message.channel == "webchat" else None)

    def publish(self, message: InboundMessage) -> None:
        if self.inbox and message.inbound is None and not self.inbox.keep(message):
            return  # s08: on disk already: sent again before a crash let it be confirmed
        # Routed once, here: a binding changed meanwhile cannot send it to another session.
        message.route = self.route(message)
        key = message.route.session_key
        allowed = message.channel == "webchat" or \
            self.pairing.is_allowed(message.channel, message.sender)
        if message.is_group and not allowed:  # a stranger in a group: never queued
            return self.refuse(message, self.channels[message.channel])
        with self.lock:
            line = self.waiting.get(key)
            if line is not None and allowed and message.text.strip() == "/new":
                for dropped in line:  # a gateway client waits for an answer to every request
                    self.finish(dropped)
                    if dropped.channel == "webchat":
                        self.channels["webchat"].deliver_reply(
                            dropped, "(not answered: /new started a new conversation)")
                line.clear()  # a fresh start: what was waiting is not answered in the new session
            if line is not None and len(line) >= MAX_WAITING_TURNS:
                # Once per full line for a chat; a gateway client waits for every answer.
                if allowed and (key not in self.told_busy or message.channel == "webchat"):
                    self.told_busy.add(key)
                    threading.Thread(target=self.send_quietly, args=(message, BUSY_REPLY),
                                     daemon=True).start()
                return self.finish(message)
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
                    self.finish(message)  # s08: answered; on an error its file stays for a restart
                except Exception as exc:  # a failed send, a bug: log it, go on with the next
                    kept = f"; kept in {message.inbound} until a restart" if message.inbound else ""
                    log(f"[{key}] not answered: {type(exc).__name__}: {printable(str(exc))}{kept}")
                    try:
                        self.channels[message.channel].failed(message, exc)
                    except Exception:
                        pass  # (a channel no longer there...): the line above says it all
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

    def submit(self, key: str, run) -> None:
        """Scheduled work (s07) joins the line of session `key` like a person's message, and a
        worker runs it, run(), when its turn comes."""
        job = InboundMessage(channel="schedule", account="", peer=key, sender=key, text="",
                             raw={"run": run})
        with self.lock:
            if key in self.waiting:
                return self.waiting[key].append(job)
            self.waiting[key] = deque([job])
        self.ready.put(key)

    def handle(self, message: InboundMessage) -> None:
        if "run" in message.raw:  # s07: a heartbeat or a cron job, queued by submit()
            try:
                return message.raw["run"]()
            except Exception as exc:  # a full disk...: a line (there is no chat to tell)
                return log(f"[{message.peer}] {type(exc).__name__}: {printable(str(exc))}")
        channel, text, route = self.channels[message.channel], message.prompt_text(), message.route
        if message.channel != "webchat" and \
                not self.pairing.is_allowed(message.channel, message.sender):
            return self.refuse(message, channel)  # (gateway clients passed the token instead)
        who = printable(f"{message.sender_name or message.sender} ({message.sender})")
        log(f"[{route.session_key}] {who}: {printable(preview(text))}")
        store = self.store_for(route.agent.id)
        if text in ("/start", "/help"):
            return channel.deliver_reply(message, REMOTE_HELP)
        if text.split()[:1] == ["/new"]:  # s06: "/new words" too, never a skill called "new"
            store.for_key(route.session_key, fresh=True)
            return channel.deliver_reply(message, "Started a new conversation.")
        if not text:
            return channel.deliver_reply(message, "(nothing to answer)")
        session = store.for_key(route.session_key)
        reply = ChatReply(message, channel, self.approvals, route.agent.id, route.session_key)
        reply.skill = skill_for(text)  # "/<skill-name> ..." from any chat starts that skill
        stop_typing = channel.typing(message)
        try:
            agent_turn(self.client, session, text, self.guard, reply, route.agent)
        finally:
            stop_typing()
        answer = reply.text() or "(no reply)"
        channel.deliver_reply(message, answer)
        log(f"[{route.session_key}] {route.agent.id} replied ({len(answer)} characters, "
            f"{route.tier} route)")

    def refuse(self, message: InboundMessage, channel: Channel) -> None:
        """A sender on no list: a pairing code in a direct chat (once), silence in a group.
        The terminal gets one line per burst of strangers, however many write."""
        who = printable(f"{message.channel} user {message.sender_name or '?'} ({message.sender})")
        code = None if message.is_group else self.pairing.request(message)
        if code:
            channel.deliver(message, PAIRING_REPLY.format(code=code))
        self.finish(message)
        if code:
            line = self.strangers.line(f"[pairing] {who} asks to talk: /pair approve {code} "
                                       f"or /pair deny {code}")
        else:
            where = "in a group (pairing works in a direct chat)" if message.is_group else \
                "again (a request of theirs is pending or was denied)"
            line = self.strangers.line(f"[pairing] ignored {who} {where}")
        if line:  # None: counted, and shown with the next line (/pair lists who waits)
            print_in_background(line if code else dim(line))

    def finish(self, message: InboundMessage) -> None:
        """s08: the message is answered (its reply is queued) or refused: its file goes."""
        if self.inbox:
            self.inbox.done(message)

    def send_quietly(self, message: InboundMessage, text: str) -> None:
        key = message.route.session_key if message.route else message.session_key
        try:
            self.channels[message.channel].deliver_reply(message, text)
        except Exception as exc:
            log(f"[{key}] could not send: {printable(str(exc))}")


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


# --- [s05] Agents and bindings: which agent answers, in which session ---------
GATEWAY_FILE = STATE_DIR / "gateway.json"  # agents and bindings: state, out of the tools' reach
CHANNEL_NAMES = ("terminal", "telegram", "feishu", "webchat")  # what a binding can name
DM_SCOPES = ("main", "per-peer", "per-channel-peer")
TIERS = ("explicit", "peer", "group", "account", "channel", "default")  # most specific first
SAFE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")  # agent ids become folder names: nothing else
MATCH_FIELDS = ("channel", "account", "peer", "group")


class ConfigError(Exception):
    """gateway.json cannot be used; the message names the file, the field and what to do."""


@dataclass
class Agent:
    id: str
    name: str
    model: str
    tools: list[str]

    def tool_schemas(self) -> list:
        return [tool for tool in TOOLS if tool["name"] in self.tools]


@dataclass
class Route:
    agent: Agent
    tier: str          # which kind of binding matched: see TIERS
    session_key: str   # "agent:main:telegram:direct:42"
    binding: dict | None = None


def default_gateway_config() -> dict:
    return {"version": 1, "default_agent": AGENT_ID, "dm_scope": "per-channel-peer",
            "agents": [{"id": AGENT_ID, "name": "Claw", "model": None, "tools": "*"}],
            "bindings": [], "identity_links": {}}


def check_gateway_config(config) -> None:
    """Raise ConfigError naming the first field that is wrong."""
    def fail(where: str, what: str):
        raise ConfigError(f"{GATEWAY_FILE}: {where}: {what}. "
                          "Fix it, or delete the file to start from the defaults.")
    if not isinstance(config, dict):
        fail("top level", "must be an object")
    agents = config.get("agents")
    if not isinstance(agents, list) or not agents:
        fail("agents", "must be a non-empty list")
    for i, agent in enumerate(agents):
        if not isinstance(agent, dict) or not SAFE_ID.fullmatch(str(agent.get("id"))):
            fail(f"agents[{i}].id", "must be lowercase letters, digits, - or _ (at most 32)")
        if not isinstance(agent.get("name"), str) or \
                not isinstance(agent.get("model"), (str, type(None))):
            fail(f"agents[{i}]", "needs a name (text) and a model (text, or null for MODEL_ID)")
        tools = agent.get("tools")
        if tools != "*" and (not isinstance(tools, list) or
                             not all(isinstance(t, str) for t in tools)):
            fail(f"agents[{i}].tools", f'must be "*" (every tool) or a list of names from '
                                       f"{', '.join(TOOL_HANDLERS)}")
    ids = [agent["id"] for agent in agents]
    if len(set(ids)) != len(ids):
        fail("agents", "two agents have the same id")
    if config.get("default_agent") not in ids:
        fail("default_agent", f"must be one of {', '.join(ids)}")
    if config.get("dm_scope") not in DM_SCOPES:
        fail("dm_scope", f"must be one of {', '.join(DM_SCOPES)}")
    bindings = config.get("bindings")
    if not isinstance(bindings, list):
        fail("bindings", "must be a list")
    for i, binding in enumerate(bindings):
        match = binding.get("match") if isinstance(binding, dict) else None
        if not isinstance(match, dict) or match.get("channel") not in CHANNEL_NAMES or \
                any(k not in MATCH_FIELDS or not isinstance(v, str) for k, v in match.items()):
            fail(f"bindings[{i}].match", f"must name a channel ({', '.join(CHANNEL_NAMES)}) "
                                         f"and only text fields from {', '.join(MATCH_FIELDS)}")
        if binding.get("agent") not in ids:
            fail(f"bindings[{i}].agent", f"must be one of {', '.join(ids)}")
    links = config.get("identity_links")
    if not isinstance(links, dict) or any(
            not SAFE_ID.fullmatch(name) or not isinstance(ids_, list)
            or not all(isinstance(x, str) and ":" in x for x in ids_)
            for name, ids_ in links.items()):
        fail("identity_links", 'must map a name to ids like ["telegram:42", "feishu:ou_7"]')


def binding_tier(match: dict) -> str:
    for tier in ("peer", "group", "account"):
        if match.get(tier):
            return tier
    return "channel"


def binding_matches(match: dict, message: InboundMessage) -> bool:
    """Every field the binding names must fit. A peer is a person in a direct chat;
    a group is a group chat."""
    if match["channel"] != message.channel:
        return False
    if match.get("account") and match["account"] != message.account:
        return False
    if match.get("peer") and (message.is_group or match["peer"] != message.sender):
        return False
    if match.get("group") and (not message.is_group or match["group"] != message.peer):
        return False
    return True


class Router:
    """The binding table in gateway.json (in the state folder). Read once at start,
    changed through bindings.set / bindings.remove, and written back atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.config = self.load()
        self.agents = self.make_agents()

    def load(self) -> dict:
        if not self.path.exists():
            config = default_gateway_config()
            write_atomic(self.path, json.dumps(config, indent=2) + "\n")
            log(f"[gateway] wrote the default agents and bindings to {self.path}")
            return config
        try:
            config = json.loads(self.path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError, OSError) as exc:  # not JSON, too deep, a folder
            line = getattr(exc, "lineno", "?")
            raise ConfigError(f"{self.path}: line {line}: not valid JSON "
                              f"({getattr(exc, 'msg', exc)}). "
                              "Fix it, or delete the file to start from the defaults.")
        check_gateway_config(config)
        if widen_old_default(config):  # s06: once, so that the memory tools reach it
            write_atomic(self.path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
            log(f"[gateway] {self.path}: agent {AGENT_ID} had s05's first default list (the "
                'five s02 tools); it now has "*": every tool, the memory tools too. A list you '
                "write there from now on is kept as it is.")
        return config

    def make_agents(self) -> dict[str, Agent]:
        """The agents. "*" for tools means every tool this section has; a tool this section
        does not know (a later section's) is left out, with a line, and the file kept as it is."""
        agents = {}
        for a in self.config["agents"]:
            tools = list(TOOL_HANDLERS) if a["tools"] == "*" else a["tools"]
            unknown = [t for t in tools if t not in TOOL_HANDLERS]
            if unknown:
                log(f"[gateway] {a['id']}: {', '.join(map(printable, unknown))} unknown here; "
                    "left out")
            agents[a["id"]] = Agent(a["id"], a["name"], a["model"] or MODEL_ID,
                                    [t for t in tools if t in TOOL_HANDLERS])
        return agents

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")

    def resolve(self, message: InboundMessage, agent_id: str | None = None) -> Route:
        """Most specific binding first: peer, group, account, channel, then the default
        agent. Among bindings of one tier, the first listed wins. `agent_id` (a gateway
        client's choice) overrides the table."""
        with self.lock:
            best = None
            if agent_id:
                tier = "explicit"
            else:
                matching = [b for b in self.config["bindings"]
                            if binding_matches(b["match"], message)]
                best = min(matching, key=lambda b: TIERS.index(binding_tier(b["match"])),
                           default=None)
                agent_id = best["agent"] if best else self.config["default_agent"]
                tier = binding_tier(best["match"]) if best else "default"
            return Route(self.agents[agent_id], tier, self.session_key(agent_id, message), best)

    def session_key(self, agent_id: str, message: InboundMessage) -> str:
        """Groups always get their own session. Direct chats follow dm_scope: "main" (one
        session for every direct chat), "per-peer" (one per person), "per-channel-peer"
        (one per person per channel); a person in identity_links is one person everywhere."""
        if message.is_group:
            key = f"agent:{agent_id}:{message.channel}:group:{message.peer}"
            return f"{key}:topic:{message.thread}" if message.thread else key
        scope, person = self.config["dm_scope"], self.linked_identity(message)
        if scope == "main":
            return f"agent:{agent_id}:main"
        if person:
            return f"agent:{agent_id}:direct:{person}"
        if scope == "per-peer" and message.channel != "webchat":
            return f"agent:{agent_id}:direct:{message.sender}"
        # per-channel-peer, and a gateway client under per-peer: its peer ids are whatever the
        # client chose, so they never share a chat user's session without an identity link.
        return f"agent:{agent_id}:{message.channel}:direct:{message.sender}"

    def linked_identity(self, message: InboundMessage) -> str | None:
        for person, ids in self.config["identity_links"].items():
            if f"{message.channel}:{message.sender}" in ids:
                return person
        return None

    def set_binding(self, agent_id: str, match: dict) -> dict:
        """Add a binding, or point the one with the same match at another agent."""
        with self.lock:
            config = json.loads(json.dumps(self.config))
            config["bindings"] = [b for b in config["bindings"] if b["match"] != match]
            config["bindings"].append({"agent": agent_id, "match": match})
            check_gateway_config(config)  # raises ConfigError: nothing is written
            self.config = config
            self.save()
            return config["bindings"][-1]

    def remove_binding(self, match: dict) -> bool:
        with self.lock:
            kept = [b for b in self.config["bindings"] if b["match"] != match]
            removed = len(kept) < len(self.config["bindings"])
            if removed:
                self.config["bindings"] = kept
                self.save()
            return removed


def probe_message(channel: str, peer: str, account: str = "",
                  group: str | None = None) -> InboundMessage:
    """A message as it would arrive, for route.resolve and /route: from `peer`, in `group`."""
    return InboundMessage(channel=channel, account=account, peer=group or peer, sender=peer,
                          text="", is_group=group is not None)


# --- [s05] The gateway: JSON-RPC 2.0 over WebSocket, and a chat page ----------
GATEWAY_HOST = os.getenv("GATEWAY_HOST") or "127.0.0.1"
GATEWAY_PORT = number_setting("GATEWAY_PORT", 18789, 0, 65535)  # 0 picks a free port
GATEWAY_TOKEN = os.getenv("GATEWAY_TOKEN") or ""  # empty: generated once into the state folder
GATEWAY_ALLOWED_ORIGINS = sorted(allow_list(os.getenv("GATEWAY_ALLOWED_ORIGINS")))
TOKEN_FILE = STATE_DIR / "gateway-token"
MAX_FRAME_BYTES = 256 * 1024  # a bigger frame closes the connection (1009)
MAX_IN_FLIGHT = 16            # requests one connection may have running at once
MAX_CONNECTIONS = 64          # connections that passed `connect`
MAX_STRANGERS = 32            # connections that have not sent `connect` yet
CONNECT_DEADLINE = 5.0        # seconds a new connection has to send `connect`
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602
UNAUTHORIZED, NOT_FOUND, BUSY = -32001, -32004, -32005  # this gateway's codes (-32000 to -32099)
PEER_ID = re.compile(r"[\w.@-]{1,64}")  # no ":": it separates the parts of a session key


class RpcError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def load_gateway_token() -> str:
    """GATEWAY_TOKEN, or the one generated on first start (an owner-only file)."""
    if GATEWAY_TOKEN:
        if len(GATEWAY_TOKEN) < 16:
            raise ConfigError("GATEWAY_TOKEN is too short to keep anyone out: use at least 16 "
                              "characters, or leave it empty to have one generated.")
        return GATEWAY_TOKEN
    try:
        token = TOKEN_FILE.read_text(encoding="utf-8").strip() if TOKEN_FILE.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {TOKEN_FILE} ({type(exc).__name__}): delete it, and a "
                          "new token is generated at the next start.")
    if len(token) < 16:
        token = secrets.token_urlsafe(32)
        write_atomic(TOKEN_FILE, token + "\n")
    os.chmod(TOKEN_FILE, 0o600)
    return token


def rpc_error(request_id, code: int, message: str) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def parse_request(frame) -> dict:
    """One text frame as a JSON-RPC request, or RpcError with the code the spec names."""
    if not isinstance(frame, str):
        raise RpcError(INVALID_REQUEST, "send JSON-RPC as text frames, not binary")
    try:
        request = json.loads(frame)
    except (ValueError, RecursionError):
        raise RpcError(PARSE_ERROR, "the frame is not JSON")
    if isinstance(request, list):
        raise RpcError(INVALID_REQUEST, "batches are not supported: send one request per frame")
    if not isinstance(request, dict) or request.get("jsonrpc") != "2.0" or \
            not isinstance(request.get("method"), str):
        raise RpcError(INVALID_REQUEST,
                       'a request is an object with "jsonrpc": "2.0", "method" and "id"')
    if not isinstance(request.get("id"), (str, int)) or isinstance(request.get("id"), bool):
        raise RpcError(INVALID_REQUEST,
                       '"id" must be a string or an integer (notifications are not accepted)')
    if not isinstance(request.get("params", {}), dict):
        raise RpcError(INVALID_PARAMS, '"params" must be an object')
    return request


def text_param(params: dict, name: str, required: bool = True,
               pattern: re.Pattern | None = None) -> str | None:
    value = params.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or \
            (pattern and not pattern.fullmatch(value)):
        raise RpcError(INVALID_PARAMS,
                       f"{name!r} must be {'an id like web-42' if pattern else 'non-empty text'}")
    return value


class GatewayChannel(Channel):
    """The front door for programs: a WebSocket server speaking JSON-RPC 2.0.
    The first request on a connection must be `connect` with the token; the
    same port serves the chat page. Runs its own asyncio loop in a thread.

    The token is an operator key: whoever holds it may read every session and
    change the bindings. What its holder says goes into the "webchat" channel
    only: a gateway client never speaks in a Telegram or Feishu chat's session."""
    name = "webchat"

    def __init__(self, bus: MessageBus, host: str, port: int, token: str):
        super().__init__()
        self.bus, self.host, self.port, self.token = bus, host, port, token
        self.loop = self.thread = self.server = None
        self.connections: set = set()   # connections that passed `connect`
        self.strangers = 0              # connections still waiting to send it
        self.refusals = Burst()         # anyone may knock: refusals are one line per burst
        self.replies: dict[str, asyncio.Queue] = {}  # chat.send in progress -> its pieces
        self.started = time.time()
        self.methods = {"chat.send": self.chat_send, "chat.history": self.chat_history,
                        "sessions.list": self.sessions_list, "agents.list": self.agents_list,
                        "bindings.list": self.bindings_list, "bindings.set": self.bindings_set,
                        "bindings.remove": self.bindings_remove,
                        "route.resolve": self.route_resolve, "status": self.status_of}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def origin_allowed(self, origin: str | None) -> bool:
        """Browsers send Origin: only the gateway's own page and GATEWAY_ALLOWED_ORIGINS may
        connect, so a web page elsewhere cannot use your browser to talk to it. Programs
        send no Origin; they still need the token."""
        own = [f"http://{host}:{self.port}" for host in (self.host, "127.0.0.1", "localhost")]
        return origin is None or origin in own + GATEWAY_ALLOWED_ORIGINS

    def start(self, on_message) -> None:
        self.on_message = on_message
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self.loop_error)
        # Half-open connections each hold a file descriptor until open_timeout: use every
        # descriptor the system allows, so the caps below are reached first.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        try:
            self.server = self.loop.run_until_complete(self.listen())
        except OSError as exc:
            return self.switch_off(f"cannot listen on {self.host}:{self.port} ({exc.strerror}); "
                                   "set GATEWAY_PORT to a free port")
        self.port = self.server.sockets[0].getsockname()[1]  # the real one, when GATEWAY_PORT=0
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self.thread.start()
        self.state, self.detail = "on", f"ws://{self.host}:{self.port}, chat page {self.url}"

    def loop_error(self, loop, context: dict) -> None:
        """Errors the loop cannot give to anyone (an accept() that failed): one line per burst."""
        line = self.refusals.line(f"[gateway] {printable(str(context.get('message')))}: "
                                  f"{printable(repr(context.get('exception')))}")
        if line:
            log(line)

    async def listen(self):
        return await serve(self.serve_connection, self.host, self.port, max_size=MAX_FRAME_BYTES,
                           process_request=self.http_request, server_header=None,
                           open_timeout=CONNECT_DEADLINE, close_timeout=1)

    def http_request(self, connection, request):
        """Plain HTTP on the same port: GET / is the chat page; a WebSocket upgrade goes on."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            origin = request.headers.get("Origin")
            if not self.origin_allowed(origin):
                line = self.refusals.line(f"[gateway] refused a connection from origin "
                                          f"{printable(str(origin))}")
                if line:
                    log(line)
                return connection.respond(403, "This origin may not connect; "
                                               "see GATEWAY_ALLOWED_ORIGINS\n")
            if len(self.connections) >= MAX_CONNECTIONS or self.strangers >= MAX_STRANGERS:
                return connection.respond(503, "Too many connections\n")
            return None
        if request.path.split("?")[0] != "/":
            return connection.respond(404, "Not found\n")
        response = connection.respond(200, CHAT_PAGE)
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "text/html; charset=utf-8"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def serve_connection(self, connection) -> None:
        """`connect` first, within CONNECT_DEADLINE; then read frames until the client
        leaves. Each request runs as its own task, so a long chat.send does not hold up
        the requests behind it. Until `connect`, a connection counts as a stranger:
        strangers cannot fill the places of the clients that have the token."""
        self.strangers += 1
        try:
            frame = await asyncio.wait_for(connection.recv(), CONNECT_DEADLINE)
        except (asyncio.TimeoutError, ConnectionClosed):
            return await connection.close(1008, "send connect first")
        finally:
            self.strangers -= 1
        if not await self.connect(connection, frame):
            return await connection.close(1008, "unauthorized")
        self.connections.add(connection)
        running: set = set()
        try:
            async for frame in connection:
                try:
                    request = parse_request(frame)
                except RpcError as exc:
                    await connection.send(json.dumps(rpc_error(None, exc.code, str(exc))))
                    continue
                if len(running) >= MAX_IN_FLIGHT:
                    await connection.send(json.dumps(rpc_error(request["id"], BUSY,
                                                               "too many requests at once")))
                    continue
                task = asyncio.create_task(self.answer_request(connection, request))
                running.add(task)
                task.add_done_callback(running.discard)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(connection)
            for task in running:  # nobody is left to read their answers
                task.cancel()

    async def connect(self, connection, frame) -> bool:
        try:
            request = parse_request(frame)
        except RpcError as exc:
            await connection.send(json.dumps(rpc_error(None, exc.code, str(exc))))
            return False
        token = request.get("params", {}).get("token")
        if request["method"] != "connect" or not isinstance(token, str) or \
                not secrets.compare_digest(token.encode(), self.token.encode()):
            why = "wrong token" if request["method"] == "connect" else "no connect first"
            line = self.refusals.line(f"[gateway] refused a connection from "
                                      f"{connection.remote_address[0]}: {why}")
            if line:
                log(line)
            await connection.send(json.dumps(rpc_error(
                request["id"], UNAUTHORIZED,
                f"unauthorized ({why}): the first request must be connect with the token")))
            return False
        hello = {"protocol": 1, "server": SECTION, "methods": ["connect", *self.methods],
                 "events": ["chat.delta", "chat.notice"], "max_frame_bytes": MAX_FRAME_BYTES}
        await connection.send(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": hello}))
        return True

    async def answer_request(self, connection, request: dict) -> None:
        method = self.methods.get(request["method"])
        try:
            if method is None:
                raise RpcError(METHOD_NOT_FOUND,
                               f"no method {request['method']!r}; connect lists them")
            result = await method(connection, request["id"], request.get("params", {}))
            answer = {"jsonrpc": "2.0", "id": request["id"], "result": result}
        except RpcError as exc:
            answer = rpc_error(request["id"], exc.code, str(exc))
        except Exception as exc:  # a bug in a method: the client gets an error, the server goes on
            log(f"[gateway] {request['method']} failed: {type(exc).__name__}: "
                f"{printable(str(exc))}")
            answer = rpc_error(request["id"], -32603, f"internal error: {type(exc).__name__}")
        try:
            await connection.send(json.dumps(answer, ensure_ascii=False))
        except ConnectionClosed:
            pass

    async def notify(self, connection, method: str, params: dict) -> None:
        try:
            await connection.send(json.dumps({"jsonrpc": "2.0", "method": method,
                                              "params": params}, ensure_ascii=False))
        except ConnectionClosed:
            pass

    # --- methods --------------------------------------------------------------
    async def chat_send(self, connection, request_id, params: dict) -> dict:
        """Run a turn through the bus, like any channel's message; stream the reply as
        chat.delta notifications, then answer with the whole text."""
        unknown = sorted(set(params) - {"text", "peer_id", "agent_id"})
        if unknown:  # e.g. "channel": a gateway client speaks in the webchat channel only
            raise RpcError(INVALID_PARAMS, f"unknown parameter {unknown[0]!r}; chat.send takes "
                                           "text, peer_id and agent_id")
        text = text_param(params, "text")
        peer = text_param(params, "peer_id", pattern=PEER_ID)
        agent_id = text_param(params, "agent_id", required=False)
        if agent_id and agent_id not in self.bus.router.agents:
            raise RpcError(INVALID_PARAMS, f"no agent {agent_id!r}; agents.list names them")
        reply_id = secrets.token_hex(8)
        message = InboundMessage(channel="webchat", account="gateway", peer=peer, sender=peer,
                                 text=text, raw={"reply_id": reply_id, "agent_id": agent_id})
        pieces = self.replies[reply_id] = asyncio.Queue()
        self.bus.publish(message)
        route = message.route  # decided once, by the bus
        try:
            while True:
                kind, piece = await pieces.get()
                if kind == "reply":
                    return {"text": piece, "agent_id": route.agent.id,
                            "session_key": route.session_key, "tier": route.tier}
                await self.notify(connection, f"chat.{kind}",
                                  {"request_id": request_id, "session_key": route.session_key,
                                   "text": piece})
        finally:
            self.replies.pop(reply_id, None)

    async def chat_history(self, connection, request_id, params: dict) -> dict:
        key = text_param(params, "session_key")
        agent_id = key.split(":")[1] if key.startswith("agent:") and key.count(":") >= 2 else ""
        store = self.bus.store_for(agent_id) if agent_id in self.bus.router.agents else None
        if store is None or key not in store.index["keys"]:
            raise RpcError(NOT_FOUND, f"no session {key!r}; sessions.list names them")
        return {"session_key": key, "messages": list(store.for_key(key).messages)}

    async def sessions_list(self, connection, request_id, params: dict) -> dict:
        sessions = []
        for agent_id in self.bus.router.agents:
            store = self.bus.store_for(agent_id)
            keys = {sid: key for key, sid in store.index["keys"].items()}
            for sid, entry, changed in store.listing():
                sessions.append({"agent_id": agent_id, "id": sid, "session_key": keys.get(sid),
                                 "label": entry.get("label"), "updated": round(changed)})
        return {"sessions": sessions}

    async def agents_list(self, connection, request_id, params: dict) -> dict:
        return {"agents": [vars(agent) for agent in self.bus.router.agents.values()],
                "default_agent": self.bus.router.config["default_agent"]}

    async def bindings_list(self, connection, request_id, params: dict) -> dict:
        bindings = self.bus.router.config["bindings"]
        return {"bindings": [dict(b, tier=binding_tier(b["match"])) for b in bindings],
                "dm_scope": self.bus.router.config["dm_scope"]}

    def match_params(self, params: dict) -> dict:
        channel = text_param(params, "channel")
        if channel not in CHANNEL_NAMES:
            raise RpcError(INVALID_PARAMS, f"'channel' must be one of {', '.join(CHANNEL_NAMES)}")
        match = {"channel": channel}
        for name in ("account", "peer", "group"):
            value = text_param(params, name, required=False, pattern=PEER_ID)
            if value:
                match[name] = value
        return match

    async def bindings_set(self, connection, request_id, params: dict) -> dict:
        agent_id = text_param(params, "agent_id")
        if agent_id not in self.bus.router.agents:
            raise RpcError(INVALID_PARAMS, f"no agent {agent_id!r}; agents.list names them")
        binding = self.bus.router.set_binding(agent_id, self.match_params(params))
        return {"binding": dict(binding, tier=binding_tier(binding["match"]))}

    async def bindings_remove(self, connection, request_id, params: dict) -> dict:
        return {"removed": self.bus.router.remove_binding(self.match_params(params))}

    async def route_resolve(self, connection, request_id, params: dict) -> dict:
        match = self.match_params(params)
        route = self.bus.router.resolve(probe_message(
            match["channel"], match.get("peer") or "someone", match.get("account", ""),
            match.get("group")))
        return {"agent_id": route.agent.id, "tier": route.tier, "session_key": route.session_key,
                "binding": route.binding}

    async def status_of(self, connection, request_id, params: dict) -> dict:
        channels = {c.name: {"state": c.state, "detail": c.detail, "last_error": c.last_error}
                    for c in self.bus.channels.values()}
        return {"uptime_seconds": round(time.time() - self.started),
                "connections": len(self.connections), "channels": channels,
                "agents": list(self.bus.router.agents), "sessions_in_line": len(self.bus.waiting)}

    # --- the channel side: what the bus hands back --------------------------------
    def put(self, message: InboundMessage, kind: str, text: str) -> None:
        """From a worker thread into the request's queue, on the gateway's loop."""
        pieces = self.replies.get(message.raw.get("reply_id"))
        if pieces is not None:
            self.loop.call_soon_threadsafe(pieces.put_nowait, (kind, text))

    def stream(self, message: InboundMessage, text: str) -> None:
        self.put(message, "delta", text)

    def send(self, message: InboundMessage, text: str) -> None:
        self.put(message, "notice", text)  # "waiting for approval" and the like

    def deliver_reply(self, message: InboundMessage, text: str) -> None:
        self.put(message, "reply", text)

    def failed(self, message: InboundMessage, exc: Exception) -> None:
        self.deliver_reply(message, f"(not answered: {type(exc).__name__})")  # nobody left waiting

    def stop(self) -> None:
        if self.server is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.shut_down(), self.loop).result(5)
        except Exception:
            pass  # stopping anyway
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=3)
        self.state, self.detail = "off", "stopped"

    async def shut_down(self) -> None:
        """Close every connection (a client that does not answer gets 2 s), then end the rest."""
        self.server.close()
        try:
            await asyncio.wait_for(self.server.wait_closed(), 2)
        except asyncio.TimeoutError:
            pass
        leftovers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)


# --- [s05] Commands: gateway and routing --------------------------------------
def show_gateway(repl: Repl, arg: str) -> None:
    gateway = repl.bus.channels["webchat"]
    if gateway.state != "on":
        print(f"The gateway is off: {gateway.detail}")
        return
    where = "GATEWAY_TOKEN" if GATEWAY_TOKEN else TOKEN_FILE
    print(f"  {gateway.detail}; {plural(len(gateway.connections), 'connection')}")
    print(f"  token from {where}; the chat page: {gateway.url}#token={gateway.token}")


def show_agents(repl: Repl, arg: str) -> None:
    router = repl.bus.router
    for agent in router.agents.values():
        mark = " (default)" if agent.id == router.config["default_agent"] else ""
        print(f"  {agent.id}{mark}: {agent.name}, model {agent.model}, "
              f"tools {', '.join(agent.tools) or 'none'}")


def show_bindings(repl: Repl, arg: str) -> None:
    config = repl.bus.router.config
    for binding in config["bindings"]:
        match = " ".join(f"{k}={v}" for k, v in binding["match"].items())
        print(f"  {binding_tier(binding['match']):<8} {match} -> {binding['agent']}")
    if not config["bindings"]:
        print(f"No bindings: every message goes to the default agent, {config['default_agent']}.")
    print(f"Direct chats: dm_scope {config['dm_scope']}; edit {GATEWAY_FILE} "
          "(then restart) or use bindings.set")


def show_route(repl: Repl, arg: str) -> None:
    args = [a if a != "-" else "" for a in arg.split()]
    if len(args) < 2 or args[0] not in CHANNEL_NAMES:
        print(f"Usage: /route <channel> <peer> [account] [group]   (- skips the account); "
              f"channels: {', '.join(CHANNEL_NAMES)}")
        return
    group = args[3] if len(args) > 3 else None
    account = args[2] if len(args) > 2 else ""
    route = repl.bus.router.resolve(probe_message(args[0], args[1], account, group))
    print(f"  agent {route.agent.id} ({route.tier} tier), session {printable(route.session_key)}")


def show_chat_sessions(repl: Repl, arg: str) -> None:
    shown = 0
    for agent_id in repl.bus.router.agents:
        store = repl.bus.store_for(agent_id)
        keys = {sid: key for key, sid in store.index["keys"].items()}
        for sid, entry, changed in store.listing():
            if sid in keys:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(changed))
                print(f"  {printable(keys[sid])}  updated {when}")
                shown += 1
    if not shown:
        print("No chat sessions yet (the terminal's own sessions: /list).")


CHAT_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Agent gateway</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 15px/1.5 system-ui; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; }
  #log { border: 1px solid #ccc; border-radius: 6px; padding: .5rem 1rem; min-height: 12rem;
         white-space: pre-wrap; }
  .you { color: #555; } .you::before { content: "You: "; font-weight: 600; }
  .agent::before { content: "Agent: "; font-weight: 600; }
  .writing:empty::after { content: "Agent is writing…"; color: #999; font-style: italic; }
  .notice { color: #a60; font-style: italic; } .note, #status { color: #888; font-size: 13px; }
  form { display: flex; gap: .5rem; margin-top: .75rem; } input { flex: 1; font: inherit; }
</style>
</head>
<body>
<h1>Agent gateway</h1>
<div id="log"></div>
<form id="form"><input id="text" autocomplete="off" placeholder="Say something" disabled>
  <button>Send</button></form>
<p><span id="status">connecting…</span> <button id="retry" hidden>Reconnect</button></p>
<script>
// The token travels in the URL's #fragment, which the browser never sends to a server.
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const peer = localStorage.getItem("gateway-peer") || "web-" + Math.random().toString(36).slice(2);
localStorage.setItem("gateway-peer", peer);
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("text"), status = $("status"), retry = $("retry");
const HINT = " Open the link the gateway prints at start-up and on /gateway in its terminal: "
  + location.origin + "/#token=…";
const SUMMARY = "[Summary of the earlier part of this conversation";  // written by a compaction
const waiting = {}, bubbles = {};  // by request id: its promise's callbacks; its reply's bubble
let ws, refused = false, nextId = 1;

function line(kind, text) {
  const div = log.appendChild(document.createElement("div"));
  div.className = kind;
  div.textContent = text;  // text, never HTML: a reply cannot inject markup
  return div;
}
function say(text, offerRetry = false) { status.textContent = text; retry.hidden = !offerRetry; }
function call(method, params) {
  const id = nextId++;
  ws.send(JSON.stringify({jsonrpc: "2.0", id, method, params}));
  return new Promise((resolve, reject) => { waiting[id] = {resolve, reject}; });
}
function answer({id, result, error}) {
  const {resolve, reject} = waiting[id];
  delete waiting[id];
  error ? reject(Object.assign(new Error(error.message), {code: error.code})) : resolve(result);
}

function connect() {
  if (!token) return say("This link has no token, so the page cannot connect." + HINT);
  say("connecting…");
  ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/");
  Object.assign(ws, {onopen: start, onmessage: received, onclose: closed});
}
function received(event) {
  const msg = JSON.parse(event.data), bubble = bubbles[msg.params?.request_id];
  if (msg.method === "chat.delta" && bubble) bubble.textContent += msg.params.text;
  else if (msg.method === "chat.notice") line("notice", msg.params.text);
  else if (msg.id in waiting) answer(msg);
}
async function start() {
  try {
    await call("connect", {token});
  } catch (error) {  // the gateway closes the socket next: keep its reason on screen
    refused = true;
    return say("Not connected: " + error.message + "." + HINT);
  }
  await restoreConversation();
  say("connected as " + peer);
  input.disabled = false;
  input.focus();
}
function closed() {
  input.disabled = true;
  for (const id in waiting) answer({id, error: {message: "the connection closed"}});
  if (!refused) say("The gateway is not reachable: it stopped, or has not started yet.", true);
}

// The conversation lives in the gateway's session: ask which one is this peer's, and show
// it. No session yet (-32004) is an empty conversation, not an error.
async function restoreConversation() {
  log.replaceChildren();
  try {
    const {session_key} = await call("route.resolve",
                                     {channel: "webchat", peer, account: "gateway"});
    (await call("chat.history", {session_key})).messages.forEach(showMessage);
  } catch (error) {
    if (error.code !== -32004) line("notice", "The conversation did not load: " + error.message);
  }
}
function showMessage({role, content}) {
  const blocks = typeof content === "string" ? [{type: "text", text: content}] : content;
  for (const block of blocks) {  // tool results are left out: a note that the tool ran will do
    if (block.type === "text" && block.text.startsWith(SUMMARY)) line("note", block.text);
    else if (block.type === "text") line(role === "user" ? "you" : "agent", block.text);
    else if (block.type === "tool_use") line("note", "used " + block.name);
  }
}

async function send(event) {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || input.disabled) return;
  input.value = "";
  line("you", text);
  // Each reply has its own bubble, kept under the id call() gives this chat.send next: the
  // request id its chat.delta notifications carry. Until the first one, it says "writing".
  const id = nextId, bubble = bubbles[id] = line("agent writing", "");
  try {
    bubble.textContent = (await call("chat.send", {text, peer_id: peer})).text;  // all, as saved
    bubble.dataset.done = "yes";
  } catch (error) { bubble.className = "notice"; bubble.textContent = error.message; }
  bubble.classList.remove("writing");
  delete bubbles[id];
}

$("form").onsubmit = send;
retry.onclick = connect;
// A link pasted into this tab that differs only in its #fragment loads no new page: reload.
addEventListener("hashchange", () => location.reload());
connect();
</script>
</body>
</html>
"""


# --- [s06] The prompt: layers from files, a prefix the API can cache ----------
# The system prompt is the workspace's own files, in this order. It changes only when a file
# does, so it goes out the same bytes turn after turn and the API reads it from its cache.
# What changes (the date, the channel, a skill for one turn) comes after the cache breakpoint.
LAYER_FILES = (("identity", "IDENTITY.md"), ("soul", "SOUL.md"), ("operating notes", "AGENTS.md"),
               ("tools guide", "TOOLS.md"), ("user", "USER.md"), ("skills index", None),
               ("evergreen memory", "MEMORY.md"), ("bootstrap", "BOOTSTRAP.md"))
MAX_FILE_CHARS = 20_000    # the most one file puts in the prompt; a longer one keeps head and tail
MAX_PROMPT_CHARS = 60_000  # every layer together
MEMORY_RESERVE = 12_000    # MEMORY.md's share, set aside before the other layers take theirs
# Over MAX_PROMPT_CHARS, the layers take room most important first, so these are cut first:
CUT_FIRST = ("bootstrap", "skills index", "user", "operating notes", "tools guide", "soul",
             "identity")
CACHE_BREAKPOINT = {"type": "ephemeral"}  # the API caches the prompt up to here, for 5 minutes
CHANNEL_HINTS = {"terminal": "The person types at a terminal on this machine: plain text.",
                 "webchat": "The person uses a gateway client: the chat page or a program.",
                 "chat app": "The person reads you in a chat app, often on a phone: be brief."}
FENCE_NOTE = ('Each workspace file below is inside <file path="..."> and </file>; the runtime '
              "facts at the end are the gateway's own.")
file_cache: dict[tuple[str, int], tuple[tuple, str]] = {}  # (name, limit) -> (lstat key, text)
warned: set[str] = set()


@dataclass
class Layer:
    name: str
    source: str   # the file it came from, or what made it
    text: str
    cut: str = ""  # what was cut from it, and why


@dataclass
class Prompt:
    """One turn's system prompt: the layers before the cache breakpoint, then those after."""
    stable: list[Layer]
    volatile: list[Layer]

    def blocks(self) -> list:  # two text blocks: the first ends at the cache breakpoint
        stable, volatile = ("\n\n".join(fence(layer) for layer in layers if layer.text)
                            for layers in (self.stable, self.volatile))
        return [{"type": "text", "text": stable, "cache_control": CACHE_BREAKPOINT},
                {"type": "text", "text": volatile}]


def fence(layer: Layer) -> str:
    """A file's layer inside <file path="...">. A "</file" in its text is defused, so no file
    can end its own fence and pass itself off as another layer, the runtime facts or a skill."""
    if not layer.source.endswith(".md"):
        return layer.text  # the gateway's own words: SYSTEM_PROMPT, the runtime facts
    text = re.sub(r"(?i)<(\s*/\s*file)", r"&lt;\1", layer.text)
    return f'<file path="{layer.source}">\n{text}\n</file>'


def warn_once(text: str) -> None:
    """A problem with a workspace file: said once, not on every turn."""
    if text not in warned:
        warned.add(text)
        log(printable(text))


def read_workspace_text(name: str, limit: int = MAX_FILE_CHARS * 4) -> str | None:
    """A workspace file for the prompt (past `limit` bytes, its head and tail): None when there
    is none; "" and one line (said once) when it is there but unusable: a link out or to
    nothing, a folder, a FIFO, no permission, NUL bytes. An unchanged file costs one lstat():
    it is read again (through safe_path) only when its inode, mtime or size change."""
    where, key = WORKSPACE_DIR / name, None
    try:
        info = os.lstat(where)
        key = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
        if stat.S_ISLNK(info.st_mode):  # a link: what it leads to counts too
            info = os.stat(where)
            key += (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
        if file_cache.get((name, limit), (None,))[0] == key:
            return file_cache[(name, limit)][1]
        head, tail, cut = read_bytes(safe_path(name), name, limit)
        if b"\0" in head + tail:
            raise ToolError("it holds NUL bytes: not a text file")
        text = (head + b"\n\n" + tail if cut else head).decode("utf-8", errors="replace")
        file_cache[(name, limit)] = (key, text)
        return text
    except ToolError as exc:
        why = str(exc)
    except OSError as exc:
        if key is None and isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            return None  # not there
        why = exc.strerror or str(exc)
    warn_once(f"[prompt] left out {name}: {why}; nothing is used in its place")
    return ""


def layer_source(agent_id: str, name: str) -> tuple[str, str]:
    """(file, text): workspace/agents/<id>/<name> when the agent has its own, else the shared.
    An own file that is there but unusable gives an empty layer, never the shared one."""
    own = f"agents/{agent_id}/{name}"
    text = read_workspace_text(own)
    return (own, text) if text is not None else (name, read_workspace_text(name) or "")


def is_prompt_file(raw: str) -> bool:
    """A file the system prompt is read from: a layer file, or anything in agents/ or skills/;
    and (s07) HEARTBEAT.md and CRON.json, which say what the agent does unasked.
    write_file and edit_file ask before they change one, as bash does (run_tool)."""
    try:
        parts = [part.casefold() for part in safe_path(raw).relative_to(WORKSPACE_DIR).parts]
    except ToolError:
        return False  # the tool refuses the path itself
    names = {file.casefold() for _, file in LAYER_FILES if file} | {"heartbeat.md", "cron.json"}
    return (len(parts) > 1 and parts[0] in ("agents", "skills")) or (
        len(parts) == 1 and parts[0] in names)


def tools_guide(text: str, tools: list[str]) -> str:
    """TOOLS.md without the bullets (and their indented lines) of tools the agent lacks."""
    kept, skipping = [], False
    for line in text.splitlines():
        bullet = re.match(r"- `(\w+)`", line)
        if bullet or not line.startswith("  "):
            skipping = bullet is not None and bullet.group(1) not in tools
        if not skipping:
            kept.append(line)
    return "\n".join(kept) if tools else ""


def clip(text: str, limit: int, source: str) -> str:
    """At most `limit` characters: head and tail, and a marker that says how to read the rest
    (read_file would give the same head and tail again)."""
    if len(text) <= limit:
        return text
    how = {"skills/*/SKILL.md": "list_dir skills shows every skill",
           "MEMORY.md": "memory_get reads MEMORY.md by lines"}.get(
        source, f"find the rest with bash: grep -n -C 20 WORD {source}")
    marker = f"\n\n[... the middle of {source} is cut here to fit the prompt; {how} ...]\n\n"
    room = max(limit - len(marker), 0)
    return text[:room * 2 // 3] + marker + text[len(text) - room // 3:]


def shorten(layer: Layer, room: int, why: str) -> int:
    """Cut a layer to `room` characters (to nothing if too little is left); return its length."""
    if len(layer.text) > room:
        before = len(layer.text)
        layer.text = clip(layer.text, room, layer.source) if room >= 500 else ""
        layer.cut += f"{'; ' if layer.cut else ''}{before:,} -> {len(layer.text):,} ({why})"
    return len(layer.text)


def fit(layers: list[Layer]) -> None:
    """Keep the layers within MAX_PROMPT_CHARS. MEMORY.md takes its reserve first, so it is never
    the layer that silently disappears; the others take what they need, CUT_FIRST's last first."""
    memory = next(layer for layer in layers if layer.name == "evergreen memory")
    reserve = min(len(memory.text), MEMORY_RESERVE)
    left = MAX_PROMPT_CHARS - reserve
    for layer in sorted((layer for layer in layers if layer is not memory),
                        key=lambda layer: CUT_FIRST.index(layer.name), reverse=True):
        left -= shorten(layer, left, "MAX_PROMPT_CHARS")
    shorten(memory, left + reserve, "MAX_PROMPT_CHARS")


def has_notes() -> bool:
    """Whether memory/ holds a note yet (it stops at the first .md it meets)."""
    try:
        with os.scandir(MEMORY_DIR) as entries:
            return any(entry.name.endswith(".md") for entry in entries)
    except OSError:
        return False


def runtime_facts(agent: Agent, channel: str, skill: Skill | None = None) -> str:
    """What may change, so it comes after the breakpoint. The date, never the time of day: a
    prompt that changed every minute would be a new prompt every minute."""
    now = time.localtime()
    return (f"# Runtime (from the gateway, not from a file)\n"
            f"- Agent: {agent.id} ({agent.name}), model {agent.model}\n"
            f"- Channel: {channel}. {CHANNEL_HINTS.get(channel, CHANNEL_HINTS['chat app'])}\n"
            f"- Today: {time.strftime('%a %Y-%m-%d', now)}, time zone {time.strftime('%Z', now)}"
            + (f"\n- Skill for this turn: {skill.name}. The person started it with /{skill.name}"
               f"; follow {skill.path}, below." if skill else ""))


def build_prompt(agent: Agent, channel: str, skill: Skill | None = None) -> Prompt:
    """The system prompt of one turn, for this agent on this channel (and a skill it uses)."""
    layers = []
    for name, file in LAYER_FILES:
        if file is None:
            source, text = "skills/*/SKILL.md", skills_index(load_skills()[0])
        else:
            source, text = layer_source(agent.id, file)
        if name == "tools guide":
            text = tools_guide(text, agent.tools)
        if name == "bootstrap" and has_notes():
            text = ""  # the workspace is new until memory/ holds its first note
        layers.append(Layer(name, source, text.strip()))
        shorten(layers[-1], MAX_FILE_CHARS, "MAX_FILE_CHARS")
    fit(layers)
    volatile = [Layer("runtime", "built each turn", runtime_facts(agent, channel, skill))]
    if skill:
        body = read_workspace_text(skill.path) or ""
        volatile.append(Layer("skill", skill.path, clip(body, MAX_FILE_CHARS, skill.path)))
    base = Layer("base", "SYSTEM_PROMPT", f"{SYSTEM_PROMPT}\n{FENCE_NOTE}")
    return Prompt([base] + layers, volatile)


# --- [s06] Memory: notes on disk, an index that finds them --------------------
# Notes are Markdown files the agent and the person both read and edit: MEMORY.md (in the
# prompt) and memory/YYYY-MM-DD.md (one a day, searched). The index in the state folder only
# caches them: delete it, and the next search builds it again.
MEMORY_DIR = WORKSPACE_DIR / "memory"
MEMORY_INDEX_FILE = STATE_DIR / "memory.sqlite"
MEMORY_TOOLS = ["memory_write", "memory_search", "memory_get"]
CHUNK_CHARS = 1_200   # paragraphs are merged into chunks of up to about 300 tokens
HALF_LIFE_DAYS = 30   # a daily note's score halves every 30 days; MEMORY.md never fades
MMR_LAMBDA = 0.7      # relevance against variety when results are picked
DUPLICATE = 0.8       # trigram overlap (Jaccard) at which a result is a near copy: dropped
CANDIDATES = 100      # matches each index hands on to the ranking
MAX_QUERY_WORDS = 32  # words (and trigrams) of one query looked up: FTS5 refuses ~1,000
MAX_NOTE_CHARS = 8_000        # one memory_write
MAX_NOTE_BYTES = 1_000_000    # a day's file past this: the day goes on in <date>-2.md, -3...
MAX_INDEX_BYTES = 4_000_000   # a larger file is not indexed (one line says so)
CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]{4}")
NO_MEMORY = "NO_MEMORY_NEEDED"  # the flush's answer when nothing needed saving
FLUSH_ROUNDS = 3      # model calls one flush may make
FLUSH_PROMPT = ("[Memory flush] This conversation is near its context limit; its older part "
                "will soon be a summary. Save with memory_write what must outlive it (facts, "
                f"decisions, open tasks), a short note each. If nothing, reply only {NO_MEMORY}.")
INDEX_VERSION = 1     # PRAGMA user_version of an index this code built; another is rebuilt
MEMORY_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, hash TEXT, mtime_ns INT, size INT);
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, path TEXT, start_line INT,
                                   end_line INT, text TEXT, day TEXT);
CREATE INDEX IF NOT EXISTS chunks_path ON chunks (path);
CREATE VIRTUAL TABLE IF NOT EXISTS words USING fts5 (text, tokenize = 'unicode61');
CREATE VIRTUAL TABLE IF NOT EXISTS grams USING fts5 (text, tokenize = 'trigram');
PRAGMA user_version = {INDEX_VERSION};"""


def can_search() -> bool:
    """Whether this Python's SQLite has FTS5 with the trigram tokenizer (SQLite 3.34+)."""
    try:
        sqlite3.connect(":memory:").execute(
            "CREATE VIRTUAL TABLE t USING fts5 (x, tokenize = 'trigram')")
        return True
    except sqlite3.Error:
        return False


SEARCH_OK = can_search()  # checked once, at start: without it there is no memory_search
NO_SEARCH = ("memory search is off: it needs SQLite 3.34+ with FTS5 (this Python has "
             f"{sqlite3.sqlite_version}); memory_write and memory_get work")


def chunk_text(text: str) -> list[tuple[int, int, str]]:
    """(first line, last line, text): paragraphs merged up to CHUNK_CHARS; a chunk after the
    first starts with the last line of the one before, so a fact on the border is in both.
    Lines end at "\\n", as memory_get and memory_write count them."""
    lines, paragraphs, start = text.split("\n"), [], None
    for number, line in enumerate(lines + [""], 1):
        if line.strip() and start is None:
            start = number
        elif not line.strip() and start is not None:
            paragraphs.append((start, number - 1))
            start = None
    chunks: list[list[int]] = []
    for first, last in paragraphs:
        if chunks and len("\n".join(lines[chunks[-1][0] - 1:last])) <= CHUNK_CHARS:
            chunks[-1][1] = last
        else:
            chunks.append([chunks[-1][1] if chunks else first, last])
    return [(a, b, "\n".join(lines[a - 1:b])) for a, b in chunks]


def note_day(path: str) -> str | None:
    """The date of a daily note (memory/2026-11-21.md); None for MEMORY.md, which never fades."""
    try:
        return date.fromisoformat(path[7:17]).isoformat() if path.startswith("memory/") else None
    except ValueError:
        return None


class MemoryIndex:
    """SQLite in the state folder: the files (path, content hash), their chunks (lines, text,
    day), and two FTS5 tables over the chunks' text: `words` (unicode61: whole words) and
    `grams` (trigram: Chinese and Japanese text, and parts of words)."""

    def __init__(self, path: Path):
        self.path, self.db, self.lock = path, None, threading.RLock()

    def run(self, work):
        """work(db), one thread at a time. An index that cannot be used now (locked, a folder,
        no space) is a ToolError: one line for whoever asked, never a crash."""
        with self.lock:
            try:
                return self.attempt(work)
            except (sqlite3.Error, OSError) as exc:
                raise ToolError(f"the memory index {self.path} cannot be used now ({exc}); "
                                "the notes themselves are fine") from None

    def attempt(self, work):
        """Whatever fails rolls back (the connection is closed). A file that is no index of
        this version is moved aside, and the index is built again from the notes."""
        for tries in (1, 2):
            try:
                return work(self.connect())
            except BaseException as exc:
                if self.db:
                    self.db.close()  # what was not committed is rolled back
                self.db = None
                if type(exc) is not sqlite3.DatabaseError or tries == 2:
                    raise  # locked, missing a feature, a bug: not the file's fault
                aside = self.path.with_name(f"memory.corrupt-{time.time_ns()}.sqlite")
                self.path.replace(aside)
                log(f"[memory] {self.path} is not a usable index ({exc}); moved it to "
                    f"{aside.name} and built a new one from the notes")

    def connect(self) -> sqlite3.Connection:
        if self.db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, 0o600))
            self.db = sqlite3.connect(self.path, timeout=1, check_same_thread=False)
            version, tables = self.db.execute(
                "SELECT (SELECT user_version FROM pragma_user_version), count(*) "
                "FROM sqlite_master").fetchone()
            if tables and version != INDEX_VERSION:  # another program's, or an older schema
                raise sqlite3.DatabaseError(f"another schema, user_version {version}")
            self.db.executescript(MEMORY_SCHEMA)
        return self.db

    def refresh(self, db: sqlite3.Connection) -> None:
        """Follow the files: a stat() each; a file whose size or time changed is hashed, and
        only one whose content changed is chunked again; a file that is gone is dropped. A
        file that cannot be indexed (too large, unreadable, not UTF-8) loses its chunks, with
        a line, and is tried again when it changes."""
        known = {row[0]: row[1:] for row in db.execute("SELECT * FROM files")}
        for path, target, info in memory_files():
            old = known.pop(path, None)
            if old and old[1:] == (info.st_mtime_ns, info.st_size):
                continue
            try:
                if info.st_size > MAX_INDEX_BYTES:
                    raise ToolError(f"it is over {MAX_INDEX_BYTES:,} bytes")
                text = read_text(Path(target), path, MAX_INDEX_BYTES)
                digest = hashlib.sha256(text.encode()).hexdigest()
            except (ToolError, OSError) as exc:
                warn_once(f"[memory] not searchable: {path}: {getattr(exc, 'strerror', 0) or exc}")
                text, digest = "", "not indexed"
            if not old or old[0] != digest:
                self.forget(db, path)
                for first, last, chunk in chunk_text(text):
                    rowid = db.execute("INSERT INTO chunks VALUES (NULL, ?, ?, ?, ?, ?)",
                                       (path, first, last, chunk, note_day(path))).lastrowid
                    db.execute("INSERT INTO words (rowid, text) VALUES (?, ?)", (rowid, chunk))
                    db.execute("INSERT INTO grams (rowid, text) VALUES (?, ?)", (rowid, chunk))
            db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                       (path, digest, info.st_mtime_ns, info.st_size))
        for path in known:  # no longer there
            self.forget(db, path)
            db.execute("DELETE FROM files WHERE path = ?", (path,))
        db.commit()

    def forget(self, db: sqlite3.Connection, path: str) -> None:
        ids = db.execute("SELECT id FROM chunks WHERE path = ?", (path,)).fetchall()
        db.executemany("DELETE FROM words WHERE rowid = ?", ids)
        db.executemany("DELETE FROM grams WHERE rowid = ?", ids)
        db.execute("DELETE FROM chunks WHERE path = ?", (path,))

    def ranked(self, db: sqlite3.Connection, query: str, limit: int) -> list[dict]:
        """BM25 from both indexes, each divided by its best; fused half and half; times the
        temporal decay; then MMR, which also drops near copies. A run of more than three
        Chinese or Japanese characters (a question with no spaces is one "word") is looked
        up as its trigrams, so a note holding part of it is found."""
        self.refresh(db)
        words = list(dict.fromkeys(re.findall(r"\w+", query.lower())))[:MAX_QUERY_WORDS]
        grams = [g for w in words if len(w) >= 3 for g in
                 ([w[i:i + 3] for i in range(len(w) - 2)] if CJK_RUN.search(w) else [w])]
        scores: dict[int, list[float]] = {}
        for slot, table, wanted in ((0, "words", words),
                                    (1, "grams", list(dict.fromkeys(grams))[:MAX_QUERY_WORDS])):
            # Each word a quoted FTS5 string: what the person typed is never read as FTS syntax.
            match = " OR ".join('"' + word.replace('"', '""') + '"' for word in wanted)
            rows = db.execute(f"SELECT rowid, -bm25({table}) FROM {table} WHERE {table} MATCH ? "
                              f"ORDER BY bm25({table}) LIMIT {CANDIDATES}", (match,)).fetchall() \
                if wanted else []
            for rowid, score in rows:
                scores.setdefault(rowid, [0.0, 0.0])[slot] = score / rows[0][1]
        if words and max(map(len, words)) < 3:  # too short for trigrams: scan the chunks
            found = " + ".join("(instr(lower(text), ?) > 0)" for _ in words)
            for rowid, hits in db.execute(f"SELECT id, {found} FROM chunks WHERE {found} > 0 "
                                          f"LIMIT {CANDIDATES}", words * 2):
                scores.setdefault(rowid, [0.0, 0.0])[1] = hits / len(words)
        results, today = [], date.today()
        for rowid, path, first, last, text, day in db.execute(
                f"SELECT * FROM chunks WHERE id IN ({','.join('?' * len(scores))})", list(scores)):
            age = max((today - date.fromisoformat(day)).days, 0) if day else 0
            results.append({"path": path, "start": first, "end": last, "text": text,
                            "score": sum(scores[rowid]) / 2 * 0.5 ** (age / HALF_LIFE_DAYS)})
        return pick(sorted(results, key=lambda r: -r["score"])[:limit * 2], limit)


def pick(candidates: list[dict], limit: int) -> list[dict]:
    """Maximal marginal relevance: each time, the result most relevant and least like those
    taken already (Jaccard similarity of trigrams); a near copy of one taken is dropped."""
    for r in candidates:
        flat = " ".join(r["text"].lower().split())
        r["grams"], r["like"] = set(zip(flat, flat[1:], flat[2:])) or {flat}, 0.0
    chosen: list[dict] = []
    while candidates and len(chosen) < limit:
        best = max(candidates, key=lambda r: MMR_LAMBDA * r["score"] - (1 - MMR_LAMBDA) * r["like"])
        candidates.remove(best)
        if best["like"] >= DUPLICATE:
            continue
        chosen.append(best)
        for r in candidates:  # how like the one just taken; the most alike counts
            same = len(r["grams"] & best["grams"])
            r["like"] = max(r["like"], same / (len(r["grams"]) + len(best["grams"]) - same))
    return chosen


MEMORY = MemoryIndex(MEMORY_INDEX_FILE)


def memory_files() -> list[tuple[str, str, os.stat_result]]:
    """(name, path, stat) of MEMORY.md and the regular files memory/*.md (links not followed),
    each on its own: one that cannot be used never hides the others. A name that is not UTF-8
    is skipped with one line."""
    found = []
    try:
        found.append(("MEMORY.md", str(safe_path("MEMORY.md")), safe_path("MEMORY.md").stat()))
    except (ToolError, OSError):
        pass
    try:
        with os.scandir(safe_path("memory")) as entries:
            for e in (e for e in entries if e.name.endswith(".md")):
                try:
                    e.name.encode()  # a name SQLite can store, and a person can read
                    if e.is_file(follow_symlinks=False):
                        found.append((f"memory/{e.name}", e.path, e.stat(follow_symlinks=False)))
                except UnicodeEncodeError:
                    warn_once(f"[memory] skipped memory/{e.name}: the name is not UTF-8")
                except OSError:
                    pass  # gone since the listing
    except (ToolError, OSError):
        pass
    return found


def memory_write(text: str) -> str:
    """Append a note to today's file, memory/YYYY-MM-DD.md (local date), under the time. Past
    MAX_NOTE_BYTES the day goes on in memory/YYYY-MM-DD-2.md, then -3..."""
    if not text.strip():
        raise ToolError("text is empty: write the note itself")
    if len(text) > MAX_NOTE_CHARS:
        raise ToolError(f"the note has {len(text):,} characters; at most {MAX_NOTE_CHARS:,}: "
                        "save what matters, or several shorter notes")
    now = time.localtime()
    day = time.strftime("%Y-%m-%d", now)
    safe_path("memory").mkdir(exist_ok=True)
    for n in count(1):
        name = f"memory/{day}{f'-{n}' if n > 1 else ''}.md"
        fd = os.open(safe_path(name), os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_NONBLOCK, 0o644)
        info = os.fstat(fd)
        if info.st_size < MAX_NOTE_BYTES or not stat.S_ISREG(info.st_mode):
            break
        os.close(fd)
    try:
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:  # a FIFO, a hard link out
            raise ToolError(f"{name} is not a regular file with one name; not written")
        lines = sum(part.count(b"\n") for part in iter(lambda: os.read(fd, 1 << 16), b""))
        head = "" if info.st_size else f"# {day}\n"
        entry = f"{head}\n## {time.strftime('%H:%M', now)}\n{text.strip()}\n"
        os.write(fd, entry.encode("utf-8"))
    finally:
        os.close(fd)
    first, last = lines + head.count("\n") + 2, lines + entry.count("\n")  # the heading, the end
    return f"saved to today's daily note\n{name}, lines {first}-{last}"


def memory_search(query: str, limit: int = 5) -> str:
    """The notes that match best, best first: file:lines (score), then a snippet."""
    if not query.strip():
        raise ToolError("query is empty: say what to look for")
    results = MEMORY.run(lambda db: MEMORY.ranked(db, query, max(1, min(limit, 20))))
    lines = [f"{plural(len(results), 'result')} for {query!r}, best first:"]
    words = re.findall(r"\w+", query.lower())[:MAX_QUERY_WORDS]
    for r in results:
        flat = " ".join(r["text"].split())
        at = min([i for w in words if (i := flat.lower().find(w)) >= 0] or [0])
        lines += [f"{printable(r['path'])}:{r['start']}-{r['end']} ({r['score']:.2f})",
                  f"  {'...' if at > 60 else ''}{flat[max(at - 60, 0):at + 200]}"]
    return "\n".join(lines) if results else f"nothing in memory matches {query!r}"


def memory_get(path: str, start_line: int = 1, lines: int = 40) -> str:
    """Lines of MEMORY.md or of a note in memory/, and of no other file; read line by line,
    so a large note costs no more memory than the lines asked for."""
    target = safe_path(path)
    if target.suffix != ".md" or (target != safe_path("MEMORY.md")
                                  and target.parent != safe_path("memory")):
        raise ToolError(f"{path}: memory_get reads MEMORY.md and memory/*.md only; "
                        "use read_file for other files")
    first, kept, total = max(start_line, 1), [], 0
    last = first + max(1, min(lines, 1_000)) - 1
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ToolError(f"file not found: {path}")
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ToolError(f"{path} is not a regular file")
        for total, line in enumerate(f, 1):
            if first <= total <= last:
                kept.append(line.decode("utf-8", errors="replace").rstrip("\r\n"))
    return truncate(f"{path}, lines {first}-{min(last, total)} of {total}:\n" + "\n".join(kept))


def flush_memory(client: anthropic.Anthropic, messages: list, out: TerminalOutput,
                 agent: Agent, prompt: Prompt | None = None) -> None:
    """A silent turn before a compaction: the model may save what must outlive the summary.
    It runs on a copy of the history (the exchange is not kept), with the turn's system blocks
    and the agent's tools, so it reads the cached prefix; only the memory tools run (another
    call gets an error result), shown as notes. Its reply shows only if it says more than
    NO_MEMORY."""
    allowed = [name for name in MEMORY_TOOLS if name in agent.tools]
    if "memory_write" not in allowed:
        return
    system = (prompt or build_prompt(agent, out.channel_name, out.skill)).blocks()
    view = list(messages)
    add_user_text(view, FLUSH_PROMPT)
    try:
        for _ in range(FLUSH_ROUNDS):
            reply = client.messages.create(model=agent.model, max_tokens=1024, system=system,
                                           tools=agent.tool_schemas(), messages=view,
                                           cache_control=CACHE_BREAKPOINT)
            if reply.stop_reason != "tool_use":
                break
            results, _ = run_tool_calls(reply.content, out, allowed)
            view += [{"role": "assistant", "content": assistant_content(reply)},
                     {"role": "user", "content": results}]
    except anthropic.APIError as exc:
        return out.note(f"[memory] the flush before compaction failed: {describe_api_error(exc)}")
    except KeyboardInterrupt:
        return out.note("[memory] flush interrupted")
    said = "".join(b.text for b in reply.content if b.type == "text").strip()
    if said and NO_MEMORY not in said:
        out.note(f"[memory] before compacting: {printable(said)}")


def widen_old_default(config: dict) -> bool:
    """gateway.json from an s05 that wrote its default agent's tools as the list of the five
    s02 tools, which meant "every tool": make it "*" once (version 2 marks it done), so the
    memory tools reach that agent. Any other list is the operator's choice and is kept."""
    old = ["bash", "read_file", "write_file", "edit_file", "list_dir"]
    for agent in config["agents"]:
        if config.get("version", 1) == 1 and agent["id"] == AGENT_ID and agent["tools"] == old:
            agent["tools"], config["version"] = "*", 2
            return True
    return False


TOOLS = TOOLS + [
    {"name": "memory_write", "description": "Save a note for later (a fact, a decision, a "
     "preference): appended to today's file in memory/, found by memory_search.",
     "input_schema": {"type": "object", "required": ["text"], "properties": {"text": {
         "type": "string", "description": "The note: short and self-contained (at most "
         f"{MAX_NOTE_CHARS:,} characters)."}}}},
    {"name": "memory_search", "description": "Search the notes (MEMORY.md, memory/) by words in "
     "any language, parts of words too. Gives file:lines (score) and a snippet for each.",
     "input_schema": {"type": "object", "properties": {
         "query": {"type": "string", "description": "Words to look for."},
         "limit": {"type": "integer", "description": "At most this many results (default 5)."}},
         "required": ["query"]}},
    {"name": "memory_get", "description": "Read lines of MEMORY.md or of a memory/ note.",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string", "description": "MEMORY.md or memory/<name>.md."},
         "start_line": {"type": "integer", "description": "First line (default 1)."},
         "lines": {"type": "integer",
                   "description": "How many lines (default 40, at most 1,000)."}},
         "required": ["path"]}},
]
TOOL_HANDLERS = {"bash": bash, "read_file": read_file, "write_file": write_file,
                 "edit_file": edit_file, "list_dir": list_dir, "memory_write": memory_write,
                 "memory_search": memory_search, "memory_get": memory_get}
if not SEARCH_OK:  # SQLite without the trigram tokenizer: no index, no search (main says so)
    TOOLS = [tool for tool in TOOLS if tool["name"] != "memory_search"]
    del TOOL_HANDLERS["memory_search"]
DEFAULT_AGENT = Agent(AGENT_ID, "Claw", MODEL_ID, list(TOOL_HANDLERS))  # when a turn names none


# --- [s06] Skills: an index in the prompt, the body on use --------------------
SKILLS_DIR = WORKSPACE_DIR / "skills"
FRONT_MATTER_BYTES = 6_000  # of a SKILL.md, the index reads its head only: the front matter


@dataclass
class Skill:
    name: str
    description: str
    path: str  # its SKILL.md, relative to the workspace


def front_matter(text: str) -> dict[str, str]:
    """The `key: value` lines between the two `---` lines that open a SKILL.md (after a BOM)."""
    m = re.match(r"\ufeff?---\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, flags=re.S)
    pairs = (line.partition(":") for line in m.group(1).splitlines()) if m else ()
    return {key.strip(): value.strip().strip("\"'") for key, colon, value in pairs if colon}


def load_skills() -> tuple[dict[str, Skill], list[str]]:
    """The skills by name, and a sentence for each folder skipped (said once, not every turn).
    A SKILL.md is read again only when it changes, and only its head."""
    skills, problems = {}, []
    try:
        folders = sorted(SKILLS_DIR.iterdir()) if SKILLS_DIR.is_dir() else []
    except OSError as exc:
        folders = []
        problems.append(f"{SKILLS_DIR.name}/: it cannot be read ({exc.strerror})")
    for folder in folders:
        path = f"skills/{folder.name}/SKILL.md"
        text = read_workspace_text(path, FRONT_MATTER_BYTES)
        if not text:  # none, or unusable (said by read_workspace_text)
            continue
        meta = front_matter(text)
        if meta.get("name") != folder.name or not SAFE_ID.fullmatch(folder.name):
            problems.append(f"{path}: its front matter must say name: {folder.name}, and a "
                            "skill's name is lowercase letters, digits, - or _")
        elif not meta.get("description"):
            problems.append(f"{path}: its front matter has no description")
        elif f"/{folder.name}" in COMMANDS or folder.name == "start":
            problems.append(f"{path}: /{folder.name} is a command's name; rename the skill")
        else:
            skills[folder.name] = Skill(folder.name, meta["description"], path)
    for problem in problems:
        warn_once(f"[skills] skipped {problem}")
    return skills, problems


def skills_index(skills: dict[str, Skill]) -> str:
    """The prompt's list of skills: a line each. The instructions stay in their files."""
    if not skills:
        return ""
    return ("# Skills\n\nA skill is written instructions for one kind of task. When one fits, "
            "read its SKILL.md with read_file and follow it. The person can also start one "
            "with /<name>.\n\n"
            + "\n".join(f"- {s.name}: {s.description} ({s.path})" for s in skills.values()))


def skill_for(line: str) -> Skill | None:
    """The skill that "/<skill-name> [words]" starts, or None. A command's name (/new, /help,
    a chat's /start) is never a skill's."""
    words = line[1:].split(maxsplit=1) if line.startswith("/") else []
    if not words or f"/{words[0]}" in COMMANDS or words[0] == "start":
        return None
    return load_skills()[0].get(words[0])


# --- [s06] Commands: soul, prompt, memory, search, skills ---------------------
def show_soul(repl: Repl, arg: str) -> None:
    for name in ("IDENTITY.md", "SOUL.md"):
        source, text = layer_source(repl.agent.id, name)
        whose = "this agent's own" if source.startswith("agents/") else "shared"
        print(f"--- {source} ({whose})" if text else f"--- {source}: none")
        print(printable(text.strip(), keep_lines=True))


def show_prompt(repl: Repl, arg: str) -> None:
    prompt, guard = build_prompt(repl.agent, "terminal"), repl.guard
    base, how = guard.count([{"role": "user", "content": "."}], repl.agent, prompt)
    print(f"The system prompt of agent {repl.agent.id} at the terminal (tokens {how}):")
    for layer in prompt.stable + [None] + prompt.volatile:
        if layer is None:
            print("  ---- cache breakpoint: the tools and all of the above are cached ----")
        elif layer.text or layer.cut:
            tokens = guard.count([{"role": "user", "content": layer.text or "."}], repl.agent,
                                 prompt)[0] - base
            print(f"  {layer.name:<17} {printable(layer.source):<22} {len(layer.text):>7,} chars "
                  f"{tokens:>6,} tokens" + (f"  cut: {layer.cut}" if layer.cut else ""))
    cut = [layer.name for layer in prompt.stable if layer.cut]
    print(f"Cut: {', '.join(cut)}" if cut else f"Nothing cut (at most {MAX_FILE_CHARS:,} "
          f"characters a file, {MAX_PROMPT_CHARS:,} in all).")


def show_memory(repl: Repl, arg: str) -> None:
    try:
        if not SEARCH_OK:
            raise ToolError(NO_SEARCH)
        rows = MEMORY.run(lambda db: MEMORY.refresh(db) or db.execute(
            "SELECT path, count(*) FROM chunks GROUP BY path ORDER BY path").fetchall())
        size = MEMORY_INDEX_FILE.stat().st_size
    except (ToolError, OSError) as exc:
        return print(printable(str(exc)))
    for path, chunks in rows:
        print(f"  {printable(path):<24} {plural(chunks, 'chunk')}")
    print(f"Index {MEMORY_INDEX_FILE}: {plural(len(rows), 'file')}, "
          f"{plural(sum(n for _, n in rows), 'chunk')}, {size:,} "
          "bytes; brought up to date with the files now, and at every search")


def search_memory(repl: Repl, arg: str) -> None:
    """As the tool searches, errors included: a line, never the end of the gateway."""
    if not arg:
        return print("Usage: /search <words>")
    found = run_tool("memory_search", {"query": arg})[0] if SEARCH_OK else NO_SEARCH
    print(printable(found, keep_lines=True))


def show_skills(repl: Repl, arg: str) -> None:
    skills, problems = load_skills()
    for skill in skills.values():
        print(f"  /{skill.name}  {printable(skill.description)}  ({skill.path})")
    for problem in problems:
        print(f"  skipped {printable(problem)}")
    if not skills and not problems:
        print(f"No skills: add {SKILLS_DIR.name}/<name>/SKILL.md with a name and a description.")


def run_skill(repl: Repl, skill: Skill, line: str) -> None:
    """A turn whose prompt carries the skill's SKILL.md; the turns after it do not."""
    out = TerminalOutput()
    out.skill = skill
    out.note(f"[skill] {skill.name}: {skill.path} joins this turn's prompt")
    agent_turn(repl.client, repl.session, line, repl.guard, out, repl.agent)


# --- [s07] Heartbeat: the agent speaks first, when there is something to say ---
# A timer asks "should I run?" every TICK_SECONDS. Once an interval the heartbeat runs, if
# HEARTBEAT.md asks for something, the hour is an active one and no person's turn is running.
HEARTBEAT_INTERVAL = number_setting("HEARTBEAT_INTERVAL", 1800, 0, 366 * 86400)  # 0: off
HEARTBEAT_ACTIVE_HOURS = os.getenv("HEARTBEAT_ACTIVE_HOURS") or "08:00-22:00"
HEARTBEAT_TZ = os.getenv("HEARTBEAT_TZ") or ""  # the active hours' zone; empty: the machine's
HEARTBEAT_TARGET = os.getenv("HEARTBEAT_TARGET") or "terminal"  # or telegram:<chat>, feishu:<id>
HEARTBEAT_FILE = STATE_DIR / "heartbeat.json"  # the last message delivered: kept across restarts
HEARTBEAT_OK = "HEARTBEAT_OK"  # the model's "nothing to say"
HEARTBEAT_OK_CHARS = 300       # HEARTBEAT_OK at an end, and at most this much more: dropped
REPEAT_WINDOW = timedelta(hours=24)  # the same words as the last delivered, within this: dropped
TICK_SECONDS = 1.0             # how often the timer asks the heartbeat and the cron jobs
HEARTBEAT_PROMPT = ("[Heartbeat] It is {now}. Go through this checklist from HEARTBEAT.md. If "
                    "nothing needs the person's attention now, reply only HEARTBEAT_OK.\n\n{items}")
# Where output may go. ASCII only: "telegram:４２" would reach chat 42 but not be "its" chat.
TARGET = re.compile(r"terminal|telegram:-?\d{1,20}|feishu:[\w-]{1,128}", re.ASCII)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def shown_time(when: datetime | None, zone: ZoneInfo | None = None) -> str:
    """A moment as the terminal shows it: in local time (or in `zone`), with its UTC offset."""
    return when.astimezone(zone).strftime("%Y-%m-%dT%H:%M:%S%z") if when else "never"


class JobError(ValueError):
    """A setting or a job that cannot be used; the message is 'field: what is wrong'."""


def zone_of(field: str, name) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (TypeError, ValueError, KeyError, OSError):  # KeyError: ZoneInfoNotFoundError
        raise JobError(f"{field}: {name!r} is not a time zone like Europe/Berlin")


def parse_hours(text: str) -> tuple[int, int]:
    """'08:00-22:00' -> (480, 1320) minutes; the end may be 24:00, or before the start (past
    midnight: '22:00-06:00')."""
    m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)", text.strip())
    if not m or (m[3] == "24" and m[4] != "00"):
        raise JobError(f"HEARTBEAT_ACTIVE_HOURS: {text!r} is not like 08:00-22:00")
    return int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])


def heartbeat_items(text: str) -> list[str]:
    """The lines of HEARTBEAT.md that ask for something: not blank, not a heading, not inside
    <!-- -->, not a list item with nothing in it. None: the heartbeat makes no model call."""
    text = re.sub(r"<!--.*?(-->|\Z)", "", text, flags=re.S)
    return [line.strip() for line in text.splitlines() if line.strip()
            and not line.lstrip().startswith("#")
            and not re.fullmatch(r"\s*([-*+]|\d+[.)])(\s+\[[ xX]?\])?\s*", line)]


def heartbeat_reply(text: str) -> str | None:
    """What a heartbeat reply has to say, or None. HEARTBEAT_OK at its start or end with at most
    HEARTBEAT_OK_CHARS besides means "nothing to say"; in the middle of a message it is words."""
    text, ok = text.strip().strip("*`").strip(), HEARTBEAT_OK
    if not (text.startswith(ok) or text.endswith(ok)):
        return text
    rest = (text[len(ok):] if text.startswith(ok) else text[:-len(ok)]).strip(" \n.!:-*`")
    return rest if len(rest) > HEARTBEAT_OK_CHARS else None


def open_target(bus: MessageBus, target: str) -> tuple[Channel, InboundMessage]:
    """Channel and address of 'terminal', 'telegram:<chat>' or 'feishu:<id>'; ChannelError: off."""
    name, _, to = target.partition(":")
    channel = bus.channels.get(name)
    if channel is None or channel.state == "off":
        raise ChannelError(f"{name} is off ({channel.detail if channel else 'not set up'})")
    group = to.startswith("-") if name == "telegram" else to.startswith("oc_")  # a group chat
    return channel, InboundMessage(channel=name, account="", peer=to or "local",
                                   sender=to or "local", text="", is_group=group,
                                   raw={"scheduled": True})  # not a chat: no cron tools


def deliver(bus: MessageBus, target: str, text: str, label: str) -> None:
    """Scheduled output goes out through the target channel's deliver(), as a reply does: to a
    chat through the delivery queue (s08)."""
    channel, where = open_target(bus, target)
    channel.deliver(where, f"[{label}] {text}" if where.channel == "terminal" else text)


def scheduled_turn(bus: MessageBus, agent: Agent, key: str, target: str, message: str) -> str:
    """A turn in session `key` whose words are for `target`; raises when it does not end well.
    The prompt is the agent's usual one: its cached prefix is the same as in any other turn.
    Each run starts from an empty history (the runs before stay in the file), so a run costs
    the same on the hundredth day as on the first."""
    channel, where = open_target(bus, target)  # the channel is off: no tokens spent
    label = key if target == "terminal" else f"{key} for {target}"  # in approval lines too
    reply = ChatReply(where, channel, bus.approvals, agent.id, label)
    session = bus.store_for(agent.id).for_key(key)
    if session.messages:
        session.replace([], "a new scheduled run")
    if agent_turn(bus.client, session, message, bus.guard, reply, agent) is None:
        raise RuntimeError(reply.text() or "the turn ended early")
    return reply.text()


def read_state(path: Path) -> dict:
    """A state file of this section: {} when it is missing, or (with a line) not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    except FileNotFoundError:
        return {}
    except (ValueError, OSError, RecursionError):
        pass
    log(f"[state] {path} is not a JSON object: starting afresh (the next save replaces it)")
    return {}


def parse_moment(field: str, value) -> datetime:
    try:
        when = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise JobError(f"{field}: {value!r} is not a time like 2030-01-01T09:00:00+01:00")
    if when.tzinfo is None:
        raise JobError(f"{field}: {value!r} has no UTC offset (add one, like +01:00)")
    if not 1970 <= when.year < 3000:  # far from year 1 and 9999: no sum, no zone overflows
        raise JobError(f"{field}: {value!r} is not between the years 1970 and 2999")
    return when


def moment(text) -> datetime | None:
    """A time from a state file, or None."""
    try:
        return parse_moment("state", text)
    except JobError:
        return None


class HeartbeatRunner:
    """tick() decides whether the heartbeat runs now, and queues it at the bus. `clock` gives the
    time (aware), so a test steps through days in milliseconds; main() ticks every second."""

    def __init__(self, bus: MessageBus, agent: Agent, clock=None):
        self.bus, self.agent, self.clock = bus, agent, clock or utc_now
        try:
            self.hours = parse_hours(HEARTBEAT_ACTIVE_HOURS)
            self.zone = zone_of("HEARTBEAT_TZ", HEARTBEAT_TZ) if HEARTBEAT_TZ else None
            if not TARGET.fullmatch(HEARTBEAT_TARGET):
                raise JobError(f"HEARTBEAT_TARGET: {HEARTBEAT_TARGET!r} is not terminal, "
                               "telegram:<chat id> or feishu:<open_id or chat_id>")
        except JobError as exc:
            raise ConfigError(f"{exc}. Fix it in .env (.env.example explains it).")
        self.key = f"agent:{agent.id}:heartbeat"  # its own session: never a person's
        self.interval = timedelta(seconds=HEARTBEAT_INTERVAL)
        self.next_run = self.clock() + self.interval if HEARTBEAT_INTERVAL > 0 else None
        self.state = read_state(HEARTBEAT_FILE)  # last_text, last_sent, last_run, last_result
        self.queued = False  # one heartbeat at a time

    def tick(self) -> None:
        now = self.clock()
        with self.bus.lock:  # a chat of this agent in line, or a terminal turn: the next tick
            busy = any(key.startswith(f"agent:{self.agent.id}:") for key in self.bus.waiting)
        if self.next_run is None or now < self.next_run or self.queued or busy or \
                not at_prompt.is_set():
            return
        self.next_run = now + self.interval
        local = now.astimezone(self.zone)  # zone None: the machine's, DST included
        (start, end), minute = self.hours, local.hour * 60 + local.minute
        if (start <= minute < end) if start < end else (start <= minute or minute < end):
            self.start(now)
        else:
            self.state["last_result"] = f"skipped: {local:%H:%M} is outside the active hours"

    def start(self, now: datetime) -> str:
        """Queue a heartbeat turn, unless HEARTBEAT.md asks for nothing: then no model call."""
        items = heartbeat_items(layer_source(self.agent.id, "HEARTBEAT.md")[1])
        if not items:
            self.state["last_result"] = "skipped: HEARTBEAT.md asks for nothing (no model call)"
            return self.state["last_result"]
        if self.queued:
            return "A heartbeat is running already."
        self.queued = True  # before submit(): the run may be over before submit() returns
        self.bus.submit(self.key, lambda: self.run(items, now))
        return f"Heartbeat queued: {plural(len(items), 'item')} from HEARTBEAT.md."

    def run(self, items: list[str], now: datetime) -> None:
        """One heartbeat turn, on a bus worker; the checklist is the message."""
        try:
            prompt = HEARTBEAT_PROMPT.format(now=shown_time(now, self.zone), items="\n".join(items))
            text = scheduled_turn(self.bus, self.agent, self.key, HEARTBEAT_TARGET, prompt)
            said, last = heartbeat_reply(text), moment(self.state.get("last_sent"))
            if said is None:  # what came with HEARTBEAT_OK is not delivered: the operator sees it
                besides = text.replace(HEARTBEAT_OK, "").strip(" \n.!:-*`")
                result = "HEARTBEAT_OK: nothing to say, not delivered" + (
                    f" (besides it: {preview(besides)})" if besides else "")
            elif said == self.state.get("last_text") and last and now - last < REPEAT_WINDOW:
                result = "the same as the last message it delivered (within 24 h): dropped"
            else:
                deliver(self.bus, HEARTBEAT_TARGET, said, "heartbeat")
                self.state.update(last_text=said, last_sent=self.clock().isoformat())
                result = f"delivered to {HEARTBEAT_TARGET}"
        except Exception as exc:  # the turn failed, the channel is off or refused, a full disk
            result = f"not delivered: {type(exc).__name__}: {printable(str(exc))}"
        self.queued = False
        self.state.update(last_run=now.isoformat(), last_result=result)
        log(f"[heartbeat] {result}")
        write_atomic(HEARTBEAT_FILE, json.dumps(self.state, indent=2, ensure_ascii=False))

    def describe(self) -> list[str]:
        zone = HEARTBEAT_TZ or f"the machine's zone, {self.clock().astimezone().tzname()}"
        items = len(heartbeat_items(layer_source(self.agent.id, "HEARTBEAT.md")[1]))
        return [f"Heartbeat: every {HEARTBEAT_INTERVAL} s, active {HEARTBEAT_ACTIVE_HOURS} "
                f"({zone}), to {HEARTBEAT_TARGET}" if self.next_run else "Heartbeat: off",
                f"  HEARTBEAT.md: {plural(items, 'item')} to act on; next run "
                f"{shown_time(self.next_run)}; last: "
                f"{printable(str(self.state.get('last_result', 'none yet')))}"]  # a file: escaped


def tick_forever(runners: list, stop: threading.Event) -> None:
    """The timer thread. A tick that fails is a line (one per burst), and the timer goes on."""
    problems = Burst(60)
    while not stop.wait(TICK_SECONDS):
        for runner in runners:
            try:
                runner.tick()
            except Exception as exc:
                line = problems.line(f"[timer] {type(exc).__name__}: {printable(str(exc))}")
                if line:
                    log(line)


# --- [s07] Cron: jobs from CRON.json, on time, in their time zone -------------
# CRON.json is the agent's file in the workspace (it may edit it; so may you). What the
# scheduler remembers (last and next run, errors in a row) is state, out of the tools' reach.
CRON_FILE = "CRON.json"  # in the workspace
CRON_STATE_FILE = STATE_DIR / "cron" / "state.json"
CRON_LOG = STATE_DIR / "cron" / "runs.jsonl"
CRON_LOG_MAX = 1_000_000  # bytes; past this runs.jsonl becomes runs.1.jsonl (the older one goes)
BACKOFF = (30, 60, 300, 900, 3600)  # seconds before the next try, after 1, 2, 3... errors in a row
MAX_ERRORS = 5  # errors in a row that switch a job off
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)  # what an `every` job without an anchor aligns to
TURN_TOOLS = {"cron_add", "cron_list", "cron_remove"}  # handed the turn's `out`: who is asking
CRON_FILE_MAX = 200_000  # bytes of CRON.json, read and written: a change past it is refused
CRON_EXPR = re.compile(r"\S{1,64}( \S{1,64}){4}")  # five fields: no seconds, no years, no 100 KB
MAX_EVERY = 10 * 365 * 86400  # seconds: the longest interval of an `every` job (ten years)
MAX_JOB_TEXT = 2_000  # characters of a job's text or message
MAX_CHAT_JOBS = 10  # jobs that deliver to one chat: as many as cron_add adds from it
MIN_INTERVAL = {"system_event": 60, "agent_turn": 900}  # seconds between runs of cron_add's jobs
CRON_AT_ONCE = 2  # cron runs at once (the heartbeat is one more): the other workers are for people
NOTE_CHARS = 300  # of a system event's text, in its note in the terminal's session
terminal_notes: deque = deque(maxlen=50)  # what system events said, for the terminal's session
cron_file_lock = threading.Lock()  # one read-change-write of CRON.json at a time


def add_terminal_notes(session: Session) -> None:
    """On the main thread, between turns: what system events said joins the terminal's session
    as a user message (or the user message it ends with), and the person's next words join it
    too: the agent knows what was said, and the roles still alternate."""
    for _ in range(len(terminal_notes)):
        add_user_text(session.messages, terminal_notes.popleft())
    session.save()  # nothing new: nothing written


def job_target(job: dict) -> str:
    """A job's deliver {"channel", "to"} (the terminal when it has none) as a target."""
    where = job.get("deliver", {"channel": "terminal"})
    to = where.get("to") if isinstance(where, dict) else None
    return f"{where.get('channel')}" + (f":{to}" if to not in (None, "") else "") \
        if isinstance(where, dict) else ""


def check_job(job) -> None:
    """Raise JobError naming the first field of a CRON.json job that cannot be used."""
    if not isinstance(job, dict) or not isinstance(job.get("id"), str) or \
            not SAFE_ID.fullmatch(job["id"]):
        raise JobError("id: lowercase letters, digits, - or _ (at most 32)")
    if not isinstance(job.get("enabled", True), bool):
        raise JobError("enabled: true or false")
    agent = job.get("agent", AGENT_ID)  # who runs an agent_turn: the default agent, unless named
    if not isinstance(agent, str) or not SAFE_ID.fullmatch(agent):
        raise JobError("agent: the id of an agent in gateway.json")
    schedule, payload = job.get("schedule"), job.get("payload")
    kind = schedule.get("kind") if isinstance(schedule, dict) else None
    if kind == "at":
        parse_moment("schedule.at", schedule.get("at"))
    elif kind == "every":
        if type(schedule.get("seconds")) is not int or not 1 <= schedule["seconds"] <= MAX_EVERY:
            raise JobError("schedule.seconds: a whole number of seconds, 1 to ten years")
        if "anchor" in schedule:
            parse_moment("schedule.anchor", schedule["anchor"])
    elif kind == "cron":
        from croniter import croniter  # loaded when a job needs it: it costs a tenth of a second
        expr = schedule.get("expr")  # CRON_EXPR first: croniter takes a second for 100 KB
        if not (isinstance(expr, str) and CRON_EXPR.fullmatch(expr) and croniter.is_valid(expr)):
            raise JobError(f"schedule.expr: {expr!r:.80} is not a cron expression like 0 9 * * 1-5")
        zone_of("schedule.tz", schedule.get("tz"))
    else:
        raise JobError("schedule.kind: must be at, every or cron")
    try:  # "0 0 30 2 *" is a valid expression, but no day ever comes
        next_run(job, utc_now())
    except ValueError:  # croniter's CroniterBadDateError
        raise JobError("schedule: it has no next time")
    field = {"agent_turn": "message", "system_event": "text"}.get(
        payload.get("kind") if isinstance(payload, dict) else None)
    if field is None:
        raise JobError("payload.kind: must be agent_turn or system_event")
    text = payload.get(field)
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_JOB_TEXT:
        raise JobError(f"payload.{field}: text, not empty, at most {MAX_JOB_TEXT:,} characters")
    if not TARGET.fullmatch(job_target(job)):
        raise JobError('deliver: {"channel": "terminal"}, or telegram / feishu with "to"')


def next_run(job: dict, after: datetime) -> datetime | None:
    """The job's first time strictly after `after`, in UTC; None for an `at` job whose time
    is not after it. A cron expression is read in the job's zone, so 09:00 stays 09:00 there
    across a DST change, and an hour the change repeats does not run a job twice."""
    schedule = job["schedule"]
    if schedule["kind"] == "at":
        when = parse_moment("schedule.at", schedule["at"])
        return when.astimezone(timezone.utc) if when > after else None
    if schedule["kind"] == "every":
        anchor = parse_moment("anchor", schedule["anchor"]) if "anchor" in schedule else EPOCH
        step = timedelta(seconds=schedule["seconds"])
        when = anchor if after < anchor else anchor + step * ((after - anchor) // step + 1)
        return when.astimezone(timezone.utc)
    from croniter import croniter
    local = after.astimezone(zone_of("schedule.tz", schedule["tz"]))
    times = croniter(schedule["expr"], local)
    when = times.get_next(datetime)
    if when.replace(tzinfo=None) == local.replace(tzinfo=None):  # 01:30 again, an hour later
        when = times.get_next(datetime)
    return when.astimezone(timezone.utc)


class CronService:
    """The jobs of CRON.json on a clock: tick() reloads the file when it changed, and queues at
    the bus each job whose time has come. The run state (STATE_DIR/cron/state.json) makes a
    restart neither repeat a run nor lose one: a time missed while down runs once, at start."""

    def __init__(self, bus: MessageBus, clock=None):
        self.bus, self.clock = bus, clock or utc_now
        self.lock = threading.RLock()
        self.text = False                   # CRON.json as last read (None: none; False: unread)
        self.jobs: dict[str, dict] = {}     # the valid jobs, by id
        self.running: set[str] = set()
        jobs = read_state(CRON_STATE_FILE).get("jobs")
        self.state = {"version": 1, "jobs": {k: v for k, v in (
            jobs.items() if isinstance(jobs, dict) else ()) if isinstance(v, dict)}}

    def reload(self) -> None:
        """Read CRON.json again when its (mtime_ns, size) changed: else it costs one stat()."""
        with self.lock:
            text = read_workspace_text(CRON_FILE, CRON_FILE_MAX)
            if text is self.text:
                return
            self.text = text
            try:
                if text is not None and len(text.encode()) > CRON_FILE_MAX:  # its head and tail
                    raise ValueError(f"it is over {CRON_FILE_MAX:,} bytes")
                data = json.loads(text) if text is not None else {"jobs": []}
                if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
                    raise ValueError('it must be an object with a list "jobs"')
            except (ValueError, RecursionError) as exc:
                where = f" line {exc.lineno}" if hasattr(exc, "lineno") else ""
                return log(f"[cron] {CRON_FILE}{where} cannot be used ({printable(str(exc))}); "
                           "the jobs stay as they were. It is read again when it changes.")
            self.jobs = {}
            for number, job in enumerate(data["jobs"]):
                name = str(isinstance(job, dict) and job.get("id") or f"jobs[{number}]")
                try:
                    check_job(job)
                    if job["id"] in self.jobs:
                        raise JobError("id: another job has it already")
                    self.schedule(job, self.clock())  # no next time from the clock's now: off
                except (ValueError, OverflowError) as exc:  # JobError, and croniter's errors
                    log(f"[cron] job {printable(name)} is switched off: {printable(str(exc))}")
                    continue
                self.jobs[job["id"]] = job
            self.state["jobs"] = {k: v for k, v in self.state["jobs"].items()
                                  if k in self.jobs or v.get("errors")}  # remove + add: no reset
            self.save()

    def schedule(self, job: dict, now: datetime) -> None:
        """A job keeps its next run (missed while the gateway was down: it runs once, now). One
        seen first, changed or switched on again gets the first after now: no catch-up."""
        st = self.state["jobs"].setdefault(job["id"], {})
        fingerprint = json.dumps(job["schedule"], sort_keys=True)
        if st.get("schedule") != fingerprint:
            kept = {k: st[k] for k in ("errors", "off") if k in st}  # an edit resets no backoff
            st.clear()
            st.update(kept, schedule=fingerprint)
        if not job.get("enabled", True) or st.get("off") or st.get("done"):
            st["next_run"] = None
        elif not moment(st.get("next_run")):  # none yet, or not a time (a hand-edited state file)
            when = next_run(job, now)
            st["next_run"] = when.isoformat() if when else None
            if when is None:  # an `at` job whose time had passed before it was ever seen
                st["done"] = True
                log(f"[cron] job {job['id']}: its time passed before it was first seen: not run")

    def save(self) -> None:
        write_atomic(CRON_STATE_FILE, json.dumps(self.state, indent=2, ensure_ascii=False))

    def tick(self) -> None:
        self.reload()
        now = self.clock()
        with self.lock:
            for job_id, job in self.jobs.items():
                when = moment(self.state["jobs"][job_id].get("next_run"))
                if when and when <= now and job_id not in self.running and \
                        len(self.running) < CRON_AT_ONCE:  # else: at a later tick
                    try:
                        self.start(job, now)
                    except (ValueError, OverflowError):  # no time after this one: never again
                        self.state["jobs"][job_id].update(off="no next time", next_run=None)
                        self.save()
                        log(f"[cron] job {job_id} is switched off: its schedule has no next time")

    def start(self, job: dict, now: datetime, by_hand: bool = False) -> None:
        """Queue one run. Its next run is written down first, so a crash during this one never
        runs it twice; slots missed meanwhile are not made up: one run, then on from now."""
        with self.lock:
            st = self.state["jobs"][job["id"]]
            if not by_hand:
                slot = moment(st["next_run"])
                after = next_run(job, slot) if job["schedule"]["kind"] != "at" else None
                after = next_run(job, now) if after and after <= now else after
                st["next_run"] = after.isoformat() if after else None
                self.save()
            self.running.add(job["id"])  # before submit(): the run may end before it returns
            self.bus.submit(f"cron:{job['id']}", lambda: self.run(job, now, by_hand))

    def run(self, job: dict, started: datetime, by_hand: bool) -> None:
        """One run, on a bus worker. A system_event's text is delivered as it is (no model call);
        an agent_turn is a turn of the job's agent (the default one if it names none) in the job's
        own session, cron:<id>. What fails is recorded as an error, counted for the backoff."""
        target, payload, key = job_target(job), job["payload"], f"cron:{job['id']}"
        try:
            if payload["kind"] == "system_event":
                text = payload["text"]
            else:
                name = job.get("agent") or self.bus.router.config["default_agent"]
                agent = self.bus.router.agents.get(name)
                if agent is None:  # gone from gateway.json: no other agent runs in its place
                    raise JobError(f"agent: {name} is not in {GATEWAY_FILE.name}")
                text = scheduled_turn(self.bus, agent, key, target, payload["message"])
            deliver(self.bus, target, text, key)
            if payload["kind"] == "system_event" and target == "terminal":  # a chat's: never
                said = json.dumps(text[:NOTE_CHARS], ensure_ascii=False)  # quoted: one fenced line
                terminal_notes.append(f"[{key} said to {target} at {shown_time(started)}: {said}]")
            ok, result = True, f"delivered to {target}"
        except Exception as exc:  # the turn failed, the channel is off or refused the message
            ok, result = False, f"{type(exc).__name__}: {printable(str(exc))}"
        self.finished(job, started, ok, result, by_hand)

    def finished(self, job: dict, started: datetime, ok: bool, result: str,
                 by_hand: bool) -> None:
        """Record a run. Each error in a row waits longer (BACKOFF); after MAX_ERRORS the job is
        switched off, with a line. A run by hand changes no schedule."""
        with self.lock:
            self.running.discard(job["id"])
            st = self.state["jobs"].setdefault(job["id"], {})
            st.update(last_run=started.isoformat(), last_result=f"{'ok' if ok else 'error'}: "
                      f"{result}")
            errors = 0 if ok else st.get("errors", 0) + 1
            if ok and not by_hand:
                st["errors"], st["done"] = 0, job["schedule"]["kind"] == "at"
            elif not by_hand and errors >= MAX_ERRORS:
                st.update(errors=errors, off=f"{errors} errors in a row", next_run=None)
                log(f"[cron] job {job['id']} is switched off after {errors} errors in a row; "
                    f"/cron enable {job['id']} switches it on again")
            elif not by_hand:
                retry = self.clock() + timedelta(seconds=BACKOFF[errors - 1])
                regular = moment(st.get("next_run"))
                st.update(errors=errors, next_run=max(retry, regular or retry).isoformat())
            self.save()
            if CRON_LOG.exists() and CRON_LOG.stat().st_size > CRON_LOG_MAX:  # capped: rotate
                CRON_LOG.replace(CRON_LOG.with_name("runs.1.jsonl"))
            with os.fdopen(os.open(CRON_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
                           "a", encoding="utf-8") as f:
                f.write(json.dumps({"job": job["id"], "started": started.isoformat(), "ok": ok,
                                    "by_hand": by_hand, "result": result}) + "\n")
        if not ok:
            log(f"[cron] job {job['id']}: {result}")

    def set_enabled(self, job_id: str, on: bool) -> str:
        """Switch a job on or off in CRON.json (switched on, its errors are forgotten)."""
        def change(jobs: list) -> None:
            job = next((j for j in jobs if isinstance(j, dict) and j.get("id") == job_id), None)
            if job is None:
                raise ToolError(f"no job {printable(job_id)!r} in {CRON_FILE}")
            job["enabled"] = on
        with self.lock:
            try:
                edit_cron_file(change)
            except ToolError:  # CRON.json cannot be used: a job that runs can still be stopped
                if on or job_id not in self.jobs:
                    raise
                self.state["jobs"][job_id].update(off="/cron disable", next_run=None)
                self.save()
                return f"Job {job_id} is off (in the state file: {CRON_FILE} cannot be changed)."
            for key in ("off", "errors", "next_run"):  # switched on, it is planned from now
                self.state["jobs"].get(job_id, {}).pop(key, None)
            self.reload()
        return f"Job {job_id} is {'on' if on else 'off'} (written to {CRON_FILE})."


def edit_cron_file(change):
    """Read CRON.json, let change(jobs) edit its list of jobs, write it back atomically."""
    with cron_file_lock:
        path = safe_path(CRON_FILE)
        try:
            data = json.loads(read_text(path, CRON_FILE)) if path.exists() else {"jobs": []}
            if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
                raise ValueError('it must be an object with a list "jobs"')
        except (ValueError, RecursionError) as exc:
            raise ToolError(f"{CRON_FILE} cannot be used ({exc}); fix it first")
        result = change(data["jobs"])
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        if len(text.encode()) > CRON_FILE_MAX:  # the scheduler would not read it: not written
            raise ToolError(f"{CRON_FILE} would pass {CRON_FILE_MAX:,} bytes; remove a job first")
        write_atomic(path, text, private=False)
        return result


def chat_of(out) -> str:
    """The chat a turn came from as a target: the terminal (no `out`: a /cron command), or a
    Telegram or Feishu chat. A gateway client has no target, and a scheduled turn may not
    schedule more (it would copy itself): for them, no cron tool works."""
    message = getattr(out, "message", None)
    if out is None or isinstance(out, TerminalOutput):
        return "terminal"
    if message is not None and message.channel in ("telegram", "feishu") and \
            "scheduled" not in message.raw:
        return f"{message.channel}:{message.peer}"
    raise ToolError("the cron tools work from the terminal and from Telegram or Feishu chats, "
                    "not from a gateway client or in a scheduled run")


def mine(job, out) -> bool:
    """A chat sees and changes only the jobs that deliver to it; the terminal, every job."""
    return chat_of(out) == "terminal" or isinstance(job, dict) and job_target(job) == chat_of(out)


def cron_add(kind: str, message: str, in_seconds: int = 0, at: str = "", seconds: int = 0,
             expr: str = "", tz: str = "", payload: str = "system_event", target: str = "",
             out=None) -> str:
    """Add a job to CRON.json, checked exactly as the file's jobs are. A job asked for from a
    chat delivers to that chat, and nowhere else, and runs as the agent that answers there."""
    here, now = chat_of(out), utc_now()
    route = getattr(getattr(out, "message", None), "route", None)  # a chat's: its agent
    target = target or here
    if here != "terminal" and target != here:
        raise ToolError(f"from this chat, a job can only deliver to this chat ({here})")
    if kind == "at" and not at and in_seconds > 0:
        at = (now + timedelta(seconds=in_seconds)).isoformat(timespec="seconds")
    shape = {"at": {"at": at}, "every": {"seconds": seconds, "anchor": now.isoformat()},
             "cron": {"expr": expr, "tz": tz}}.get(kind, {})
    channel, _, to = target.partition(":")
    job = {"id": "", "description": f"added by the agent, asked from {here}", "enabled": True,
           "schedule": {"kind": kind, **shape},
           "payload": {"kind": payload, "message" if payload == "agent_turn" else "text": message},
           "deliver": {"channel": channel, **({"to": to} if to else {})}}
    if route:  # its agent_turns have that agent's tools, and no more
        job["agent"] = route.agent.id

    def add(jobs: list) -> str:
        if here != "terminal" and sum(isinstance(j, dict) and job_target(j) == here
                                      for j in jobs) >= MAX_CHAT_JOBS:
            raise ToolError(f"this chat has {MAX_CHAT_JOBS} jobs already; cron_remove one first")
        taken = {j.get("id") for j in jobs if isinstance(j, dict)}
        base = re.sub(r"[^a-z0-9]+", "-", message.lower())[:24].strip("-") or "job"
        ids = (base if n == 1 else f"{base}-{n}" for n in count(1))
        job["id"] = next(i for i in ids if i not in taken)
        try:
            check_job(job)
            first = next_run(job, now)
            if first is None:
                raise JobError(f"schedule.at: {at} is not in the future")
            then = next_run(job, first)  # the gap after the first run (a cron's is a sample)
            if then and (then - first).total_seconds() < MIN_INTERVAL[payload]:
                raise JobError(f"schedule: the agent's {payload} jobs run at most once every "
                               f"{MIN_INTERVAL[payload]} s")
        except JobError as exc:
            raise ToolError(str(exc))
        jobs.append(job)
        return f"added job {job['id']}: {payload} to {target}, first run {shown_time(first)}"
    return edit_cron_file(add)


def describe_job(job: dict, st: dict) -> list[str]:
    """Two lines on a valid job: its state and shape, then its next and its last run."""
    schedule, upcoming = job["schedule"], moment(st.get("next_run"))
    if schedule["kind"] == "at":
        shape = f"once at {shown_time(parse_moment('at', schedule['at']))}"
    elif schedule["kind"] == "every":
        shape = f"every {schedule['seconds']} s"
    else:
        shape = f"{printable(schedule['expr'])} in {schedule['tz']}"
    state = ("done" if st.get("done") else f"off ({printable(str(st['off']))})" if st.get("off")
             else "on" if job.get("enabled", True) else f"off in {CRON_FILE}")
    nxt = f"next {shown_time(upcoming)}" if upcoming else "no next run"
    if upcoming and schedule["kind"] == "cron":
        nxt += f" ({upcoming.astimezone(ZoneInfo(schedule['tz'])):%a %H:%M} in {schedule['tz']})"
    last = f"last {shown_time(moment(st.get('last_run')))}" + (
        f": {printable(str(st['last_result']))}" if st.get("last_result") else "")
    return [f"{job['id']}: {state}, {shape}, {job['payload']['kind']} to {job_target(job)}",
            f"  {nxt}; {last}"]


def cron_list(out=None) -> str:
    """The jobs of CRON.json with their state: on or off, next run, last result."""
    try:
        jobs = json.loads(read_workspace_text(CRON_FILE, CRON_FILE_MAX) or '{"jobs": []}')["jobs"]
        if not isinstance(jobs, list):
            raise TypeError('"jobs" must be a list')
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ToolError(f"{CRON_FILE} cannot be used ({type(exc).__name__}: {exc})")
    states, lines = read_state(CRON_STATE_FILE).get("jobs"), []
    for job in [job for job in jobs if mine(job, out)]:
        try:
            check_job(job)
            st = states.get(job["id"]) if isinstance(states, dict) else None
            lines += describe_job(job, st if isinstance(st, dict) else {})  # edited by hand?
        except JobError as exc:
            name = job.get("id") if isinstance(job, dict) else "?"
            lines.append(f"{printable(str(name))}: switched off: {printable(str(exc))}")
    return "\n".join(lines) or "No jobs: cron_add adds one."


def cron_remove(id: str, out=None) -> str:
    def remove(jobs: list) -> str:
        found = [j for j in jobs if isinstance(j, dict) and j.get("id") == id and mine(j, out)]
        if not found:
            raise ToolError(f"no job {id!r} that this chat may remove; cron_list names them")
        jobs.remove(found[0])
        return f"removed job {id}"
    return edit_cron_file(remove)


TOOLS = TOOLS + [
    {"name": "cron_add", "description": "Schedule a job: a reminder (kind at, in_seconds or at),"
     " a repeating one (every + seconds, or cron + expr + tz). A system_event's message is sent "
     "as it is; an agent_turn's is a task you get then. It goes to the chat that asked.",
     "input_schema": {"type": "object", "required": ["kind", "message"], "properties": {
         name: {"type": "integer" if name.endswith("seconds") else "string", "description": text}
         for name, text in {
             "kind": "at, every or cron.", "message": "The text to send, or the task.",
             "in_seconds": "at: seconds from now.", "at": "at: an ISO time with a UTC offset.",
             "seconds": "every: the interval.", "expr": "cron: minute hour day month weekday.",
             "tz": "cron: an IANA time zone, like Asia/Tokyo.",
             "payload": "system_event (the default) or agent_turn.",
             "target": "terminal, telegram:<chat id> or feishu:<id>; default: this chat."}.items()
     }}},
    {"name": "cron_list", "description": "The scheduled jobs: on or off, next run, last result.",
     "input_schema": {"type": "object", "properties": {}, "required": []}},
    {"name": "cron_remove", "description": "Delete a scheduled job by its id (from cron_list).",
     "input_schema": {"type": "object", "required": ["id"], "properties": {
         "id": {"type": "string", "description": "The job's id."}}}},
]
TOOL_HANDLERS = {**TOOL_HANDLERS, "cron_add": cron_add, "cron_list": cron_list,
                 "cron_remove": cron_remove}  # s07: after s06's (memory_search may be off)
DEFAULT_AGENT = Agent(AGENT_ID, "Claw", MODEL_ID, list(TOOL_HANDLERS))  # when a turn names none


# --- [s07] Commands: heartbeat and cron ---------------------------------------
def show_heartbeat(repl: Repl, arg: str) -> None:
    print("\n".join(repl.heartbeat.describe()))


def trigger_heartbeat(repl: Repl, arg: str) -> None:
    """Run the heartbeat now: not waiting for the interval or the active hours, but still only
    when HEARTBEAT.md asks for something (nothing to ask about is no model call)."""
    print(repl.heartbeat.start(repl.heartbeat.clock()))


def cron_command(repl: Repl, arg: str) -> None:
    action, _, job_id = arg.partition(" ")
    if not action:
        repl.cron.reload()  # so that "next run" is there before the timer's first tick
        try:
            print(printable(cron_list(), keep_lines=True))
        except ToolError as exc:  # CRON.json is not JSON...: a line, never a dead gateway
            print(printable(str(exc)))
    elif action == "run" and job_id.strip() in repl.cron.jobs:
        repl.cron.start(repl.cron.jobs[job_id.strip()], repl.cron.clock(), by_hand=True)
        print(f"Job {job_id.strip()} started by hand; what it says appears when it is done.")
    elif action in ("enable", "disable") and job_id.strip():
        try:
            print(repl.cron.set_enabled(job_id.strip(), action == "enable"))
        except ToolError as exc:
            print(printable(str(exc)))
    else:
        print("Usage: /cron, /cron run ID, /cron enable ID, /cron disable ID")


# --- [s08] Delivery: write ahead, then send -----------------------------------
# A reply to a chat is a file in DELIVERY_DIR before anything is sent. A crash at any instant
# leaves it there, and the next start sends it: nothing is lost, and at worst a reply (or one
# chunk of it) arrives twice, when the crash falls after a send and before its mark.
DELIVERY_DIR = STATE_DIR / "delivery-queue"  # one <id>.json per reply not yet sent
RETRY_DELAYS = (5, 25, 120, 600)  # seconds before the 2nd, 3rd, 4th try, then every 600, ±20 %
GIVE_UP_AFTER = 24 * 3600         # seconds after it was queued: then to failed/, last error kept
MAX_RETRY_AFTER = 3600            # a platform's "wait this long" is honoured up to this
MAX_SLEEP = 60                    # the worker looks again at least this often
MAX_QUEUED = 10_000               # entries waiting; past this a reply is refused with a line
MAX_QUEUED_PER_CHAT = 200         # the same for one recipient: one chat cannot fill the queue
MAX_FAILED = 1000                 # entries kept in failed/; past this the oldest goes, with a line
ENTRY_ID = re.compile(r"[0-9]{1,20}")  # an entry's id is its file's name: digits, nothing else


def fsync_dir(folder: Path) -> None:
    """A rename or an unlink survives a power cut only once the folder itself is synced."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_entry(path: Path, entry: dict) -> None:
    """Temp file, fsync, rename (write_atomic), then fsync the folder: on disk for good."""
    write_atomic(path, json.dumps(entry, ensure_ascii=False))
    fsync_dir(path.parent)


def retry_delay(entry_id: str, attempts: int, retry_after: float = 0.0) -> float:
    """Seconds to wait after `attempts` failed tries: the backoff with a jitter drawn from the
    entry's id (entries that failed together do not all try again at one instant, and one
    entry's waits are the same every run), or longer if the platform asked for longer."""
    base = RETRY_DELAYS[min(attempts, len(RETRY_DELAYS)) - 1]
    after = min(retry_after, MAX_RETRY_AFTER) if retry_after >= 0 else 0.0  # NaN: 0 too
    return max(after, base * random.Random(f"{entry_id}:{attempts}").uniform(0.8, 1.2))


def check_entry(entry, path: Path) -> dict:
    """An entry read from disk (at start-up, by /retry), or ValueError: its id is its file's
    name, and every field has the type and range enqueue() gives it (numbers finite)."""
    def number(value) -> bool:
        return type(value) in (int, float) and 0 <= value < 1e12  # NaN and inf fail too
    if not (isinstance(entry, dict) and ENTRY_ID.fullmatch(path.stem) and entry.get("id") ==
            path.stem and isinstance(entry.get("chunks"), list) and entry["chunks"]
            and all(isinstance(c, str) for c in entry["chunks"])
            and all(isinstance(entry.get(k), str) for k in ("channel", "account", "peer",
                                                            "sender", "last_error"))
            and type(entry.get("is_group")) is bool and type(entry.get("sent")) is int
            and type(entry.get("attempts")) is int and 0 <= entry["sent"] < len(entry["chunks"])
            and entry["attempts"] >= 0 and isinstance(entry.get("thread"), (str, type(None)))
            and isinstance(entry.get("reply_to"), (int, type(None)))
            and number(entry.get("next_attempt")) and number(entry.get("created"))):
        raise ValueError("not a delivery entry")
    return entry


def address(entry: dict) -> InboundMessage:
    """The entry's recipient as the channel's send() wants it. Only a group's first chunk
    quotes the message it answers. Feishu takes a `uuid` with a message and sends a second
    request with the same one at most once within an hour: each chunk has its own."""
    quote = entry["reply_to"] if entry["sent"] == 0 else None
    raw = {"message": {"message_id": quote}} if quote else {}
    if entry["channel"] == "feishu" and entry.get("key"):
        raw["uuid"] = f"{entry['key']}-{entry['sent']}"
    return InboundMessage(channel=entry["channel"], account=entry["account"], peer=entry["peer"],
                          sender=entry["sender"], text="", is_group=entry["is_group"],
                          thread=entry["thread"], raw=raw)


class Delivery:
    """The outbound queue. enqueue() writes a reply to disk and wakes the worker; the worker
    sends each recipient's entries strictly in order, chunk after chunk, records progress
    after every chunk, retries what may pass and moves to failed/ what will not. One
    recipient's failing entry holds back only that recipient's later entries."""

    def __init__(self, channels: dict[str, Channel], folder: Path = DELIVERY_DIR,
                 clock=time.time):
        self.channels, self.folder, self.clock = channels, folder, clock
        self.failed_dir = folder / "failed"
        self.entries: dict[str, dict] = {}   # id -> entry: every pending one, as on disk
        self.sending: str | None = None      # the entry the worker is sending now
        self.seq = 0                         # ids are sequence numbers: their order is the order
        self.fail_rate: dict[str, tuple] = {}  # /simulate-failure: channel -> (share, kind)
        self.order = threading.Lock()        # one enqueue at a time: ids in the order written
        self.changed = threading.Condition()
        self.thread = None

    def load(self) -> None:
        """The start-up sweep: pending entries a previous run left, oldest first. A temp file
        is a write a crash cut short (removed); an entry that cannot be read is moved aside
        into failed/ with one line."""
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for path in sorted(self.folder.glob("*.json")):
            try:
                entry = check_entry(json.loads(path.read_text(encoding="utf-8")), path)
            except (ValueError, RecursionError, OSError) as exc:
                aside = self.failed_dir / f"corrupt-{path.name}"
                path.replace(aside)
                log(f"[delivery] {path.name} cannot be read ({type(exc).__name__}); "
                    f"moved it to {aside}")
                continue
            entry["next_attempt"] = min(entry["next_attempt"], self.clock() + MAX_RETRY_AFTER)
            self.entries[entry["id"]] = entry
        ids = [p.stem for p in [*self.folder.glob("*.json"), *self.failed_dir.glob("*.json")]]
        self.seq = max((int(i) for i in ids if ENTRY_ID.fullmatch(i)), default=0)
        self.trim_failed()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.work, name="delivery", daemon=True)
        self.thread.start()

    def enqueue(self, message: InboundMessage, text: str) -> str | None:
        """Write the reply to disk, split as its channel needs, and wake the worker. Returns
        the entry's id (None: nothing to send). Raises when it cannot be written."""
        chunks = split_message(text, self.channels[message.channel].max_text)
        if not chunks:
            return None
        quote = message.raw.get("message", {}).get("message_id") if message.is_group else None
        who = (message.channel, message.peer, message.thread)
        with self.order:
            if len(self.entries) >= MAX_QUEUED:
                raise ChannelError(f"the delivery queue holds {MAX_QUEUED} replies already")
            if sum((e["channel"], e["peer"], e["thread"]) == who for e in
                   list(self.entries.values())) >= MAX_QUEUED_PER_CHAT:
                raise ChannelError(f"{MAX_QUEUED_PER_CHAT} replies to this chat wait already")
            self.seq += 1
            entry = {"id": f"{self.seq:08d}", "channel": message.channel,
                     "account": message.account, "peer": message.peer, "sender": message.sender,
                     "thread": message.thread, "is_group": message.is_group, "reply_to": quote,
                     "chunks": chunks, "sent": 0, "attempts": 0, "next_attempt": 0.0,
                     "last_error": "", "created": self.clock(), "key": secrets.token_hex(8)}
            write_entry(self.folder / f"{entry['id']}.json", entry)
            with self.changed:
                self.entries[entry["id"]] = entry
                self.changed.notify_all()
        return entry["id"]

    def next_due(self) -> tuple[dict | None, float | None]:
        """The oldest entry of a recipient whose turn it is now; else (None, seconds until one
        is due, or None: nothing pending). Call with self.changed held."""
        now, seen, wait = self.clock(), set(), None
        for entry in sorted(self.entries.values(), key=lambda e: e["id"]):
            who = (entry["channel"], entry["peer"], entry["thread"])
            if who in seen:
                continue  # an older entry of this recipient is pending: it goes first
            seen.add(who)
            if entry["next_attempt"] <= now:
                return entry, None
            wait = min(wait or float("inf"), entry["next_attempt"] - now)
        return None, wait

    def work(self) -> None:
        while True:
            try:  # nothing ends this thread: it sends for every chat
                with self.changed:
                    entry, wait = self.next_due()
                    while entry is None:  # sleeps until enqueue(), a retry's time, or wake()
                        self.changed.wait(None if wait is None else min(wait, MAX_SLEEP))
                        entry, wait = self.next_due()
                    self.sending = entry["id"]
                self.attempt(entry)
            except Exception as exc:  # the disk refused a write: the entry stays, as it was
                log(f"[delivery] {self.sending or 'worker'}: {type(exc).__name__}: "
                    f"{printable(str(exc))}")
                time.sleep(1)
            finally:
                with self.changed:
                    self.sending = None
                    self.changed.notify_all()

    def attempt(self, entry: dict) -> None:
        """Send what is left of one entry, from its next unsent chunk."""
        path, channel = self.folder / f"{entry['id']}.json", self.channels.get(entry["channel"])
        try:
            while entry["sent"] < len(entry["chunks"]):
                rate, kind = self.fail_rate.get(entry["channel"], (0.0, ""))
                if random.random() < rate:
                    raise ChannelError("a failure simulated by /simulate-failure", kind)
                channel.send(address(entry), entry["chunks"][entry["sent"]])
                entry["sent"] += 1
                if entry["sent"] < len(entry["chunks"]):
                    write_entry(path, entry)  # a retry resumes at the next chunk
        except Exception as exc:
            return self.failed(entry, path, exc)
        self.drop(entry, path)

    def failed(self, entry: dict, path: Path, exc: Exception) -> None:
        """Try again later when the error may pass; else, or GIVE_UP_AFTER, to failed/."""
        kind, after = (exc.kind, exc.retry_after) if isinstance(exc, ChannelError) \
            else ("transient", 0.0)
        entry["attempts"] += 1
        entry["last_error"] = printable(f"{type(exc).__name__}: {exc}")[:300]
        where = f"{entry['channel']}:{entry['peer']}"
        if kind == "permanent" or self.clock() - entry["created"] >= GIVE_UP_AFTER:
            write_entry(self.failed_dir / path.name, entry)
            self.drop(entry, path)
            self.trim_failed()
            return log(f"[delivery] gave up on {entry['id']} to {where} after "
                       f"{plural(entry['attempts'], 'attempt')} ({kind}): {entry['last_error']}"
                       f"; /retry {entry['id']} queues it again")
        entry["wait"] = round(retry_delay(entry["id"], entry["attempts"], after), 1)
        entry["next_attempt"] = self.clock() + entry["wait"]
        write_entry(path, entry)
        if entry["attempts"] == 1:
            log(f"[delivery] {entry['id']} to {where} failed ({entry['last_error']}); "
                f"trying again in {entry['wait']:.0f} s (/queue)")

    def trim_failed(self) -> None:
        """failed/ keeps the newest MAX_FAILED entries; each older one goes, with a line."""
        kept = sorted(self.failed_dir.glob("*.json"), key=lambda p: p.name.split("-")[-1])
        for path in kept[:-MAX_FAILED]:
            path.unlink(missing_ok=True)
            log(f"[delivery] removed {printable(path.name)} from failed/ (it keeps {MAX_FAILED})")

    def drop(self, entry: dict, path: Path) -> None:
        with self.changed:
            self.entries.pop(entry["id"], None)
        path.unlink(missing_ok=True)
        fsync_dir(self.folder)

    def wake(self) -> None:
        """Look again now (a test moved the clock, a failure was switched off)."""
        with self.changed:
            self.changed.notify_all()

    def settle(self, timeout: float) -> bool:
        """Wait (up to timeout) until nothing is being sent or due now."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.sending or self.next_due()[0]:
                if time.monotonic() >= deadline:
                    return False
                self.changed.wait(0.05)
        return True

    def pending(self) -> list[dict]:
        with self.changed:
            return [dict(e) for e in sorted(self.entries.values(), key=lambda e: e["id"])]

    def failures(self) -> list[dict]:
        """What failed/ holds, oldest first (an unreadable file only by its name)."""
        found = []
        for path in sorted(self.failed_dir.glob("*.json")):
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, OSError, RecursionError):
                entry = None
            found.append(entry if isinstance(entry, dict) else
                         {"id": path.stem, "last_error": "(cannot be read)"})
        return found

    def retry(self, entry_id: str) -> list[str]:
        """Failed entries back to the queue ("all": every one), attempts from zero, in their
        old place in the order. Returns the ids queued again."""
        paths = sorted(self.failed_dir.glob("[0-9]*.json")) if entry_id == "all" else \
            [self.failed_dir / f"{int(entry_id):08d}.json"] \
            if ENTRY_ID.fullmatch(entry_id) else []
        done = []
        for path in paths:
            try:
                entry = check_entry(json.loads(path.read_text(encoding="utf-8")), path)
            except (ValueError, OSError, RecursionError):
                continue
            entry["attempts"], entry["next_attempt"], entry["created"] = 0, 0.0, self.clock()
            write_entry(self.folder / path.name, entry)
            path.unlink()
            with self.changed:
                self.entries[entry["id"]] = entry
                self.changed.notify_all()
            done.append(entry["id"])
        return done

    def simulate(self, channel: str, rate: float, kind: str = "transient") -> None:
        """Make that share of sends to `channel` fail as an error of that kind (in memory: a
        restart ends it). 0 switches it off; that channel's waiting entries go at once."""
        with self.changed:
            self.fail_rate[channel] = (rate, kind)
            if not rate:
                for entry in self.entries.values():
                    if entry["channel"] == channel:
                        entry["next_attempt"] = 0.0
            self.changed.notify_all()


# --- [s08] Inbound: on disk before the platform hears "received" --------------
# Telegram forgets an update once the next getUpdates names a later offset; Feishu stops
# resending an event once the webhook answered 200. Both happen after publish() returns, and
# publish() first writes the message here. The file goes when the turn is over (its reply is
# in the delivery queue) or the message was refused; what is left at start-up is replayed.
INBOUND_DIR = STATE_DIR / "inbound"
KEPT_CHANNELS = ("telegram", "feishu")  # the platforms that wait for us to confirm
INBOUND_FIELDS = ("channel", "account", "peer", "sender", "text", "sender_name", "is_group",
                  "thread", "media", "raw")
INBOUND_TEXT = ("account", "peer", "sender", "text", "sender_name")  # str, as the channels give


class Inbox:
    """Messages received and not yet answered, one file each."""

    def __init__(self, folder: Path = INBOUND_DIR):
        self.folder = folder
        self.answered = deque(maxlen=1000)  # files done this run: sent again, they are not new
        folder.mkdir(parents=True, exist_ok=True)

    def keep(self, message: InboundMessage) -> bool:
        """On disk (fsync) before the platform is told; False: it is on disk already (the
        platform sent it again: an offset or a 200 a crash cut off)."""
        if message.channel not in KEPT_CHANNELS:
            return True
        ids = message.raw.get("update_id") if message.channel == "telegram" else \
            message.raw.get("header", {}).get("event_id")
        name = hashlib.sha256(f"{message.channel}:{ids}".encode()).hexdigest()[:32] \
            if ids is not None else secrets.token_hex(16)
        path = self.folder / f"{name}.json"
        if path.exists() or path.name in self.answered:
            return False
        write_entry(path, {"received": time.time(),
                           **{name: getattr(message, name) for name in INBOUND_FIELDS}})
        message.inbound = str(path)
        return True

    def done(self, message: InboundMessage) -> None:
        if message.inbound:
            Path(message.inbound).unlink(missing_ok=True)
            self.answered.append(Path(message.inbound).name)
            message.inbound = None

    def pending(self) -> list[InboundMessage]:
        """What arrived before the last stop and was not answered, oldest first."""
        for tmp in self.folder.glob(".*.tmp"):  # a write a crash cut short: never confirmed
            tmp.unlink(missing_ok=True)
        found = []
        for path in self.folder.glob("*.json"):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                message = InboundMessage(**{name: data[name] for name in INBOUND_FIELDS})
                if not (message.channel in KEPT_CHANNELS and type(data["received"]) in (int, float)
                        and 0 <= data["received"] < 1e12 and isinstance(message.raw, dict)
                        and type(message.is_group) is bool and all(isinstance(getattr(
                            message, name), str) for name in INBOUND_TEXT)
                        and all(isinstance(getattr(message, name), (str, type(None)))
                                for name in ("thread", "media"))):
                    raise ValueError("not a received message")
                found.append((data["received"], path.name, message))
                message.inbound = str(path)
            except (ValueError, KeyError, TypeError, OSError, RecursionError) as exc:
                aside = path.with_name(f"corrupt-{path.stem}.bad")
                path.replace(aside)
                log(f"[inbound] {path.name} cannot be read ({type(exc).__name__}); "
                    f"moved it to {aside}")
        return [message for *_, message in sorted(found, key=lambda f: f[:2])]


# --- [s08] Commands: queue, failed, retry, simulate-failure -------------------
def show_queue(repl: Repl, arg: str) -> None:
    entries, now = repl.bus.delivery.pending(), time.time()
    for e in entries:  # checked on load: every field is there, with its type; shown escaped
        due = "now" if e["next_attempt"] <= now else f"in {-((now - e['next_attempt']) // 1):.0f} s"
        error = f"; last error: {printable(e['last_error'])}" if e["last_error"] else ""
        print(f"  {e['id']}  {printable(e['channel'])}:{printable(e['peer'])}  chunks sent "
              f"{e['sent']}/{len(e['chunks'])}, {plural(e['attempts'], 'failed attempt')}, "
              f"next try {due}{error}")
    if not entries:
        print("The delivery queue is empty: every reply went out.")


def show_failed(repl: Repl, arg: str) -> None:
    failed = repl.bus.delivery.failures()
    for e in failed:  # anything a file holds, escaped
        where = printable(f"{e.get('channel')}:{e.get('peer')}") if "peer" in e else "?"
        print(f"  {printable(str(e.get('id')))}  {where}  {printable(str(e.get('last_error')))}")
    print(f"{len(failed)} in failed/ (/retry ID or /retry all)" if failed else
          "Nothing in failed/: no reply was given up on.")


def retry_failed(repl: Repl, arg: str) -> None:
    if not arg:
        return print("Usage: /retry ID, or /retry all")
    done = repl.bus.delivery.retry(arg)
    print(f"Queued again: {', '.join(done)}" if done else
          "Nothing in failed/ to queue again." if arg == "all" else
          f"No failed reply has the id {printable(arg)!r}; /failed lists them.")


def simulate_failure(repl: Repl, arg: str) -> None:
    if arg in SIMULATED:  # s09: a failure class: the next model call fails that way
        return simulate_model_failure(repl, arg)
    channel, rate, kind = (arg.split() + ["", "", ""])[:3]  # s08: a kind, optionally
    try:
        share = float(rate)
    except ValueError:
        share = -1.0
    if channel not in KEPT_CHANNELS or not 0.0 <= share <= 1.0 or kind not in ("", "permanent"):
        return print(f"Usage: /simulate-failure {'|'.join(KEPT_CHANNELS)} RATE [permanent] "
                     "(0.0 to 1.0; 0 switches it off), or /simulate-failure KIND, one of: "
                     f"{', '.join(SIMULATED)}")
    kind = kind or "transient"
    repl.bus.delivery.simulate(channel, share, kind)
    print(f"Sends to {channel} now fail {share:.0%} of the time, as a {kind} error."
          if share else f"Sends to {channel} work again; what waits for {channel} goes now.")


# --- [s09] Profiles: several keys, each with its cooldowns --------------------
PROFILES_FILE = STATE_DIR / "profiles.json"    # {"profiles": [{"name", "api_key", "base_url"}]}
COOLDOWNS_FILE = STATE_DIR / "cooldowns.json"  # (profile, model) -> until when, why, how often
MAX_PROFILES = 9  # ANTHROPIC_API_KEY, then _2 .. _9; the scan stops at the first one missing
MODEL_FALLBACKS = [m.strip() for m in (os.getenv("MODEL_FALLBACKS") or "").split(",") if m.strip()]
HOUR = 3600
COOLDOWN = {"auth": 6 * HOUR, "permission": 6 * HOUR, "billing": 24 * HOUR,  # seconds
            "overloaded": 60, "server": 60, "connection": 60}
RATE_LIMIT_STEPS = (60, 300, 1500, HOUR)  # 1 min, 5 min, 25 min, then 1 h for every later one
WHOLE_KEY = ("auth", "billing")  # these cool the key for every model ("*"), the rest one model
ANY_MODEL = "*"


@dataclass
class Profile:
    """One key (and where it is sent). Its client is built on first use."""
    name: str
    api_key: str
    base_url: str = ""
    _client: anthropic.Anthropic | None = field(default=None, repr=False)

    def client(self) -> anthropic.Anthropic:
        if self._client is None:  # max_retries=0: the onion retries, once, by class
            self._client = anthropic.Anthropic(api_key=self.api_key or "local",
                                               base_url=self.base_url or None,
                                               max_retries=SDK_MAX_RETRIES)
        return self._client

    def fingerprint(self) -> str:
        """What /profiles shows of a key: never the key, only a short hash of it."""
        if not self.api_key:
            return "no key"
        return "key#" + hashlib.sha256(self.api_key.encode()).hexdigest()[:8]


def load_profiles() -> list[Profile]:
    """profiles.json in the state folder if there is one, else the environment: profile 1 is
    ANTHROPIC_API_KEY (+ ANTHROPIC_BASE_URL), then ANTHROPIC_API_KEY_2 (+ ANTHROPIC_BASE_URL_2,
    else ANTHROPIC_BASE_URL) and so on, up to _9 or the first number that is missing."""
    if PROFILES_FILE.exists():
        where = f"{PROFILES_FILE}: "
        try:
            data = json.loads(PROFILES_FILE.read_text(encoding="utf-8"))
            entries = data["profiles"]
            assert isinstance(entries, list) and entries and len(entries) <= MAX_PROFILES
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise ConfigError(where + f'expected {{"profiles": [...]}} with 1 to {MAX_PROFILES} '
                              'entries; fix the file or move it away to use the environment.')
        profiles = []
        for i, entry in enumerate(entries):
            ok = isinstance(entry, dict) and all(isinstance(entry.get(k, ""), str)
                                                 for k in ("name", "api_key", "base_url"))
            name = ok and (entry.get("name") or str(i + 1))
            if not ok or not SAFE_ID.fullmatch(name) or name in (p.name for p in profiles):
                raise ConfigError(where + f"profiles[{i}] needs a unique short name (a-z, 0-9, "
                                  "- or _) and string fields api_key and base_url.")
            profiles.append(Profile(name, entry.get("api_key", ""), entry.get("base_url", "")))
        return profiles
    profiles = [Profile("1", API_KEY, BASE_URL)]
    for n in range(2, MAX_PROFILES + 1):
        key = os.environ.get(f"ANTHROPIC_API_KEY_{n}")
        url = os.environ.get(f"ANTHROPIC_BASE_URL_{n}")
        if not key and not url:
            break
        profiles.append(Profile(str(n), key or "", url or BASE_URL))
    return profiles


class Cooldowns:
    """Until when a profile may not be used for a model, and why: "2|claude-x" or "2|*" (the
    whole key). Kept in cooldowns.json (atomic, 0600), so a restart does not forget them."""

    def __init__(self, path: Path, clock=time.time):
        self.path, self.clock, self.lock = path, clock, threading.Lock()
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
            assert isinstance(entries, dict)
        except FileNotFoundError:
            entries = {}
        except (OSError, ValueError, AssertionError):
            log(f"(cannot read {path}: starting with no cooldowns)")
            entries = {}
        self.entries = {key: e for key, e in entries.items() if self.sound(key, e)}
        if len(self.entries) < len(entries):
            log(f"({path}: dropped {len(entries) - len(self.entries)} of its {len(entries)} "
                "entries: not a cooldown as this section writes one)")

    def sound(self, key: str, e) -> bool:
        """An entry as cool() writes it: a time no later than the longest cooldown from now
        (nan and infinity are not), a known class, a count. Anything else could block a key."""
        return (key.count("|") == 1 and isinstance(e, dict)
                and e.get("reason") in (*COOLDOWN, "rate_limit")
                and type(e.get("until")) in (int, float) and type(e.get("count")) is int
                and 0 <= e["until"] <= self.clock() + max(COOLDOWN.values())
                and e["count"] >= 0)

    def entry(self, profile: str, model: str) -> dict | None:
        """The cooldown that blocks this profile for this model now, if any."""
        now = self.clock()
        for key in (f"{profile}|{ANY_MODEL}", f"{profile}|{model}"):
            entry = self.entries.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("until"), (int, float)) \
                    and entry["until"] > now:
                return entry
        return None

    def cool(self, profile: str, model: str, kind: str, retry_after: float | None) -> float:
        """Start (or grow) a cooldown; returns its length in seconds."""
        key = f"{profile}|{ANY_MODEL if kind in WHOLE_KEY else model}"
        with self.lock:
            old = self.entries.get(key) if isinstance(self.entries.get(key), dict) else {}
            times = (old.get("count", 0) if old.get("reason") == kind else 0) + 1
            seconds = COOLDOWN.get(kind, 60)
            if kind == "rate_limit":
                seconds = RATE_LIMIT_STEPS[min(times, len(RATE_LIMIT_STEPS)) - 1]
            if retry_after is not None:
                seconds = retry_after  # the server's own word wins
            self.entries[key] = {"until": self.clock() + seconds, "reason": kind, "count": times}
            self.save()
        return seconds

    def until(self, profile: str, model: str) -> float:
        """When this profile is free again for this model (0: it is free now)."""
        entries = (self.entries.get(f"{profile}|{m}") for m in (ANY_MODEL, model))
        return max([e["until"] for e in entries if isinstance(e, dict)
                    and isinstance(e.get("until"), (int, float))] + [0])

    def clear(self, profile: str, model: str) -> None:
        """A call succeeded: the key works and the model's record on it starts from nothing."""
        keys = [k for k in (f"{profile}|{ANY_MODEL}", f"{profile}|{model}") if k in self.entries]
        if keys:  # a success costs no write unless there is something to forget
            with self.lock:
                for key in keys:
                    self.entries.pop(key, None)
                self.save()

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.entries, indent=1, sort_keys=True) + "\n")

    def active(self) -> list[tuple[str, dict]]:
        now = self.clock()
        return [(key, e) for key, e in sorted(self.entries.items())
                if isinstance(e, dict) and isinstance(e.get("until"), (int, float))
                and e["until"] > now]


# --- [s09] The retry onion: classify, then retry, switch or fall back ---------
KIND_OF_TYPE = {"authentication_error": "auth", "permission_error": "permission",
                "billing_error": "billing", "rate_limit_error": "rate_limit",
                "overloaded_error": "overloaded", "api_error": "server"}
KIND_OF_STATUS = {401: "auth", 402: "billing", 403: "permission", 408: "connection",
                  409: "server", 429: "rate_limit", 529: "overloaded"}
RETRY_HERE = ("overloaded", "server", "connection")  # worth the same call again, after a pause
CALL_RETRY_DELAYS = (0.5, 2.0)  # seconds before the 2nd and the 3rd try (plus up to 25% jitter)
CALL_BUDGET = (6, 20.0)    # one model call: at most 6 requests and 20 s of waiting in place
MAX_WAIT_HERE = 10.0       # a retry-after longer than this is not waited out in place
NOT_HERE = ("overflow", "invalid")  # another key or model cannot help: the turn's layers decide
ROUTE_NOTES: dict[str, str] = {}  # message id -> "profile 2 · model X", for the usage line
SIMULATED = {  # /simulate-failure KIND: the exception class, status and error.type it raises
    "auth": (anthropic.AuthenticationError, 401, "authentication_error", "invalid x-api-key"),
    "billing": (anthropic.PaymentRequiredError, 402, "billing_error", "credit balance too low"),
    "permission": (anthropic.PermissionDeniedError, 403, "permission_error", "not allowed"),
    "rate_limit": (anthropic.RateLimitError, 429, "rate_limit_error", "rate limit exceeded"),
    "overloaded": (anthropic.OverloadedError, 529, "overloaded_error", "Overloaded"),
    "server": (anthropic.InternalServerError, 500, "api_error", "Internal server error"),
    "connection": (anthropic.APIConnectionError, 0, "", "Connection error."),
    "overflow": (anthropic.BadRequestError, 400, "invalid_request_error",
                 "prompt is too long: 1000001 tokens > 1000000 maximum"),
    "invalid": (anthropic.BadRequestError, 400, "invalid_request_error", "messages: bad request"),
}


class NoResponse:
    """Stands in for the HTTP response of a failure the onion makes up (/simulate-failure)."""
    request = None

    def __init__(self, status: int):
        self.status_code, self.headers = status, {}


class NextProfile(Exception):
    """This profile failed in a way another profile or model may not: the onion moves on."""

    def __init__(self, exc: anthropic.APIError):
        super().__init__(str(exc))
        self.exc = exc


def failure_kind(exc: anthropic.APIError) -> str:
    """The class of a failure: by error.type (also set for errors sent mid-stream), then by
    exception class and status. Only the documented overflow prefix reads the message."""
    if is_context_overflow(exc):
        return "overflow"
    if isinstance(exc, anthropic.APIConnectionError):  # APITimeoutError too
        return "connection"
    if not isinstance(exc, anthropic.APIStatusError):
        return "invalid"
    kind = KIND_OF_TYPE.get(exc.type or "") or KIND_OF_STATUS.get(exc.status_code)
    return kind or ("server" if exc.status_code >= 500 else "invalid")


def headers_of(exc: anthropic.APIError):
    """The HTTP headers of a failure's response (none for a connection error)."""
    return getattr(getattr(exc, "response", None), "headers", None) or {}


def retry_after(exc: anthropic.APIError) -> float | None:
    """The retry-after header in seconds (capped at an hour), when there is one."""
    try:
        return min(max(float(headers_of(exc).get("retry-after")), 0.0), float(HOUR))
    except (TypeError, ValueError):
        return None  # absent, or an HTTP date: the class's own cooldown applies


class Shown:
    """Passes a turn's output on and remembers whether any words reached the person."""

    def __init__(self, out: TerminalOutput):
        self.out, self.any = out, False

    def say(self, text: str = "", end: str = "\n") -> None:
        self.any = self.any or bool(text)
        self.out.say(text, end)

    def __getattr__(self, name: str):
        return getattr(self.out, name)


class Onion:
    """Stands where one client stood. Each model call goes through its layers: retry the same
    call (overloaded, 5xx, connection: the service's fault, so then the next fallback model, on
    the same key), another profile (auth, billing, rate limit: after a cooldown), the next
    fallback model; overflow and invalid requests go straight back to the turn (s03 compacts).
    A session stays on the profile it last succeeded on, so its prompt cache stays warm."""

    def __init__(self, profiles: list[Profile], fallbacks: list[str] | None = None,
                 clock=time.time, sleep=time.sleep):
        self.profiles, self.fallbacks = profiles, fallbacks if fallbacks is not None else \
            MODEL_FALLBACKS
        self.clock, self.sleep = clock, sleep
        self.cooldowns = Cooldowns(COOLDOWNS_FILE, lambda: self.clock())
        self.sticky: dict[str, str] = {}  # session id -> the profile it last succeeded on
        self.injected: deque = deque()     # failures /simulate-failure asked for
        self.lock = threading.Lock()
        self.stats = {"calls": 0, "answered": 0, "retries": 0, "switches": 0, "fallbacks": 0,
                      "failures": {}}

    @property
    def messages(self):
        """The s03 and s06 side calls (count_tokens, summaries, the memory flush) call
        client.messages.create and .count_tokens: the onion answers them itself."""
        return self

    def create(self, **request):
        return self.side_call("create", request)

    def count_tokens(self, **request):
        return self.side_call("count_tokens", request)

    def side_call(self, method: str, request: dict):
        """A side call on the first profile that is not cooling, with the inner layer only:
        a passing failure (overloaded, 5xx, connection) is tried again after the same pauses."""
        free = [p for p in self.profiles if not self.cooldowns.entry(p.name, MODEL_ID)]
        send = getattr((free or self.profiles)[0].client().messages, method)
        for delay in (*CALL_RETRY_DELAYS, None):
            try:
                return send(**request)
            except anthropic.APIError as exc:
                if delay is None or failure_kind(exc) not in RETRY_HERE \
                        or headers_of(exc).get("x-should-retry") == "false":
                    raise
                self.sleep(delay)

    def count(self, what: str, kind: str | None = None) -> None:
        with self.lock:
            if kind:
                self.stats["failures"][kind] = self.stats["failures"].get(kind, 0) + 1
            else:
                self.stats[what] += 1

    def order(self, session_id: str) -> list[Profile]:
        """The session's own profile first, then the others in their order."""
        mine = self.sticky.get(session_id)
        return sorted(self.profiles, key=lambda p: p.name != mine)

    def candidates(self, session_id: str, models: list[str]):
        """(profile, model) pairs to try, in order: each model (the agent's, then the
        fallbacks), each profile (the session's first); a cooling one is skipped, checked just
        before its turn (a failure a moment ago may have cooled it). When none of them
        answered, the onion never refuses: of those that were cooling when the call began, the
        one whose cooldown ends first is tried, once. A person with one key is not locked out
        for hours by one 401 or 429; with more keys, the cooldowns still decide the order."""
        pairs = [(profile, model) for model in models for profile in self.order(session_id)]
        cooling = [pair for pair in pairs if self.cooldowns.entry(pair[0].name, pair[1])]
        for profile, model in pairs:
            if (profile, model) not in cooling and not self.cooldowns.entry(profile.name, model):
                yield profile, model
        if cooling:
            yield min(cooling, key=lambda pair: self.cooldowns.until(pair[0].name, pair[1]))

    def call(self, session_id: str, messages: list, out: TerminalOutput, agent: Agent | None,
             prompt: Prompt | None) -> anthropic.types.Message:
        agent = agent or DEFAULT_AGENT
        models = [agent.model] + [m for m in self.fallbacks if m != agent.model]
        last, tried = None, (self.order(session_id)[0].name, models[0])  # where calls start
        spent = {"requests": 0, "waited": 0.0}  # this call's, against CALL_BUDGET
        down = set()  # (base URL, model) the service failed for: no other key is tried there
        for profile, model in self.candidates(session_id, models):
            if (profile.base_url, model) in down:
                continue
            if spent["requests"] >= CALL_BUDGET[0]:
                break
            if self.cooldowns.entry(profile.name, model):  # only when nothing free answered
                out.note(f"[every profile is cooling down or failed; trying profile "
                         f"{profile.name} · model {model} anyway, once: its cooldown ends first "
                         f"({shown_clock(self.cooldowns.until(profile.name, model))})]")
            if model not in (tried[1], models[0]):
                self.count("fallbacks")  # also when the call starts on a fallback model
            elif model == tried[1] and profile.name != tried[0]:
                self.count("switches")
            tried = (profile.name, model)
            try:
                message = self.try_profile(profile, model, messages, out, agent, prompt, spent)
            except NextProfile as moved:
                last = moved.exc
                if failure_kind(last) in RETRY_HERE:
                    down.add((profile.base_url, model))
                continue
            except anthropic.NotFoundError:
                if last is None:
                    raise
                continue  # a fallback model this endpoint does not serve: the first failure shows
            self.sticky[session_id] = profile.name
            self.cooldowns.clear(profile.name, model)
            if (profile.name, model) != (self.profiles[0].name, agent.model):
                ROUTE_NOTES[message.id] = f"profile {profile.name} · model {model}"
            self.count("answered")
            return message
        raise last

    def try_profile(self, profile: Profile, model: str, messages: list, out: TerminalOutput,
                    agent: Agent, prompt: Prompt | None, spent: dict) -> anthropic.types.Message:
        """One profile, one model: the call, and again in place for the classes worth it
        (unless the server's x-should-retry header says "false", which the SDK obeys too, or
        the call's budget is spent). Those do not cool the key: the call moves on to the next
        model. A failure after words reached the person is not retried (they would read them
        twice): the turn is dropped, the profile cools, and the next message goes elsewhere."""
        for attempt in range(len(CALL_RETRY_DELAYS) + 1):
            shown = Shown(out)
            self.count("calls")
            spent["requests"] += 1
            try:
                self.fail_if_asked()
                return stream_reply(profile.client(), messages, shown,
                                    Agent(agent.id, agent.name, model, agent.tools), prompt)
            except anthropic.APIError as exc:
                kind = failure_kind(exc)
                self.count("failures", kind)
                if kind in NOT_HERE:
                    raise
                wait = retry_after(exc)
                if kind in RETRY_HERE and attempt < len(CALL_RETRY_DELAYS) and not shown.any \
                        and headers_of(exc).get("x-should-retry") != "false":  # the SDK obeys it
                    delay = max(CALL_RETRY_DELAYS[attempt] * (1 + secrets.randbelow(250) / 1000),
                                wait or 0)
                    if delay <= MAX_WAIT_HERE and spent["requests"] < CALL_BUDGET[0] \
                            and spent["waited"] + delay <= CALL_BUDGET[1]:
                        self.count("retries")
                        spent["waited"] += delay
                        self.sleep(delay)
                        continue
                if kind in RETRY_HERE and not shown.any:  # the service's, not the key's
                    raise NextProfile(exc) from exc
                seconds = self.cooldowns.cool(profile.name, model, kind, wait)
                out.note(f"[profile {profile.name} · model {model}: {kind.replace('_', ' ')}; "
                         f"cooling {shown_seconds(seconds)}]")
                if shown.any:
                    out.say("\n(the reply broke off after it had begun; not retried, so "
                            "nothing is said twice: send your message again)")
                    raise
                raise NextProfile(exc) from exc

    def fail_if_asked(self) -> None:
        """Raise the failure /simulate-failure asked for, as the SDK would have raised it."""
        with self.lock:
            kind = self.injected.popleft() if self.injected else None
        if kind:
            cls, status, error_type, text = SIMULATED[kind]
            if not status:  # no response at all
                raise cls(message=text, request=None)
            body = {"type": "error", "error": {"type": error_type, "message": text}}
            raise cls(text, response=NoResponse(status), body=body)


def shown_clock(epoch: float) -> str:
    """A moment in the machine's local time, as the person reads a clock."""
    try:
        return datetime.fromtimestamp(epoch).strftime("%H:%M:%S")
    except (OverflowError, OSError, ValueError):  # not a time a clock can show
        return "?"


def shown_seconds(seconds: float) -> str:
    """42 s, 25 min, 5 h 59 min: whole seconds, from a minute on whole minutes, rounded up."""
    if not 0 <= seconds < 100 * HOUR:  # also false for nan
        return "?"
    if seconds <= 59:
        return f"{-(-seconds // 1):.0f} s"
    hours, minutes = divmod(int(-(-seconds // 60)), 60)
    return " ".join(([f"{hours} h"] if hours else []) + ([f"{minutes} min"] if minutes else []))


def call_model(client, session: Session, messages: list, out: TerminalOutput,
               agent: Agent | None, prompt: Prompt | None) -> anthropic.types.Message:
    """One model call of a turn: through the onion, or straight to a plain client (a test's)."""
    if isinstance(client, Onion):
        return client.call(session.id, messages, out, agent, prompt)
    return stream_reply(client, messages, out, agent, prompt)


# --- [s09] Commands: profiles, cooldowns, simulate-failure, stats -------------
def shown_model(key: str) -> str:
    """The model part of a cooldown's key, in the words both commands use."""
    model = key.split("|")[1]
    return "all models" if model == ANY_MODEL else f"model {model}"


def show_profiles(repl: Repl, arg: str) -> None:
    onion = repl.client
    mine = onion.sticky.get(repl.session.id, onion.profiles[0].name)
    for profile in onion.profiles:  # a user:password@ in a base URL is not shown
        where = re.sub(r"//[^/@]*@", "//***@", profile.base_url or "https://api.anthropic.com")
        cooling = [f"{shown_model(key)}: {e['reason'].replace('_', ' ')}, "  # whole minutes
                   f"{shown_seconds(-(-(e['until'] - onion.clock()) // 60) * 60)} left"
                   for key, e in onion.cooldowns.active() if key.split("|")[0] == profile.name]
        state = "cooling: " + "; ".join(cooling) if cooling else "ready"
        print(printable(f"{'*' if profile.name == mine else ' '} profile {profile.name}  "
                        f"{profile.fingerprint()}  {where}  {state}"))
    print(printable(f"  (* this session's profile) · models: "
                    f"{', '.join([MODEL_ID] + onion.fallbacks)} · /cooldowns says until when"))


def show_cooldowns(repl: Repl, arg: str) -> None:
    active = repl.client.cooldowns.active()
    if not active:
        print(f"No cooldowns. ({COOLDOWNS_FILE})")
    for key, e in active:
        print(printable(f"profile {key.split('|')[0]} · {shown_model(key)}: "
                        f"{e['reason'].replace('_', ' ')} #{e.get('count', 1)}, "
                        f"until {shown_clock(e['until'])}"))


def simulate_model_failure(repl: Repl, arg: str) -> None:
    if arg not in SIMULATED:
        print(f"Usage: /simulate-failure KIND, one of: {', '.join(SIMULATED)}")
        return
    repl.client.injected.append(arg)
    status = SIMULATED[arg][1]
    print(f"The next model call fails as {arg} ({f'status {status}' if status else 'no answer'}).")


def show_stats(repl: Repl, arg: str) -> None:
    s = repl.client.stats
    failures = ", ".join(f"{k} {v}" for k, v in sorted(s["failures"].items())) or "none"
    print(f"Model calls {s['calls']} · answered {s['answered']} · retries in place "
          f"{s['retries']} · profile switches {s['switches']} · fallbacks {s['fallbacks']}")
    print(f"Failures by class: {failures}")


# --- [s01] The REPL: one table of commands ------------------------------------
@dataclass
class Repl:
    """What the REPL's commands work on."""
    client: anthropic.Anthropic
    session: Session
    guard: ContextGuard
    bus: MessageBus
    agent: Agent | None = None  # the terminal's agent: whose prompt /prompt and /soul show (s06)
    heartbeat: HeartbeatRunner | None = None  # s07: the timers /heartbeat and /cron work on
    cron: CronService | None = None


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
    "/gateway": (show_gateway, "", "the gateway's address, token and connections"),
    "/agents": (show_agents, "", "the agents in gateway.json"),
    "/bindings": (show_bindings, "", "which chats go to which agent"),
    "/route": (show_route, "C P [account] [group]", "which agent and session a message gets"),
    "/sessions": (show_chat_sessions, "", "the sessions of every agent's chats"),
    "/soul": (show_soul, "", "the agent's soul and identity, and the files they come from"),
    "/prompt": (show_prompt, "", "the system prompt layer by layer: size, cache breakpoint, cuts"),
    "/memory": (show_memory, "", "the memory files and the state of their index"),
    "/search": (search_memory, "Q", "search the memory as the memory_search tool does"),
    "/skills": (show_skills, "", "the skills: /<name> [words] starts one for a turn"),
    "/heartbeat": (show_heartbeat, "", "the heartbeat: interval, hours, next run, last result"),
    "/trigger": (trigger_heartbeat, "", "run the heartbeat now (if HEARTBEAT.md asks anything)"),
    "/cron": (cron_command, "[run|enable|disable ID]", "the jobs of CRON.json; run or switch one"),
    "/queue": (show_queue, "", "replies waiting to be sent: chunks sent, attempts, last error"),
    "/failed": (show_failed, "", "replies given up on, with their last error"),
    "/retry": (retry_failed, "ID|all", "queue a failed reply again"),
    "/simulate-failure": (simulate_failure, "KIND | CHANNEL RATE [permanent]",
                          "the next model call fails as KIND, or a share of sends to CHANNEL"),
    "/profiles": (show_profiles, "", "the API keys: which one is in use, which are cooling"),
    "/cooldowns": (show_cooldowns, "", "every cooldown: profile, model, why, until when"),
    "/stats": (show_stats, "", "model calls, failures by class, retries, switches, fallbacks"),
    "/help": (show_help, "", "show this list"),
}


def run_command(repl: Repl, line: str) -> None:
    name, _, arg = line.partition(" ")
    if name not in COMMANDS:
        skill = skill_for(line)  # s06: /<skill-name> [words] is a turn with that skill
        if skill:
            return run_skill(repl, skill, line)
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
    if bus.delivery and bus.delivery.thread:  # s08: what is due goes out; the rest stays on disk
        bus.delivery.settle(SHUTDOWN_GRACE)
    for channel in bus.channels.values():
        channel.stop()  # Telegram stops polling at once; the Feishu webhook and the gateway close
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
    if len(client.profiles) > 1 or client.fallbacks:  # s09
        print(f"Profiles: {len(client.profiles)} · fallback models: "
              f"{', '.join(client.fallbacks) or 'none'} (/profiles)")
    try:
        router = Router(GATEWAY_FILE)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    guard = ContextGuard(client)
    channels = {"terminal": TerminalChannel(),
                "telegram": TelegramChannel(TELEGRAM_BOT_TOKEN, TELEGRAM_API_BASE),
                "feishu": FeishuChannel(FEISHU_APP_ID, FEISHU_APP_SECRET, FEISHU_VERIFICATION_TOKEN,
                                        FEISHU_WEBHOOK_PORT,
                                        FEISHU_API_BASE or FEISHU_API_BASES.get(FEISHU_DOMAIN, ""))}
    pairing = Pairing({"telegram": TELEGRAM_ALLOW_FROM, "feishu": FEISHU_ALLOW_FROM})
    bus = MessageBus(client, router, guard, channels, pairing, ApprovalQueue())
    bus.delivery, bus.inbox = Delivery(channels), Inbox()  # s08: both sides on disk first
    bus.delivery.load()
    for name in KEPT_CHANNELS:
        channels[name].delivery = bus.delivery
    try:
        token = load_gateway_token()
        heartbeat = HeartbeatRunner(bus, router.agents[router.config["default_agent"]])  # s07
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    channels["webchat"] = gateway = GatewayChannel(bus, GATEWAY_HOST, GATEWAY_PORT, token)
    # The terminal is routed too: a binding for channel "terminal" picks its agent (at start-up).
    terminal = router.resolve(probe_message("terminal", "local", "local"))
    replayed = threading.Event()  # s08: what waited on disk goes first, in its order

    def receive(message: InboundMessage) -> None:
        replayed.wait()
        bus.publish(message)

    for channel in channels.values():
        channel.start(receive)
    waiting = bus.inbox.pending()
    for message in waiting:
        try:
            bus.publish(message)
        except Exception as exc:  # its file stays; one line, and the next one is replayed
            log(f"[inbound] {message.inbound}: {type(exc).__name__}: {printable(str(exc))}")
    replayed.set()
    bus.delivery.start()
    print("Channels: " + " · ".join(channel.status() for channel in channels.values()))
    if gateway.state == "on":
        print(f"Gateway: ws://{gateway.host}:{gateway.port} · "
              f"chat page {gateway.url}#token={gateway.token}")
    print(f"Terminal: agent {terminal.agent.id} ({terminal.tier} route)")
    print(f"Delivery: {len(bus.delivery.entries)} waiting to be sent, "
          f"{plural(len(waiting), 'message')} from before the last stop answered now (/queue)")
    stable = build_prompt(terminal.agent, "terminal").stable  # s06: what the prompt holds
    cut = ", ".join(layer.name for layer in stable if layer.cut) or "nothing"
    print(f"Prompt: {sum(len(layer.text) for layer in stable):,} characters before the cache "
          f"breakpoint; cut to fit: {cut} (/prompt shows each layer)")
    if not SEARCH_OK:
        print(f"Memory: {NO_SEARCH}")
    cron = CronService(bus)  # s07: CRON.json is read now; a job that cannot run is a line here
    cron.reload()
    print(f"{heartbeat.describe()[0]} · cron: {plural(len(cron.jobs), 'job')} from {CRON_FILE}")
    stop = threading.Event()
    threading.Thread(target=tick_forever, args=([heartbeat, cron], stop), name="timer",
                     daemon=True).start()
    repl = Repl(client, bus.store_for(terminal.agent.id).resume(), guard, bus, terminal.agent,
                heartbeat, cron)
    print(session_line(repl.session, "resumed" if repl.session.messages else "new"))
    print("Type a message, /help for commands, quit to leave.")
    while True:
        add_terminal_notes(repl.session)  # s07: what scheduled jobs said, for the agent to know
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
        agent_turn(client, repl.session, user_text, repl.guard, TERMINAL, terminal.agent)
    stop.set()  # s07: the timer starts nothing new; what is queued may finish
    shut_down(bus)
    add_terminal_notes(repl.session)
    print("Bye.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
