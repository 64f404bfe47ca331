"""Print the "Try it" transcript of a section, as tests/test_lessons.py checks it.

Usage: python tests/make_transcript.py s01           print it
       python tests/make_transcript.py s01 --write   put it into the lesson's Try it block
"""
import re
import sys
import tempfile
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_anthropic import FakeAnthropic  # noqa: E402
from harness import REPO, copy_workspace, isolated_env, run_section, section_files  # noqa: E402
from transcripts import SHOWN_BASE_URL, SHOWN_GATEWAY_PORT, SHOWN_TOKEN, SHOWN_WORKSPACE, TRANSCRIPTS  # noqa: E402


def make_transcript(section: str) -> str:
    path = next(p for p in section_files() if p.name.startswith(section))
    script = TRANSCRIPTS[section]
    command = f"$ python {path.relative_to(REPO)}"
    api = FakeAnthropic().start()
    parts = []
    try:
        api.script(*script["steps"])
        with tempfile.TemporaryDirectory() as tmp:
            workspace = copy_workspace(Path(tmp) / "workspace")
            env = isolated_env(workspace, api.base_url, **script["env"])
            for name, content in script.get("files", {}).items():  # files the learner wrote first
                (workspace / name).write_text(content)
                parts.append(f"$ cat workspace/{name}\n" + content.rstrip("\n"))
            for inputs in script.get("runs") or [script["inputs"]]:
                run = run_section(path, inputs, env, cwd=REPO)
                parts.append(command + "\n" + run.transcript.rstrip("\n"))
            for shown in sorted(workspace.glob(script.get("show", "-"))):
                parts.append(f"$ cat workspace/{shown.relative_to(workspace)}\n" + shown.read_text().rstrip("\n"))
            text = "\n".join(parts).replace(str(workspace), SHOWN_WORKSPACE)
    finally:
        api.stop()
    text = text.replace(api.base_url, SHOWN_BASE_URL)
    # From s05 on the gateway listens on a free port with a fresh token: show the defaults instead.
    text = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{SHOWN_GATEWAY_PORT}", text)
    text = re.sub(r"#token=[\w-]+", f"#token={SHOWN_TOKEN}", text)
    # Session ids and timestamps differ on every run: show fixed example values.
    text = re.sub(r"\b\d{8}-\d{6}-[0-9a-f]{4}\b", "20261121-093000-7f3a", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", "2026-11-21T09:30:00+0000", text)
    return text + "\n"


def write_into_lesson(section: str, transcript: str) -> Path:
    """Replace the first ```text block under "## Try it" in the section's lesson."""
    lesson = next(p for p in section_files() if p.name.startswith(section)).with_suffix(".md")
    text = lesson.read_text(encoding="utf-8")
    start = text.index("```text\n", text.index("## Try it")) + len("```text\n")
    end = text.index("```", start)
    lesson.write_text(text[:start] + transcript + text[end:], encoding="utf-8")
    return lesson


if __name__ == "__main__":
    transcript = make_transcript(sys.argv[1])
    if "--write" in sys.argv:
        print(f"wrote the Try it block of {write_into_lesson(sys.argv[1], transcript)}")
    else:
        print(transcript, end="")
