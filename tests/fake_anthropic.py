"""A scripted fake of the Anthropic Messages API, served on 127.0.0.1.

The installed `anthropic` SDK talks HTTP through `httpx2`, so HTTP-mocking
libraries for `httpx` never see its requests. Instead the tests run this small
real server and point `ANTHROPIC_BASE_URL` at it, in-process or for a section
started as a subprocess.

Script it with a list of steps, consumed one per `POST /v1/messages`:

    api.script(reply("Hello!"),
               reply(tools=[tool_use("bash", {"command": "ls"})]),
               error(429, "rate_limit_error", "Slow down"))

When the script is empty the server answers with `default_reply(request)`,
which echoes the last user text. Every request body is kept in `api.requests`.
Streaming (`"stream": true`) is answered with the real SSE event sequence.
"""
from __future__ import annotations

import json
import threading
import time
from itertools import count

from local_server import LocalServer, QuietHandler

_ids = count(1)


def tool_use(name: str, tool_input: dict, tool_id: str | None = None) -> dict:
    return {"type": "tool_use", "id": tool_id or f"toolu_fake{next(_ids):04d}", "name": name, "input": tool_input}


def reply(text: str = "", *, tools: list[dict] | None = None, stop_reason: str | None = None,
          chunks: list[str] | None = None, gate: threading.Event | None = None,
          stream_error: tuple[str, str] | None = None, usage: dict | None = None) -> dict:
    """One assistant message.

    chunks: how the text is split into text_delta events (default: by words).
    gate: when given, the stream pauses after the first chunk until it is set.
    stream_error: (error_type, message) sent as an SSE `error` event after the
    first chunk, as the real API does when it fails mid-stream.
    """
    content = []
    if text:
        content.append({"type": "text", "text": text})
    content.extend(tools or [])
    if stop_reason is None:
        stop_reason = "tool_use" if tools else "end_turn"
    return {"kind": "reply", "content": content, "stop_reason": stop_reason, "chunks": chunks,
            "gate": gate, "stream_error": stream_error, "usage": usage or {}}


def error(status: int, error_type: str, message: str = "fake error", *, headers: dict | None = None,
          should_retry: bool = False) -> dict:
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


def estimate_tokens(body: dict) -> int:
    """A stand-in count: a quarter of the messages' JSON length (the system prompt
    and tools are left out, so a count does not depend on where the workspace is)."""
    return max(1, len(json.dumps(body.get("messages", []))) // 4)


class FakeAnthropic:
    def __init__(self, port: int = 0) -> None:
        self.steps: list[dict] = []
        self.requests: list[dict] = []
        self.count_requests: list[dict] = []
        self.count_tokens_status = 200  # set to 404 to act like a local server without the endpoint
        self.default = default_reply
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

    def next_step(self, body: dict) -> dict:
        with self.lock:
            self.requests.append(body)
            if self.steps:
                return self.steps.pop(0)
        return self.default(body)

    def _handler_class(self):
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                path = self.path.split("?")[0]
                if path == "/v1/messages/count_tokens":
                    fake.count_requests.append(body)
                    if fake.count_tokens_status != 200:
                        return self.send_error_body(fake.count_tokens_status, "not_found_error", "Not found", {})
                    return self.send_json(200, {"input_tokens": estimate_tokens(body)})
                if path != "/v1/messages":
                    return self.send_error_body(404, "not_found_error", f"No route {path}", {})
                step = fake.next_step(body)
                if step["kind"] == "error":
                    return self.send_error_body(step["status"], step["type"], step["message"], step["headers"])
                if body.get("stream"):
                    return self.send_stream(body, step)
                return self.send_json(200, message_json(body, step))

            def send_error_body(self, status: int, etype: str, message: str, headers: dict) -> None:
                self.send_json(status, {"type": "error", "error": {"type": etype, "message": message},
                                        "request_id": "req_fake"}, {"request-id": "req_fake", **headers})

            def send_stream(self, body: dict, step: dict) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("connection", "close")
                self.end_headers()
                try:
                    for event, data in stream_events(body, step):
                        if event == "pause":
                            data.wait(timeout=30)
                            continue
                        self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (Ctrl-C in a test); nothing to clean up
                self.close_connection = True

        return Handler


def usage_json(body: dict, step: dict, output_tokens: int) -> dict:
    usage = {"input_tokens": estimate_tokens(body), "output_tokens": output_tokens,
             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    usage.update(step["usage"])
    return usage


def message_json(body: dict, step: dict) -> dict:
    out_tokens = max(1, len(json.dumps(step["content"])) // 4)
    return {"id": f"msg_fake{next(_ids):04d}", "type": "message", "role": "assistant",
            "model": body.get("model", "fake"), "content": step["content"], "stop_reason": step["stop_reason"],
            "stop_sequence": None, "usage": usage_json(body, step, out_tokens)}


def stream_events(body: dict, step: dict):
    """The SSE sequence the real API sends for one message."""
    msg = message_json(body, step)
    start = dict(msg, content=[], stop_reason=None)
    start["usage"] = dict(msg["usage"], output_tokens=1)
    yield "message_start", {"type": "message_start", "message": start}
    yield "ping", {"type": "ping"}
    first_chunk_sent = False
    for index, block in enumerate(step["content"]):
        if block["type"] == "text":
            yield "content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": {"type": "text", "text": ""}}
            chunks = step["chunks"] or split_words(block["text"])
            for chunk in chunks:
                yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "text_delta", "text": chunk}}
                if not first_chunk_sent:
                    first_chunk_sent = True
                    if step["gate"] is not None:
                        yield "pause", step["gate"]
                    if step["stream_error"]:
                        etype, message = step["stream_error"]
                        yield "error", {"type": "error", "error": {"type": etype, "message": message}}
                        return
        else:
            yield "content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": dict(block, input={})}
            yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": {"type": "input_json_delta",
                                                    "partial_json": json.dumps(block["input"])}}
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    if step["stream_error"] and not first_chunk_sent:
        etype, message = step["stream_error"]
        yield "error", {"type": "error", "error": {"type": etype, "message": message}}
        return
    yield "message_delta", {"type": "message_delta",
                            "delta": {"stop_reason": step["stop_reason"], "stop_sequence": None},
                            "usage": {"output_tokens": msg["usage"]["output_tokens"]}}
    yield "message_stop", {"type": "message_stop"}


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


if __name__ == "__main__":  # run by hand: python tests/fake_anthropic.py
    api = FakeAnthropic().start()
    print(f"fake Messages API on {api.base_url} (echoes what you say); Ctrl-C to stop")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        api.stop()
