"""What a process worker and its driver say to each other: one named record per message.

Every message is pickled on its own and sent as one ``send_bytes`` frame. The driver writes
``Run``, ``Explain`` and ``Leave``; the child answers each ``Run`` and ``Explain`` with exactly
one ``Answer`` (or ``Unreadable``), in the order it received them, and says ``Ready`` once,
first (or ``SetupFailed``), and ``Bye`` last.
"""

from __future__ import annotations

import pickle
from typing import Any, NamedTuple

PROTOCOL = pickle.HIGHEST_PROTOCOL


# -- from the driver ------------------------------------------------------------------------------


class Run(NamedTuple):
    """Run these items, one after another, and answer with their outputs."""

    unit_id: int
    items: list[Any]


class Explain(NamedTuple):
    """The answer to ``unit_id`` could not be read here: send it again, item by item checked,
    with the outputs that cannot cross turned into those items' failures."""

    unit_id: int


class Leave(NamedTuple):
    """Tear down and exit."""


# -- from the child -------------------------------------------------------------------------------


class Ready(NamedTuple):
    """Set up; waiting for work."""

    pid: int


class SetupFailed(NamedTuple):
    error: Any
    text: str


class Failure(NamedTuple):
    """Item ``which`` of a unit failed; its outputs would have started at ``position``."""

    which: int
    position: int
    error: Any
    text: str


class Answer(NamedTuple):
    """The outputs of a unit's items, in order, and the items that failed."""

    unit_id: int
    outputs: list[Any]
    failures: list[Failure]
    seconds: float


class Unreadable(NamedTuple):
    """A message from the driver could not be unpickled here."""

    reason: str


class Bye(NamedTuple):
    """Torn down; exiting."""


def dumps(msg: Any) -> bytes:
    return pickle.dumps(msg, PROTOCOL)


def pickles(value: Any) -> bool:
    """Whether ``value`` pickles and unpickles here."""
    try:
        pickle.loads(pickle.dumps(value, PROTOCOL))
        return True
    except Exception:
        return False


class _Unsendable:
    """Stands in a unit for an item that cannot cross; the child skips it."""

    def __reduce__(self) -> str:
        # unpickles as the module's one instance, so the child can test with `is`
        return "UNSENDABLE"


UNSENDABLE = _Unsendable()
