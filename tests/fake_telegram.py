"""A fake of the Telegram Bot API, served on 127.0.0.1, for python-telegram-bot; and a
Telegram user who talks to a section through it (run this file: a second terminal's chat).

Run by hand, next to a section (s04 on) in another terminal:

    python tests/fake_telegram.py [--port 18781]

It prints the two lines that point the section at it (TELEGRAM_BOT_TOKEN=123456:FAKE,
TELEGRAM_API_BASE=http://127.0.0.1:18781), then a prompt where you are user 42 "Ada" in a
direct chat with the bot. TelegramUser is that person, scripted; fake_chat.py documents
the API it shares with FeishuUser.

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
a client polls while the API is failing. tg.watchers: functions called with
(method, params) for each call answered (method None: a call with another token).
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from itertools import count
from urllib.parse import parse_qs

from fake_chat import ChatUser, run_terminal, wait_until
from local_server import LocalServer, QuietHandler

NUMERIC = {
    "chat_id",
    "message_thread_id",
    "offset",
    "timeout",
    "limit",
    "message_id",
    "reply_to_message_id",
}
LONG_POLL_CAP = 5.0  # seconds a getUpdates may wait here, whatever timeout the client asks for
DEFAULT_PORT = 18781  # the script's; the gateway has 18789 and Feishu's webhook 18790
SCRIPT_TOKEN = "123456:FAKE"
SCRIPT_USERNAME = "fake_gateway_bot"


class FakeTelegram:
    def __init__(
        self,
        token: str = "123456:TEST-TOKEN",
        username: str = "gateway_test_bot",
        port: int = 0,
        first_update_id: int = 1,
    ):
        self.token = token
        self.username = username
        self.updates: list[dict] = []  # not yet confirmed by an offset
        self.sent: list[dict] = []  # sendMessage parameters, in order
        self.actions: list[dict] = []  # sendChatAction parameters
        self.calls: list[tuple[float, str, dict]] = []
        self.failures: list[tuple[int | None, str, str | None]] = []
        self.watchers: list = []  # called with (method, params) for each call answered
        self.changed = threading.Condition()
        self._update_ids = count(first_update_id)
        self._message_ids = count(1000)
        self.http = LocalServer(self._handler_class(), port)

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

    def private_message(
        self, text: str, user_id: int, first_name: str = "Ada", username: str = "ada"
    ) -> dict:
        return self._message(
            text,
            {"id": user_id, "type": "private", "first_name": first_name},
            user_id,
            first_name,
            username,
        )

    def group_message(
        self,
        text: str,
        user_id: int,
        chat_id: int,
        title: str = "Team",
        thread_id: int | None = None,
        first_name: str = "Ada",
        username: str = "ada",
    ) -> dict:
        chat = {"id": chat_id, "type": "supergroup", "title": title}
        if thread_id is not None:
            chat["is_forum"] = True
        message = self._message(text, chat, user_id, first_name, username)
        if thread_id is not None:
            message.update(message_thread_id=thread_id, is_topic_message=True)
        return message

    def _message(self, text: str, chat: dict, user_id: int, first_name: str, username: str) -> dict:
        sender = {"id": user_id, "is_bot": False, "first_name": first_name, "username": username}
        return {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat,
            "text": text,
            "from": sender,
        }

    def fail(
        self, status: int | None, description: str = "", times: int = 1, method: str | None = None
    ) -> None:
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

    def notify(self, method: str | None, params: dict) -> None:
        for watcher in list(self.watchers):
            watcher(method, params)

    # --- the API ------------------------------------------------------------------------------
    def answer(self, method: str, params: dict):
        """The result of one call, or raises LookupError for an unknown method."""
        if method == "getUpdates":
            self.notify(method, params)  # before the long wait: a bot is polling
            return self.get_updates(params)
        result = self.result(method, params)
        self.notify(method, params)
        return result

    def result(self, method: str, params: dict):
        if method == "getMe":
            return {
                "id": int(self.token.split(":")[0]),
                "is_bot": True,
                "first_name": "Gateway",
                "username": self.username,
                "can_join_groups": True,
                "can_read_all_group_messages": False,
                "supports_inline_queries": False,
            }
        if method in ("deleteWebhook", "setMyCommands", "close"):
            return True
        if method == "sendChatAction":
            with self.changed:
                self.actions.append(params)
            return True
        if method == "sendMessage":
            with self.changed:
                self.sent.append(params)
                self.changed.notify_all()
            chat_type = "private" if params["chat_id"] > 0 else "supergroup"
            result = {
                "message_id": next(self._message_ids),
                "date": int(time.time()),
                "chat": {"id": params["chat_id"], "type": chat_type},
                "text": params.get("text", ""),
            }
            if "message_thread_id" in params:
                result["message_thread_id"] = params["message_thread_id"]
            return result
        raise LookupError(method)

    def get_updates(self, params: dict) -> list[dict]:
        offset = params.get("offset", 0)
        deadline = time.monotonic() + min(float(params.get("timeout", 0)), LONG_POLL_CAP)
        with self.changed:
            # an offset confirms every update before it
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
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
                method = self.path[len(prefix) :] if self.path.startswith(prefix) else None
                fake.calls.append((time.monotonic(), method or self.path, params))
                with fake.changed:
                    due = [f for f in fake.failures if f[2] in (None, method)]
                    failure = due[0] if due else None
                    if failure:
                        fake.failures.remove(failure)
                if method is None:
                    fake.notify(None, {"path": self.path})
                    return self.reply(
                        404, {"ok": False, "error_code": 404, "description": "Not Found"}
                    )
                if failure is not None:
                    status, description, _ = failure
                    if status is None:  # a network outage: no answer at all
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    return self.reply(
                        status, {"ok": False, "error_code": status, "description": description}
                    )
                try:
                    result = fake.answer(method, params)
                except LookupError:
                    return self.reply(
                        404,
                        {
                            "ok": False,
                            "error_code": 404,
                            "description": "Not Found: method not found",
                        },
                    )
                self.reply(200, {"ok": True, "result": result})

            do_GET = do_POST
            reply = QuietHandler.send_json

        return Handler


def with_photo(message: dict, caption: str = "") -> dict:
    """The message as a photo (with its caption, if any) instead of words."""
    del message["text"]
    message["photo"] = [
        {
            "file_id": "fake-photo",
            "file_unique_id": "fake-photo-1",
            "width": 640,
            "height": 480,
            "file_size": 20480,
        }
    ]
    if caption:
        message["caption"] = caption
    return message


# --- A person in Telegram, typed at a terminal or scripted (see fake_chat.py) ---------------------

TELEGRAM_HELP = """Commands (any other line is a message to the bot, its own /new and /start too):
  /as ID [NAME]      be another user: /as 7 Bob (Telegram user ids are positive)
  /group ID [TITLE]  write in a group chat: /group -1001 Team (group ids are negative)
  /topic N           write in forum topic N of the group; /topic alone: the group itself
  /direct            back to your direct chat with the bot
  /photo [CAPTION]   send a photo (the gateway only notes that one came, and the caption)
  /who               who and where you are, and the session key s04 gives this chat
  /help              this list
  quit, exit         leave (Ctrl-D and Ctrl-C work too)
Start a line with // to send it with one slash less: //help sends /help to the bot."""


class TelegramUser(ChatUser):
    """A Telegram user talking to the bot of a FakeTelegram: messages are pushed as updates
    for the section's getUpdates; its sendMessage and sendChatAction calls come back here."""

    help_text = TELEGRAM_HELP

    def __init__(
        self,
        fake: FakeTelegram,
        user_id: int = 42,
        name: str = "Ada",
        *,
        out=None,
        show_typing: bool = True,
    ):
        super().__init__(user_id, name, out, show_typing)
        self.fake = fake
        self.told_waiting = self.told_token = False
        fake.watchers.append(self.on_call)

    def env(self) -> dict[str, str]:
        return {"TELEGRAM_BOT_TOKEN": self.fake.token, "TELEGRAM_API_BASE": self.fake.api_base}

    def banner(self) -> list[str]:
        return [
            f"Fake Telegram Bot API on {self.fake.api_base} "
            "(no account needed; nothing leaves this machine).",
            "Put these lines in .env (or export them in the section's terminal), "
            "then start a section, s04 or later:",
            "",
            *(f"{name}={value}" for name, value in self.env().items()),
            "",
            f"You are {self.name} (user {self.user_id}), in a direct chat with "
            f"@{self.fake.username}. A section does not know you yet: your first",
            "message gets a pairing code to approve at its terminal "
            f"(or set TELEGRAM_ALLOW_FROM={self.user_id}).",
            "/help lists the commands; quit leaves.",
        ]

    def close(self) -> None:
        if self.on_call in self.fake.watchers:
            self.fake.watchers.remove(self.on_call)

    def wait_for_gateway(self, timeout: float = 10.0) -> None:
        wait_until(
            lambda: self.fake.calls_of("getUpdates"),
            timeout,
            f"no bot polled {self.fake.api_base} within {timeout:g} s",
        )

    # --- messages out, replies in ----------------------------------------------------------------
    def key(self):
        return (self.user_id if self.chat is None else self.chat, self.thread)

    def label(self, key) -> str:
        chat, thread = key
        if chat > 0:
            return f"{self.names.get(chat, 'user')} ({chat})"
        title = self.titles.get(chat) or "group"
        return f"{title} ({chat})" + (f", topic {thread}" if thread is not None else "")

    def send(self, text: str, photo: str | None = None) -> None:
        who = {"first_name": self.name, "username": re.sub(r"\W", "", self.name.lower()) or "user"}
        if self.chat is None:
            message = self.fake.private_message(text, self.user_id, **who)
        else:
            message = self.fake.group_message(
                text,
                self.user_id,
                self.chat,
                self.titles.get(self.chat) or "Group",
                self.thread,
                **who,
            )
        if photo is not None:
            message = with_photo(message, photo)
        self.expect_reply()
        self.fake.push(message)
        with self.changed:
            if not self.fake.calls_of("getUpdates") and not self.told_waiting:
                self.told_waiting = True
                self.note("no bot is polling this fake yet: the message waits until one does")

    def on_call(self, method: str | None, params: dict) -> None:
        """Every call the fake answered (from its server threads)."""
        where = (params.get("chat_id"), params.get("message_thread_id"))
        if method == "sendMessage":
            self.received(where, params.get("text", ""))
        elif method == "sendChatAction" and params.get("action") == "typing":
            self.typing(where)
        elif method == "getUpdates":
            with self.changed:
                if self.told_waiting:
                    self.told_waiting = False
                    self.note("a bot is polling now: it gets the messages that waited")
        elif method is None and not self.told_token:
            self.told_token = True
            self.note(
                f"a client called with another bot token than {self.fake.token}; "
                "it was told 404 Not Found, as Telegram answers a token it does not know"
            )

    # --- commands -------------------------------------------------------------------------------
    def commands(self) -> dict:
        return {**super().commands(), "/topic": self.topic}

    def who(self, arg: str) -> None:
        kind = "direct" if self.chat is None else "group"
        key = f"telegram:{kind}:{self.key()[0]}" + (f":topic:{self.thread}" if self.thread else "")
        where = "a direct chat with the bot" if self.chat is None else self.where()
        self.show(
            f"You are {self.name} (user {self.user_id}), in {where}. "
            f"s04's session key for this chat: {key}"
        )

    def become(self, arg: str) -> None:
        user_id, _, name = arg.partition(" ")
        if not re.fullmatch(r"[1-9]\d*", user_id):
            raise ValueError(
                "Usage: /as ID [NAME], e.g. /as 7 Bob (Telegram user ids are positive)"
            )
        self.user_id = int(user_id)
        self.name = name.strip() or self.names.get(self.user_id) or f"User {user_id}"
        self.names[self.user_id] = self.name
        self.show(f"You are {self.name} (user {self.user_id}) now.")

    def group(self, arg: str) -> None:
        chat, _, title = arg.partition(" ")
        if not re.fullmatch(r"-[1-9]\d*", chat):
            raise ValueError(
                "Usage: /group ID [TITLE], e.g. /group -1001 Team (Telegram group ids are negative)"
            )
        self.chat, self.thread = int(chat), None
        if title.strip():
            self.titles[self.chat] = title.strip()
        self.show(f"Now in {self.where()}, as {self.name}.")

    def topic(self, arg: str) -> None:
        if self.chat is None:
            raise ValueError("Topics live in groups: /group -1001 Team first, then /topic 7")
        if arg and not re.fullmatch(r"[1-9]\d*", arg):
            raise ValueError("Usage: /topic N (a positive number), or /topic alone for the group")
        self.thread = int(arg) if arg else None
        self.show(f"Now in {self.where()}, as {self.name}.")

    def photo(self, arg: str) -> None:
        self.send("", photo=arg)
        self.note("sent a photo" + (" with its caption" if arg else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A fake Telegram to chat with a section as a Telegram user, without an account."
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"the fake Bot API's port on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    args = parser.parse_args(argv)
    try:  # update ids from the clock: a section still polling with an old offset sees new ones
        fake = FakeTelegram(
            SCRIPT_TOKEN, SCRIPT_USERNAME, port=args.port, first_update_id=int(time.time() * 1000)
        )
    except OSError as exc:
        print(
            f"cannot listen on 127.0.0.1:{args.port} ({exc.strerror}); "
            "pick another port with --port",
            file=sys.stderr,
        )
        return 2
    fake.start()
    try:
        return run_terminal(TelegramUser(fake))
    finally:
        fake.stop()


if __name__ == "__main__":
    sys.exit(main())
