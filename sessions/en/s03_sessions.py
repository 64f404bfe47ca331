#!/usr/bin/env python3
"""s03 Sessions & context: JSONL append, replay, compact.

One list of messages, one loop. Each turn: append what the person typed,
stream the model's reply to the terminal, then look at `stop_reason` to decide
what the reply means. If the call fails, the turn is taken back out so the
list stays one the API accepts.

New here: when `stop_reason` is "tool_use", run each requested tool, send the
results back as `tool_result` blocks, and ask again, until the model stops
asking. Tools are a list of JSON schemas the model reads (TOOLS) and a dict
from name to Python function (TOOL_HANDLERS). Every path stays inside the
workspace, and shell commands that could change something wait for approval.

New here: every message is appended to a JSONL file as it happens, and
replayed at start-up, so a conversation survives a restart. Before each turn a
ContextGuard counts the prompt; past a threshold of the model's window it asks
the model to summarize the older part, keeps the recent part, and records the
result, so the context never overflows.

Run:  python sessions/en/s03_sessions.py
"""
import fnmatch
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anthropic
from dotenv import load_dotenv

try:
    import readline  # noqa: F401  (arrow keys and history for input(), where available)
except ImportError:
    pass

# --- Configuration ---------------------------------------------------------
# .env sits at the repository root; variables already set in the environment win.
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
load_dotenv(REPO_ROOT / ".env")

SECTION = "s03 Sessions"
MODEL_ID = os.getenv("MODEL_ID") or "claude-sonnet-5-5"
API_KEY = os.getenv("ANTHROPIC_API_KEY") or ""
BASE_URL = os.getenv("ANTHROPIC_BASE_URL") or ""
MAX_TOKENS = int(os.getenv("MAX_TOKENS") or "8192")
SDK_MAX_RETRIES = 2  # the SDK itself retries 429, 5xx and dropped connections this often
WORKSPACE_DIR = Path(os.getenv("WORKSPACE_DIR") or REPO_ROOT / "workspace").resolve()
STATE_DIR = WORKSPACE_DIR / ".state"
MAX_TOOL_ROUNDS = 25        # model calls in one turn before the loop stops asking
BASH_TIMEOUT = float(os.getenv("BASH_TIMEOUT") or "30")
BASH_MAX_TIMEOUT = 300      # the model may ask for more time, never more than this
MAX_TOOL_OUTPUT = 20_000    # characters of one tool result; the middle of longer output is cut
AGENT_ID = "main"
SESSIONS_DIR = STATE_DIR / "sessions" / AGENT_ID
CONTEXT_WINDOW = int(os.getenv("CONTEXT_WINDOW") or "1000000")  # tokens Claude Sonnet 5.5 reads at once
COMPACT_THRESHOLD = float(os.getenv("COMPACT_THRESHOLD") or "0.75")  # compact past this share of the window
SYSTEM_PROMPT = ("You are a helpful assistant talking to one person in a terminal. Be concise. "
                 f"You have tools to read and change files in your workspace ({WORKSPACE_DIR}) "
                 "and to run shell commands there; paths are relative to it.")

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


# --- Errors, by type -------------------------------------------------------
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
        return "The API rejected the key (401). Check ANTHROPIC_API_KEY in .env."
    if isinstance(exc, anthropic.PermissionDeniedError) or kind == "permission_error":
        return "This key may not use that model or feature (403)."
    if isinstance(exc, anthropic.NotFoundError) or kind == "not_found_error":
        return f"Not found (404): is MODEL_ID={MODEL_ID} a model this endpoint serves?"
    if isinstance(exc, anthropic.RateLimitError) or kind == "rate_limit_error":
        return "Rate limited (429): wait a moment, then send again."
    if isinstance(exc, anthropic.OverloadedError) or kind == "overloaded_error":
        return "The API is overloaded (529): try again in a moment."
    if is_context_overflow(exc):
        return "The conversation is too long for the model, even after compaction: /new starts a fresh one."
    label = f"{exc.status_code} {kind}".strip()
    return f"API error ({label}): {exc.api_message or exc.message}"


# --- Tools: where they may reach ---------------------------------------------
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
    if path.is_relative_to(STATE_DIR) or path.name == ".env":
        raise ToolError(f"{raw!r} is private to the gateway (.state/ and .env are off limits)")
    return path


def truncate(text: str, limit: int = MAX_TOOL_OUTPUT) -> str:
    """Keep the head and the tail of long output, and say how much was cut."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 2 // 3], text[-(limit // 3):]
    cut = len(text) - len(head) - len(tail)
    return f"{head}\n\n[... {cut} characters cut from the middle of {len(text)} ...]\n\n{tail}"


def write_atomic(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target:
    a crash leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_text(path: Path, raw: str) -> str:
    if not path.exists():
        raise ToolError(f"file not found: {raw}")
    if path.is_dir():
        raise ToolError(f"{raw} is a directory; use list_dir")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ToolError(f"{raw} is not a UTF-8 text file")


# --- Tools: the handlers -------------------------------------------------------
def read_file(path: str) -> str:
    return truncate(read_text(safe_path(path), path))


def write_file(path: str, content: str) -> str:
    target = safe_path(path)
    if target.is_dir():
        raise ToolError(f"{path} is a directory")
    write_atomic(target, content)
    return f"wrote {len(content.encode('utf-8'))} bytes to {path}"


def edit_file(path: str, old_text: str, new_text: str) -> str:
    target = safe_path(path)
    text = read_text(target, path)
    count = text.count(old_text) if old_text else 0
    if count == 0:
        raise ToolError(f"old_text not found in {path}; read the file and quote it exactly")
    if count > 1:
        raise ToolError(f"old_text occurs {count} times in {path}; include more context so it is unique")
    write_atomic(target, text.replace(old_text, new_text, 1))
    return f"edited {path}: replaced 1 occurrence"


def list_dir(path: str = ".") -> str:
    target = safe_path(path)
    if not target.is_dir():
        raise ToolError(f"not a directory: {path}")
    lines = []
    for entry in sorted(target.iterdir()):
        if entry.name in (".state", ".env"):
            continue  # private to the gateway; not even their names are shown
        if entry.is_dir():
            lines.append(f"{entry.name}/")
        else:
            lines.append(f"{entry.name}  ({entry.stat().st_size} bytes)")
    return "\n".join(lines) or "(empty)"


# --- Exec approvals ------------------------------------------------------------
APPROVALS_FILE = STATE_DIR / "exec-approvals.json"
APPROVAL_PROMPT = "  Allow? [o]nce / [a]lways / [d]eny > "
# Commands that only read. They run without asking, but only in their plain
# form: no shell operators or globs, and every argument that could be a path
# must pass the same safe_path() check as the file tools. `cat ../.env` is a
# read, and exactly what must not happen; so is `cat link/secret` when "link"
# is a symlink that points out of the workspace.
READ_ONLY_COMMANDS = {"ls", "cat", "head", "tail", "wc", "grep", "pwd", "echo", "date", "stat", "du", "file"}
SHELL_OPERATORS = re.compile(r"[;&|<>`$(){}\n\\]")
GLOB_CHARACTERS = re.compile(r"[*?\[]")
LINK_FOLLOWING_FLAGS = {"-R", "-L", "--dereference", "--dereference-recursive"}
# Refused outright, whatever the person answers. A denylist is not a security
# boundary (there are endless ways to spell a command); it only catches the
# obvious disasters. The boundary is the approval prompt.
DANGEROUS_PATTERNS = [
    (r"\brm\s+(-\w*\s+)*-\w*[rR]\w*\s+(-\w+\s+)*(/|~|\*|\.{1,2}/?)(\s|$)", "recursive delete of /, ~, . or *"),
    (r"\bmkfs(\.\w+)?\b", "formats a file system"),
    (r"\bdd\b.*\bof=/dev/", "writes a raw device"),
    (r">\s*/dev/(sd|nvme|hd|disk)", "overwrites a disk device"),
    (r":\(\)\s*\{\s*:\|:&\s*\};:", "fork bomb"),
    (r"\b(shutdown|reboot|halt|poweroff)\b", "stops the machine"),
    (r"\b(curl|wget)\b[^|]*\|\s*(sudo\s+)?(ba|z)?sh\b", "runs a script straight from the network"),
    (r"\bchmod\s+(-\w+\s+)*-R\s+\d*7\d*\s+/", "opens up permissions across the system"),
]


def dangerous_reason(command: str) -> str | None:
    for pattern, reason in DANGEROUS_PATTERNS:
        if re.search(pattern, command):
            return reason
    return None


def is_read_only(command: str) -> bool:
    if SHELL_OPERATORS.search(command) or GLOB_CHARACTERS.search(command):
        return False
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    if not words or words[0] not in READ_ONLY_COMMANDS:
        return False
    for word in words[1:]:
        if word in LINK_FOLLOWING_FLAGS:
            return False
        if word.startswith("-") and "=" not in word:
            continue  # a plain flag such as -n
        value = word.split("=", 1)[1] if word.startswith("-") else word
        if value.startswith("~"):
            return False  # bash expands ~ to the home folder
        try:
            safe_path(value)
        except ToolError:
            return False
    return True


def load_approvals() -> list[str]:
    """The stored "always" patterns. A file that cannot be read is moved aside, not lost."""
    if not APPROVALS_FILE.exists():
        return []
    try:
        data = json.loads(APPROVALS_FILE.read_text(encoding="utf-8"))
        return [str(p) for p in data["always"]]
    except (ValueError, KeyError, TypeError) as exc:
        aside = APPROVALS_FILE.with_name(f"exec-approvals.corrupt-{int(time.time())}.json")
        APPROVALS_FILE.replace(aside)
        print(dim(f"[approvals] {APPROVALS_FILE} is not valid ({exc}); moved it to {aside.name}"))
        return []


def save_approval(pattern: str) -> None:
    patterns = load_approvals()
    if pattern not in patterns:
        patterns.append(pattern)
    write_atomic(APPROVALS_FILE, json.dumps({"version": 1, "always": patterns}, indent=2) + "\n")


def approval_pattern(command: str) -> str:
    """The glob stored for "always": the program and its first argument, then *.
    "git status -s" -> "git status*"; "mkdir -p out" -> "mkdir -p*"."""
    return " ".join(command.split()[:2]) + "*"


def ask_person(command: str) -> str:
    """Ask at the terminal. Anything but o or a (including Ctrl-D) is a deny."""
    print(f"  The model wants to run: {command}")
    print(f"  (always would allow every command matching {approval_pattern(command)!r})")
    try:
        answer = input(APPROVAL_PROMPT).strip().lower()
    except (EOFError, KeyboardInterrupt):
        print()
        return "deny"
    return {"o": "once", "once": "once", "a": "always", "always": "always"}.get(answer, "deny")


def check_command(command: str) -> None:
    """Raise ToolError unless this command may run now."""
    reason = dangerous_reason(command)
    if reason:
        raise ToolError(f"refused: this command {reason}. It is never run, even with approval.")
    if is_read_only(command):
        return
    # A stored pattern never covers shell operators: "git status*" must not let
    # "git status; rm -r notes" through.
    if not SHELL_OPERATORS.search(command) and any(fnmatch.fnmatchcase(command, p) for p in load_approvals()):
        return
    answer = ask_person(command)
    if answer == "always":
        pattern = approval_pattern(command)
        save_approval(pattern)
        print(dim(f"  (stored {pattern!r} in {APPROVALS_FILE.name})"))
    elif answer == "deny":
        raise ToolError("the person denied this command. Do not retry it; ask them what they want instead.")


def child_environment() -> dict:
    """The environment for shell commands, minus anything that looks like a secret."""
    secret = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.I)
    return {k: v for k, v in os.environ.items() if not secret.search(k)}


def bash(command: str, timeout: float | None = None) -> str:
    check_command(command)
    limit = min(float(timeout or BASH_TIMEOUT), BASH_MAX_TIMEOUT)
    # A new session makes the command the leader of its own process group, so
    # on timeout one killpg() stops it and every child it started.
    proc = subprocess.Popen(["bash", "-c", command], cwd=WORKSPACE_DIR, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_environment(),
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        status = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            output, _ = proc.communicate(timeout=1)
        except subprocess.TimeoutExpired:  # a child that left the group still holds the pipe
            output = b""
        status = f"timed out after {limit:g}s; the command and its children were killed"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing it started outlives it
        except ProcessLookupError:
            pass
    text = output.decode("utf-8", errors="replace")
    return truncate(f"{status}\n{text}" if text else status)


# --- Tools: what the model sees, and the dispatch table ------------------------
TOOLS = [
    {"name": "bash", "description": "Run a shell command in the workspace and return its exit code and output. "
     "Commands that change things wait for the person's approval.",
     "input_schema": {"type": "object", "properties": {
         "command": {"type": "string", "description": "The command line, run with bash -c."},
         "timeout": {"type": "number", "description": f"Seconds before it is killed (default {BASH_TIMEOUT:g}, "
                     f"at most {BASH_MAX_TIMEOUT})."}},
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
         "old_text": {"type": "string", "description": "Text that occurs exactly once in the file."},
         "new_text": {"type": "string", "description": "What replaces it."}},
         "required": ["path", "old_text", "new_text"]}},
    {"name": "list_dir", "description": "List a folder of the workspace.",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string", "description": "Folder relative to the workspace (default: the root)."}},
         "required": []}},
]
TOOL_HANDLERS = {"bash": bash, "read_file": read_file, "write_file": write_file, "edit_file": edit_file,
                 "list_dir": list_dir}
JSON_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "object": dict}


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
        if not isinstance(value, JSON_TYPES[expected]) or (expected == "number" and isinstance(value, bool)):
            raise ToolError(f"{name}: {key} must be a {expected}")


def run_tool(name: str, tool_input: dict) -> tuple[str, bool]:
    """Run one tool call. Returns (content, is_error); never raises for a tool's failure."""
    if name not in TOOL_HANDLERS:
        return f"unknown tool {name!r}; the tools are {', '.join(TOOL_HANDLERS)}", True
    try:
        check_arguments(name, tool_input)
        return TOOL_HANDLERS[name](**tool_input), False
    except ToolError as exc:
        return str(exc), True
    except OSError as exc:
        return f"{name} failed: {exc.strerror or exc}", True
    except Exception as exc:  # a bug in a handler still answers the tool_use
        return f"{name} crashed: {type(exc).__name__}: {exc}", True


def preview(text: str) -> str:
    lines = text.splitlines() or [""]
    first = lines[0] if len(lines[0]) <= 80 else lines[0][:77] + "..."
    return first + (f"  (+{len(lines) - 1} lines)" if len(lines) > 1 else "")


def run_tool_calls(content: list) -> tuple[list, bool]:
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
            args = json.dumps(block.input, ensure_ascii=False)
            print(dim(f"  → {block.name} {args if len(args) <= 100 else args[:97] + '...'}"))
            try:
                text, is_error = run_tool(block.name, block.input)
            except KeyboardInterrupt:
                text, is_error, interrupted = "interrupted by the person", True, True
            print(dim(f"  {'✗' if is_error else '←'} {preview(text)}"))
        results.append({"type": "tool_result", "tool_use_id": block.id, "content": text or "(no output)",
                        "is_error": is_error})
    return results, interrupted


# --- Sessions: append on write, replay on read ---------------------------------
def is_valid_message(message) -> bool:
    return (isinstance(message, dict) and message.get("role") in ("user", "assistant")
            and isinstance(message.get("content"), (str, list)) and bool(message["content"]))


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
        blocks = [b for b in as_blocks(message["content"]) if b.get("type") != "text" or b.get("text")]
        if message["role"] == "user":
            previous = fixed[-1] if fixed and fixed[-1]["role"] == "assistant" else None
            expected = set(tool_use_ids(previous)) if previous else set()
            orphans = [b for b in blocks if b.get("type") == "tool_result" and b.get("tool_use_id") not in expected]
            if orphans:
                notes.append(f"dropped {len(orphans)} tool result(s) whose call was lost")
                blocks = [b for b in blocks if b not in orphans]
        if not blocks or (not fixed and message["role"] == "assistant"):
            continue
        content = message["content"] if blocks == as_blocks(message["content"]) else blocks
        if fixed and fixed[-1]["role"] == message["role"]:
            fixed[-1] = {"role": message["role"], "content": as_blocks(fixed[-1]["content"]) + blocks}
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
            notes.append(f"answered {len(missing)} tool call(s) that had no result")
            filler = [{"type": "tool_result", "tool_use_id": tid, "is_error": True,
                       "content": "no result: the gateway stopped before this tool finished"} for tid in missing]
            fixed[i + 1] = {"role": "user", "content": filler + answer}
    return fixed, notes


class Session:
    """One conversation: its id, its messages, and the store that keeps them."""

    def __init__(self, store: "SessionStore", session_id: str, messages: list):
        self.store, self.id, self.messages = store, session_id, messages

    def save(self) -> None:
        self.store.sync(self)

    def replace(self, messages: list, reason: str) -> None:
        """Swap in a rewritten history (a compaction) and record it as a snapshot."""
        self.messages[:] = messages
        self.store.write_snapshot(self, reason)


class SessionStore:
    """One append-only JSONL file per session, plus an index written atomically.

    Each line is one record: {"type": "message", "message": {...}} appends a
    message; {"type": "snapshot", "messages": [...]} replaces the history so far
    (written by a compaction). Replaying the lines in order rebuilds the list.
    """

    def __init__(self, root: Path):
        self.root = root
        self.index_path = root / "sessions.json"
        self.saved: dict[str, list] = {}  # session id -> the messages as last written
        root.mkdir(parents=True, exist_ok=True)
        self.index = self.load_index()

    def load_index(self) -> dict:
        """The index, or one rebuilt from the session files if it is missing or unreadable."""
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
            if isinstance(index.get("sessions"), dict):
                return index
            raise ValueError("no 'sessions' object")
        except FileNotFoundError:
            index = {"current": None, "sessions": {}}
        except (ValueError, AttributeError) as exc:
            aside = self.index_path.with_name(f"sessions.corrupt-{int(time.time())}.json")
            self.index_path.replace(aside)
            print(dim(f"[sessions] {self.index_path} is not valid ({exc}); moved it to {aside.name}, rebuilding"))
            index = {"current": None, "sessions": {}}
        for path in sorted(self.root.glob("*.jsonl")):  # files the index does not know yet
            index["sessions"].setdefault(path.stem, {"label": None, "created": now_iso(), "updated": now_iso(),
                                                     "messages": None})
        return index

    def write_index(self) -> None:
        write_atomic(self.index_path, json.dumps(self.index, indent=2, ensure_ascii=False) + "\n")

    def path(self, session_id: str) -> Path:
        return self.root / f"{session_id}.jsonl"

    def create(self, label: str | None = None) -> Session:
        session_id = self.new_file()
        self.index["sessions"][session_id] = {"label": label, "created": now_iso(), "updated": now_iso(),
                                              "messages": 0}
        self.index["current"] = session_id
        self.write_index()
        self.saved[session_id] = []
        return Session(self, session_id, [])

    def new_file(self) -> str:
        """A fresh session id and its empty file, created exclusively: two sessions started in
        the same second that draw the same suffix can never end up sharing one file."""
        while True:
            session_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
            try:
                self.path(session_id).touch(exist_ok=False)
                return session_id
            except FileExistsError:
                continue  # taken: draw again

    def open(self, session_id: str) -> Session:
        messages = self.replay(session_id)
        self.remember(session_id, messages)
        self.index["current"] = session_id
        self.write_index()
        return Session(self, session_id, messages)

    def resume(self) -> Session:
        """The session used last, or a new one."""
        current = self.index.get("current")
        if current in self.index["sessions"] and self.path(current).exists():
            return self.open(current)
        return self.create()

    def replay(self, session_id: str) -> list:
        path, messages = self.path(session_id), []
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    kind = record["type"]
                except (ValueError, KeyError, TypeError):
                    print(dim(f"[sessions] {path.name}:{number}: skipped a corrupt or half-written line"))
                    continue
                if kind == "message" and is_valid_message(record.get("message")):
                    add_message(messages, record["message"])
                elif kind == "snapshot" and isinstance(record.get("messages"), list):
                    messages = [m for m in record["messages"] if is_valid_message(m)]
                else:
                    print(dim(f"[sessions] {path.name}:{number}: skipped a record of unknown shape"))
        messages, notes = repair_history(messages)
        for note in notes:
            print(dim(f"[sessions] {path.name}: {note}"))
        return messages

    def append(self, session_id: str, records: list) -> None:
        """Append records, one JSON object a line, and fsync: a crash can tear only the last line."""
        path = self.path(session_id)
        torn = False
        if path.exists() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with open(path, "ab") as f:
            if torn:
                f.write(b"\n")  # end a torn line, so it cannot swallow the next record
            for record in records:
                f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def sync(self, session: Session) -> None:
        """Append what is new since the last write. Messages are only ever added at
        the end, except that the open user message may grow; its new blocks are
        written as one more user line, which replay joins back on."""
        saved, messages = self.saved.get(session.id, []), session.messages
        n = len(saved)
        appendable = len(messages) >= n and (n == 0 or messages[:n - 1] == saved[:n - 1])
        records = []
        if appendable and n and messages[n - 1] != saved[n - 1]:
            old, new = as_blocks(saved[n - 1]["content"]), as_blocks(messages[n - 1]["content"])
            appendable = messages[n - 1]["role"] == "user" and new[:len(old)] == old
            records.append({"type": "message", "ts": now_iso(), "message": {"role": "user", "content": new[len(old):]}})
        if not appendable:
            return self.write_snapshot(session, "rewrite")  # not an append: record the whole list
        records += [{"type": "message", "ts": now_iso(), "message": m} for m in messages[n:]]
        if records:
            self.append(session.id, records)
            self.remember(session.id, messages)
            self.touch(session)

    def remember(self, session_id: str, messages: list) -> None:
        """Keep a deep copy of what is on disk now, so sync() can tell what is new."""
        self.saved[session_id] = json.loads(json.dumps(messages))

    def write_snapshot(self, session: Session, reason: str) -> None:
        self.append(session.id, [{"type": "snapshot", "ts": now_iso(), "reason": reason,
                                  "messages": session.messages}])
        self.remember(session.id, session.messages)
        self.touch(session)

    def touch(self, session: Session) -> None:
        entry = self.index["sessions"].setdefault(session.id, {"label": None, "created": now_iso()})
        entry.update(updated=now_iso(), messages=len(session.messages))
        self.index["current"] = session.id
        self.write_index()

    def find(self, query: str) -> list[str]:
        """Session ids matching an id, an id prefix, or a label prefix (any case)."""
        q = query.lower()
        return [sid for sid, entry in self.index["sessions"].items()
                if sid == query or sid.startswith(query) or (entry.get("label") or "").lower().startswith(q)]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --- Context: count, and summarize before it overflows --------------------------
SUMMARY_PREFIX = "[Summary of the earlier part of this conversation, written when it was compacted]"
SUMMARY_PROMPT = ("You summarize conversations between a person and an assistant with tools. Keep every fact, "
                  "decision, file name, open task and preference that later turns may need. Be brief.")


def estimate_tokens(messages: list) -> int:
    """A rough count when the API cannot count: about three characters a token, erring high."""
    characters = len(json.dumps(messages, ensure_ascii=False)) + len(SYSTEM_PROMPT) + len(json.dumps(TOOLS))
    return characters // 3


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


class ContextGuard:
    """Keeps the prompt below COMPACT_THRESHOLD of the model's window.

    Counting uses the API's count_tokens endpoint; a local server without it
    gets a character estimate instead (once it answers 404, it is not asked again).
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
                counted = self.client.messages.count_tokens(model=MODEL_ID, system=SYSTEM_PROMPT, tools=TOOLS,
                                                            messages=messages)
                return counted.input_tokens, "counted by the API"
            except anthropic.APIStatusError as exc:
                if exc.status_code in (404, 405, 501):
                    self.can_count = False  # this endpoint has no token counting
            except anthropic.APIConnectionError:
                pass
        return estimate_tokens(messages), "estimated from characters"

    def check(self, session: Session, user_text: str) -> None:
        """Before a turn: compact if the prompt, with the new words, would pass the limit."""
        probe = list(session.messages)
        add_user_text(probe, user_text)
        tokens, _ = self.count(probe)
        if tokens > self.limit:
            self.compact(session, f"{tokens} tokens is over the limit of {self.limit}")

    def cut_point(self, messages: list) -> int | None:
        """Where the recent part starts: at an assistant message, so a tool_use and
        its tool_result always land on the same side. The recent part keeps up to
        a quarter of the limit; at least the last assistant message is kept."""
        candidates = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
        for i in candidates:
            if estimate_tokens(messages[i:]) <= self.limit // 4:
                return i
        return candidates[-1] if candidates else None

    def compact(self, session: Session, why: str) -> bool:
        """Summarize the older part with the model, keep the recent part, record a snapshot."""
        messages = session.messages
        cut = self.cut_point(messages)
        if cut is None:
            print(dim("[context] nothing to compact yet"))
            return False
        print(dim(f"[context] compacting ({why}): summarizing {cut} older messages"))
        try:
            reply = self.client.messages.create(model=MODEL_ID, max_tokens=2048, system=SUMMARY_PROMPT,
                                                messages=[{"role": "user", "content": render_for_summary(
                                                    messages[:cut])}])
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
        session.replace([{"role": "user", "content": f"{SUMMARY_PREFIX}\n{summary}"}] + messages[cut:], "compaction")
        print(dim(f"[context] compacted: {before} messages -> {len(session.messages)}"))
        return True


# --- The agent loop --------------------------------------------------------
def stream_reply(client: anthropic.Anthropic, messages: list) -> anthropic.types.Message:
    """Send the conversation; print text as it arrives; return the whole message."""
    with client.messages.stream(model=MODEL_ID, max_tokens=MAX_TOKENS, system=SYSTEM_PROMPT,
                                tools=TOOLS, messages=messages) as stream:
        for text in stream.text_stream:
            print(text, end="", flush=True)
        return stream.get_final_message()


def print_usage(message: anthropic.types.Message) -> None:
    u = message.usage
    cached = u.cache_read_input_tokens or 0
    print(dim(f"[tokens in {u.input_tokens} / out {u.output_tokens} / cached {cached}"
              f" · stop {message.stop_reason}]"))


def assistant_content(message: anthropic.types.Message) -> list:
    """The reply as history blocks: text and tool_use, never an empty text block."""
    blocks = []
    for block in message.content:
        if block.type == "text" and block.text:
            blocks.append({"type": "text", "text": block.text})
        elif block.type == "tool_use":
            blocks.append({"type": "tool_use", "id": block.id, "name": block.name, "input": block.input})
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
    print(f"(stopped after {MAX_TOOL_ROUNDS} model calls in one turn; send a message to let it go on)")
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


def finish_turn(messages: list, consistent: list, message: anthropic.types.Message, text: str) -> str | None:
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


# --- The REPL --------------------------------------------------------------
HELP = """Commands:
  /new [label]  start a new session (the old one stays on disk)
  /list         list the sessions, newest first
  /switch X     switch to a session by id, id prefix or label prefix
  /context      how full the model's context window is
  /compact      summarize the older part of this session now
  /help         show this list
  quit, exit    leave (Ctrl-D and Ctrl-C work too)
Anything else is sent to the model."""


def session_line(session: Session, how: str) -> str:
    label = session.store.index["sessions"].get(session.id, {}).get("label")
    return f"Session {session.id}{f' ({label})' if label else ''}: {how}, {len(session.messages)} messages"


def run_command(line: str, session: Session, guard: ContextGuard) -> Session:
    """The session commands. Returns the session to use from now on."""
    store = session.store
    command, _, arg = line.partition(" ")
    arg = arg.strip()
    if command == "/new":
        session = store.create(arg or None)
        print(session_line(session, "new"))
    elif command == "/list":
        by_update = sorted(store.index["sessions"].items(), key=lambda kv: kv[1].get("updated") or "", reverse=True)
        for sid, entry in by_update:
            mark = "*" if sid == session.id else " "
            label = f" ({entry['label']})" if entry.get("label") else ""
            count = entry.get("messages")
            print(f"  {mark} {sid}{label}  {'?' if count is None else count} messages, updated {entry.get('updated')}")
    elif command == "/switch":
        matches = store.find(arg) if arg else []
        if len(matches) == 1:
            session = store.open(matches[0])
            print(session_line(session, "switched"))
        elif not arg:
            print("Usage: /switch <id, id prefix or label prefix>")
        elif not matches:
            print(f"No session matches {arg!r}; /list shows them.")
        else:
            print(f"{arg!r} matches {len(matches)} sessions: {', '.join(matches)}. Say which.")
    elif command == "/context":
        tokens, how = guard.count(session.messages) if session.messages else (0, "empty")
        print(f"Context: {tokens:,} tokens ({how}) of a {CONTEXT_WINDOW:,}-token window; "
              f"compaction at {guard.limit:,} ({COMPACT_THRESHOLD:.0%}); {len(session.messages)} messages")
    elif command == "/compact":
        guard.compact(session, "asked for with /compact")
    else:
        print(f"Unknown command {command}; /help lists the commands.")
    return session


def main() -> int:
    client = make_client()
    WORKSPACE_DIR.mkdir(parents=True, exist_ok=True)
    print(f"{SECTION} · model {MODEL_ID} · base URL {BASE_URL or 'https://api.anthropic.com'}")
    print(f"Workspace: {WORKSPACE_DIR} ({len(TOOLS)} tools)")
    store = SessionStore(SESSIONS_DIR)
    session = store.resume()
    guard = ContextGuard(client)
    print(session_line(session, "resumed" if session.messages else "new"))
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
        if user_text == "/help":
            print(HELP)
            continue
        if user_text.startswith("/"):
            session = run_command(user_text, session, guard)
            continue
        agent_turn(client, session, user_text, guard)
    print("Bye.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
