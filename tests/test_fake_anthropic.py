"""The fake Messages API behaves like the real one where the sections depend on it:
request validation, token counts, prompt caching and the context window."""

import json
import urllib.error
import urllib.request

import anthropic
import pytest

from fake_anthropic import error, prompt_tokens, reply, tool_use

MODEL = "claude-sonnet-test"
LONG = "The gateway keeps its sessions on disk. " * 120  # about 1,200 tokens: cacheable


def post(api, body: dict, path: str = "/v1/messages") -> tuple[int, dict]:
    """POST a raw JSON body (the SDK would refuse some bodies before sending them)."""
    request = urllib.request.Request(
        api.base_url + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def client(api) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="test-key", base_url=api.base_url, max_retries=0)


def body_with(messages: list, **extra) -> dict:
    return {"model": MODEL, "max_tokens": 100, "messages": messages, **extra}


def refused(api, body: dict, path: str = "/v1/messages") -> str:
    """The 400 invalid_request_error message for a body the fake must refuse."""
    status, answer = post(api, body, path)
    assert status == 400, answer
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    return answer["error"]["message"]


def usage_of(api, **request) -> anthropic.types.Usage:
    return (
        client(api)
        .messages.create(model=request.pop("model", MODEL), max_tokens=100, **request)
        .usage
    )


USER = {"role": "user", "content": "hi"}
CALL = {"role": "assistant", "content": [tool_use("list_dir", {}, "toolu_A")]}
RESULT = {
    "role": "user",
    "content": [{"type": "tool_result", "tool_use_id": "toolu_A", "content": "a.md"}],
}


# --- Validation -------------------------------------------------------------------
@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "messages: at least one message is required"),
        (
            [{"role": "assistant", "content": "hello"}, USER],
            'messages: first message must use the "user" role',
        ),
        (
            [{"role": "user", "content": ""}],
            "messages.0: all messages must have non-empty content except for the optional final "
            "assistant message",
        ),
        (
            [USER, {"role": "assistant", "content": []}, USER],
            "messages.1: all messages must have non-empty content except for the optional final "
            "assistant message",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": ""}]}],
            "messages: text content blocks must be non-empty",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": " \n"}]}],
            "messages: text content blocks must contain non-whitespace text",
        ),
        (
            [{"role": "system", "content": "hi"}],
            "messages.0.role: Input should be 'user' or 'assistant'",
        ),
    ],
)
def test_history_rules(fake_api, messages, message):
    assert refused(fake_api, body_with(messages)) == message


def test_a_tool_use_needs_its_results_at_the_start_of_the_next_message(fake_api):
    two_calls = {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Looking."},
            tool_use("list_dir", {}, "toolu_A"),
            tool_use("read_file", {"path": "x"}, "toolu_B"),
        ],
    }
    expected = (
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately "
        "after: toolu_A, toolu_B. Each `tool_use` block must have a corresponding "
        "`tool_result` block in the next message."
    )
    assert refused(fake_api, body_with([USER, two_calls, USER])) == expected
    assert refused(fake_api, body_with([USER, two_calls])) == expected  # no next message at all
    only_a = {"role": "user", "content": RESULT["content"]}
    assert "immediately after: toolu_B." in refused(fake_api, body_with([USER, two_calls, only_a]))
    text_first = {"role": "user", "content": [{"type": "text", "text": "and"}, *RESULT["content"]]}
    assert "immediately after: toolu_A." in refused(fake_api, body_with([USER, CALL, text_first]))


def test_a_tool_result_must_answer_the_message_before_it(fake_api):
    expected = (
        "unexpected `tool_use_id` found in `tool_result` blocks: toolu_A. Each "
        "`tool_result` block must have a corresponding `tool_use` block in the previous "
        "message."
    )
    assert refused(fake_api, body_with([RESULT])) == "messages.0.content.0: " + expected
    answer = {"role": "assistant", "content": "Hello."}
    assert refused(fake_api, body_with([USER, answer, RESULT])) == (
        "messages.2.content.0: " + expected
    )


def test_tool_use_ids_must_be_unique(fake_api):
    history = [USER, CALL, RESULT, CALL, RESULT]
    assert refused(fake_api, body_with(history)) == (
        "messages.3.content.0: tool_use ids must be unique"
    )


def test_block_types_tools_and_max_tokens(fake_api):
    banana = [{"role": "user", "content": [{"type": "banana"}]}]
    assert refused(fake_api, body_with(banana)).startswith(
        "messages.0.content.0: Input tag 'banana' found using 'type' does not match any of the "
        "expected tags: 'text', 'image'"
    )
    schema = {"type": "object", "properties": {}}
    assert refused(fake_api, body_with([USER], tools=[{"input_schema": schema}])) == (
        "tools.0.custom.name: Field required"
    )
    assert refused(fake_api, body_with([USER], tools=[{"name": "bash"}])) == (
        "tools.0.custom.input_schema: Field required"
    )
    twice = [{"name": "bash", "input_schema": schema}] * 2
    assert refused(fake_api, body_with([USER], tools=twice)) == "tools: Tool names must be unique."
    assert refused(fake_api, {"model": MODEL, "messages": [USER]}) == "max_tokens: Field required"
    assert refused(fake_api, body_with([USER], max_tokens=-1)) == (
        "max_tokens: Input should be greater than or equal to 0"
    )


def test_at_most_four_cache_breakpoints(fake_api):
    mark = {"type": "ephemeral"}
    system = [{"type": "text", "text": f"part {n}", "cache_control": mark} for n in range(4)]
    assert post(fake_api, body_with([USER], system=system))[0] == 200
    five = body_with(
        [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": mark}]}],
        system=system,
    )
    assert refused(fake_api, five) == (
        "A maximum of 4 blocks with cache_control may be provided. Found 5."
    )
    automatic = body_with([USER], system=system, cache_control=mark)  # the top level counts too
    assert refused(fake_api, automatic).endswith("Found 5.")
    bad_ttl = body_with(
        [USER],
        system=[{"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "2h"}}],
    )
    assert refused(fake_api, bad_ttl) == "system.0.cache_control.ttl: Input should be '5m' or '1h'"


def test_the_sdk_gets_a_bad_request_error_streaming_or_not_and_counting(fake_api):
    api = client(fake_api)
    bad = [{"role": "assistant", "content": "hello"}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        api.messages.create(model=MODEL, max_tokens=10, messages=bad)
    assert caught.value.type == "invalid_request_error"
    assert caught.value.api_message == 'messages: first message must use the "user" role'
    with pytest.raises(anthropic.BadRequestError):
        with api.messages.stream(model=MODEL, max_tokens=10, messages=bad) as stream:
            stream.get_final_message()
    with pytest.raises(anthropic.BadRequestError):
        api.messages.count_tokens(model=MODEL, messages=bad)
    assert len(fake_api.requests) == 2 and len(fake_api.count_requests) == 1  # still recorded
    assert [r["endpoint"] for r in fake_api.rejected] == [
        "/v1/messages",
        "/v1/messages",
        "/v1/messages/count_tokens",
    ]
    assert fake_api.rejected[0]["message"] == 'messages: first message must use the "user" role'


def test_a_valid_tool_exchange_passes_and_a_refusal_takes_no_step(fake_api):
    fake_api.script(reply("Here: a.md"))
    assert refused(fake_api, body_with([USER, CALL, USER]))
    final = client(fake_api).messages.create(
        model=MODEL,
        max_tokens=10,
        tools=[{"name": "list_dir", "input_schema": {"type": "object", "properties": {}}}],
        messages=[
            USER,
            CALL,
            {"role": "user", "content": [*RESULT["content"], {"type": "text", "text": "thanks"}]},
        ],
    )
    assert final.content[0].text == "Here: a.md"  # the refused request did not use up the step
    assert len(fake_api.rejected) == 1


def test_what_the_real_api_also_accepts(fake_api):
    # Consecutive messages of one role are combined into one turn; results may be split.
    split = [
        {"role": "user", "content": [r]}
        for r in (
            {"type": "tool_result", "tool_use_id": "toolu_A", "content": "a"},
            {"type": "tool_result", "tool_use_id": "toolu_B", "content": ""},
        )
    ]
    calls = {
        "role": "assistant",
        "content": [tool_use("x", {}, "toolu_A"), tool_use("y", {}, "toolu_B")],
    }
    accepted = [
        [USER, USER],
        [USER, calls, *split, {"role": "user", "content": "and?"}],
        [USER, {"role": "assistant", "content": ""}],  # an empty final assistant message
        [USER, {"role": "assistant", "content": "The answer is"}],
    ]  # a prefill
    for messages in accepted:
        status, answer = post(fake_api, body_with(messages))
        assert status == 200, answer
    assert fake_api.rejected == []


def test_max_tokens_zero_only_warms_the_cache(fake_api):
    fake_api.script(reply("scripted"))
    system = [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]
    status, answer = post(fake_api, body_with([USER], system=system, max_tokens=0))
    assert status == 200 and answer["content"] == [] and answer["stop_reason"] == "max_tokens"
    assert answer["usage"]["output_tokens"] == 0 and answer["usage"]["cache_creation_input_tokens"]
    assert usage_of(fake_api, system=system, messages=[USER]).cache_read_input_tokens > 1024
    assert fake_api.steps == []  # the scripted reply went to the second request


def test_validate_false_accepts_garbage(fake_api):
    fake_api.validate = False
    status, answer = post(
        fake_api, {"model": MODEL, "messages": [{"role": "assistant", "content": ""}]}
    )
    assert status == 200 and fake_api.rejected == []
    assert post(fake_api, ["not", "a", "request"])[0] == 200


# --- Token counts -----------------------------------------------------------------
TOOLS = [
    {
        "name": "read_file",
        "description": "Read a file in the workspace.",
        "input_schema": {
            "type": "object",
            "properties": {"path": {"type": "string"}},
            "required": ["path"],
        },
    }
]


def test_input_tokens_count_tools_system_and_messages(fake_api):
    terse = "You are terse."
    bare = usage_of(fake_api, messages=[USER]).input_tokens
    with_system = usage_of(fake_api, system=terse, messages=[USER]).input_tokens
    with_tools = usage_of(fake_api, system=terse, tools=TOOLS, messages=[USER]).input_tokens
    assert bare < with_system < with_tools
    assert with_tools == prompt_tokens({"system": terse, "tools": TOOLS, "messages": [USER]})
    again = usage_of(fake_api, system=terse, tools=TOOLS, messages=[USER]).input_tokens
    assert again == with_tools  # the same prompt counts the same
    as_block = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert usage_of(fake_api, messages=as_block).input_tokens == bare  # a string is one text block


def test_count_tokens_is_the_prompt_total(fake_api):
    api = client(fake_api)
    history = [USER, CALL, RESULT]
    counted = api.messages.count_tokens(model=MODEL, system="s", tools=TOOLS, messages=history)
    usage = api.messages.create(
        model=MODEL, max_tokens=10, system="s", tools=TOOLS, messages=history
    ).usage
    assert (
        counted.input_tokens
        == usage.input_tokens
        == prompt_tokens({"system": "s", "tools": TOOLS, "messages": history})
    )


def test_output_tokens_follow_the_reply(fake_api):
    fake_api.script(
        reply("short"),
        reply("short"),
        reply("a much longer answer " * 10),
        reply("x", usage={"output_tokens": 3, "input_tokens": 7}),
    )
    outs = [usage_of(fake_api, messages=[USER]) for _ in range(4)]
    assert outs[0].output_tokens == outs[1].output_tokens < outs[2].output_tokens
    assert (outs[3].input_tokens, outs[3].output_tokens) == (7, 3)  # an override still wins


def test_count_as_if_counts_a_path_as_the_shown_one(fake_api):
    real, shown = "/tmp/x/workspace", "/home/ada/agent-gateway/workspace"
    as_shown = usage_of(fake_api, system=f"Work in {shown}.", messages=[USER]).input_tokens
    fake_api.count_as_if = {real: shown}
    assert usage_of(fake_api, system=f"Work in {real}.", messages=[USER]).input_tokens == as_shown
    counted = client(fake_api).messages.count_tokens(
        model=MODEL, system=f"Work in {real}.", messages=[USER]
    )
    assert counted.input_tokens == as_shown


# --- Prompt caching ---------------------------------------------------------------
def cached_system(text: str = LONG, **control) -> list:
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral", **control}}]


def figures(usage) -> tuple[int, int, int]:
    return usage.cache_creation_input_tokens, usage.cache_read_input_tokens, usage.input_tokens


def test_without_cache_control_everything_is_input(fake_api):
    usage = usage_of(fake_api, system=LONG, messages=[USER])
    assert figures(usage) == (0, 0, prompt_tokens({"system": LONG, "messages": [USER]}))
    assert figures(usage_of(fake_api, system=LONG, messages=[USER]))[:2] == (0, 0)


def test_first_request_writes_the_prefix_the_second_reads_it(fake_api):
    first = usage_of(fake_api, system=cached_system(), messages=[USER])
    new = [{"role": "user", "content": "new"}]
    second = usage_of(fake_api, system=cached_system(), messages=new)
    created, read, after = figures(first)
    assert created > 1024 and read == 0
    assert after == prompt_tokens({"messages": [USER]})  # only what follows the breakpoint
    assert figures(second)[:2] == (0, created)
    assert first.cache_creation.ephemeral_5m_input_tokens == created
    count = client(fake_api).messages.count_tokens
    assert count(model=MODEL, system=cached_system(), messages=[USER]).input_tokens == (
        created + read + after
    )
    assert count(model=MODEL, system=cached_system(), messages=new).input_tokens == sum(
        figures(second)
    )


def test_a_short_prefix_is_not_cached_and_haiku_needs_more(fake_api):
    short = cached_system("A short system prompt.")
    assert figures(usage_of(fake_api, system=short, messages=[USER]))[:2] == (0, 0)
    assert figures(usage_of(fake_api, system=short, messages=[USER]))[:2] == (0, 0)
    assert figures(
        usage_of(fake_api, model="claude-haiku-test", system=cached_system(), messages=[USER])
    )[:2] == (0, 0)  # ~1,200 tokens < 2,048
    fake_api.min_cache_tokens = 10
    assert usage_of(fake_api, system=short, messages=[USER]).cache_creation_input_tokens > 0


def test_a_changed_prefix_misses(fake_api):
    at_nine = cached_system("Now: 09:00. " + LONG)
    at_ten = cached_system("Now: 10:00. " + LONG)
    created = usage_of(fake_api, system=at_nine, messages=[USER]).cache_creation_input_tokens
    assert figures(usage_of(fake_api, system=at_ten, messages=[USER]))[:2] == (created, 0)
    other_model = usage_of(fake_api, model="claude-opus-test", system=at_nine, messages=[USER])
    assert figures(other_model)[:2] == (created, 0)  # each model has its own cache


def test_entries_expire_after_their_ttl_and_a_hit_refreshes_them(fake_api):
    now = [1000.0]
    fake_api.clock = lambda: now[0]
    created = usage_of(fake_api, system=cached_system(), messages=[USER])
    created = created.cache_creation_input_tokens
    for _ in range(3):  # each hit within five minutes starts the five minutes again
        now[0] += 200
        assert usage_of(fake_api, system=cached_system(), messages=[USER]).cache_read_input_tokens
    now[0] += 301
    assert figures(usage_of(fake_api, system=cached_system(), messages=[USER]))[:2] == (created, 0)
    hour = cached_system("Kept for an hour. " + LONG, ttl="1h")
    first = usage_of(fake_api, system=hour, messages=[USER])
    created = first.cache_creation.ephemeral_1h_input_tokens
    assert created == first.cache_creation_input_tokens > 1024
    now[0] += 3000
    assert usage_of(fake_api, system=hour, messages=[USER]).cache_read_input_tokens == created
    now[0] += 3601
    assert usage_of(fake_api, system=hour, messages=[USER]).cache_read_input_tokens == 0


def conversation(turns: int) -> list:
    """A history as a multi-turn agent sends it: the breakpoint on its last block,
    so it moves forward as the conversation grows."""
    messages = []
    for n in range(turns):
        if n:
            messages.append(
                {"role": "assistant", "content": [{"type": "text", "text": f"answer {n}"}]}
            )
        messages.append({"role": "user", "content": [{"type": "text", "text": f"question {n}"}]})
    messages[-1]["content"][0]["cache_control"] = {"type": "ephemeral"}
    return messages


def test_a_moving_breakpoint_reads_what_the_last_request_wrote(fake_api):
    system = [{"type": "text", "text": LONG}]
    first = usage_of(fake_api, system=system, messages=conversation(1))
    second = usage_of(fake_api, system=system, messages=conversation(2))
    assert first.cache_read_input_tokens == 0 and first.input_tokens == 0
    assert second.cache_read_input_tokens == first.cache_creation_input_tokens
    assert (
        second.cache_creation_input_tokens
        == prompt_tokens({"system": system, "messages": conversation(2)})
        - second.cache_read_input_tokens
    )


def test_the_lookback_is_twenty_blocks(fake_api):
    system = [{"type": "text", "text": LONG}]

    def read(model: str, turns: int) -> int:
        usage = usage_of(fake_api, model=model, system=system, messages=conversation(turns))
        return usage.cache_read_input_tokens

    cached = prompt_tokens({"system": system, "messages": conversation(1)})
    assert read("claude-a", 1) == read("claude-b", 1) == 0
    assert read("claude-a", 11) == cached  # its breakpoint is 20 blocks after the cached one
    assert read("claude-b", 12) == 0  # 22 blocks after: out of sight, all written again


def test_tools_and_automatic_caching(fake_api):
    tools = [dict(TOOLS[0], description=LONG, cache_control={"type": "ephemeral"})]
    created = usage_of(fake_api, tools=tools, messages=[USER]).cache_creation_input_tokens
    assert created == prompt_tokens({"tools": tools})
    assert (
        usage_of(
            fake_api, tools=tools, messages=[USER, {"role": "assistant", "content": "ok"}, USER]
        ).cache_read_input_tokens
        == created
    )
    auto = {"system": LONG, "messages": [USER], "cache_control": {"type": "ephemeral"}}
    first = usage_of(fake_api, **auto)
    assert first.cache_creation_input_tokens == prompt_tokens(auto) and first.input_tokens == 0


def test_caching_off_accepts_cache_control_and_never_caches(fake_api):
    fake_api.caching = False
    for _ in range(2):
        usage = usage_of(fake_api, system=cached_system(), messages=[USER])
        assert figures(usage) == (0, 0, prompt_tokens({"system": LONG, "messages": [USER]}))


def test_streaming_reports_the_same_cache_usage(fake_api):
    api = client(fake_api)
    usage_of(fake_api, system=cached_system(), messages=[USER])
    with api.messages.stream(
        model=MODEL, max_tokens=10, system=cached_system(), messages=[USER]
    ) as stream:
        usage = stream.get_final_message().usage
    assert usage.cache_read_input_tokens > 1024 and usage.cache_creation_input_tokens == 0


# --- Context window ---------------------------------------------------------------
def test_a_prompt_over_the_context_window_gets_the_real_overflow_error(fake_api):
    body = {"system": LONG, "messages": [USER]}
    total = prompt_tokens(body)
    fake_api.context_window = total
    fake_api.script(reply("fits"))
    assert client(fake_api).messages.create(model=MODEL, max_tokens=10, **body).content[0].text == (
        "fits"
    )
    fake_api.context_window = total - 1
    fake_api.script(reply("never sent"))
    with pytest.raises(anthropic.BadRequestError) as caught:
        client(fake_api).messages.create(model=MODEL, max_tokens=10, **body)
    assert caught.value.type == "invalid_request_error"
    assert caught.value.api_message == f"prompt is too long: {total} tokens > {total - 1} maximum"
    assert fake_api.steps and fake_api.rejected == []  # no step taken; the request was well formed
    counted = client(fake_api).messages.count_tokens(model=MODEL, **body)
    assert counted.input_tokens == total  # counting still works: it is how a client finds out


def test_scripted_errors_still_answer(fake_api):
    fake_api.script(error(429, "rate_limit_error", "Slow down"))
    with pytest.raises(anthropic.RateLimitError):
        usage_of(fake_api, messages=[USER])


def test_the_learners_fake_calls_a_tool_answers_its_result_and_summarizes():
    """Run by hand (python tests/fake_anthropic.py), the fake lets a learner without a key
    see tools and compaction work: "!tool name {json}" calls that tool."""
    from fake_anthropic import FakeAnthropic, learner_reply

    api = FakeAnthropic()
    api.default = learner_reply
    api.start()
    try:
        client = anthropic.Anthropic(base_url=api.base_url, api_key="fake", max_retries=0)
        tools = [{"name": "read_file", "input_schema": {"type": "object"}}]
        history = [{"role": "user", "content": '!tool read_file {"path": "SOUL.md"}'}]
        first = client.messages.create(model="m", max_tokens=100, tools=tools, messages=history)
        call = first.content[-1]
        assert first.stop_reason == "tool_use" and call.name == "read_file"
        assert call.input == {"path": "SOUL.md"}
        history += [
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "# Soul\nkind"}]},
        ]
        second = client.messages.create(model="m", max_tokens=100, tools=tools, messages=history)
        assert second.content[0].text == "(fake) the tool said: # Soul"
        summary = client.messages.create(
            model="m", max_tokens=100, system="You summarize conversations.",
            messages=[{"role": "user", "content": "a long talk"}])
        assert summary.content[0].text.startswith("(fake) A summary:")
        plain = client.messages.create(
            model="m", max_tokens=100, messages=[{"role": "user", "content": "hello"}])
        assert plain.content[0].text == "(fake) you said: hello"
        # A section's prompt may mention summaries (a skill, HEARTBEAT.md): still an echo.
        first = client.messages.create(
            model="m", max_tokens=100, system="Skills: summarize a web page.", tools=tools,
            messages=[{"role": "user", "content": "Are you there?"}])
        assert first.content[0].text == "(fake) you said: Are you there?"
    finally:
        api.stop()


def test_run_by_hand_the_fake_prints_the_env_lines_to_use(tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(__file__).parent / "fake_anthropic.py"
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.PIPE,
                            text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(6)]
    finally:
        proc.terminate()
        proc.wait(10)
    assert f"  ANTHROPIC_BASE_URL=http://127.0.0.1:{port}\n" in lines
    assert "  ANTHROPIC_API_KEY=fake\n" in lines
