"""s01: the agent loop. These guarantees hold in s01 and every later section."""

import io
import socket
import subprocess
import sys
import threading
import time

import anthropic
import httpx
import pytest

from fake_anthropic import FakeAnthropic, error, last_user_text, reply
from harness import (
    assert_valid_history,
    drive_repl,
    run_section,
    section_files,
    section_id,
    sections_from,
    whole_process_only,
)

SECTIONS = sections_from("s01")
ids = [section_id(p) for p in SECTIONS]
S01 = section_files()[0]


def user_texts(request: dict) -> list[str]:
    """The plain user turns in one request body (tool results left out)."""
    texts = []
    for msg in request["messages"]:
        if msg["role"] != "user":
            continue
        content = msg["content"]
        if isinstance(content, str):
            texts.append(content)
        else:
            texts.extend(b["text"] for b in content if b.get("type") == "text")
    return texts


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_two_turns_keep_history(path, load, fake_api, monkeypatch, capsys):
    fake_api.script(reply("Hello Ada!"), reply("Your name is Ada."))
    code, out = drive_repl(load(path), ["Hi, I am Ada", "What is my name?"], monkeypatch, capsys)
    assert code == 0
    assert "Hello Ada!" in out and "Your name is Ada." in out
    second = fake_api.requests[1]["messages"]
    assert user_texts(fake_api.requests[1])[-2:] == ["Hi, I am Ada", "What is my name?"]
    assert any(m["role"] == "assistant" and "Hello Ada!" in str(m["content"]) for m in second)
    assert_valid_history(second)


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_banner_help_empty_line_and_unknown_command(path, load, fake_api, monkeypatch, capsys):
    mod = load(path, MODEL_ID="claude-test-model")
    code, out = drive_repl(mod, ["", "   ", "/help", "/nonsense", "quit"], monkeypatch, capsys)
    assert code == 0
    banner = out.splitlines()[0]
    assert (
        banner.startswith(section_id(path))
        and "claude-test-model" in banner
        and fake_api.base_url in banner
    )
    assert "/help" in out and "quit" in out
    assert "Unknown command /nonsense" in out
    assert fake_api.requests == []  # nothing reached the model: not the blanks, not the commands


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
@pytest.mark.parametrize("leave", ["quit", "exit", "EXIT", KeyboardInterrupt, None])
def test_every_way_out_exits_zero(path, leave, load, monkeypatch, capsys):
    inputs = [] if leave is None else [leave]  # None: end of input, as Ctrl-D
    code, out = drive_repl(load(path), inputs, monkeypatch, capsys)
    assert code == 0
    assert "Traceback" not in out


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
@pytest.mark.parametrize(
    "status, etype, expected",
    [
        (401, "authentication_error", "ANTHROPIC_API_KEY"),
        (429, "rate_limit_error", "Rate limited (429)"),
        (529, "overloaded_error", "overloaded (529)"),
        (500, "api_error", "API error (500 api_error)"),
    ],
)
def test_api_error_is_one_line_and_next_turn_works(
    path, status, etype, expected, load, fake_api, monkeypatch, capsys
):
    fake_api.script(error(status, etype, "the fake says no"), reply("Second try worked."))
    code, out = drive_repl(load(path), ["first", "second"], monkeypatch, capsys)
    assert code == 0
    error_lines = [line for line in out.splitlines() if expected in line]
    assert len(error_lines) == 1, out
    assert "Traceback" not in out
    assert "Second try worked." in out
    # the failed turn was rolled back: the next request does not carry it
    assert user_texts(fake_api.requests[1]) == ["second"]
    assert_valid_history(fake_api.requests[1]["messages"])


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_error_sent_mid_stream_is_classified_by_type(path, load, fake_api, monkeypatch, capsys):
    # The API can fail after the stream began: HTTP 200, then an SSE `error` event.
    fake_api.script(
        reply("Half a sentence and then", stream_error=("overloaded_error", "Overloaded")),
        reply("Recovered."),
    )
    code, out = drive_repl(load(path), ["first", "second"], monkeypatch, capsys)
    assert "overloaded (529)" in out
    assert "Recovered." in out
    assert user_texts(fake_api.requests[1]) == ["second"]


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_unreachable_base_url_then_recovery(path, load, monkeypatch, capsys):
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mod = load(path, ANTHROPIC_BASE_URL=f"http://127.0.0.1:{port}")
    mod.SDK_MAX_RETRIES = 0  # the SDK's own retries would only make this test slower
    late = {}

    def input_then_start_server(inputs=iter(["first", "second"])):
        line = next(inputs, None)
        if line == "second":  # the server comes up between the two turns
            late["api"] = FakeAnthropic(port=port).start()
            late["api"].script(reply("Now I can hear you."))
        if line is None:
            raise EOFError
        return line

    monkeypatch.setattr("builtins.input", lambda prompt="": input_then_start_server())
    try:
        assert mod.main() == 0
    finally:
        if "api" in late:
            late["api"].stop()
    out = capsys.readouterr().out
    assert f"Cannot reach http://127.0.0.1:{port}" in out
    assert "Now I can hear you." in out
    assert user_texts(late["api"].requests[0]) == ["second"]


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_max_tokens_is_reported_as_cut_off(path, load, fake_api, monkeypatch, capsys):
    fake_api.script(reply("This answer stops in the mid", stop_reason="max_tokens"))
    code, out = drive_repl(load(path, MAX_TOKENS="7"), ["tell me everything"], monkeypatch, capsys)
    assert "cut off" in out and "MAX_TOKENS=7" in out
    assert fake_api.requests[0]["max_tokens"] == 7


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
@pytest.mark.parametrize("setting", ["8k", "0", "nan", "-3"])
def test_a_setting_that_is_not_a_number_is_a_sentence(path, load, capsys, setting):
    with pytest.raises(SystemExit) as stop:
        load(path, MAX_TOKENS=setting)
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        f"MAX_TOKENS={setting!r} in .env or the environment: expected a whole number of at "
        "least 1 (the default is 8192).\n")


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_refusal_drops_the_turn(path, load, fake_api, monkeypatch, capsys):
    fake_api.script(reply("I can't help with that.", stop_reason="refusal"), reply("Fine."))
    code, out = drive_repl(load(path), ["something bad", "something good"], monkeypatch, capsys)
    assert "declined" in out
    assert user_texts(fake_api.requests[1]) == ["something good"]


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_usage_line_every_turn_and_dim_on_a_terminal(path, load, fake_api, monkeypatch, capsys):
    """"in" is the whole prompt: the part sent fresh plus what was read from or written to the
    cache (the API reports the three apart)."""
    fake_api.script(
        reply("one", usage={"input_tokens": 11, "output_tokens": 3, "cache_read_input_tokens": 5,
                            "cache_creation_input_tokens": 0}),
        reply("two", usage={"input_tokens": 2, "output_tokens": 3, "cache_read_input_tokens": 5,
                            "cache_creation_input_tokens": 7}),
    )
    mod = load(path)
    code, out = drive_repl(mod, ["hi", "again"], monkeypatch, capsys)
    usage = [line for line in out.splitlines() if line.startswith("[tokens")]
    assert usage == ["[tokens in 16 / out 3 / cached 5 · stop end_turn]",
                     "[tokens in 14 / out 3 / cached 5 / written to cache 7 · stop end_turn]"]
    mod.USE_COLOR = True
    assert mod.dim("x") == "\033[2mx\033[0m"


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_streamed_text_reaches_the_terminal_before_the_reply_ends(
    path, load, fake_api, monkeypatch
):
    gate = threading.Event()
    fake_api.script(
        reply(
            "First words arrive early, the rest later.",
            chunks=["First words ", "arrive early,", " the rest later."],
            gate=gate,
        )
    )
    mod = load(path)
    seen_first = threading.Event()

    class Terminal(io.StringIO):
        def write(self, s):
            n = super().write(s)
            if "First words" in self.getvalue():
                seen_first.set()
            return n

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    code = {}
    inputs = iter(["hello"])

    def fake_input(prompt=""):
        line = next(inputs, None)
        if line is None:
            raise EOFError
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    worker = threading.Thread(target=lambda: code.setdefault("rc", mod.main()), daemon=True)
    worker.start()
    assert seen_first.wait(10), "the first chunk never reached the terminal"
    assert "the rest later" not in terminal.getvalue()  # the reply is still being written
    gate.set()
    worker.join(10)
    assert code.get("rc") == 0
    assert "First words arrive early, the rest later." in terminal.getvalue()


def test_s01_drops_a_tool_use_reply(load, fake_api, monkeypatch, capsys):
    from fake_anthropic import tool_use

    fake_api.script(reply("Let me look.", tools=[tool_use("bash", {"command": "ls"})]), reply("ok"))
    code, out = drive_repl(load(S01), ["list files", "never mind"], monkeypatch, capsys)
    assert "tools arrive in s02" in out
    assert user_texts(fake_api.requests[1]) == ["never mind"]
    assert_valid_history(fake_api.requests[1]["messages"])


def test_s01_ctrl_c_mid_reply_drops_the_turn(load, fake_api, monkeypatch, capsys):
    mod = load(S01)

    def interrupted(client, messages):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "stream_reply", interrupted)
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "text", "text": "b"}]},
    ]
    assert mod.agent_turn(mod.make_client(), messages, "c") is None
    assert len(messages) == 2
    assert "interrupted" in capsys.readouterr().out


# --- As a learner runs it: a real process, piped input -------------------------------------------


def test_s01_without_key_says_what_to_set(workspace):
    from harness import isolated_env

    run = run_section(S01, ["hello"], isolated_env(workspace, None), timeout=30)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr + run.stdout
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "ANTHROPIC_API_KEY" in lines[0] and ".env" in lines[0]


def test_s01_end_to_end_transcript(fake_api, subprocess_env):
    fake_api.script(reply("Hello Ada, nice to meet you."), reply("You told me your name is Ada."))
    run = run_section(
        S01, ["Hi! My name is Ada.", "", "What is my name?", "quit"], subprocess_env()
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    t = run.transcript
    assert f"s01 Agent loop · model claude-sonnet-5-5 · base URL {fake_api.base_url}" in t
    assert "You > Hi! My name is Ada.\nHello Ada, nice to meet you.\n[tokens in" in t
    assert "You > What is my name?\nYou told me your name is Ada." in t
    assert t.rstrip().endswith("Bye.")
    assert len(fake_api.requests) == 2 and fake_api.requests[1]["stream"] is True


def test_s01_streams_in_a_real_process(fake_api, subprocess_env):
    """Read the child's stdout while the fake holds back the rest of the reply."""
    import subprocess

    gate = threading.Event()
    fake_api.script(
        reply("Early bird. Late worm.", chunks=["Early bird.", " Late worm."], gate=gate)
    )
    proc = subprocess.Popen(
        [sys.executable, str(S01)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
        text=True,
    )
    try:
        proc.stdin.write("hi\n")
        proc.stdin.flush()
        seen, deadline = "", time.time() + 20
        while "Early bird." not in seen and time.time() < deadline:
            seen += proc.stdout.read(1)
        assert "Early bird." in seen and "Late worm." not in seen
        gate.set()
        out, _ = proc.communicate("quit\n", timeout=20)
        assert "Late worm." in seen + out
        assert proc.returncode == 0
    finally:
        gate.set()
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_a_rejected_key_names_where_it_came_from(path, load):
    mod = load(path)
    refused = anthropic.AuthenticationError(
        "bad key",
        response=httpx.Response(401, request=httpx.Request("POST", "http://x")),
        body={"type": "error", "error": {"type": "authentication_error", "message": "bad key"}},
    )
    assert "in your shell's environment" in mod.describe_api_error(refused)  # the tests set it
    mod.KEY_FROM_SHELL = False
    assert mod.describe_api_error(refused).endswith("Check ANTHROPIC_API_KEY in .env.")


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_a_byte_that_is_not_utf8_at_the_prompt_is_not_a_crash(path, fake_api, subprocess_env):
    whole_process_only(path, "s01")
    proc = subprocess.run(
        [sys.executable, str(path)],
        input=b"caf\xe9 \xff\xfe\nquit\n",
        capture_output=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr
    assert last_user_text(fake_api.requests[0]) == "caf\ufffd \ufffd\ufffd"


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_the_models_words_cannot_drive_the_terminal(path, load, fake_api, monkeypatch, capsys):
    """A reply holding escape sequences (clear the screen, move the cursor, a bidi override)
    is shown with them escaped; its lines stay lines."""
    fake_api.script(reply("fine\x1b[2J\x1b[1A\u202eevil\nsecond line"))
    code, out = drive_repl(load(path), ["hi"], monkeypatch, capsys)
    assert "\x1b" not in out.replace("\x1b[2m", "").replace("\x1b[0m", "") and "\u202e" not in out
    assert "fine\\x1b[2J\\x1b[1A\\u202eevil\nsecond line" in out


@pytest.mark.parametrize("path", SECTIONS, ids=ids)
def test_a_stream_that_breaks_off_in_any_way_drops_the_turn_not_the_program(
    path, load, fake_api, monkeypatch, capsys
):
    """Not every failure is an APIError: a dropped connection mid-stream, or tool JSON the SDK
    cannot parse. The turn is dropped with one line, the history stays valid, the REPL goes on."""
    mod = load(path)
    real = mod.stream_reply
    calls = []

    def breaks_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("Unable to parse tool parameter JSON from model")
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "stream_reply", breaks_once)
    code, out = drive_repl(mod, ["first", "second"], monkeypatch, capsys)
    assert code == 0 and "the reply broke off, ValueError" in out
    assert "(fake) you said: second" in out
    assert_valid_history(fake_api.requests[-1]["messages"])
