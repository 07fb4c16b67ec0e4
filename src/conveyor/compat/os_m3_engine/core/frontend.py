from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .common import StandardComponent


class Frontend(StandardComponent):
    """Produces the items: define ``produce`` as a generator."""

    def produce(self) -> Iterator[Any]:
        raise NotImplementedError
