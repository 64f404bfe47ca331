"""Print the "Try it" transcript of a section, as tests/test_lessons.py checks it.

Usage: python tests/make_transcript.py s01
"""
import sys
import tempfile
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_anthropic import FakeAnthropic  # noqa: E402
from harness import REPO, copy_workspace, isolated_env, run_section, section_files  # noqa: E402
from transcripts import SHOWN_BASE_URL, SHOWN_WORKSPACE, TRANSCRIPTS  # noqa: E402


def make_transcript(section: str) -> str:
    path = next(p for p in section_files() if p.name.startswith(section))
    script = TRANSCRIPTS[section]
    api = FakeAnthropic().start()
    try:
        api.script(*script["steps"])
        with tempfile.TemporaryDirectory() as tmp:
            workspace = copy_workspace(Path(tmp) / "workspace")
            env = isolated_env(workspace, api.base_url, **script["env"])
            run = run_section(path, script["inputs"], env, cwd=REPO)
    finally:
        api.stop()
    text = run.transcript.replace(api.base_url, SHOWN_BASE_URL).replace(str(workspace), SHOWN_WORKSPACE)
    command = f"$ python {path.relative_to(REPO)}"
    return command + "\n" + text.rstrip("\n") + "\n"


if __name__ == "__main__":
    print(make_transcript(sys.argv[1]), end="")
