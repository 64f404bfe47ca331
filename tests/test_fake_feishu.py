"""The fake Feishu API answers as the real one does for the calls s04 makes (checked with httpx)."""
import json

import httpx
import pytest

from fake_feishu import INVALID_TOKEN_CODE, FakeFeishu, message_event, url_verification


@pytest.fixture
def fs():
    fake = FakeFeishu().start()
    yield fake
    fake.stop()


def token(fs, secret="test-secret"):
    return httpx.post(f"{fs.api_base}/open-apis/auth/v3/tenant_access_token/internal",
                      json={"app_id": fs.app_id, "app_secret": secret}).json()


def send(fs, tok, id_type="open_id", receive_id="ou_1", text="hi"):
    return httpx.post(f"{fs.api_base}/open-apis/im/v1/messages", params={"receive_id_type": id_type},
                      headers={"Authorization": f"Bearer {tok}"} if tok else {},
                      json={"receive_id": receive_id, "msg_type": "text", "content": json.dumps({"text": text})})


def test_token_then_send(fs):
    issued = token(fs)
    assert issued["code"] == 0 and issued["expire"] == 7200
    answer = send(fs, issued["tenant_access_token"], "chat_id", "oc_group", "hello group")
    assert answer.status_code == 200 and answer.json()["code"] == 0
    assert fs.sent == [{"receive_id_type": "chat_id", "receive_id": "oc_group", "msg_type": "text",
                        "text": "hello group"}]
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
    bad = httpx.post(f"{fs.api_base}/open-apis/im/v1/messages", params={"receive_id_type": "open_id"},
                     headers={"Authorization": f"Bearer {tok}"},
                     json={"receive_id": "ou_1", "msg_type": "text", "content": {"text": "not a string"}})
    assert bad.status_code == 400 and fs.sent == []


def test_event_builders_have_the_webhook_shapes():
    challenge = url_verification("abc", "verify-me")
    assert challenge == {"challenge": "abc", "token": "verify-me", "type": "url_verification"}
    event = message_event("hello", "ou_42", "verify-me", chat_type="group")
    assert event["header"]["event_type"] == "im.message.receive_v1" and event["header"]["token"] == "verify-me"
    assert json.loads(event["event"]["message"]["content"]) == {"text": "hello"}
    assert event["event"]["sender"]["sender_id"]["open_id"] == "ou_42"
