"""s03: sessions on disk and the context guard. Run against s03 and every later section."""

import json
import random

import pytest

from fake_anthropic import error, reply, tool_use
from harness import (
    assert_valid_history,
    drive_repl,
    run_section,
    section_id,
    sections_from,
    main_store,
    state_of,
    whole_process_only,
)

SECTIONS = sections_from("s03")
ids = [section_id(p) for p in SECTIONS]
pytestmark = pytest.mark.parametrize("path", SECTIONS, ids=ids)


def sessions_dir(workspace):
    return state_of(workspace) / "sessions" / "main"


def random_history(mod, rng: random.Random, session) -> None:
    """Grow a valid history the way agent_turn does, saving at each consistent point."""
    messages = session.messages
    for turn in range(rng.randint(1, 6)):
        mod.add_user_text(
            messages, rng.choice(["hi", "list files", "日本語もどうぞ", 'a\nb "quoted"', "ok"])
        )
        for _ in range(rng.randint(0, 3)):
            calls = [
                {
                    "type": "tool_use",
                    "id": f"toolu_{turn}_{rng.randrange(10**9)}",
                    "name": "read_file",
                    "input": {"path": rng.choice(["a.md", "b/c.txt"])},
                }
                for _ in range(rng.randint(1, 3))
            ]
            text = [{"type": "text", "text": "Let me check."}] if rng.random() < 0.5 else []
            messages.append({"role": "assistant", "content": text + calls})
            messages.append(
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": c["id"],
                            "content": rng.choice(["ok", "file not found"]),
                            "is_error": rng.random() < 0.3,
                        }
                        for c in calls
                    ],
                }
            )
            session.save()
        if rng.random() < 0.8:  # otherwise the turn was interrupted after its tools: no final reply
            messages.append(
                {"role": "assistant", "content": [{"type": "text", "text": f"Answer {turn}"}]}
            )
            session.save()


def test_random_histories_round_trip_exactly(path, load):
    mod = load(path)
    for seed in range(40):
        rng = random.Random(seed)
        store = main_store(mod)
        session = store.create()
        random_history(mod, rng, session)
        assert_valid_history(session.messages)
        reopened = main_store(mod).open(session.id)
        assert reopened.messages == session.messages, f"seed {seed}"


def test_session_file_is_append_only_jsonl(path, load, workspace):
    mod = load(path)
    store = main_store(mod)
    session = store.create()
    random_history(mod, random.Random(7), session)
    lines = store.path(session.id).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert {r["type"] for r in records} == {"message"}  # no rewrite: every save was an append
    index = json.loads((sessions_dir(workspace) / "sessions.json").read_text())
    assert index["current"] == session.id


def test_a_thousand_turns_append_exactly_their_records_and_never_rewrite_the_index(
    path, load, workspace
):
    mod = load(path)
    store = main_store(mod)
    session = store.create()
    index_file = sessions_dir(workspace) / "sessions.json"
    index_before = index_file.stat().st_mtime_ns, index_file.read_text()
    for turn in range(1000):
        mod.add_user_text(session.messages, f"question {turn}")
        session.messages.append({"role": "assistant", "content": [{"type": "text", "text": "ok"}]})
        session.save()
    lines = store.path(session.id).read_text().splitlines()
    assert len(lines) == 2000  # one record per message: nothing written twice, no snapshot
    assert [json.loads(line)["message"] for line in lines] == session.messages
    assert (index_file.stat().st_mtime_ns, index_file.read_text()) == index_before


def test_a_crash_in_the_middle_of_an_append_loses_only_that_line(path, load):
    mod = load(path)
    store = main_store(mod)
    session = store.create()
    for turn in range(50):
        mod.add_user_text(session.messages, f"q{turn}")
        session.messages.append({"role": "assistant", "content": [{"type": "text", "text": "a"}]})
        session.save()
    with open(store.path(session.id), "ab") as f:  # the process died while writing this line
        f.write(b'{"type": "message", "ts": "2026", "message": {"role": "user", "cont')
    reopened = main_store(mod).open(session.id)
    assert reopened.messages == session.messages
    mod.add_user_text(reopened.messages, "after the crash")
    reopened.save()
    assert main_store(mod).open(session.id).messages[-1] == {
        "role": "user",
        "content": "after the crash",
    }


def test_restart_then_continue_a_session_that_used_tools(
    path, load, fake_api, monkeypatch, capsys, workspace
):
    fake_api.script(
        reply("Looking.", tools=[tool_use("write_file", {"path": "n.txt", "content": "1"})]),
        reply("Saved n.txt."),
    )
    code, out = drive_repl(load(path), ["save a note"], monkeypatch, capsys)
    assert "Saved n.txt." in out
    fake_api.script(reply("You asked me to save a note."))
    code, out = drive_repl(
        load(path), ["what did I ask before?"], monkeypatch, capsys
    )  # a new process, same disk
    assert "resumed, 4 messages" in out
    sent = fake_api.requests[-1]["messages"]
    assert_valid_history(sent)
    assert sent[0] == {"role": "user", "content": "save a note"}
    assert sent[-1] == {"role": "user", "content": "what did I ask before?"}
    assert len(sent) == 5


def test_corrupt_and_torn_lines_are_skipped_with_a_warning(path, load, capsys):
    mod = load(path)
    store = main_store(mod)
    session = store.create()
    session.messages.extend(
        [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
        ]
    )
    session.save()
    file = store.path(session.id)
    with open(file, "a") as f:
        f.write("this is not json\n")
        f.write('{"type": "message", "message": {"role": "user"}}\n')  # valid JSON, wrong shape
        f.write(
            '{"type": "message", "message": {"role": "user", "content": "thr'
        )  # torn by a crash
    reopened = main_store(mod).open(session.id)
    out = capsys.readouterr().out
    assert reopened.messages == session.messages[:2]
    assert f"{file.name}:3: skipped a corrupt" in out and f"{file.name}:5: skipped a corrupt" in out
    assert f"{file.name}:4: skipped a record of unknown shape" in out
    # Said once: the file is rewritten from what could be read, the original kept beside it.
    assert "rewritten from what could be read" in out
    (kept,) = file.parent.glob(f"{session.id}.damaged-*.bak")
    assert "this is not json" in kept.read_text() and (kept.stat().st_mode & 0o777) == 0o600
    again = main_store(mod).open(session.id)
    assert again.messages == session.messages[:2] and "skipped" not in capsys.readouterr().out
    assert [s[0] for s in main_store(mod).listing()].count(session.id) == 1  # .bak not listed
    # A crash tears a line while the session stays open: the next append starts a fresh line.
    with open(file, "a") as f:
        f.write('{"type": "message", "message": {"role": "user", "content": "thr')
    again.messages.append({"role": "user", "content": "four"})
    again.save()
    assert main_store(mod).open(session.id).messages[-1] == {"role": "user", "content": "four"}


def test_unanswered_tool_use_at_the_end_is_repaired(path, load, capsys):
    mod = load(path)
    store = main_store(mod)
    session = store.create()
    call = {"type": "tool_use", "id": "toolu_lost", "name": "bash", "input": {"command": "ls"}}
    with open(store.path(session.id), "a") as f:
        for message in [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [call]},
        ]:
            f.write(json.dumps({"type": "message", "message": message}) + "\n")
    reopened = main_store(mod).open(session.id)
    assert_valid_history(reopened.messages)
    result = reopened.messages[-1]["content"][0]
    assert result["tool_use_id"] == "toolu_lost" and result["is_error"] is True
    assert "answered 1 tool call that had no result" in capsys.readouterr().out


def test_a_lost_call_line_drops_its_orphan_result(path, load):
    mod = load(path)
    store = main_store(mod)
    session = store.create()
    lines = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_gone", "content": "x"},
                {"type": "text", "text": "and then?"},
            ],
        },
    ]
    with open(store.path(session.id), "a") as f:
        for message in lines:
            f.write(json.dumps({"type": "message", "message": message}) + "\n")
    reopened = main_store(mod).open(session.id)
    assert reopened.messages[-1] == {
        "role": "user",
        "content": [{"type": "text", "text": "and then?"}],
    }
    assert_valid_history(reopened.messages)


def test_corrupt_index_is_moved_aside_and_rebuilt(path, load, capsys, workspace):
    mod = load(path)
    store = main_store(mod)
    session = store.create("keep me")
    session.messages.append({"role": "user", "content": "hello"})
    session.save()
    (sessions_dir(workspace) / "sessions.json").write_text("{broken")
    rebuilt = main_store(mod)
    assert session.id in rebuilt.index["sessions"]
    assert list(sessions_dir(workspace).glob("sessions.corrupt-*.json"))
    assert "is not valid" in capsys.readouterr().out
    assert rebuilt.open(session.id).messages == [{"role": "user", "content": "hello"}]


def test_new_list_and_switch_by_label(path, load, fake_api, monkeypatch, capsys):
    fake_api.script(reply("Noted, work."), reply("Noted, holiday."), reply("We talked about work."))
    code, out = drive_repl(
        load(path),
        [
            "/new work",
            "about work",
            "/new holiday",
            "about the holiday",
            "/list",
            "/switch wo",
            "what did we talk about?",
            "/switch 20",
            "/switch nothing-like-this",
            "/switch",
        ],
        monkeypatch,
        capsys,
    )
    assert "(work): new, 0 messages" in out and "(holiday): new, 0 messages" in out
    assert "(work): switched, 2 messages" in out
    assert fake_api.requests[-1]["messages"][0] == {"role": "user", "content": "about work"}
    assert "matches 3 sessions" in out  # the first, unnamed session and the two named ones
    assert "No session matches 'nothing-like-this'" in out and "Usage: /switch" in out
    listed = [line for line in out.splitlines() if "  updated 2" in line]
    assert len(listed) == 3
    assert [line for line in listed if line.startswith("  * ")] == [
        line for line in listed if "(holiday)" in line
    ]


def test_context_command_counts_with_the_api_or_estimates(
    path, load, fake_api, monkeypatch, capsys
):
    fake_api.script(reply("Hello."))
    code, out = drive_repl(load(path), ["hi", "/context"], monkeypatch, capsys)
    assert (
        "tokens (counted by the API) of a 1,000,000-token window; compaction at 750,000 (75%); "
        "2 messages"
    ) in out
    fake_api.count_tokens_status = 404  # a local server without the endpoint
    fake_api.script(reply("Hello again."))
    code, out = drive_repl(load(path), ["hi", "/context", "/context"], monkeypatch, capsys)
    assert out.count("(estimated from characters)") == 2
    assert len(fake_api.count_requests) == 2  # the 404 was asked once, then never again


def test_a_short_chat_sends_nothing_but_its_turns(path, load, fake_api, monkeypatch, capsys):
    """The guard estimates from the last call's usage: no count_tokens request before a turn."""
    code, out = drive_repl(load(path), ["one", "two", "three", "four"], monkeypatch, capsys)
    assert len(fake_api.requests) == 4 and fake_api.count_requests == []


def test_the_estimate_follows_the_reported_usage(path, load, fake_api, capsys):
    """The prompt's size comes from the last response's usage; only near the limit (75% of
    the window by default) is count_tokens asked for the exact number."""
    mod = load(path)
    session = main_store(mod).create()
    guard = mod.ContextGuard(mod.make_client())
    fake_api.script(
        reply("ok", usage={"input_tokens": 500_000, "cache_read_input_tokens": 100_000,
                           "cache_creation_input_tokens": 0})
    )
    mod.agent_turn(mod.make_client(), session, "hello", guard)
    assert session.prompt_tokens == 600_000
    assert 600_000 < guard.estimate(session, "next") < 600_100
    mod.agent_turn(mod.make_client(), session, "below the margin", guard)
    assert fake_api.count_requests == []
    # past 90% of the 750,000 limit:
    fake_api.script(reply("ok", usage={"input_tokens": 700_000, "cache_read_input_tokens": 0,
                                       "cache_creation_input_tokens": 0}))
    mod.agent_turn(mod.make_client(), session, "close to the limit", guard)
    mod.agent_turn(mod.make_client(), session, "checked", guard)
    assert len(fake_api.count_requests) == 1  # the real count is small: no compaction
    assert "compacting" not in capsys.readouterr().out


def big_history(mod, session, exchanges=12):
    """A history with many tool exchanges, each result large."""
    for i in range(exchanges):
        mod.add_user_text(session.messages, f"question {i}")
        call = {
            "type": "tool_use",
            "id": f"toolu_{i}",
            "name": "read_file",
            "input": {"path": f"f{i}.md"},
        }
        session.messages.append({"role": "assistant", "content": [call]})
        session.messages.append(
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": f"toolu_{i}",
                        "content": "x" * 3000,
                        "is_error": False,
                    }
                ],
            }
        )
        session.messages.append(
            {"role": "assistant", "content": [{"type": "text", "text": f"answer {i}"}]}
        )
    session.save()


def test_compaction_keeps_tool_pairs_together_and_survives_restart(path, load, fake_api, capsys):
    mod = load(path, CONTEXT_WINDOW="20000", COMPACT_THRESHOLD="0.5")
    store = main_store(mod)
    session = store.create()
    big_history(mod, session)
    before = list(session.messages)
    fake_api.script(reply("The person asked twelve questions about files f0..f11."))
    assert mod.ContextGuard(mod.make_client()).compact(session, "test")
    messages = session.messages
    assert_valid_history(messages)
    opening = messages[0]["content"]
    assert opening[0]["text"].startswith(mod.SUMMARY_PREFIX)
    assert "twelve questions" in opening[0]["text"]
    kept = before[
        -len(messages) :
    ]  # the recent part is kept verbatim, its first turn after the summary
    assert opening[1:] == mod.as_blocks(kept[0]["content"]) and messages[1:] == kept[1:]
    assert len(messages) < len(before)
    summary_request = fake_api.requests[-1]
    assert "question 0" in summary_request["messages"][0]["content"]
    restarted = main_store(mod).open(session.id)
    assert restarted.messages == messages
    records = [json.loads(line) for line in store.path(session.id).read_text().splitlines()]
    assert records[-1]["type"] == "snapshot" and records[-1]["reason"] == "compaction"


def test_threshold_compacts_before_the_turn(path, load, fake_api, monkeypatch, capsys):
    mod = load(path, CONTEXT_WINDOW="20000", COMPACT_THRESHOLD="0.5")
    session = main_store(mod).create()
    big_history(mod, session)
    fake_api.script(reply("Summary: twelve questions."), reply("Fresh answer."))
    assert mod.agent_turn(mod.make_client(), session, "one more") == "Fresh answer."
    out = capsys.readouterr().out
    assert "[context] compacting" in out
    sent = fake_api.requests[-1]["messages"]
    assert_valid_history(sent)
    assert sent[0]["content"][0]["text"].startswith(mod.SUMMARY_PREFIX)
    assert sent[-1]["content"] == "one more"
    assert "still about" not in out


def test_a_turn_still_over_the_limit_after_compacting_says_so(path, load, fake_api, capsys):
    mod = load(path, CONTEXT_WINDOW="20000", COMPACT_THRESHOLD="0.5")
    session = main_store(mod).create()
    big_history(mod, session)
    fake_api.script(reply("Summary: twelve questions."), reply("Answered anyway."))
    mod.agent_turn(mod.make_client(), session, "x" * 40_000)  # alone past the 10,000-token limit
    out = capsys.readouterr().out
    assert "[context] compacting" in out and "the last exchange alone passes the limit" in out


def test_overflow_error_compacts_and_retries_once(path, load, fake_api, capsys):
    mod = load(path)
    session = main_store(mod).create()
    big_history(mod, session, exchanges=3)
    fake_api.script(
        error(400, "invalid_request_error", "prompt is too long: 1000512 tokens > 1000000 maximum"),
        reply("Summary of three questions."),
        reply("Answer after compaction."),
    )
    assert mod.agent_turn(mod.make_client(), session, "next question") == "Answer after compaction."
    assert "context window overflowed" in capsys.readouterr().out
    retried = fake_api.requests[-1]["messages"]
    assert_valid_history(retried)
    assert retried[0]["content"][0]["text"].startswith(mod.SUMMARY_PREFIX)
    assert retried[-1] == {"role": "user", "content": "next question"}
    assert main_store(mod).open(session.id).messages == session.messages


def test_overflow_stop_reason_compacts_and_retries(path, load, fake_api, capsys):
    mod = load(path)
    session = main_store(mod).create()
    big_history(mod, session, exchanges=3)
    fake_api.script(
        reply("Partial", stop_reason="model_context_window_exceeded"),
        reply("Summary."),
        reply("Complete answer."),
    )
    assert mod.agent_turn(mod.make_client(), session, "go on") == "Complete answer."
    assert_valid_history(session.messages)
    assert session.messages[-1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "Complete answer."}],
    }


def test_overflow_twice_says_so_and_the_session_stays_usable(path, load, fake_api, capsys):
    mod = load(path)
    session = main_store(mod).create()
    big_history(mod, session, exchanges=3)
    too_long = error(
        400, "invalid_request_error", "prompt is too long: 2000000 tokens > 1000000 maximum"
    )
    fake_api.script(too_long, reply("Summary."), too_long, reply("Back to normal."))
    assert mod.agent_turn(mod.make_client(), session, "huge") is None
    assert "too long for the model, even after compaction" in capsys.readouterr().out
    assert_valid_history(session.messages)
    assert mod.agent_turn(mod.make_client(), session, "small") == "Back to normal."


def test_rate_limit_is_not_mistaken_for_an_overflow(path, load, fake_api, capsys):
    mod = load(path)
    session = main_store(mod).create()
    big_history(mod, session, exchanges=3)
    # Even with those words in its message, a 429 is a rate limit: no compaction, no retry.
    fake_api.script(error(429, "rate_limit_error", "prompt is too long for your rate limit"))
    before = list(session.messages)
    assert mod.agent_turn(mod.make_client(), session, "hello") is None
    out = capsys.readouterr().out
    assert "Rate limited (429)" in out and "compacting" not in out
    assert len(fake_api.requests) == 1 and session.messages == before
    # and a different 400 is not an overflow either
    fake_api.script(error(400, "invalid_request_error", "messages: roles must alternate"))
    assert mod.agent_turn(mod.make_client(), session, "hello") is None
    assert "compacting" not in capsys.readouterr().out


def test_compact_command_on_an_empty_session_says_so(path, load, fake_api, monkeypatch, capsys):
    code, out = drive_repl(load(path), ["/compact"], monkeypatch, capsys)
    assert "nothing to compact yet (it keeps your last 4 exchanges)" in out
    assert fake_api.requests == []


def test_compact_on_request_keeps_the_last_four_exchanges_whatever_the_window(
    path, load, fake_api, monkeypatch, capsys
):
    """The default window is 1,000,000 tokens: a share of it would keep everything."""
    mod = load(path)
    inputs = [f"message {n}" for n in range(6)] + ["/compact", "/compact"]
    fake_api.script(
        *[reply(f"answer {n}") for n in range(6)],
        reply("Six short exchanges."),
        reply("Still the same."),
    )
    code, out = drive_repl(mod, inputs, monkeypatch, capsys)
    assert "summarizing 4 older messages" in out and "compacted: 12 messages -> 8" in out
    sent = fake_api.requests[6]["messages"][0]["content"]
    assert "message 0" in sent and "message 1" in sent and "message 2" not in sent
    assert "summarizing" in out.split("/compact")[2]  # asked again, it summarizes again
    session = main_store(mod).resume()
    assert_valid_history(session.messages)
    assert session.messages[0]["content"][1] == {"type": "text", "text": "message 2"}


def test_a_hand_broken_index_and_session_file_are_repaired_with_a_line(
    path, load, capsys, workspace
):
    mod = load(path)
    store = main_store(mod)
    session = store.create()
    with open(store.path(session.id), "a") as f:
        for message in [
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "name": "bash", "input": {}}],
            },  # no id
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}, 7]},
        ]:
            f.write(json.dumps({"type": "message", "message": message}) + "\n")
    index = json.loads((sessions_dir(workspace) / "sessions.json").read_text())
    index["current"] = ["not", "an", "id"]
    (sessions_dir(workspace) / "sessions.json").write_text(json.dumps(index))
    reopened = main_store(mod)
    assert "is not valid ('current' must be a session id or null)" in capsys.readouterr().out
    messages = reopened.open(session.id).messages
    assert_valid_history(messages)
    assert messages == [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
    ]


def test_end_to_end_restart_remembers(path, fake_api, subprocess_env, workspace):
    whole_process_only(path, "s03")
    fake_api.script(
        reply("I'll check.", tools=[tool_use("list_dir", {})]), reply("There are ten entries.")
    )
    first = run_section(path, ["what is in the workspace?", "quit"], subprocess_env())
    assert first.returncode == 0, first.stderr
    fake_api.script(reply("You asked what is in the workspace."))
    second = run_section(path, ["what did I ask you?", "quit"], subprocess_env())
    assert second.returncode == 0, second.stderr
    assert "resumed, 4 messages" in second.transcript
    sent = fake_api.requests[-1]["messages"]
    assert sent[0] == {"role": "user", "content": "what is in the workspace?"}
    assert_valid_history(sent)


def test_ctrl_c_during_compaction_leaves_the_session_as_it_was(
    path, load, fake_api, monkeypatch, capsys
):
    mod = load(path)
    session = main_store(mod).create()
    big_history(mod, session, exchanges=3)
    before = list(session.messages)
    guard = mod.ContextGuard(mod.make_client())

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(guard.client.messages, "create", interrupted)
    assert guard.compact(session, "test") is False
    assert session.messages == before
    assert "compaction interrupted" in capsys.readouterr().out
    assert main_store(mod).open(session.id).messages == before


def test_two_sessions_started_in_one_second_with_the_same_suffix_get_two_files(
    path, load, monkeypatch
):
    mod = load(path)
    store = main_store(mod)
    draws = iter([b"\x7f\x3a", b"\x7f\x3a", b"\x00\x01"])
    monkeypatch.setattr(
        mod.time, "strftime", lambda fmt, *a: "20261121-093000" if "%H" in fmt else fmt
    )
    monkeypatch.setattr(mod.os, "urandom", lambda n: next(draws))
    first, second = store.create("one"), store.create("two")
    assert (first.id, second.id) == ("20261121-093000-7f3a", "20261121-093000-0001")
    first.messages.append({"role": "user", "content": "mine"})
    first.save()
    assert store.path(second.id).read_text() == ""
