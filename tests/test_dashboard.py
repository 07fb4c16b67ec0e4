"""The web dashboard: its pages, JSON API and actions over HTTP, its security rules, and end to
end in headless Chromium (Debian's ``chromium``, driven by Playwright)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import TaskQueue
from conveyor.dashboard import make_app, make_asgi_app, serve

from .conftest import eventually

EVIL = "<script>alert(1)</script>"


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[TaskQueue]:
    q = TaskQueue(f"sqlite:///{tmp_path / 'q.db'}")
    yield q
    q.close()


class Served:
    def __init__(self, queue: TaskQueue, token: str | None) -> None:
        self.server = serve(queue, port=0, token=token)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def post(self, path: str, form: dict[str, str], auth: str | None = None) -> int:
        request = urllib.request.Request(
            self.base + path, data="&".join(f"{k}={v}" for k, v in form.items()).encode()
        )
        if auth:
            request.add_header("Authorization", auth)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def dead_job(queue: TaskQueue) -> str:
    @queue.task(name="boom", retries=0)
    def boom(text: str) -> None:
        raise ValueError(f"bad {text}")

    handle = boom.enqueue(EVIL)
    queue.worker(burst=True, poll_s=0.05, burst_horizon_s=0, handle_signals=False).run()
    assert handle.status() == "dead"
    return handle.id


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()


def test_pages_and_api_show_the_queue_and_escape_what_jobs_carry(
    queue: TaskQueue, dead_job: str
) -> None:
    served = Served(queue, token=None)
    try:
        assert served.server.server_address[0] == "127.0.0.1"
        assert served.get("/health") == (200, '{"ok": true}')
        status, body = served.get("/api/queue")
        assert status == 200 and json.loads(body)["dead"] == 1
        status, body = served.get("/api/jobs?state=dead")
        assert [j["id"] for j in json.loads(body)] == [dead_job]
        status, body = served.get(f"/api/job/{dead_job}")
        record = json.loads(body)
        assert "ValueError: bad <script>" in record["error"]  # JSON: data as it is
        [run] = record["runs"]
        assert run["outcome"] == "dead" and run["worker"] == record["worker"] is not None
        assert run["error"] == record["error"]
        assert served.get("/api/job/nosuch")[0] == 404
        for path in ("/", "/jobs?state=dead", f"/job/{dead_job}", "/jobs?task=%3Cb%3E"):
            status, page = served.get(path)
            assert status == 200, path
            assert "<script>" not in page, path  # nothing a job carries is markup
        page = served.get(f"/job/{dead_job}")[1]
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "Traceback" in page
        attempts = page.split('<table id="runs">', 1)[1].split("</table>", 1)[0]
        assert (
            "<td>1</td><td>dead</td>" in attempts and "ValueError: bad &lt;script&gt;" in attempts
        )
        assert "read-only dashboard" in page
        assert served.get("/job/nosuch")[0] == 404
        status, found = served.get(f"/job?id=+{dead_job}+")  # the search box, spaces and all
        assert status == 200 and f"Job {dead_job}" in found
        assert served.get("/job?id=nosuch")[0] == 404 and served.get("/job?id=")[0] == 404
        assert 'action="job"' in served.get("/jobs?state=dead")[1]
    finally:
        served.close()


def test_actions_need_the_token_and_a_csrf_token(queue: TaskQueue, dead_job: str) -> None:
    readonly = Served(queue, token=None)
    try:
        assert readonly.post(f"/job/{dead_job}/requeue", {}, basic("x")) == 403
    finally:
        readonly.close()
    served = Served(queue, token="s3cret")
    try:
        path = f"/job/{dead_job}/requeue"
        assert served.post(path, {}) == 401  # no credentials
        assert served.post(path, {}, basic("wrong")) == 401
        assert served.post(path, {"csrf": "forged"}, basic("s3cret")) == 403
        assert queue.job(dead_job).status() == "dead"
        page = served.get(f"/job/{dead_job}")[1]
        csrf = page.split('name="csrf" value="')[1].split('"')[0]
        assert served.post(path, {"csrf": csrf}, basic("s3cret")) == 200  # 303, followed
        assert queue.job(dead_job).status() == "queued"
        assert served.post(path, {"csrf": csrf}, basic("s3cret")) == 409  # not dead any more
        # a queued job can be cancelled: it is dead, and says why
        assert "Cancel" in served.get(f"/job/{dead_job}")[1]
        assert served.post(f"/job/{dead_job}/cancel", {"csrf": csrf}, basic("s3cret")) == 200
        info = queue.job(dead_job).info()
        assert info.state == "dead" and info.error == "cancelled from the dashboard"
        assert served.post(f"/job/{dead_job}/cancel", {"csrf": csrf}, basic("s3cret")) == 409
        # an API client with a bearer token needs no page, hence no CSRF token
        assert served.post("/queue/purge", {}, "Bearer s3cret") == 400  # confirm=yes first
        assert served.post("/queue/purge", {"confirm": "yes"}, "Bearer s3cret") == 200
        assert queue.stats().queued == 0
    finally:
        served.close()


def chromium() -> str:
    """Debian's chromium, installed here if it is missing (the tests run as root)."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        import fcntl

        # test runs of several Pythons at once install it once: the first takes the lock,
        # the others wait for it, then find it installed (apt also waits for dpkg's lock)
        with open("/tmp/conveyor-chromium-install.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if shutil.which("chromium") is None:
                subprocess.run(
                    ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", "chromium"],
                    env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                    capture_output=True,
                    check=False,
                    timeout=900,
                )
        found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("BROWSER TESTS NOT RUN: no chromium, and it could not be installed")
        pytest.skip("BROWSER TESTS NOT RUN: no chromium (apt-get install chromium)")
    return found


@pytest.mark.timeout(180)
def test_in_a_browser_a_dead_job_is_seen_requeued_and_done(
    queue: TaskQueue, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    from .tasks.conftest import Running

    fixed = threading.Event()

    @queue.task(name="flaky", retries=0)
    def flaky(text: str) -> str:
        if not fixed.is_set():
            raise ValueError(f"bad {text}")
        return "fine"

    handle = flaky.enqueue(EVIL)
    queue.worker(burst=True, poll_s=0.05, burst_horizon_s=0, handle_signals=False).run()
    served = Served(queue, token="s3cret")
    shots = Path(os.environ.get("CONVEYOR_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    running = None
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            context = browser.new_context(http_credentials={"username": "a", "password": "s3cret"})
            page = context.new_page()
            dialogs: list[Any] = []

            def on_dialog(dialog: Any) -> None:  # an alert() would land here
                dialogs.append(dialog)
                dialog.dismiss()

            page.on("dialog", on_dialog)
            page.goto(served.base + "/")
            assert page.locator("h1").inner_text() == "Queue"
            page.screenshot(path=str(shots / "dashboard-queue.png"), full_page=True)
            page.click("text=dead")
            page.screenshot(path=str(shots / "dashboard-jobs.png"), full_page=True)
            page.click(f"text={handle.id}")
            assert EVIL in page.locator("#traceback").inner_text()  # shown as text
            page.screenshot(path=str(shots / "dashboard-job.png"), full_page=True)
            fixed.set()
            running = Running(queue.worker(poll_s=0.05, handle_signals=False))
            page.click("button:has-text('Requeue')")

            def done() -> bool:
                page.reload()
                return "done" in page.locator("table").first.inner_text()

            eventually(done, 30)
            assert handle.result(timeout_s=10) == "fine"
            assert not dialogs  # no script ran: the argument stayed text
            browser.close()
    finally:
        if running is not None:
            running.stop()
        served.close()


def test_a_dashboard_others_can_reach_needs_the_token_to_be_read(queue: TaskQueue) -> None:
    from conveyor import ConfigurationError

    with pytest.raises(ConfigurationError, match="give a token"):
        serve(queue, port=0, host="0.0.0.0")
    app = make_app(queue, token="s3cret", private=True)
    statuses: list[str] = []

    def start(status: str, headers: list[tuple[str, str]]) -> None:
        statuses.append(status)

    def get(path: str, auth: str | None = None) -> str:
        environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": ""}
        if auth:
            environ["HTTP_AUTHORIZATION"] = auth
        app(environ, start)
        return statuses[-1]

    assert get("/").startswith("401") and get("/api/jobs").startswith("401")
    assert get("/", basic("s3cret")).startswith("200")
    assert get("/health").startswith("200")  # probes need no credentials


class Asgi:
    """Calls an ASGI app as a server would, one request at a time."""

    def __init__(self, app: Any, root: str = "") -> None:
        self.app = app
        self.root = root

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        path, _, query = path.partition("?")
        scope = {
            "type": "http",
            "method": method,
            "path": self.root + path,
            "root_path": self.root,
            "query_string": query.encode(),
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
            "server": ("127.0.0.1", 8000),
        }
        # the body in two parts, as a server may hand it over
        inbox = [
            {"type": "http.request", "body": body[:3], "more_body": True},
            {"type": "http.request", "body": body[3:], "more_body": False},
        ]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return inbox.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        asyncio.run(self.app(scope, receive, send))
        start, answer = sent
        head = {k.decode(): v.decode() for k, v in start["headers"]}
        return int(start["status"]), head, bytes(answer["body"])


def test_as_an_asgi_app_mounted_under_a_prefix(queue: TaskQueue, dead_job: str) -> None:
    app = make_asgi_app(queue, token="s3cret")
    client = Asgi(app, root="/ops")
    status, head, body = client.request("GET", "/health")
    assert (status, body) == (200, b'{"ok": true}')
    status, head, body = client.request("GET", f"/job/{dead_job}")
    page = body.decode()
    assert status == 200 and head["content-type"].startswith("text/html")
    assert '<base href="/ops/">' in page and "<script>" not in page
    assert f'action="job/{dead_job}/requeue"' in page  # relative: under the prefix
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    form = f"csrf={csrf}".encode()
    assert client.request("POST", f"/job/{dead_job}/requeue", form)[0] == 401  # no token
    status, head, _ = client.request(
        "POST", f"/job/{dead_job}/requeue", form, {"Authorization": basic("s3cret")}
    )
    assert status == 303 and head["location"] == f"/ops/job/{dead_job}"
    requeued = queue.backend.get(dead_job)
    assert requeued is not None and requeued.state == "queued"
    status, _, body = client.request("HEAD", "/api/queue")
    assert status == 200 and body == b""
    status, _, body = client.request("GET", "/api/jobs?state=queued")
    assert [j["id"] for j in json.loads(body)] == [dead_job]


def test_asgi_lifespan_is_answered_and_other_protocols_refused(queue: TaskQueue) -> None:
    app = make_asgi_app(queue)
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan"}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    with pytest.raises(ValueError, match="websocket"):
        asyncio.run(app({"type": "websocket"}, receive, send))


def test_a_wsgi_mount_keeps_links_under_its_prefix(queue: TaskQueue, dead_job: str) -> None:
    app = make_app(queue)
    answer: list[Any] = []
    environ = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "/admin/queue",
        "PATH_INFO": "/jobs",
        "QUERY_STRING": "state=dead",
    }

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        answer.append(status)

    page = b"".join(app(environ, start))
    assert answer == ["200 OK"]
    assert b'<base href="/admin/queue/">' in page and f'href="job/{dead_job}"'.encode() in page


def test_the_queue_shows_its_workers_rates_over_the_last_minute(tmp_path: Path) -> None:
    from conveyor import ManualClock
    from conveyor.tasks.backends.base import WorkerInfo

    clock = ManualClock(1_800_000_000.0)
    q = TaskQueue(f"sqlite:///{tmp_path / 'q.db'}", clock=clock)
    app = make_app(q)

    def beat(processed: int, failed: int, queues: tuple[str, ...] = ("default",)) -> None:
        for name in ("a", "b"):
            q.backend.worker_beat(
                WorkerInfo(
                    id=f"{name}:{queues[0]}",
                    host="h",
                    pid=1,
                    queues=queues,
                    concurrency=4,
                    started_at=clock.now() - 5,
                    last_beat=clock.now(),
                    beat_s=10.0,
                    running=0,
                    processed=processed,
                    failed=failed,
                )
            )

    def get(path: str) -> str:
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": ""}

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            assert status == "200 OK"

        return b"".join(app(environ, start)).decode()

    try:
        beat(100, 1)
        beat(0, 0, queues=("other",))  # another queue's workers do not count
        first = json.loads(get("/api/queue"))
        assert first["done_per_s"] is None
        assert "rates after the next refresh" in get("/")
        clock.advance(10)
        beat(150, 3)
        beat(900, 900, queues=("other",))
        second = json.loads(get("/api/queue"))
        assert (second["done_per_s"], second["dead_per_s"]) == (10.0, 0.4)  # 2 workers, 10 s
        page = get("/")
        assert '<meta http-equiv="refresh" content="10">' in page
        assert "10.0 done/s, 0.4 dead/s" in page
        clock.advance(120)  # what is older than a minute is forgotten
        beat(150, 3)
        assert json.loads(get("/api/queue"))["done_per_s"] is None
    finally:
        q.close()


def test_prefixes_and_ids_beyond_ascii_and_a_prefix_that_names_another_site(
    queue: TaskQueue,
) -> None:
    from urllib.parse import quote

    @queue.task(name="t")
    def t() -> None:
        return None

    handle = queue.enqueue("t", _id="jöb/ünïcode")
    served = Served(queue, token=None)
    try:  # the id through a real server: percent-encoded UTF-8 in, the job found
        status, page = served.get("/job/" + quote(handle.id))
        assert status == 200 and "jöb/ünïcode" in page
    finally:
        served.close()
    wsgi = make_app(queue)
    seen: list[tuple[str, list[tuple[str, str]]]] = []

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        seen.append((status, headers))

    def page_at(script_name: str) -> str:
        environ = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": script_name, "PATH_INFO": "/"}
        return b"".join(wsgi(environ, start)).decode()

    # WSGI hands the prefix over as its bytes read as latin-1
    assert '<base href="/%D0%BF%D0%B0%D0%BD%D0%B5%D0%BB%D1%8C/">' in page_at(
        "/панель".encode().decode("latin-1")
    )
    assert '<base href="/evil.example/">' in page_at("//evil.example")  # never another site
    csp = dict(seen[-1][1])["Content-Security-Policy"]
    assert "base-uri 'self'" in csp and "form-action 'self'" in csp
    client = Asgi(make_asgi_app(queue, token="s3cret"), root="/панель")
    status, head, body = client.request("GET", "/")
    assert status == 200 and '<base href="/%D0%BF%D0%B0%D0%BD%D0%B5%D0%BB%D1%8C/">' in body.decode()
    status, head, _ = client.request(
        "POST", "/queue/requeue-dead", b"", {"Authorization": "Bearer s3cret"}
    )
    assert status == 303 and head["location"] == "/%D0%BF%D0%B0%D0%BD%D0%B5%D0%BB%D1%8C/"


def test_the_asgi_request_becomes_a_pep_3333_environ() -> None:
    from conveyor.dashboard import _environ

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/ops/job/é",
        "root_path": "/ops",
        "query_string": b"a=1",
        "client": ("10.0.0.7", 5555),
        "headers": [(b"x-seen", b"one"), (b"x-seen", b"two"), (b"x_seen", b"forged")],
    }
    environ = _environ(scope, b"")
    assert environ["PATH_INFO"] == "/job/é".encode().decode("latin-1")
    assert environ["SCRIPT_NAME"] == "/ops" and environ["REMOTE_ADDR"] == "10.0.0.7"
    assert environ["HTTP_X_SEEN"] == "one, two"  # joined; the underscore one dropped
