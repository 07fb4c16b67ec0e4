"""Sending the user's code to another process.

Functions and classes that a worker process cannot import by name (lambdas, closures, anything
defined in ``__main__`` or inside a function) travel by value, pickled with cloudpickle. How
cloudpickle rebuilds their code objects is its own affair and has changed between releases:
since 3.1 it replaces each code object's file name with ``"<dynamic-code>"`` so that its output
is the same wherever the code was defined. A traceback from the worker then names no file and
shows no source line, which is the one thing a user needs when their function fails there.

A function that a decorator replaced in its module (``@q.task`` leaves a ``Task`` where the
function was) cannot be found by name, and pickle refuses it ("not the same object"). When the
object found there says it wraps the function (``__wrapped__``, as ``functools.wraps`` sets),
the function travels as that name and is unwrapped on arrival: the worker imports the module
as any worker would.

Code objects do not go through cloudpickle's reducer: they travel as :mod:`marshal` data,
the form the interpreter itself stores them in (``.pyc`` files). That keeps every field (file
name, first line, the line table, nested code) exactly as compiled, whichever cloudpickle is
installed. marshal's format belongs to the interpreter's version, which is no loss: a worker
process always runs the same interpreter as its parent.
"""

from __future__ import annotations

import importlib
import io
import marshal
import pickle
import sys
import types
from typing import Any

import cloudpickle

PROTOCOL = pickle.HIGHEST_PROTOCOL


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is types.CodeType:
            try:
                return marshal.loads, (marshal.dumps(obj),)
            except ValueError:  # code built by hand with constants marshal cannot hold
                return NotImplemented
        if kind is types.FunctionType and _wrapped_at_its_name(obj):
            return unwrap_global, (obj.__module__, obj.__qualname__)
        return super().reducer_override(obj)


def _lookup(module: Any, qualname: str) -> Any:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def travels_by_name(fn: Any) -> bool:
    """Whether a worker process will find ``fn`` by importing its module: a function at the
    top of an importable module, or of the script being run (worker processes import it as
    their main module). Others travel by value, with what they refer to."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if module is None or "<locals>" in qualname or "<lambda>" in qualname:
        return False
    if module == "__main__":
        return getattr(sys.modules.get("__main__"), "__file__", None) is not None
    return module in sys.modules


def _wrapped_at_its_name(fn: types.FunctionType) -> bool:
    """``fn``'s module holds, at ``fn``'s name, an object that wraps ``fn``."""
    if not travels_by_name(fn):
        return False
    module = sys.modules.get(fn.__module__)
    if module is None:
        return False
    try:
        found = _lookup(module, fn.__qualname__)
    except AttributeError:
        return False
    return found is not fn and getattr(found, "__wrapped__", None) is fn


def unwrap_global(module: str, qualname: str) -> Any:
    """The function that the object at ``module.qualname`` wraps (in a worker process)."""
    return _lookup(importlib.import_module(module), qualname).__wrapped__


def dumps(obj: Any) -> bytes:
    """``obj`` pickled for a worker process: cloudpickle, with code objects kept whole."""
    with io.BytesIO() as buffer:
        _Pickler(buffer, protocol=PROTOCOL).dump(obj)
        return buffer.getvalue()


def loads(data: bytes) -> Any:
    """The other end of :func:`dumps` (plain pickle suffices: cloudpickle's output needs only
    cloudpickle importable)."""
    return pickle.loads(data)
