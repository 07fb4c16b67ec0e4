from __future__ import annotations

from typing import Any

from .common import StandardComponent


class Transport(StandardComponent):
    """Turns each item from the frontend into what goes to the backend."""

    def transport(self, data: Any) -> Any:
        raise NotImplementedError
