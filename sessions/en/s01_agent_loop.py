#!/usr/bin/env python3
"""s01 Agent loop: `while True` + `stop_reason`.

One list of messages, one loop. Each turn: append what the person typed,
stream the model's reply to the terminal, then look at `stop_reason` to decide
what the reply means. If the call fails, the turn is taken back out so the
list stays one the API accepts.

New here:
  [s01] Configuration — number_setting, dim, make_client
  [s01] Errors, by type — describe_api_error
  [s01] The agent loop — printable, stream_reply, print_usage, agent_turn
  [s01] The REPL: one table of commands — Repl, show_help, run_command, main

Run:  python sessions/en/s01_agent_loop.py
"""
from __future__ import annotations

import os
import sys
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


SECTION = "s01 Agent loop"
MODEL_ID = os.getenv("MODEL_ID") or "claude-sonnet-5-5"
API_KEY = os.getenv("ANTHROPIC_API_KEY") or ""
BASE_URL = os.getenv("ANTHROPIC_BASE_URL") or ""
MAX_TOKENS = number_setting("MAX_TOKENS", 8192)
SDK_MAX_RETRIES = 2  # the SDK itself retries 429, 5xx and dropped connections this often
SYSTEM_PROMPT = "You are a helpful assistant talking to one person in a terminal. Be concise."

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
    with client.messages.stream(model=MODEL_ID, max_tokens=MAX_TOKENS,
                                system=SYSTEM_PROMPT, messages=messages) as stream:
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


def agent_turn(client: anthropic.Anthropic, messages: list, user_text: str) -> str | None:
    """One turn. Returns the reply text, or None when the turn was rolled back."""
    consistent = list(messages)  # the last point at which the history is whole
    messages.append({"role": "user", "content": user_text})
    try:
        message = stream_reply(client, messages)
    except anthropic.APIError as exc:
        messages[:] = consistent  # roll back to the last consistent point
        print(f"\n{describe_api_error(exc)}")
        return None
    except KeyboardInterrupt:
        messages[:] = consistent
        print("\n(interrupted; that turn was dropped)")
        return None
    except Exception as exc:  # the stream broke off: a dropped connection, unreadable tool JSON
        messages[:] = consistent
        print(f"\n(the reply broke off, {type(exc).__name__}: {printable(str(exc))[:200]}; "
              "that turn was dropped)")
        return None
    text = "".join(block.text for block in message.content if block.type == "text")
    if text:
        print()  # end the streamed line
    print_usage(message)
    reason = message.stop_reason
    if reason == "tool_use":
        print("(the model asked for a tool; tools arrive in s02, so that turn was dropped)")
    elif reason == "refusal":
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


# --- [s01] The REPL: one table of commands ------------------------------------
@dataclass
class Repl:
    """What the REPL's commands work on."""
    client: anthropic.Anthropic
    messages: list


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
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # a non-UTF-8 byte becomes U+FFFD, not a crash
    print(f"{SECTION} · model {MODEL_ID} · base URL {BASE_URL or 'https://api.anthropic.com'}")
    print("Type a message, /help for commands, quit to leave.")
    repl = Repl(client, [])
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
        agent_turn(client, repl.messages, user_text)
    print("Bye.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
