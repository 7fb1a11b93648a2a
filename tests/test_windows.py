"""Send windows in the learner's time zone, across zones and daylight-saving changes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pushgw.core.windows import SendWindows, Window, WindowError, jitter_for, zone

LEARNING_DAY = SendWindows.parse(["07:30-09:00", "12:00-13:30", "17:30-21:00"])
PARIS, NEW_YORK, KOLKATA, LORD_HOWE = (zone(z) for z in ("Europe/Paris", "America/New_York", "Asia/Kolkata",
                                                         "Australia/Lord_Howe"))


def at(tz_name: str, *args: int) -> float:
    return datetime(*args, tzinfo=zone(tz_name)).timestamp()  # type: ignore[misc]


def local(ts: float, tz_name: str) -> str:
    return datetime.fromtimestamp(ts, zone(tz_name)).strftime("%Y-%m-%d %H:%M %Z")


def test_parse_and_errors() -> None:
    assert Window.parse("07:30-09:00") == Window(450, 540)
    assert Window.parse("22:00-06:00").contains(23 * 60) and Window.parse("22:00-06:00").contains(5 * 60)
    assert not Window.parse("22:00-06:00").contains(12 * 60)
    assert Window.parse("00:00-24:00").contains(0) and Window.parse("00:00-24:00").contains(1439.9)
    for bad in ("7:30-9:00", "07:30-07:30", "25:00-26:00", "07:30", "24:00-24:30"):
        with pytest.raises(WindowError):
            Window.parse(bad)
    with pytest.raises(WindowError, match="unknown time zone"):
        zone("Mars/Olympus_Mons")


def test_outside_the_window_waits_for_the_next_start_in_the_learners_own_zone() -> None:
    night = at("Europe/Paris", 2026, 11, 25, 23, 15)
    assert not LEARNING_DAY.open_at(night, PARIS)
    start, end = LEARNING_DAY.next_open(night, PARIS)
    assert local(start, "Europe/Paris") == "2026-11-26 07:30 CET" and end - start == 90 * 60
    # The same instant is 17:15 in New York: the evening window opens at 17:30 there.
    start, _ = LEARNING_DAY.next_open(night, NEW_YORK)
    assert local(start, "America/New_York") == "2026-11-25 17:30 EST" and start - night == 15 * 60
    # ...and 03:45 in Kolkata (UTC+05:30, no DST): the morning window.
    start, _ = LEARNING_DAY.next_open(night, KOLKATA)
    assert local(start, "Asia/Kolkata") == "2026-11-26 07:30 IST"
    # Between lunch and the evening, the evening window.
    start, _ = LEARNING_DAY.next_open(at("Europe/Paris", 2026, 11, 25, 14, 0), PARIS)
    assert local(start, "Europe/Paris") == "2026-11-25 17:30 CET"
    # Inside a window: now.
    inside = at("Europe/Paris", 2026, 11, 25, 12, 30)
    assert LEARNING_DAY.open_at(inside, PARIS) and LEARNING_DAY.next_open(inside, PARIS) == (inside, inside)


def test_daylight_saving_changes() -> None:
    # Spring forward in Paris (29 March 2026, 02:00 -> 03:00): the morning window is still 07:30 local,
    # which is only 23 hours after the previous 07:30.
    sat = at("Europe/Paris", 2026, 3, 28, 21, 30)
    start, _ = LEARNING_DAY.next_open(sat, PARIS)
    assert local(start, "Europe/Paris") == "2026-03-29 07:30 CEST"
    assert start - at("Europe/Paris", 2026, 3, 28, 7, 30) == 23 * 3600
    # Fall back in New York (1 November 2026, 02:00 -> 01:00): 07:30 EST, 25 hours after the day before.
    start, _ = LEARNING_DAY.next_open(at("America/New_York", 2026, 10, 31, 22, 0), NEW_YORK)
    assert local(start, "America/New_York") == "2026-11-01 07:30 EST"
    assert start - at("America/New_York", 2026, 10, 31, 7, 30) == 25 * 3600
    # A window starting in the skipped hour opens when the gap ends (03:00 EDT), not an hour late or never.
    gap = SendWindows.parse(["02:30-04:00"])
    start, end = gap.next_open(at("America/New_York", 2026, 3, 8, 0, 0), NEW_YORK)
    assert local(start, "America/New_York") == "2026-03-08 03:00 EDT" and local(end, "America/New_York").endswith("04:00 EDT")
    # A window starting in the repeated hour opens at its first occurrence (01:30 EDT, not 01:30 EST).
    repeat = SendWindows.parse(["01:30-02:00"])
    start, _ = repeat.next_open(at("America/New_York", 2026, 11, 1, 0, 0), NEW_YORK)
    assert local(start, "America/New_York") == "2026-11-01 01:30 EDT"
    # Checked during the second 02:10 of Paris's autumn night, a window at 02:30 opens 20 minutes later.
    second_210 = datetime(2026, 10, 25, 2, 10, tzinfo=PARIS, fold=1).timestamp()
    start, _ = SendWindows.parse(["02:30-03:30"]).next_open(second_210, PARIS)
    assert start - second_210 == 20 * 60
    # Lord Howe Island moves its clocks by 30 minutes (5 April 2026, 02:00 -> 01:30).
    start, _ = LEARNING_DAY.next_open(at("Australia/Lord_Howe", 2026, 4, 4, 22, 0), LORD_HOWE)
    assert datetime.fromtimestamp(start, LORD_HOWE).strftime("%d %H:%M") == "05 07:30"


def test_jitter_is_stable_per_message_and_spreads_a_crowd() -> None:
    start, end = 1_000_000.0, 1_000_000.0 + 5400
    assert jitter_for("m-1:1", start, end, 900) == jitter_for("m-1:1", start, end, 900)
    times = [jitter_for(f"m-{i}:1", start, end, 900) for i in range(10_000)]
    assert min(times) >= start and max(times) <= start + 900
    per_minute = [0] * 15
    for t in times:
        per_minute[min(14, int((t - start) // 60))] += 1
    # even spread: each minute holds about 1/15 of the crowd (binomial, 10k draws: +-5 sigma is about +-120)
    assert all(abs(n - 10_000 / 15) < 150 for n in per_minute), per_minute
    # a short window: at most its first half
    assert all(start <= jitter_for(f"m-{i}", start, start + 600, 900) <= start + 300 for i in range(100))


@settings(max_examples=300, deadline=None)
@given(
    instant=st.integers(min_value=int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()),
                        max_value=int(datetime(2027, 12, 31, tzinfo=UTC).timestamp())),
    tz_name=st.sampled_from(["Europe/Paris", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe",
                             "America/Santiago", "Pacific/Chatham", "UTC"]),
    windows=st.lists(st.tuples(st.integers(0, 23), st.sampled_from([0, 15, 30, 45]), st.integers(15, 600)),
                     min_size=1, max_size=3),
)
def test_next_open_is_the_first_open_instant(instant: int, tz_name: str, windows: list[tuple[int, int, int]]) -> None:
    texts = []
    for h, m, length in windows:
        end = h * 60 + m + length
        texts.append(f"{h:02d}:{m:02d}-{(end // 60) % 24:02d}:{end % 60:02d}" if end % 1440 != h * 60 + m else "00:00-24:00")
    sw = SendWindows.parse(texts)
    tz = zone(tz_name)
    start, _ = sw.next_open(instant, tz)
    if sw.open_at(instant, tz):
        assert start == instant
        return
    assert instant < start <= instant + 2 * 86400
    assert sw.open_at(start, tz) or sw.open_at(start + 1, tz)
    # No open instant was skipped: sample the time before the start (every minute, at most 500 samples).
    t = float(instant)
    step = max(60.0, (start - instant) / 500)
    while t < start - 1:
        assert not sw.open_at(t, tz), (texts, tz_name, datetime.fromtimestamp(t, tz))
        t += step
