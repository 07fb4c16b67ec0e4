"""The dispatcher: topics, producers that answer requests before a deadline, subscribers that
receive every answer behind their own bounded buffers."""

from ._dispatcher import Dispatcher as Dispatcher
from ._dispatcher import DispatcherStats as DispatcherStats
from ._dispatcher import Producer as Producer
from ._dispatcher import Request as Request
from ._dispatcher import Subscription as Subscription

__all__ = ["Dispatcher", "DispatcherStats", "Producer", "Request", "Subscription"]
