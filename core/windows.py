"""Send windows in each learner's own time zone: push when learners are active, never at night.

A window is local wall-clock time, "07:30-09:00"; "22:00-06:00" wraps past midnight and
"00:00-24:00" is all day. A message outside every window is deferred to the start of the next
one, computed with zoneinfo so it follows the user's daylight-saving rules: a window start that
falls in a spring-forward gap (02:30 on the night clocks skip to 03:00) resolves to the first
instant after the gap, and one in an autumn repeat opens at its first occurrence (or its second,
once the first has passed). A window lying entirely inside a skipped hour does not open that
day. The deferral adds a jitter (see `jitter_for`) so a million learners in one zone do not all
get their reminders in the same second.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]|24):([0-5]\d)\Z")


class WindowError(ValueError):
    """A window string or time zone name that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Window:
    start: int  # minutes after local midnight
    end: int  # minutes after local midnight, 1..1440; <= start: wraps past midnight

    @classmethod
    def parse(cls, text: str) -> Window:
        m = _WINDOW_RE.match(text.strip())
        if m is None:
            raise WindowError(f"send window {text!r} must look like \"07:30-09:00\" (local 24 h time)")
        start = int(m.group(1)) * 60 + int(m.group(2))
        end = int(m.group(3)) * 60 + int(m.group(4))
        if end > 1440:
            raise WindowError(f"send window {text!r} ends after 24:00")
        if start == end:
            raise WindowError(f"send window {text!r} is empty; use \"00:00-24:00\" for all day")
        return cls(start, end)

    def contains(self, minute: float) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    @property
    def length_min(self) -> int:
        return self.end - self.start if self.start < self.end else 1440 - self.start + self.end


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    """A ZoneInfo by IANA name ("Europe/Paris"); `WindowError` for an unknown one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as e:  # OSError: a folder name such as "Europe"
        raise WindowError(f"unknown time zone {name!r}: use an IANA name such as Europe/Paris") from e


def _local_minute(now: float, tz: ZoneInfo) -> tuple[date, float]:
    local = datetime.fromtimestamp(now, tz)
    return local.date(), local.hour * 60 + local.minute + local.second / 60 + local.microsecond / 60e6


def _instant(day: date, minute: int, tz: ZoneInfo) -> float:
    """Unix time of local `day` + `minute`; a time skipped by DST resolves to the end of the gap."""
    if minute >= 1440:
        day, minute = day + timedelta(days=1), minute - 1440
    naive = datetime.combine(day, time(minute // 60, minute % 60))
    first = naive.replace(tzinfo=tz).timestamp()  # fold=0: the first of two repeated wall times
    if datetime.fromtimestamp(first, tz).replace(tzinfo=None) == naive:
        return first
    # The wall time does not exist (spring forward): find the first instant whose wall time is past it.
    lo, hi = sorted((naive.replace(tzinfo=tz, fold=1).timestamp(), first))
    while hi - lo > 0.5:
        mid = (lo + hi) / 2
        if datetime.fromtimestamp(mid, tz).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return float(round(hi))


def _repeat(day: date, minute: int, tz: ZoneInfo) -> float | None:
    """The second occurrence of a local time repeated when clocks go back, else None."""
    naive = datetime.combine(day, time(minute // 60, minute % 60))
    second = naive.replace(tzinfo=tz, fold=1)
    if second.utcoffset() == naive.replace(tzinfo=tz, fold=0).utcoffset():
        return None
    ts = second.timestamp()
    return ts if datetime.fromtimestamp(ts, tz).replace(tzinfo=None) == naive else None


@dataclass(frozen=True, slots=True)
class SendWindows:
    windows: tuple[Window, ...]  # empty: any time

    @classmethod
    def parse(cls, texts: tuple[str, ...] | list[str]) -> SendWindows:
        return cls(tuple(Window.parse(t) for t in texts))

    def open_at(self, now: float, tz: ZoneInfo) -> bool:
        if not self.windows:
            return True
        _, minute = _local_minute(now, tz)
        return any(w.contains(minute) for w in self.windows)

    def next_open(self, now: float, tz: ZoneInfo) -> tuple[float, float]:
        """(start, end) of the next window after `now` in unix seconds; `now` itself when a window is open."""
        if self.open_at(now, tz):
            return now, now
        today, _ = _local_minute(now, tz)
        best: tuple[float, float] | None = None
        for offset in range(-1, 3):
            day = today + timedelta(days=offset)
            for w in self.windows:
                end = _instant(day, w.start + w.length_min, tz)
                # A start in an autumn repeat occurs twice; the second counts if the first has passed.
                for start in (_instant(day, w.start, tz), _repeat(day, w.start, tz)):
                    if start is not None and start > now and (best is None or start < best[0]):
                        best = (start, max(end, start + 60))
        if best is None:  # pragma: no cover - a non-empty window set always opens within two days
            raise WindowError("no send window opens in the next two days")
        return best


def jitter_for(member: str, window_start: float, window_end: float, max_jitter_s: float) -> float:
    """When in the window a deferred message goes: spread evenly by a hash of the message, so the
    same message always gets the same time (a re-decided message does not drift) and a crowd of
    deferred messages is spread over `max_jitter_s` (or the first half of the window if shorter)."""
    span = min(max_jitter_s, max(0.0, (window_end - window_start) / 2))
    fraction = zlib.crc32(member.encode()) / 0xFFFFFFFF
    return window_start + fraction * span
