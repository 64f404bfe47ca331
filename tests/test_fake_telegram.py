"""The fake Telegram Bot API behaves as python-telegram-bot expects (s04's channel tests rely
on it); run as a script, it is a Telegram user a learner types as, and TelegramUser is that
user scripted, here against the real s04 section."""

import asyncio
import io
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
import telegram
from telegram.ext import Application, MessageHandler, filters

from fake_anthropic import last_user_text, reply
from fake_telegram import DEFAULT_PORT, SCRIPT_TOKEN, FakeTelegram, TelegramUser
from harness import Screen, drive_repl, sections_from, wait_for

SCRIPT = Path(__file__).with_name("fake_telegram.py")
S04 = sections_from("s04")[0]


@pytest.fixture
def tg():
    fake = FakeTelegram().start()
    yield fake
    fake.stop()


def bot_for(tg) -> telegram.Bot:
    return telegram.Bot(tg.token, base_url=tg.base_url)


def test_bot_calls_reach_the_fake(tg):
    async def scenario():
        async with bot_for(tg) as bot:
            me = await bot.get_me()
            await bot.send_chat_action(chat_id=42, action="typing")
            sent = await bot.send_message(chat_id=-100, text="hello topic", message_thread_id=7)
            return me, sent

    me, sent = asyncio.run(scenario())
    assert me.username == "gateway_test_bot"
    assert tg.actions == [{"chat_id": 42, "action": "typing"}]
    assert tg.sent == [{"chat_id": -100, "text": "hello topic", "message_thread_id": 7}]
    assert sent.message_thread_id == 7


def test_long_polling_delivers_pushed_messages_and_offsets_confirm_them(tg):
    received = []

    async def echo(update, context):
        received.append(update.effective_message)
        await update.effective_message.reply_text(f"echo: {update.effective_message.text}")

    async def scenario():
        app = Application.builder().token(tg.token).base_url(tg.base_url).build()
        app.add_handler(MessageHandler(filters.TEXT, echo))
        async with app:
            await app.start()
            await app.updater.start_polling(poll_interval=0, timeout=1)
            tg.push(tg.private_message("hi there", user_id=42))
            tg.push(tg.group_message("in a topic", user_id=43, chat_id=-1001, thread_id=9))
            await asyncio.get_running_loop().run_in_executor(None, tg.wait_for_sent, 2)
            await app.updater.stop()
            await app.stop()

    asyncio.run(scenario())
    assert [m.text for m in received] == ["hi there", "in a topic"]
    assert received[0].chat.type == "private" and received[0].from_user.id == 42
    assert received[1].message_thread_id == 9 and received[1].chat.is_forum
    assert [s["text"] for s in tg.sent] == ["echo: hi there", "echo: in a topic"]
    assert tg.updates == []  # stopping confirmed both with an offset, so they are gone


@pytest.mark.parametrize(
    "status, error",
    [
        (502, telegram.error.NetworkError),
        (409, telegram.error.Conflict),
        (None, telegram.error.NetworkError),
    ],
)
def test_injected_failures_reach_the_client_as_its_own_errors(tg, status, error):
    description = "Conflict: terminated by other getUpdates request" if status == 409 else "Bad"

    async def scenario():
        async with bot_for(tg) as bot:  # entering calls getMe
            tg.fail(status, description)
            with pytest.raises(error):
                await bot.send_message(chat_id=1, text="x")
            return await bot.send_message(chat_id=1, text="after")  # the next call works again

    assert asyncio.run(scenario()).text == "after"


def test_unknown_method_is_a_404(tg):
    request = urllib.request.Request(f"{tg.base_url}{tg.token}/noSuchMethod", data=b"")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 404 and json.loads(err.value.read())["ok"] is False


# --- The script: a Telegram user in a second terminal ---------------------------------------------


def script(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        **popen,
    )


@pytest.mark.parametrize("typed", ["quit\n", "/who\n", ""], ids=["quit", "eof-after-a-line", "eof"])
def test_the_script_prints_the_env_lines_and_leaves_with_0(typed):
    proc = script("--port", "0", text=True)
    out, err = proc.communicate(typed, timeout=20)
    assert proc.returncode == 0 and err == ""
    lines = out.splitlines()
    port = re.search(r"^TELEGRAM_API_BASE=http://127\.0\.0\.1:(\d+)$", out, flags=re.M).group(1)
    assert (
        lines[lines.index("TELEGRAM_BOT_TOKEN=123456:FAKE") + 1] == f"TELEGRAM_API_BASE="
        f"http://127.0.0.1:{port}"
    )
    assert "Ada > " in out and out.endswith("Bye.\n")
    assert DEFAULT_PORT not in (18789, 18790)  # the gateway's and Feishu's webhook's


def test_ctrl_c_at_the_prompt_leaves_with_0():
    proc = script("--port", "0")
    seen = b""
    try:
        while b"Ada > " not in seen:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, seen
            seen += chunk
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0 and err == b"" and out.endswith(b"Bye.\n")


def test_a_port_in_use_is_one_line_and_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = script("--port", str(taken.getsockname()[1]), text=True)
        out, err = proc.communicate("", timeout=20)
    assert proc.returncode == 2 and "cannot listen on 127.0.0.1:" in err and "--port" in err
    assert len(err.splitlines()) == 1


# --- TelegramUser: replies as they arrive, commands ----------------------------------------------


def bot_call(tg, method: str, **params) -> None:
    """What a section's bot does: one Bot API call, form-encoded."""
    httpx.post(f"{tg.base_url}{tg.token}/{method}", data=params).raise_for_status()


def test_replies_are_marked_escaped_and_labelled_with_their_chat(tg):
    out = io.StringIO()
    ada = TelegramUser(tg, out=out)
    ada.say("hi")
    bot_call(tg, "sendChatAction", chat_id=42, action="typing")
    bot_call(tg, "sendChatAction", chat_id=42, action="typing")  # every 4 s: shown once
    bot_call(tg, "sendMessage", chat_id=42, text="line one\nline \x1b[2Jtwo\r\u202e\a")
    bot_call(tg, "sendChatAction", chat_id=42, action="typing")  # after the reply: stale
    assert ada.wait_for_reply() == ["line one\nline \x1b[2Jtwo\r\u202e\a"]
    for line in ["/as 7 Bob", "/group 1001", "/group -1001 Team", "/topic 3", "/photo a cat"]:
        ada.enter(line)
    ada.say("/help")  # to the bot: typed as //help
    bot_call(tg, "sendMessage", chat_id=-1001, message_thread_id=3, text="in the topic")
    bot_call(tg, "sendMessage", chat_id=42, text="late, to Ada")
    assert ada.wait_for_reply(count=2) == ["in the topic", "late, to Ada"]
    assert ada.take_replies() == []
    assert (
        ada.transcript
        == r"""Ada > hi
(no bot is polling this fake yet: the message waits until one does)
[bot is typing...]
[bot] line one
      line \x1b[2Jtwo\r\u202e\x07
Ada > /as 7 Bob
You are Bob (user 7) now.
Bob > /group 1001
Usage: /group ID [TITLE], e.g. /group -1001 Team (Telegram group ids are negative)
Bob > /group -1001 Team
Now in Team (-1001), as Bob.
Bob in Team > /topic 3
Now in Team (-1001), topic 3, as Bob.
Bob in Team, topic 3 > /photo a cat
(sent a photo with its caption)
Bob in Team, topic 3 > //help
[bot] in the topic
[bot to Ada (42)] late, to Ada
"""
    )
    assert out.getvalue() == ada.transcript
    photo, help_command = (u["message"] for u in tg.updates[1:])
    assert photo["caption"] == "a cat" and "text" not in photo and photo["photo"]
    assert help_command["text"] == "/help" and help_command["from"]["id"] == 7
    assert help_command["chat"]["id"] == -1001 and help_command["message_thread_id"] == 3
    with pytest.raises(TimeoutError, match="got 0"):
        ada.wait_for_reply(timeout=0.1)
    ada.close()
    assert tg.watchers == []


# --- TelegramUser against the real s04 -----------------------------------------------------------


def test_a_stranger_gets_a_pairing_code_and_after_approval_the_models_reply(
    load, fake_api, tg, monkeypatch, capsys
):
    ada = TelegramUser(tg, show_typing=False)  # typing may or may not beat a fast reply
    mod = load(S04, **ada.env())
    screen = Screen(capsys)
    code = {}

    def stranger_writes():
        ada.wait_for_gateway()
        ada.say("hello?")
        [answer] = ada.wait_for_reply()
        code["value"] = re.search(r"pairing code is ([A-Z2-9]{8})\b", answer).group(1)
        screen.wait_for("asks to talk")
        return f"/pair approve {code['value']}"

    def paired():
        assert ada.wait_for_reply() == ["You are approved. Send your message again."]
        fake_api.script(reply("Hello Ada, from the agent."))
        ada.say("hello again")
        assert ada.wait_for_reply() == ["Hello Ada, from the agent."]
        return "quit"

    status, _ = drive_repl(mod, [stranger_writes, paired], monkeypatch, capsys)
    assert status == 0
    pairing_reply = mod.PAIRING_REPLY.format(code=code["value"])
    assert ada.transcript == (
        f"Ada > hello?\n[bot] {pairing_reply}\n"
        "[bot] You are approved. Send your message again.\n"
        "Ada > hello again\n[bot] Hello Ada, from the agent.\n"
    )
    assert [last_user_text(r) for r in fake_api.requests] == ["hello again"]


def test_an_allowed_user_in_a_forum_topic_then_a_photo_in_the_direct_chat(
    load, fake_api, tg, monkeypatch, capsys
):
    ada = TelegramUser(tg)
    mod = load(S04, **ada.env(), TELEGRAM_ALLOW_FROM="42")

    def chat():
        ada.wait_for_gateway()
        ada.enter("/group -1005 Team")
        ada.enter("/topic 7")
        ada.say("@gateway_test_bot status?")
        assert ada.wait_for_reply() == ["(fake) you said: status?"]
        ada.enter("/direct")
        ada.enter("/photo my cat")
        ada.wait_for_reply()
        wait_for(lambda: tg.actions, what="a typing action")
        return "quit"

    assert drive_repl(mod, [chat], monkeypatch, capsys)[0] == 0
    topic, photo = tg.sent
    assert (topic["chat_id"], topic["message_thread_id"], photo["chat_id"]) == (-1005, 7, 42)
    assert last_user_text(fake_api.requests[1]) == (
        "my cat\n[they also sent a photo, which this gateway cannot open]"
    )
    assert "Ada in Team, topic 7 > @gateway_test_bot status?\n" in ada.transcript
    assert "[bot] (fake) you said: status?\n" in ada.transcript
    assert (
        "[bot] (fake) you said: my cat\n"
        "      [they also sent a photo, which this gateway cannot open]\n"
    ) in ada.transcript


def test_in_a_terminal_a_reply_goes_above_the_half_typed_line():
    """In a real terminal (a pty): type half a line, let the bot reply, finish the line."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the script, in the pty
        os.execve(sys.executable, [sys.executable, str(SCRIPT), "--port", "0"], env)
    screen, status = b"", None

    def read_until(needle: bytes, after: int = 0) -> int:
        nonlocal screen
        deadline = time.monotonic() + 15
        while needle not in screen[after:] and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    screen += os.read(fd, 65536)
                except OSError:
                    break
        assert needle in screen[after:], screen[-500:]
        return screen.index(needle, after) + len(needle)

    try:
        read_until(b"Ada > ")
        base = re.search(rb"TELEGRAM_API_BASE=(\S+)", screen).group(1).decode()
        os.write(fd, b"hel")
        read_until(b"Ada > hel")
        httpx.post(f"{base}/bot{SCRIPT_TOKEN}/sendMessage", data={"chat_id": 42, "text": "pong"})
        pong = read_until(b"[bot] pong")
        read_until(b"Ada > hel", after=pong)  # the prompt and the half-typed line, drawn again
        os.write(fd, b"lo\n")
        sent = read_until(b"(no bot is polling this fake yet")
        read_until(b"Ada > ", after=sent)
        os.write(fd, b"\x04")  # Ctrl-D
        read_until(b"Bye.")
        _, status = os.waitpid(pid, 0)
    finally:
        if status is None:  # the test failed before the script ended
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    line = screen.index(b"[bot] pong")
    assert screen[line - 4 : line] == b"\r\x1b[K"  # the half-typed line was cleared first
