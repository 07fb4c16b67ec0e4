"""conveyor's main demo: a three-stage pipeline over threads and asyncio, with a progress bar.

It "downloads" pages (an async stage that awaits like a network call would), parses them on
threads, keeps the interesting ones, and counts words per page in batches, then prints what the
run measured. No server is needed.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter

from conveyor import Pipeline, Retry

WORDS = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"]
WORDS += ["ibis", "jay", "kite", "lynx", "mole", "newt", "owl", "pig"]


async def fetch(page: int) -> tuple[int, str]:
    await asyncio.sleep(0.01)  # stands in for a network round trip
    digest = hashlib.sha256(str(page).encode()).digest()
    return page, " ".join(WORDS[b % len(WORDS)] for b in digest)


def parse(fetched: tuple[int, str]) -> tuple[int, list[str]]:
    page, text = fetched
    return page, text.split()


def interesting(parsed: tuple[int, list[str]]) -> bool:
    return "owl" in parsed[1]


def main() -> None:
    totals: Counter[str] = Counter()

    def tally(batch: list[tuple[int, list[str]]]) -> None:
        for _page, words in batch:
            totals.update(words)

    pipeline = (
        Pipeline(range(20_000))
        .map(fetch, kind="async", workers=100, on_error=Retry(attempts=3, backoff_s=0.05))
        .map(parse, workers=2)
        .filter(interesting)
        .batch(50, within_s=0.5)
        .each(tally)
    )
    stats = pipeline.run(progress=True)

    print(f"\n{stats.items_in} pages in {stats.elapsed_s:.2f} s ({stats.throughput:,.0f} pages/s)")
    print(f"{'stage':<12}{'received':>10}{'emitted':>10}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for s in stats.stages:
        p50 = f"{s.latency_p50_s * 1e3:.2f}" if s.latency_p50_s is not None else "-"
        p99 = f"{s.latency_p99_s * 1e3:.2f}" if s.latency_p99_s is not None else "-"
        print(f"{s.name:<12}{s.received:>10}{s.emitted:>10}{s.failed:>8}{p50:>9}{p99:>9}")
    print(
        "most common words on pages with an owl:",
        ", ".join(f"{w} {n}" for w, n in totals.most_common(5)),
    )


if __name__ == "__main__":
    main()
