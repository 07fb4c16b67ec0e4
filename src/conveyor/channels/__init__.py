"""Channels between a parent process and its children: ``open_channel("pipe")`` for one child,
``open_channel("queue")`` for many. See ``docs/channels.md``."""

from ._channel import DEFAULT_MAX_MESSAGE_BYTES as DEFAULT_MAX_MESSAGE_BYTES
from ._channel import Message as Message
from ._channel import PipeEnd as PipeEnd
from ._channel import open_channel as open_channel

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "Message", "PipeEnd", "open_channel"]
