"""A scripted fake of the Anthropic Messages API, served on 127.0.0.1.

The installed `anthropic` SDK talks HTTP through `httpx2`, so HTTP-mocking
libraries for `httpx` never see its requests. Instead the tests run this small
real server and point `ANTHROPIC_BASE_URL` at it, in-process or for a section
started as a subprocess.

Script it with a list of steps, consumed one per accepted `POST /v1/messages`:

    api.script(reply("Hello!"),
               reply(tools=[tool_use("bash", {"command": "ls"})]),
               error(429, "rate_limit_error", "Slow down"))

When the script is empty the server answers with `default_reply(request)`,
which echoes the last user text. Streaming (`"stream": true`) is answered with
the real SSE event sequence; `POST /v1/messages/count_tokens` counts a prompt.

Where a section depends on the real API's behaviour, the fake behaves the same:

- Validation. A request the real API refuses gets its 400
  `invalid_request_error`, with the message the real API sends (see
  `request_problem` for the rules), on /v1/messages (streaming or not) and on
  count_tokens. A refused request takes no step from the script.
- Token counts. Every part of the prompt the model reads counts: tools, then the
  system prompt, then the messages. Each tool, each system block and each content
  block counts a quarter of the characters of its canonical JSON (sorted keys, no
  spaces, cache_control left out), rounded up; a plain-string system prompt or
  message content counts as the one text block it stands for, and each message
  adds its role, `{"role":"user"}`, counted the same way. So two identical
  prompts always count the same, and count_tokens returns exactly the total that
  /v1/messages reports (input + cache read + cache creation). Output tokens count
  the reply's blocks by the same rule (tool ids left out).
- Prompt caching, as documented for the real API (see `PromptCache`).
- Context window overflow (`context_window`).

Options and records on a FakeAnthropic (set them before or between requests):

    requests           every /v1/messages body received, refused ones included
    count_requests     every count_tokens body received
    rejected           [{"endpoint", "message", "body"}] of each request refused as
                       invalid, so a test can assert `api.rejected == []`
    validate = True    False accepts anything (a test that sends garbage on purpose)
    caching = True     False accepts cache_control but never caches (a local server)
    context_window     None, or a token limit; a longer prompt gets the real
                       "prompt is too long: N tokens > M maximum" 400 (not counted
                       in `rejected`: the request is well formed)
    min_cache_tokens   None (by model: 2048 for Haiku, 1024 otherwise), or a number
    clock              time.monotonic; the cache's time, for a test to move on
    count_as_if        {real: shown}: count tokens as if each `real` string were
                       `shown` (a transcript counts as if the workspace were the
                       path the lesson shows, so its numbers do not depend on TMPDIR)
    count_tokens_status = 404 makes count_tokens act like a local server without it
    default            the reply used when the script is empty
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from itertools import count
from typing import NamedTuple

from local_server import LocalServer, QuietHandler

_ids = count(1)

# The block types the Messages API accepts in a message (anthropic SDK 2.x ContentBlockParam).
BLOCK_TYPES = (
    "text",
    "image",
    "document",
    "search_result",
    "thinking",
    "redacted_thinking",
    "tool_use",
    "tool_result",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
    "tool_search_tool_result",
    "container_upload",
)
MAX_CACHE_BREAKPOINTS = 4
CACHE_LOOKBACK_BLOCKS = 20  # a breakpoint finds an earlier cache entry at most this far back
CACHE_TTL_SECONDS = {"5m": 300, "1h": 3600}


# --- Script steps ---------------------------------------------------------------
def tool_use(name: str, tool_input: dict, tool_id: str | None = None) -> dict:
    return {
        "type": "tool_use",
        "id": tool_id or f"toolu_fake{next(_ids):04d}",
        "name": name,
        "input": tool_input,
    }


def reply(
    text: str = "",
    *,
    tools: list[dict] | None = None,
    stop_reason: str | None = None,
    chunks: list[str] | None = None,
    gate: threading.Event | None = None,
    stream_error: tuple[str, str] | None = None,
    usage: dict | None = None,
) -> dict:
    """One assistant message.

    chunks: how the text is split into text_delta events (default: by words).
    gate: when given, the stream pauses after the first chunk until it is set.
    stream_error: (error_type, message) sent as an SSE `error` event after the
    first chunk, as the real API does when it fails mid-stream.
    usage: fields that replace the counted usage (an override always wins).
    """
    content = []
    if text:
        content.append({"type": "text", "text": text})
    content.extend(tools or [])
    if stop_reason is None:
        stop_reason = "tool_use" if tools else "end_turn"
    return {
        "kind": "reply",
        "content": content,
        "stop_reason": stop_reason,
        "chunks": chunks,
        "gate": gate,
        "stream_error": stream_error,
        "usage": usage or {},
    }


def error(
    status: int,
    error_type: str,
    message: str = "fake error",
    *,
    headers: dict | None = None,
    should_retry: bool = False,
) -> dict:
    """An HTTP error with the real body shape. By default the SDK is told not to
    retry (`x-should-retry: false`) so tests stay fast and deterministic."""
    h = {"x-should-retry": "true" if should_retry else "false"}
    h.update(headers or {})
    return {"kind": "error", "status": status, "type": error_type, "message": message, "headers": h}


def last_user_text(body: dict) -> str:
    for msg in reversed(body.get("messages", [])):
        if msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            return content
        texts = [b.get("text", "") for b in content if b.get("type") == "text"]
        if texts:
            return " ".join(texts)
        return "(tool results)"
    return ""


def default_reply(body: dict) -> dict:
    return reply(f"(fake) you said: {last_user_text(body)}")


# --- Validation -----------------------------------------------------------------
# The messages below are the real API's, as seen in its 400 answers quoted in bug
# reports (e.g. anthropics/claude-code issues #2697, #6774, #13460, #23440, #28515,
# #53473; anthropics/anthropic-sdk-typescript #653; Wei-Shaw/sub2api #176), or the
# pydantic-style "<path>: <problem>" form it uses for malformed fields.
class InvalidRequest(Exception):
    """A request the real API answers with 400 invalid_request_error; str() is the message."""


def as_blocks(content) -> list:
    """Message content as blocks: a string is shorthand for one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content if isinstance(content, list) else []


def request_problem(body, *, needs_max_tokens: bool) -> str | None:
    """Why the real API would refuse this request body, or None when it would accept it.

    The rules a section could break: `model` and `max_tokens` (>= 0) present; at
    least one message, the first from the user; every message's content non-empty,
    except an optional final assistant message; no empty or whitespace-only text
    block; only known block types; a custom tool has a name and an input_schema,
    tool names are unique; at most 4 cache_control breakpoints; tool_use ids are
    unique; the tool_result blocks at the start of the next user turn answer every
    tool_use of an assistant turn; a tool_result answers a tool_use of the turn
    just before it. Consecutive messages of one role are accepted: the API
    combines them into one turn (the SDK documents this on `messages`).
    """
    if not isinstance(body, dict):
        return "Input should be a valid dictionary"
    try:
        if "model" not in body:
            raise InvalidRequest("model: Field required")
        if needs_max_tokens:  # count_tokens takes no max_tokens
            check_max_tokens(body)
        check_messages(body.get("messages"))
        check_system(body.get("system"))
        check_tools(body.get("tools"))
        check_cache_controls(body)
        check_tool_pairs(body["messages"])
    except InvalidRequest as exc:
        return str(exc)
    return None


def check_max_tokens(body: dict) -> None:
    if "max_tokens" not in body:
        raise InvalidRequest("max_tokens: Field required")
    value = body["max_tokens"]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest("max_tokens: Input should be a valid integer")
    # 0 is allowed: the SDK documents it as "populate the prompt cache without generating".
    if value < 0:
        raise InvalidRequest("max_tokens: Input should be greater than or equal to 0")


def check_messages(messages) -> None:
    if messages is None:
        raise InvalidRequest("messages: Field required")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: Input should be a valid list")
    if not messages:
        raise InvalidRequest("messages: at least one message is required")
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages.{i}: Input should be a valid dictionary")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if content is None:
            raise InvalidRequest(f"messages.{i}.content: Field required")
        if not isinstance(content, (str, list)):
            raise InvalidRequest(f"messages.{i}.content: Input should be a valid list")
        if not content:
            if i == last and role == "assistant":
                continue  # an empty final assistant message is allowed
            raise InvalidRequest(
                f"messages.{i}: all messages must have non-empty content except "
                "for the optional final assistant message"
            )
        if isinstance(content, str):
            check_text(content, "messages")
            continue
        for j, block in enumerate(content):
            check_block(block, f"messages.{i}.content.{j}")
    if messages[0]["role"] != "user":
        raise InvalidRequest('messages: first message must use the "user" role')
    # Consecutive messages of one role are allowed: the API combines them into one
    # turn (documented on `messages` in the SDK). check_tool_pairs does the same.


def check_text(text: str, where: str) -> None:
    if text == "":
        raise InvalidRequest(f"{where}: text content blocks must be non-empty")
    if not text.strip():
        raise InvalidRequest(f"{where}: text content blocks must contain non-whitespace text")


def check_block(block, where: str) -> None:
    if not isinstance(block, dict) or "type" not in block:
        raise InvalidRequest(f"{where}: Unable to extract tag using discriminator 'type'")
    kind = block["type"]
    if kind not in BLOCK_TYPES:
        expected = ", ".join(f"'{t}'" for t in BLOCK_TYPES)
        raise InvalidRequest(
            f"{where}: Input tag '{kind}' found using 'type' does not match any "
            f"of the expected tags: {expected}"
        )
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise InvalidRequest(f"{where}.text.text: Field required")
        check_text(block["text"], "messages")
    elif kind == "tool_use":
        for field in ("id", "name"):
            if not isinstance(block.get(field), str):
                raise InvalidRequest(f"{where}.tool_use.{field}: Field required")
        if not isinstance(block.get("input"), dict):
            raise InvalidRequest(f"{where}.tool_use.input: Input should be a valid dictionary")
    elif kind == "tool_result" and not isinstance(block.get("tool_use_id"), str):
        raise InvalidRequest(f"{where}.tool_result.tool_use_id: Field required")


def check_system(system) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise InvalidRequest("system: Input should be a valid string or list")
    for k, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else None
            raise InvalidRequest(
                f"system.{k}: Input tag '{kind}' found using 'type' does not "
                "match any of the expected tags: 'text'"
            )
        if not isinstance(block.get("text"), str):
            raise InvalidRequest(f"system.{k}.text: Field required")
        check_text(block["text"], "system")


def check_tools(tools) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidRequest("tools: Input should be a valid list")
    names = set()
    for n, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"tools.{n}: Input should be a valid dictionary")
        if tool.get("type") in (None, "custom"):  # a tool the client runs: it needs a schema
            where = f"tools.{n}.custom"
            if not isinstance(tool.get("name"), str):
                raise InvalidRequest(f"{where}.name: Field required")
            schema = tool.get("input_schema")
            if schema is None:
                raise InvalidRequest(f"{where}.input_schema: Field required")
            if not isinstance(schema, dict) or "type" not in schema:
                raise InvalidRequest(f"{where}.input_schema.type: Field required")
        if tool.get("name") in names:
            raise InvalidRequest("tools: Tool names must be unique.")
        names.add(tool.get("name"))


def cache_controls(body: dict) -> list[tuple[str, object]]:
    """(path, cache_control) for every breakpoint a request sets, in prompt order.
    A top-level cache_control (automatic caching) is one of them."""
    found = []
    for n, tool in enumerate(body.get("tools") or []):
        if isinstance(tool, dict) and tool.get("cache_control") is not None:
            found.append((f"tools.{n}.{tool.get('type') or 'custom'}", tool["cache_control"]))
    system = body.get("system")
    for k, block in enumerate(system if isinstance(system, list) else []):
        if isinstance(block, dict) and block.get("cache_control") is not None:
            found.append((f"system.{k}", block["cache_control"]))
    for i, message in enumerate(body.get("messages") or []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else []):
            if isinstance(block, dict) and block.get("cache_control") is not None:
                found.append(
                    (f"messages.{i}.content.{j}.{block.get('type')}", block["cache_control"])
                )
    if body.get("cache_control") is not None:
        found.append(("", body["cache_control"]))
    return found


def check_cache_controls(body: dict) -> None:
    found = cache_controls(body)
    for path, control in found:
        where = f"{path}.cache_control" if path else "cache_control"
        if not isinstance(control, dict) or control.get("type") != "ephemeral":
            raise InvalidRequest(f"{where}.type: Input should be 'ephemeral'")
        if control.get("ttl") not in (None, *CACHE_TTL_SECONDS):
            raise InvalidRequest(f"{where}.ttl: Input should be '5m' or '1h'")
    if len(found) > MAX_CACHE_BREAKPOINTS:
        raise InvalidRequest(
            f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may "
            f"be provided. Found {len(found)}."
        )


def turns_of(messages: list) -> list[tuple[str, list[tuple[int, int, dict]]]]:
    """Consecutive messages of one role joined into one turn, as the API does:
    [(role, [(message index, block index, block), ...]), ...]."""
    turns = []
    for i, message in enumerate(messages):
        blocks = [(i, j, block) for j, block in enumerate(as_blocks(message["content"]))]
        if turns and turns[-1][0] == message["role"]:
            turns[-1][1].extend(blocks)
        else:
            turns.append((message["role"], blocks))
    return turns


def check_tool_pairs(messages: list) -> None:
    """Every tool_use is answered by a tool_result at the start of the next user
    turn; every tool_result answers a tool_use of the turn just before it."""
    seen = set()
    for i, message in enumerate(messages):
        for j, block in enumerate(as_blocks(message["content"])):
            if block["type"] == "tool_use":
                if block["id"] in seen:
                    raise InvalidRequest(f"messages.{i}.content.{j}: tool_use ids must be unique")
                seen.add(block["id"])
    turns = turns_of(messages)
    for t, (role, blocks) in enumerate(turns):
        if role == "user":
            previous = turns[t - 1][1] if t else []
            asked = {b["id"] for _, _, b in previous if b["type"] == "tool_use"}
            for i, j, block in blocks:
                if block["type"] == "tool_result" and block["tool_use_id"] not in asked:
                    raise InvalidRequest(
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in "
                        f"`tool_result` blocks: {block['tool_use_id']}. Each `tool_result` block "
                        "must have a corresponding `tool_use` block in the previous message."
                    )
            continue
        uses = [(i, b["id"]) for i, _, b in blocks if b["type"] == "tool_use"]
        answered = set()
        for _, _, block in turns[t + 1][1] if t + 1 < len(turns) else []:
            if block["type"] != "tool_result":
                break  # results must come first in the next turn; text may follow them
            answered.add(block["tool_use_id"])
        missing = [(i, tool_id) for i, tool_id in uses if tool_id not in answered]
        if missing:
            ids = ", ".join(tool_id for _, tool_id in missing)
            raise InvalidRequest(
                f"messages.{missing[0][0]}: `tool_use` ids were found without `tool_result` "
                f"blocks immediately after: {ids}. Each `tool_use` block must have a "
                "corresponding `tool_result` block in the next message."
            )


# --- Token counting -------------------------------------------------------------
class PromptPart(NamedTuple):
    """One tool, system block or content block, in the order the model reads them."""

    tokens: int
    text: str  # its canonical JSON: what a cache key is made of
    cache_control: dict | None


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def without(block, *keys: str):
    if isinstance(block, dict) and any(k in block for k in keys):
        return {k: v for k, v in block.items() if k not in keys}
    return block


def token_measure(count_as_if: dict[str, str] | None = None):
    """The fake's tokenizer: a quarter of the characters, rounded up, counting each
    `real` string of count_as_if as if it were its `shown` string."""

    def measure(text: str) -> int:
        length = len(text)
        for real, shown in (count_as_if or {}).items():
            if real in text:
                length += text.count(real) * (len(shown) - len(real))
        return (length + 3) // 4

    return measure


def prompt_parts(body: dict, measure=None) -> list[PromptPart]:
    """The prompt as the model reads it: tools, system, then messages."""
    measure = measure or token_measure()
    parts = []

    def add(block, prefix: str = "") -> None:
        control = block.get("cache_control") if isinstance(block, dict) else None
        text = prefix + canonical(without(block, "cache_control"))
        parts.append(PromptPart(measure(text), text, control))

    for tool in body.get("tools") or []:
        add(tool)
    for block in as_blocks(body.get("system") or []):
        add(block)
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        role = canonical({"role": message.get("role")})
        blocks = as_blocks(message.get("content"))
        if not blocks:  # an empty final assistant message still has its role
            parts.append(PromptPart(measure(role), role, None))
        for j, block in enumerate(blocks):
            add(block, role if j == 0 else "")
    top = body.get("cache_control")
    if top is not None and parts and parts[-1].cache_control is None:
        parts[-1] = parts[-1]._replace(cache_control=top)  # automatic caching: the last block
    return parts


def prompt_tokens(body: dict, count_as_if: dict[str, str] | None = None) -> int:
    """The whole prompt's tokens: what count_tokens returns."""
    return sum(part.tokens for part in prompt_parts(body, token_measure(count_as_if)))


def output_tokens(content: list, measure=None) -> int:
    measure = measure or token_measure()
    return max(1, sum(measure(canonical(without(block, "id"))) for block in content))


# --- Prompt caching -------------------------------------------------------------
def min_cacheable_tokens(model: str) -> int:
    """The shortest prefix the real API caches: 1024 tokens for Sonnet and Opus
    models, 2048 for Haiku (newer models vary; set FakeAnthropic.min_cache_tokens)."""
    return 2048 if "haiku" in (model or "").lower() else 1024


class CacheUsage(NamedTuple):
    read: int
    created: int
    created_by_ttl: dict  # {"5m": tokens, "1h": tokens}


class PromptCache:
    """Prompt caching as the real API documents it:

    - A block with cache_control is a breakpoint; the cached prefix is everything
      before it and the block itself, in the order tools, system, messages.
    - A prefix shorter than the model's minimum is simply not cached (no error).
    - A hit needs a byte-identical prefix, for the same model, cached within its
      time to live (5 minutes, or 1 hour with "ttl": "1h"); each hit refreshes it.
    - At each breakpoint the API looks for an entry at that block and at most 20
      blocks before it, so a conversation whose breakpoint moves forward reads what
      the previous request cached.
    - Usage: cache_read_input_tokens is the longest prefix found; everything from
      there up to the last breakpoint is written (cache_creation_input_tokens);
      input_tokens is only what comes after the last breakpoint.

    Source: https://platform.claude.com/docs/en/build-with-claude/prompt-caching
    (prefix order, minimum lengths, TTLs, automatic caching, the 20-block lookback).
    Not modelled: invalidation by tool_choice, images or thinking settings.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[str, bytes], tuple[float, float]] = {}  # -> (expires, ttl)
        self.lock = threading.Lock()

    def account(self, model: str, parts: list[PromptPart], minimum: int, now: float) -> CacheUsage:
        ends, total = [], 0  # ends[i]: tokens of the prefix up to and including part i
        for part in parts:
            total += part.tokens
            ends.append(total)
        breakpoints = [
            i
            for i, part in enumerate(parts)
            if isinstance(part.cache_control, dict) and ends[i] >= minimum
        ]
        if not breakpoints:
            return CacheUsage(0, 0, {"5m": 0, "1h": 0})
        keys = self.prefix_keys(model, parts, breakpoints[-1])
        with self.lock:
            read_end = -1
            for b in breakpoints:
                for i in range(b, max(-1, b - CACHE_LOOKBACK_BLOCKS - 1), -1):
                    if self.hit(keys[i], now):
                        read_end = max(read_end, i)
                        break
            by_ttl, covered = {"5m": 0, "1h": 0}, ends[read_end] if read_end >= 0 else 0
            for b in breakpoints:
                ttl = parts[b].cache_control.get("ttl")
                ttl = ttl if ttl in CACHE_TTL_SECONDS else "5m"
                self.write(keys[b], now, CACHE_TTL_SECONDS[ttl])
                if ends[b] > covered:
                    by_ttl[ttl] += ends[b] - covered
                    covered = ends[b]
        read = ends[read_end] if read_end >= 0 else 0
        return CacheUsage(read, ends[breakpoints[-1]] - read, by_ttl)

    @staticmethod
    def prefix_keys(model: str, parts: list[PromptPart], last: int) -> list[tuple[str, bytes]]:
        """(model, hash of the prefix up to part i) for i up to `last`."""
        digest, keys = hashlib.sha256(), []
        for part in parts[: last + 1]:
            digest.update(part.text.encode())
            digest.update(b"\0")
            keys.append((model, digest.copy().digest()))
        return keys

    def hit(self, key, now: float) -> bool:
        entry = self.entries.get(key)
        if entry is None:
            return False
        expires, ttl = entry
        if expires <= now:
            del self.entries[key]
            return False
        self.entries[key] = (now + ttl, ttl)  # a hit refreshes the entry
        return True

    def write(self, key, now: float, ttl: float) -> None:
        entry = self.entries.get(key)
        if entry and entry[0] > now:
            ttl = max(ttl, entry[1])
        self.entries[key] = (now + ttl, ttl)


# --- The server -----------------------------------------------------------------
class FakeAnthropic:
    def __init__(self, port: int = 0) -> None:
        self.steps: list[dict] = []
        self.requests: list[dict] = []
        self.count_requests: list[dict] = []
        self.rejected: list[dict] = []
        self.count_tokens_status = 200  # set to 404 to act like a local server without the endpoint
        self.default = default_reply
        self.validate = True
        self.caching = True
        self.context_window: int | None = None
        self.min_cache_tokens: int | None = None
        self.count_as_if: dict[str, str] = {}
        self.clock = time.monotonic
        self.cache = PromptCache()
        self.lock = threading.Lock()
        self.http = LocalServer(self._handler_class(), port)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    def start(self) -> "FakeAnthropic":
        self.http.start()
        return self

    def stop(self) -> None:
        self.http.stop()

    def script(self, *steps: dict) -> None:
        with self.lock:
            self.steps.extend(steps)

    def take_step(self, body: dict) -> dict:
        with self.lock:
            if self.steps:
                return self.steps.pop(0)
        return self.default(body)

    def prompt_tokens(self, body: dict) -> int:
        return prompt_tokens(body, self.count_as_if)

    def refusal(self, endpoint: str, body) -> dict | None:
        """The 400 for a request the real API would refuse (recorded in `rejected`), or None."""
        if not self.validate:
            return None
        problem = request_problem(body, needs_max_tokens=endpoint == "/v1/messages")
        if problem is None:
            return None
        with self.lock:
            self.rejected.append({"endpoint": endpoint, "message": problem, "body": body})
        return error(400, "invalid_request_error", problem)

    def answer_count_tokens(self, body) -> tuple[dict, dict | None]:
        """(error step or None, JSON answer) for POST /v1/messages/count_tokens."""
        with self.lock:
            self.count_requests.append(body)
        if self.count_tokens_status != 200:
            return error(self.count_tokens_status, "not_found_error", "Not found"), None
        refused = self.refusal("/v1/messages/count_tokens", body)
        if refused:
            return refused, None
        # No overflow check here: counting is how a client finds out it is over.
        return None, {"input_tokens": self.prompt_tokens(body if isinstance(body, dict) else {})}

    def answer_messages(self, body) -> tuple[dict, dict | None]:
        """(step, usage) for POST /v1/messages: an error step, or a reply with its usage."""
        with self.lock:
            self.requests.append(body)
        refused = self.refusal("/v1/messages", body)
        if refused:
            return refused, None
        if not isinstance(body, dict):  # garbage let through with validate = False
            body = {}
        measure = token_measure(self.count_as_if)
        parts = prompt_parts(body, measure)
        total = sum(part.tokens for part in parts)
        if self.context_window is not None and total > self.context_window:
            too_long = f"prompt is too long: {total} tokens > {self.context_window} maximum"
            return error(400, "invalid_request_error", too_long), None
        if body.get("max_tokens") == 0:  # only fills the prompt cache: no step is taken
            step, out = reply(stop_reason="max_tokens"), 0
        else:
            step = self.take_step(body)
            if step["kind"] == "error":
                return step, None
            out = output_tokens(step["content"], measure)
        cached = CacheUsage(0, 0, {"5m": 0, "1h": 0})
        if self.caching:
            model = str(body.get("model"))
            minimum = self.min_cache_tokens or min_cacheable_tokens(model)
            cached = self.cache.account(model, parts, minimum, self.clock())
        usage = {
            "input_tokens": total - cached.read - cached.created,
            "output_tokens": out,
            "cache_creation_input_tokens": cached.created,
            "cache_read_input_tokens": cached.read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": cached.created_by_ttl["5m"],
                "ephemeral_1h_input_tokens": cached.created_by_ttl["1h"],
            },
        }
        usage.update(step["usage"])  # a scripted override wins
        return step, usage

    def _handler_class(self):
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                path = self.path.split("?")[0]
                if path == "/v1/messages/count_tokens":
                    failed, answer = fake.answer_count_tokens(body)
                    if failed:
                        return self.send_error_step(failed)
                    return self.send_json(200, answer)
                if path != "/v1/messages":
                    return self.send_error_step(error(404, "not_found_error", f"No route {path}"))
                step, usage = fake.answer_messages(body)
                if step["kind"] == "error":
                    return self.send_error_step(step)
                if isinstance(body, dict) and body.get("stream"):
                    return self.send_stream(body, step, usage)
                return self.send_json(
                    200, message_json(body if isinstance(body, dict) else {}, step, usage)
                )

            def send_error_step(self, step: dict) -> None:
                body = {
                    "type": "error",
                    "request_id": "req_fake",
                    "error": {"type": step["type"], "message": step["message"]},
                }
                self.send_json(step["status"], body, {"request-id": "req_fake", **step["headers"]})

            def send_stream(self, body: dict, step: dict, usage: dict) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("connection", "close")
                self.end_headers()
                try:
                    for event, data in stream_events(body, step, usage):
                        if event == "pause":
                            data.wait(timeout=30)
                            continue
                        self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (Ctrl-C in a test); nothing to clean up
                self.close_connection = True

        return Handler


def message_json(body: dict, step: dict, usage: dict) -> dict:
    return {
        "id": f"msg_fake{next(_ids):04d}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "fake"),
        "content": step["content"],
        "stop_reason": step["stop_reason"],
        "stop_sequence": None,
        "usage": usage,
    }


def stream_events(body: dict, step: dict, usage: dict):
    """The SSE sequence the real API sends for one message."""
    msg = message_json(body, step, usage)
    start = dict(msg, content=[], stop_reason=None)
    start["usage"] = dict(usage, output_tokens=1)
    yield "message_start", {"type": "message_start", "message": start}
    yield "ping", {"type": "ping"}
    first_chunk_sent = False
    for index, block in enumerate(step["content"]):
        if block["type"] == "text":
            yield (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            chunks = step["chunks"] or split_words(block["text"])
            for chunk in chunks:
                yield (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "text_delta", "text": chunk},
                    },
                )
                if not first_chunk_sent:
                    first_chunk_sent = True
                    if step["gate"] is not None:
                        yield "pause", step["gate"]
                    if step["stream_error"]:
                        yield "error", stream_error_event(step)
                        return
        else:
            yield (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": dict(block, input={}),
                },
            )
            yield (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {
                        "type": "input_json_delta",
                        "partial_json": json.dumps(block["input"]),
                    },
                },
            )
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    if step["stream_error"] and not first_chunk_sent:
        yield "error", stream_error_event(step)
        return
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": step["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        },
    )
    yield "message_stop", {"type": "message_stop"}


def stream_error_event(step: dict) -> dict:
    etype, message = step["stream_error"]
    return {"type": "error", "error": {"type": etype, "message": message}}


def split_words(text: str) -> list[str]:
    parts, current = [], ""
    for ch in text:
        current += ch
        if ch == " ":
            parts.append(current)
            current = ""
    if current:
        parts.append(current)
    return parts or [""]


LEARNER_PORT = 18780  # fixed, so the .env lines printed at start stay true between runs


def learner_reply(body: dict) -> dict:
    """What the fake says when run by hand, to learners without a key. It echoes, with three
    extras, so every section's idea can be seen: "!tool name {json}" makes it call that tool;
    a tool's result is answered with its first line; a summary request (compaction) gets a
    short summary."""
    messages = body.get("messages") or [{}]
    last = messages[-1].get("content")
    results = [b for b in as_blocks(last) if b.get("type") == "tool_result"]
    if results:
        content = results[0].get("content")
        text = content if isinstance(content, str) else " ".join(
            b.get("text", "") for b in as_blocks(content))
        first = (text.strip().splitlines() or ["(empty)"])[0][:200]
        return reply(f"(fake) the tool said: {first}")
    system = body.get("system")
    system = system if isinstance(system, str) else " ".join(
        b.get("text", "") for b in as_blocks(system))
    said = last_user_text(body)
    if system.startswith("You summarize") and not body.get("tools") and len(messages) == 1:
        return reply(f"(fake) A summary: the person and the assistant talked; {len(said):,} "
                     "characters of it are summarized here.")
    if said.startswith("!tool "):
        name, _, raw = said[len("!tool "):].strip().partition(" ")
        try:
            arguments = json.loads(raw or "{}")
        except ValueError:
            return reply(f"(fake) not JSON after the tool name: {raw!r}")
        return reply(f"(fake) calling {name}.", tools=[tool_use(name, arguments)])
    return default_reply(body)


if __name__ == "__main__":  # run by hand: python tests/fake_anthropic.py [port]
    port = int(sys.argv[1]) if len(sys.argv) > 1 else LEARNER_PORT
    api = FakeAnthropic(port)
    api.default = learner_reply
    try:
        api.start()
    except OSError as exc:
        sys.exit(f"port {port} is taken ({exc.strerror}): give another, "
                 "python tests/fake_anthropic.py 18770")
    print(f"A fake Messages API on {api.base_url}: it echoes what you say, and calls a tool\n"
          'when you type  !tool read_file {"path": "SOUL.md"}  (any tool and JSON input).\n'
          "To use it, put these two lines in .env (and take them out for the real API):\n"
          f"  ANTHROPIC_BASE_URL={api.base_url}\n  ANTHROPIC_API_KEY=fake\n"
          "Ctrl-C stops it.", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        api.stop()
