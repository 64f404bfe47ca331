"""The "Try it" runs shown in each lesson, as scripts the tests can replay.

Each entry: what the learner types, what the (fake) model answers, and any
environment the run needs. tests/test_lessons.py runs the section with this
script and requires the lesson's "Try it" block to equal the output, so the
transcript in a lesson is one that really happens.

Print one, to paste into a lesson:  python tests/make_transcript.py s01
"""
from fake_anthropic import reply

# The lesson shows the default base URL; the replay runs against the local fake.
SHOWN_BASE_URL = "https://api.anthropic.com"

TRANSCRIPTS = {
    "s01": {
        "inputs": ["Hi! My name is Ada.", "", "What is my name?", "/help", "/history", "quit"],
        "steps": [
            reply("Hello Ada! Nice to meet you. How can I help you today?"),
            reply("Your name is Ada: you told me in your first message."),
        ],
        "env": {},
    },
}
