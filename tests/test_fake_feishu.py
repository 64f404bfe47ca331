"""The fake Feishu API answers as the real one does for the calls s04 makes (checked with
httpx); run as a script, it is a Feishu user a learner types as, and FeishuUser is that user
scripted, here against the real s04 section's webhook."""

import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fake_anthropic import last_user_text, reply
from fake_feishu import (
    DEFAULT_PORT,
    INVALID_TOKEN_CODE,
    FakeFeishu,
    FeishuUser,
    message_event,
    url_verification,
)
from harness import Screen, drive_repl, sections_from

SCRIPT = Path(__file__).with_name("fake_feishu.py")
S04 = sections_from("s04")[0]


@pytest.fixture
def fs():
    fake = FakeFeishu().start()
    yield fake
    fake.stop()


def token(fs, secret="test-secret"):
    return httpx.post(
        f"{fs.api_base}/open-apis/auth/v3/tenant_access_token/internal",
        json={"app_id": fs.app_id, "app_secret": secret},
    ).json()


def send(fs, tok, id_type="open_id", receive_id="ou_1", text="hi"):
    return httpx.post(
        f"{fs.api_base}/open-apis/im/v1/messages",
        params={"receive_id_type": id_type},
        headers={"Authorization": f"Bearer {tok}"} if tok else {},
        json={"receive_id": receive_id, "msg_type": "text", "content": json.dumps({"text": text})},
    )


def test_token_then_send(fs):
    issued = token(fs)
    assert issued["code"] == 0 and issued["expire"] == 7200
    answer = send(fs, issued["tenant_access_token"], "chat_id", "oc_group", "hello group")
    assert answer.status_code == 200 and answer.json()["code"] == 0
    assert fs.sent == [
        {
            "receive_id_type": "chat_id",
            "receive_id": "oc_group",
            "msg_type": "text",
            "text": "hello group",
        }
    ]
    assert fs.token_requests == 1


def test_wrong_secret_gets_no_token(fs):
    assert token(fs, secret="wrong")["code"] != 0


def test_missing_bad_or_expired_token_is_refused(fs):
    assert send(fs, None).json()["code"] == INVALID_TOKEN_CODE  # no Authorization header at all
    assert send(fs, "t-made-up").json()["code"] == INVALID_TOKEN_CODE
    tok = token(fs)["tenant_access_token"]
    fs.expire_tokens()
    assert send(fs, tok).json()["code"] == INVALID_TOKEN_CODE
    assert fs.sent == []


def test_receive_id_type_and_content_are_validated(fs):
    tok = token(fs)["tenant_access_token"]
    assert send(fs, tok, id_type="nickname").status_code == 400
    bad = httpx.post(
        f"{fs.api_base}/open-apis/im/v1/messages",
        params={"receive_id_type": "open_id"},
        headers={"Authorization": f"Bearer {tok}"},
        json={"receive_id": "ou_1", "msg_type": "text", "content": {"text": "not a string"}},
    )
    assert bad.status_code == 400 and fs.sent == []


def test_event_builders_have_the_webhook_shapes():
    challenge = url_verification("abc", "verify-me")
    assert challenge == {"challenge": "abc", "token": "verify-me", "type": "url_verification"}
    event = message_event("hello", "ou_42", "verify-me", chat_type="group")
    assert event["header"]["event_type"] == "im.message.receive_v1"
    assert event["header"]["token"] == "verify-me"
    assert json.loads(event["event"]["message"]["content"]) == {"text": "hello"}
    assert event["event"]["sender"]["sender_id"]["open_id"] == "ou_42"
    image = message_event("", "ou_42", "verify-me", image_key="img_1")["event"]["message"]
    assert image["message_type"] == "image"
    assert json.loads(image["content"]) == {"image_key": "img_1"}


# --- The script: a Feishu user in a second terminal -----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("typed", ["quit\n", "/who\n", ""], ids=["quit", "eof-after-a-line", "eof"])
def test_the_script_prints_the_env_lines_and_leaves_with_0(typed):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--port", "0", "--webhook-port", "18799"],
        input=typed,
        capture_output=True,
        text=True,
        env=env,
        timeout=20,
    )
    assert run.returncode == 0 and run.stderr == ""
    port = re.search(r"^FEISHU_API_BASE=http://127\.0\.0\.1:(\d+)$", run.stdout, re.M).group(1)
    block = [
        "FEISHU_APP_ID=cli_fake_app",
        "FEISHU_APP_SECRET=fake-app-secret",
        "FEISHU_VERIFICATION_TOKEN=fake-verification-token",
        "FEISHU_WEBHOOK_PORT=18799",
        f"FEISHU_API_BASE=http://127.0.0.1:{port}",
    ]
    lines = run.stdout.splitlines()
    start = lines.index(block[0])
    assert lines[start : start + 5] == block
    assert "Ada > " in run.stdout and run.stdout.endswith("Bye.\n")
    assert DEFAULT_PORT not in (18789, 18790)


def test_an_unreachable_webhook_is_said_plainly(fs):
    out = io.StringIO()
    ada = FeishuUser(fs, free_port(), out=out)
    ada.say("anyone there?")
    assert ada.last_status is None
    assert re.search(
        r"^\(cannot reach the section's webhook at http://127\.0\.0\.1:\d+/: "
        r"Connection refused\. Is a section running",
        ada.transcript,
        flags=re.M,
    )
    with pytest.raises(TimeoutError):
        ada.wait_for_gateway(timeout=0.1)
    assert out.getvalue() == ada.transcript


# --- FeishuUser against the real s04 --------------------------------------------------------------


def test_a_stranger_gets_a_pairing_code_and_after_approval_the_models_reply(
    load, fake_api, fs, monkeypatch, capsys
):
    ada = FeishuUser(fs, free_port())
    mod = load(S04, **ada.env())
    screen = Screen(capsys)
    code = {}

    def stranger_writes():
        ada.wait_for_gateway()
        ada.enter("/verify")
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
        "Ada > /verify\n"
        "the gateway answered the challenge: Feishu would accept this "
        "webhook URL\n"
        f"Ada > hello?\n[bot] {pairing_reply}\n"
        "[bot] You are approved. Send your message again.\n"
        "Ada > hello again\n[bot] Hello Ada, from the agent.\n"
    )
    assert [last_user_text(r) for r in fake_api.requests] == ["hello again"]


def test_a_wrong_token_is_refused_and_a_group_is_answered_by_chat_id(
    load, fake_api, fs, monkeypatch, capsys
):
    ada = FeishuUser(fs, free_port())
    mod = load(S04, **ada.env(), FEISHU_ALLOW_FROM="ou_ada")

    def chat():
        ada.wait_for_gateway()
        for line in ["/token forged", "who am I?", "/verify", "/token"]:
            ada.enter(line)
        assert ada.last_status == 403 and fs.sent == []
        ada.enter("/group oc_team Team")
        ada.say("and you all?")
        assert ada.wait_for_reply() == ["(fake) you said: and you all?"]
        ada.enter("/as ou_bob Bob")
        ada.enter("/photo")
        return "quit"

    assert drive_repl(mod, [chat], monkeypatch, capsys)[0] == 0
    assert (
        ada.transcript
        == """Ada > /token forged
Your events carry the verification token 'forged' now (a wrong one).
Ada > who am I?
the gateway refused the event: 403 (wrong verification token)
Ada > /verify
the gateway refused the challenge: 403 (wrong verification token)
Ada > /token
Your events carry the verification token 'verify-me' now (the right one).
Ada > /group oc_team Team
Now in Team (oc_team), as Ada.
Ada in Team > and you all?
[bot] (fake) you said: and you all?
Ada in Team > /as ou_bob Bob
You are Bob (ou_bob) now.
Bob in Team > /photo
"""
    )
    assert fs.sent == [
        {
            "receive_id_type": "chat_id",
            "receive_id": "oc_team",
            "msg_type": "text",
            "text": "(fake) you said: and you all?",
        }
    ]
    assert last_user_text(fake_api.requests[0]) == "and you all?"  # the mention was taken out
    assert len(fake_api.requests) == 1  # Bob is no one the gateway knows: his photo got nothing
