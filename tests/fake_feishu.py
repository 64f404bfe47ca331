"""A fake of the Feishu / Lark open platform, served on 127.0.0.1, for s04's Feishu channel.

Outbound, it serves the two calls a bot needs:
- POST /open-apis/auth/v3/tenant_access_token/internal  {app_id, app_secret}
  -> {"code": 0, "tenant_access_token": ..., "expire": seconds}
- POST /open-apis/im/v1/messages?receive_id_type=open_id|chat_id|...
  with "Authorization: Bearer <token>" and {"receive_id", "msg_type", "content"}
  where content is a JSON string such as "{\"text\": \"hello\"}".
Point the section's FEISHU_API_BASE at `fake.api_base`.

Inbound, Feishu POSTs events to the bot's webhook; the builders below make
those payloads (url_verification, im.message.receive_v1) for a test to send.

    fs = FakeFeishu().start()
    fs.sent                 # every message sent, with its receive_id_type
    fs.token_requests       # how often a tenant token was fetched (caching)
    fs.expire_tokens()      # every issued token stops working
"""
from __future__ import annotations

import json
import threading
import time
from itertools import count
from urllib.parse import parse_qs, urlparse

from local_server import LocalServer, QuietHandler

RECEIVE_ID_TYPES = {"open_id", "user_id", "union_id", "email", "chat_id"}
INVALID_TOKEN_CODE = 99991663  # the fake's code for a missing, unknown or expired tenant token


class FakeFeishu:
    def __init__(self, app_id: str = "cli_test_app", app_secret: str = "test-secret", token_ttl: int = 7200):
        self.app_id, self.app_secret, self.token_ttl = app_id, app_secret, token_ttl
        self.tokens: dict[str, float] = {}    # token -> when it expires (monotonic)
        self.token_requests = 0
        self.sent: list[dict] = []
        self.lock = threading.Lock()
        self._numbers = count(1)
        self.http = LocalServer(self._handler_class())

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    def start(self) -> "FakeFeishu":
        self.http.start()
        return self

    def stop(self) -> None:
        self.http.stop()

    def expire_tokens(self) -> None:
        with self.lock:
            self.tokens = {token: 0.0 for token in self.tokens}

    # --- the API ------------------------------------------------------------------------------
    def issue_token(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.token_requests += 1
            if body.get("app_id") != self.app_id or body.get("app_secret") != self.app_secret:
                return 200, {"code": 10014, "msg": "app_id or app_secret is invalid"}
            token = f"t-fake-{next(self._numbers)}"
            self.tokens[token] = time.monotonic() + self.token_ttl
        return 200, {"code": 0, "msg": "ok", "tenant_access_token": token, "expire": self.token_ttl}

    def send_message(self, headers, query: dict, body: dict) -> tuple[int, dict]:
        token = (headers.get("authorization") or "").removeprefix("Bearer ").strip()
        with self.lock:
            valid = self.tokens.get(token, 0.0) > time.monotonic()
        if not valid:
            return 400, {"code": INVALID_TOKEN_CODE, "msg": "Invalid access token for authorization."}
        id_type = query.get("receive_id_type")
        if id_type not in RECEIVE_ID_TYPES:
            return 400, {"code": 99992402, "msg": f"field validation failed: receive_id_type {id_type!r}"}
        try:
            content = json.loads(body["content"])
        except (KeyError, TypeError, ValueError):
            return 400, {"code": 99992402, "msg": "field validation failed: content must be a JSON string"}
        with self.lock:
            self.sent.append({"receive_id_type": id_type, "receive_id": body.get("receive_id"),
                              "msg_type": body.get("msg_type"), "text": content.get("text")})
            message_id = f"om_fake_{next(self._numbers)}"
        return 200, {"code": 0, "msg": "success", "data": {"message_id": message_id}}

    def _handler_class(self):
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    return self.reply(400, {"code": 9499, "msg": "body is not JSON"})
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/open-apis/auth/v3/tenant_access_token/internal":
                    return self.reply(*fake.issue_token(body))
                if url.path == "/open-apis/im/v1/messages":
                    return self.reply(*fake.send_message(self.headers, query, body))
                self.reply(404, {"code": 404, "msg": f"no route {url.path}"})

            reply = QuietHandler.send_json

        return Handler


# --- Inbound event payloads, as Feishu posts them to a bot's webhook ----------------------------

def url_verification(challenge: str, token: str) -> dict:
    return {"challenge": challenge, "token": token, "type": "url_verification"}


def message_event(text: str, open_id: str, token: str, chat_id: str = "oc_fake_chat", chat_type: str = "p2p",
                  event_id: str | None = None) -> dict:
    """An im.message.receive_v1 event (schema 2.0) for a text message."""
    return {
        "schema": "2.0",
        "header": {"event_id": event_id or f"ev_{time.time_ns()}", "token": token, "create_time": str(int(time.time() * 1000)),
                   "event_type": "im.message.receive_v1", "tenant_key": "fake_tenant", "app_id": "cli_test_app"},
        "event": {
            "sender": {"sender_id": {"open_id": open_id, "user_id": None, "union_id": None}, "sender_type": "user"},
            "message": {"message_id": f"om_in_{time.time_ns()}", "chat_id": chat_id, "chat_type": chat_type,
                        "message_type": "text", "content": json.dumps({"text": text})},
        },
    }
