"""A child's target whose module cannot be imported in the child (it imports in the test's own
process): under spawn and forkserver the child dies while it unpickles its arguments, before it
can ever use its end of a channel."""

from __future__ import annotations

import multiprocessing
from typing import Any

# a child has its name before it unpickles its target (the main process and the forkserver,
# which preloads only pytest, are "MainProcess")
if multiprocessing.current_process().name != "MainProcess":
    raise ImportError("this module refuses to be imported in a child process")


def target(end: Any) -> None:
    end.send("NEVER")
