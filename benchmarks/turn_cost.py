"""What one turn costs, per section: python benchmarks/turn_cost.py [s05 ...]

For every section from s03 on (sections added later join automatically) it prints:
- append: saving one turn to a 5,000-message session with the section's own store,
  median and p90, beside the floor of this disk (appending the same bytes and one fsync);
- load: replaying that session from disk;
- turn: one `hello` turn on that session against the fake Messages API, end to end,
  with the number of HTTP requests it made (a turn below the threshold makes one);
- gateway (s05 on): chat.send round trip p50/p95 from one client, the section's own CPU
  per request (from /proc), and throughput with 20 clients at once;
- start: seconds from `python sNN.py` to its prompt, beside s01's.
Figures are printed, never asserted: they depend on the machine. Needs no key.
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.dont_write_bytecode = True

from fake_anthropic import FakeAnthropic  # noqa: E402
from harness import copy_workspace, isolated_env, load_section, section_env_values  # noqa: E402
from harness import section_files  # noqa: E402

MESSAGES = 5_000
SAMPLES = 200  # appends measured at the end of the 5,000-message session


def pct(values: list[float], share: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * share))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def raw_append_floor(folder: Path, line: bytes) -> list[float]:
    """The disk's floor: append one line to a file and fsync it."""
    times, path = [], folder / "floor.jsonl"
    for _ in range(SAMPLES):
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, line)
        os.fsync(fd)
        os.close(fd)
        times.append(time.perf_counter() - start)
    return times


def store_figures(path: Path, api: FakeAnthropic, tmp: Path) -> dict:
    workspace = copy_workspace(tmp / "workspace")
    for name, value in section_env_values(workspace, api.base_url).items():
        os.environ[name] = value
    mod = load_section(path)
    store = mod.SessionStore(mod.SESSIONS_ROOT / mod.AGENT_ID)
    session = store.create()
    times = []
    for turn in range(MESSAGES // 2):
        mod.add_user_text(session.messages, f"question {turn}: what is in notes.md?")
        session.messages.append({"role": "assistant",
                                 "content": [{"type": "text", "text": f"Answer {turn}."}]})
        start = time.perf_counter()
        session.save()
        times.append(time.perf_counter() - start)
    times = times[-SAMPLES:]
    line = (json.dumps({"type": "message", "message": session.messages[-1]}) + "\n").encode()
    floor = raw_append_floor(tmp, line)
    start = time.perf_counter()
    reopened = mod.SessionStore(mod.SESSIONS_ROOT / mod.AGENT_ID).open(session.id)
    load = time.perf_counter() - start
    client, guard = mod.make_client(), mod.ContextGuard(mod.make_client())
    before = len(api.requests) + len(api.count_requests)
    start = time.perf_counter()
    silent = open(os.devnull, "w")
    stdout, sys.stdout = sys.stdout, silent
    try:
        mod.agent_turn(client, reopened, "hello", guard)
    finally:
        sys.stdout = stdout
        silent.close()
    turn = time.perf_counter() - start
    requests = len(api.requests) + len(api.count_requests) - before
    return {"append": times, "floor": floor, "load": load, "turn": turn, "requests": requests}


def start_to_prompt(path: Path, env: dict, runs: int = 5) -> float:
    """Median seconds from starting the section to its first prompt."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, cwd=str(ROOT))
        seen = b""
        while b"You > " not in seen:
            piece = proc.stdout.read1(4096)
            if not piece:
                break
            seen += piece
        times.append(time.perf_counter() - start)
        proc.stdin.close()
        proc.wait(10)
    return statistics.median(times)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def gateway_figures(port: int, token: str, pid: int) -> dict:
    from websockets.asyncio.client import connect

    async def client(peer: str, count: int, rtts: list) -> None:
        async with connect(f"ws://127.0.0.1:{port}/") as ws:
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "connect",
                                      "params": {"token": token}}))
            await ws.recv()
            for n in range(count):
                start = time.perf_counter()
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": n + 1, "method": "chat.send",
                                          "params": {"text": "hello", "peer_id": peer}}))
                while "result" not in json.loads(await ws.recv()):
                    pass  # chat.delta notifications, then the answer
                rtts.append(time.perf_counter() - start)

    await client("warm-up", 20, [])
    rtts: list[float] = []
    cpu = cpu_seconds(pid)
    await client("one-client", 300, rtts)
    cpu_per_request = (cpu_seconds(pid) - cpu) / 300
    start, many = time.perf_counter(), []
    await asyncio.gather(*(client(f"client-{n}", 25, many) for n in range(20)))
    throughput = len(many) / (time.perf_counter() - start)
    return {"p50": pct(rtts, 0.5), "p95": pct(rtts, 0.95), "cpu": cpu_per_request,
            "throughput": throughput}


def gateway_run(path: Path, api: FakeAnthropic, tmp: Path) -> dict:
    workspace = copy_workspace(tmp / "gw-workspace")
    env = isolated_env(workspace, api.base_url)
    proc = subprocess.Popen([sys.executable, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            cwd=str(ROOT), text=True)
    try:
        line = ""
        while "#token=" not in line:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{path.name} did not start its gateway")
        port = int(line.split("ws://127.0.0.1:")[1].split()[0])
        token = line.split("#token=")[1].strip()
        # Its log lines must go somewhere: a full pipe would stop the section (as it would stop
        # any program whose output nobody reads).
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        return asyncio.run(gateway_figures(port, token, proc.pid))
    finally:
        proc.stdin.close()
        proc.wait(15)


def sdk_stream_floor(api: FakeAnthropic, calls: int = 300) -> float:
    """CPU seconds the SDK's own streaming helper spends on one short reply: the floor under
    every section's turn (the fake answers in another thread; its CPU is counted too, so this
    errs high, like the figures it is compared with err high by the fake's work)."""
    import anthropic
    client = anthropic.Anthropic(api_key="x", base_url=api.base_url, max_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    start = time.process_time()
    for _ in range(calls):
        with client.messages.stream(model="m", max_tokens=100, messages=messages) as stream:
            for _ in stream.text_stream:
                pass
    return (time.process_time() - start) / calls


def main() -> None:
    wanted = sys.argv[1:]
    sections = [p for p in section_files() if p.name[:3] >= "s03" and
                (not wanted or p.name[:3] in wanted)]
    api = FakeAnthropic().start()
    with tempfile.TemporaryDirectory() as tmp:
        env = isolated_env(copy_workspace(Path(tmp) / "ws"), api.base_url)
        s01 = start_to_prompt(section_files()[0], env)
        print(f"start to prompt, s01: {s01:.3f} s (the baseline for every section's start)")
        print(f"the SDK's streaming helper alone: {ms(sdk_stream_floor(api))} CPU per short reply "
              "(the floor under a gateway request's CPU)")
        for path in sections:
            folder = Path(tempfile.mkdtemp(dir=tmp))
            figures = store_figures(path, api, folder)
            a, f = figures["append"], figures["floor"]
            print(f"\n{path.name}")
            print(f"  append one turn at {MESSAGES:,} messages: median {ms(pct(a, .5))}, "
                  f"p90 {ms(pct(a, .9))}  (this disk's append+fsync floor: median "
                  f"{ms(pct(f, .5))}, p90 {ms(pct(f, .9))})")
            print(f"  load the {MESSAGES:,}-message session: {ms(figures['load'])}")
            print(f"  one hello turn on it: {ms(figures['turn'])}, "
                  f"{figures['requests']} HTTP request(s)")
            start = start_to_prompt(path, env)
            print(f"  start to prompt: {start:.3f} s ({start / s01:.2f}x s01)")
            if path.name[:3] >= "s05":
                g = gateway_run(path, api, folder)
                print(f"  gateway chat.send: p50 {ms(g['p50'])}, p95 {ms(g['p95'])}, "
                      f"CPU {ms(g['cpu'])} per request, {g['throughput']:.0f} requests/s "
                      "with 20 clients")
    api.stop()


if __name__ == "__main__":
    main()
