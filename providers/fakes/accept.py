"""A provider that accepts every push at once: for tests of what happens around the provider."""

from __future__ import annotations

from ..base import Delivered, Delivery, Outcome


class AcceptAll:
    """Answers every delivery `Delivered`, with no network; `name` is the provider it stands in for."""

    def __init__(self, name: str = "fcm") -> None:
        self.name = name

    async def send(self, delivery: Delivery) -> Outcome:
        return Delivered()

    async def close(self) -> None:
        return None
