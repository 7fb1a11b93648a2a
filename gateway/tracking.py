"""The worker's side of message status and outcome events: each call adds a status step or a final outcome to
the commit being collected (gateway/settle.py), written with the acks in its one transaction (queue/status.py
has the layout, the event schema, and which of them are written: `status.enabled`, `status.events`). Nothing
here talks to Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Protocol

from ..core.config import StatusSettings
from ..core.schema import Device, Message
from ..queue.status import IN_FLIGHT_AFTER_S, InFlight, Outcome, Step, device_ref, put_off_s
from ..queue.streams import Commit, Entry

IN_FLIGHT_CHECK_S = 0.1  # the jobs under way are looked at this often, not at every flush
_new = tuple.__new__  # builds a NamedTuple at half the cost of its own __new__, which parses arguments in Python


class Started(Protocol):
    """What the tracker asks of the worker's job (gateway/settle.py `Job`) for its in_flight step."""

    @property
    def message(self) -> Message: ...
    @property
    def entry(self) -> Entry: ...
    started_ms: int  # when the worker took it; 0 once its step is written (or never to be)
    devices: Collection[Device]


class Tracker:
    """Made by the worker when `status.enabled` or `status.events` is on; `commit` gives the commit being
    collected now (the settler swaps it at each flush)."""

    def __init__(self, settings: StatusSettings, commit: Callable[[], Commit], clock: Callable[[], float]) -> None:
        self._steps = settings.enabled
        self._commit = commit
        self._clock = clock
        self._next_check = 0.0

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
                                             put_off_s(due, now), msg.user or msg.id))

    def held(self, msg: Message, rule: str, until: float) -> None:
        """The policy put the message off until `until` (a send window, a cap)."""
        if self._steps:
            now = self._clock()
            self._commit().steps.append(Step(msg.id, int(now * 1000), "held", "",
                                             {"rule": rule, "until": round(until, 3)}, put_off_s(until, now),
                                             msg.user or msg.id))

    def in_flight(self, job: Started, devices: Collection[Device]) -> None:
        """A worker took the job's message (or a retry of some of its devices) and sends to these devices. Only
        noted on the job: `due_in_flight` writes the step if the job is still under way `IN_FLIGHT_AFTER_S`
        later."""
        if self._steps:
            job.started_ms = int(self._clock() * 1000)
            job.devices = devices

    def due_in_flight(self, commit: Commit, jobs: Iterable[Started]) -> None:
        """Called at each flush with the jobs under way, oldest first (the settler's `jobs`): every
        `IN_FLIGHT_CHECK_S`, those taken `IN_FLIGHT_AFTER_S` ago or more whose step is not written yet go to
        `commit`. A job that settled is no longer among them: its step is never written."""
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + IN_FLIGHT_CHECK_S
        due_ms = int((now - IN_FLIGHT_AFTER_S) * 1000)
        for job in jobs:
            at = job.started_ms
            if at > due_ms:
                break  # this one and every later one started less than IN_FLIGHT_AFTER_S ago
            if at:
                msg = job.message
                commit.started.append(_new(InFlight, (msg.id, at, job.entry.attempt, job.devices, msg.user or msg.id)))
                job.started_ms = 0

    def no_device(self, msg: Message) -> None:
        """The learner has no registered device: nothing to send."""
        if self._steps:
            self._commit().steps.append(Step(msg.id, int(self._clock() * 1000), "no_device",
                                             shard_key=msg.user or msg.id))
