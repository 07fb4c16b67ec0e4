from __future__ import annotations

from typing import Any

from .common import StandardComponent


class Backend(StandardComponent):
    """Consumes each item; nothing is returned."""

    def process(self, data: Any) -> None:
        raise NotImplementedError
