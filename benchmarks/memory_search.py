"""Memory search at 10,000 notes: python benchmarks/memory_search.py [s06 ...]

For every section from s06 on (sections added later join automatically) it writes 10,000
notes the way memory_write does (20 a day in memory/YYYY-MM-DD.md, 500 days; words drawn as
in natural text, a tenth of the notes with some Chinese or Japanese), then prints:
- index build: the first search, which chunks every file into the SQLite FTS5 index;
- search: p50 and p95 of memory_search over 200 queries, each one following the files first
  (a stat per file) as it always does;
- the baseline, in the same run: a plain TF-IDF scan over all 10,000 notes that reads the
  files and tokenizes every note again for each query (what a naive memory does, the tutorial
  this course improves on among them), p50 and p95 over 20 queries;
- the ratio of the two p50s (the target: at least 20x, and a search p50 under 20 ms).
Figures are printed, never asserted: they depend on the machine. Needs no key.
"""
from __future__ import annotations

import math
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.dont_write_bytecode = True

from harness import copy_workspace, load_section, section_env_values, section_files  # noqa: E402

NOTES, PER_DAY = 10_000, 20
# Notes read like text: a few function words everywhere, then 3,600 made-up words whose
# frequencies fall off as in natural language (Zipf: the n-th word is 1/n as common).
FUNCTION_WORDS = "the a to and of in for on with is at by from that it we".split()
VOCABULARY = [a + b + c for a in ("ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "pi", "da")
              for b in ("ber", "lan", "mor", "tis", "ven", "gal", "rup", "sol", "dek", "fin")
              for c in ("", "s", "ed", "ing", "er", "ly", "ion", "al", "ist", "ity",
                        "ment", "ness", "ous", "ive", "ize", "ward", "ful", "less", "ish", "ant",
                        "ence", "ary", "ory", "ure", "age", "dom", "ship", "hood", "ism", "ics",
                        "eme", "ola", "ina", "oro", "ula", "ata")]
random.Random(0).shuffle(VOCABULARY)
WEIGHTS = [1 / rank for rank in range(1, len(VOCABULARY) + 1)]
CJK = ["寿司和拉面", "東京で会議", "新しいプロジェクト", "来週の予定", "北京出差", "周末去爬山"]


def note(rng: random.Random) -> str:
    words = rng.choices(VOCABULARY, WEIGHTS, k=rng.randint(6, 18))
    words += rng.choices(FUNCTION_WORDS, k=len(words) // 2)
    rng.shuffle(words)
    if rng.random() < 0.1:
        words.insert(rng.randrange(len(words)), rng.choice(CJK))
    return " ".join(words).capitalize() + "."


def write_notes(memory: Path, rng: random.Random) -> None:
    """NOTES notes, PER_DAY a day, in the files memory_write makes."""
    memory.mkdir(parents=True, exist_ok=True)
    first = date.today() - timedelta(days=NOTES // PER_DAY)
    for day in range(NOTES // PER_DAY):
        name = (first + timedelta(days=day)).isoformat()
        notes = [note(rng) for _ in range(PER_DAY)]
        body = "".join(f"\n## {9 + n // 4:02d}:{n % 4 * 15:02d}\n{text}\n"
                       for n, text in enumerate(notes))
        (memory / f"{name}.md").write_text(f"# {name}\n{body}", encoding="utf-8")


def tfidf_scan(workspace: Path, query: str, limit: int = 5) -> list[str]:
    """The naive way, as the tutorial this course improves on searches: read every note file,
    split it into notes, tokenize every note again, count document frequencies, then rank by
    the cosine of TF-IDF vectors. Nothing is kept from one query to the next."""
    notes = []
    for file in [workspace / "MEMORY.md", *sorted((workspace / "memory").glob("*.md"))]:
        notes += [part for part in re.split(r"\n(?=## )", file.read_text(encoding="utf-8"))
                  if part.strip()]
    docs = [Counter(re.findall(r"\w+", note.lower())) for note in notes]
    df = Counter(word for doc in docs for word in doc)
    idf = {word: math.log(len(docs) / n) + 1 for word, n in df.items()}
    q = Counter(re.findall(r"\w+", query.lower()))
    qv = {w: c * idf.get(w, 0) for w, c in q.items()}
    qn = math.sqrt(sum(v * v for v in qv.values())) or 1
    scores = []
    for note, doc in zip(notes, docs):
        dv = {w: c * idf[w] for w, c in doc.items()}
        dn = math.sqrt(sum(v * v for v in dv.values())) or 1
        scores.append((sum(qv[w] * dv.get(w, 0) for w in qv) / (qn * dn), note))
    return [note for _, note in sorted(scores, reverse=True)[:limit]]


def pct(values: list[float], share: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * share))]


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    wanted = sys.argv[1:]
    sections = [p for p in section_files() if p.name[:3] >= "s06"
                and (not wanted or p.name[:3] in wanted)]
    rng = random.Random(6)
    queries = [" ".join(rng.choices(VOCABULARY[20:], WEIGHTS[20:], k=rng.randint(1, 3)))
               for _ in range(190)]
    queries += [rng.choice(CJK)[:n] for n in (2, 3, 5) for _ in range(3)] + ["bermo"]
    for path in sections:
        with tempfile.TemporaryDirectory() as tmp:
            workspace = copy_workspace(Path(tmp) / "workspace")
            write_notes(workspace / "memory", random.Random(60))
            for name, value in section_env_values(workspace, None).items():
                os.environ[name] = value
            mod = load_section(path)
            build = timed(lambda: mod.memory_search("warm up"))
            chunks = mod.MEMORY.run(lambda db: db.execute("SELECT count(*) FROM chunks")
                                    .fetchone()[0])
            size = mod.MEMORY_INDEX_FILE.stat().st_size
            search = [timed(lambda q=q: mod.memory_search(q)) for q in queries]
            scan = [timed(lambda q=q: tfidf_scan(workspace, q)) for q in queries[:20]]
        p50, p95, s50, s95 = pct(search, .5), pct(search, .95), pct(scan, .5), pct(scan, .95)
        print(f"{path.name}: {NOTES:,} notes in {NOTES // PER_DAY} daily files")
        print(f"  index build (first search): {build:.2f} s, {chunks:,} chunks, {size:,} bytes")
        print(f"  memory_search ({len(search)} queries): p50 {p50 * 1000:.2f} ms, "
              f"p95 {p95 * 1000:.2f} ms")
        print(f"  TF-IDF scan, re-tokenizing per query ({len(scan)} queries): p50 "
              f"{s50 * 1000:.1f} ms, p95 {s95 * 1000:.1f} ms")
        print(f"  the index is {s50 / p50:.0f}x faster at p50 ({s95 / p95:.0f}x at p95)")


if __name__ == "__main__":
    main()
