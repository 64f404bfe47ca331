"""s08 delivery, measured: how fast replies are written ahead, and whether a crash loses any.

Usage: python benchmarks/delivery.py [--entries 500] [--kills 50] [--messages 120]

1. Enqueue throughput. Delivery.enqueue() (split, JSON, temp file, fsync, rename, fsync of the
   folder) against this disk's raw rate for the same four steps on a file of the same size,
   in one run, in one folder of the same file system. Printed as a ratio (target: >= 50 %).
2. Crash test. The newest section runs as a whole process against the fake Telegram and the
   fake Messages API. Several chats send messages while the process is killed with SIGKILL at
   random instants and started again. At the end every message must have its reply at least
   once, in order per chat (target: 0 lost). Duplicates are counted (at-least-once).

The figures are printed, not asserted: the test suite runs a short crash test of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.dont_write_bytecode = True

from fake_anthropic import FakeAnthropic  # noqa: E402
from fake_telegram import FakeTelegram  # noqa: E402
from harness import copy_workspace, isolated_env, load_section, section_env_values  # noqa: E402
from harness import section_files, state_of  # noqa: E402

NEWEST = section_files()[-1]
UNANSWERED = 3  # messages a chat sends before it waits for answers (the bus's line holds 5)


def raw_rate(folder: Path, size: int, n: int) -> float:
    """Files per second for temp file + fsync + rename + fsync of the folder, nothing else."""
    data = b"x" * size
    start = time.perf_counter()
    for number in range(n):
        tmp = folder / f".raw-{number}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, folder / f"raw-{number}.json")
        dir_fd = os.open(folder, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    return n / (time.perf_counter() - start)


def enqueue_rate(entries: int) -> tuple[float, float]:
    """(enqueue per second, raw per second), measured alternately on the disk .state is on."""
    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".delivery-bench-") as tmp:
        workspace = copy_workspace(Path(tmp) / "workspace")
        os.environ.update(section_env_values(workspace, None))
        mod = load_section(NEWEST)

        class Chat:
            max_text = 4096

        delivery = mod.Delivery({"telegram": Chat()}, Path(tmp) / "queue")
        delivery.load()  # no worker: only the write is measured
        chats = [mod.InboundMessage(channel="telegram", account="bot", peer=str(n),
                                    sender=str(n), text="") for n in range(100)]
        text = "A reply of a usual length, a few sentences long. " * 6
        raw_dir = Path(tmp) / "raw"
        raw_dir.mkdir()
        size = len(json.dumps({"chunks": [text], "id": "00000001", "peer": "42"})) + 200
        enq, raw = [], []
        for _ in range(3):  # alternate, so a busy moment of the disk hurts both alike
            start = time.perf_counter()
            for number in range(entries // 3):  # many chats: each has a cap of its own
                delivery.enqueue(chats[number % len(chats)], text)
            enq.append(entries // 3 / (time.perf_counter() - start))
            raw.append(raw_rate(raw_dir, size, entries // 3))
            for path in raw_dir.glob("*.json"):
                path.unlink()
        return sorted(enq)[1], sorted(raw)[1]


# --- the crash test ------------------------------------------------------------------------------
class Launcher:
    """Starts the section as a whole process, forked from tests/warm.py (imports done once), with
    a stdin that never ends (a FIFO nobody writes to), so it runs until it is killed."""

    def __init__(self, tmp: Path, warm: subprocess.Popen | None = None):
        self.fifo = tmp / "stdin"
        os.mkfifo(self.fifo)
        self.keep_open = os.open(self.fifo, os.O_RDWR)  # a writer: the reader never sees EOF
        self.out = tmp / "out.txt"
        self.out.touch()
        self.own = warm is None or warm.poll() is not None  # a test passes its worker's
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC")}
        self.warm = warm if not self.own else subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "warm.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))

    def start(self, env: dict, cwd: Path) -> int:
        job = {"path": str(NEWEST), "env": env, "cwd": str(cwd), "stdin": str(self.fifo),
               "stdout": str(self.out), "stderr": str(self.out)}
        self.warm.stdin.write(json.dumps(job) + "\n")
        self.warm.stdin.flush()
        return json.loads(self.warm.stdout.readline())["pid"]

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.warm.stdout.readline()  # its status line

    def close(self) -> None:
        if self.own:
            self.warm.stdin.close()
            self.warm.wait(10)
        os.close(self.keep_open)


def crash_test(messages: int, kills: int, chats: int = 4, seed: int | None = None,
               run_time: tuple[float, float] = (0.05, 0.6), deadline: float = 120,
               warm: subprocess.Popen | None = None) -> dict:
    """Send `messages` from `chats` chats while the section is killed `kills` times; then let
    it run until every reply is there (or `deadline` seconds). Returns the counts."""
    rng = random.Random(seed)
    api, tg = FakeAnthropic().start(), FakeTelegram().start()
    users = [100 + n for n in range(chats)]
    sent_texts: dict[int, list[str]] = {u: [] for u in users}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            workspace = copy_workspace(tmp / "workspace")
            env = isolated_env(workspace, api.base_url, TELEGRAM_BOT_TOKEN=tg.token,
                               TELEGRAM_API_BASE=tg.api_base,
                               TELEGRAM_ALLOW_FROM=",".join(map(str, users)))
            launcher = Launcher(tmp, warm)
            pid, number = launcher.start(env, workspace.parent), 0
            try:
                def send_some() -> None:  # a person waits for answers: few unanswered at once
                    nonlocal number
                    user = rng.choice(users)
                    waiting = len(sent_texts[user]) - len(set(replies(tg).get(user, [])))
                    if number < messages and waiting < UNANSWERED and rng.random() < 0.5:
                        text = f"m{number}-{secrets.token_hex(2)}"
                        sent_texts[user].append(text)
                        tg.push(tg.private_message(text, user_id=user))
                        number += 1

                for kill in range(kills + 1):
                    until = time.monotonic() + rng.uniform(*run_time)
                    while time.monotonic() < until:
                        send_some()
                        time.sleep(0.01)
                    if kill < kills:
                        launcher.kill(pid)
                        pid = launcher.start(env, workspace.parent)
                end = time.monotonic() + deadline
                while number < messages and time.monotonic() < end:  # the rest, no more kills
                    send_some()
                    time.sleep(0.01)
                while time.monotonic() < end and missing(tg, sent_texts):
                    time.sleep(0.1)
                launcher.kill(pid)
            finally:
                launcher.close()
            log = launcher.out.read_text(encoding="utf-8", errors="replace")
            state = state_of(workspace)
            left = {name: sorted(p.name for p in (state / name).glob("*.json"))
                    for name in ("inbound", "delivery-queue", "delivery-queue/failed")}
    finally:
        tg.stop()
        api.stop()
    got = replies(tg)
    duplicates = sum(len(r) - len(set(r)) for r in got.values())
    busy = sum(1 for m in tg.sent if m.get("text", "").startswith("I am still working"))
    return {"messages": number, "kills": kills, "lost": len(missing(tg, sent_texts)),
            "busy": busy, "left": left,
            "out_of_order": out_of_order(got, sent_texts), "duplicates": duplicates,
            "replies": sum(len(r) for r in got.values()), "log": log,
            "missing": missing(tg, sent_texts)}


def replies(tg: FakeTelegram) -> dict[int, list[str]]:
    """Per chat, the message each reply answers ("(fake) you said: m3-ab12" -> "m3-ab12")."""
    got: dict[int, list[str]] = {}
    for sent in list(tg.sent):
        text = sent.get("text", "")
        if text.startswith("(fake) you said: "):
            got.setdefault(sent["chat_id"], []).append(text.removeprefix("(fake) you said: "))
    return got


def missing(tg: FakeTelegram, sent_texts: dict[int, list[str]]) -> list[str]:
    got = replies(tg)
    return [t for user, texts in sent_texts.items() for t in texts if t not in got.get(user, [])]


def out_of_order(got: dict[int, list[str]], sent_texts: dict[int, list[str]]) -> int:
    """Chats whose replies, first time each, are not in the order their messages were sent."""
    bad = 0
    for user, texts in sent_texts.items():
        firsts = list(dict.fromkeys(got.get(user, [])))
        if firsts != [t for t in texts if t in firsts]:
            bad += 1
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=600)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--messages", type=int, default=150)
    args = parser.parse_args()
    print(f"Section: {NEWEST.name}")
    enq, raw = enqueue_rate(args.entries)
    print(f"Enqueue: {enq:,.0f} replies/s · raw temp+fsync+rename+fsync dir: {raw:,.0f} files/s"
          f" · ratio {enq / raw:.0%} (target >= 50 %)")
    start = time.monotonic()
    result = crash_test(args.messages, args.kills, seed=None)
    print(f"Crash test: {result['messages']} messages from 4 chats, {result['kills']} SIGKILLs "
          f"in {time.monotonic() - start:.0f} s · lost {result['lost']} (target 0) · "
          f"out of order {result['out_of_order']} chats · duplicates {result['duplicates']} "
          f"({result['replies']} replies)")
    if result["lost"] or result["busy"]:
        print("Missing:", ", ".join(result["missing"][:20]), "· busy answers:", result["busy"],
              "· left on disk:", result["left"])
        print(result["log"][-3000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
