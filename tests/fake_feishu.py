"""A fake of the Feishu / Lark open platform, served on 127.0.0.1, for s04's Feishu channel;
and a Feishu user who talks to a section through it (run this file: a second terminal's chat).

Run by hand, next to a section (s04 on) in another terminal:

    python tests/fake_feishu.py [--port 18782] [--webhook-port 18790]

It prints the lines that point the section at it (FEISHU_APP_ID, FEISHU_APP_SECRET,
FEISHU_VERIFICATION_TOKEN, FEISHU_WEBHOOK_PORT, FEISHU_API_BASE), then a prompt where you
are "Ada" (open_id ou_ada) in a direct (p2p) chat with the bot. Each message is POSTed to
the section's webhook as Feishu would; FeishuUser is that person, scripted; fake_chat.py
documents the API it shares with TelegramUser.

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
    fs.watchers             # functions called with (what, details): "message", "token_refused"
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from itertools import count
from urllib.parse import parse_qs, urlparse

from fake_chat import ChatUser, port_is_open, printable, run_terminal, wait_until
from local_server import LocalServer, QuietHandler

RECEIVE_ID_TYPES = {"open_id", "user_id", "union_id", "email", "chat_id"}
INVALID_TOKEN_CODE = 99991663  # the fake's code for a missing, unknown or expired tenant token
DEFAULT_PORT = 18782  # the script's; the gateway has 18789
WEBHOOK_PORT = 18790  # where s04's webhook listens unless FEISHU_WEBHOOK_PORT says otherwise
SCRIPT_APP = ("cli_fake_app", "fake-app-secret", "fake-verification-token")


class FakeFeishu:
    def __init__(
        self,
        app_id: str = "cli_test_app",
        app_secret: str = "test-secret",
        token_ttl: int = 7200,
        verification_token: str = "verify-me",
        port: int = 0,
    ):
        self.app_id, self.app_secret, self.token_ttl = app_id, app_secret, token_ttl
        self.verification_token = verification_token  # what this app's events carry
        self.tokens: dict[str, float] = {}  # token -> when it expires (monotonic)
        self.token_requests = 0
        self.sent: list[dict] = []
        self.watchers: list = []
        self.lock = threading.Lock()
        self._numbers = count(1)
        self.http = LocalServer(self._handler_class(), port)

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

    def notify(self, what: str, details: dict) -> None:
        for watcher in list(self.watchers):
            watcher(what, details)

    # --- the API ------------------------------------------------------------------------------
    def issue_token(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.token_requests += 1
            known = body.get("app_id") == self.app_id and body.get("app_secret") == self.app_secret
            if known:
                token = f"t-fake-{next(self._numbers)}"
                self.tokens[token] = time.monotonic() + self.token_ttl
        if not known:
            self.notify("token_refused", body)
            return 200, {"code": 10014, "msg": "app_id or app_secret is invalid"}
        return 200, {"code": 0, "msg": "ok", "tenant_access_token": token, "expire": self.token_ttl}

    def send_message(self, headers, query: dict, body: dict) -> tuple[int, dict]:
        token = (headers.get("authorization") or "").removeprefix("Bearer ").strip()
        with self.lock:
            valid = self.tokens.get(token, 0.0) > time.monotonic()
        if not valid:
            return 400, {
                "code": INVALID_TOKEN_CODE,
                "msg": "Invalid access token for authorization.",
            }
        id_type = query.get("receive_id_type")
        if id_type not in RECEIVE_ID_TYPES:
            return 400, {
                "code": 99992402,
                "msg": f"field validation failed: receive_id_type {id_type!r}",
            }
        try:
            content = json.loads(body["content"])
        except (KeyError, TypeError, ValueError):
            return 400, {
                "code": 99992402,
                "msg": "field validation failed: content must be a JSON string",
            }
        record = {
            "receive_id_type": id_type,
            "receive_id": body.get("receive_id"),
            "msg_type": body.get("msg_type"),
            "text": content.get("text"),
        }
        with self.lock:
            self.sent.append(record)
            message_id = f"om_fake_{next(self._numbers)}"
        self.notify("message", record)
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


def message_event(
    text: str,
    open_id: str,
    token: str,
    chat_id: str = "oc_fake_chat",
    chat_type: str = "p2p",
    event_id: str | None = None,
    app_id: str = "cli_test_app",
    image_key: str | None = None,
) -> dict:
    """An im.message.receive_v1 event (schema 2.0): a text message, or with image_key an
    image (which has no words)."""
    kind, content = ("image", {"image_key": image_key}) if image_key else ("text", {"text": text})
    header = {
        "event_id": event_id or f"ev_{time.time_ns()}",
        "token": token,
        "create_time": str(int(time.time() * 1000)),
        "event_type": "im.message.receive_v1",
        "tenant_key": "fake_tenant",
        "app_id": app_id,
    }
    sender = {
        "sender_id": {"open_id": open_id, "user_id": None, "union_id": None},
        "sender_type": "user",
    }
    message = {
        "message_id": f"om_in_{time.time_ns()}",
        "chat_id": chat_id,
        "chat_type": chat_type,
        "message_type": kind,
        "content": json.dumps(content),
    }
    return {"schema": "2.0", "header": header, "event": {"sender": sender, "message": message}}


# --- A person in Feishu, typed at a terminal or scripted (see fake_chat.py) -----------------------

FEISHU_HELP = """Commands (any other line is a message to the bot, its own /new too):
  /as OPEN_ID [NAME]    be another user: /as ou_bob Bob (the name is only shown here:
                        Feishu events carry ids, not names)
  /group CHAT_ID [TITLE]  write in a group chat: /group oc_team Team (your messages
                        there @mention the bot: Feishu only delivers those)
  /direct               back to your direct (p2p) chat with the bot
  /photo                send an image (the gateway only notes that one came)
  /token [TOKEN]        the verification token your events carry (a wrong one shows
                        the gateway refusing them); /token alone: the right one again
  /verify               send the url_verification challenge, as Feishu does once
  /who                  who and where you are, and the session key s04 gives this chat
  /help                 this list
  quit, exit            leave (Ctrl-D and Ctrl-C work too)
Start a line with // to send it with one slash less: //help sends /help to the bot."""


class FeishuUser(ChatUser):
    """A Feishu user talking to a section's bot: each message is an event POSTed to the
    section's webhook (127.0.0.1:webhook_port); the replies it sends through the
    FakeFeishu's open API come back here. last_status: the webhook's HTTP status for the
    last event (None: it could not be reached)."""

    help_text = FEISHU_HELP

    def __init__(
        self,
        fake: FakeFeishu,
        webhook_port: int = WEBHOOK_PORT,
        open_id: str = "ou_ada",
        name: str = "Ada",
        *,
        out=None,
    ):
        super().__init__(open_id, name, out, show_typing=False)  # Feishu shows no typing
        self.fake, self.webhook_port = fake, webhook_port
        self.token = fake.verification_token
        self.last_status: int | None = None
        self.told_refused = False
        fake.watchers.append(self.on_call)

    @property
    def webhook(self) -> str:
        return f"http://127.0.0.1:{self.webhook_port}/"

    def env(self) -> dict[str, str]:
        return {
            "FEISHU_APP_ID": self.fake.app_id,
            "FEISHU_APP_SECRET": self.fake.app_secret,
            "FEISHU_VERIFICATION_TOKEN": self.fake.verification_token,
            "FEISHU_WEBHOOK_PORT": str(self.webhook_port),
            "FEISHU_API_BASE": self.fake.api_base,
        }

    def banner(self) -> list[str]:
        return [
            f"Fake Feishu open platform on {self.fake.api_base} "
            "(no account needed; nothing leaves this machine).",
            f"Your messages are POSTed as events to the section's webhook, {self.webhook}",
            "Put these lines in .env (or export them in the section's terminal), "
            "then start a section, s04 or later:",
            "",
            *(f"{name}={value}" for name, value in self.env().items()),
            "",
            f"You are {self.name} ({self.user_id}), in a direct (p2p) chat with the bot. "
            "A section does not know you yet:",
            "your first message gets a pairing code to approve at its terminal "
            f"(or set FEISHU_ALLOW_FROM={self.user_id}).",
            "/help lists the commands; quit leaves.",
        ]

    def close(self) -> None:
        if self.on_call in self.fake.watchers:
            self.fake.watchers.remove(self.on_call)

    def wait_for_gateway(self, timeout: float = 10.0) -> None:
        wait_until(
            lambda: port_is_open(self.webhook_port),
            timeout,
            f"nothing listens at {self.webhook} after {timeout:g} s",
        )

    # --- messages out, replies in ----------------------------------------------------------------
    def key(self):
        return ("open_id", self.user_id) if self.chat is None else ("chat_id", self.chat)

    def label(self, key) -> str:
        kind, where = key
        if kind == "chat_id":
            return f"{self.titles.get(where) or 'group'} ({where})"
        name = self.names.get(where)
        return f"{name} ({where})" if name and name != where else str(where)

    def send(self, text: str, photo: str | None = None) -> None:
        chat_id, chat_type = self.chat or f"oc_p2p_{self.user_id[3:]}", "p2p"
        if self.chat is not None:
            # Feishu delivers a group's messages that @mention the bot; "@_user_1" stands for it
            chat_type, text = "group", f"@_user_1 {text}"
        event = message_event(
            text,
            self.user_id,
            self.token,
            chat_id,
            chat_type,
            event_id=f"ev_{uuid.uuid4().hex}",
            app_id=self.fake.app_id,
            image_key=None if photo is None else "img_v3_fake",
        )
        if self.chat is not None:
            event["event"]["message"]["mentions"] = [
                {"key": "@_user_1", "id": {"open_id": "ou_fake_bot"}, "name": "Gateway"}
            ]
        self.expect_reply()
        status, answer = self.post(event)
        if status is not None and status != 200:
            with self.changed:
                self.expecting.discard(self.key())
            self.show(f"the gateway refused the event: {status} ({answer})")

    def post(self, body: dict) -> tuple[int | None, str]:
        """POST one event to the webhook: (HTTP status, its answer as safe text); status None
        when nothing answered."""
        request = urllib.request.Request(
            self.webhook,
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (OSError, ValueError) as exc:
            self.last_status = None
            reason = getattr(exc, "reason", exc)
            self.note(
                f"cannot reach the section's webhook at {self.webhook}: "
                f"{getattr(reason, 'strerror', None) or reason}. Is a section running "
                "with the lines above? The event is lost"
            )
            return None, ""
        self.last_status = status
        try:
            answer = json.loads(raw)
            answer = answer.get("error", answer) if isinstance(answer, dict) else answer
        except ValueError:
            answer = raw.decode("utf-8", "replace")
        return status, printable(str(answer))[:300]

    def on_call(self, what: str, details: dict) -> None:
        """What the fake's open API was asked (from its server threads)."""
        if what == "message":
            self.received(
                (details["receive_id_type"], details["receive_id"]), details.get("text") or ""
            )
        elif what == "token_refused" and not self.told_refused:
            self.told_refused = True
            self.note(
                "the section asked for a tenant token with another FEISHU_APP_ID / "
                "FEISHU_APP_SECRET than this fake's, and was refused: it cannot reply"
            )

    # --- commands -------------------------------------------------------------------------------
    def commands(self) -> dict:
        return {**super().commands(), "/token": self.set_token, "/verify": self.verify}

    def who(self, arg: str) -> None:
        kind = "direct" if self.chat is None else "group"
        where = "a direct (p2p) chat with the bot" if self.chat is None else self.where()
        self.show(
            f"You are {self.name} ({self.user_id}), in {where}. s04's session key for this "
            f"chat: feishu:{kind}:{self.key()[1]}. Your events carry the verification "
            f"token {self.token!r}."
        )

    def become(self, arg: str) -> None:
        open_id, _, name = arg.partition(" ")
        if not re.fullmatch(r"ou_\w+", open_id):
            raise ValueError(
                "Usage: /as OPEN_ID [NAME], e.g. /as ou_bob Bob (Feishu open_ids start with ou_)"
            )
        self.user_id = open_id
        self.name = name.strip() or self.names.get(open_id) or open_id
        self.names[open_id] = self.name
        self.show(f"You are {self.name} ({open_id}) now.")

    def group(self, arg: str) -> None:
        chat, _, title = arg.partition(" ")
        if not re.fullmatch(r"oc_\w+", chat):
            raise ValueError(
                "Usage: /group CHAT_ID [TITLE], e.g. /group oc_team Team "
                "(Feishu chat ids start with oc_)"
            )
        self.chat = chat
        if title.strip():
            self.titles[chat] = title.strip()
        self.show(f"Now in {self.where()}, as {self.name}.")

    def photo(self, arg: str) -> None:
        if arg:
            self.note("a Feishu image has no caption: send the words as a message of their own")
        self.send("", photo="")

    def set_token(self, arg: str) -> None:
        self.token = arg or self.fake.verification_token
        right = "the right one" if self.token == self.fake.verification_token else "a wrong one"
        self.show(f"Your events carry the verification token {self.token!r} now ({right}).")

    def verify(self, arg: str) -> None:
        challenge = f"challenge-{uuid.uuid4().hex[:8]}"
        status, answer = self.post(url_verification(challenge, self.token))
        if status == 200 and challenge in answer:
            self.show("the gateway answered the challenge: Feishu would accept this webhook URL")
        elif status is not None:
            self.show(f"the gateway refused the challenge: {status} ({answer})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A fake Feishu to chat with a section as a Feishu user, without an account."
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"the fake open API's port on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument(
        "--webhook-port",
        type=int,
        default=WEBHOOK_PORT,
        help=f"the section's FEISHU_WEBHOOK_PORT, where events are POSTed (default {WEBHOOK_PORT})",
    )
    args = parser.parse_args(argv)
    app_id, app_secret, verification_token = SCRIPT_APP
    try:
        fake = FakeFeishu(app_id, app_secret, verification_token=verification_token, port=args.port)
    except OSError as exc:
        print(
            f"cannot listen on 127.0.0.1:{args.port} ({exc.strerror}); "
            "pick another port with --port",
            file=sys.stderr,
        )
        return 2
    fake.start()
    try:
        return run_terminal(FeishuUser(fake, args.webhook_port))
    finally:
        fake.stop()


if __name__ == "__main__":
    sys.exit(main())
