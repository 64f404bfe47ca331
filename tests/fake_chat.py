"""A person in a fake chat app, talking to the gateway: typed at a terminal, or scripted.

A learner runs one in a second terminal while a section (s04 on) runs in the first:

    python tests/fake_telegram.py     # a Telegram user; the fake Bot API on 127.0.0.1:18781
    python tests/fake_feishu.py       # a Feishu user; the fake open platform on 127.0.0.1:18782

Each prints the lines that point a section at it (for .env, or to export), then a
prompt. What you type there is what a person writes in the chat app; the bot's
replies and its "typing..." appear as they arrive, marked [bot], with control
characters shown escaped (a reply is untrusted text). Commands at the prompt:
/as, /group, /direct, /photo, /who, /help, and per platform /topic (Telegram) or
/token and /verify (Feishu); any other line, /new included, goes to the bot.
quit, exit, Ctrl-D and Ctrl-C leave.

Scripted, the same person is a ChatUser (TelegramUser in fake_telegram.py,
FeishuUser in fake_feishu.py), for a test that replays a lesson's "Try it":

    tg = FakeTelegram().start()
    ada = TelegramUser(tg)                 # user 42 "Ada", in a direct chat with the bot
    section = load(path, **ada.env())      # TELEGRAM_BOT_TOKEN, TELEGRAM_API_BASE
    ... the section runs (drive_repl, or a subprocess) ...
    ada.wait_for_gateway()                 # the section polls (Feishu: its webhook listens)
    ada.say("hi")                          # a message, exactly as typed
    ada.wait_for_reply()                   # -> ["Hello! I only talk with ... pairing code ..."]
    ada.enter("/group -1001 Team")         # any line as typed at the prompt, commands included
    print(ada.transcript)                  # what the terminal shows: prompts, typed lines, replies

The API, common to both platforms:

    env() -> dict[str, str]                the variables that point a section at this fake
    say(text: str) -> None                 send one message from the current user and chat
    enter(line: str) -> bool               one line as typed at the prompt (a command, or a
                                           message); False when it was quit or exit
    wait_for_gateway(timeout: float = 10.0) -> None
                                           until a section is connected (TimeoutError if not)
    wait_for_reply(timeout: float = 10.0, count: int = 1) -> list[str]
                                           until `count` replies arrived that no earlier call
                                           returned; returns all of those (TimeoutError if not)
    take_replies() -> list[str]            the replies not yet returned, without waiting
    transcript: str                        everything shown so far, as a terminal shows it
    prompt: str                            "Ada > ", "Bob in Team > ", "Ada in Team, topic 7 > "
    user_id, name, chat, thread            who and where you are now (chat None: a direct chat)
    show_banner() -> None                  show what the script shows first (the env lines)
    close() -> None                        stop listening to the fake (the fake keeps running)

Constructors: TelegramUser(fake, user_id=42, name="Ada", *, out=None, show_typing=True) and
FeishuUser(fake, webhook_port=18790, open_id="ou_ada", name="Ada", *, out=None). `out` is a
stream that gets every line too as it is shown (the script passes sys.stdout). Each
reply counts once for wait_for_reply, whichever chat it went to; every reply is also on
the fake (`tg.sent`, `fs.sent`) with its chat. One ChatUser per fake: it sees every reply.

Deterministic transcripts: a reply is shown when the fake receives it, so wait for it
before the next say(). "[bot is typing...]" is shown at most once per message, only
while the message is unanswered; whether the gateway's typing call reaches the fake
before its reply depends on timing, so a replay that must match byte for byte passes
show_typing=False.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
import unicodedata

QUIT = ("quit", "exit")
BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """Untrusted text made safe to print: control characters (escape sequences, carriage
    returns, bells), line separators, bidi overrides and lone surrogates are shown as
    escapes (\\x1b, \\r, \\u202e); newlines stay, and so do tabs."""
    return "".join(ascii(ch)[1:-1] if unsafe(ch) else ch for ch in text)


def unsafe(ch: str) -> bool:
    if ch in "\n\t":
        return False
    return unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in BIDI_CONTROLS


def port_is_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_until(condition, timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(why)
        time.sleep(0.02)


class ChatUser:
    """One person in a chat app. Subclasses know their platform: how a message is
    delivered (send), which chat a reply went to (a key), how chats are named, and the
    commands that differ (who, become, group, photo, and their own extra ones)."""

    help_text = ""

    def __init__(self, user_id, name: str, out=None, show_typing: bool = True):
        self.user_id, self.name = user_id, name
        self.names = {user_id: name}  # who you have been: replies to their chats are labelled
        self.titles: dict = {}  # group chat -> title
        self.chat = None  # None: your direct chat with the bot; else a group's id
        self.thread = None  # a forum topic in that group (Telegram)
        self.out, self.redraw, self.show_typing = out, False, show_typing
        self.changed = threading.Condition()  # guards everything below; shown lines keep order
        self.lines: list[str] = []
        self.replies: list[str] = []
        self.returned = 0  # replies already returned by wait_for_reply / take_replies
        self.expecting: set = set()  # chats with a message not answered yet (typing shows there)
        self.at_prompt = False

    # --- what the platform provides -----------------------------------------------------
    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def banner(self) -> list[str]:
        raise NotImplementedError

    def send(self, text: str, photo: str | None = None) -> None:
        """Deliver one message (photo: its caption, "" for none) from the current user and chat."""
        raise NotImplementedError

    def key(self):
        """The current chat, in the form replies are matched against."""
        raise NotImplementedError

    def label(self, key) -> str:
        """A chat's name for the person: "Ada (42)", "Team (-1001), topic 7"."""
        raise NotImplementedError

    def wait_for_gateway(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def who(self, arg: str) -> None:
        raise NotImplementedError

    def become(self, arg: str) -> None:
        raise NotImplementedError

    def group(self, arg: str) -> None:
        raise NotImplementedError

    def photo(self, arg: str) -> None:
        raise NotImplementedError

    def commands(self) -> dict:
        return {
            "/help": self.show_help,
            "/who": self.who,
            "/direct": self.direct,
            "/as": self.become,
            "/group": self.group,
            "/photo": self.photo,
        }

    # --- the scripted API ---------------------------------------------------------------------
    @property
    def prompt(self) -> str:
        if self.chat is None:
            return f"{self.name} > "
        topic = f", topic {self.thread}" if self.thread is not None else ""
        return f"{self.name} in {self.titles.get(self.chat) or self.chat}{topic} > "

    @property
    def transcript(self) -> str:
        with self.changed:
            return "".join(self.lines)

    def say(self, text: str) -> None:
        """Send text as a message, as typed (a leading slash is doubled when the line would
        otherwise be one of this fake's commands)."""
        if text.strip().lower() in QUIT:
            raise ValueError(f"{text!r} at the prompt means leave; it cannot be sent")
        if text.startswith("//") or text.split(" ", 1)[0] in self.commands():
            text = "/" + text
        self.enter(text)

    def enter(self, line: str, echo: bool = True) -> bool:
        """One line typed at the prompt. echo: print it too (False when a person typed it,
        as the terminal shows it already). Returns False for quit or exit."""
        self.show(self.prompt + printable(line), to_out=echo)
        line = line.strip()
        if line.lower() in QUIT:
            return False
        command, _, arg = line.partition(" ")
        handler = self.commands().get(command)
        try:
            if handler:
                handler(arg.strip())
            elif line:
                self.send(line[1:] if line.startswith("//") else line)
        except ValueError as exc:  # a command used wrongly: say how to use it
            self.show(str(exc))
        return True

    def wait_for_reply(self, timeout: float = 10.0, count: int = 1) -> list[str]:
        """Wait until `count` replies came that no earlier call returned; return all of those
        (TimeoutError, with the transcript, if they do not come in time)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.replies) - self.returned < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    new = self.replies[self.returned :]
                    raise TimeoutError(
                        f"waited {timeout:g} s for {count} replies; got {len(new)}: "
                        f"{new!r}\n--- transcript ---\n{''.join(self.lines)}"
                    )
                self.changed.wait(left)
            return self.take_replies()

    def take_replies(self) -> list[str]:
        """The replies no earlier call returned, without waiting."""
        with self.changed:
            new, self.returned = self.replies[self.returned :], len(self.replies)
            return new

    def show_banner(self) -> None:
        for line in self.banner():
            self.show(line)

    def close(self) -> None:
        pass

    # --- showing lines ----------------------------------------------------------------------------
    def show(self, text: str, to_out: bool = True) -> None:
        """One line (or several) for the person: into the transcript, and printed on `out`.
        At a terminal's prompt it goes above the prompt, which is drawn again with what
        was typed so far (readline's buffer)."""
        with self.changed:
            self.lines.append(text + "\n")
            if self.out is None or not to_out:
                return
            if self.at_prompt and self.redraw:
                import readline

                self.out.write(f"\r\033[K{text}\n{self.prompt}{readline.get_line_buffer()}")
            else:
                self.out.write(text + "\n")
            self.out.flush()

    def note(self, text: str) -> None:
        self.show(f"({text})")

    def received(self, key, text: str) -> None:
        """The bot sent text to the chat `key` (called from the fake's server thread)."""
        marker = "[bot]" if key == self.key() else f"[bot to {self.label(key)}]"
        first, *more = printable(text).split("\n")
        lines = [f"{marker} {first}"] + [" " * (len(marker) + 1) + line for line in more]
        with self.changed:
            self.show("\n".join(lines))
            self.expecting.discard(key)
            self.replies.append(text)
            self.changed.notify_all()

    def typing(self, key) -> None:
        with self.changed:
            if not self.show_typing or key not in self.expecting:
                return
            self.expecting.discard(key)  # once per message, and never after the reply
            where = "" if key == self.key() else f" to {self.label(key)}"
            self.show(f"[bot is typing{where}...]")

    def expect_reply(self) -> None:
        """A message is about to leave: typing may be shown in this chat until the reply."""
        with self.changed:
            self.expecting.add(self.key())

    # --- commands shared by both platforms ------------------------------------------------------
    def show_help(self, arg: str) -> None:
        self.show(self.help_text)

    def direct(self, arg: str) -> None:
        self.chat, self.thread = None, None
        self.show(f"Now in your direct chat with the bot, as {self.name}.")

    def where(self) -> str:
        return self.label(self.key())


def run_terminal(user: ChatUser) -> int:
    """The script: the banner, then a prompt until quit, exit, Ctrl-D or Ctrl-C (all exit 0)."""
    user.out = sys.stdout
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing, and the buffer to draw again)

            user.redraw = True
        except ImportError:
            pass
    user.show_banner()
    try:
        while True:
            with user.changed:
                user.at_prompt = True  # until Enter, replies go above the prompt
            try:
                line = input(user.prompt)
            except EOFError:
                print()
                break
            finally:
                with user.changed:
                    user.at_prompt = False
            if not user.enter(line, echo=False):
                break
    except KeyboardInterrupt:
        print()
    user.close()
    print("Bye.")
    return 0
