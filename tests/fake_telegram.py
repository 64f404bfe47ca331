"""A fake of the Telegram Bot API, served on 127.0.0.1, for python-telegram-bot.

python-telegram-bot sends every call as POST {base_url}{token}/{method} with
form-encoded parameters, so pointing its `base_url` at this server
(f"{fake.base_url}") exercises the real library without the internet.

    tg = FakeTelegram().start()
    tg.push(tg.private_message("hello", user_id=42))   # what a person sends
    ... the bot polls getUpdates, answers with sendMessage ...
    tg.sent                                             # every sendMessage, in order

Failures for backoff tests: tg.fail(502, "Bad Gateway", times=3) answers the
next three calls with that error; tg.fail(None, times=3) drops the connection
without an answer (as a network outage would). Every call is kept in
tg.calls as (monotonic time, method, params), so a test can measure how fast
a client polls while the API is failing.
"""
from __future__ import annotations

import json
import threading
import time
from itertools import count
from urllib.parse import parse_qs

from local_server import LocalServer, QuietHandler

NUMERIC = {"chat_id", "message_thread_id", "offset", "timeout", "limit", "message_id", "reply_to_message_id"}
LONG_POLL_CAP = 5.0  # seconds a getUpdates may wait here, whatever timeout the client asks for


class FakeTelegram:
    def __init__(self, token: str = "123456:TEST-TOKEN", username: str = "gateway_test_bot"):
        self.token = token
        self.username = username
        self.updates: list[dict] = []       # not yet confirmed by an offset
        self.sent: list[dict] = []          # sendMessage parameters, in order
        self.actions: list[dict] = []       # sendChatAction parameters
        self.calls: list[tuple[float, str, dict]] = []
        self.failures: list[tuple[int | None, str, str | None]] = []
        self.changed = threading.Condition()
        self._update_ids = count(1)
        self._message_ids = count(1000)
        self.http = LocalServer(self._handler_class())

    @property
    def api_base(self) -> str:
        """The Bot API's root, as a section's TELEGRAM_API_BASE (it adds "/bot<token>/<method>")."""
        return f"http://127.0.0.1:{self.http.port}"

    @property
    def base_url(self) -> str:
        """The value for python-telegram-bot's base_url (the token is appended to it)."""
        return f"http://127.0.0.1:{self.http.port}/bot"

    def start(self) -> "FakeTelegram":
        self.http.start()
        return self

    def stop(self) -> None:
        with self.changed:
            self.changed.notify_all()
        self.http.stop()

    # --- what a test does -----------------------------------------------------------------------
    def push(self, message: dict) -> dict:
        """Deliver one incoming message to the bot, as Telegram would."""
        with self.changed:
            update = {"update_id": next(self._update_ids), "message": message}
            self.updates.append(update)
            self.changed.notify_all()
        return update

    def private_message(self, text: str, user_id: int, first_name: str = "Ada", username: str = "ada") -> dict:
        return self._message(text, {"id": user_id, "type": "private", "first_name": first_name},
                             user_id, first_name, username)

    def group_message(self, text: str, user_id: int, chat_id: int, title: str = "Team",
                      thread_id: int | None = None, first_name: str = "Ada", username: str = "ada") -> dict:
        chat = {"id": chat_id, "type": "supergroup", "title": title}
        if thread_id is not None:
            chat["is_forum"] = True
        message = self._message(text, chat, user_id, first_name, username)
        if thread_id is not None:
            message.update(message_thread_id=thread_id, is_topic_message=True)
        return message

    def _message(self, text: str, chat: dict, user_id: int, first_name: str, username: str) -> dict:
        return {"message_id": next(self._message_ids), "date": int(time.time()), "chat": chat, "text": text,
                "from": {"id": user_id, "is_bot": False, "first_name": first_name, "username": username}}

    def fail(self, status: int | None, description: str = "", times: int = 1, method: str | None = None) -> None:
        """Answer the next `times` calls (of `method`, or of any method) with an error
        (status None: drop the connection)."""
        with self.changed:
            self.failures.extend([(status, description, method)] * times)

    def wait_for_sent(self, n: int, timeout: float = 10) -> list[dict]:
        """Wait until at least n messages were sent; return them all."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.sent) < n and time.monotonic() < deadline:
                self.changed.wait(deadline - time.monotonic())
            return list(self.sent)

    def calls_of(self, method: str) -> list[float]:
        return [t for t, m, _ in self.calls if m == method]

    # --- the API ------------------------------------------------------------------------------
    def answer(self, method: str, params: dict):
        """The result of one call, or raises LookupError for an unknown method."""
        if method == "getMe":
            return {"id": int(self.token.split(":")[0]), "is_bot": True, "first_name": "Gateway",
                    "username": self.username, "can_join_groups": True, "can_read_all_group_messages": False,
                    "supports_inline_queries": False}
        if method in ("deleteWebhook", "setMyCommands", "close"):
            return True
        if method == "getUpdates":
            return self.get_updates(params)
        if method == "sendChatAction":
            with self.changed:
                self.actions.append(params)
            return True
        if method == "sendMessage":
            with self.changed:
                self.sent.append(params)
                self.changed.notify_all()
            chat = {"id": params["chat_id"], "type": "private" if params["chat_id"] > 0 else "supergroup"}
            result = {"message_id": next(self._message_ids), "date": int(time.time()), "chat": chat,
                      "text": params.get("text", "")}
            if "message_thread_id" in params:
                result["message_thread_id"] = params["message_thread_id"]
            return result
        raise LookupError(method)

    def get_updates(self, params: dict) -> list[dict]:
        offset = params.get("offset", 0)
        deadline = time.monotonic() + min(float(params.get("timeout", 0)), LONG_POLL_CAP)
        with self.changed:
            self.updates = [u for u in self.updates if u["update_id"] >= offset]  # an offset confirms
            while not self.updates and time.monotonic() < deadline:
                self.changed.wait(deadline - time.monotonic())
            return list(self.updates[: int(params.get("limit", 100))])

    def _handler_class(self):
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length).decode()
                params = {k: int(v[0]) if k in NUMERIC else v[0] for k, v in parse_qs(raw).items()}
                prefix = f"/bot{fake.token}/"
                method = self.path[len(prefix):] if self.path.startswith(prefix) else None
                fake.calls.append((time.monotonic(), method or self.path, params))
                with fake.changed:
                    due = [f for f in fake.failures if f[2] in (None, method)]
                    failure = due[0] if due else None
                    if failure:
                        fake.failures.remove(failure)
                if method is None:
                    return self.reply(404, {"ok": False, "error_code": 404, "description": "Not Found"})
                if failure is not None:
                    status, description, _ = failure
                    if status is None:  # a network outage: no answer at all
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    return self.reply(status, {"ok": False, "error_code": status, "description": description})
                try:
                    result = fake.answer(method, params)
                except LookupError:
                    return self.reply(404, {"ok": False, "error_code": 404, "description": "Not Found: method not found"})
                self.reply(200, {"ok": True, "result": result})

            do_GET = do_POST
            reply = QuietHandler.send_json

        return Handler
