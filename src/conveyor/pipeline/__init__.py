"""Pipelines: items flowing through stages of thread, process and async workers."""

from ._pipeline import Pipeline as Pipeline
from ._pipeline import StageOptions as StageOptions
from ._run import Run as Run
from ._run import StageHandle as StageHandle
from ._stage import Stage as Stage
from ._stream import dead_entries as dead_entries
from ._stream import requeue_dead as requeue_dead
