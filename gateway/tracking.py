"""The worker's side of message status and outcome events: each call adds a status step or a final outcome to
the commit being collected (gateway/settle.py), written with the acks in its one transaction (queue/status.py
has the layout, the event schema, and which of them are written: `status.enabled`, `status.events`). Nothing
here talks to Redis.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Collection

from ..core.config import StatusSettings
from ..core.schema import Device, Message
from ..queue.status import IN_FLIGHT_AFTER_S, InFlight, Outcome, Pending, Step, device_ref, put_off_s
from ..queue.streams import Commit

_new = tuple.__new__  # builds a NamedTuple at half the cost of its own __new__, which parses arguments in Python


class Tracker:
    """Made by the worker when `status.enabled` or `status.events` is on; `commit` gives the commit being
    collected now (the settler swaps it at each flush)."""

    def __init__(self, settings: StatusSettings, commit: Callable[[], Commit], clock: Callable[[], float]) -> None:
        self._steps = settings.enabled
        self._commit = commit
        self._clock = clock
        self._started: deque[InFlight] = deque()  # in-flight records not yet due, oldest first

    def final(self, kind: str, msg: Message, device: Device | None, provider: str = "", attempt: int = 0,
              reason: str = "", provider_id: str = "") -> None:
        """A delivery (or, with `device` None, the whole message) ended: delivered, token_invalid,
        dead_lettered, expired or dropped."""
        ref = device_ref(device) if device is not None else ""
        self._commit().outcomes.append(_new(Outcome, (kind, msg, int(self._clock() * 1000), ref, provider, attempt,
                                                      reason, provider_id)))

    def retrying(self, msg: Message, device: Device, provider: str, attempt: int, due: float, error: str) -> None:
        """The delivery failed for now: `attempt` goes out at `due`."""
        if self._steps:
            now = self._clock()
            details = {"provider": provider, "attempt": attempt, "next_attempt_at": round(due, 3), "last_error": error}
            self._commit().steps.append(Step(msg.id, int(now * 1000), "retrying", device_ref(device), details,
                                             put_off_s(due, now)))

    def held(self, msg: Message, rule: str, until: float) -> None:
        """The policy put the message off until `until` (a send window, a cap)."""
        if self._steps:
            now = self._clock()
            self._commit().steps.append(Step(msg.id, int(now * 1000), "held", "",
                                             {"rule": rule, "until": round(until, 3)}, put_off_s(until, now)))

    def in_flight(self, msg: Message, attempt: int, devices: Collection[Device], job: Pending) -> None:
        """A worker took the message (or a retry of some of its devices) and sends to these devices (`job`: the
        worker's job). Kept here, and written by `due_in_flight` only if the job is still unsettled
        `IN_FLIGHT_AFTER_S` later."""
        if self._steps:
            self._started.append(_new(InFlight, (msg.id, int(self._clock() * 1000), attempt, devices, weakref.ref(job))))

    def due_in_flight(self, commit: Commit) -> None:
        """Called at each flush: the in-flight records `IN_FLIGHT_AFTER_S` old go to `commit` if their job is
        still under way, and are forgotten if it settled."""
        started = self._started
        if not started:
            return
        due_ms = int((self._clock() - IN_FLIGHT_AFTER_S) * 1000)
        while started and started[0].at_ms <= due_ms:
            f = started.popleft()
            job = f.job()
            if job is not None and job.pending > 0:
                commit.started.append(f)

    def no_device(self, msg: Message) -> None:
        """The learner has no registered device: nothing to send."""
        if self._steps:
            self._commit().steps.append(Step(msg.id, int(self._clock() * 1000), "no_device"))
