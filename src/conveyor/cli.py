"""The ``conveyor`` command: run workers and look after queues."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click

from . import ConfigurationError, TaskQueue, __version__


def _load_queue(target: str) -> TaskQueue:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(
            f"{target!r}: write MODULE:QUEUE, for example myapp.tasks:queue", param_hint="TARGET"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(
            f"cannot import {module_name!r}: {exc}", param_hint="TARGET"
        ) from exc
    if not hasattr(module, attr):
        raise click.BadParameter(
            f"module {module_name!r} ({getattr(module, '__file__', None) or 'built in'}) has "
            f"no {attr!r}",
            param_hint="TARGET",
        )
    queue = getattr(module, attr)
    if not isinstance(queue, TaskQueue):
        raise click.BadParameter(
            f"{module_name}.{attr} is {type(queue).__name__}, not a TaskQueue",
            param_hint="TARGET",
        )
    return queue


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="conveyor")
def main() -> None:
    """conveyor: run task workers and look after task queues.

    A queue lives at a URL: sqlite:///path/to/file.db (one machine, many processes),
    redis://[user:password@]host:6379/0 or postgresql://user@host:5432/db (many machines);
    memory:// lives in one process only.
    Your code defines the queue and its tasks; a worker imports that code and runs the jobs.
    """


@main.command()
@click.argument("target")
@click.option(
    "-c", "--concurrency", default=10, show_default=True, help="Jobs run at once by this worker."
)
@click.option(
    "--burst",
    is_flag=True,
    help="Run until the queue is drained, then exit (for scripts and tests).",
)
@click.option(
    "--lease-s",
    default=30.0,
    show_default=True,
    help="Seconds a job stays leased without a heartbeat before others may take it.",
)
@click.option(
    "--shutdown-grace-s",
    default=10.0,
    show_default=True,
    help="On SIGINT/SIGTERM, how long running jobs may finish before they are "
    "handed back to the queue.",
)
@click.option("--poll-s", default=1.0, show_default=True, hidden=True)
@click.option(
    "--unknown-task-s",
    default=3600.0,
    show_default=True,
    help="How long a job of a task this worker does not know is handed back for a worker "
    "that knows it before it is dead (rolling deploys).",
)
@click.option(
    "--abort-grace-s",
    default=5.0,
    show_default=True,
    help="How long a thread task asked to abort has to return before its thread is abandoned.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics (conveyor[metrics]).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log each job that fails.")
def worker(
    target: str,
    concurrency: int,
    burst: bool,
    lease_s: float,
    shutdown_grace_s: float,
    poll_s: float,
    unknown_task_s: float,
    abort_grace_s: float,
    metrics_port: int | None,
    verbose: bool,
) -> None:
    """Run the jobs of the queue TARGET, written MODULE:QUEUE (a TaskQueue in MODULE).

    Stops on SIGINT or SIGTERM: takes no new jobs, lets running ones finish for
    --shutdown-grace-s seconds, then hands the rest back to the queue at once. A second signal
    stops immediately (still handing jobs back).

    \b
    Example:
        conveyor worker myapp.tasks:queue --concurrency 20
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    queue = _load_queue(target)
    try:
        w = queue.worker(
            concurrency=concurrency,
            burst=burst,
            lease_s=lease_s,
            shutdown_grace_s=shutdown_grace_s,
            poll_s=poll_s,
            unknown_task_s=unknown_task_s,
            abort_grace_s=abort_grace_s,
            metrics_port=metrics_port,
        )
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"worker {w.id} on {queue.where} (queue {queue.name!r}, "
        f"{len(queue.tasks)} tasks, concurrency {concurrency})",
        err=True,
    )
    try:
        w.run()
    except Exception as exc:
        # a loop kept failing: the worker stopped cleanly and says why (the log has the rest)
        raise click.ClickException(
            f"worker {w.id} stopped after {w.processed} done, {w.failed} dead: {exc}"
        ) from exc
    click.echo(f"worker {w.id} stopped: {w.processed} done, {w.failed} dead", err=True)


@contextmanager
def _queue_at(url: str, name: str) -> Iterator[TaskQueue]:
    """The queue at ``url``, closed when the command is done with it. Nothing is created: a
    URL that names no queue is an error."""
    if url.startswith("memory:"):
        raise click.ClickException(
            "a memory:// queue lives inside one process: no command can look at it from outside"
        )
    try:
        queue = TaskQueue(url, name=name, create=False)
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc
    with queue:
        yield queue


_QUEUE_OPTION = click.option(
    "-q",
    "--queue",
    "name",
    default="default",
    show_default=True,
    help="The queue's name within the URL's storage.",
)


@main.command()
@click.argument("url")
@_QUEUE_OPTION
def info(url: str, name: str) -> None:
    """Show a queue: jobs per state, the oldest waiting job, running leases."""
    with _queue_at(url, name) as queue:
        stats = queue.stats()
        where = queue.where
    rows: list[tuple[str, Any]] = [
        ("queued (ready)", stats.queued - stats.delayed),
        ("queued (delayed)", stats.delayed),
        ("running", stats.running),
        ("done (kept)", stats.done),
        ("dead", stats.dead),
        ("waiting (steps)", stats.waiting),
        ("aborted", stats.aborted),
        (
            "oldest waiting",
            "-" if stats.oldest_waiting_s is None else f"{stats.oldest_waiting_s:.1f} s",
        ),
    ]
    click.echo(f"queue {name!r} at {where}")
    for label, value in rows:
        click.echo(f"  {label:<18} {value}")
    if stats.leases:
        click.echo("  running leases (job, seconds left):")
        for job_id, left in stats.leases:
            click.echo(f"    {job_id}  {left:.1f}")


def _when(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")


_NOT_JSON = re.compile(r"<[\d,]+ bytes, not JSON>")


def _shown(data: bytes | None) -> Any:
    """Arguments or a result as stored, for reading: JSON as it is; anything else (pickled
    data, which a tool that only looks never unpickles) as its size."""
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return f"<{len(data):,} bytes, not JSON>"


def _job_record(job: Any, now: float) -> dict[str, Any]:
    return {
        "id": job.id,
        "queue": job.queue,
        "task": job.task,
        "state": job.state,
        "attempts": job.attempts,
        "lost": job.lost,
        "priority": job.priority,
        "key": job.key,
        "enqueued_at": _when(job.enqueued_at),
        "run_at": _when(job.run_at) if job.run_at else None,
        "lease_left_s": None if job.lease_until is None else round(job.lease_until - now, 3),
        "finished_at": _when(job.finished_at),
        "keep_until": _when(job.keep_until),
        "progress": job.progress,
        "progress_note": job.progress_note,
        "worker": job.worker,
        "error": job.error,
        "arguments": _shown(job.payload),
        "result": _shown(job.result),
        "runs": [
            {
                "attempt": run.number,
                "worker": run.worker,
                "started_at": _when(run.started_at),
                "ended_at": _when(run.ended_at),
                "outcome": run.outcome,
                "error": run.error,
            }
            for run in job.runs()
        ],
    }


def _last_line(error: str | None) -> str:
    lines = (error or "").strip().splitlines()
    return lines[-1] if lines else ""


@main.command()
@click.argument("url")
@_QUEUE_OPTION
@click.option("--state", help="Only jobs in this state: queued, running, done or dead.")
@click.option("--task", "task", help="Only jobs of this task (its full name).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(0), help="At most.")
@click.option("--offset", default=0, type=click.IntRange(0), help="Skip this many first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, every field.")
def jobs(
    url: str, name: str, state: str | None, task: str | None, limit: int, offset: int, as_json: bool
) -> None:
    """List the jobs of a queue, oldest first: id, state, task, attempts, enqueued, and the
    first line of the last error.

    \b
    Example:
        conveyor jobs sqlite:///tasks.db --state dead
    """
    with _queue_at(url, name) as queue:
        try:
            found = queue.jobs(state, task=task, limit=limit, offset=offset)
        except ConfigurationError as exc:
            raise click.UsageError(str(exc)) from exc
        now = queue.now()
    if as_json:
        for job in found:
            click.echo(json.dumps(_job_record(job, now)))
        return
    if not found:
        click.echo("no jobs" + (f" in state {state}" if state else ""), err=True)
        return
    width = max(len(job.id) for job in found)
    click.echo(f"{'ID':<{width}}  {'STATE':<7}  {'TASK':<30}  TRIES  {'ENQUEUED (UTC)':<23}  ERROR")
    for job in found:
        last = _last_line(job.error)
        click.echo(
            f"{job.id:<{width}}  {job.state:<7}  {job.task[:30]:<30}  {job.attempts:>5}  "
            f"{(_when(job.enqueued_at) or '')[:23]:<23}  {last[:60]}"
        )


@main.command()
@click.argument("url")
@click.argument("job_id")
@_QUEUE_OPTION
@click.option("--json", "as_json", is_flag=True, help="As one JSON object.")
def job(url: str, job_id: str, name: str, as_json: bool) -> None:
    """Show one job whole: its state, times, arguments and result, each attempt (its worker,
    start, end, outcome and error), and the last error's traceback. Exit status 1 if there is
    no such job."""
    with _queue_at(url, name) as queue:
        found = queue.backend.get(job_id)
        now = queue.now()
        where = queue.where
    if found is None:
        click.echo(f"no job {job_id!r} at {where}", err=True)
        raise SystemExit(1)
    record = _job_record(found, now)
    if as_json:
        click.echo(json.dumps(record))
        return
    error = record.pop("error")
    runs = record.pop("runs")
    for field_name, value in record.items():
        if value is None:
            continue
        data = field_name in ("arguments", "result") and not _NOT_JSON.fullmatch(str(value))
        shown = json.dumps(value) if data or not isinstance(value, str) else value
        click.echo(f"{field_name:<13} {shown}")
    if runs:
        click.echo("runs:")
    for run in found.runs():
        took = "" if run.duration_s is None else f"{run.duration_s:.3f} s"
        click.echo(
            f"  #{run.number:<3} {run.outcome:<9}  {(_when(run.started_at) or '-')[:23]:<23}  "
            f"{took:>11}  {run.worker or '-'}  {_last_line(run.error)[:60]}"
        )
    if error:
        click.echo("last error:")
        click.echo(textwrap.indent(error.rstrip(), "  "))


@main.group()
def stream() -> None:
    """Look after the dead letters of a Redis Stream that pipelines read (from_stream)."""


@stream.command("dead")
@click.argument("url")
@click.argument("name")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1), help="At most.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def stream_dead(url: str, name: str, limit: int, as_json: bool) -> None:
    """List the entries of NAME's dead-letter stream (NAME:dead), oldest first, with why
    each was given up.

    \b
    Example:
        conveyor stream dead redis://localhost:6379/0 orders
    """
    from .pipeline import dead_entries

    found = dead_entries(url, name, limit)
    if as_json:
        for record in found:
            click.echo(json.dumps(record))
        return
    if not found:
        click.echo(f"no dead entries for stream {name!r}", err=True)
        return
    click.echo(f"{'DEAD ID':<20}  {'ENTRY':<20}  {'GROUP':<12}  ERROR")
    for r in found:
        click.echo(
            f"{r['dead_id']:<20}  {r['id']:<20}  {r['group'][:12]:<12}  {_last_line(r['error'])}"
        )


@stream.command("requeue")
@click.argument("url")
@click.argument("name")
@click.argument("dead_ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead entry.")
def stream_requeue(url: str, name: str, dead_ids: tuple[str, ...], every: bool) -> None:
    """Append dead entries (their DEAD IDs, or --all) to NAME again as new entries, and
    remove them from NAME:dead.

    \b
    Example:
        conveyor stream requeue redis://localhost:6379/0 orders --all
    """
    from .pipeline import requeue_dead

    if every == bool(dead_ids):
        raise click.UsageError("give the dead ids to requeue, or --all (not both)")
    moved = requeue_dead(url, name, None if every else dead_ids)
    click.echo(f"requeued {moved} entr{'y' if moved == 1 else 'ies'} to {name!r}")


@main.command()
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, every field.")
def workers(url: str, as_json: bool) -> None:
    """List the workers of a storage: alive, stopped (they said so) or gone (they stopped
    beating: killed, or cut off from the storage), newest beat first. Records are kept a day.

    \b
    Example:
        conveyor workers redis://localhost:6379/0
    """
    with _queue_at(url, "default") as queue:
        found = queue.workers()
        now = queue.now()
    if as_json:
        for w in found:
            record = json.loads(w.to_json())
            record["state"] = w.state(now)
            click.echo(json.dumps(record))
        return
    if not found:
        click.echo("no workers have run here (in the last day)", err=True)
        return
    width = max(len(w.id) for w in found)
    click.echo(
        f"{'WORKER':<{width}}  {'STATE':<7}  {'QUEUES':<20}  RUNNING  DONE     DEAD     LAST BEAT"
    )
    for w in found:
        running = f"{w.running}/{w.concurrency}"
        click.echo(
            f"{w.id:<{width}}  {w.state(now):<7}  {','.join(w.queues)[:20]:<20}  "
            f"{running:<7}  {w.processed:<7}  {w.failed:<7}  {now - w.last_beat:.0f} s ago"
        )


@main.command()
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, every field.")
@click.option("--remove", "remove", metavar="NAME", help="Remove this schedule instead.")
def schedules(url: str, as_json: bool, remove: str | None) -> None:
    """List the schedules of a storage (every queue's): when each runs next, and its last
    tick's job.

    \b
    Example:
        conveyor schedules sqlite:///tasks.db
        conveyor schedules sqlite:///tasks.db --remove old-report
    """
    with _queue_at(url, "default") as queue:
        if remove is not None:
            found = [s for s in queue.schedules(all_queues=True) if s.name == remove]
            if not found:
                raise click.ClickException(f"no schedule named {remove!r}")
            with _queue_at(url, found[0].queue or "default") as owner:
                owner.unschedule(remove)
            click.echo(f"removed schedule {remove!r}")
            return
        rows = []
        for info in queue.schedules(all_queues=True):
            try:
                if info.problem is not None:
                    raise ValueError(info.problem)
                upcoming = queue.next_tick(info)
            except Exception as exc:  # a plan this installation cannot read (no cronsim, say)
                upcoming, why = None, str(exc)
            else:
                why = ""
            rows.append((info, upcoming, why))
    if as_json:
        for info, upcoming, why in rows:
            if info.problem is not None:
                record = {"name": info.name, "stored": info.stored}
            else:
                record = json.loads(info.to_json())
            record.pop("payload", None)
            record.update(next_tick=_when(upcoming), last_tick=_when(info.last_tick))
            if why:
                record["problem"] = why
            click.echo(json.dumps(record))
        return
    if not rows:
        click.echo("no schedules here", err=True)
        return
    width = max(4, *(len(info.name) for info, _, _ in rows))
    click.echo(f"{'NAME':<{width}}  {'QUEUE':<10}  {'WHEN':<22}  {'NEXT':<24}  LAST JOB")
    for info, upcoming, why in rows:
        if info.problem is not None:
            plan = "(cannot be read)"
        elif info.every_s is not None:
            plan = f"every {info.every_s:g} s"
        else:
            plan = f"{info.cron} {info.tz}"
        shown = "(does not run)" if why else (_when(upcoming) or "-")
        click.echo(
            f"{info.name:<{width}}  {info.queue[:10]:<10}  {plan[:22]:<22}  {shown:<24}  "
            f"{info.last_job or '-'}"
        )
        if why:
            click.echo(f"{'':<{width}}  why: {why}")


@main.command()
@click.argument("url")
@_QUEUE_OPTION
@click.option("--interval-s", default=1.0, show_default=True, type=click.FloatRange(0.1))
@click.option("--once", is_flag=True, help="Print one view and exit.")
def top(url: str, name: str, interval_s: float, once: bool) -> None:
    """A live view of a queue: jobs per state, rates, the oldest waiting job, and every
    worker, refreshed in place until Ctrl-C (conveyor[top]). Given the /metrics address of
    a pipeline run (run(metrics_port=...)), every stage of the runs there instead.

    \b
    Examples:
        conveyor top redis://localhost:6379/0
        conveyor top http://127.0.0.1:9191/metrics
    """
    from .top import read_runs, render_runs, run, run_metrics

    if url.startswith(("http://", "https://")):
        try:
            if once:
                snap = read_runs(url)
                if snap.error is not None:
                    raise click.ClickException(f"nothing readable at {url}: {snap.error}")
                view = render_runs(snap)  # says which extra is missing, if one is
                from rich.console import Console

                Console().print(view)
            else:
                run_metrics(url, interval_s=interval_s)
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from exc
        return
    with _queue_at(url, name) as queue:
        try:
            run(queue, interval_s=interval_s, once=once)
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from exc


@main.command()
@click.argument("url")
@_QUEUE_OPTION
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Where to listen; anything but loopback is reachable by others.",
)
@click.option(
    "--token",
    envvar="CONVEYOR_DASHBOARD_TOKEN",
    help="What actions (requeue, purge) need, as basic-auth password or bearer token "
    "[env: CONVEYOR_DASHBOARD_TOKEN]. Without it the dashboard is read-only.",
)
def dashboard(url: str, name: str, port: int, host: str, token: str | None) -> None:
    """Serve the web dashboard of a queue: counts, workers, jobs, each job's traceback, and
    (with --token) requeue and purge. A JSON API under /api/, and /health.

    \b
    Example:
        CONVEYOR_DASHBOARD_TOKEN=s3cret conveyor dashboard sqlite:///tasks.db
    """
    from .dashboard import serve

    with _queue_at(url, name) as queue:
        try:
            server = serve(queue, port=port, host=host, token=token)
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from exc
        mode = "actions need the token" if token else "read-only (no --token)"
        click.echo(f"dashboard of {queue.where} on http://{host}:{server.port}/ ({mode})", err=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


@main.command()
@click.argument("url")
@click.argument("job_ids", nargs=-1, required=True, metavar="ID...")
@click.option("--by", help="Who asks, kept with the job (default: user@host).")
def abort(url: str, job_ids: tuple[str, ...], by: str | None) -> None:
    """Abort jobs: a queued one never runs; a running one is stopped by its worker within a
    second or so and ends aborted. Exit status 1 if a job was already over or unknown.

    \b
    Example:
        conveyor abort redis://localhost:6379/0 3f2a9c1e
    """
    missed = 0
    with _queue_at(url, "default") as queue:
        for job_id in job_ids:
            try:
                state = queue.abort(job_id, by=by)
            except ConfigurationError as exc:
                raise click.BadParameter(str(exc), param_hint="--by") from exc
            if state == "aborted":
                click.echo(f"{job_id}: aborted (it will not run)")
            elif state == "requested":
                click.echo(f"{job_id}: running; its worker is asked to stop it")
            else:
                missed += 1
                click.echo(f"{job_id}: not aborted: it is {state}", err=True)
    if missed:
        sys.exit(1)


@main.command()
@click.argument("url")
@_QUEUE_OPTION
@click.option("--dead", is_flag=True, help="Requeue every dead job of the queue.")
@click.option("--id", "ids", multiple=True, help="Requeue this dead job (repeatable).")
def requeue(url: str, name: str, dead: bool, ids: tuple[str, ...]) -> None:
    """Put dead jobs back in the queue, with their attempts reset."""
    if not dead and not ids:
        raise click.UsageError("say which jobs: --dead, or --id JOB_ID")
    refused = 0
    with _queue_at(url, name) as q:
        count = q.requeue_dead() if dead else 0
        for job_id in ids:
            if q.requeue(job_id):
                count += 1
                continue
            refused += 1
            job = q.backend.get(job_id)
            if job is None:
                click.echo(f"{job_id}: no such job", err=True)
            else:
                click.echo(f"{job_id}: {job.state}, not dead: left as it is", err=True)
    click.echo(f"requeued {count} job(s)")
    if refused:
        raise SystemExit(1)


@main.command()
@click.argument("url")
@_QUEUE_OPTION
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(url: str, name: str, yes: bool) -> None:
    """Delete every job of the queue that is not running (queued, done and dead)."""
    with _queue_at(url, name) as queue:
        if not yes and not click.confirm(f"Delete the jobs of queue {name!r} at {queue.where}?"):
            raise click.Abort
        click.echo(f"deleted {queue.purge()} job(s)")


@main.command()
@click.argument("url")
@click.option("--repair", is_flag=True, help="Put inconsistent jobs right, and say what was done.")
def doctor(url: str, repair: bool) -> None:
    """Look for jobs out of step with the queue's indexes (left by a change that failed
    midway, or by hand), index entries that name no job, and keys under the prefix that
    conveyor did not write. Exit status 1 if anything is (still) wrong.

    Every queue in the storage is checked. --repair puts each job where its own record says
    (the record is the truth); what is not conveyor's is reported, never touched. It is safe
    while workers run.

    \b
    Example:
        conveyor doctor redis://localhost:6379/0 --repair
    """
    with _queue_at(url, "default") as queue:
        try:
            said = queue.backend.doctor(queue.now(), repair=repair)
        except Exception as exc:
            raise click.ClickException(str(exc)) from exc
        where = queue.where
    for line in said:
        click.echo(line)
    fixed = repair and all(line.endswith("; put right") for line in said)
    if not said:
        click.echo(f"{where}: nothing out of step")
    elif fixed:
        click.echo(f"{where}: {len(said)} thing(s) put right")
    else:
        left = sum(not line.endswith("; put right") for line in said)
        click.echo(f"{where}: {left} thing(s) wrong" + ("" if repair else "; --repair mends jobs"))
        raise SystemExit(1)


@main.command()
@click.argument("url")
def migrate(url: str) -> None:
    """Create the queue's schema in its database, or bring it up to this conveyor's version.

    A PostgreSQL queue needs it once before first use, and after an upgrade of conveyor that
    changes the schema (a queue opened on an older schema says so). It is idempotent and safe
    to run from several machines at once; a schema made by a newer conveyor is refused with
    its version. The schema is the URL's ?schema= (conveyor by default). SQLite files are
    brought up to date when opened and Redis has no schema: for them it only checks the URL.

    \b
    Example:
        conveyor migrate postgresql://app@db.internal:5432/app
    """
    try:
        said = TaskQueue.migrate(url)
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc
    for line in said:
        click.echo(line)
    if not said:
        click.echo("the schema is up to date")


if __name__ == "__main__":
    main()
