"""conveyor's engine: worker kinds behind one interface, bounded buffers, the clock, statistics
records and error policies.

It imports nothing from the parts above it (pipelines, tasks, dispatch, channels); a test checks
that. Importing this package registers the built-in worker kinds.
"""

from . import aio as aio
from . import executor as executor
from . import processes as processes
from . import threads as threads
from .buffer import Buffer as Buffer
from .buffer import BufferShutdown as BufferShutdown
from .clock import SYSTEM_CLOCK as SYSTEM_CLOCK
from .clock import Clock as Clock
from .clock import ManualClock as ManualClock
from .clock import SystemClock as SystemClock
from .limiter import RateLimiter as RateLimiter
from .loop import LoopThread as LoopThread
from .policy import DeadLetter as DeadLetter
from .policy import Failure as Failure
from .policy import Retry as Retry
from .policy import Skip as Skip
from .policy import check_policy as check_policy
from .pool import KINDS as KINDS
from .pool import PoolContext as PoolContext
from .pool import WorkerPool as WorkerPool
from .pool import kind_names as kind_names
from .pool import register_kind as register_kind
from .stats import RunStats as RunStats
from .stats import StageStats as StageStats
from .stats import StreamStats as StreamStats
from .step import EACH as EACH
from .step import FILTER as FILTER
from .step import FLAT as FLAT
from .step import MAP as MAP
from .step import Step as Step
from .step import StepSpec as StepSpec
from .step import Work as Work
