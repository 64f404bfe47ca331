"""The "Try it" runs shown in each lesson, as scripts the tests can replay.

Each entry: what the learner types ("inputs", or "runs": one list of inputs
per start of the section, all in one workspace), what the (fake) model
answers, any environment the run needs, and files to show at the end. tests/test_lessons.py runs the section with this
script and requires the lesson's "Try it" block to equal the output, so the
transcript in a lesson is one that really happens.

Print one, to paste into a lesson:  python tests/make_transcript.py s01
"""
from fake_anthropic import reply, tool_use

# The lesson shows the default base URL and a workspace path a learner might
# have; the replay runs against the local fake in a temporary workspace.
SHOWN_BASE_URL = "https://api.anthropic.com"
SHOWN_WORKSPACE = "/home/ada/agent-gateway/workspace"
SHOWN_GATEWAY_PORT = 18789
SHOWN_TOKEN = "q7Vd2Lh0sXbN4kTzR9wYcA1mJ6eUfP3gHiK8oS5tWnE"  # an example: each workspace makes its own


def said(text="", tools=None, tokens=None):
    """A scripted reply. tokens=(in, out) fixes the usage it reports; without it
    the fake counts a quarter of the messages' JSON, the same way its
    count_tokens endpoint does (neither depends on the machine)."""
    usage = {"input_tokens": tokens[0], "output_tokens": tokens[1]} if tokens else None
    return reply(text, tools=tools, usage=usage)


TRANSCRIPTS = {
    "s01": {
        "inputs": ["Hi! My name is Ada.", "", "What is my name?", "/help", "/history", "quit"],
        "steps": [
            reply("Hello Ada! Nice to meet you. How can I help you today?"),
            reply("Your name is Ada: you told me in your first message."),
        ],
        "env": {},
    },
    "s02": {
        "inputs": ["What is in my workspace?", "Make a drafts folder with a one-line plan in it.", "o",
                   "Now show me ../.env", "quit"],
        "steps": [
            said("Let me look.", [tool_use("list_dir", {}, "toolu_01")], (1480, 38)),
            said("Your workspace holds the eight prompt files (SOUL.md, IDENTITY.md, ...), "
                 "CRON.json and a skills/ folder.", None, (1702, 31)),
            said(tools=[tool_use("bash", {"command": "mkdir -p drafts"}, "toolu_02")], tokens=(1751, 52)),
            said(tools=[tool_use("write_file", {"path": "drafts/plan.md",
                                                "content": "1. Read the lessons, one section a day.\n"}, "toolu_03")],
                 tokens=(1821, 70)),
            said("Done: drafts/plan.md holds the plan.", None, (1913, 12)),
            said(tools=[tool_use("read_file", {"path": "../.env"}, "toolu_04")], tokens=(1941, 44)),
            said("I can't: ../.env is outside my workspace, and the tools refuse it.", None, (2032, 19)),
        ],
        "env": {},
    },
    "s03": {
        "runs": [["Remember: my project is called Lighthouse.", "Which files are in skills/?", "quit"],
                 ["What is my project called?", "/context", "quit"]],
        "steps": [
            said("Noted: your project is called Lighthouse."),
            said(tools=[tool_use("list_dir", {"path": "skills"}, "toolu_01")]),
            said("skills/ holds one folder, example-skill/."),
            said("Your project is called Lighthouse."),
        ],
        "env": {},
        "show": ".state/sessions/main/*.jsonl",
    },
    "s04": {
        "inputs": ["/channels", "Hi! Where can people reach you?", "/pair", "/approvals", "/approve 3", "quit"],
        "steps": [
            said("Here in the terminal, and in Telegram or Feishu chats once the operator connects those; "
                 "in a chat, I answer only people the operator has approved.", None, (1512, 36)),
        ],
        "env": {},
    },
    "s05": {
        "files": {"gateway.json": """{
  "version": 1,
  "default_agent": "main",
  "dm_scope": "per-channel-peer",
  "agents": [
    {"id": "main", "name": "Claw", "model": null,
     "tools": ["bash", "read_file", "write_file", "edit_file", "list_dir"]},
    {"id": "family", "name": "Family helper", "model": "claude-haiku-5", "tools": ["read_file"]}
  ],
  "bindings": [
    {"agent": "family", "match": {"channel": "telegram", "group": "-1001"}},
    {"agent": "main", "match": {"channel": "telegram", "peer": "42"}}
  ],
  "identity_links": {"ada": ["telegram:42", "feishu:ou_ada"]}
}
"""},
        "inputs": ["/agents", "/bindings", "/route telegram 42", "/route telegram 42 - -1001", "/route telegram 7",
                   "/route feishu ou_ada", "Hello! Which agent am I talking to?", "/gateway", "quit"],
        "steps": [
            said("Claw, the gateway's main agent: the terminal has no binding of its own, so it gets the default.",
                 None, (1498, 24)),
        ],
        "env": {},
    },
}
