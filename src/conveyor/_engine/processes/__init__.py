"""The process worker kind, in three parts: the pool and its driver threads in the parent
(:mod:`.driver`), what runs in a worker process (:mod:`.child`), and the messages between
them (:mod:`.wire`). Importing the package registers the kind."""

from .driver import DEFAULT_START_METHOD as DEFAULT_START_METHOD
from .driver import ProcessPool as ProcessPool
