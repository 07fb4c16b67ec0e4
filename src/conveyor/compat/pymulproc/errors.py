"""pymulproc's exception."""

from conveyor import BrokenResourceError


class QueuesCommunicationError(BrokenResourceError):
    """A message could not be sent (the channel is broken)."""
