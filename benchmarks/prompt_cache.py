"""How much of the prompt the API reads from its cache: python benchmarks/prompt_cache.py [s06 ...]

For every section from s06 on (sections added later join automatically) it runs the same
20-turn chat twice against the fake Messages API, which accounts prompt caching the way the
real API documents it (tests/fake_anthropic.py: a prefix up to a breakpoint, seen before, at
least 1,024 tokens for this model, read for 5 minutes):
- as the section sends it: the stable system part with a cache_control breakpoint, and the
  top-level cache_control that puts a second one on the last block of the conversation;
- the baseline: the same requests with every cache_control taken out.
It prints, for each, the share of prompt tokens read from the cache, and what the prompt
costs in units of uncached input tokens (a cache write costs 1.25, a cache read 0.1).
Figures are printed, never asserted. Needs no key.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.dont_write_bytecode = True

from fake_anthropic import FakeAnthropic, last_user_text, reply, tool_use  # noqa: E402
from harness import copy_workspace, load_section, section_env_values, section_files  # noqa: E402

TURNS = 20
QUESTIONS = [
    "What is in my workspace?", "Read MEMORY.md and tell me what you know about me.",
    "Plan my week: three priorities.", "Rewrite the first priority as one sentence.",
    "What could go wrong with it?", "How would you test that?", "Summarize our plan so far.",
]


def answer(body: dict):
    """A reply of a realistic length; every fifth turn reads a file first."""
    text, turn = last_user_text(body), len(body["messages"]) // 2
    if text != "(tool results)" and turn % 5 == 4:
        return reply("Let me look.", tools=[tool_use("read_file", {"path": "MEMORY.md"})])
    return reply(f"About '{text[:40]}': " + "here is a considered answer, a few sentences long. "
                 * 8)


class WithoutCache:
    """The section's client with every cache_control taken out of its requests: the baseline."""

    def __init__(self, client):
        self.client, self.messages = client, self

    def stream(self, **request):
        request.pop("cache_control", None)
        request["system"] = [{k: v for k, v in block.items() if k != "cache_control"}
                             for block in request["system"]]
        return self.client.messages.stream(**request)


def chat(mod, client) -> list:
    """TURNS turns in a new session; the usage of every model call."""
    usages = []
    mod.print_usage = lambda message, out: usages.append(message.usage)  # record, print nothing
    session = mod.SessionStore(mod.SESSIONS_ROOT / mod.AGENT_ID).create()
    silent, stdout = open(os.devnull, "w"), sys.stdout
    sys.stdout = silent
    try:
        for turn in range(TURNS):
            mod.agent_turn(client, session, f"{QUESTIONS[turn % len(QUESTIONS)]} (turn {turn + 1})")
    finally:
        sys.stdout = stdout
        silent.close()
    return usages


def figures(usages: list) -> tuple[float, float, int]:
    read = sum(u.cache_read_input_tokens or 0 for u in usages)
    written = sum(u.cache_creation_input_tokens or 0 for u in usages)
    fresh = sum(u.input_tokens for u in usages)
    total = read + written + fresh
    return read / total, (fresh + 1.25 * written + 0.1 * read) / total, total


def main() -> None:
    wanted = sys.argv[1:]
    sections = [p for p in section_files() if p.name[:3] >= "s06"
                and (not wanted or p.name[:3] in wanted)]
    api = FakeAnthropic().start()
    api.default = answer
    try:
        for path in sections:
            print(f"{path.name}: a {TURNS}-turn chat against the fake API (caching on)")
            for label, wrap in (("as sent", lambda c: c), ("no cache_control", WithoutCache)):
                with tempfile.TemporaryDirectory() as tmp:
                    workspace = copy_workspace(Path(tmp) / "workspace")
                    for name, value in section_env_values(workspace, api.base_url).items():
                        os.environ[name] = value
                    mod = load_section(path)
                    api.cache = type(api.cache)()  # a cold cache for each run
                    usages = chat(mod, wrap(mod.make_client()))
                share, cost, total = figures(usages)
                print(f"  {label:<17} {len(usages)} model calls, {total:,} prompt tokens: "
                      f"{share:6.1%} read from the cache; billed like {cost:.0%} of them")
    finally:
        api.stop()


if __name__ == "__main__":
    main()
