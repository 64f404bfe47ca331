"""s09: failures are classified by type and each class is handled by its layer: the same call
again (overloaded, 5xx), another profile after a cooldown (auth, billing, rate limit), the next
fallback model, compaction (overflow), or nothing (an invalid request is shown). Run against s09
and every later section, in-process, with a stepped clock and a sleep that only records."""

import json
import time

import pytest

from fake_anthropic import FakeAnthropic, error, reply, tool_use
from harness import Clock, assert_valid_history, main_store, section_id, sections_from, state_of

SECTIONS = sections_from("s09")
MODEL = "claude-sonnet-5-5"


@pytest.fixture(params=SECTIONS, ids=section_id)
def path(request):
    return request.param


@pytest.fixture
def second_api():
    api = FakeAnthropic().start()
    yield api
    api.stop()



@pytest.fixture
def onion(path, load, monkeypatch, second_api):
    """make(profiles=2, fallbacks="") -> (module, onion, session, clock, slept): profile 1 on
    the fake API, profile 2 on a second fake; nothing waits for real seconds."""

    def make(profiles: int = 2, fallbacks: str = ""):
        for n in range(2, 10):
            monkeypatch.delenv(f"ANTHROPIC_API_KEY_{n}", raising=False)
            monkeypatch.delenv(f"ANTHROPIC_BASE_URL_{n}", raising=False)
        extra = {"MODEL_FALLBACKS": fallbacks}
        if profiles > 1:
            extra.update(ANTHROPIC_API_KEY_2="key-2", ANTHROPIC_BASE_URL_2=second_api.base_url)
        mod = load(path, **extra)
        client, clock, slept = mod.make_client(), Clock(float(int(time.time()))), []
        client.clock, client.sleep = clock, slept.append
        return mod, client, main_store(mod).create(), clock, slept

    return make


def turn(mod, client, session, text="hello"):
    return mod.agent_turn(client, session, text)


def test_rate_limited_profile_moves_the_session_and_it_stays(onion, fake_api, second_api, capsys):
    mod, client, session, clock, slept = onion()
    fake_api.script(error(429, "rate_limit_error", "slow down"))
    for text in ("one", "two", "three"):
        assert turn(mod, client, session, text) == f"(fake) you said: {text}"
    assert len(fake_api.requests) == 1 and len(second_api.requests) == 3  # sticky on 2
    out = capsys.readouterr().out
    assert "rate limit; cooling 1 min" in out and "[profile 2 · model " in out
    assert slept == []  # a rate limit is not waited out in place
    assert client.stats["switches"] == 1 and client.stats["failures"] == {"rate_limit": 1}


def test_rate_limit_cooldowns_grow_and_honour_retry_after(onion):
    mod, client, session, clock, slept = onion(profiles=1)
    cooldowns = client.cooldowns
    lengths = [cooldowns.cool("1", MODEL, "rate_limit", None) for _ in range(5)]
    assert lengths == [60, 300, 1500, 3600, 3600]
    assert cooldowns.cool("1", MODEL, "rate_limit", 7.0) == 7.0  # the server's word wins
    assert cooldowns.entry("1", MODEL)["count"] == 6
    cooldowns.clear("1", MODEL)  # a success forgets the record
    assert cooldowns.cool("1", MODEL, "rate_limit", None) == 60


def test_retry_after_header_sets_the_cooldown(onion, fake_api, capsys):
    mod, client, session, clock, slept = onion(profiles=1)
    fake_api.script(error(429, "rate_limit_error", headers={"retry-after": "42"}),
                    error(429, "rate_limit_error"))
    assert turn(mod, client, session) is None  # one profile, no fallback: shown
    assert client.cooldowns.entry("1", MODEL)["until"] == clock.now + 42
    out = capsys.readouterr().out
    assert "rate limit; cooling 42 s" in out and "Rate limited (429)" in out
    # Still cooling, but it is the only key: tried anyway, once, and said so (never refused).
    assert turn(mod, client, session, "two") is None
    out = capsys.readouterr().out
    assert (f"[every profile is cooling down or failed; trying profile 1 · model {MODEL} anyway,"
            " once: its cooldown ends first") in out
    assert "Rate limited (429)" in out and len(fake_api.requests) == 2  # one call, no more
    assert client.cooldowns.entry("1", MODEL)["until"] == clock.now + 300  # and it grew
    assert turn(mod, client, session, "three") == "(fake) you said: three"  # tried anyway
    assert client.cooldowns.active() == []  # the key works: its record is forgotten
    capsys.readouterr()
    assert turn(mod, client, session, "four") == "(fake) you said: four"
    assert "cooling" not in capsys.readouterr().out


def test_when_all_cool_the_one_free_soonest_is_tried(onion, fake_api, second_api, capsys):
    mod, client, session, clock, slept = onion()
    client.cooldowns.cool("1", MODEL, "auth", None)         # 6 h
    client.cooldowns.cool("2", MODEL, "rate_limit", None)   # 1 min: free first
    assert turn(mod, client, session) == "(fake) you said: hello"
    assert fake_api.requests == [] and len(second_api.requests) == 1
    assert "trying profile 2 · model " in capsys.readouterr().out
    assert client.cooldowns.entry("1", MODEL)["reason"] == "auth"  # the bad key stays cooling
    assert turn(mod, client, session, "again") == "(fake) you said: again"
    assert fake_api.requests == [] and "every profile" not in capsys.readouterr().out


def test_cooldowns_survive_a_restart(onion, path, load, fake_api):
    mod, client, session, clock, slept = onion(profiles=1)
    fake_api.script(error(429, "rate_limit_error"))
    turn(mod, client, session)
    saved = json.loads((state_of(mod.WORKSPACE_DIR) / "cooldowns.json").read_text())
    assert saved[f"1|{MODEL}"]["reason"] == "rate_limit"
    assert (state_of(mod.WORKSPACE_DIR) / "cooldowns.json").stat().st_mode & 0o777 == 0o600
    again = load(path).make_client()
    again.clock = clock
    assert again.cooldowns.entry("1", MODEL)["count"] == 1
    assert again.cooldowns.cool("1", MODEL, "rate_limit", None) == 300  # it goes on growing


def test_a_rate_limited_model_does_not_cool_another_model_of_the_key(onion):
    mod, client, session, clock, slept = onion(profiles=1)
    client.cooldowns.cool("1", MODEL, "rate_limit", None)
    assert client.cooldowns.entry("1", MODEL)
    assert client.cooldowns.entry("1", "claude-haiku-5") is None
    client.cooldowns.cool("1", MODEL, "auth", None)  # a bad key is bad for every model
    assert client.cooldowns.entry("1", "claude-haiku-5")["reason"] == "auth"


@pytest.mark.parametrize(
    "step, kind, hours",
    [
        (error(401, "authentication_error"), "auth", 6),
        (error(402, "billing_error"), "billing", 24),
        (error(403, "permission_error"), "permission", 6),
    ],
)
def test_auth_billing_permission_cool_for_hours_and_move(
    onion, fake_api, second_api, step, kind, hours
):
    mod, client, session, clock, slept = onion()
    fake_api.script(step)
    assert turn(mod, client, session) == "(fake) you said: hello"
    entry = next(e for k, e in client.cooldowns.active() if k.startswith("1|"))
    assert entry["reason"] == kind and entry["until"] == clock.now + hours * 3600
    assert slept == [] and client.stats["retries"] == 0


@pytest.mark.parametrize("status, kind", [(529, "overloaded_error"), (500, "api_error")])
def test_overloaded_and_5xx_retry_the_call_in_place_first(onion, fake_api, status, kind):
    mod, client, session, clock, slept = onion()
    fake_api.script(*[error(status, kind, should_retry=True)] * 2)
    assert turn(mod, client, session) == "(fake) you said: hello"
    assert len(fake_api.requests) == 3  # the SDK's retries are off: one request per try
    assert len(slept) == 2 and 0.5 <= slept[0] <= 0.625 and 2.0 <= slept[1] <= 2.5
    assert client.stats["retries"] == 2 and client.cooldowns.active() == []


def test_overloaded_three_times_moves_on_without_cooling_the_key(onion, fake_api, second_api):
    mod, client, session, clock, slept = onion()  # profile 2 is another base URL: another service
    fake_api.script(*[error(529, "overloaded_error", should_retry=True)] * 3)
    assert turn(mod, client, session) == "(fake) you said: hello"
    assert len(fake_api.requests) == 3 and len(second_api.requests) == 1
    assert client.cooldowns.active() == []  # the service's fault, not the key's


def test_x_should_retry_false_skips_the_retry_in_place(onion, fake_api, second_api):
    mod, client, session, clock, slept = onion()
    fake_api.script(error(529, "overloaded_error", should_retry=False))  # the server's word
    assert turn(mod, client, session) == "(fake) you said: hello"
    assert len(fake_api.requests) == 1 and len(second_api.requests) == 1 and slept == []


def test_overflow_is_compacted_by_the_turn_not_retried_elsewhere(onion, fake_api, second_api):
    mod, client, session, clock, slept = onion()
    for text in ("one", "two", "three", "four", "five"):
        turn(mod, client, session, text)
    fake_api.script(error(400, "invalid_request_error", "prompt is too long: 9 tokens > 8 maximum"),
                    reply("Summary."), reply("after compaction"))
    assert turn(mod, client, session, "six") == "after compaction"
    assert second_api.requests == [] and client.cooldowns.active() == []
    assert client.stats["failures"] == {"overflow": 1}
    assert_valid_history(session.messages)


def test_an_invalid_request_is_shown_not_retried(onion, fake_api, second_api, capsys):
    mod, client, session, clock, slept = onion(fallbacks="claude-haiku-5")
    fake_api.script(error(400, "invalid_request_error", "messages.0: something is off"))
    assert turn(mod, client, session) is None
    assert len(fake_api.requests) == 1 and second_api.requests == []
    assert "something is off" in capsys.readouterr().out
    assert client.cooldowns.active() == [] and session.messages == []


def test_fallback_model_when_every_profile_cools(onion, fake_api, second_api, capsys):
    mod, client, session, clock, slept = onion(fallbacks="claude-haiku-5")
    fake_api.script(error(429, "rate_limit_error"))
    second_api.script(error(429, "rate_limit_error"))
    assert turn(mod, client, session) == "(fake) you said: hello"
    assert fake_api.requests[-1]["model"] == "claude-haiku-5"  # profile 1 is free for it
    assert "[profile 1 · model claude-haiku-5 · tokens" in capsys.readouterr().out
    assert client.stats["fallbacks"] == 1 and client.stats["switches"] == 1


def test_no_fallback_after_auth_failures_then_one_try_anyway(onion, fake_api, second_api,
                                                             capsys):
    mod, client, session, clock, slept = onion(fallbacks="claude-haiku-5")
    fake_api.script(error(401, "authentication_error"), error(401, "authentication_error"))
    second_api.script(error(401, "authentication_error"))
    assert turn(mod, client, session) is None
    assert len(fake_api.requests) == 1 and len(second_api.requests) == 1  # no haiku call
    assert "The API rejected the key (401)" in capsys.readouterr().out
    assert turn(mod, client, session, "two") is None  # every key cooling: profile 1, once
    out = capsys.readouterr().out
    assert f"trying profile 1 · model {MODEL} anyway, once" in out and "(401)" in out
    assert len(fake_api.requests) == 2 and len(second_api.requests) == 1
    assert all(r["model"] == MODEL for r in fake_api.requests + second_api.requests)


def test_a_tool_runs_once_although_the_call_after_it_fails_twice(onion, fake_api, second_api):
    mod, client, session, clock, slept = onion()
    command = "echo ran >> log.txt"
    mod.approve_at_terminal = lambda command: None  # the person allows it
    fake_api.script(
        reply(tools=[tool_use("bash", {"command": command})]),
        error(529, "overloaded_error", should_retry=True),
        error(500, "api_error", should_retry=True),
        reply("Done."),
    )
    assert turn(mod, client, session, "log it") == "Done."
    assert (mod.WORKSPACE_DIR / "log.txt").read_text() == "ran\n"
    assert len(fake_api.requests) == 4 and client.stats["retries"] == 2
    assert_valid_history(session.messages)


def test_stats_match_what_happened(onion, fake_api, second_api, capsys):
    mod, client, session, clock, slept = onion()
    fake_api.script(error(529, "overloaded_error", should_retry=True))
    turn(mod, client, session, "a")  # 2 calls, 1 retry
    mod.simulate_model_failure(Repl(mod, client, session), "rate_limit")
    turn(mod, client, session, "b")  # 1 simulated failure on profile 1, then profile 2
    turn(mod, client, session, "c")  # profile 2 again
    mod.show_stats(Repl(mod, client, session), "")
    out = capsys.readouterr().out
    assert ("Model calls 5 · answered 3 · retries in place 1 · profile switches 1 · "
            "fallbacks 0") in out
    assert "Failures by class: overloaded 1, rate_limit 1" in out
    assert len(fake_api.requests) == 2 and len(second_api.requests) == 2  # simulated: no request


def Repl(mod, client, session):
    return mod.Repl(client, session, None, None)


@pytest.mark.parametrize("kind", ["auth", "billing", "permission", "rate_limit", "overloaded",
                                  "server", "connection", "overflow", "invalid"])
def test_simulated_failures_are_classified_like_real_ones(onion, kind):
    mod, client, session, clock, slept = onion(profiles=1)
    client.injected.append(kind)
    with pytest.raises(mod.anthropic.APIError) as caught:
        client.fail_if_asked()
    assert mod.failure_kind(caught.value) == kind
    assert mod.describe_api_error(caught.value)


def test_a_failure_after_words_were_shown_is_not_retried(onion, fake_api, second_api, capsys):
    mod, client, session, clock, slept = onion()
    fake_api.script(reply("Half a sentence and then", stream_error=("overloaded_error", "busy")))
    assert turn(mod, client, session) is None
    assert len(fake_api.requests) == 1 and second_api.requests == [] and slept == []
    assert "not retried, so nothing is said twice" in capsys.readouterr().out
    assert turn(mod, client, session, "again") == "(fake) you said: again"
    assert len(second_api.requests) == 1  # profile 1 cools: the next message went to 2


def test_profiles_file_and_fingerprints(onion, path, load, fake_api, capsys):
    mod, *_ = onion(profiles=1)
    secret = "sk-ant-very-secret-key"
    state = state_of(mod.WORKSPACE_DIR)
    state.mkdir(exist_ok=True)
    (state / "profiles.json").write_text(json.dumps({"profiles": [
        {"name": "work", "api_key": secret, "base_url": fake_api.base_url},
        {"name": "home", "api_key": "other", "base_url": fake_api.base_url}]}))
    mod = load(path)
    client = mod.make_client()
    assert [p.name for p in client.profiles] == ["work", "home"]
    mod.show_profiles(Repl(mod, client, main_store(mod).create()), "")
    out = capsys.readouterr().out
    assert secret not in out and "key#" in out and "* profile work" in out
    (state / "profiles.json").write_text('{"profiles": [{"name": "../x"}]}')
    with pytest.raises(SystemExit) as exited:
        load(path).make_client()
    assert exited.value.code == 2 and "profiles[0]" in capsys.readouterr().err


def test_a_corrupt_cooldowns_file_is_dropped_not_obeyed(onion, workspace, fake_api, capsys):
    state = state_of(workspace)
    state.mkdir(exist_ok=True)
    now = time.time()
    (state / "cooldowns.json").write_text(json.dumps({
        "1|*": {"until": 1e300, "reason": "auth", "count": 1},  # would block every call for good
        f"1|{MODEL}": {"until": now + 60, "reason": "rate_limit", "count": "x"},
        "2|*": {"until": float("nan"), "reason": "auth", "count": 1},
        "3|m": {"until": now + 60, "reason": "\x1b[2J", "count": 1}, "4": 5,
        "5|m": {"until": now + 60, "reason": "rate_limit", "count": 2}}))  # this one is sound
    mod, client, session, clock, slept = onion(profiles=1)
    assert "dropped 5 of its 6 entries" in capsys.readouterr().out
    assert [key for key, _ in client.cooldowns.active()] == ["5|m"]
    assert turn(mod, client, session) == "(fake) you said: hello"
    fake_api.script(error(429, "rate_limit_error"))
    assert turn(mod, client, session, "two") is None  # cool() works: no TypeError
    mod.show_cooldowns(Repl(mod, client, session), "")
    mod.show_profiles(Repl(mod, client, session), "")
    assert "rate limit #1" in capsys.readouterr().out
    assert mod.shown_clock(1e300) == "?" and mod.shown_seconds(1e300) == "?"


def test_an_overload_everywhere_costs_one_budget_not_every_key_and_model(onion, fake_api,
                                                                          capsys):
    mod, _, session, clock, slept = onion(profiles=1)
    profiles = [mod.Profile(str(n), f"key-{n}", fake_api.base_url) for n in range(1, 10)]
    client = mod.Onion(profiles, ["claude-haiku-5", "claude-opus-5"], clock, slept.append)
    fake_api.script(*[error(529, "overloaded_error", should_retry=True)] * 81)
    assert turn(mod, client, session) is None
    assert len(fake_api.requests) == 6 and sum(slept) <= 20  # it was 81 requests and 76 s
    assert [r["model"] for r in fake_api.requests] == [MODEL] * 3 + ["claude-haiku-5"] * 3
    assert client.stats["switches"] == 0 and client.stats["fallbacks"] == 1  # one key
    assert client.cooldowns.active() == [] and "overloaded (529)" in capsys.readouterr().out


def test_a_passing_failure_does_not_break_a_compaction(onion, fake_api):
    mod, client, session, clock, slept = onion(profiles=1)
    for text in ("one", "two", "three", "four", "five"):
        turn(mod, client, session, text)
    fake_api.script(error(400, "invalid_request_error", "prompt is too long: 9 tokens > 8 maximum"),
                    error(529, "overloaded_error", should_retry=True),  # the summary's call
                    reply("Summary."), reply("after compaction"))
    assert turn(mod, client, session, "six") == "after compaction"
    assert len(slept) == 1
    assert_valid_history(session.messages)


@pytest.mark.parametrize("status, kind", [(408, "timeout_error"), (409, "conflict_error")])
def test_408_and_409_are_retried_in_place(onion, fake_api, status, kind):
    mod, client, session, clock, slept = onion(profiles=1)
    fake_api.script(error(status, kind, should_retry=True))
    assert turn(mod, client, session) == "(fake) you said: hello"
    assert len(fake_api.requests) == 2 and len(slept) == 1


def test_a_fallback_model_not_served_does_not_hide_the_first_failure(onion, fake_api, capsys):
    mod, client, session, clock, slept = onion(profiles=1, fallbacks="claude-haiku-5")
    fake_api.script(error(429, "rate_limit_error"),
                    error(404, "not_found_error", "model: claude-haiku-5"))
    assert turn(mod, client, session) is None
    out = capsys.readouterr().out
    assert "Rate limited (429)" in out and "(404)" not in out


def test_commands_escape_what_they_show_and_hide_url_passwords(onion, capsys):
    mod, _, session, clock, slept = onion(profiles=1)
    profile = mod.Profile("1", "key", "http://ada:s3cret@127.0.0.1:9/v1")
    client = mod.Onion([profile], [], clock, slept.append)
    client.cooldowns.cool("1", "evil\x1b[2J", "rate_limit", None)
    mod.show_profiles(Repl(mod, client, session), "")
    mod.show_cooldowns(Repl(mod, client, session), "")
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.count("evil\\x1b[2J") == 2
    assert "s3cret" not in out and "http://***@127.0.0.1:9/v1" in out


def test_the_fallback_step_works_right_after_the_try_it(onion, fake_api, capsys):
    mod, client, session, clock, slept = onion(profiles=1, fallbacks="claude-haiku-5")
    client.cooldowns.cool("1", MODEL, "rate_limit", None)  # what the Try it leaves, for 1 min
    mod.simulate_model_failure(Repl(mod, client, session), "rate_limit")
    assert turn(mod, client, session) == "(fake) you said: hello"  # lands on the fallback
    out = capsys.readouterr().out
    assert "[profile 1 · model claude-haiku-5: rate limit; cooling 1 min]" in out
    assert f"trying profile 1 · model {MODEL} anyway, once" in out
    clock.now += 3600  # later: the main model is free, the simulated 429 lands on it
    mod.simulate_model_failure(Repl(mod, client, session), "rate_limit")
    assert turn(mod, client, session, "two") == "(fake) you said: two"
    assert "[profile 1 · model claude-haiku-5 · tokens" in capsys.readouterr().out


def test_a_call_that_starts_on_a_fallback_model_counts_as_a_fallback(onion, fake_api):
    mod, client, session, clock, slept = onion(profiles=1, fallbacks="claude-haiku-5")
    client.cooldowns.cool("1", MODEL, "rate_limit", None)
    assert turn(mod, client, session) == "(fake) you said: hello"
    assert fake_api.requests[-1]["model"] == "claude-haiku-5"
    assert client.stats["fallbacks"] == 1 and client.stats["switches"] == 0


def test_rate_limit_steps_reset_only_on_a_success_of_that_key_and_model(onion):
    mod, client, session, clock, slept = onion(profiles=1)
    cooldowns = client.cooldowns
    assert cooldowns.cool("1", MODEL, "rate_limit", None) == 60
    clock.now += 2 * 3600  # the cooldown ends: the next 429 still counts as one more in a row
    assert cooldowns.cool("1", MODEL, "rate_limit", None) == 300
    cooldowns.clear("2", MODEL)  # a success of another key,
    cooldowns.clear("1", "claude-haiku-5")  # or of this key with another model: no reset
    assert cooldowns.cool("1", MODEL, "rate_limit", None) == 1500
    cooldowns.clear("1", MODEL)  # a success of this key and model: from the first step again
    assert cooldowns.cool("1", MODEL, "rate_limit", None) == 60


def test_profiles_and_cooldowns_say_the_same_in_whole_minutes(onion, capsys):
    mod, client, session, clock, slept = onion(profiles=1)
    client.cooldowns.cool("1", MODEL, "auth", None)
    clock.now += 60.5
    mod.show_profiles(Repl(mod, client, session), "")
    assert "cooling: all models: auth, 5 h 59 min left" in capsys.readouterr().out
    mod.show_cooldowns(Repl(mod, client, session), "")
    assert "profile 1 · all models: auth #1, until " in capsys.readouterr().out
