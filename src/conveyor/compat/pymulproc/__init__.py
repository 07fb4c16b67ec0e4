"""pymulproc on conveyor: ``from conveyor.compat.pymulproc import factory, mpq_protocol``."""

from . import errors as errors
from . import factory as factory
from . import mpq_protocol as mpq_protocol

__all__ = ["errors", "factory", "mpq_protocol"]
