"""A warm process that runs section files as __main__, each in a fork of itself.

A section's start-up is mostly `import anthropic` (about a second). The tests run
sections as whole processes many times, so this process imports the heavy
libraries once and then, for each run, forks: the child takes the run's
environment, working folder, stdin and stdout files, and runs the section file
exactly as `python path` would (runpy, __name__ == "__main__"). Only the imports
were done earlier. tests/harness.py starts one per test worker and talks to it over
its stdin/stdout, one JSON line per run:

    {"path": ..., "env": {...}, "cwd": ..., "stdin": file, "stdout": file, "stderr": file}
    -> {"pid": child pid}   then, when it ends ->   {"status": exit code}
"""

import json
import os
import runpy
import sys

# What the sections import at their top; loaded before any fork.
import anthropic  # noqa: F401
import dotenv  # noqa: F401
import httpx  # noqa: F401
import websockets.asyncio.server  # noqa: F401

try:
    import croniter  # noqa: F401
    import telegram  # noqa: F401
    import readline  # noqa: F401
except ImportError:
    pass


def run_child(job: dict) -> None:
    """In the fork: become the section's process, then run it. Never returns."""
    code = 1
    try:
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        for fd, name, mode in (
            (0, "stdin", os.O_RDONLY),
            (1, "stdout", os.O_WRONLY),
            (2, "stderr", os.O_WRONLY),
        ):
            os.dup2(os.open(job[name], mode), fd)
        sys.stdin = open(0, encoding="utf-8", errors="strict", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)
        sys.argv = [job["path"]]
        sys.path[0] = os.path.dirname(job["path"])
        try:
            runpy.run_path(job["path"], run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(job)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
