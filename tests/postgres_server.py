"""A throw-away PostgreSQL cluster the tests start, on a free loopback port, and stop again.

The binaries are the installation's own (``initdb``, ``pg_ctl``, ``postgres`` in ``pg_config
--bindir``); the cluster lives in a temporary folder and is never the machine's own server.
Without them the PostgreSQL tests are skipped with a loud reason, except under ``CI=true``,
where a missing binary fails the run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

from .redis_server import free_port, server_missing


def bindir() -> Path | None:
    """Where the installation's server binaries are (None: no PostgreSQL here)."""
    config = shutil.which("pg_config")
    if config is not None:
        done = subprocess.run([config, "--bindir"], capture_output=True, text=True, check=False)
        folder = Path(done.stdout.strip())
        if done.returncode == 0 and (folder / "initdb").is_file():
            return folder
    initdb = shutil.which("initdb")
    return None if initdb is None else Path(initdb).parent


def need_postgres() -> Path:
    """The binaries' folder; skips (or, in CI, fails) the test when there is none."""
    found = bindir()
    if found is None:
        server_missing(
            "POSTGRESQL TESTS NOT RUN: no initdb/pg_ctl (pg_config --bindir finds none; "
            "install PostgreSQL, e.g. apt install postgresql, to test the PostgreSQL backend)"
        )
    return found


def _user() -> str | None:
    """``initdb`` and ``postgres`` refuse to run as root: run as the installation's
    ``postgres`` user when the tests run as root."""
    return "postgres" if os.geteuid() == 0 else None


class PostgresServer:
    """One cluster of our own: ``start``, ``stop`` (fast shutdown), ``kill`` (SIGKILL of the
    postmaster, as a crash), ``restart``. Users: ``conveyor`` (trust) and ``secret`` (password
    ``s3cret``, scram)."""

    PASSWORD = "s3cret"

    def __init__(self) -> None:
        self.bin = need_postgres()
        # a folder of its own in /tmp (the server's user must reach it: pytest's own
        # temporary folders are private to the user running the tests)
        self.folder = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        if _user() is not None:
            shutil.chown(self.folder, "postgres", "postgres")
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "conveyor",
                "--auth-local=trust",
                "--auth-host=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            user=_user(),
        )
        hba = self.data / "pg_hba.conf"
        # the user "secret" must give its password; everyone else is trusted on loopback
        hba.write_text(
            "host all secret 127.0.0.1/32 scram-sha-256\n"
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )

    def url(self, user: str = "conveyor", db: str = "conveyor") -> str:
        auth = f"{user}:{self.PASSWORD}" if user == "secret" else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        log = self._log()
        try:
            self._start(log)
        finally:
            log.close()  # the server has its own copy

    def _start(self, log: IO[bytes]) -> None:
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.folder}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            user=_user(),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                said = (self.folder / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres exited at start:\n{said}")
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
                check=False,
            )
            if ready.returncode == 0:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("postgres did not start within 30 s")

    def _log(self) -> IO[bytes]:
        return open(self.folder / "server.log", "ab")

    def psql(self, sql: str, db: str = "postgres") -> str:
        done = subprocess.run(
            [
                str(self.bin / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "conveyor",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-Atc",
                sql,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    def create_database(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown (SIGTERM would wait for clients)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the postmaster (its children end when they see it gone)."""
        if self.proc is not None:
            subprocess.run(["pkill", "-KILL", "-P", str(self.proc.pid)], check=False)
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
            # the backends of a killed postmaster exit on their own; wait for the port
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (self.data / "postmaster.pid").exists():
                pids = subprocess.run(
                    ["pgrep", "-f", f"postgres.*{self.data}"], capture_output=True, check=False
                )
                if not pids.stdout:
                    (self.data / "postmaster.pid").unlink(missing_ok=True)
                    break
                time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop it and delete its folder."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
