"""The fake Telegram Bot API behaves as python-telegram-bot expects (s04's channel tests rely on it)."""
import asyncio

import pytest
import telegram
from telegram.ext import Application, MessageHandler, filters

from fake_telegram import FakeTelegram


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


@pytest.mark.parametrize("status, error", [(502, telegram.error.NetworkError), (409, telegram.error.Conflict),
                                           (None, telegram.error.NetworkError)])
def test_injected_failures_reach_the_client_as_its_own_errors(tg, status, error):
    async def scenario():
        async with bot_for(tg) as bot:  # entering calls getMe
            tg.fail(status, "Conflict: terminated by other getUpdates request" if status == 409 else "Bad Gateway")
            with pytest.raises(error):
                await bot.send_message(chat_id=1, text="x")
            return await bot.send_message(chat_id=1, text="after")  # the next call works again

    assert asyncio.run(scenario()).text == "after"


def test_unknown_method_is_a_404(tg):
    import json
    import urllib.error
    import urllib.request
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"{tg.base_url}{tg.token}/noSuchMethod", data=b""), timeout=5)
    assert err.value.code == 404 and json.loads(err.value.read())["ok"] is False
