"""Durable task queues: ``TaskQueue``, its tasks and jobs, the worker, and the backends
(``conveyor.tasks.backends``) they run on."""

from ._jobs import JobContext as JobContext
from ._jobs import current_job as current_job
from ._queue import CancelTask as CancelTask
from ._queue import JobHandle as JobHandle
from ._queue import RetryTask as RetryTask
from ._queue import Task as Task
from ._queue import TaskQueue as TaskQueue
from ._worker import Worker as Worker
from ._workflows import Signature as Signature
from ._workflows import WorkflowHandle as WorkflowHandle
from ._workflows import chain as chain
from ._workflows import chord as chord
from ._workflows import group as group
