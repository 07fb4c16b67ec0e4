"""A consumer process for the stream tests: ``python stream_consumer.py URL CONSUMER LEASE_S``.

Reads the stream ``in`` as ``CONSUMER`` of the group ``g`` until the group has nothing left,
doubling each value into the stream ``out`` (with a little work per item, so a test can kill
it mid-run), and prints its input's counts as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from conveyor import Pipeline


def work(value: int) -> int:
    time.sleep(0.001)  # the item's own work
    return value * 2


def main() -> None:
    url, consumer, lease_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    pipeline = (
        Pipeline.from_stream(url, "in", group="g", consumer=consumer, lease_s=lease_s, burst=True)
        .map(work, workers=2)
        .to_stream(url, "out")
    )
    stats = pipeline.run(timeout_s=120)
    assert stats.stream is not None
    print(json.dumps(dataclasses.asdict(stats.stream)), flush=True)


if __name__ == "__main__":
    main()
