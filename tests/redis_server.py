"""A ``redis-server`` the tests start, on a free loopback port, and stop again.

The tests never touch a server they did not start. Without the binary the Redis tests are
skipped with a loud reason, except under ``CI=true``, where a missing server fails the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import NoReturn

BINARY = shutil.which("redis-server")


def server_missing(reason: str) -> NoReturn:
    """Skip the test loudly for ``reason``; under ``CI=true``, fail it."""
    import pytest  # only when reporting: benchmarks use these servers too

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + "; CI=true requires it", pytrace=False)
    pytest.skip(reason)


def need_redis_server() -> str:
    """The binary's path; skips (or, in CI, fails) the test when there is none."""
    if BINARY is None:
        server_missing(
            "REDIS TESTS NOT RUN: no redis-server on PATH "
            "(install it, e.g. apt install redis-server, to test the Redis backend)"
        )
    return BINARY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One server of our own: ``start``, ``stop`` (as an operator would: SHUTDOWN), ``kill``."""

    def __init__(self, folder: Path, *, aof: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.binary = need_redis_server()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.aof = aof
        #: more configuration, as command-line options (``--maxmemory``, ``1mb``, ...)
        self.extra = extra
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.aof
            else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--save",
                "",
                *persistence,
                "--daemonize",
                "no",
                "--logfile",
                str(self.folder / "redis.log"),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:  # start-up, not ordering work: wait until it answers
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                logfile = self.folder / "redis.log"
                log = logfile.read_text() if logfile.exists() else ""
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(0.02)

    def command(self, *args: str) -> bytes:
        """One command over a plain socket (inline protocol), for the tests' own use."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(65536)

    def stop(self) -> None:
        """SHUTDOWN (with AOF, everything acknowledged is on disk), then wait for the exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            self.command("SHUTDOWN")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
