"""The web dashboard: ``conveyor dashboard URL [--port 8080]``, or mounted in your own app
(:func:`make_app` is a WSGI application, :func:`make_asgi_app` an ASGI one; mounted under a
prefix, every link follows it).

Pages are rendered on the server, with no script: the queue's counts, its workers, its jobs per
state with paging and a task filter, and each job whole with its last error's traceback. The
pages' data is also a JSON API (``/api/...``) and ``/health`` answers for probes.

Security by default: the server binds to 127.0.0.1; every action (requeue a dead job, requeue
every dead job, cancel a queued job, purge) is a POST that needs the token given at start
(``--token``, or ``CONVEYOR_DASHBOARD_TOKEN``), as HTTP basic-auth password or
``Authorization: Bearer``, and a CSRF token from the page; without a token configured the
dashboard is read-only and refuses every action. Everything a job carries is escaped before
it is shown.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import hmac
import html
import io
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from . import ConfigurationError, TaskQueue

STATES = ("queued", "running", "done", "dead", "waiting", "aborted")
_PAGE = 50
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border-bottom:1px solid #ddd;padding:.25em .75em;text-align:left;vertical-align:top}
th{background:#f4f4f4} .n{text-align:right} pre{background:#f8f8f8;padding:.75em;overflow:auto}
.dead{color:#b00} .gone{color:#b00} .alive{color:#080} nav a{margin-right:1em}
form.inline{display:inline} .note{color:#666}
"""

Start = Callable[[str, list[tuple[str, str]]], Any]


def _when(t: float | None) -> str:
    if t is None:
        return ""
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _shown(data: bytes | None) -> str:
    if data is None:
        return ""
    try:
        return json.dumps(json.loads(data))
    except (ValueError, UnicodeDecodeError):
        return f"<{len(data):,} bytes, not JSON>"


class Dashboard:
    """The dashboard of one queue. ``token``: what actions need (None: read-only).
    ``private``: reading needs the token too (every page but ``/health``)."""

    def __init__(self, queue: TaskQueue, token: str | None = None, private: bool = False) -> None:
        if private and token is None:
            raise ConfigurationError("a private dashboard needs a token")
        self.queue = queue
        self.token = token
        self.private = private
        self._secret = secrets.token_bytes(32)
        # what the workers said of themselves at earlier reads, for the rates: (at, records)
        self._samples: collections.deque[tuple[float, list[Any]]] = collections.deque()
        self._samples_lock = threading.Lock()

    # -- WSGI ---------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start: Start) -> Iterable[bytes]:
        path = _wsgi_text(environ.get("PATH_INFO", "/")) or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        try:
            if self.private and path != "/health" and not self._allowed(environ):
                return _unauthorized(start)
            if method == "POST":
                return self._action(environ, path, start)
            if method not in ("GET", "HEAD"):
                return _answer(start, "405 Method Not Allowed", "text/plain", b"GET or POST")
            return self._get(path, query, start, _root(environ))
        except Exception as exc:  # the storage is away, most likely: say so, keep serving
            body = f"the queue's storage did not answer: {type(exc).__name__}: {exc}"
            return _answer(start, "503 Service Unavailable", "text/plain", body.encode())

    def _get(self, path: str, query: dict[str, str], start: Start, root: str) -> Iterable[bytes]:
        """``root``: where the dashboard is mounted (``SCRIPT_NAME``); every link in a page
        is relative to it."""
        if path == "/health":
            self.queue.stats()
            return _json(start, {"ok": True})
        if path == "/api/queue":
            return _json(start, self._queue_data())
        if path == "/api/workers":
            return _json(start, self._workers_data())
        if path == "/api/jobs":
            return _json(start, [self._job_data(j) for j in self._jobs(query)])
        if path.startswith("/api/job/"):
            job = self.queue.backend.get(path[len("/api/job/") :])
            if job is None:
                return _json(start, {"error": "no such job"}, "404 Not Found")
            return _json(start, self._job_data(job, whole=True))
        if path == "/":
            return _html(start, "Queue", self._overview(), root=root, refresh_s=10)
        if path == "/jobs":
            return _html(start, "Jobs", self._job_list(query), root=root)
        if path.startswith("/job/") or path == "/job":  # /job?id=...: the search box
            job_id = path[len("/job/") :] if path != "/job" else query.get("id", "").strip()
            job = self.queue.backend.get(job_id) if job_id else None
            if job is None:
                return _html(start, "No such job", "<p>No such job.</p>", "404 Not Found", root)
            return _html(start, f"Job {job.id}", self._job_page(job), root=root)
        return _html(start, "Not found", "<p>Nothing here.</p>", "404 Not Found", root)

    # -- data (the JSON API, and what the pages show) -------------------------------------------
    def _queue_data(self, workers: list[Any] | None = None) -> dict[str, Any]:
        """``workers``: the records, when the caller has read them already."""
        s = self.queue.stats()
        done_per_s, dead_per_s = self._rates(self.queue.workers() if workers is None else workers)
        return {
            "queue": self.queue.name,
            "storage": self.queue.where,
            "ready": s.queued - s.delayed,
            "delayed": s.delayed,
            "running": s.running,
            "done": s.done,
            "dead": s.dead,
            "waiting": s.waiting,
            "aborted": s.aborted,
            "oldest_waiting_s": s.oldest_waiting_s,
            "done_per_s": done_per_s,
            "dead_per_s": dead_per_s,
        }

    def _rates(self, records: list[Any]) -> tuple[float | None, float | None]:
        """Jobs done and dead per second over the last minute or so, from the counts this
        queue's workers keep of themselves, as read by earlier requests (None until two reads
        are 2 s apart: the overview reloads itself every 10 s)."""
        from .top import worker_rates

        now = self.queue.now()
        workers = [w for w in records if self.queue.name in w.queues]
        with self._samples_lock:
            samples = self._samples
            while samples and now - samples[0][0] > _RATE_WINDOW_S:
                samples.popleft()
            if not samples or now - samples[-1][0] >= 2.0:
                samples.append((now, workers))
            at, before = samples[0]
        if now - at < 2.0:
            return None, None
        return worker_rates(before, workers, now - at)

    def _workers_data(self, workers: list[Any] | None = None) -> list[dict[str, Any]]:
        now = self.queue.now()
        out = []
        for w in self.queue.workers() if workers is None else workers:
            record = json.loads(w.to_json())
            record["state"] = w.state(now)
            out.append(record)
        return out

    def _jobs(self, query: dict[str, str]) -> list[Any]:
        state = query.get("state") or None
        if state is not None and state not in STATES:
            state = None
        task = query.get("task") or None
        offset = _int(query.get("offset"), 0)
        return self.queue.jobs(state, task=task, limit=_PAGE, offset=offset)

    def _job_data(self, job: Any, whole: bool = False) -> dict[str, Any]:
        data = {
            "id": job.id,
            "task": job.task,
            "state": job.state,
            "attempts": job.attempts,
            "lost": job.lost,
            "enqueued_at": job.enqueued_at,
            "finished_at": job.finished_at,
            "progress": job.progress,
            "progress_note": job.progress_note,
            "error": job.error if whole else ([_last_line(job.error)] if job.error else []),
        }
        if whole:
            data.update(
                arguments=_shown(job.payload),
                result=_shown(job.result),
                priority=job.priority,
                key=job.key,
                run_at=job.run_at,
                lease_until=job.lease_until,
                worker=job.worker,
                runs=[dataclasses.asdict(run) for run in job.runs()],
            )
        return data

    # -- pages ----------------------------------------------------------------------------------
    def _overview(self) -> str:
        records = self.queue.workers()  # read once: for the rates and for the table
        q = self._queue_data(records)
        rows = "".join(
            f'<tr><td><a href="jobs?state={state}">{label}</a></td>'
            f'<td class="n">{q[label]}</td></tr>'
            for label, state in (
                ("ready", "queued"),
                ("delayed", "queued"),
                ("running", "running"),
                ("done", "done"),
                ("dead", "dead"),
                ("waiting", "waiting"),
                ("aborted", "aborted"),
            )
        )
        oldest = q["oldest_waiting_s"]
        rates = (
            "rates after the next refresh"
            if q["done_per_s"] is None
            else f"{q['done_per_s']:,.1f} done/s, {q['dead_per_s']:,.1f} dead/s"
        )
        parts = [
            f"<p>Queue <b>{_e(q['queue'])}</b> at {_e(q['storage'])}. Oldest waiting job: "
            f"{'-' if oldest is None else f'{oldest:.1f} s'}. "
            f'<span id="rates">{rates}</span> (its workers, over the last minute).</p>',
            f"<table><tr><th>state</th><th>jobs</th></tr>{rows}</table>",
        ]
        if q["dead"]:
            parts.append(self._form("queue/requeue-dead", "Requeue every dead job"))
        parts.append(self._form("queue/purge", "Purge (queued, done and dead jobs)", confirm=True))
        workers = self._workers_data(records)
        parts.append("<h2>Workers</h2>")
        if not workers:
            parts.append('<p class="note">No worker has run here in the last day.</p>')
        else:
            now = self.queue.now()
            trs = "".join(
                f'<tr><td>{_e(w["id"])}</td><td class="{_e(w["state"])}">{_e(w["state"])}</td>'
                f"<td>{_e(', '.join(w['queues']))}</td>"
                f'<td class="n">{w["running"]}/{w["concurrency"]}</td>'
                f'<td class="n">{w["processed"]}</td><td class="n">{w["failed"]}</td>'
                f"<td>{now - w['last_beat']:.0f} s ago</td></tr>"
                for w in workers
            )
            parts.append(
                "<table><tr><th>worker</th><th>state</th><th>queues</th><th>running</th>"
                f"<th>done</th><th>dead</th><th>last beat</th></tr>{trs}</table>"
            )
        return "".join(parts)

    def _job_list(self, query: dict[str, str]) -> str:
        jobs = self._jobs(query)
        state, task = query.get("state", ""), query.get("task", "")
        offset = _int(query.get("offset"), 0)
        links = " ".join(
            f'<a href="jobs?{urlencode({"state": s, "task": task})}">{s}</a>' for s in STATES
        )
        rows = "".join(
            f'<tr><td><a href="job/{quote(j.id)}">{_e(j.id)}</a></td>'
            f'<td class="{_e(j.state)}">{_e(j.state)}</td><td>{_e(j.task)}</td>'
            f'<td class="n">{j.attempts}</td><td>{_when(j.enqueued_at)}</td>'
            f"<td>{_e(_last_line(j.error)[:120])}</td></tr>"
            for j in jobs
        )
        search = (
            f'<form method="get" action="jobs"><input type="hidden" name="state" '
            f'value="{_e(state)}"><input name="task" placeholder="task name" value="{_e(task)}">'
            "<button>Filter</button></form> "
            '<form method="get" action="job"><input name="id" placeholder="job id">'
            "<button>Find</button></form>"
        )
        pager = []
        if offset:
            prev = urlencode({"state": state, "task": task, "offset": max(0, offset - _PAGE)})
            pager.append(f'<a href="jobs?{prev}">previous</a>')
        if len(jobs) == _PAGE:
            nxt = urlencode({"state": state, "task": task, "offset": offset + _PAGE})
            pager.append(f'<a href="jobs?{nxt}">next</a>')
        return (
            f"<p>{links}</p>{search}"
            "<table><tr><th>id</th><th>state</th><th>task</th><th>tries</th><th>enqueued</th>"
            f"<th>last error</th></tr>{rows}</table><p>{' '.join(pager)}</p>"
            + ("" if jobs else '<p class="note">No jobs.</p>')
        )

    def _job_page(self, job: Any) -> str:
        rows = [
            ("state", job.state),
            ("task", job.task),
            ("attempts", job.attempts),
            ("lost", job.lost),
            (
                "progress",
                ""
                if job.progress is None
                else f"{job.progress:.0%} {job.progress_note or ''}".strip(),
            ),
            ("priority", job.priority),
            ("key", job.key),
            ("enqueued", _when(job.enqueued_at)),
            ("finished", _when(job.finished_at)),
            ("arguments", _shown(job.payload)),
            ("result", _shown(job.result)),
        ]
        table = "".join(
            f"<tr><th>{k}</th><td>{_e(v)}</td></tr>" for k, v in rows if v not in ("", None)
        )
        parts = [f"<table>{table}</table>"]
        runs = job.runs()
        if runs:
            parts.append(
                '<h3>Attempts</h3><table id="runs"><tr><th>#</th><th>outcome</th>'
                "<th>worker</th><th>started</th><th>took</th><th>error</th></tr>"
            )
            for run in runs:
                took = "" if run.duration_s is None else f"{run.duration_s:.3f} s"
                error = ""
                if run.error:
                    error = (
                        f"<details><summary>{_e(_last_line(run.error))}</summary>"
                        f"<pre>{_e(run.error)}</pre></details>"
                    )
                parts.append(
                    f"<tr><td>{run.number}</td><td>{_e(run.outcome)}</td>"
                    f"<td>{_e(run.worker or '')}</td><td>{_e(_when(run.started_at))}</td>"
                    f'<td class="n">{took}</td><td>{error}</td></tr>'
                )
            parts.append("</table>")
        if job.error:
            parts.append(f'<h3>Last error</h3><pre id="traceback">{_e(job.error)}</pre>')
        if job.state == "dead":
            parts.append(self._form(f"job/{quote(job.id)}/requeue", "Requeue"))
        if job.state == "queued":
            parts.append(self._form(f"job/{quote(job.id)}/cancel", "Cancel"))
        return "".join(parts)

    def _form(self, action: str, label: str, confirm: bool = False) -> str:
        if self.token is None:
            return f'<p class="note">{_e(label)}: read-only dashboard (start it with a token).</p>'
        extra = (
            '<label><input type="checkbox" name="confirm" value="yes"> yes, I mean it</label> '
            if confirm
            else ""
        )
        return (
            f'<form class="inline" method="post" action="{_e(action)}">'
            f'<input type="hidden" name="csrf" value="{self._csrf()}">{extra}'
            f"<button>{_e(label)}</button></form> "
        )

    # -- actions --------------------------------------------------------------------------------
    def _csrf(self) -> str:
        return hmac.new(self._secret, b"csrf", hashlib.sha256).hexdigest()

    def _allowed(self, environ: dict[str, Any]) -> bool:
        if self.token is None:
            return False
        given = environ.get("HTTP_AUTHORIZATION", "")
        secret = ""
        if given.startswith("Bearer "):
            secret = given[len("Bearer ") :]
        elif given.startswith("Basic "):
            try:
                secret = base64.b64decode(given[len("Basic ") :]).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        return hmac.compare_digest(secret.encode(), self.token.encode())

    def _action(self, environ: dict[str, Any], path: str, start: Start) -> Iterable[bytes]:
        if self.token is None:
            return _answer(start, "403 Forbidden", "text/plain", b"read-only: no token was set")
        if not self._allowed(environ):
            return _unauthorized(start)
        size = _int(environ.get("CONTENT_LENGTH"), 0)
        form = {
            k: v[0]
            for k, v in parse_qs(environ["wsgi.input"].read(min(size, 65536)).decode()).items()
        }
        bearer = environ.get("HTTP_AUTHORIZATION", "").startswith("Bearer ")
        # a browser sends basic-auth credentials by itself: its forms must carry the CSRF
        # token of a page this dashboard rendered (an API client with a bearer token need not)
        if not bearer and not hmac.compare_digest(form.get("csrf", ""), self._csrf()):
            return _answer(start, "403 Forbidden", "text/plain", b"missing or wrong CSRF token")
        back = "/"
        if path == "/queue/requeue-dead":
            self.queue.requeue_dead()
        elif path == "/queue/purge":
            if form.get("confirm") != "yes":
                return _answer(start, "400 Bad Request", "text/plain", b"purge needs confirm=yes")
            self.queue.purge()
        elif path.startswith("/job/") and path.endswith("/requeue"):
            job_id = path[len("/job/") : -len("/requeue")]
            if not self.queue.requeue(job_id):
                return _answer(start, "409 Conflict", "text/plain", b"that job is not dead")
            back = f"/job/{quote(job_id)}"
        elif path.startswith("/job/") and path.endswith("/cancel"):
            job_id = path[len("/job/") : -len("/cancel")]
            if not self.queue.cancel(job_id, "cancelled from the dashboard"):
                return _answer(start, "409 Conflict", "text/plain", b"that job is not queued")
            back = f"/job/{quote(job_id)}"
        else:
            return _answer(start, "404 Not Found", "text/plain", b"no such action")
        root = _root(environ)
        start("303 See Other", [("Location", root + back), ("Content-Length", "0")])
        return [b""]


def _last_line(error: str | None) -> str:
    """The line of a traceback that says what went wrong: its last."""
    lines = (error or "").strip().splitlines()
    return lines[-1] if lines else ""


def _wsgi_text(value: str) -> str:
    """A path as WSGI gives it (the request's bytes, decoded as latin-1) as the text it is."""
    try:
        return value.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a server that decoded it already
        return value


def _root(environ: dict[str, Any]) -> str:
    """Where the dashboard is mounted, fit for links: percent-quoted, and one leading slash
    (``//host`` would send every link and form to another site)."""
    script = environ.get("SCRIPT_NAME", "")
    try:
        raw = script.encode("latin-1")
    except UnicodeEncodeError:
        raw = script.encode("utf-8")
    root = quote(raw, safe="/").strip("/")
    return "/" + root if root else ""


def _int(value: Any, default: int) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return default


def _answer(
    start: Start,
    status: str,
    kind: str,
    body: bytes,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    start(
        status,
        [
            ("Content-Type", kind),
            ("Content-Length", str(len(body))),
            ("X-Content-Type-Options", "nosniff"),
            (
                "Content-Security-Policy",
                "default-src 'none'; style-src 'unsafe-inline'; base-uri 'self'; "
                "form-action 'self'",
            ),
            ("X-Frame-Options", "DENY"),
            *(headers or []),
        ],
    )
    return [body]


def _unauthorized(start: Start) -> list[bytes]:
    return _answer(
        start,
        "401 Unauthorized",
        "text/plain",
        b"credentials needed",
        [("WWW-Authenticate", 'Basic realm="conveyor"')],
    )


def _json(start: Start, data: Any, status: str = "200 OK") -> list[bytes]:
    return _answer(start, status, "application/json", json.dumps(data).encode())


def _html(
    start: Start,
    title: str,
    body: str,
    status: str = "200 OK",
    root: str = "",
    refresh_s: int | None = None,
) -> list[bytes]:
    reload = "" if refresh_s is None else f'<meta http-equiv="refresh" content="{refresh_s}">'
    page = (
        f"<!doctype html><html><head><meta charset=utf-8>{reload}"
        f"<title>{_e(title)} - conveyor</title>"
        f'<base href="{_e(root)}/">'
        f'<style>{_CSS}</style></head><body><nav><a href="./">queue</a>'
        + "".join(f'<a href="jobs?state={s}">{s}</a>' for s in STATES)
        + f"</nav><h1>{_e(title)}</h1>{body}"
        f'<p class="note">{_when(time.time())}</p></body></html>'
    )
    return _answer(start, status, "text/html; charset=utf-8", page.encode())


_LOOPBACK = ("127.0.0.1", "::1", "localhost")
#: how far back the rates look
_RATE_WINDOW_S = 60.0


def make_app(queue: TaskQueue, token: str | None = None, private: bool = False) -> Dashboard:
    """The dashboard of ``queue`` as a WSGI application, to serve or mount in your own app
    (``private=True``: reading needs the token too; do that when others can reach it)."""
    return Dashboard(queue, token, private)


def make_asgi_app(
    queue: TaskQueue, token: str | None = None, private: bool = False
) -> AsgiDashboard:
    """The dashboard of ``queue`` as an ASGI application (HTTP; lifespan answered), to mount
    in Starlette, FastAPI, Quart or any ASGI server. The same pages, API and rules as
    :func:`make_app`."""
    return AsgiDashboard(Dashboard(queue, token, private))


class AsgiDashboard:
    """The WSGI dashboard behind an ASGI face. Each request's storage reads run off the event
    loop, on four threads of the dashboard's own (they block on the storage); no user code
    runs there. A body is read up to 64 KiB (an action's form is a few bytes); the rest is
    dropped."""

    _MAX_BODY = 65536

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        # threads of its own for the storage reads: the loop's default executor is the host
        # app's (name lookups, its own blocking calls), and a slow storage must not starve it
        self._pool: ThreadPoolExecutor | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._pool is not None:
                        self._pool.shutdown(wait=False)
                        self._pool = None
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            raise ValueError(f"the dashboard serves HTTP, not {scope['type']!r}")
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if len(body) <= self._MAX_BODY:
                body += message.get("body", b"")[: self._MAX_BODY + 1 - len(body)]
            more = message.get("more_body", False)
        environ = _environ(scope, bytes(body))
        answer: list[Any] = []

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            answer[:] = [status, headers]

        loop = asyncio.get_running_loop()
        if self._pool is None:
            # the dashboard's own threads: they render its pages from the backend's storage
            # (payloads are shown as they are stored, never decoded by user code). No task or other
            # user code runs here
            self._pool = ThreadPoolExecutor(4, thread_name_prefix="conveyor:dashboard")
        chunks = await loop.run_in_executor(
            self._pool, lambda: list(self.dashboard(environ, start))
        )
        status, headers = answer
        await send(
            {
                "type": "http.response.start",
                "status": int(status.split(" ", 1)[0]),
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            }
        )
        payload = b"" if scope.get("method") == "HEAD" else b"".join(chunks)
        await send({"type": "http.response.body", "body": payload})


def _environ(scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    """The WSGI environ of an ASGI HTTP request (PEP 3333 names; ``root_path`` is
    ``SCRIPT_NAME``)."""
    root = scope.get("root_path", "")
    path = scope.get("path", "/")
    if root and path.startswith(root):
        path = path[len(root) :]
    server = scope.get("server") or ("127.0.0.1", 80)
    client = scope.get("client") or ("", 0)

    def wsgi(text: str) -> str:  # PEP 3333: the request's bytes, as latin-1
        return text.encode("utf-8").decode("latin-1")

    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope.get("method", "GET"),
        "SCRIPT_NAME": wsgi(root),
        "PATH_INFO": wsgi(path or "/"),
        "REMOTE_ADDR": str(client[0]),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "CONTENT_LENGTH": str(len(body)),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": scope.get("scheme", "http"),
    }
    for name, value in scope.get("headers", []):
        key = name.decode("latin-1").upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if key == "CONTENT_TYPE":
                environ[key] = value.decode("latin-1")
            continue
        if "_" in name.decode("latin-1"):
            continue  # X_Foo would pass for X-Foo: dropped, as CGI servers do
        key = f"HTTP_{key}"
        text = value.decode("latin-1")
        # a header sent twice is one value, joined (RFC 9110)
        environ[key] = f"{environ[key]}, {text}" if key in environ else text
    return environ


def serve(
    queue: TaskQueue, port: int = 8080, host: str = "127.0.0.1", token: str | None = None
) -> Any:
    """A threaded WSGI server for the dashboard (``server.serve_forever()``; ``server.port``).
    Anywhere but loopback, it is private: every page needs the token, which must be given."""
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class _Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return None

    # a thread per request, running the dashboard's own code (reads of the storage, pages):
    # no user code runs on them
    class _Threaded(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True

    private = host not in _LOOPBACK
    if private and token is None:
        raise ConfigurationError(
            f"the dashboard on {host} would show every job to whoever reaches it: give a token"
        )
    app = make_app(queue, token, private=private)
    server = make_server(host, port, app, _Threaded, handler_class=_Quiet)
    server.port = server.server_address[1]  # type: ignore[attr-defined]
    return server
