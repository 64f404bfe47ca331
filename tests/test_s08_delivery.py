"""s08: every reply to a chat is on disk before it is sent, and every message from a chat is on
disk before the platform hears "received". A worker sends per recipient in order, resumes at
the next chunk, retries what may pass and gives up on what will not. Run against s08 and every
later section. Time is a stepped clock: backoffs of minutes pass in milliseconds."""

import json
import re
import sys
import time
from pathlib import Path

import pytest

from fake_feishu import message_event
from fake_telegram import FakeTelegram
from harness import (
    Clock,
    REPO,
    Screen,
    drive_repl,
    section_id,
    sections_from,
    state_of,
    telegram_env,
    wait_for,
)

sys.path.insert(0, str(REPO / "benchmarks"))
from delivery import crash_test  # noqa: E402

SECTIONS = sections_from("s08")


@pytest.fixture(params=SECTIONS, ids=section_id)
def path(request):
    return request.param



class Chat:
    """A channel double: send() records (peer, text), or raises the next queued error; it also
    notes which entries were on disk at each call."""

    def __init__(self, max_text: int = 4096):
        self.max_text, self.sent, self.errors, self.on_disk, self.folder = (
            max_text,
            [],
            [],
            [],
            None,
        )

    def send(self, message, text: str) -> None:
        if self.folder:
            self.on_disk.append(sorted(p.name for p in self.folder.glob("*.json")))
        if self.errors:
            error = self.errors.pop(0)
            if error:
                raise error
        self.sent.append((message.peer, text))


class RetryAfterTelegram(FakeTelegram):
    """The fake Bot API, whose 429 says how long to wait (parameters.retry_after), as
    Telegram's does."""

    retry_after = 7

    def _handler_class(self):
        base, fake = super()._handler_class(), self

        class Handler(base):
            def reply(self, status, body):
                if status == 429:
                    body = {**body, "parameters": {"retry_after": fake.retry_after}}
                return base.reply(self, status, body)

        return Handler


@pytest.fixture
def tg():
    fake = RetryAfterTelegram().start()
    yield fake
    fake.stop()


def to(mod, peer: str = "42", channel: str = "telegram"):
    return mod.InboundMessage(channel=channel, account="bot", peer=peer, sender=peer, text="")


def queue_of(mod, chat=None, clock=None, folder=None):
    chat = chat or Chat()
    clock = clock or Clock(1_000_000.0)
    delivery = mod.Delivery({"telegram": chat}, folder or mod.DELIVERY_DIR, clock)
    delivery.load()
    chat.folder = delivery.folder
    return delivery, chat


def texts(sent) -> list[str]:
    return [m["text"] for m in sent]


def test_a_reply_is_on_disk_before_it_is_sent_and_stays_when_the_send_fails(path, load):
    mod = load(path)
    delivery, chat = queue_of(mod)
    chat.errors = [mod.ChannelError("the network is down")]
    entry_id = delivery.enqueue(to(mod), "hello")
    delivery.start()
    entry_file = mod.DELIVERY_DIR / f"{entry_id}.json"
    wait_for(lambda: json.loads(entry_file.read_text())["attempts"] == 1, what="a failed try")
    assert chat.on_disk == [[f"{entry_id}.json"]]  # the file was there when send() was called
    on_disk = json.loads(entry_file.read_text())
    assert on_disk["chunks"] == ["hello"] and on_disk["sent"] == 0
    assert "the network is down" in on_disk["last_error"] and chat.sent == []
    assert not list(mod.DELIVERY_DIR.glob(".*"))  # no temp file left behind


def test_a_retry_resumes_at_the_next_unsent_chunk(path, load):
    mod = load(path)
    clock = Clock(1_000_000.0)
    delivery, chat = queue_of(mod, Chat(max_text=12), clock)
    chat.errors = [None, mod.ChannelError("timed out")]  # the first chunk goes, the second fails
    text = "one two three four five six"
    entry_file = mod.DELIVERY_DIR / f"{delivery.enqueue(to(mod), text)}.json"
    delivery.start()
    wait_for(lambda: json.loads(entry_file.read_text())["attempts"] == 1, what="a failed try")
    assert json.loads(entry_file.read_text())["sent"] == 1  # progress was recorded on disk
    clock.now += 60
    delivery.wake()
    assert delivery.settle(5)
    chunks = mod.split_message(text, 12)
    assert len(chunks) >= 3 and [part for _, part in chat.sent] == chunks  # none twice
    assert delivery.pending() == [] and not list(mod.DELIVERY_DIR.glob("*.json"))


def test_one_chats_failing_reply_holds_only_that_chats_later_replies(path, load):
    mod = load(path)
    clock = Clock(1_000_000.0)
    delivery, chat = queue_of(mod, clock=clock)
    chat.errors = [mod.ChannelError("502 Bad Gateway")]
    delivery.enqueue(to(mod, "1"), "a1")
    delivery.enqueue(to(mod, "1"), "a2")
    delivery.enqueue(to(mod, "2"), "b1")
    delivery.start()
    wait_for(lambda: ("2", "b1") in chat.sent, what="the other chat's reply")
    assert chat.sent == [("2", "b1")]  # a2 waits behind a1; chat 2 does not
    entry = delivery.pending()[0]
    assert 4 <= entry["next_attempt"] - clock.now <= 6  # about 5 s, with jitter
    clock.now += 6
    delivery.wake()
    assert delivery.settle(5)
    assert chat.sent == [("2", "b1"), ("1", "a1"), ("1", "a2")]


def test_backoff_grows_to_ten_minutes_then_the_entry_moves_to_failed_after_a_time(
    path, load, monkeypatch
):
    mod = load(path)
    clock = Clock(1_000_000.0)
    delivery, chat = queue_of(mod, clock=clock)
    monkeypatch.setattr(mod, "GIVE_UP_AFTER", 3600)  # the rule, without 150 rounds of a day
    chat.errors = [mod.ChannelError("down")] * 1000
    entry_id = delivery.enqueue(to(mod), "hello")
    delivery.start()
    waits, attempt = [], 0
    while not (mod.DELIVERY_DIR / "failed" / f"{entry_id}.json").exists():
        attempt += 1
        wait_for(lambda: not delivery.pending() or delivery.pending()[0]["attempts"] == attempt
                 and delivery.pending()[0]["next_attempt"] > clock.now)  # both written
        if not delivery.pending():
            break
        waits.append(delivery.pending()[0]["next_attempt"] - clock.now)
        clock.now += waits[-1]
        delivery.wake()
    wait_for(lambda: "gave up" in "".join(mod.held_lines), what="the entry given up")
    bases = [*mod.RETRY_DELAYS, *[mod.RETRY_DELAYS[-1]] * len(waits)]
    assert all(0.8 * base <= w <= 1.2 * base for w, base in zip(waits, bases)), waits
    assert sum(waits) >= mod.GIVE_UP_AFTER - 1.2 * mod.RETRY_DELAYS[-1]  # not after 5 attempts
    failed = json.loads((mod.DELIVERY_DIR / "failed" / f"{entry_id}.json").read_text())
    assert failed["attempts"] == len(waits) + 1 > 5 and "down" in failed["last_error"]
    assert f"gave up on {entry_id}" in "".join(mod.held_lines)  # the worker's log line


def test_one_chat_cannot_fill_the_queue_and_failed_keeps_the_newest(path, load, monkeypatch):
    mod = load(path)
    monkeypatch.setattr(mod, "MAX_QUEUED_PER_CHAT", 2)
    monkeypatch.setattr(mod, "MAX_FAILED", 2)
    delivery, chat = queue_of(mod)
    delivery.enqueue(to(mod, "1"), "a")
    delivery.enqueue(to(mod, "1"), "b")
    with pytest.raises(mod.ChannelError, match="2 replies to this chat"):
        delivery.enqueue(to(mod, "1"), "c")
    assert delivery.enqueue(to(mod, "2"), "d")  # another chat still gets its reply queued
    chat.errors = [mod.ChannelError("blocked", "permanent")] * 3
    delivery.start()
    assert delivery.settle(5)
    failed = sorted(p.name for p in (mod.DELIVERY_DIR / "failed").glob("*.json"))
    assert failed == ["00000002.json", "00000003.json"] and chat.sent == []
    assert "removed 00000001.json from failed/" in "".join(mod.held_lines)


def test_telegram_errors_are_classified_by_type(path, load, tg):
    mod = load(path)
    channel = mod.TelegramChannel(tg.token, tg.api_base)
    channel.start(lambda message: None)
    try:
        wait_for(lambda: channel.state == "on", what="Telegram on")
        clock = Clock(1_000_000.0)
        delivery, _ = queue_of(mod, channel, clock)
        delivery.start()
        cases = [
            (429, "Too Many Requests: retry after 7", "transient"),
            (500, "Internal Server Error", "transient"),
            (None, "", "transient"),  # a dropped connection
            (400, "Bad Request: chat not found", "permanent"),
            (403, "Forbidden: bot was blocked by the user", "permanent"),
        ]
        for status, description, kind in cases:
            tg.fail(status, description, method="sendMessage")
            with pytest.raises(mod.ChannelError) as caught:
                channel.send(to(mod), "hi")
            assert caught.value.kind == kind, (status, description)
        tg.fail(429, "Too Many Requests: retry after 7", method="sendMessage")
        delivery.enqueue(to(mod), "rate limited")
        wait_for(lambda: delivery.pending()[0]["attempts"] == 1)
        assert delivery.pending()[0]["next_attempt"] - clock.now >= 7  # retry_after honoured
        clock.now += 8
        delivery.wake()
        assert delivery.settle(5) and texts(tg.sent)[-1] == "rate limited"
        tg.fail(403, "Forbidden: bot was blocked by the user", method="sendMessage")
        blocked = delivery.enqueue(to(mod), "never")
        wait_for(lambda: (mod.DELIVERY_DIR / "failed" / f"{blocked}.json").exists())
        failed = json.loads((mod.DELIVERY_DIR / "failed" / f"{blocked}.json").read_text())
        assert failed["attempts"] == 1 and "blocked" in failed["last_error"]
    finally:
        channel.stop()


def test_feishu_errors_are_classified_by_status_and_code(path, load):
    mod = load(path)
    check = mod.FeishuChannel.check
    for status, data, headers, kind, after in [
        (429, {"code": 99991400}, {"x-ogw-ratelimit-reset": "52"}, "transient", 52.0),
        (400, {"code": 99991400}, {}, "transient", 0.0),  # older APIs: 400 with the code
        (503, {"code": None}, {"retry-after": "3"}, "transient", 3.0),
        (400, {"code": 230001, "msg": "invalid receive_id"}, {}, "permanent", 0.0),
        (403, {"code": 99991672}, {}, "permanent", 0.0),
    ]:
        with pytest.raises(mod.ChannelError) as caught:
            check(None, status, headers, data)
        assert (caught.value.kind, caught.value.retry_after) == (kind, after), status
    assert check(None, 400, {}, {"code": 99991663}) == {"code": 99991663}  # a new token, once


def test_pending_replies_are_sent_after_a_restart_oldest_first(path, load):
    mod = load(path)
    first, _ = queue_of(mod)  # written, never sent: the process died
    ids = [
        first.enqueue(to(mod, peer), text) for peer, text in [("1", "x"), ("2", "y"), ("1", "z")]
    ]
    again, chat = queue_of(mod)
    assert [e["id"] for e in again.pending()] == ids
    assert again.enqueue(to(mod, "3"), "new") > ids[-1]  # ids keep growing across restarts
    again.start()
    assert again.settle(5)
    assert chat.sent == [("1", "x"), ("2", "y"), ("1", "z"), ("3", "new")]


def test_a_torn_entry_is_moved_aside_with_one_line_and_temp_files_are_never_sent(
    path, load, capsys
):
    mod = load(path)
    first, _ = queue_of(mod)
    good = first.enqueue(to(mod), "good")
    (mod.DELIVERY_DIR / "00000009.json").write_text('{"id": "00000009", "chunks": ["to')
    (mod.DELIVERY_DIR / ".00000010.json.abc.tmp").write_text("{}")
    delivery, chat = queue_of(mod)
    out = capsys.readouterr().out
    assert out.count("cannot be read") == 1 and "00000009.json" in out
    assert (mod.DELIVERY_DIR / "failed" / "corrupt-00000009.json").exists()
    assert not list(mod.DELIVERY_DIR.glob(".*.tmp"))
    assert [e["id"] for e in delivery.pending()] == [good]
    delivery.start()
    assert delivery.settle(5) and chat.sent == [("42", "good")]


def test_a_telegram_update_is_on_disk_before_its_offset_confirms_it(
    path, load, fake_api, tg, monkeypatch, capsys
):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    inbound = state_of(Path(mod.WORKSPACE_DIR)) / "inbound"
    seen = []  # at each getUpdates: (offset, messages on disk, replies queued or sent)

    def watch(method, params):
        if method == "getUpdates" and params.get("offset"):
            on_disk = len(list(inbound.glob("*.json")))
            queued = len(list(mod.DELIVERY_DIR.glob("*.json"))) + len(tg.sent)
            seen.append((params["offset"], on_disk, queued))

    tg.watchers.append(watch)

    def chat():
        update = tg.push(tg.private_message("hello", user_id=42))
        tg.wait_for_sent(1)
        seen.append(update["update_id"])
        return "quit"

    code, _ = drive_repl(mod, [chat], monkeypatch, capsys)
    update_id = seen.pop()
    confirms = [(on_disk, queued) for offset, on_disk, queued in seen if offset > update_id]
    assert code == 0 and confirms and all(d or q for d, q in confirms)
    assert texts(tg.sent) == ["(fake) you said: hello"] and not list(inbound.glob("*.json"))


def test_a_message_received_just_before_a_crash_is_answered_once_after_the_restart(
    path, load, fake_api, tg, monkeypatch, capsys
):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    # The last run wrote the update to disk and died before the next getUpdates confirmed it:
    # it is in inbound/, and Telegram sends it again.
    update = tg.push(tg.private_message("are you there?", user_id=42))
    bot = mod.TelegramChannel(tg.token, tg.api_base)
    bot.account = tg.username
    mod.Inbox().keep(bot.to_inbound(telegram_update(update, bot)))
    screen = Screen(capsys)

    def later():
        tg.wait_for_sent(1)
        time.sleep(0.3)  # a second reply would have come by now
        screen.wait_for("replied")
        return "quit"

    code, out = drive_repl(mod, [later], monkeypatch, capsys)
    out = screen.text + out
    assert code == 0 and "1 message from before the last stop answered now" in out
    assert texts(tg.sent) == ["(fake) you said: are you there?"]


def telegram_update(update: dict, bot):
    import telegram

    return telegram.Update.de_json(update, telegram.Bot(bot.token))


def test_the_queue_commands(path, load, fake_api, tg, monkeypatch, capsys):
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    screen = Screen(capsys)

    def message_held():
        tg.push(tg.private_message("hello", user_id=42))
        screen.wait_for("trying again in")
        return "/queue"

    def sent():
        wait_for(lambda: not list(mod.DELIVERY_DIR.glob("*.json")), what="the entry sent")
        return "/queue"

    code, out = drive_repl(
        mod,
        [
            "/simulate-failure telegram 2",
            "/simulate-failure telegram 1",
            message_held,
            "/simulate-failure telegram 0",
            sent,
            "/failed",
            "/retry 7",
            "/retry all",
            "/retry",
            "/help",
        ],
        monkeypatch,
        capsys,
    )
    out = screen.text + out
    assert code == 0
    assert "Usage: /simulate-failure telegram|feishu RATE" in out
    assert "Sends to telegram now fail 100% of the time, as a transient error." in out
    wait = mod.retry_delay("00000001", 1)  # the same every run: the jitter comes from the id
    countdown = re.search(r"chunks sent 0/1, 1 failed attempt, next try in (\d+) s", out)
    assert countdown and wait - 2 <= int(countdown[1]) <= wait + 0.5  # counts down
    assert "a failure simulated by /simulate-failure" in out
    assert "Sends to telegram work again" in out and texts(tg.sent) == ["(fake) you said: hello"]
    assert "The delivery queue is empty" in out and "Nothing in failed/" in out
    assert "No failed reply has the id '7'" in out and "Usage: /retry ID, or /retry all" in out
    assert "Nothing in failed/ to queue again." in out
    for name in ("/queue", "/failed", "/retry", "/simulate-failure"):
        assert f"  {name} " in out


def test_retry_puts_a_failed_reply_back_in_the_queue(path, load, capsys):
    mod = load(path)
    delivery, chat = queue_of(mod)
    chat.errors = [mod.ChannelError("chat not found", "permanent")]
    entry_id = delivery.enqueue(to(mod), "hello")
    delivery.start()
    wait_for(lambda: (mod.DELIVERY_DIR / "failed" / f"{entry_id}.json").exists())
    assert delivery.retry("all") == [entry_id]
    assert delivery.settle(5) and chat.sent == [("42", "hello")]
    assert not list((mod.DELIVERY_DIR / "failed").glob("*.json"))


def test_a_server_error_is_retried_and_the_replies_keep_their_order(
    path, load, fake_api, tg, monkeypatch, capsys
):
    """s04 dropped a reply whose send failed; from s08 on it waits and goes out, in order."""
    mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))
    monkeypatch.setattr(mod, "RETRY_DELAYS", (0.2, 0.2, 0.2, 0.2))
    tg.fail(500, "Internal Server Error", method="sendMessage")

    def chat():
        tg.push(tg.private_message("first", user_id=42))
        tg.push(tg.private_message("second", user_id=42))
        tg.wait_for_sent(2)
        return "quit"

    code, out = drive_repl(mod, [chat], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in out
    assert texts(tg.sent) == ["(fake) you said: first", "(fake) you said: second"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork")
def test_no_message_is_lost_when_the_process_is_killed(path):
    if path != SECTIONS[-1]:
        pytest.skip("whole-process run: newest section only (benchmarks/delivery.py: 50 kills)")
    result = crash_test(9, kills=3, chats=3, seed=8, run_time=(0.15, 0.35), deadline=60)
    assert result["lost"] == 0, result["missing"]
    assert result["out_of_order"] == 0


def test_the_feishu_webhook_answers_200_only_once_the_event_is_on_disk(path, load):
    mod = load(path)
    inbox = mod.Inbox()
    channel = mod.FeishuChannel("cli_test_app", "secret", "verify-me", 0, "http://127.0.0.1:9")
    event = message_event("hello", "ou_ada", "verify-me", event_id="ev_1")
    published = []

    def full_disk(message):
        raise OSError(28, "No space left on device")

    channel.on_message = full_disk
    with pytest.raises(OSError):  # no answer at all: Feishu sends the event again
        channel.handle_event(event)

    def publish(message):  # what MessageBus.publish does first
        assert inbox.keep(message)
        published.append((message.text, list(inbox.folder.glob("*.json"))))

    channel.on_message = publish
    assert channel.handle_event(event) == (200, {})  # the next try is not taken for a repeat
    assert published[0][0] == "hello" and len(published[0][1]) == 1
    assert channel.handle_event(event) == (200, {}) and len(published) == 1  # a true repeat


def test_each_feishu_chunk_carries_its_own_uuid(path, load):
    mod = load(path)
    channel = mod.FeishuChannel("cli_test_app", "secret", "verify-me", 0, "http://127.0.0.1:9")
    channel.http, channel.token, channel.token_expires = object(), "t", float("inf")
    bodies = []
    channel.post = lambda path, body, **kwargs: bodies.append(body) or {"code": 0}
    channel.max_text = 12
    delivery = mod.Delivery({"feishu": channel}, mod.DELIVERY_DIR, Clock(1_000_000.0))
    delivery.load()
    key = json.loads(
        (
            mod.DELIVERY_DIR
            / f"{delivery.enqueue(to(mod, 'ou_ada', 'feishu'), 'one two three four')}.json"
        ).read_text()
    )["key"]
    delivery.start()
    assert delivery.settle(5)
    assert [b["uuid"] for b in bodies] == [f"{key}-{n}" for n in range(len(bodies))]
    assert len(bodies) >= 2 and all(len(b["uuid"]) <= 50 for b in bodies)  # Feishu's cap


def screen_of(mod, capsys) -> str:
    """What the terminal showed: printed lines and lines held for the next prompt."""
    held = "".join(line + "\n" for line in mod.held_lines)
    mod.held_lines.clear()
    return capsys.readouterr().out + held


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def entry_file(mod, entry_id: str, **fields) -> dict:
    entry = {"id": entry_id, "channel": "telegram", "account": "bot", "peer": "42",
             "sender": "42", "thread": None, "is_group": False, "reply_to": None,
             "chunks": ["hi"], "sent": 0, "attempts": 0, "next_attempt": 0.0,
             "last_error": "", "created": 1_000_000.0, "key": "k", **fields}
    write_json(mod.DELIVERY_DIR / f"{entry_id}.json", entry)
    return entry


def test_a_huge_retry_after_neither_kills_the_worker_nor_waits_forever(path, load, capsys):
    mod = load(path)
    assert mod.retry_delay("1", 1, 1e300) == mod.MAX_RETRY_AFTER  # Telegram's, Feishu's header
    assert 4 <= mod.retry_delay("1", 1, float("nan")) <= 6 and mod.retry_delay("1", 1, -9) <= 6
    entry_file(mod, "00000001", next_attempt=9e11)  # an entry file that waits 30,000 years
    clock = Clock(1_000_000.0)
    delivery, chat = queue_of(mod, clock=clock)
    assert delivery.pending()[0]["next_attempt"] <= clock.now + mod.MAX_RETRY_AFTER
    chat.errors = [mod.ChannelError("429", retry_after=1e300)]
    delivery.enqueue(to(mod, "7"), "first")
    delivery.start()
    wait_for(lambda: delivery.pending()[-1]["attempts"] == 1, what="the 429")
    delivery.enqueue(to(mod, "8"), "still sent")
    wait_for(lambda: ("8", "still sent") in chat.sent, what="the worker alive")
    assert delivery.thread.is_alive() and "Traceback" not in screen_of(mod, capsys)
    clock.now += mod.MAX_RETRY_AFTER * 1.2
    delivery.wake()
    assert delivery.settle(5) and ("7", "first") in chat.sent and ("42", "hi") in chat.sent


@pytest.mark.parametrize("bad", [{"next_attempt": "soon"}, {"attempts": "x"},
                                 {"next_attempt": float("nan")}, {"created": None},
                                 {"sent": True}, {"chunks": []}, {"peer": 42},
                                 {"id": "00000009"}, {"thread": 3}])
def test_an_entry_with_a_field_of_the_wrong_type_is_moved_aside(path, load, capsys, bad):
    mod = load(path)
    entry_file(mod, "00000001", **bad)
    entry_file(mod, "00000002", peer="7")
    delivery, chat = queue_of(mod)
    shown = screen_of(mod, capsys)
    assert shown.count("cannot be read") == 1 and "00000001.json" in shown
    assert (mod.DELIVERY_DIR / "failed" / "corrupt-00000001.json").exists()
    assert [e["id"] for e in delivery.pending()] == ["00000002"]
    delivery.start()
    assert delivery.settle(5) and chat.sent == [("7", "hi")] and delivery.thread.is_alive()


def test_retry_and_the_worker_never_leave_the_queue_folder(path, load, capsys):
    mod = load(path)
    victim = mod.DELIVERY_DIR.parent / "victim.json"
    write_json(victim, {"precious": True})
    failed = mod.DELIVERY_DIR / "failed"
    write_json(failed / "00000005.json", {**entry_file(mod, "x"), "id": "../victim"})
    (mod.DELIVERY_DIR / "x.json").unlink()
    write_json(failed / "00000006.json", {**entry_file(mod, "x"), "id": str(victim)[:-5]})
    (mod.DELIVERY_DIR / "x.json").unlink()
    write_json(failed / "\u00b2.json", {})  # "²".isdigit() is True; int("²") is an error
    entry_file(mod, "00000007", id="../victim")
    delivery, chat = queue_of(mod)  # no crash at start-up
    assert delivery.pending() == [] and (failed / "corrupt-00000007.json").exists()
    assert delivery.retry("5") == [] and delivery.retry("6") == [] and delivery.retry("all") == []
    assert delivery.retry("\u00b2") == [] and delivery.retry("../victim") == []
    delivery.start()
    assert delivery.settle(5) and chat.sent == []
    assert json.loads(victim.read_text()) == {"precious": True}
    assert (failed / "00000005.json").exists() and (failed / "00000006.json").exists()


def bus_of(mod, *channels):
    client = mod.make_client()
    bus = mod.MessageBus(client, mod.Router(mod.GATEWAY_FILE), mod.ContextGuard(client),
                         {"terminal": mod.TerminalChannel(), **dict(channels)},
                         mod.Pairing({"telegram": {"42"}}), mod.ApprovalQueue())
    bus.inbox = mod.Inbox()
    return bus


def inbound(mod, text: str, channel: str = "telegram", update_id: int = 1):
    return mod.InboundMessage(channel=channel, account="bot", peer="42", sender="42", text=text,
                              raw={"update_id": update_id})


def test_hostile_inbound_files_are_moved_aside_and_an_unknown_channel_kills_no_worker(
    path, load, capsys, monkeypatch
):
    mod = load(path)
    inbox = mod.Inbox()
    good = {name: getattr(inbound(mod, "hello"), name) for name in mod.INBOUND_FIELDS}
    for number, bad in enumerate([{"channel": "bogus"}, {"text": None}, {"raw": []},
                                  {"received": "x"}, {"is_group": "no"}, {"thread": 5}]):
        write_json(inbox.folder / f"bad{number}.json", {"received": 1.0, **good, **bad})
    write_json(inbox.folder / "good.json", {"received": 2.0, **good})
    waiting = inbox.pending()
    shown = screen_of(mod, capsys)
    assert [m.text for m in waiting] == ["hello"] and shown.count("cannot be read") == 6
    assert sorted(p.name for p in inbox.folder.glob("*.json")) == ["good.json"]
    # A message of a channel the bus does not have: its error handler must not raise again.
    bus, handled = bus_of(mod), []

    def handle(message, *job):  # s10 passes the turn's job too
        if message.text == "fails":
            raise RuntimeError("a bug")
        handled.append(message.text)

    monkeypatch.setattr(bus, "handle", handle)
    for number in range(mod.AGENT_WORKERS + 1):
        bus.publish(inbound(mod, "fails", update_id=10 + number))
        assert bus.wait_until_idle(5)
    bus.publish(inbound(mod, "answered", update_id=99))
    assert bus.wait_until_idle(5) and handled == ["answered"]


def test_a_message_whose_turn_raised_keeps_its_file(path, load, capsys, monkeypatch):
    mod = load(path)
    chat = Chat()
    chat.name, chat.failed = "telegram", lambda message, exc: None
    bus = bus_of(mod, ("telegram", chat))

    def handle(message, *job):  # s10 passes the turn's job too
        if message.text == "disk full":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(bus, "handle", handle)
    bus.publish(inbound(mod, "disk full"))
    bus.publish(inbound(mod, "fine", update_id=2))
    assert bus.wait_until_idle(5)
    kept = list(bus.inbox.folder.glob("*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["text"] == "disk full"
    assert f"kept in {kept[0]}" in screen_of(mod, capsys)
    assert [m.text for m in bus.inbox.pending()] == ["disk full"]  # replayed at the next start


def test_queue_and_failed_show_what_files_hold_escaped_and_never_crash(path, load, capsys):
    mod = load(path)
    entry_file(mod, "00000001", next_attempt=time.time() + 100, attempts=1,
               last_error="\x1b[31mred\x1b[0m", peer="\u202e42")  # and no "wait" key
    failed = mod.DELIVERY_DIR / "failed"
    write_json(failed / "00000002.json", {"id": "\x1b]0;owned\x07", "last_error": "\x1b[2J",
                                          "peer": "\x1b[1m", "channel": "telegram"})
    write_json(failed / "00000003.json", ["not", "an", "entry"])
    write_json(failed / "00000004.json", {"peer": None})
    delivery, _ = queue_of(mod, clock=time.time)
    repl = type("Repl", (), {"bus": type("Bus", (), {"delivery": delivery})})()
    mod.show_queue(repl, "")
    mod.show_failed(repl, "")
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\u202e" not in shown and "\\x1b[31mred" in shown
    assert re.search(r"next try in (99|100) s", shown) and "3 in failed/" in shown


def test_a_simulated_permanent_failure_goes_to_failed_and_retry_all_sends_it(path, load):
    mod = load(path)
    delivery, chat = queue_of(mod)
    delivery.simulate("telegram", 1.0, "permanent")
    entry_id = delivery.enqueue(to(mod), "hello")
    delivery.start()
    wait_for(lambda: (mod.DELIVERY_DIR / "failed" / f"{entry_id}.json").exists())
    delivery.simulate("telegram", 0)
    assert delivery.retry("all") == [entry_id] and delivery.retry("all") == []
    assert delivery.settle(5) and chat.sent == [("42", "hello")]
