"""Workers as separate processes, as in production: kill them, stop them, race them."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import TaskQueue

from ..conftest import alive, eventually

ROOT = Path(__file__).resolve().parents[2]


class Env:
    def __init__(self, tmp: Path, url: str) -> None:
        self.url = url
        self.log = tmp / "log.txt"
        self.gate = tmp / "gate"
        self.log.touch()
        #: what the workers said (kept for a failing test's report)
        self.stderr = open(tmp / "workers.log", "ab")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.drains: list[threading.Thread] = []
        self.queue = TaskQueue(self.url)

    def worker(self, *args: str, banner: bool = False) -> subprocess.Popen[bytes]:
        """Start a worker; with ``banner``, return once it has said it runs."""
        env = {
            **os.environ,
            "CONVEYOR_TEST_QUEUE": self.url,
            "CONVEYOR_TEST_LOG": str(self.log),
            "CONVEYOR_TEST_GATE": str(self.gate),
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conveyor",
                "worker",
                "tests.tasks.app:queue",
                "--poll-s",
                "0.05",
                *args,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if banner else self.stderr,
        )
        self.procs.append(proc)
        if banner:
            assert proc.stderr is not None
            first = proc.stderr.readline()  # "worker ... on ...": it is about to claim
            assert first.startswith(b"worker "), first
            drain = threading.Thread(target=proc.stderr.read, daemon=True)  # keep draining
            drain.start()
            self.drains.append(drain)
        return proc

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def started(self, job: str) -> list[str]:
        return [line.split()[2] for line in self.lines() if line.startswith(f"start {job} ")]


def open_env(tmp: Path, url: str) -> Iterator[Env]:
    e = Env(tmp, url)
    yield e
    for p in e.procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
    for drain in e.drains:
        drain.join(10)
    for p in e.procs:
        if p.stderr is not None:
            p.stderr.close()
    e.queue.close()
    e.stderr.close()


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    if request.param in ("redis", "postgres"):
        url = request.getfixturevalue(f"{request.param}_url")
    else:
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    yield from open_env(tmp_path, url)


def test_sigkill_mid_task_runs_it_again_after_the_lease_with_one_result(env: Env) -> None:
    job = env.queue.enqueue("record", "k", hold=True)
    first = env.worker("--lease-s", "1")
    eventually(lambda: env.started("k") == [str(first.pid)], timeout_s=20)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    env.gate.touch()
    second = env.worker("--lease-s", "1", "--burst")
    assert second.wait(30) == 0
    assert job.result(timeout_s=5) == "k"
    assert env.started("k") == [str(first.pid), str(second.pid)]
    assert [line for line in env.lines() if line.startswith("end k")] == [f"end k {second.pid}"]
    assert job.info().attempts == 2


def test_sigkill_mid_task_runs_it_again_at_once_on_a_worker_that_finds_it_dead(
    env: Env,
) -> None:
    """The killed worker is not waited for (a zombie until the end): another worker on the
    machine sees that its pid no longer runs and ends its leases, long before the 60 s lease
    would lapse."""
    job = env.queue.enqueue("record", "r", hold=True)
    first = env.worker("--lease-s", "60")
    eventually(lambda: env.started("r") == [str(first.pid)], timeout_s=20)
    second = env.worker("--lease-s", "60", banner=True)
    first.send_signal(signal.SIGKILL)
    eventually(lambda: len(env.started("r")) == 2, timeout_s=20)
    assert env.started("r") == [str(first.pid), str(second.pid)]
    env.gate.touch()
    assert job.result(timeout_s=10) == "r"
    info = job.info()
    assert (info.attempts, info.lost) == (2, 1)
    [lost, kept] = info.runs()
    assert lost.outcome == "lost" and lost.worker is not None
    assert f":{first.pid}:" in lost.worker and kept.outcome == "succeeded"
    [record] = [w for w in env.queue.workers() if w.pid == first.pid]
    assert record.reclaimed_at is not None and record.state(env.queue.now()) == "gone"
    assert first.wait(10) == -signal.SIGKILL


def test_a_job_that_kills_its_worker_does_not_take_the_jobs_beside_it_down(env: Env) -> None:
    """A job lost with its worker may be what killed it: it runs again alone, so the jobs
    that were beside it lose one run, not their crash budget, and the poison alone is dead
    after max_crashes (3)."""
    bystanders = [env.queue.enqueue("record", f"b{i}", hold=True) for i in range(3)]
    first = env.worker("--concurrency", "5")
    eventually(lambda: all(env.started(f"b{i}") for i in range(3)), timeout_s=20)
    poison = env.queue.enqueue("poison", "p")  # a free slot takes it: it kills all four
    assert first.wait(20) == -signal.SIGKILL
    env.gate.touch()
    workers = 1
    while poison.status() != "dead":
        assert workers < 6, env.lines()
        nxt = env.worker("--concurrency", "5")
        workers += 1

        def over(w: subprocess.Popen[bytes] = nxt) -> bool:
            return w.poll() is not None or poison.status() == "dead"

        eventually(over, timeout_s=30)
    assert [b.result(timeout_s=30) for b in bystanders] == ["b0", "b1", "b2"]
    assert [b.info().lost for b in bystanders] == [1, 1, 1]
    info = poison.info()
    assert info.lost == 3 and "died 3 times" in (info.error or "")
    assert len(env.started("p")) == 3  # with the three beside it once, then alone twice
    assert workers == 4  # three it killed, and one that found it dead without running it


def test_sigterm_mid_task_hands_it_to_another_worker_within_a_second(env: Env) -> None:
    job = env.queue.enqueue("record", "t", hold=True)
    first = env.worker("--lease-s", "60", "--shutdown-grace-s", "0.1")
    eventually(lambda: env.started("t") == [str(first.pid)], timeout_s=20)
    second = env.worker("--lease-s", "60", banner=True)  # running, about to wait for work
    t0 = time.monotonic()
    first.send_signal(signal.SIGTERM)
    eventually(lambda: len(env.started("t")) == 2, timeout_s=5)
    assert time.monotonic() - t0 < 1.0
    assert first.wait(10) == 0
    assert env.started("t") == [str(first.pid), str(second.pid)]
    env.gate.touch()
    assert job.result(timeout_s=10) == "t"


def test_workers_racing_run_each_job_once(env: Env) -> None:
    env.queue.enqueue_many("record", [((str(i),), {}) for i in range(300)])
    workers = [env.worker("--burst", "--concurrency", "4") for _ in range(3)]
    for w in workers:
        assert w.wait(60) == 0
    ends = Counter(line.split()[1] for line in env.lines() if line.startswith("end "))
    assert ends == Counter({str(i): 1 for i in range(300)})
    assert env.queue.stats().done == 300


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_a_script_exits_soon_after_its_worker_stops(tmp_path: Path, executor: str) -> None:
    """A stopped worker's last wait on its storage (an hour here) and its pools do not hold
    up the interpreter's exit: the subprocess timeout catches a hang."""
    script = tmp_path / "burst.py"
    script.write_text(
        "from conveyor import TaskQueue\n"
        "q = TaskQueue('memory://')\n"
        "def hello(x):\n"
        "    return x\n"
        f"task = q.task(hello, executor={executor!r})\n"
        "if __name__ == '__main__':\n"
        "    jobs = [task.enqueue(i) for i in range(5)]\n"
        "    q.worker(burst=True, poll_s=3600, handle_signals=False).run()\n"
        "    print(sum(j.result() for j in jobs))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "10"


def test_sigterm_stops_a_running_process_task_and_hands_it_back(env: Env) -> None:
    job = env.queue.enqueue("precord", "p", hold=True)
    first = env.worker("--lease-s", "60", "--shutdown-grace-s", "0.2")
    eventually(lambda: len(env.started("p")) == 1, timeout_s=30)
    (child,) = env.started("p")
    assert child != str(first.pid)  # it runs in a worker process of the worker
    first.send_signal(signal.SIGTERM)
    assert first.wait(10) == 0
    assert not alive(int(child))  # killed with its worker, not left running the job
    assert job.status() == "queued"  # handed back at once, not after the 60 s lease
    assert job.info().attempts == 0


def test_a_killed_worker_takes_its_worker_processes_with_it(env: Env) -> None:
    env.queue.enqueue("precord", "k", hold=True)
    first = env.worker("--lease-s", "60")
    eventually(lambda: len(env.started("k")) == 1, timeout_s=30)
    (child,) = env.started("k")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    eventually(lambda: not alive(int(child)), timeout_s=10)


def test_a_job_that_kills_its_worker_goes_dead_after_its_attempts_and_frees_its_key(
    env: Env,
) -> None:
    poison = env.queue.enqueue("poison", "p", _key="user-1")  # retries=2: three attempts
    after = env.queue.enqueue("record", "next", _key="user-1")
    for n in range(1, 4):
        worker = env.worker("--lease-s", "0.5")
        assert worker.wait(30) == -signal.SIGKILL  # the job killed it
        assert len(env.started("p")) == n
        assert poison.info().attempts == n
    last = env.worker("--lease-s", "0.5", "--burst")
    assert last.wait(30) == 0
    info = poison.info()
    assert info.state == "dead" and info.lost == 3 and len(env.started("p")) == 3
    assert info.error is not None and "died 3 times" in info.error
    assert after.result(timeout_s=5) == "next"  # the key was not left blocked


def pause(env: Env, proc: subprocess.Popen[bytes]) -> None:
    """SIGSTOP ``proc``. On SQLite, a process frozen inside a transaction would hold the
    file's write lock (every writer waits for it: SQLite has no lease on its locks), so the
    pause is made again until it lands between two transactions."""
    while True:
        proc.send_signal(signal.SIGSTOP)
        if not env.url.startswith("sqlite"):
            return
        db = sqlite3.connect(env.url[len("sqlite:///") :], timeout=0.05, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            proc.send_signal(signal.SIGCONT)
        finally:
            db.close()


def test_a_worker_paused_past_its_lease_and_resumed_keeps_no_outcome_and_goes_on(
    env: Env,
) -> None:
    job = env.queue.enqueue("record", "s", hold=True)
    first = env.worker("--lease-s", "0.5")
    eventually(lambda: env.started("s") == [str(first.pid)], timeout_s=20)
    pause(env, first)  # paused mid-job: no heartbeat, the lease lapses
    try:
        env.gate.touch()
        second = env.worker("--lease-s", "0.5", "--burst")
        assert second.wait(30) == 0
        assert job.result(timeout_s=5) == "s"
        kept = job.info()
        assert kept.attempts == 2 and kept.lost == 1
    finally:
        first.send_signal(signal.SIGCONT)
    # the paused worker wakes up, finishes its copy, and its outcome is refused
    eventually(lambda: f"end s {first.pid}" in env.lines(), timeout_s=20)
    after = env.queue.enqueue("record", "after")
    assert after.result(timeout_s=20) == "after"  # it goes on working
    assert first.poll() is None
    info = job.info()
    assert (info.state, info.finished_at, info.attempts) == ("done", kept.finished_at, 2)
    first.send_signal(signal.SIGTERM)
    assert first.wait(10) == 0


def test_a_script_and_the_processes_it_starts_agree_on_task_names(tmp_path: Path) -> None:
    """Run as ``python app.py``, a script's functions live in ``__main__``; in the processes
    multiprocessing starts from it, in ``__mp_main__``; ``conveyor worker app:queue`` imports
    it as ``app``. A task's name must be the same in all three."""
    db = tmp_path / "jobs.db"
    script = tmp_path / "app.py"
    script.write_text(
        "import multiprocessing, sys\n"
        "from conveyor import TaskQueue\n"
        f"queue = TaskQueue('sqlite:///{db}')\n"
        "@queue.task\n"
        "def tiny(x):\n"
        "    return x + 1\n"
        "def work():\n"
        "    queue.worker(burst=True, handle_signals=False).run()\n"
        "if __name__ == '__main__':\n"
        "    print(tiny.name)\n"
        "    jobs = [tiny.enqueue(i) for i in range(20)]\n"
        "    p = multiprocessing.get_context(sys.argv[1]).Process(target=work)\n"
        "    p.start(); p.join(60)\n"
        "    print(sum(j.result(timeout_s=5) for j in jobs))\n"
    )
    for method in ("spawn", "forkserver"):
        done = subprocess.run(
            [sys.executable, str(script), method],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd=tmp_path,
        )
        assert done.stdout.split() == ["app.tiny", str(sum(range(1, 21)))]
    # and a worker started by the command line, which imports the script as a module
    with TaskQueue(f"sqlite:///{db}") as q:
        job = q.enqueue("app.tiny", 41)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT / 'src'}"}
    subprocess.run(
        [sys.executable, "-m", "conveyor", "worker", "app:queue", "--burst"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    with TaskQueue(f"sqlite:///{db}") as q:
        assert q.job(job.id).result(timeout_s=5) == 42
