"""A small user program that mypy --strict must check with real types (scripts/check).

It is only type-checked, never run. Each ``assert_type`` fails the check if conveyor's
annotations stop giving that type; each ``# type: ignore[...]`` marks a call that must stay an
error (mypy --strict reports an ignore that is no longer needed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import assert_type

from conveyor import JobHandle, Pipeline, RunStats, Stage, TaskQueue

# -- pipelines -------------------------------------------------------------------------------

assert_type(Pipeline(range(3)), Pipeline[int])
assert_type(Pipeline(range(3)).map(str), Pipeline[str])
assert_type(Pipeline(["a"]).map(len).filter(lambda n: n > 1), Pipeline[int])
assert_type(Pipeline(["a b"]).flat_map(str.split), Pipeline[str])
assert_type(Pipeline(range(3)).batch(10), Pipeline[list[int]])
assert_type(Pipeline(range(3)).map(str).batch(2).flat_map(lambda b: b), Pipeline[str])
assert_type(Pipeline(range(3)).each(print), Pipeline[None])
assert_type(Pipeline(range(3)).run(), RunStats)


async def fetch(n: int) -> bytes:
    return b"x" * n


async def words(line: str) -> AsyncIterator[str]:
    for word in line.split():
        yield word


def numbers() -> Iterator[float]:
    yield 1.5


assert_type(Pipeline(range(3)).map(fetch, kind="async"), Pipeline[bytes])
assert_type(Pipeline(["a b"]).flat_map(words, kind="async"), Pipeline[str])
assert_type(Pipeline(numbers()).map(round), Pipeline[int])


class Parse(Stage[str, int]):
    def setup(self) -> None:
        self.base = 10

    def process(self, item: str) -> int:
        return int(item, self.base)


class AsyncParse(Stage[str, int]):
    async def process(self, item: str) -> int:
        return int(item)


assert_type(Pipeline(["1"]).map(Parse, kind="process"), Pipeline[int])
assert_type(Pipeline(["1"]).map(Parse()), Pipeline[int])
assert_type(Pipeline(["1"]).map(AsyncParse, kind="async"), Pipeline[int])

for text in Pipeline(range(3)).map(str):
    assert_type(text, str)

with Pipeline(range(3)).map(str).start() as run:
    for out in run:
        assert_type(out, str)

Pipeline(range(3)).map(str.upper)  # type: ignore[arg-type]
Pipeline(range(3)).map(str, workers="2")  # type: ignore[call-overload]
Pipeline(range(3)).map(str, worker=2)  # type: ignore[call-overload]

# -- task queues -----------------------------------------------------------------------------

q = TaskQueue("memory://typing")


@q.task
def add(x: int, y: int) -> int:
    return x + y


@q.task(retries=5, timeout_s=10)
async def send_mail(to: str) -> str:
    return to


job = add.enqueue(1, 2)
assert_type(job, JobHandle[int])
assert_type(job.result(timeout_s=5), int)
assert_type(send_mail.enqueue("a@b.c").result(), str)
assert_type(send_mail.enqueue("a@b.c", _id="mail:a@b.c", _delay_s=10), JobHandle[str])
assert_type(add.enqueue(1, 2, _key="user:7", _priority=5), JobHandle[int])
assert_type(q.enqueue(add, 1, 2), JobHandle[int])
conn: object = None  # a psycopg connection or an SQLAlchemy session, in a real program
assert_type(add.enqueue(1, 2, _connection=conn, _id="sum:1+2"), JobHandle[int])
assert_type(add.enqueue_many([((1, 2), {})], _connection=conn), list[JobHandle[int]])

add.enqueue("a")  # type: ignore[call-overload]
add.enqueue(1)  # type: ignore[call-overload]
send_mail.enqueue("a@b.c", _delay_s="soon")  # type: ignore[call-overload]
q.task(retries="3")  # type: ignore[call-overload]
