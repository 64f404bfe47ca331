"""s04: channels. Telegram and Feishu messages become InboundMessages, pass the
allow list or pairing, run in their own sessions on worker threads, and the
replies go back the way they came. Driven against local fakes of the Telegram
Bot API and the Feishu open platform; the terminal is driven in-process."""

import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import telegram

from fake_anthropic import last_user_text, reply, tool_use
from fake_feishu import FakeFeishu, message_event, url_verification
from fake_telegram import FakeTelegram
from harness import (
    Screen,
    assert_valid_history,
    drive_repl,
    isolated_env,
    main_store,
    section_id,
    sections_from,
    state_of,
    telegram_env,
    wait_for,
    whole_process_only,
)

SECTIONS = sections_from("s04")
VERIFY = "verify-me"  # the Feishu verification token the tests configure


@pytest.fixture(params=SECTIONS, ids=section_id)
def path(request):
    return request.param


@pytest.fixture
def tg():
    fake = FakeTelegram().start()
    yield fake
    fake.stop()


@pytest.fixture
def fs():
    fake = FakeFeishu().start()
    yield fake
    fake.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def feishu_env(fs, port, **extra):
    return {
        "FEISHU_APP_ID": fs.app_id,
        "FEISHU_APP_SECRET": fs.app_secret,
        "FEISHU_VERIFICATION_TOKEN": VERIFY,
        "FEISHU_WEBHOOK_PORT": str(port),
        "FEISHU_API_BASE": fs.api_base,
        **extra,
    }


def texts(sent) -> list[str]:
    return [m["text"] for m in sent]


def session_index(workspace) -> dict:
    return json.loads((state_of(workspace) / "sessions" / "main" / "sessions.json").read_text())


def chat_keys(workspace) -> set[str]:
    """The chats that have a session, as s04 names them ("telegram:direct:42"). From s05 on the
    key says which agent too ("agent:main:telegram:direct:42"): that prefix is left off here."""
    return {re.sub(r"^agent:[\w-]+:", "", key) for key in session_index(workspace)["keys"]}


def chat_session(workspace, chat: str) -> str:
    keys = session_index(workspace)["keys"]
    return next(sid for key, sid in keys.items() if re.sub(r"^agent:[\w-]+:", "", key) == chat)


# --- Splitting long replies ----------------------------------------------------------------------


def test_a_10000_character_reply_arrives_in_order_in_parts_telegram_accepts(
    path, load, fake_api, tg, monkeypatch, capsys
):
    words = [f"word{i:04d}" for i in range(1120)]
    paragraphs = [" ".join(words[i : i + 60]) for i in range(0, len(words), 60)]
    long_text = "\n\n".join(paragraphs)
    assert len(long_text) > 10_000
    fake_api.script(reply(long_text))
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))

    def chat():
        tg.push(tg.private_message("write a lot", user_id=42))
        wait_for(
            lambda: len(tg.sent) >= 3 and "word1119" in tg.sent[-1]["text"], what="the last part"
        )
        return "quit"

    code, _ = drive_repl(mod, [chat], monkeypatch, capsys)
    assert code == 0
    parts = texts(tg.sent)
    assert len(parts) == 3
    assert all(len(part) <= 4096 for part in parts)
    assert " ".join(parts).split() == words  # every word, in order, none cut in two
    for part in parts[:-1]:
        assert part.split()[-1] in words[59::60], "each part but the last ends at a paragraph break"


def test_split_prefers_paragraphs_then_lines_then_words(path, load):
    mod = load(path)
    text = "a" * 50 + "\n\n" + "b" * 30 + "\n" + "c" * 30 + " " + "d" * 30
    assert mod.split_message(text, 100) == ["a" * 50, "b" * 30 + "\n" + "c" * 30 + " " + "d" * 30]
    assert mod.split_message("x" * 30 + "\n" + "y" * 80, 100) == ["x" * 30, "y" * 80]
    assert mod.split_message("short", 100) == ["short"]
    assert mod.split_message("z" * 250, 100) == [
        "z" * 96,
        "z" * 96,
        "z" * 58,
    ]  # no space at all: hard cuts


def test_split_keeps_code_blocks_whole_when_it_can(path, load):
    mod = load(path)
    code = "```python\n" + "\n".join(f"print({i})" for i in range(8)) + "\n```"
    text = "Intro line.\n\n" + code + "\n\nAfter."
    parts = mod.split_message(text, len(code) + 10)
    assert parts == ["Intro line.", code + "\n\nAfter."]  # cut before the block, not inside it


def test_split_closes_and_reopens_a_block_too_long_for_one_part(path, load):
    mod = load(path)
    lines = [f"line_{i:03d} = {i}" for i in range(60)]
    text = "```python\n" + "\n".join(lines) + "\n```"
    parts = mod.split_message(text, 300)
    assert len(parts) > 2 and all(len(p) <= 300 for p in parts)
    for part in parts:
        assert part.startswith("```python\n") and part.endswith("```"), (
            part[:20] + "..." + part[-20:]
        )
    body = [line for part in parts for line in part.splitlines() if not line.startswith("```")]
    assert body == lines


# --- Telegram: allowed, unknown, paired ----------------------------------------------------------


def test_an_allowed_telegram_user_gets_an_answer_in_their_own_session(
    path, load, fake_api, tg, monkeypatch, capsys, workspace
):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    fake_api.script(reply("Hello Ada, from the agent."))

    def chat():
        tg.push(tg.private_message("hi there", user_id=42))
        tg.wait_for_sent(1)
        wait_for(lambda: tg.actions, what="a typing action")
        return "/channels"

    code, out = drive_repl(mod, [chat], monkeypatch, capsys)
    assert code == 0
    assert tg.sent == [{"chat_id": 42, "text": "Hello Ada, from the agent."}]
    assert tg.actions[0] == {"chat_id": 42, "action": "typing"}
    assert last_user_text(fake_api.requests[0]) == "hi there"
    assert re.search(r"telegram\s+on\s+@gateway_test_bot", out)
    assert re.search(r"\[(agent:main:)?telegram:direct:42\] Ada \(42\): hi there", out)
    key = chat_session(workspace, "telegram:direct:42")
    lines = (state_of(workspace) / "sessions" / "main" / f"{key}.jsonl").read_text().splitlines()
    saved = [json.loads(line)["message"] for line in lines]
    assert saved == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello Ada, from the agent."}]},
    ]


def test_an_unknown_sender_gets_only_a_pairing_code_until_approved(
    path, load, fake_api, tg, monkeypatch, capsys, workspace
):
    mod = load(path, **telegram_env(tg))
    screen = Screen(capsys)
    code = {}

    def stranger_writes():
        tg.push(tg.private_message("what is the wifi password?", user_id=77, first_name="Eve"))
        code["value"] = re.search(
            r"pairing code is ([A-Z2-9]{8})\b", tg.wait_for_sent(1)[0]["text"]
        ).group(1)
        tg.push(tg.private_message("hello??", user_id=77, first_name="Eve"))
        # the second message gets no second code (and, within a burst, no second line)
        wait_for(lambda: not tg.updates, what="the bot to take the second message")
        return "/pair"

    def approve():
        screen.wait_for(code["value"])
        return f"/pair approve {code['value']}"

    def writes_again():
        tg.wait_for_sent(2)
        fake_api.script(reply("Hi Eve!"))
        tg.push(tg.private_message("hello now", user_id=77, first_name="Eve"))
        tg.wait_for_sent(3)
        return "quit"

    status, out = drive_repl(mod, [stranger_writes, approve, writes_again], monkeypatch, capsys)
    out = screen.text + out
    assert status == 0
    sent = texts(tg.sent)
    assert len(sent) == 3 and sent[1:] == ["You are approved. Send your message again.", "Hi Eve!"]
    assert sent[0].count(code["value"]) == 2
    assert set(code["value"]) <= set("ABCDEFGHJKLMNPQRSTUVWXYZ23456789")
    assert [last_user_text(r) for r in fake_api.requests] == [
        "hello now"
    ]  # the model never saw the first two
    assert "wifi" not in json.dumps(fake_api.requests)
    assert "Eve (77), asked 0 min ago" in out and "Approved telegram user 77" in out
    stored = json.loads((state_of(workspace) / "pairing.json").read_text())
    assert stored["approved"] == {"telegram": ["77"]}


def test_an_approval_survives_a_restart_and_a_denied_sender_gets_no_new_code(
    path, load, fake_api, tg, monkeypatch, capsys
):
    mod = load(path)
    pairing = mod.Pairing({})
    alice = mod.InboundMessage(
        channel="telegram", account="bot", peer="5", sender="5", text="hi", sender_name="A"
    )
    mallory = mod.InboundMessage(channel="telegram", account="bot", peer="6", sender="6", text="hi")
    code_a, code_m = pairing.request(alice), pairing.request(mallory)
    assert len(code_a) == 8 and code_a != code_m
    assert pairing.request(alice) is None  # one code per sender
    assert pairing.decide(code_a.lower(), approve=True)["sender"] == "5"
    assert pairing.decide(code_m, approve=False)["sender"] == "6"
    assert pairing.request(mallory) is None  # denied: no new code within the hour
    assert pairing.decide(code_a, approve=True) is None  # a code works once
    again = mod.Pairing({})
    assert again.is_allowed("telegram", "5") and not again.is_allowed("telegram", "6")
    assert not again.is_allowed("feishu", "5")  # approval is per channel
    assert mod.Pairing({"telegram": {"6"}}).is_allowed("telegram", "6")  # TELEGRAM_ALLOW_FROM


def test_pairing_codes_expire_and_a_flood_of_strangers_cannot_block_pairing(
    path, load, monkeypatch
):
    mod = load(path)
    pairing = mod.Pairing({})
    cap = mod.MAX_PENDING_PAIRINGS
    strangers = [
        mod.InboundMessage(channel="telegram", account="b", peer=str(n), sender=str(n), text="x")
        for n in range(cap + 5)
    ]
    codes = [pairing.request(m) for m in strangers]
    assert all(codes), "every stranger gets a code: the oldest requests give way"
    waiting = [r["sender"] for r in pairing.pending()]
    assert len(waiting) == cap and waiting[-1] == str(cap + 4) and "0" not in waiting
    assert pairing.decide(codes[0], approve=True) is None  # pushed out by the flood
    assert pairing.decide(codes[-1], approve=True)["sender"] == str(cap + 4)  # the real one pairs
    assert pairing.request(strangers[-2]) is None  # one code per sender at a time
    feishu = mod.InboundMessage(channel="feishu", account="b", peer="ou_1", sender="ou_1", text="x")
    assert pairing.request(feishu)  # the cap is per channel
    later = time.time() + mod.PAIRING_TTL + 1
    monkeypatch.setattr(mod.time, "time", lambda: later)
    assert pairing.pending() == []
    assert pairing.decide(codes[-2], approve=True) is None  # expired


def test_a_corrupt_pairing_file_is_moved_aside_and_nobody_is_let_in(path, load, workspace, capsys):
    mod = load(path)
    state = state_of(workspace)
    state.mkdir(exist_ok=True)
    (state / "pairing.json").write_text('{"approved": {"telegram": ["5"]')  # torn
    pairing = mod.Pairing({})
    assert not pairing.is_allowed("telegram", "5")
    assert "is not valid" in capsys.readouterr().out
    assert list(state.glob("pairing.corrupt-*.json"))
    (state / "pairing.json").write_text('{"approved": [], "requests": {}}')  # wrong shapes
    assert not mod.Pairing({}).is_allowed("telegram", "5")


def test_an_unknown_sender_in_a_group_is_ignored_without_a_code(
    path, load, fake_api, tg, monkeypatch, capsys
):
    mod = load(path, **telegram_env(tg))
    screen = Screen(capsys)

    def group_chat():
        tg.push(tg.group_message("hey bot", user_id=88, chat_id=-1001))
        screen.wait_for("ignored telegram user")
        return "quit"

    drive_repl(mod, [group_chat], monkeypatch, capsys)
    assert tg.sent == [] and fake_api.requests == []


# --- Telegram: threads, order, concurrency -------------------------------------------------------


def test_a_forum_topic_is_answered_in_its_topic_and_is_its_own_session(
    path, load, fake_api, tg, monkeypatch, capsys, workspace
):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    fake_api.script(reply("In topic 7."), reply("In the group."))

    def chat():
        topic = tg.group_message(
            "@gateway_test_bot status?", user_id=42, chat_id=-1005, thread_id=7
        )
        tg.push(topic)
        tg.wait_for_sent(1)
        tg.push(tg.group_message("and here?", user_id=42, chat_id=-1005))
        tg.wait_for_sent(2)
        return "quit"

    drive_repl(mod, [chat], monkeypatch, capsys)
    first, second = tg.sent
    assert (
        first["chat_id"] == -1005
        and first["message_thread_id"] == 7
        and first["text"] == "In topic 7."
    )
    assert "message_thread_id" not in second
    assert (
        json.loads(first["reply_parameters"])["message_id"] > 0
    )  # in a group, the answer quotes the question
    assert last_user_text(fake_api.requests[0]) == "status?"  # the mention of the bot is taken out
    assert chat_keys(workspace) == {"telegram:group:-1005:topic:7", "telegram:group:-1005"}
    assert (
        len(fake_api.requests[1]["messages"]) == 1
    )  # the topic's history did not leak into the group's


def test_turns_of_one_chat_wait_in_line_while_other_chats_go_ahead(
    path, load, fake_api, tg, monkeypatch, capsys
):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42,43"))
    gate = threading.Event()
    fake_api.script(reply("first answer", gate=gate))

    def chat():
        tg.push(tg.private_message("one", user_id=42))
        wait_for(lambda: fake_api.requests, what="the first call")
        tg.push(tg.private_message("two", user_id=42))  # same chat: must wait for "one"
        tg.push(tg.private_message("other", user_id=43))  # another chat: runs now
        sent = tg.wait_for_sent(1)
        assert sent[0] == {"chat_id": 43, "text": "(fake) you said: other"}
        assert len(fake_api.requests) == 2  # "two" has not been sent to the model yet
        gate.set()
        tg.wait_for_sent(3)
        return "quit"

    drive_repl(mod, [chat], monkeypatch, capsys)
    assert texts(tg.sent)[1:] == ["first answer", "(fake) you said: two"]
    history = fake_api.requests[2]["messages"]
    assert [m["role"] for m in history] == [
        "user",
        "assistant",
        "user",
    ]  # "two" came after "one" was answered
    assert_valid_history(history)


def test_a_photo_without_words_reaches_the_model_as_a_note(
    path, load, fake_api, tg, monkeypatch, capsys
):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    photo = tg.private_message("", user_id=42)
    del photo["text"]
    photo["photo"] = [{"file_id": "f1", "file_unique_id": "u1", "width": 10, "height": 10}]

    def chat():
        tg.push(photo)
        tg.wait_for_sent(1)
        return "quit"

    drive_repl(mod, [chat], monkeypatch, capsys)
    assert "photo" in last_user_text(fake_api.requests[0])


# --- Telegram: failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status", [502, 409, None], ids=["bad-gateway", "conflict", "connection-dropped"]
)
def test_a_failing_bot_api_is_polled_with_growing_waits_and_recovers(
    path, load, fake_api, tg, monkeypatch, capsys, status
):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    monkeypatch.setattr(mod, "POLL_BACKOFF_START", 0.05)
    tg.fail(
        status,
        "Conflict: terminated by other getUpdates request" if status == 409 else "Bad Gateway",
        times=4,
    )

    def chat():
        tg.push(tg.private_message("are you back?", user_id=42))
        tg.wait_for_sent(1)
        return "/channels"

    code, out = drive_repl(mod, [chat], monkeypatch, capsys)
    assert code == 0 and texts(tg.sent) == ["(fake) you said: are you back?"]
    times = [t for t, _, _ in tg.calls[:5]]  # four failures, then the first call that worked
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert [round(g, 2) >= w for g, w in zip(gaps, [0.05, 0.1, 0.2, 0.4])] == [True] * 4, gaps
    assert (
        out.count("polling failed") == 1
        and out.count("polling works again after 4 failed tries") == 1
    )
    assert "last error" in out  # /channels keeps the last error


def test_a_reply_that_cannot_be_sent_is_logged_and_the_next_message_is_answered(
    path, load, fake_api, tg, monkeypatch, capsys
):
    if section_id(path) >= "s08":
        pytest.skip("from s08 on a failed reply is retried from the delivery queue "
                    "(tests/test_s08_delivery.py), not dropped")
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    tg.fail(500, "Internal Server Error", method="sendMessage")
    screen = Screen(capsys)

    def chat():
        tg.push(tg.private_message("first", user_id=42))
        screen.wait_for("not answered")
        tg.push(tg.private_message("second", user_id=42))
        tg.wait_for_sent(1)
        return "quit"

    code, out = drive_repl(mod, [chat], monkeypatch, capsys)
    assert code == 0 and texts(tg.sent) == ["(fake) you said: second"]
    assert "not answered: NetworkError" in screen.text and "Traceback" not in screen.text + out


def test_a_token_telegram_does_not_know_switches_the_channel_off(
    path, load, fake_api, tg, monkeypatch, capsys
):
    mod = load(path, TELEGRAM_BOT_TOKEN="999:WRONG", TELEGRAM_API_BASE=tg.api_base)
    screen = Screen(capsys)

    def look():
        screen.wait_for("does not know this TELEGRAM_BOT_TOKEN")
        return "/channels"

    code, out = drive_repl(mod, [look], monkeypatch, capsys)
    assert code == 0
    assert re.search(r"telegram\s+off\s+Telegram does not know", out)
    assert len(tg.calls) == 1  # asked once, not again and again


def test_channels_without_tokens_are_off_with_a_reason(path, load, fake_api, monkeypatch, capsys):
    code, out = drive_repl(load(path), ["", "/channels"], monkeypatch, capsys)
    assert code == 0
    assert (
        "Channels: terminal on · telegram off (no TELEGRAM_BOT_TOKEN in .env) · "
        "feishu off (no FEISHU_APP_ID / FEISHU_APP_SECRET in .env)"
    ) in out
    assert re.search(r"feishu\s+off\s+no FEISHU_APP_ID", out)
    assert "Traceback" not in out


# --- Approvals from remote chats -----------------------------------------------------------------


def test_a_remote_bash_request_waits_for_approve_at_the_terminal(
    path, load, fake_api, tg, monkeypatch, capsys, workspace
):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    fake_api.script(
        reply(tools=[tool_use("bash", {"command": "touch from-telegram.txt"}, "toolu_01")]),
        reply("Created from-telegram.txt."),
    )
    screen = Screen(capsys)

    def ask():
        tg.push(tg.private_message("make a file", user_id=42))
        screen.wait_for("/approve 1")
        tg.wait_for_sent(1)
        assert not (
            workspace / "from-telegram.txt"
        ).exists()  # nothing runs before the operator answers
        return "/approvals"

    def done():
        tg.wait_for_sent(2)
        return "quit"

    code, out = drive_repl(mod, [ask, "/approve 1", done], monkeypatch, capsys)
    out = screen.text + out
    assert code == 0 and (workspace / "from-telegram.txt").exists()
    assert texts(tg.sent) == [
        "Waiting for the operator to approve this command: touch from-telegram.txt",
        "Created from-telegram.txt.",
    ]
    assert "telegram:direct:42 wants to run: touch from-telegram.txt" in out
    assert re.search(r"Approved for (agent:main:)?telegram:direct:42: touch from-telegram.txt", out)
    assert "Allow? [o]nce" not in out  # the terminal prompt is for the terminal's own turns


def test_an_unanswered_remote_request_times_out_as_denied(
    path, load, fake_api, tg, monkeypatch, capsys, workspace
):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42", APPROVAL_TIMEOUT="0.3"))
    fake_api.script(
        reply(tools=[tool_use("bash", {"command": "rm SOUL.md"}, "toolu_01")]),
        reply("I could not delete it: nobody approved."),
    )

    def chat():
        tg.push(tg.private_message("delete SOUL.md", user_id=42))
        tg.wait_for_sent(3)
        return "/approvals"

    code, out = drive_repl(mod, [chat], monkeypatch, capsys)
    assert (workspace / "SOUL.md").exists()
    sent = texts(tg.sent)
    assert (
        sent[1]
        == "The operator did not answer within 0.3 s, so this command did not run: rm SOUL.md"
    )
    result = fake_api.requests[1]["messages"][-1]["content"][0]
    assert result["is_error"] is True and "nobody approved" in result["content"]
    assert "no answer in 0.3 s: denied" in out and "No commands are waiting for approval." in out


def test_deny_and_unknown_ids_at_the_terminal(
    path, load, fake_api, tg, monkeypatch, capsys, workspace
):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    fake_api.script(
        reply(tools=[tool_use("bash", {"command": "touch x.txt"}, "toolu_01")]), reply("Not done.")
    )
    screen = Screen(capsys)

    def ask():
        tg.push(tg.private_message("make x", user_id=42))
        screen.wait_for("/deny 1")
        return "/approve 9"

    def done():
        tg.wait_for_sent(2)
        return "quit"

    code, out = drive_repl(mod, [ask, "/deny 1", done], monkeypatch, capsys)
    assert not (workspace / "x.txt").exists()
    assert "No command is waiting with id '9'" in out
    assert re.search(r"Denied for (agent:main:)?telegram:direct:42: touch x.txt", out)
    assert "the operator denied" in fake_api.requests[1]["messages"][-1]["content"][0]["content"]


# --- Feishu --------------------------------------------------------------------------------------


def post(port: int, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"http://127.0.0.1:{port}/", content=content, timeout=5, **kwargs)


def raw_post(port: int, request: bytes) -> int:
    """Send bytes as they are (httpx will not send a false Content-Length); return the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        return int(conn.recv(1024).split()[1])


def test_feishu_answers_the_challenge_and_refuses_bad_tokens_and_garbage(
    path, load, fake_api, fs, monkeypatch, capsys
):
    port = free_port()
    mod = load(path, **feishu_env(fs, port, FEISHU_ALLOW_FROM="ou_ada"))
    seen = {}

    def probe():
        ok = post(port, url_verification("c-123", VERIFY))
        seen["challenge"] = (ok.status_code, ok.json())
        seen["wrong"] = post(port, url_verification("c-123", "not-the-token")).status_code
        seen["forged"] = post(port, message_event("hi", "ou_ada", token="forged")).status_code
        seen["garbage"] = [
            post(port, body).status_code
            for body in (
                b"not json",
                b"[]",
                b"null",
                b'"text"',
                b"{}",
                {"header": []},
                {"header": {"token": VERIFY, "event_type": "im.message.receive_v1"}},
                {"encrypt": "abc"},
            )
        ]
        seen["huge"] = raw_post(
            port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\nx"
        )
        seen["still"] = post(port, url_verification("c-456", VERIFY)).json()
        return "/channels"

    code, out = drive_repl(mod, [probe], monkeypatch, capsys)
    assert seen["challenge"] == (200, {"challenge": "c-123"})
    assert seen["wrong"] == 403 and seen["forged"] == 403
    assert seen["garbage"] == [400] * 8
    assert seen["huge"] == 413
    assert seen["still"] == {"challenge": "c-456"}  # none of that took the webhook down
    assert fake_api.requests == [] and fs.sent == []
    assert re.search(rf"feishu\s+on\s+webhook on http://127.0.0.1:{port}/", out)


def test_feishu_direct_and_group_replies_use_the_right_receive_id_type(
    path, load, fake_api, fs, monkeypatch, capsys, workspace
):
    port = free_port()
    mod = load(path, **feishu_env(fs, port, FEISHU_ALLOW_FROM="ou_ada"))
    fake_api.script(reply("Direct answer."), reply("Group answer."))

    def chat():
        assert (
            post(port, message_event("hello", "ou_ada", VERIFY, event_id="ev1")).status_code == 200
        )
        assert (
            post(port, message_event("hello", "ou_ada", VERIFY, event_id="ev1")).status_code == 200
        )  # redelivery
        wait_for(lambda: len(fs.sent) == 1, what="the direct reply")
        event = message_event(
            "@_user_1 and you all?", "ou_ada", VERIFY, chat_id="oc_team", chat_type="group"
        )
        post(port, event)
        wait_for(lambda: len(fs.sent) == 2, what="the group reply")
        return "quit"

    drive_repl(mod, [chat], monkeypatch, capsys)
    assert fs.sent == [
        {
            "receive_id_type": "open_id",
            "receive_id": "ou_ada",
            "msg_type": "text",
            "text": "Direct answer.",
        },
        {
            "receive_id_type": "chat_id",
            "receive_id": "oc_team",
            "msg_type": "text",
            "text": "Group answer.",
        },
    ]
    assert [last_user_text(r) for r in fake_api.requests] == [
        "hello",
        "and you all?",
    ]  # redelivery answered once
    assert fs.token_requests == 1  # the tenant token was cached
    assert chat_keys(workspace) == {"feishu:direct:ou_ada", "feishu:group:oc_team"}


def test_feishu_fetches_a_new_token_when_the_old_one_stops_working(
    path, load, fake_api, fs, monkeypatch, capsys
):
    port = free_port()
    mod = load(path, **feishu_env(fs, port, FEISHU_ALLOW_FROM="ou_ada"))

    def chat():
        post(port, message_event("one", "ou_ada", VERIFY))
        wait_for(lambda: len(fs.sent) == 1, what="the first reply")
        fs.expire_tokens()
        post(port, message_event("two", "ou_ada", VERIFY))
        wait_for(lambda: len(fs.sent) == 2, what="the second reply")
        return "quit"

    drive_repl(mod, [chat], monkeypatch, capsys)
    assert [m["text"] for m in fs.sent] == ["(fake) you said: one", "(fake) you said: two"]
    assert fs.token_requests == 2


def test_a_feishu_stranger_gets_a_pairing_code(path, load, fake_api, fs, monkeypatch, capsys):
    port = free_port()
    mod = load(path, **feishu_env(fs, port))

    def chat():
        post(port, message_event("hi", "ou_eve", VERIFY))
        wait_for(lambda: fs.sent, what="the pairing reply")
        return "/pair"

    code, out = drive_repl(mod, [chat], monkeypatch, capsys)
    assert fs.sent[0]["receive_id"] == "ou_eve" and "pairing code is" in fs.sent[0]["text"]
    assert fake_api.requests == []
    assert "feishu user ? (ou_eve)" in out


def test_a_webhook_port_in_use_switches_feishu_off_and_the_repl_runs(
    path, load, fake_api, fs, monkeypatch, capsys
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mod = load(path, **feishu_env(fs, port))
        code, out = drive_repl(mod, ["/channels"], monkeypatch, capsys)
    assert code == 0
    assert (
        f"feishu off (cannot listen on 127.0.0.1:{port}" in out
        and "set FEISHU_WEBHOOK_PORT to a free port" in out
    )
    assert "Traceback" not in out


# --- Sessions of remote chats, and the terminal --------------------------------------------------


def test_the_terminal_cannot_switch_into_a_chat_that_is_still_using_its_session(
    path, load, workspace
):
    mod = load(path)
    store = main_store(mod)
    terminal = store.create("mine")
    chat = store.for_key("telegram:direct:42")
    assert store.for_key("telegram:direct:42") is chat  # kept open, not replayed per message
    assert store.find(chat.id) == [] and store.find("telegram") == []
    assert store.find("mine") == [terminal.id]
    assert store.index["current"] == terminal.id  # a chat's session never becomes the terminal's
    fresh = store.for_key("telegram:direct:42", fresh=True)  # the chat sent /new
    assert fresh.id != chat.id and store.find(chat.id) == [chat.id]  # the old one is free now
    reopened = main_store(mod)
    assert reopened.for_key("telegram:direct:42").id == fresh.id


def test_remote_new_starts_a_fresh_conversation(path, load, fake_api, tg, monkeypatch, capsys):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))

    def chat():
        for n, text in enumerate(["remember 7", "/new", "what number?"], 1):
            tg.push(tg.private_message(text, user_id=42))
            tg.wait_for_sent(n)
        return "quit"

    drive_repl(mod, [chat], monkeypatch, capsys)
    assert texts(tg.sent)[1] == "Started a new conversation."
    assert len(fake_api.requests[-1]["messages"]) == 1


# --- Side by side: one shape from every platform -------------------------------------------------


def inbound_examples(mod):
    """The InboundMessage each remote channel makes of the same "hi" in a direct chat."""
    tg = FakeTelegram()  # only its message builder; the server is never started
    update = telegram.Update.de_json(
        {"update_id": 1, "message": tg.private_message("hi", user_id=42)}, None
    )
    tg.http.server.server_close()
    telegram_channel = mod.TelegramChannel("123:T", "http://127.0.0.1:9")
    telegram_channel.account = "gateway_test_bot"
    feishu_channel = mod.FeishuChannel("cli_test_app", "s", VERIFY, 0, "http://127.0.0.1:9")
    return [
        telegram_channel.to_inbound(update),
        feishu_channel.to_inbound(message_event("hi", "ou_ada", VERIFY, chat_id="oc_1")),
    ]


def test_the_lesson_shows_what_each_platform_really_makes(path, load):
    """The lesson's side-by-side table: each field's value, per platform, as the code makes it."""
    mod = load(path)
    examples = inbound_examples(mod)
    lesson = (
        SECTIONS[0].with_suffix(".md").read_text(encoding="utf-8")
    )  # s04's lesson makes the claim
    rows = re.findall(r"^\| `(\w+)` \| (.*?) \| (.*?) \|$", lesson, flags=re.M)
    fields = {name: cells for name, *cells in rows}
    assert set(fields) >= {
        "channel",
        "account",
        "peer",
        "sender",
        "text",
        "is_group",
        "media",
        "session_key",
    }
    for name, cells in fields.items():
        for message, cell in zip(examples, cells):
            shown = re.match(r"`([^`]*)`", cell)
            value = getattr(message, name)
            assert (shown.group(1) if shown else "") == ("" if value == "" else str(value)), (
                name,
                cell,
            )


# --- End to end: the file as a learner runs it ---------------------------------------------------


def test_end_of_input_stops_telegram_polling_and_exits_at_once(tg, fake_api, workspace):
    path = SECTIONS[0]
    env = isolated_env(workspace, fake_api.base_url, **telegram_env(tg))
    proc = subprocess.Popen(
        [sys.executable, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(workspace.parent),
    )
    try:
        wait_for(lambda: tg.calls_of("getUpdates"), timeout=20, what="polling to start")
        started = time.monotonic()
        out, err = proc.communicate(
            "/channels\n", timeout=15
        )  # then end of input while a poll waits
        elapsed = time.monotonic() - started
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert elapsed < 4, f"took {elapsed:.1f} s to stop"
    assert re.search(
        r"telegram\s+on\s+@gateway_test_bot, long polling", out
    ) and out.rstrip().endswith("Bye.")
    assert err == ""


def test_ctrl_c_at_the_prompt_stops_a_polling_telegram_and_exits_0(
    path, load, fake_api, tg, monkeypatch, capsys
):
    mod = load(path, **telegram_env(tg))

    def interrupt():
        wait_for(lambda: tg.calls_of("getUpdates"), what="a poll in progress")
        raise KeyboardInterrupt

    started = time.monotonic()
    code, out = drive_repl(mod, [interrupt], monkeypatch, capsys)
    assert code == 0 and out.rstrip().endswith("Bye.")
    assert time.monotonic() - started < 5
    assert mod.threading.active_count() >= 1 and not any(
        t.name == "telegram" and t.is_alive() for t in mod.threading.enumerate()
    )


def test_leaving_denies_waiting_commands_and_lets_the_chat_hear_the_end(
    path, load, fake_api, tg, monkeypatch, capsys, workspace
):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    fake_api.script(
        reply(tools=[tool_use("bash", {"command": "touch late.txt"}, "toolu_01")]),
        reply("The operator left before approving; nothing was created."),
    )
    screen = Screen(capsys)

    def leave_while_it_waits():
        tg.push(tg.private_message("make late.txt", user_id=42))
        screen.wait_for("/approve 1")
        return "quit"

    code, out = drive_repl(mod, [leave_while_it_waits], monkeypatch, capsys)
    assert code == 0 and not (workspace / "late.txt").exists()
    assert texts(tg.sent)[-1] == "The operator left before approving; nothing was created."
    assert "(letting 1 remote conversation finish" in out


@pytest.mark.parametrize(
    "domain, shown",
    [
        ("lark", "API https://open.larksuite.com"),
        ("feishu", "API https://open.feishu.cn"),
        ("larksuite", "FEISHU_DOMAIN must be feishu or lark, not 'larksuite'"),
    ],
)
def test_feishu_domain_picks_the_api(path, load, fake_api, monkeypatch, capsys, domain, shown):
    env = {
        "FEISHU_APP_ID": "cli_x",
        "FEISHU_APP_SECRET": "s",
        "FEISHU_VERIFICATION_TOKEN": VERIFY,
        "FEISHU_WEBHOOK_PORT": str(free_port()),
        "FEISHU_DOMAIN": domain,
    }  # nothing is sent: no fake needed
    code, out = drive_repl(load(path, **env), ["/channels"], monkeypatch, capsys)
    assert code == 0 and shown in out


# --- The terminal while other channels talk ------------------------------------------------------


def test_background_lines_wait_while_a_terminal_turn_prints(
    path, load, fake_api, tg, monkeypatch, capsys
):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    gate = threading.Event()
    fake_api.script(
        reply(
            "The terminal's answer, streamed.",
            chunks=["The terminal's ", "answer, streamed."],
            gate=gate,
        ),
        reply("Telegram's answer."),
    )

    def meanwhile():
        wait_for(lambda: fake_api.requests, what="the terminal's call")
        tg.push(tg.private_message("from the phone", user_id=42))
        tg.wait_for_sent(1)  # answered while the terminal's reply is still streaming
        gate.set()

    helper = threading.Thread(target=meanwhile)
    helper.start()
    code, out = drive_repl(mod, ["a slow question"], monkeypatch, capsys)
    helper.join(10)
    answer = out.index("The terminal's answer, streamed.")
    assert out.index("Ada (42): from the phone") > answer  # held, then printed after the turn
    assert "The terminal's answer, streamed.\n" in out  # nothing landed inside the streamed line


def test_at_the_prompt_a_background_line_goes_above_what_you_are_typing(
    path, tg, fake_api, workspace
):
    """In a real terminal (a pty): type half a line, a Telegram message comes, finish the line."""
    whole_process_only(path, "s04")
    env = isolated_env(workspace, fake_api.base_url, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    env.pop("NO_COLOR")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the section, in the pty
        os.chdir(workspace.parent)
        os.execve(sys.executable, [sys.executable, str(path)], env)
    screen = b""

    def read_until(needle: bytes, after: int = 0, timeout: float = 15) -> int:
        """Read the pty until `needle` shows up past position `after`; return where it ends."""
        nonlocal screen
        deadline = time.monotonic() + timeout
        while needle not in screen[after:] and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    screen += os.read(fd, 65536)
                except OSError:
                    break
        assert needle in screen[after:], screen[-500:]
        return screen.index(needle, after) + len(needle)

    try:
        read_until(b"You > ")
        wait_for(lambda: tg.calls_of("getUpdates"), what="polling")
        os.write(fd, b"hel")
        read_until(b"You > hel")
        tg.push(tg.private_message("ping from the phone", user_id=42))
        ping = read_until(b"ping from the phone")
        read_until(
            b"You > hel", after=ping, timeout=5
        )  # the prompt and the half-typed line, drawn again below
        os.write(fd, b"lo\n")
        answered = read_until(b"(fake) you said: hello")
        read_until(b"You > ", after=answered)
        os.write(fd, b"\x04")  # Ctrl-D
        read_until(b"Bye.", after=answered)
    finally:
        if os.waitpid(pid, os.WNOHANG) == (0, 0):  # still running: the test failed before Ctrl-D
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    line = screen.index(b"ping from the phone")
    assert b"\r\x1b[K" in screen[line - 100 : line]  # the half-typed line was cleared first
    assert b"\nYou > hel" in screen[line:]


# --- One person cannot take the gateway for themselves ------------------------------------


def test_a_chat_past_its_waiting_cap_hears_busy_once_and_new_drops_what_waits(
    path, load, fake_api, tg, monkeypatch, capsys
):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    gate = threading.Event()
    fake_api.script(reply("first answer", gate=gate))
    cap = mod.MAX_WAITING_TURNS

    def flood():
        tg.push(tg.private_message("first", user_id=42))
        wait_for(lambda: fake_api.requests, what="the first call")
        for n in range(cap + 3):
            tg.push(tg.private_message(f"more {n}", user_id=42))
        tg.wait_for_sent(1)  # one "busy", however many came past the cap
        tg.push(tg.private_message("/new", user_id=42))  # drops the five waiting turns
        wait_for(lambda: not tg.updates, what="the bot to take /new (it confirms what it took)")
        gate.set()
        tg.wait_for_sent(3)
        return "quit"

    drive_repl(mod, [flood], monkeypatch, capsys)
    assert texts(tg.sent) == [mod.BUSY_REPLY, "first answer", "Started a new conversation."]
    assert [last_user_text(r) for r in fake_api.requests] == ["first"]


def test_one_sender_holds_at_most_one_worker(path, load, fake_api, tg, monkeypatch, capsys):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42,43"))
    gate = threading.Event()
    fake_api.script(reply("slow answer", gate=gate))

    def two_chats_at_once():
        tg.push(tg.private_message("slow one", user_id=42))
        wait_for(lambda: fake_api.requests, what="the first call")
        tg.push(tg.group_message("in the group too", user_id=42, chat_id=-100))  # same person
        tg.push(tg.private_message("someone else", user_id=43))
        assert tg.wait_for_sent(1)[0]["chat_id"] == 43  # another person is not held up
        time.sleep(0.3)
        assert len(fake_api.requests) == 2  # 42's group message waits for 42's first turn
        gate.set()
        tg.wait_for_sent(3)
        return "quit"

    drive_repl(mod, [two_chats_at_once], monkeypatch, capsys)
    assert [last_user_text(r) for r in fake_api.requests] == [
        "slow one",
        "someone else",
        "in the group too",
    ]


def test_a_burst_of_strangers_is_one_line_at_the_terminal(
    path, load, fake_api, tg, monkeypatch, capsys
):
    mod = load(path, **telegram_env(tg))

    def strangers():
        for user in range(100, 112):
            tg.push(tg.private_message("let me in", user_id=user, first_name=f"S{user}"))
        tg.wait_for_sent(12)
        return "/pair"

    code, out = drive_repl(mod, [strangers], monkeypatch, capsys)
    assert out.count("asks to talk") == 1
    assert len(re.findall(r"^  [A-Z2-9]{8}  telegram user S1\d\d", out, flags=re.M)) == 12


def test_slow_webhook_clients_cannot_hold_every_thread(
    path, load, fake_api, fs, monkeypatch, capsys
):
    port = free_port()
    mod = load(path, **feishu_env(fs, port, FEISHU_ALLOW_FROM="ou_ada"))
    monkeypatch.setattr(mod, "MAX_WEBHOOK_REQUESTS", 4)
    monkeypatch.setattr(mod.FeishuWebhook, "timeout", 0.5)
    slow = []

    def crowd():
        for _ in range(4):  # each says a body is coming, and never sends it
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            slow.append(s)
        time.sleep(0.1)
        refused = raw_post(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        time.sleep(0.8)  # past the read timeout: the slow ones are dropped
        answered = post(port, message_event("hi", "ou_ada", VERIFY)).status_code
        wait_for(lambda: fs.sent, what="the reply")
        return refused, answered

    box = {}
    drive_repl(mod, [lambda: box.setdefault("result", crowd()) and "quit"], monkeypatch, capsys)
    for s in slow:
        s.close()
    assert box["result"] == (503, 200)


def test_a_pairing_file_with_requests_of_the_wrong_shape_loses_only_those(path, load, workspace,
                                                                          monkeypatch, capsys):
    state = state_of(workspace)
    state.mkdir()
    good = {"code": "K7M3QPX2", "channel": "telegram", "sender": "5", "peer": "5",
            "created": time.time()}
    (state / "pairing.json").write_text(json.dumps({"approved": {}, "requests": [
        dict(good, created="yesterday"), {"code": 7}, good]}))
    mod = load(path)
    code, out = drive_repl(mod, ["/pair"], monkeypatch, capsys)
    assert code == 0 and "K7M3QPX2  telegram user ? (5)" in out and "Traceback" not in out


def test_approve_takes_always_or_nothing_after_the_id(path, load, monkeypatch, capsys):
    mod = load(path)
    code, out = drive_repl(mod, ["/approve 1 deny"], monkeypatch, capsys)
    assert "Usage: /approve ID, or /approve ID always" in out


def test_a_flood_of_refused_webhook_events_is_one_line(path, load, fake_api, fs, monkeypatch,
                                                       capsys):
    port = free_port()
    mod = load(path, **feishu_env(fs, port))

    def flood():
        for _ in range(30):
            assert post(port, message_event("hi", "ou_x", "wrong-token")).status_code == 403
        return "quit"
    code, out = drive_repl(mod, [flood], monkeypatch, capsys)
    assert out.count("refused an event with a wrong verification token") == 1


def test_a_stranger_in_a_group_can_neither_fill_its_line_nor_restart_it(path, load, fake_api, tg,
                                                                        monkeypatch, capsys):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    gate = threading.Event()
    fake_api.script(reply("first", gate=gate))

    def stranger_meddles():
        tg.push(tg.group_message("one", user_id=42, chat_id=-100))
        wait_for(lambda: fake_api.requests, what="the first call")
        tg.push(tg.group_message("two", user_id=42, chat_id=-100))
        for _ in range(mod.MAX_WAITING_TURNS + 2):
            tg.push(tg.group_message("spam", user_id=666, chat_id=-100, first_name="Mal"))
        tg.push(tg.group_message("/new", user_id=666, chat_id=-100, first_name="Mal"))
        wait_for(lambda: not tg.updates, what="the bot to take them all")
        gate.set()
        tg.wait_for_sent(2)
        return "quit"
    drive_repl(mod, [stranger_meddles], monkeypatch, capsys)
    assert texts(tg.sent) == ["first", "(fake) you said: two"]
