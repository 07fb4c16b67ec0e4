"""The default components: lines from stdin, logged by the transport and the backend."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any, cast

from .core.backend import Backend
from .core.frontend import Frontend
from .core.transport import Transport


class StdinFrontend(Frontend):
    """Each line of standard input, as bytes."""

    def produce(self) -> Iterator[bytes]:
        # read sys.stdin when producing, not at import, so a replaced stdin is honoured
        stream = cast(Iterator[bytes], getattr(sys.stdin, "buffer", sys.stdin))
        yield from stream


class LogTransport(Transport):
    def setup(self) -> None:
        self._logger = logging.getLogger(type(self).__name__)

    def transport(self, data: Any) -> Any:
        self._logger.info(data)
        return data


class LogBackend(Backend):
    def setup(self) -> None:
        self._logger = logging.getLogger(type(self).__name__)

    def process(self, data: Any) -> None:
        self._logger.info(data)
