"""Task-queue backends: the contract and its implementations."""

from .base import ABORTED as ABORTED
from .base import DEAD as DEAD
from .base import DONE as DONE
from .base import HISTORY_ERROR_CHARS as HISTORY_ERROR_CHARS
from .base import PARKED_S as PARKED_S
from .base import QUEUED as QUEUED
from .base import RUNNING as RUNNING
from .base import WAITING as WAITING
from .base import Attempt as Attempt
from .base import Backend as Backend
from .base import Job as Job
from .base import Lease as Lease
from .base import Limit as Limit
from .base import NewJob as NewJob
from .base import QueueCounts as QueueCounts
from .base import ScheduleInfo as ScheduleInfo
from .memory import MemoryBackend as MemoryBackend
from .sqlite import SQLiteBackend as SQLiteBackend
