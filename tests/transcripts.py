"""The "Try it" runs shown in each lesson, as scripts the tests can replay.

Each entry: the runs of the section (each a list of steps: what the learner types, or
what a person does in the fake chat; see tests/make_transcript.py), what the (fake) model
answers, the environment the run needs, files the learner writes first, and state files
to show at the end. tests/test_lessons.py plays the script and requires the lesson's
"Try it" blocks to equal what the terminals showed, so a transcript is one that really
happens. Token counts are the fake's own, counted the same way in every section (tools,
system prompt and messages), never written in by hand.

Print one, to paste into a lesson:  python tests/make_transcript.py s01
"""

import re

from fake_anthropic import reply, tool_use

# The lesson shows the default base URL, ports and paths a learner might have; the replay
# runs against local fakes in a temporary workspace.
SHOWN_BASE_URL = "https://api.anthropic.com"
SHOWN_WORKSPACE = "/home/ada/agent-gateway/workspace"
SHOWN_GATEWAY_PORT = 18789
SHOWN_TOKEN = (
    "q7Vd2Lh0sXbN4kTzR9wYcA1mJ6eUfP3gHiK8oS5tWnE"  # an example: each install makes its own
)
SHOWN_PAIRING_CODE = "K7M3QPX2"  # codes are random; the lesson shows this one


def pairing_code(out: str) -> str:
    """The code the operator reads on the terminal, typed back to approve it."""
    return "/pair approve " + re.findall(r"/pair approve ([A-Z2-9]{8})", out)[-1]


TRANSCRIPTS = {
    "s01": {
        "runs": [["Hi! My name is Ada.", "", "What is my name?", "/help", "/history", "quit"]],
        "steps": [
            reply("Hello Ada! Nice to meet you. How can I help you today?"),
            reply("Your name is Ada: you told me in your first message."),
        ],
    },
    "s02": {
        "runs": [
            [
                "What is in my workspace?",
                "Make a drafts folder with a one-line plan in it.",
                "o",
                "Now show me ../.env",
                "quit",
            ]
        ],
        "steps": [
            reply("Let me look.", tools=[tool_use("list_dir", {}, "toolu_01")]),
            reply(
                "Your workspace holds the eight prompt files (SOUL.md, IDENTITY.md, ...), "
                "CRON.json and a skills/ folder."
            ),
            reply(tools=[tool_use("bash", {"command": "mkdir -p drafts"}, "toolu_02")]),
            reply(
                tools=[
                    tool_use(
                        "write_file",
                        {"path": "drafts/plan.md", "content": "1. Read the lessons, one a day.\n"},
                        "toolu_03",
                    )
                ]
            ),
            reply("Done: drafts/plan.md holds the plan."),
            reply(tools=[tool_use("read_file", {"path": "../.env"}, "toolu_04")]),
            reply("I can't: ../.env is outside my workspace, and the tools refuse it."),
        ],
    },
    "s03": {
        "runs": [
            ["Remember: my project is called Lighthouse.", "Which files are in skills/?", "quit"],
            ["What is my project called?", "/context", "/compact", "quit"],
        ],
        "steps": [
            reply("Noted: your project is called Lighthouse."),
            reply(tools=[tool_use("list_dir", {"path": "skills"}, "toolu_01")]),
            reply("skills/ holds one folder, example-skill/."),
            reply("Your project is called Lighthouse."),
        ],
        "show": "sessions/main/*.jsonl",
    },
    "s04": {
        "chat": "telegram",
        "shown_env": {
            "TELEGRAM_BOT_TOKEN": "123456:FAKE",
            "TELEGRAM_API_BASE": "http://127.0.0.1:18781",
        },
        "runs": [
            [
                ("say", "hi"),  # a stranger: a pairing code, nothing else
                ("wait", "asks to talk"),
                pairing_code,  # the operator approves at the terminal
                ("reply",),  # "You are approved."
                ("say", "What can you do?"),
                ("wait", "replied"),
                ("say_no_reply", "Save 'hi' in hello.txt, please."),
                ("wait", "/approve 1"),  # the command waits for the operator
                ("reply",),  # "Waiting for the operator ..."
                "/approvals",
                "/approve 1",
                ("reply",),  # the answer, once the command has run
                ("wait", "replied"),
                "/channels",
                "quit",
            ]
        ],
        "steps": [
            reply(
                "I can read and write files in my workspace and run commands there; "
                "the operator approves anything that changes something."
            ),
            reply(tools=[tool_use("bash", {"command": "echo hi > hello.txt"}, "toolu_01")]),
            reply("Done: hello.txt says hi."),
        ],
    },
    "s05": {
        "files": {
            ".state/gateway.json": """{
  "version": 1,
  "default_agent": "main",
  "dm_scope": "per-channel-peer",
  "agents": [
    {"id": "main", "name": "Claw", "model": null, "tools": "*"},
    {"id": "family", "name": "Family helper", "model": "claude-haiku-5", "tools": ["read_file"]}
  ],
  "bindings": [
    {"agent": "family", "match": {"channel": "telegram", "group": "-1001"}},
    {"agent": "main", "match": {"channel": "telegram", "peer": "42"}}
  ],
  "identity_links": {"ada": ["telegram:42", "feishu:ou_ada"]}
}
"""
        },
        "runs": [
            [
                "/agents",
                "/bindings",
                "/route telegram 42",
                "/route telegram 42 - -1001",
                "/route telegram 7",
                "/route feishu ou_ada",
                "/route slack 1",
                "Hello! Which agent am I talking to?",
                "/gateway",
                "quit",
            ]
        ],
        "steps": [
            reply(
                "Claw, the gateway's main agent: the terminal has no binding of its own, "
                "so it gets the default."
            ),
        ],
    },
    "s06": {
        "env": {"TZ": "UTC"},  # the prompt names the time zone: the same one on every machine
        "runs": [
            ["Please remember: Lighthouse ships on 3 March, and Ada leads it.", "/prompt", "quit"],
            [
                "When does Lighthouse ship?",
                "/example-skill parser done, search index done, the docs are still open",
                "/skills",
                "quit",
            ],
        ],
        "steps": [
            reply(
                tools=[
                    tool_use(
                        "memory_write",
                        {"text": "Lighthouse ships on 3 March. Ada leads it."},
                        "toolu_01",
                    )
                ]
            ),
            reply("Saved in today's note: Lighthouse ships on 3 March, and Ada leads it."),
            reply(tools=[tool_use("memory_search", {"query": "Lighthouse ship"}, "toolu_02")]),
            reply("Lighthouse ships on 3 March (from today's note); Ada leads it."),
            reply(
                "Lighthouse status: two of three parts are done.\n"
                "- Done: the parser.\n"
                "- Done: the search index.\n"
                "- In progress: the docs.\n"
                "Next step: finish the docs before 3 March."
            ),
        ],
    },
    "s07": {
        "env": {"TZ": "UTC"},  # times are shown in the machine's zone: the same one everywhere
        "files": {
            "workspace/CRON.json": """{
  "jobs": [
    {
      "id": "water",
      "description": "Every 2 seconds, to watch the timer work. A system event: no model call.",
      "enabled": false,
      "schedule": {"kind": "every", "seconds": 2},
      "payload": {"kind": "system_event", "text": "Drink some water."},
      "deliver": {"channel": "terminal"}
    }
  ]
}
""",
            "workspace/HEARTBEAT.md": (
                "# Heartbeat checklist\n\n- If a reminder is due within the hour, say so.\n"
            ),
        },
        "runs": [
            [
                "/new reminders",  # a short conversation of its own (s06's stays on disk)
                "/cron",
                "/cron enable water",
                ("wait", "Drink some water."),  # the timer ran it (every 2 s from now on)
                "/cron disable water",
                "/cron",
                "Remind me in 20 minutes to call Ada.",
                "/cron",
                "/cron run call-ada",  # by hand, now: what it would say in 20 minutes
                ("wait", "[cron:call-ada] Call Ada."),
                "/heartbeat",
                "/trigger",
                ("wait", "[heartbeat] HEARTBEAT_OK"),
                "/heartbeat",
                "quit",
            ]
        ],
        "steps": [
            reply(
                tools=[
                    tool_use(
                        "cron_add",
                        {"kind": "at", "in_seconds": 1200, "message": "Call Ada."},
                        "toolu_07",
                    )
                ]
            ),
            reply("Done: in 20 minutes I will remind you to call Ada."),
            reply("HEARTBEAT_OK"),
        ],
    },
    "s08": {
        "chat": "telegram",
        "env": {"TELEGRAM_ALLOW_FROM": "42"},
        "shown_env": {
            "TELEGRAM_BOT_TOKEN": "123456:FAKE",
            "TELEGRAM_API_BASE": "http://127.0.0.1:18781",
            "TELEGRAM_ALLOW_FROM": "42",
        },
        "runs": [
            [
                "/simulate-failure telegram 1.0",  # every send to Telegram fails, as an outage
                ("say_no_reply", "Are you there?"),
                ("wait", "trying again in"),  # the reply is on disk, held by the failure
                "/queue",
                "/simulate-failure telegram 0",  # the outage is over: it goes at once
                ("reply",),
                "/failed",
                "quit",
            ]
        ],
        "steps": [reply("Yes, I am here. Your message waited on disk; so did this answer.")],
    },
    "s09": {
        # A second key (the fake accepts any); its base URL is ANTHROPIC_BASE_URL's.
        "env": {"ANTHROPIC_API_KEY_2": "sk-ant-second-key", "TZ": "UTC"},
        "shown_env": {"ANTHROPIC_API_KEY_2": "sk-ant-..."},
        "runs": [
            [
                "/simulate-failure rate_limit",  # the next call fails as a 429 would
                "Hello! Which key am I on?",
                "And now?",
                "/profiles",
                "/stats",
                "quit",
            ]
        ],
        "steps": [
            reply("Hello! I cannot see keys, but the gateway moved this session to another one."),
            reply("Still the same one: the session stays where it last succeeded."),
        ],
    },
    "s10": {
        "chat": "telegram",
        "env": {"TELEGRAM_ALLOW_FROM": "42", "QUEUE_MODES": "telegram=collect"},
        "shown_env": {
            "TELEGRAM_BOT_TOKEN": "123456:FAKE",
            "TELEGRAM_API_BASE": "http://127.0.0.1:18781",
            "TELEGRAM_ALLOW_FROM": "42",
            "QUEUE_MODES": "telegram=collect",
        },
        "runs": [
            [
                ("say_no_reply", "I am back."),  # three quick messages: one turn (collect)
                ("say_no_reply", "Did the build pass?"),
                ("say", "And the tests?"),
                ("wait", "replied"),
                ("say_no_reply", "Delete the drafts folder, please."),
                ("wait", "/approve 1"),  # a slow turn: it waits for the operator
                ("reply",),  # "Waiting for the operator ..."
                ("say_no_reply", "Actually, wait."),  # while it runs: they wait behind it
                ("say_no_reply", "Keep it, I still need it."),
                ("wait", "Keep it, I still need it. (collected"),
                "/lanes",
                "/reset agent:main:telegram:direct:42",  # the waiting turn is cancelled
                "/deny 1",
                ("reply",),  # the running turn stopped at its next safe point
                ("wait", "replied"),
                "How big are SOUL.md and USER.md? Ask a subagent.",
                "/lanes",
                "quit",
            ]
        ],
        "steps": [
            reply("Welcome back! I got all three messages. I have no build or test results "
                  "here; shall I look for logs in the workspace?"),
            reply(tools=[tool_use("bash", {"command": "rm -rf drafts"}, "toolu_01")]),
            reply(
                "I will ask a subagent to measure them.",
                tools=[
                    tool_use(
                        "spawn_subagent",
                        {"task": "Report the size in bytes of SOUL.md and USER.md."},
                        "toolu_02",
                    )
                ],
            ),
            reply(tools=[tool_use("bash", {"command": "wc -c SOUL.md USER.md"}, "toolu_03")]),
            reply("SOUL.md: 587 bytes. USER.md: 251 bytes."),
            reply("SOUL.md is 587 bytes and USER.md 251 bytes, as a subagent measured."),
        ],
    },
}
