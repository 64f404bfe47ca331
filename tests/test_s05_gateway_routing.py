"""s05: the gateway and the binding table. A real `websockets` client talks to
the section's gateway while its REPL runs in-process; routing is tested both
through the protocol and on the Router itself; the chat page runs in a real
headless Chromium."""

import json
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from browser import Browser, browser_required, find_chromium
from fake_anthropic import last_user_text, reply, tool_use
from fake_telegram import FakeTelegram
from harness import (
    Screen,
    assert_valid_history,
    drive_repl,
    main_store,
    section_files,
    section_id,
    sections_from,
    state_of,
    telegram_env,
    wait_for,
)

SECTIONS = sections_from("s05")


@pytest.fixture(params=SECTIONS, ids=section_id)
def path(request):
    return request.param


class Gateway(Screen):
    """The running section's gateway, as its banner announces it."""

    def __init__(self, capsys):
        super().__init__(capsys)
        banner = self.wait_for("Type a message")
        m = re.search(
            r"Gateway: ws://127\.0\.0\.1:(\d+) · chat page (http://\S+/)#token=(\S+)", banner
        )
        assert m, banner
        self.port, self.page, self.token = int(m.group(1)), m.group(2), m.group(3)

    def client(self, token: str | None = "", origin: str | None = None) -> "Client":
        """A connected client; token "" means the right one, None means do not send connect."""
        # __enter__ opens it, as `with connect(...)` would: the client is closed when the test ends
        client = Client(
            connect(f"ws://127.0.0.1:{self.port}/", origin=origin, open_timeout=5).__enter__()
        )
        if token is not None:
            answer = client.call("connect", {"token": token or self.token})
            assert "result" in answer, answer
        return client


class Client:
    def __init__(self, ws):
        self.ws, self.notifications, self.next_id = ws, [], 100

    def send_raw(self, frame) -> None:
        self.ws.send(frame)

    def receive(self, timeout: float = 10) -> dict:
        return json.loads(self.ws.recv(timeout=timeout))

    def call(self, method: str, params: dict | None = None, timeout: float = 10) -> dict:
        """One request; notifications that arrive before its answer are kept in order."""
        self.next_id += 1
        request = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            request["params"] = params
        self.ws.send(json.dumps(request))
        while True:
            message = self.receive(timeout)
            if message.get("id") == self.next_id:
                return message
            self.notifications.append(message)

    def close(self) -> None:
        self.ws.close()


def with_gateway(mod, monkeypatch, capsys, body):
    """Run the section's REPL; at its first prompt, run body(gateway), then quit.
    Returns (exit code, everything printed, what body returned)."""
    outcome = {}

    def at_the_prompt():
        gateway = Gateway(capsys)
        try:
            outcome["value"] = body(gateway)
        except BaseException as exc:  # re-raised below, after the REPL has stopped cleanly
            outcome["error"] = exc
        outcome["text"] = gateway.text
        return "quit"

    code, out = drive_repl(mod, [at_the_prompt], monkeypatch, capsys)
    if "error" in outcome:
        raise outcome["error"]
    return code, outcome["text"] + out, outcome.get("value")


def gateway_config(workspace) -> dict:
    return json.loads((state_of(workspace) / "gateway.json").read_text())


def write_config(workspace, **changes) -> None:
    """gateway.json with the defaults the section writes, plus changes."""
    config = {
        "version": 1,
        "default_agent": "main",
        "dm_scope": "per-channel-peer",
        "agents": [
            {
                "id": "main",
                "name": "Claw",
                "model": None,
                "tools": ["bash", "read_file", "write_file", "edit_file", "list_dir"],
            }
        ],
        "bindings": [],
        "identity_links": {},
    }
    config.update(changes)
    state_of(workspace).mkdir(exist_ok=True)
    (state_of(workspace) / "gateway.json").write_text(json.dumps(config, indent=2))


# --- The front door: token, origin ---------------------------------------------------------------


def test_chat_send_streams_deltas_then_answers_with_the_whole_text(
    path, load, fake_api, monkeypatch, capsys, workspace
):
    fake_api.script(
        reply(
            "Streaming works, piece by piece.", chunks=["Streaming ", "works, ", "piece by piece."]
        )
    )

    def body(gw):
        client = gw.client()
        answer = client.call("chat.send", {"text": "hello gateway", "peer_id": "web-1"})
        return answer, client.notifications

    code, out, (answer, notifications) = with_gateway(load(path), monkeypatch, capsys, body)
    assert code == 0
    result = answer["result"]
    assert result == {
        "text": "Streaming works, piece by piece.",
        "agent_id": "main",
        "session_key": "agent:main:webchat:direct:web-1",
        "tier": "default",
    }
    deltas = [n["params"]["text"] for n in notifications if n["method"] == "chat.delta"]
    assert deltas[:3] == ["Streaming ", "works, ", "piece by piece."]
    assert all(n["params"]["request_id"] == answer["id"] for n in notifications)
    assert last_user_text(fake_api.requests[0]) == "hello gateway"


def test_no_token_or_a_wrong_one_closes_the_connection_and_reaches_no_agent(
    path, load, fake_api, monkeypatch, capsys
):
    def body(gw):
        seen = []
        for first in (
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "chat.send",
                "params": {"text": "hi", "peer_id": "x"},
            },
            {"jsonrpc": "2.0", "id": 1, "method": "connect", "params": {"token": "guess"}},
            {"jsonrpc": "2.0", "id": 1, "method": "connect", "params": {}},
            "not json at all",
        ):
            client = gw.client(token=None)
            client.send_raw(first if isinstance(first, str) else json.dumps(first))
            error = client.receive()["error"]
            with pytest.raises(ConnectionClosed) as closed:
                client.send_raw(
                    json.dumps(
                        {
                            "jsonrpc": "2.0",
                            "id": 2,
                            "method": "chat.send",
                            "params": {"text": "sneak in", "peer_id": "x"},
                        }
                    )
                )
                client.receive(timeout=5)
            seen.append((error["code"], closed.value.rcvd.code))
        return seen

    code, out, seen = with_gateway(load(path), monkeypatch, capsys, body)
    assert seen == [(-32001, 1008), (-32001, 1008), (-32001, 1008), (-32700, 1008)]
    assert fake_api.requests == []  # nothing from an unauthenticated connection reached the model
    assert "refused a connection" in out


def test_a_foreign_browser_origin_is_refused(path, load, fake_api, monkeypatch, capsys):
    def body(gw):
        with pytest.raises(InvalidStatus) as refused:
            gw.client(origin="http://evil.example")
        own = gw.client(origin=f"http://127.0.0.1:{gw.port}")
        listed = gw.client(origin="https://chat.example.com")
        return (
            refused.value.response.status_code,
            own.call("status")["result"]["connections"],
            listed,
        )

    code, out, (status, connections, listed) = with_gateway(
        load(path, GATEWAY_ALLOWED_ORIGINS="https://chat.example.com"), monkeypatch, capsys, body
    )
    assert status == 403 and connections >= 1


def test_the_token_is_generated_once_owner_only_and_GATEWAY_TOKEN_wins(
    path, load, fake_api, monkeypatch, capsys, workspace
):
    first = with_gateway(load(path), monkeypatch, capsys, lambda gw: gw.token)[2]
    token_file = state_of(workspace) / "gateway-token"
    assert token_file.read_text().strip() == first and len(first) >= 32
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert (
        with_gateway(load(path), monkeypatch, capsys, lambda gw: gw.token)[2] == first
    )  # kept across restarts
    chosen = with_gateway(
        load(path, GATEWAY_TOKEN="my-own-token-123456"), monkeypatch, capsys, lambda gw: gw.token
    )
    assert chosen[2] == "my-own-token-123456"


def test_a_port_in_use_is_reported_and_the_repl_runs_without_the_gateway(
    path, load, fake_api, monkeypatch, capsys
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = drive_repl(
            load(path, GATEWAY_PORT=str(port)), ["/gateway", "hello"], monkeypatch, capsys
        )
    assert code == 0
    assert (
        f"webchat off (cannot listen on 127.0.0.1:{port}" in out
        and "set GATEWAY_PORT to a free port" in out
    )
    assert "The gateway is off" in out and "(fake) you said: hello" in out


# --- Bad frames ---------------------------------------------------------------------------------

BAD_FRAMES = [
    ("not json", "{oops", -32700),
    ("empty batch", "[]", -32600),
    ("a batch", json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "status"}]), -32600),
    ("empty object", "{}", -32600),
    ("null", "null", -32600),
    ("a number", "42", -32600),
    ("no jsonrpc", json.dumps({"id": 1, "method": "status"}), -32600),
    ("method not text", json.dumps({"jsonrpc": "2.0", "id": 1, "method": 7}), -32600),
    ("a notification", json.dumps({"jsonrpc": "2.0", "method": "status"}), -32600),
    ("id is an object", json.dumps({"jsonrpc": "2.0", "id": {}, "method": "status"}), -32600),
    ("unknown method", json.dumps({"jsonrpc": "2.0", "id": 1, "method": "rm.rf"}), -32601),
    (
        "params a list",
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "status", "params": [1]}),
        -32602,
    ),
    (
        "text a number",
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "chat.send",
                "params": {"text": 5, "peer_id": "x"},
            }
        ),
        -32602,
    ),
    (
        "no peer",
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "chat.send", "params": {"text": "hi"}}),
        -32602,
    ),
    (
        "hostile peer",
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "chat.send",
                "params": {"text": "hi", "peer_id": "../../etc"},
            }
        ),
        -32602,
    ),
    (
        "peer forging a key",
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "chat.send",
                "params": {"text": "hi", "peer_id": "x:direct:42"},
            }
        ),
        -32602,
    ),
    (
        "unknown agent",
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "chat.send",
                "params": {"text": "hi", "peer_id": "x", "agent_id": "root"},
            }
        ),
        -32602,
    ),
    (
        "unknown session",
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "chat.history",
                "params": {"session_key": "agent:main:nothing"},
            }
        ),
        -32004,
    ),
    ("deeply nested", "[" * 50_000 + "]" * 50_000, -32700),
    (
        "nested in params",
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "status"})[:-1]
        + ', "params": {"x": '
        + "[" * 50_000
        + "]" * 50_000
        + "}}",
        -32700,
    ),
]


def test_every_bad_frame_gets_its_error_and_the_server_keeps_serving(
    path, load, fake_api, monkeypatch, capsys
):
    def body(gw):
        bystander = gw.client()
        bad = gw.client()
        codes = {}
        for name, frame, _ in BAD_FRAMES:
            bad.send_raw(frame)
            codes[name] = bad.receive()["error"]["code"]
        bad.send_raw(b"\x00binary")
        codes["binary"] = bad.receive()["error"]["code"]
        still = bad.call("status")["result"]["connections"]
        bad.send_raw("x" * 300_000)  # over the frame cap
        with pytest.raises(ConnectionClosed) as closed:
            bad.receive()
        return (
            codes,
            still,
            closed.value.rcvd.code,
            bystander.call("chat.send", {"text": "still there?", "peer_id": "b"}),
        )

    code, out, (codes, still, close_code, answer) = with_gateway(
        load(path), monkeypatch, capsys, body
    )
    assert codes == {name: expected for name, _, expected in BAD_FRAMES} | {"binary": -32600}
    assert still == 2 and close_code == 1009  # message too big
    assert answer["result"]["text"] == "(fake) you said: still there?"
    assert code == 0 and "Traceback" not in out


def test_a_client_that_stops_reading_holds_up_nobody(path, load, fake_api, monkeypatch, capsys):
    def body(gw):
        stuck = gw.client()
        for n in range(40):  # asks and asks, never reads an answer
            stuck.send_raw(json.dumps({"jsonrpc": "2.0", "id": n, "method": "sessions.list"}))
        other = gw.client()
        started = time.monotonic()
        answer = other.call("status")
        return time.monotonic() - started, answer

    code, out, (elapsed, answer) = with_gateway(load(path), monkeypatch, capsys, body)
    assert "result" in answer and elapsed < 5  # the stuck client would hold it forever


# --- One turn per session; sessions in parallel --------------------------------------------------


def test_two_sends_to_one_session_run_one_after_the_other(
    path, load, fake_api, monkeypatch, capsys, workspace
):
    gate = threading.Event()
    fake_api.script(reply("first answer", gate=gate))

    def body(gw):
        a, b = gw.client(), gw.client()
        results = {}
        first = threading.Thread(
            target=lambda: results.update(a=a.call("chat.send", {"text": "one", "peer_id": "p"}))
        )
        first.start()
        wait_for(lambda: fake_api.requests, what="the first call")
        second = threading.Thread(
            target=lambda: results.update(b=b.call("chat.send", {"text": "two", "peer_id": "p"}))
        )
        second.start()
        time.sleep(0.3)
        calls_while_first_runs = len(fake_api.requests)
        gate.set()
        first.join(10), second.join(10)
        history = a.call("chat.history", {"session_key": "agent:main:webchat:direct:p"})["result"][
            "messages"
        ]
        return calls_while_first_runs, results, history

    code, out, (calls, results, history) = with_gateway(load(path), monkeypatch, capsys, body)
    assert calls == 1  # "two" waited in line
    assert_valid_history(history)
    assert [
        m["content"] if isinstance(m["content"], str) else m["content"][0]["text"] for m in history
    ] == ["one", "first answer", "two", "(fake) you said: two"]
    assert results["a"]["result"]["text"] == "first answer"
    assert results["b"]["result"]["text"] == "(fake) you said: two"
    sent = fake_api.requests[1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]


def test_two_sessions_run_at_the_same_time(path, load, fake_api, monkeypatch, capsys):
    gate = threading.Event()
    fake_api.script(reply("slow answer", gate=gate))

    def body(gw):
        a, b = gw.client(), gw.client()
        slow = {}
        thread = threading.Thread(
            target=lambda: slow.update(a=a.call("chat.send", {"text": "slow", "peer_id": "p1"}))
        )
        thread.start()
        wait_for(lambda: fake_api.requests, what="the slow call")
        fast = b.call(
            "chat.send", {"text": "fast", "peer_id": "p2"}, timeout=5
        )  # while p1 is still waiting
        gate.set()
        thread.join(10)
        return fast, slow["a"]

    code, out, (fast, slow) = with_gateway(load(path), monkeypatch, capsys, body)
    assert (
        fast["result"]["text"] == "(fake) you said: fast"
        and slow["result"]["text"] == "slow answer"
    )


# --- Routing --------------------------------------------------------------------------------------


def message(mod, channel="telegram", sender="42", account="bot", group=None, thread=None):
    return mod.InboundMessage(
        channel=channel,
        account=account,
        peer=group or sender,
        sender=sender,
        text="x",
        is_group=group is not None,
        thread=thread,
    )


def test_every_tier_and_the_most_specific_wins(path, load, workspace):
    write_config(
        workspace,
        agents=[
            {"id": a, "name": a, "model": None, "tools": []}
            for a in ("main", "by-peer", "by-group", "by-account", "by-channel", "first")
        ],
        bindings=[
            {"agent": "by-channel", "match": {"channel": "telegram"}},
            {"agent": "first", "match": {"channel": "feishu"}},
            {"agent": "by-channel", "match": {"channel": "feishu"}},
            {"agent": "by-account", "match": {"channel": "telegram", "account": "bot2"}},
            {"agent": "by-group", "match": {"channel": "telegram", "group": "-100"}},
            {"agent": "by-peer", "match": {"channel": "telegram", "peer": "42"}},
        ],
    )
    mod = load(path)
    router = mod.Router(mod.GATEWAY_FILE)
    cases = [
        (message(mod), "by-peer", "peer"),
        (message(mod, sender="7", group="-100"), "by-group", "group"),
        (
            message(mod, sender="42", group="-100"),
            "by-group",
            "group",
        ),  # a peer binding is for direct chats
        (message(mod, sender="7", account="bot2"), "by-account", "account"),
        (message(mod, sender="7"), "by-channel", "channel"),
        (
            message(mod, channel="feishu", sender="ou_1"),
            "first",
            "channel",
        ),  # a tie: the first listed wins
        (message(mod, channel="terminal", sender="local"), "main", "default"),
    ]
    for msg, agent, tier in cases:
        route = router.resolve(msg)
        assert (route.agent.id, route.tier) == (agent, tier), msg
    assert router.resolve(message(mod), agent_id="first").tier == "explicit"


def test_dm_scopes_and_group_keys(path, load, workspace):
    mod = load(path)
    keys = {}
    for scope in ("main", "per-peer", "per-channel-peer"):
        write_config(workspace, dm_scope=scope)
        router = mod.Router(mod.GATEWAY_FILE)
        keys[scope] = [
            router.resolve(m).session_key
            for m in (
                message(mod, sender="42"),
                message(mod, channel="feishu", sender="42"),
                message(mod, sender="42", group="-100", thread="7"),
            )
        ]
    assert keys["main"] == [
        "agent:main:main",
        "agent:main:main",
        "agent:main:telegram:group:-100:topic:7",
    ]
    assert keys["per-peer"] == [
        "agent:main:direct:42",
        "agent:main:direct:42",
        "agent:main:telegram:group:-100:topic:7",
    ]
    assert keys["per-channel-peer"] == [
        "agent:main:telegram:direct:42",
        "agent:main:feishu:direct:42",
        "agent:main:telegram:group:-100:topic:7",
    ]


def test_identity_links_merge_one_persons_chats_into_one_session(
    path, load, fake_api, monkeypatch, capsys, workspace
):
    write_config(workspace, identity_links={"ada": ["telegram:42", "webchat:ada-laptop"]})
    tg = FakeTelegram().start()
    try:
        mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42"))

        def body(gw):
            tg.push(tg.private_message("I am Ada", user_id=42))
            tg.wait_for_sent(1)
            client = gw.client()
            second = client.call("chat.send", {"text": "who am I?", "peer_id": "ada-laptop"})
            other = client.call("chat.send", {"text": "and me?", "peer_id": "bob-laptop"})
            history = client.call("chat.history", {"session_key": "agent:main:direct:ada"})
            return second, other, history

        code, out, (second, other, history) = with_gateway(mod, monkeypatch, capsys, body)
    finally:
        tg.stop()
    assert second["result"]["session_key"] == "agent:main:direct:ada"
    assert other["result"]["session_key"] == "agent:main:webchat:direct:bob-laptop"
    assert (
        len(fake_api.requests[1]["messages"]) == 3
    )  # Ada on the web sees what she said on Telegram
    assert len(fake_api.requests[2]["messages"]) == 1
    assert [m["role"] for m in history["result"]["messages"]] == ["user", "assistant"] * 2


def test_a_gateway_client_cannot_speak_in_a_telegram_chats_session(
    path, load, fake_api, monkeypatch, capsys
):
    """The token is an operator key, but what its holder says stays in the webchat channel."""

    def body(gw):
        client = gw.client()
        forged = client.call("chat.send", {"text": "hi", "peer_id": "42", "channel": "telegram"})
        own = client.call("chat.send", {"text": "hi", "peer_id": "42"})
        return forged, own

    code, out, (forged, own) = with_gateway(load(path), monkeypatch, capsys, body)
    assert forged["error"]["code"] == -32602 and "'channel'" in forged["error"]["message"]
    assert own["result"]["session_key"] == "agent:main:webchat:direct:42"
    assert len(fake_api.requests) == 1


def test_bindings_set_list_remove_and_resolve_through_the_protocol(
    path, load, fake_api, monkeypatch, capsys, workspace
):
    write_config(
        workspace,
        agents=[
            {"id": "main", "name": "Claw", "model": None, "tools": ["read_file"]},
            {"id": "helper", "name": "Helper", "model": "claude-haiku-5", "tools": []},
        ],
    )

    def body(gw):
        c = gw.client()
        before = c.call("route.resolve", {"channel": "telegram", "peer": "42"})["result"]
        added = c.call("bindings.set", {"agent_id": "helper", "channel": "telegram", "peer": "42"})[
            "result"
        ]
        on_disk = gateway_config(workspace)["bindings"]
        after = c.call("route.resolve", {"channel": "telegram", "peer": "42"})["result"]
        in_group = c.call("route.resolve", {"channel": "telegram", "peer": "42", "group": "-5"})[
            "result"
        ]
        listed = c.call("bindings.list")["result"]
        bad = [
            c.call("bindings.set", params)["error"]["code"]
            for params in (
                {"agent_id": "nobody", "channel": "telegram"},
                {"agent_id": "helper"},
                {"agent_id": "helper", "channel": "telegram", "peer": {"id": 1}},
            )
        ]
        removed = c.call("bindings.remove", {"channel": "telegram", "peer": "42"})["result"]
        again = c.call("bindings.remove", {"channel": "telegram", "peer": "42"})["result"]
        agents = c.call("agents.list")["result"]
        return before, added, on_disk, after, in_group, listed, bad, removed, again, agents

    code, out, (before, added, on_disk, after, in_group, listed, bad, removed, again, agents) = (
        with_gateway(load(path), monkeypatch, capsys, body)
    )
    assert (before["agent_id"], before["tier"]) == ("main", "default")
    assert added["binding"] == {
        "agent": "helper",
        "match": {"channel": "telegram", "peer": "42"},
        "tier": "peer",
    }
    assert on_disk == [{"agent": "helper", "match": {"channel": "telegram", "peer": "42"}}]
    assert (after["agent_id"], after["tier"], after["session_key"]) == (
        "helper",
        "peer",
        "agent:helper:telegram:direct:42",
    )
    assert (
        in_group["agent_id"] == "main" and in_group["session_key"] == "agent:main:telegram:group:-5"
    )
    assert listed["bindings"][0]["tier"] == "peer"
    assert bad == [-32602, -32602, -32602]
    assert removed == {"removed": True} and again == {"removed": False}
    assert gateway_config(workspace)["bindings"] == []
    assert [a["model"] for a in agents["agents"]] == ["claude-sonnet-5-5", "claude-haiku-5"]


def test_an_agent_gets_its_own_model_tools_and_session_folder(
    path, load, fake_api, monkeypatch, capsys, workspace
):
    write_config(
        workspace,
        agents=[
            {"id": "main", "name": "Claw", "model": None, "tools": ["bash", "read_file"]},
            {"id": "reader", "name": "Reader", "model": "claude-haiku-5", "tools": ["read_file"]},
        ],
        bindings=[{"agent": "reader", "match": {"channel": "webchat"}}],
    )
    fake_api.script(
        reply(tools=[tool_use("bash", {"command": "touch owned.txt"}, "toolu_01")]),
        reply("I have no shell."),
    )

    def body(gw):
        return gw.client().call("chat.send", {"text": "make a file", "peer_id": "w"})

    code, out, answer = with_gateway(load(path), monkeypatch, capsys, body)
    assert answer["result"]["agent_id"] == "reader" and answer["result"]["tier"] == "channel"
    request = fake_api.requests[0]
    assert request["model"] == "claude-haiku-5" and [t["name"] for t in request["tools"]] == [
        "read_file"
    ]
    result = fake_api.requests[1]["messages"][-1]["content"][0]
    assert (
        result["is_error"] and "unknown tool 'bash'" in result["content"]
    )  # asked anyway: refused
    assert not (workspace / "owned.txt").exists()
    assert list((state_of(workspace) / "sessions" / "reader").glob("*.jsonl"))


def test_an_agent_without_tools_sends_no_tools_field(
    path, load, fake_api, monkeypatch, capsys, workspace
):
    write_config(workspace, agents=[{"id": "main", "name": "Claw", "model": None, "tools": []}])
    code, out = drive_repl(load(path), ["hi"], monkeypatch, capsys)
    assert "tools" not in fake_api.requests[0] and "(fake) you said: hi" in out


def test_telegram_messages_route_through_the_binding_table(
    path, load, fake_api, monkeypatch, capsys, workspace
):
    write_config(
        workspace,
        agents=[
            {"id": "main", "name": "Claw", "model": None, "tools": []},
            {"id": "support", "name": "Support", "model": None, "tools": []},
        ],
        bindings=[{"agent": "support", "match": {"channel": "telegram", "peer": "42"}}],
    )
    tg = FakeTelegram().start()
    try:
        mod = load(path, **telegram_env(tg, TELEGRAM_ALLOW_FROM="42,43"))

        def chat():
            tg.push(tg.private_message("to support", user_id=42))
            tg.push(tg.private_message("to main", user_id=43))
            tg.wait_for_sent(2)
            return "/sessions"

        code, out = drive_repl(mod, [chat], monkeypatch, capsys)
    finally:
        tg.stop()
    assert "agent:support:telegram:direct:42" in out and "agent:main:telegram:direct:43" in out
    assert "support replied" in out and "peer route)" in out


# --- gateway.json --------------------------------------------------------------------------------


def test_the_defaults_are_written_once_and_a_broken_file_is_a_sentence_not_a_traceback(
    path, load, fake_api, monkeypatch, capsys, workspace
):
    mod = load(path)
    code, out = drive_repl(mod, ["/agents", "/bindings"], monkeypatch, capsys)
    config = gateway_config(workspace)
    assert config["default_agent"] == "main" and config["dm_scope"] == "per-channel-peer"
    assert "main (default): Claw" in out and "No bindings" in out
    (state_of(workspace) / "gateway.json").write_text(
        '{\n  "agents": [\n    {"id": "main",}\n  ]\n}\n'
    )
    assert load(path).main() == 2
    err = capsys.readouterr().err
    assert "gateway.json: line 3: not valid JSON" in err and "delete the file" in err
    for broken, field in (
        ({"agents": []}, "agents"),
        ({"dm_scope": "everyone"}, "dm_scope"),
        ({"agents": [{"id": "../../x", "name": "x", "model": None, "tools": []}]}, "agents[0].id"),
        ({"bindings": [{"agent": "ghost", "match": {"channel": "telegram"}}]}, "bindings[0].agent"),
        ({"identity_links": {"ada": "telegram:42"}}, "identity_links"),
    ):
        write_config(workspace, **broken)
        assert load(path).main() == 2
        assert f"gateway.json: {field}:" in capsys.readouterr().err


# --- The REPL ------------------------------------------------------------------------------------


def test_route_and_gateway_commands(path, load, fake_api, monkeypatch, capsys, workspace):
    write_config(
        workspace,
        agents=[
            {"id": "main", "name": "Claw", "model": None, "tools": []},
            {"id": "team", "name": "Team", "model": None, "tools": []},
        ],
        bindings=[{"agent": "team", "match": {"channel": "telegram", "group": "-100"}}],
    )
    code, out = drive_repl(
        load(path),
        ["/route telegram 42", "/route telegram 42 - -100", "/route", "/bindings", "/gateway"],
        monkeypatch,
        capsys,
    )
    assert "agent main (default tier), session agent:main:telegram:direct:42" in out
    assert "agent team (group tier), session agent:team:telegram:group:-100" in out
    assert "Usage: /route" in out and "group    channel=telegram group=-100 -> team" in out
    assert re.search(
        r"token from .*gateway-token; the chat page: http://127\.0\.0\.1:\d+/#token=", out
    )


# --- The chat page, in a real browser -------------------------------------------------------------

STATUS = "document.getElementById('status').textContent"
CONNECTED = f"{STATUS}.startsWith('connected')"
RETRY_SHOWN = "!document.getElementById('retry').hidden"
LOG_LINES = "[...document.querySelectorAll('#log > *')].map(e => [e.className, e.textContent])"
# Run before the page's own script: window.sockets counts the WebSockets the page opens.
COUNT_SOCKETS = """(() => {
  const RealSocket = WebSocket;
  window.sockets = 0;
  window.WebSocket = function (...args) { window.sockets++; return new RealSocket(...args); };
})();"""


def chromium_or_skip() -> None:
    if find_chromium() is None and not browser_required():
        pytest.skip("no chromium here (.ci/run installs it)")


def send_from_page(browser, text: str) -> None:
    browser.evaluate(
        f"document.getElementById('text').value = {json.dumps(text)};"
        "document.getElementById('form').requestSubmit(); true"
    )


def test_the_chat_page_sends_and_shows_the_reply_as_it_streams(
    path, load, fake_api, monkeypatch, capsys
):
    chromium_or_skip()
    gate = threading.Event()
    fake_api.script(
        reply(
            "Hello from the page's agent.", chunks=["Hello ", "from the page's agent."], gate=gate
        )
    )

    def body(gw):
        with Browser() as browser:
            browser.open(f"{gw.page}#token={gw.token}")
            browser.wait_for(CONNECTED)
            send_from_page(browser, "hi from chromium")
            half = browser.wait_for(
                "document.querySelector('.agent') && document.querySelector('.agent').textContent"
            )
            done_early = browser.evaluate("document.querySelector('.agent').dataset.done || ''")
            gate.set()
            browser.wait_for("document.querySelector('.agent').dataset.done === 'yes'")
            return half, done_early, browser.evaluate("document.getElementById('log').innerText")

    code, out, (half, done_early, page) = with_gateway(load(path), monkeypatch, capsys, body)
    assert half == "Hello " and done_early == ""  # the first piece showed while the rest was coming
    assert "hi from chromium" in page and "Hello from the page's agent." in page
    assert last_user_text(fake_api.requests[0]) == "hi from chromium"


def test_the_chat_page_says_why_it_cannot_connect(path, load, fake_api, monkeypatch, capsys):
    chromium_or_skip()

    def body(gw):
        hint = f"on /gateway in its terminal: {gw.page}#token=…"
        with Browser() as browser:
            browser.before_every_page(COUNT_SOCKETS)
            browser.open(gw.page)
            no_token = browser.wait_for(f"{STATUS}.includes('no token') && {STATUS}")
            sockets = browser.evaluate("window.sockets")
            browser.open(f"{gw.page}#token=not-the-token")  # a new #fragment: the page reloads
            wrong = browser.wait_for(f"{STATUS}.includes('wrong token') && {STATUS}")
            retry = browser.evaluate(RETRY_SHOWN)
            browser.open(f"{gw.page}#token={gw.token}")
            browser.wait_for(CONNECTED)
            return hint, no_token, sockets, wrong, retry

    code, out, (hint, no_token, sockets, wrong, retry) = with_gateway(
        load(path), monkeypatch, capsys, body
    )
    assert hint in no_token and sockets == 0  # not even tried
    assert "unauthorized (wrong token): the first request must be connect" in wrong
    assert hint in wrong and not retry  # the same token would be refused again
    assert "refused a connection" in out


def test_the_chat_page_streams_replies_in_their_own_bubbles_as_text_and_restores_them(
    path, load, fake_api, monkeypatch, capsys
):
    chromium_or_skip()
    gate = threading.Event()
    markup = '<img src=x onerror="window.pwned = true">'
    fake_api.script(reply(markup + " stays text.", chunks=[markup, " stays text."], gate=gate))
    bubbles = "document.querySelectorAll('.agent')"
    waiting_note = f"getComputedStyle({bubbles}[1], '::after').content"

    def body(gw):
        with Browser() as browser:
            browser.open(f"{gw.page}#token={gw.token}")
            browser.wait_for(CONNECTED)
            send_from_page(browser, "first")
            browser.wait_for(f"{bubbles}[0].textContent === {json.dumps(markup)}")
            send_from_page(browser, "second")  # while the first reply is still coming
            writing = browser.wait_for(f"{bubbles}.length === 2 && {waiting_note}")
            gate.set()
            browser.wait_for(f"[...{bubbles}].every(b => b.dataset.done === 'yes')")
            shown = browser.evaluate(LOG_LINES)
            browser.evaluate("window.before_reload = true")
            browser.reload()
            browser.wait_for(f"!window.before_reload && {CONNECTED}")
            restored = browser.evaluate(LOG_LINES)
            injected = browser.evaluate("document.querySelectorAll('img').length || window.pwned")
            return writing, shown, restored, injected

    code, out, (writing, shown, restored, injected) = with_gateway(
        load(path), monkeypatch, capsys, body
    )
    assert writing == '"Agent is writing…"'  # in line behind the first reply: nothing yet
    assert (
        shown
        == restored
        == [
            ["you", "first"],
            ["agent", markup + " stays text."],
            ["you", "second"],
            ["agent", "(fake) you said: second"],
        ]
    )
    assert not injected


def test_the_chat_page_offers_a_reconnect_and_restores_a_compacted_conversation(
    path, load, fake_api, monkeypatch, capsys
):
    chromium_or_skip()
    with Browser() as browser:
        browser.before_every_page(COUNT_SOCKETS)

        def first_run(gw):
            browser.open(f"{gw.page}#token={gw.token}")
            browser.wait_for(CONNECTED)
            return (
                gw.port,
                browser.evaluate(LOG_LINES),
                browser.evaluate("localStorage.getItem('gateway-peer')"),
            )

        mod = load(path)
        port, empty, peer = with_gateway(mod, monkeypatch, capsys, first_run)[2]
        gone = browser.wait_for(f"{RETRY_SHOWN} && {STATUS}")  # the gateway stopped
        browser.evaluate("document.getElementById('retry').click()")
        browser.wait_for(f"window.sockets === 2 && {RETRY_SHOWN}")  # tried again: still gone

        summary = mod.SUMMARY_PREFIX + "\nAda asked what the folder holds."
        mod.SessionStore(mod.SESSIONS_ROOT / "main").for_key(
            f"agent:main:webchat:direct:{peer}"
        ).replace(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": summary},
                        {"type": "text", "text": "and now?"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "toolu_1", "name": "list_dir", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "notes.txt"}
                    ],
                },
                {"role": "assistant", "content": "One file: notes.txt"},
            ],
            "compaction",
        )

        def second_run(gw):
            browser.evaluate("document.getElementById('retry').click()")
            browser.wait_for(CONNECTED)
            return browser.evaluate(LOG_LINES)

        restored = with_gateway(
            load(path, GATEWAY_PORT=str(port)), monkeypatch, capsys, second_run
        )[2]
    assert empty == []  # no session yet (-32004) is an empty conversation, not an error
    assert "gateway is not reachable" in gone
    assert restored == [
        ["note", summary],
        ["you", "and now?"],
        ["agent", "Let me look."],
        ["note", "used list_dir"],
        ["agent", "One file: notes.txt"],
    ]


def test_the_page_is_served_and_other_paths_are_not(path, load, fake_api, monkeypatch, capsys):
    def body(gw):
        with urllib.request.urlopen(gw.page, timeout=5) as page:
            html, kind = page.read().decode(), page.headers["Content-Type"]
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(gw.page + "secrets", timeout=5)
        return html, kind, missing.value.code, gw.token

    code, out, (html, kind, missing, token) = with_gateway(load(path), monkeypatch, capsys, body)
    assert (
        kind.startswith("text/html") and "<title>Agent gateway</title>" in html and missing == 404
    )
    assert token not in html  # the page never carries the token: the link's #fragment does


# --- The lesson's protocol exchange is what the gateway really says ------------------------------


def lesson_exchange() -> list[tuple[str, str]]:
    """The "> " (client) and "< " (gateway) frames of the exchange shown in s05's lesson."""
    lesson = SECTIONS[0].with_suffix(".md").read_text(encoding="utf-8")
    block = re.search(r"^```text\n(> \{.*?)^```", lesson, flags=re.S | re.M).group(1)
    return [(line[:1], line[2:]) for line in block.splitlines()]


EXCHANGE_REPLY = reply("Hello! How can I help?", chunks=["Hello! ", "How can I help?"])


def test_the_lessons_protocol_exchange_really_happens(path, load, fake_api, monkeypatch, capsys):
    fake_api.script(EXCHANGE_REPLY)

    def body(gw):
        client = gw.client(token=None)
        seen = []
        for direction, frame in lesson_exchange():
            if direction == ">":
                client.send_raw(frame.replace("<token>", gw.token))
            else:
                received = client.receive()
                if received.get("result", {}).get("server"):
                    received["result"]["server"] = (
                        "s05 Gateway & routing"  # later sections have their own title
                    )
                seen.append((json.loads(frame), received))
        return seen

    code, out, seen = with_gateway(load(path), monkeypatch, capsys, body)
    assert seen and all(shown == received for shown, received in seen), seen


def test_the_lessons_client_script_works(path, load, fake_api, monkeypatch, capsys, workspace):
    lesson = SECTIONS[0].with_suffix(".md").read_text(encoding="utf-8")
    script = re.search(r"python - <<'EOF'\n(.*?)\nEOF", lesson, flags=re.S).group(1)

    def body(gw):
        run = subprocess.run(
            [sys.executable, "-"],
            input=script.replace("18789", str(gw.port)),
            capture_output=True,
            text=True,
            cwd=workspace.parent,
            timeout=30,
        )
        return run

    code, out, run = with_gateway(load(path), monkeypatch, capsys, body)
    assert run.returncode == 0, run.stderr
    assert "'result': {'text': '(fake) you said: Hello from a script'" in run.stdout


def test_idle_strangers_cannot_lock_out_a_client_with_the_token(
    path, load, fake_api, monkeypatch, capsys
):
    """Connections that never send `connect` are closed after CONNECT_DEADLINE and never take
    the places of clients that have the token (before, 64 idle sockets locked everyone out)."""
    mod = load(path)
    monkeypatch.setattr(mod, "CONNECT_DEADLINE", 2.5)  # room for a loaded machine

    def body(gw):
        known = gw.client()  # connected before the crowd arrives
        idle = [
            connect(f"ws://127.0.0.1:{gw.port}/", open_timeout=5).__enter__()
            for _ in range(mod.MAX_STRANGERS)
        ]
        with pytest.raises(InvalidStatus):  # while they wait, no more strangers get in ...
            connect(f"ws://127.0.0.1:{gw.port}/", open_timeout=5).__enter__()
        during = known.call("chat.send", {"text": "still here?", "peer_id": "me"})  # ... but we do
        codes = []
        for ws in idle:  # each is closed when its deadline passes
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=5)
            codes.append(closed.value.rcvd.code)
        after = gw.client().call("chat.send", {"text": "and now?", "peer_id": "new"})
        return during, codes, after

    code, out, (during, codes, after) = with_gateway(mod, monkeypatch, capsys, body)
    assert during["result"]["text"] == "(fake) you said: still here?"
    assert codes == [1008] * mod.MAX_STRANGERS
    assert after["result"]["text"] == "(fake) you said: and now?"


def test_gateway_json_an_older_version_kept_in_the_workspace_moves_to_the_state_folder(
    path, load, fake_api, monkeypatch, capsys, workspace
):
    write_config(workspace, dm_scope="main")
    (state_of(workspace) / "gateway.json").replace(workspace / "gateway.json")
    state_of(workspace).rmdir()  # as an older version left it: no state folder yet
    code, out = drive_repl(load(path), ["/bindings"], monkeypatch, capsys)
    assert (
        not (workspace / "gateway.json").exists()
        and gateway_config(workspace)["dm_scope"] == "main"
    )
    assert "dm_scope main" in out and "[state] moved 1 item(s)" in out


def test_every_chat_send_gets_an_answer_even_past_the_waiting_cap(path, load, fake_api,
                                                                  monkeypatch, capsys):
    mod = load(path)
    gate = threading.Event()
    fake_api.script(reply("first", gate=gate))
    many = mod.MAX_WAITING_TURNS + 3

    def body(gw):
        client = gw.client()
        for n in range(1 + many):
            client.ws.send(json.dumps({"jsonrpc": "2.0", "id": n, "method": "chat.send",
                                       "params": {"text": f"m{n}", "peer_id": "p"}}))
            if n == 0:  # the first is being answered before the rest line up
                wait_for(lambda: fake_api.requests, what="the first call")
        answers = {}
        while len(answers) < 3:  # the ones past the cap are answered at once
            message = client.receive()
            if "id" in message:
                answers[message["id"]] = message["result"]["text"]
        gate.set()
        while len(answers) < 1 + many:
            message = client.receive()
            if "id" in message:
                answers[message["id"]] = message["result"]["text"]
        return answers
    code, out, answers = with_gateway(mod, monkeypatch, capsys, body)
    busy = [n for n, text in answers.items() if text == mod.BUSY_REPLY]
    assert len(answers) == 1 + many and len(busy) == 3


def test_under_per_peer_a_gateway_client_never_shares_a_telegram_users_session(path, load,
                                                                               workspace):
    write_config(workspace, dm_scope="per-peer")
    mod = load(path)
    router = mod.Router(state_of(workspace) / "gateway.json")
    telegram = router.resolve(message(mod, sender="42")).session_key
    web = router.resolve(mod.probe_message("webchat", "42", "gateway")).session_key
    assert telegram == "agent:main:direct:42" and web == "agent:main:webchat:direct:42"


def test_a_gateway_token_too_short_to_keep_anyone_out_is_refused(path, load, capsys):
    mod = load(path, GATEWAY_TOKEN="short")
    assert mod.main() == 2
    assert "GATEWAY_TOKEN is too short" in capsys.readouterr().err


def test_new_answers_the_gateway_requests_it_drops_and_a_closed_client_leaves_no_task(
        path, load, fake_api, monkeypatch, capsys):
    mod = load(path)
    gate = threading.Event()
    fake_api.script(reply("first", gate=gate))

    def body(gw):
        client = gw.client()
        for n, text in enumerate(["a", "b", "c", "/new"]):
            client.ws.send(json.dumps({"jsonrpc": "2.0", "id": n, "method": "chat.send",
                                       "params": {"text": text, "peer_id": "p"}}))
            if n == 0:  # "a" is being answered (held by the gate) before the rest arrive
                wait_for(lambda: fake_api.requests, what="the first call")
        answers = {}
        while len(answers) < 2:  # b and c, dropped by /new, are answered at once
            message = client.receive()
            if "id" in message:
                answers[message["id"]] = message["result"]["text"]
        gate.set()
        while len(answers) < 4:
            message = client.receive()
            if "id" in message:
                answers[message["id"]] = message["result"]["text"]
        return answers
    code, out, answers = with_gateway(mod, monkeypatch, capsys, body)
    assert answers[1] == answers[2] == "(not answered: /new started a new conversation)"
    assert answers[0] == "first" and answers[3] == "Started a new conversation."


def test_hostile_state_files_are_sentences_not_tracebacks(path, load, workspace, capsys):
    write_config(workspace)
    (state_of(workspace) / "gateway.json").write_text("[" * 100_000)
    assert load(path).main() == 2 and "gateway.json" in capsys.readouterr().err
    write_config(workspace, agents=[{"id": "main", "name": "x", "model": None,
                                     "tools": [["bash"]]}])
    assert load(path).main() == 2 and "agents[0].tools" in capsys.readouterr().err
    write_config(workspace)
    (state_of(workspace) / "gateway-token").mkdir()
    assert load(path).main() == 2 and "gateway-token" in capsys.readouterr().err


def test_a_tool_a_later_section_added_is_left_out_here_not_refused(path, load, fake_api,
                                                                   monkeypatch, capsys, workspace):
    """An earlier section leaves alone what it does not know: gateway.json written for a later
    section (a tool from s10, say) still starts this one."""
    write_config(workspace, agents=[{"id": "main", "name": "Claw", "model": None,
                                     "tools": ["read_file", "tool_from_the_future"]}])
    code, out = drive_repl(load(path), ["/agents"], monkeypatch, capsys)
    assert code == 0 and "tool_from_the_future unknown here; left out" in out
    assert "tools read_file" in out
    assert "tool_from_the_future" in gateway_config(workspace)["agents"][0]["tools"]


def test_a_chat_kept_by_s04_is_the_same_chat_here_and_back(path, load):
    """s04 keys a chat "telegram:direct:42"; from s05 on its key is
    "agent:main:telegram:direct:42". A learner who talked on Telegram in s04 and runs this
    section (or goes back) finds the same conversation."""
    s04 = load(section_files()[3])
    assert s04.SECTION.startswith("s04")
    old = main_store(s04).for_key("telegram:direct:42")
    old.messages += [{"role": "user", "content": "my cat is Tom"},
                     {"role": "assistant", "content": [{"type": "text", "text": "Hi Tom."}]}]
    old.save()
    mod = load(path)
    here = main_store(mod).for_key("agent:main:telegram:direct:42")
    assert here.id == old.id and here.messages == old.messages
    newer = main_store(mod).for_key("agent:main:feishu:direct:ou_7")  # made here first
    assert main_store(load(section_files()[3])).for_key("feishu:direct:ou_7").id == newer.id
