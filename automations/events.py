"""Learning events: what a learning platform reports about one learner, validated at the door.

`POST /v1/events` takes these next to the app events of campaigns (opened, converted, ...). Every
learning event names its own `id` (the platform's event id: reporting it again is a no-op), the
`user` it is about, its `type`, and the fields of that type:

| type | fields (required) | entity |
|---|---|---|
| quiz_completed | quiz, score (0-100) | quiz |
| module_started, module_completed | module | module |
| session_scheduled, session_rescheduled | session, starts_at (unix s) | session |
| session_cancelled | session | session |
| deadline_set | assignment, due_at (unix s) | assignment |
| activity | (none: `at` is when the learner was last seen) | - |

`at` (unix seconds, optional, default now) is when it happened; every learning event also counts as
activity for inactivity rules. The entity is what "at most once per (rule, learner, entity)" counts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.schema import ID_RE, MAX_SCHEDULE_S, FieldError

ENTITY_FIELD = {
    "quiz_completed": "quiz",
    "module_started": "module",
    "module_completed": "module",
    "session_scheduled": "session",
    "session_rescheduled": "session",
    "session_cancelled": "session",
    "deadline_set": "assignment",
    "activity": None,
}
TYPES = tuple(ENTITY_FIELD)
NUMBER_FIELDS = {"quiz_completed": ("score",)}
TIME_FIELDS = {"session_scheduled": ("starts_at",), "session_rescheduled": ("starts_at",), "deadline_set": ("due_at",)}
COMMON = ("id", "type", "user", "at")
MAX_PAST_S = 30 * 86400  # `at` at most this far back: a replay of last month is not "now"


def fields_of(kind: str) -> tuple[str, ...]:
    """The fields a rule may test or use for an event type (besides the learner's attributes)."""
    entity = ENTITY_FIELD.get(kind)
    return (*((entity,) if entity else ()), *NUMBER_FIELDS.get(kind, ()), *TIME_FIELDS.get(kind, ()))


@dataclass(frozen=True, slots=True)
class LearningEvent:
    id: str
    type: str
    user: str
    at: float
    fields: Mapping[str, str | float] = field(default_factory=dict)  # the type's own fields (quiz, score, ...)

    @property
    def entity(self) -> str | None:
        name = ENTITY_FIELD[self.type]
        value = self.fields.get(name) if name else None
        return str(value) if value is not None else None


def is_learning(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("type"), str) and obj["type"] in ENTITY_FIELD


def parse_learning_event(o: Mapping[str, Any], where: str, errors: list[FieldError],
                         now: float | None = None) -> LearningEvent | None:
    """One learning event, or None with its problems appended to `errors` as `<where>.<field>`."""
    now = time.time() if now is None else now
    before = len(errors)
    kind = str(o.get("type"))
    own = fields_of(kind)
    unknown = set(o) - set(COMMON) - set(own)
    if unknown:
        errors.append(FieldError(where, f"unknown field(s) {sorted(unknown)} for {kind} (it takes {list(own)})"))
    values: dict[str, str | float] = {}
    entity = ENTITY_FIELD[kind]
    for name in ("id", "user", *((entity,) if entity else ())):
        v = o.get(name)
        if not isinstance(v, str) or not ID_RE.match(v):
            errors.append(FieldError(f"{where}.{name}", "is required: 1-128 of A-Z a-z 0-9 . _ : @ / + = -"))
        else:
            values[name] = v
    for name in NUMBER_FIELDS.get(kind, ()):
        v = o.get(name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 100:
            errors.append(FieldError(f"{where}.{name}", "is required: a number from 0 to 100"))
        else:
            values[name] = float(v)
    for name in TIME_FIELDS.get(kind, ()):
        v = o.get(name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not now - MAX_PAST_S <= v <= now + MAX_SCHEDULE_S:
            errors.append(FieldError(f"{where}.{name}", "is required: a unix time in seconds, at most 30 days back "
                                                        "and 366 days ahead"))
        else:
            values[name] = float(v)
    at = o.get("at", now)
    if isinstance(at, bool) or not isinstance(at, int | float) or not now - MAX_PAST_S <= at <= now + 300:
        errors.append(FieldError(f"{where}.at", "must be a unix time in seconds, not in the future nor 30 days back"))
    if len(errors) > before:
        return None
    own_values = {k: v for k, v in values.items() if k not in ("id", "user")}
    return LearningEvent(str(values["id"]), kind, str(values["user"]), float(at), own_values)
