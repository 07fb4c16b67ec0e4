"""conveyor: concurrent work that never hangs.

Layers, lowest first (a lower layer never imports a higher one; ``tests/test_layers.py`` checks)::

    conveyor.compat.*, conveyor.cli     thin: only the public API below
    conveyor                            this module: re-exports only
    conveyor.pipeline, .tasks,          the parts
    .dispatch, .channels
    conveyor._engine                    worker kinds, buffers, clock, statistics, error policies
    conveyor._errors                    the exception tree (a leaf)
"""

from ._engine import DeadLetter as DeadLetter
from ._engine import Failure as Failure
from ._engine import ManualClock as ManualClock
from ._engine import Retry as Retry
from ._engine import RunStats as RunStats
from ._engine import Skip as Skip
from ._engine import StageStats as StageStats
from ._engine import StreamStats as StreamStats
from ._errors import BackendError as BackendError
from ._errors import BackendUnavailable as BackendUnavailable
from ._errors import BrokenResourceError as BrokenResourceError
from ._errors import ClosedResourceError as ClosedResourceError
from ._errors import ConfigurationError as ConfigurationError
from ._errors import ConveyorError as ConveyorError
from ._errors import ItemNotSendable as ItemNotSendable
from ._errors import ItemTimeout as ItemTimeout
from ._errors import JobAborted as JobAborted
from ._errors import JobNotFound as JobNotFound
from ._errors import PipelineClosed as PipelineClosed
from ._errors import PipelineError as PipelineError
from ._errors import RemoteError as RemoteError
from ._errors import RunTimeout as RunTimeout
from ._errors import StageFailed as StageFailed
from ._errors import TaskError as TaskError
from ._errors import TaskFailed as TaskFailed
from ._errors import WorkerCrashed as WorkerCrashed
from ._errors import WouldBlock as WouldBlock
from .dispatch import Dispatcher as Dispatcher
from .pipeline import Pipeline as Pipeline
from .pipeline import Run as Run
from .pipeline import Stage as Stage
from .pipeline import StageHandle as StageHandle
from .pipeline import StageOptions as StageOptions
from .tasks import CancelTask as CancelTask
from .tasks import JobContext as JobContext
from .tasks import JobHandle as JobHandle
from .tasks import RetryTask as RetryTask
from .tasks import Signature as Signature
from .tasks import Task as Task
from .tasks import TaskQueue as TaskQueue
from .tasks import Worker as Worker
from .tasks import WorkflowHandle as WorkflowHandle
from .tasks import chain as chain
from .tasks import chord as chord
from .tasks import current_job as current_job
from .tasks import group as group

__version__ = "0.1.0"

__all__ = [
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
    "JobAborted",
    "JobContext",
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
]

# Tracebacks and reprs show the public path, not the private module a name lives in.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or callable(_obj):
        _obj.__module__ = "conveyor"
del _name, _obj
