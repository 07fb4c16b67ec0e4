"""The public names: exactly what ``__all__`` says, each showing the public module path."""

from __future__ import annotations

import conveyor

EXPECTED = {
    "BackendError",
    "BackendUnavailable",
    "BrokenResourceError",
    "CancelTask",
    "ClosedResourceError",
    "ConfigurationError",
    "ConveyorError",
    "DeadLetter",
    "Dispatcher",
    "Failure",
    "ItemNotSendable",
    "ItemTimeout",
    "JobContext",
    "JobAborted",
    "JobHandle",
    "JobNotFound",
    "ManualClock",
    "Pipeline",
    "PipelineClosed",
    "PipelineError",
    "RemoteError",
    "Retry",
    "RetryTask",
    "Run",
    "RunStats",
    "RunTimeout",
    "Signature",
    "Skip",
    "Stage",
    "StageFailed",
    "StageHandle",
    "StageOptions",
    "StageStats",
    "StreamStats",
    "Task",
    "TaskError",
    "TaskFailed",
    "TaskQueue",
    "Worker",
    "WorkerCrashed",
    "WorkflowHandle",
    "WouldBlock",
    "chain",
    "chord",
    "current_job",
    "group",
}


def test_all_is_pinned() -> None:
    assert set(conveyor.__all__) == EXPECTED
    for name in conveyor.__all__:
        obj = getattr(conveyor, name)
        assert getattr(obj, "__module__", "conveyor") == "conveyor", name


CONTROL_SIGNALS = {"RetryTask", "CancelTask"}


def test_every_error_has_one_root() -> None:
    for name in conveyor.__all__:
        obj = getattr(conveyor, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            if name in CONTROL_SIGNALS:
                # raised by a task's own code to steer its job: kept apart from errors
                assert not issubclass(obj, conveyor.ConveyorError), name
            else:
                assert issubclass(obj, conveyor.ConveyorError), name


def test_policies_are_values_not_exceptions() -> None:
    for policy in (conveyor.Retry, conveyor.Skip, conveyor.DeadLetter):
        assert not issubclass(policy, BaseException)


def test_every_error_survives_pickling() -> None:
    import pickle

    from conveyor._errors import ItemNotSendable, RemoteError, StageFailed, WorkerCrashed

    errors = [
        StageFailed("s", 1, 2, ValueError("v")),
        WorkerCrashed("s", 42, -9),
        ItemNotSendable("an item", object(), TypeError("no")),
        RemoteError("Weird", "message"),
        conveyor.ItemTimeout("s", 1.0),
        conveyor.RunTimeout(2.0),
    ]
    for error in errors:
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
    assert pickle.loads(pickle.dumps(errors[1])).signal == 9
