"""chihuo's documented API on conveyor.compat.chihuo, including the page's demo."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conveyor import ConfigurationError, TaskQueue
from conveyor.compat import chihuo
from conveyor.compat.chihuo import ChihuoLoop
from conveyor.compat.chihuo.common import SERVER_DEFAULT_CONFIG_PATH

from .conftest import eventually

ROOT = Path(__file__).resolve().parents[1]

DEMO = """
from chihuo import ChihuoLoop
from chihuo.common import SERVER_DEFAULT_CONFIG_PATH
import chihuo


class MyTasksA(ChihuoLoop):

    NAME = "my-tasksA"  # The unique id for backend queue server
    CONCURRENCY = 10   # The number of tasks running concurrently
    SERVER_CONFIG = SERVER_DEFAULT_CONFIG_PATH

    def __init__(self):
        super().__init__()

    async def start(self):
        for i in range(10):
            await self.add_task((str(i), [i ** 2]))

    async def make_task(self, task_id, task):
        print(f"my-task-A: {task_id}")
        print(f"power of {task_id} is {task}")

        # Talk chihuo that the task is finished
        await self.task_finish(task_id)


class MyTasksB(ChihuoLoop):

    NAME = "my-tasksB"  # The unique id for the loop
    CONCURRENCY = 10   # The number of tasks running concurrently
    SERVER_CONFIG = SERVER_DEFAULT_CONFIG_PATH

    def __init__(self):
        super().__init__()

    async def start(self):
        for i in range(10):
            await self.add_task((str(i), [i ** 2]))

    async def make_task(self, task_id, task):
        print(f"my-task-B: {task_id}")
        print(f"power of {task_id} is {task}")

        # Talk chihuo that the task is finished
        await self.task_finish(task_id)


if __name__ == '__main__':
    chihuo.run(MyTasksA, MyTasksB)
    print("run returned", flush=True)
"""


def test_the_pages_demo_runs_until_sigint(tmp_path: Path) -> None:
    # the page's demo, changed only where it cannot run anywhere: it reads `i` where its loop
    # variable is `id`, and its task info `{i ** 2}` is a set, which JSON cannot carry
    (tmp_path / "abc.py").write_text(
        DEMO.replace("from chihuo", "from conveyor.compat.chihuo").replace(
            "import chihuo", "from conveyor.compat import chihuo"
        )
    )
    (tmp_path / "server.json").write_text("backend=sqlite\npath=tasks.db\n")
    out = tmp_path / "out.txt"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-u", "abc.py"],
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        try:
            eventually(lambda: out.read_text().count("power of") == 20, timeout_s=30)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0
        finally:
            proc.kill()
    lines = out.read_text().splitlines()
    for name in ("A", "B"):
        assert sorted(
            int(x.split(": ")[1]) for x in lines if x.startswith(f"my-task-{name}:")
        ) == list(range(10))
    assert "power of 3 is [9]" in lines
    assert lines[-1] == "run returned"


def write_config(folder: Path, text: str, name: str = SERVER_DEFAULT_CONFIG_PATH) -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


class Squares(ChihuoLoop):
    NAME = "squares"
    CONCURRENCY = 4
    seen: list[tuple[str, Any]]

    async def make_task(self, task_id: Any, task: Any) -> None:
        self.seen.append((task_id, task))
        await self.task_finish(task_id)


def loop_url(config: dict[str, Any]) -> str:
    from conveyor.compat.chihuo import queue_url

    return queue_url({k: str(v) for k, v in config.items()})


def test_config_files_blank_and_comment_lines_and_backends(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "# a comment\n\nbackend = sqlite\npath = "
        + str(tmp_path / "q.db")
        + "\nip=127.0.0.1\nport=8311\n",
    )
    loop = Squares(server_config=path, run_forever=False)
    assert loop._queue.url.startswith("sqlite:///")
    assert Squares(server_config={"backend": "memory", "ip": "", "port": 0})._queue.url == (
        "memory://chihuo"
    )
    redis = {"backend": "redis", "ip": "10.0.0.7", "port": 7000, "password": "p/w", "db": 2}
    assert loop_url(redis) == "redis://:p%2Fw@10.0.0.7:7000/2"
    with pytest.raises(ConfigurationError, match=r"'lodis' is not supported.*memory, sqlite"):
        Squares(server_config={"backend": "lodis", "ip": "127.0.0.1", "port": 8311})
    with pytest.raises(ConfigurationError, match="not found"):
        Squares(server_config=str(tmp_path / "missing.config"))
    with pytest.raises(ConfigurationError, match="key=value"):
        Squares(server_config=write_config(tmp_path, "backend sqlite\n", "bad.config"))


def test_server_json_is_found_when_server_config_is_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, "backend=memory\nip=x\nport=1\n", "server.json")
    assert Squares()._queue.url == "memory://chihuo"


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_finish_unfinish_and_adding_again(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    config: dict[str, Any] = {
        "backend": "sqlite",
        "path": str(tmp_path / "f.db"),
        "ip": "",
        "port": 0,
    }
    if backend == "redis":  # chihuo's redis config: ip and port (a prefix keeps tests apart)
        server = request.getfixturevalue("redis_server")
        config = {"backend": "redis", "ip": "127.0.0.1", "port": server.port}
        config["prefix"] = f"chihuo{tmp_path.name}:"

    class Once(Squares):
        NAME = "once"

        async def start(self) -> None:
            await self.add_task(("a", 1), ("b", 2))
            await self.add_task(("a", 1))  # already queued: not twice

    loop = Once(server_config=config, run_forever=False)
    loop.seen = []
    chihuo.run(loop)
    assert sorted(loop.seen) == [("a", 1), ("b", 2)]

    async def more() -> None:
        assert await loop.task_finished("a")
        await loop.add_task(("a", 1))  # finished: not added
        await loop.add_task(("b", 2), finished=False)  # added even though finished
        await loop.task_unfinish("a")
        await loop.add_task(("a", 3))

    asyncio.run(more())
    again = Once(server_config=config, run_forever=False)
    again.seen = []
    chihuo.run(again)
    # start() adds a and b; b was added again with finished=False, a after task_unfinish
    assert sorted(again.seen) == [("a", 3), ("b", 2)]


def test_task_info_must_be_json(tmp_path: Path) -> None:
    loop = Squares(server_config={"backend": "memory", "ip": "", "port": 0})
    with pytest.raises(ConfigurationError, match=r"set.*JSON"):
        asyncio.run(loop.add_task(("x", {1})))


def test_a_failing_task_follows_the_retry_policy(tmp_path: Path) -> None:
    tries: list[str] = []

    class Fails(ChihuoLoop):
        NAME = "fails"
        RETRIES = 2
        BACKOFF_S = 0.01
        SERVER_CONFIG = {
            "backend": "sqlite",
            "path": str(tmp_path / "x.db"),
            "ip": "",
            "port": 0,
        }

        async def start(self) -> None:
            await self.add_task(("t", None))

        async def make_task(self, task_id: Any, task: Any) -> None:
            tries.append(task_id)
            raise RuntimeError("always")

    loop = Fails(run_forever=False)
    chihuo.run(loop)
    assert tries == ["t", "t", "t"]  # three attempts, not forever
    assert loop._queue.stats().dead == 1


def test_sigint_sends_running_tasks_back_to_the_head(tmp_path: Path) -> None:
    script = tmp_path / "hold.py"
    db = tmp_path / "h.db"
    script.write_text(
        textwrap.dedent(f"""
        import asyncio
        from conveyor.compat import chihuo
        from conveyor.compat.chihuo import ChihuoLoop

        class Hold(ChihuoLoop):
            NAME = "hold"
            CONCURRENCY = 1
            SERVER_CONFIG = {{"backend": "sqlite", "path": {str(db)!r}, "ip": "", "port": 0}}

            async def start(self):
                await self.add_task(("first", 1), ("second", 2))

            async def make_task(self, task_id, task):
                print("running", task_id, flush=True)
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    print("stop is", self.stop, flush=True)  # set by the signal
                    raise

        if __name__ == "__main__":
            chihuo.run(Hold)
            print("run returned", flush=True)
    """)
    )
    proc = subprocess.Popen(
        [sys.executable, "-u", str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "running first"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        rest = proc.stdout.read().strip().splitlines()
        assert rest == ["stop is True", "run returned"]
    finally:
        proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
    q = TaskQueue(f"sqlite:///{db}", name="hold")
    job = q.backend.get("hold:first")
    assert job is not None and job.state == "queued" and job.attempts == 0
    leases = q.backend.claim("hold", "w", 30, q.now(), limit=2)
    assert [lease.job.id for lease in leases] == ["hold:first", "hold:second"]  # at the head
    q.close()


def server_config(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, prefix: str
) -> dict[str, Any]:
    """A chihuo ``server_config`` for a SQLite file in tmp_path, or for the test Redis (keys
    under a prefix of this test's own)."""
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        return {
            "backend": "redis",
            "ip": "127.0.0.1",
            "port": server.port,
            "prefix": f"{prefix}{tmp_path.name}:",
        }
    return {"backend": "sqlite", "path": str(tmp_path / "s.db"), "ip": "", "port": 0}


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_setting_stop_leaves_every_task_not_started_in_the_queue(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    config = server_config(backend, tmp_path, request, prefix="chihuo")
    ran: list[str] = []

    for round_ in range(5):  # a race would show in one of several runs

        class StopsAfterOne(ChihuoLoop):
            NAME = f"stopper{round_}"
            CONCURRENCY = 1

            async def make_task(self, task_id: Any, task: Any) -> None:
                ran.append(task_id)
                self.stop = True

        ran.clear()
        loop = StopsAfterOne(server_config=config)
        asyncio.run(loop.add_task(*[(str(i), i) for i in range(5)]))
        chihuo.run(loop)
        assert len(ran) == 1 and loop.stop
        q = loop._queue
        assert q.stats().running == 0  # nothing held by the loop that left
        left = q.backend.claim(q.name, "next", 30, q.now(), limit=10)
        assert sorted(lease.job.id for lease in left) == sorted(
            f"{q.name}:{i}" for i in range(5) if str(i) != ran[0]
        )
        q.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_tasks_that_start_adds_after_stop_was_set_are_not_lost(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """stop means stop taking tasks: a start() still adding when it is set gets its tasks in."""
    config = server_config(backend, tmp_path, request, prefix="late")

    class AddsLate(ChihuoLoop):
        NAME = "late"
        CONCURRENCY = 1

        async def start(self) -> None:
            self.stopped = asyncio.Event()
            await self.add_task(("0", 0))
            await self.stopped.wait()  # the loop is on its way out
            await self.add_task(*[(str(i), i) for i in range(1, 5)])

        async def make_task(self, task_id: Any, task: Any) -> None:
            await self.task_finish(task_id)
            self.stop = True
            self.stopped.set()

    loop = AddsLate(server_config=config)
    chihuo.run(loop)
    q = loop._queue
    left = q.backend.claim(q.name, "next", 30, q.now(), limit=10)
    assert sorted(lease.job.id for lease in left) == [f"late:{i}" for i in range(1, 5)]
    q.close()
