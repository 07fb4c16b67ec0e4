"""Sending the user's code to another process.

Functions and classes that a worker process cannot import by name (lambdas, closures, anything
defined in ``__main__`` or inside a function) travel by value, pickled with cloudpickle. How
cloudpickle rebuilds their code objects is its own affair and has changed between releases:
since 3.1 it replaces each code object's file name with ``"<dynamic-code>"`` so that its output
is the same wherever the code was defined. A traceback from the worker then names no file and
shows no source line, which is the one thing a user needs when their function fails there.

So code objects do not go through cloudpickle's reducer: they travel as :mod:`marshal` data,
the form the interpreter itself stores them in (``.pyc`` files). That keeps every field (file
name, first line, the line table, nested code) exactly as compiled, whichever cloudpickle is
installed. marshal's format belongs to the interpreter's version, which is no loss: a worker
process always runs the same interpreter as its parent.
"""

from __future__ import annotations

import io
import marshal
import pickle
import types
from typing import Any

import cloudpickle

PROTOCOL = pickle.HIGHEST_PROTOCOL


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            try:
                return marshal.loads, (marshal.dumps(obj),)
            except ValueError:  # code built by hand with constants marshal cannot hold
                return NotImplemented
        return super().reducer_override(obj)


def dumps(obj: Any) -> bytes:
    """``obj`` pickled for a worker process: cloudpickle, with code objects kept whole."""
    with io.BytesIO() as buffer:
        _Pickler(buffer, protocol=PROTOCOL).dump(obj)
        return buffer.getvalue()


def loads(data: bytes) -> Any:
    """The other end of :func:`dumps` (plain pickle suffices: cloudpickle's output needs only
    cloudpickle importable)."""
    return pickle.loads(data)
