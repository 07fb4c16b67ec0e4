"""Workflows: ``chain``, ``group`` and ``chord``, made of jobs that wait for others.

A workflow is enqueued whole, in one transaction: its first steps queued, the others
``waiting``, each knowing which jobs wait for it (``then``). The backend's own change that ends
a step (done, or dead) tells the steps waiting for it in the same transaction, so no process
between two steps has to survive for the next one to start, and a step that fails takes every
step behind it down with its error: nothing waits for what will never come.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from .._errors import ConfigurationError, JobAborted, JobNotFound, TaskFailed
from .backends.base import ABORTED, DEAD, DONE, RUNNING, WAITING, NewJob

if TYPE_CHECKING:
    from ._queue import JobHandle, Task, TaskQueue

R = TypeVar("R")

#: what a step that waited for others is given before its own arguments: the one result
#: (``one``), or the list of results in order (``all``, after a group)
AFTER_ONE = "one"
AFTER_ALL = "all"
#: how the error of a step that died because one before it did begins (see the backends)
_NOT_RUN = "not run: job "


@dataclass(frozen=True)
class Signature(Generic[R]):
    """A call of a task not made yet: ``task.s(*args, **kwargs)``. In a chain, a step after
    the first is given the result before it as its first argument."""

    task: Task[Any, R] | str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        name = self.task if isinstance(self.task, str) else self.task.name
        return f"{name}.s(*{self.args!r}, **{self.kwargs!r})"


@dataclass(frozen=True)
class Chain:
    """Steps one after another, each given the result of the one before."""

    steps: tuple[Signature[Any] | Group | Chain | Chord, ...]

    def enqueue(self, *, _id: str | None = None) -> WorkflowHandle[Any]:
        return _queue_of(self).enqueue_workflow(self, _id=_id)


@dataclass(frozen=True)
class Group:
    """Steps run side by side; the group's result is the list of theirs, in order."""

    members: tuple[Signature[Any] | Group | Chain | Chord, ...]

    def enqueue(self, *, _id: str | None = None) -> WorkflowHandle[list[Any]]:
        return _queue_of(self).enqueue_workflow(self, _id=_id)


@dataclass(frozen=True)
class Chord:
    """A group, then ``callback`` given the list of the group's results."""

    header: Group
    callback: Signature[Any]

    def enqueue(self, *, _id: str | None = None) -> WorkflowHandle[Any]:
        return _queue_of(self).enqueue_workflow(self, _id=_id)


Flow = Signature[Any] | Chain | Group | Chord
_FLOWS = (Signature, Chain, Group, Chord)


def chain(*steps: Flow) -> Chain:
    """``chain(a.s(1), b.s(), c.s())``: ``c(b(a(1)))``, each step a job of its own."""
    if not steps:
        raise ConfigurationError("a chain needs at least one step")
    return Chain(tuple(_checked(s) for s in steps))


def group(*members: Flow | Iterable[Flow]) -> Group:
    """``group(a.s(1), a.s(2))`` (or ``group(generator)``): run together; the result is the
    list of their results."""
    if len(members) == 1 and not isinstance(members[0], _FLOWS):
        members = tuple(members[0])
    if not members:
        raise ConfigurationError("a group needs at least one member")
    return Group(tuple(_checked(m) for m in members))


def chord(header: Group | Iterable[Flow], callback: Signature[R]) -> Chord:
    """``chord(group(...), total.s())``: ``callback`` gets the list of the group's results,
    once all are done; if one is dead, the callback is dead too, with that member's error."""
    members = header if isinstance(header, Group) else group(*header)
    return Chord(members, _checked(callback))  # type: ignore[arg-type]


def _checked(step: object) -> Flow:
    if not isinstance(step, _FLOWS):
        raise ConfigurationError(
            f"a workflow is made of task.s(...) signatures, chains, groups and chords, not {step!r}"
        )
    return step


def _queue_of(flow: Flow) -> TaskQueue:
    for sig in _signatures(flow):
        if not isinstance(sig.task, str):
            return sig.task.queue
    raise ConfigurationError(
        "this workflow names its tasks by name only: enqueue it with q.enqueue_workflow(flow)"
    )


def _signatures(flow: Flow) -> list[Signature[Any]]:
    if isinstance(flow, Signature):
        return [flow]
    if isinstance(flow, Chain):
        return [s for step in flow.steps for s in _signatures(step)]
    if isinstance(flow, Group):
        return [s for member in flow.members for s in _signatures(member)]
    return [*_signatures(flow.header), flow.callback]


@dataclass
class _Step:
    sig: Signature[Any]
    id: str
    waits_for: int = 0
    after: str | None = None
    then: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class _Part:
    """A compiled piece: its steps, the ids that start it, the ids that end it (whose results
    are its result), and whether that result is a list (a group's)."""

    entries: list[str]
    exits: list[str]
    many: bool


class _Compiler:
    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        self.steps: dict[str, _Step] = {}

    def part(self, flow: Flow) -> _Part:
        if isinstance(flow, Signature):
            step_id = f"{self.workflow_id}.{len(self.steps)}"
            self.steps[step_id] = _Step(flow, step_id)
            return _Part([step_id], [step_id], many=False)
        if isinstance(flow, Group):
            parts = [self.part(m) for m in flow.members]
            return _Part(
                [e for p in parts for e in p.entries], [x for p in parts for x in p.exits], True
            )
        if isinstance(flow, Chord):
            return self.part(Chain((flow.header, flow.callback)))
        first = current = self.part(flow.steps[0])
        for nxt in flow.steps[1:]:
            following = self.part(nxt)
            self.link(current, following)
            current = following
        return _Part(first.entries, current.exits, current.many)

    def link(self, before: _Part, after: _Part) -> None:
        """Each step that starts ``after`` waits for every step that ends ``before``."""
        for entry in after.entries:
            step = self.steps[entry]
            step.waits_for += len(before.exits)
            step.after = AFTER_ALL if before.many else AFTER_ONE
            for place, exit_id in enumerate(before.exits):
                self.steps[exit_id].then.append((entry, place))


def compile_workflow(
    queue: TaskQueue, flow: Flow, workflow_id: str, carrier: dict[str, str] | None = None
) -> tuple[list[NewJob], list[str], bool]:
    """The jobs of ``flow``, in enqueue order; the ids whose results are its result; whether
    that result is a list."""
    compiler = _Compiler(workflow_id)
    whole = compiler.part(_checked(flow))
    jobs = []
    for step in compiler.steps.values():
        sig = step.sig
        task = sig.task
        if not isinstance(task, str) and task.queue is not queue:
            raise ConfigurationError(
                f"task {task.name!r} belongs to {task.queue!r}: a workflow's steps run on one queue"
            )
        kwargs = dict(sig.kwargs)
        for option in ("_id", "_delay_s", "_eta"):
            if option in kwargs:
                raise ConfigurationError(
                    f"{option} does not apply to a step of a workflow: the workflow names its "
                    "steps (give the workflow an _id), and a step runs when the one before it "
                    "is done"
                )
        kwargs["_id"] = step.id
        after = None if step.after is None else (step.after, step.waits_for)
        new = queue._new_job(task, tuple(sig.args), kwargs, carrier, after=after)
        jobs.append(
            NewJob(
                id=new.id,
                queue=new.queue,
                task=new.task,
                payload=new.payload,
                priority=new.priority,
                key=new.key,
                run_at=new.run_at,
                waits_for=step.waits_for,
                then=tuple(step.then),
            )
        )
    return jobs, whole.exits, whole.many


def waited_for(queue: TaskQueue, job: Any, after: object) -> Any:
    """What a step that waited for others is given first: the one result, or the list of
    them. ValueError (the step cannot run) if they are not all there: it was put back in the
    queue by hand after the step it waited for died."""
    if (
        not isinstance(after, list)
        or len(after) != 2
        or after[0] not in (AFTER_ONE, AFTER_ALL)
        or not isinstance(after[1], int)
    ):
        raise ValueError(f"the job's payload says it waits for {after!r}, which is not a step")
    mode, count = after
    inputs = dict(job.inputs)
    if sorted(inputs) != list(range(count)):
        raise ValueError(
            f"it waited for {count} job(s) and has the results of {len(inputs)}: it was "
            "queued again by hand after a job it waited for died, and cannot run without them"
        )
    loads = queue.serializer.loads
    values = [None if inputs[i] is None else loads(inputs[i]) for i in range(count)]
    return values[0] if mode == AFTER_ONE else values


class WorkflowHandle(Generic[R]):
    """A workflow enqueued: ``result()`` waits for its end (the last step's result, or the
    list of a group's), and raises :class:`TaskFailed` with the error of the step that
    failed."""

    def __init__(
        self, queue: TaskQueue, workflow_id: str, ids: list[str], exits: list[str], many: bool,
        added: bool,
    ) -> None:  # fmt: skip
        self.queue = queue
        self.id = workflow_id
        #: every step's job id, in the order the steps were given
        self.ids = ids
        self.exits = exits
        self.many = many
        #: False when a workflow of this id was there already
        self.added = added

    def jobs(self) -> list[JobHandle[Any]]:
        """A handle for each step."""
        return [self.queue.job(job_id) for job_id in self.ids]

    def status(self) -> str:
        """``dead`` if any step is dead, ``done`` once every last step is, else ``running``
        (a step runs), ``queued`` or ``waiting``; ``unknown`` once its results expired."""
        states = [self.queue.job(job_id).status() for job_id in self.ids]
        if DEAD in states:
            return DEAD
        ends = [self.queue.job(job_id).status() for job_id in self.exits]
        if all(s == DONE for s in ends):
            return DONE
        if all(s == "unknown" for s in states):
            return "unknown"
        if RUNNING in states:
            return RUNNING
        return "queued" if "queued" in states else WAITING

    def result(self, timeout_s: float | None = None) -> R:
        """Wait for the workflow's end and return its result. A dead step raises at once
        (``TaskFailed`` naming the step and its error), whichever step it is."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        values: list[Any] = []
        for job_id in self.exits:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                values.append(self.queue.job(job_id).result(timeout_s=left))
            except JobNotFound:
                raise JobNotFound(
                    f"step {job_id!r} of workflow {self.id!r} is not there (its result "
                    "expired, or the queue was purged)"
                ) from None
            except TaskFailed as failed:
                root = self._first_dead(failed.job_id)
                if root is None:
                    raise
                kind = JobAborted if root.state == ABORTED else TaskFailed
                raise kind(root.id, root.task, root.error or "") from None
        return cast(R, values if self.many else values[0])

    def _first_dead(self, job_id: str) -> Any:
        """The step whose failure made ``job_id`` dead: itself, or the step it waited for
        that died first (named in its error), and so on back."""
        job = self.queue.get(job_id)
        for _ in range(len(self.ids)):
            error = (job.error if job is not None else None) or ""
            if job is None or not error.startswith(_NOT_RUN):
                break
            before = self.queue.get(error[len(_NOT_RUN) :].split(" ", 1)[0])
            if before is None or before.state not in (DEAD, ABORTED):
                break
            job = before
        return job

    async def aresult(self, timeout_s: float | None = None) -> R:
        import asyncio

        return await asyncio.to_thread(self.result, timeout_s)

    def __repr__(self) -> str:
        return f"<Workflow {self.id!r} of {len(self.ids)} steps>"
