"""Campaign definitions and experiment assignment: variants with weights, a pilot stage, a hold-out control group.

Assignment is a pure function of (campaign id, user id), three independent 64-bit hashes:

- **control**: `h("control") < control_percent` — the learner receives nothing, in every stage; the
  group exists to measure what the campaign changes (conversions with and without the push);
- **stage**: `h("stage") < percent` — a non-control learner is in a stage of `percent` (a 10% pilot,
  then 100% at rollout). Stages grow monotonically, so rollout sends only to the learners the pilot
  did not reach, and nobody gets the announcement twice;
- **variant**: `h("variant")` against the cumulative weights — the same learner sees the same
  variant in the pilot, the rollout and any report, with no state stored per learner.

The hashes are independent, so the variant split inside a pilot matches the weights, and the
control group's share is the same in every stage.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from ..core.schema import MAX_ID_LEN, MAX_SCHEDULE_S, MAX_TTL_S, FieldError, MessageInvalid
from .audiences import VALUE_RE, VAR_RE, Audience, parse_audience

CONTROL = "control"
SCALE = 1 << 64
MAX_VARIANTS = 8
_TIME_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)\Z")
_CATEGORY_RE = re.compile(r"^[a-z0-9_]{1,32}\Z")


def unit(campaign: str, user: str, salt: str) -> int:
    """A uniform 64-bit integer from (campaign, salt, user): the only randomness in assignment."""
    return int.from_bytes(hashlib.blake2b(f"{campaign}\x1f{salt}\x1f{user}".encode(), digest_size=8).digest(), "big")


def share(percent: float) -> int:
    """A percentage as a threshold on the 64-bit hash (exact for the 0.01% steps the API accepts)."""
    return round(percent * 100) * SCALE // 10000


@dataclass(frozen=True, slots=True)
class Stage:
    """A launch: `percent` of the non-control learners reached so far, and the weights it used (None: the campaign's)."""

    percent: float
    weights: Mapping[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"percent": self.percent, "weights": dict(self.weights) if self.weights is not None else None}


@dataclass(frozen=True, slots=True)
class Repeat:
    count: int  # messages per learner (a frequency variant), 1..5
    interval_s: int  # between them


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    weight: float = 1.0
    template: str | None = None  # default: the campaign's template
    vars: Mapping[str, str] = field(default_factory=dict)  # over the campaign's vars
    send_at: float | None = None  # absolute time (overrides the campaign's)
    delay_s: int = 0  # after the campaign's send time (or the launch)
    local_time: str | None = None  # "18:00": the next 18:00 in each learner's time zone
    repeat: Repeat | None = None
    send_time: str | None = None  # "best": each learner's best hour within the next 24 h (campaigns/besttime.py)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "weight": self.weight}
        if self.template:
            out["template"] = self.template
        if self.vars:
            out["vars"] = dict(self.vars)
        for k in ("send_at", "local_time", "send_time"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.delay_s:
            out["delay_s"] = self.delay_s
        if self.repeat:
            out["repeat"] = {"count": self.repeat.count, "interval_s": self.repeat.interval_s}
        return out


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    audience: Audience
    variants: tuple[Variant, ...]
    template: str | None = None
    vars: Mapping[str, str] = field(default_factory=dict)
    control_percent: float = 0.0
    category: str = "new_content"
    priority: str = "normal"
    ttl: int | None = None
    send_at: float | None = None
    app: str | None = None
    collapse_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "audience": self.audience.to_json(),
                               "variants": [v.to_json() for v in self.variants], "control_percent": self.control_percent,
                               "category": self.category, "priority": self.priority}
        for k in ("template", "ttl", "send_at", "app", "collapse_key"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.vars:
            out["vars"] = dict(self.vars)
        return out

    def templates(self) -> set[str]:
        return {name for v in self.variants if (name := v.template or self.template)}

    # ------------------------------------------------------------------ assignment

    def is_control(self, user: str) -> bool:
        return self.control_percent > 0 and unit(self.id, user, "control") < share(self.control_percent)

    def stage_unit(self, user: str) -> int:
        return unit(self.id, user, "stage")

    def variant_of(self, user: str, weights: Mapping[str, float] | None = None) -> Variant:
        """The learner's variant by the campaign's weights, or a stage's own (`weights`: a rollout of the winner)."""
        pool = [(v, v.weight if weights is None else weights.get(v.name, 0.0)) for v in self.variants]
        pool = [(v, w) for v, w in pool if w > 0]
        if len(pool) == 1:
            return pool[0][0]
        total = sum(w for _, w in pool)
        x = unit(self.id, user, "variant") / SCALE * total
        acc = 0.0
        for v, w in pool:
            acc += w
            if x < acc:
                return v
        return pool[-1][0]

    def arm(self, user: str, stages: Sequence[Stage]) -> str | None:
        """"control", the learner's variant if a launched stage includes them, or None (not reached yet).

        A learner belongs to the first stage whose percent covers their stage hash; that stage's weights
        (if it set any) chose their variant."""
        if self.is_control(user):
            return CONTROL
        s = self.stage_unit(user)
        for stage in sorted(stages, key=lambda st: st.percent):
            if s < share(stage.percent):
                return self.variant_of(user, stage.weights).name
        return None

    def parse_weights(self, obj: Any) -> dict[str, float] | None:
        """A launch's own weights, e.g. {"social": 1} to roll out only the winning wording; None: the campaign's."""
        if obj is None:
            return None
        names = {v.name for v in self.variants}
        if (not isinstance(obj, dict) or not obj or set(obj) - names
                or not all(isinstance(w, int | float) and not isinstance(w, bool) and 0 <= w <= 1e6 for w in obj.values())
                or not any(w > 0 for w in obj.values())):
            raise MessageInvalid([FieldError("weights", f"must map some of {sorted(names)} to weights >= 0, one > 0")])
        return {k: float(v) for k, v in obj.items()}

    # ------------------------------------------------------------------ schedule

    def send_times(self, variant: Variant, now: float, tz: ZoneInfo) -> list[float | None]:
        """When each of the variant's messages for a learner goes out (None: now)."""
        base = variant.send_at if variant.send_at is not None else self.send_at
        start = max(base or now, now) + variant.delay_s
        first: float | None = start if (base is not None or variant.delay_s) else None
        if variant.local_time:
            first = next_local(start, variant.local_time, tz)
        count = variant.repeat.count if variant.repeat else 1
        interval = variant.repeat.interval_s if variant.repeat else 0
        if count == 1:
            return [first]
        t0 = first if first is not None else now
        return [first if k == 0 else t0 + k * interval for k in range(count)]


def next_local(after: float, hhmm: str, tz: ZoneInfo) -> float:
    """The first `hhmm` in zone `tz` at or after `after` (a DST gap moves it forward with the zone's rules)."""
    h, m = (int(x) for x in hhmm.split(":"))
    local = datetime.fromtimestamp(after, tz)
    candidate = local.replace(hour=h, minute=m, second=0, microsecond=0)
    if candidate.timestamp() < after:
        candidate = (local + timedelta(days=1)).replace(hour=h, minute=m, second=0, microsecond=0)
    return candidate.timestamp()


def _user_digest(user: str) -> str:
    return hashlib.blake2b(user.encode(), digest_size=16).hexdigest()


def message_id(campaign: str, user: str, k: int = 0) -> str:
    """`cmp:{campaign}:{user}` (and `cmp:{campaign}/{k}:{user}` for a frequency variant's k-th message): a chunk
    redone after a crash enqueues the same ids, which the queue's idempotency window accepts once.

    When that would exceed the 128-byte id limit (a long user id), the user part is a 128-bit blake2b digest of
    the user, marked in the head: `cmp:{campaign}/h:{digest}` (`cmp:{campaign}/{k}/h:{digest}`), deterministic
    and unique per user like the plain form. An app reporting an event for such an id must also name the user."""
    head = campaign if k == 0 else f"{campaign}/{k}"
    mid = f"cmp:{head}:{user}"
    if len(mid.encode()) <= MAX_ID_LEN:
        return mid
    return f"cmp:{head}/h:{_user_digest(user)}"


def parse_message_id(mid: str) -> tuple[str, str | None] | None:
    """(campaign, user) of a campaign message id, or None; the user is None when the id holds only its digest."""
    if not mid.startswith("cmp:"):
        return None
    head, sep, user = mid[4:].partition(":")
    campaign = head.split("/", 1)[0]
    if not sep or not user or not VALUE_RE.match(campaign):
        return None
    return (campaign, None) if head.endswith("/h") else (campaign, user)


def message_id_names(mid: str, user: str) -> bool:
    """Whether `mid` is one of `user`'s campaign message ids (plain or digest form)."""
    parsed = parse_message_id(mid)
    if parsed is None:
        return False
    if parsed[1] is not None:
        return parsed[1] == user
    return mid.rpartition(":")[2] == _user_digest(user)


def _vars(obj: Any, where: str, errors: list[FieldError]) -> dict[str, str]:
    if obj is None:
        return {}
    if not isinstance(obj, dict) or len(obj) > 32:
        errors.append(FieldError(where, "must be an object of at most 32 string values"))
        return {}
    out: dict[str, str] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not VAR_RE.match(k):
            errors.append(FieldError(f"{where}.{k}", "a variable name is lowercase letters, digits and _"))
        elif not isinstance(v, str) or len(v) > 256:
            errors.append(FieldError(f"{where}.{k}", "must be a string of at most 256 characters"))
        else:
            out[k] = v
    return out


def _number(obj: Mapping[str, Any], name: str, where: str, errors: list[FieldError], lo: float, hi: float) -> float | None:
    v = obj.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        errors.append(FieldError(f"{where}{name}", f"must be a number from {lo:g} to {hi:g}"))
        return None
    return float(v)


_CAMPAIGN_FIELDS = {"id", "audience", "variants", "template", "vars", "control_percent", "category", "priority", "ttl",
                    "send_at", "app", "collapse_key"}
_VARIANT_FIELDS = {"name", "weight", "template", "vars", "send_at", "delay_s", "local_time", "repeat", "send_time"}


def parse_campaign(obj: Any, now: float) -> Campaign:
    """Validate a campaign; `MessageInvalid` names every field (`variants[1].weight`, `audience.filter.cohort`)."""
    if not isinstance(obj, dict):
        raise MessageInvalid([FieldError("$", "a campaign must be a JSON object")])
    errors: list[FieldError] = []
    unknown = set(obj) - _CAMPAIGN_FIELDS
    if unknown:
        errors.append(FieldError("$", f"unknown field(s) {sorted(unknown)}"))
    cid = obj.get("id")
    if not isinstance(cid, str) or not VALUE_RE.match(cid):
        errors.append(FieldError("id", "must be lowercase letters, digits, _ and - (at most 48)"))
    audience: Audience | None = None
    try:
        audience = parse_audience(obj.get("audience"))
    except MessageInvalid as e:
        errors += e.errors
    template = obj.get("template")
    if template is not None and (not isinstance(template, str) or not VALUE_RE.match(template)):
        errors.append(FieldError("template", "must be a template name"))
        template = None
    cvars = _vars(obj.get("vars"), "vars", errors)
    control = _number(obj, "control_percent", "", errors, 0, 50) or 0.0
    category = obj.get("category", "new_content")
    if not isinstance(category, str) or not _CATEGORY_RE.match(category):
        errors.append(FieldError("category", "must match [a-z0-9_]{1,32}"))
    priority = obj.get("priority", "normal")
    if priority not in ("normal", "high"):
        errors.append(FieldError("priority", "must be normal or high"))
    ttl = obj.get("ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= MAX_TTL_S):
        errors.append(FieldError("ttl", f"must be whole seconds from 0 to {MAX_TTL_S}"))
    send_at = _number(obj, "send_at", "", errors, 0, now + MAX_SCHEDULE_S)
    app = obj.get("app")
    if app is not None and (not isinstance(app, str) or not re.match(r"^[A-Za-z0-9._:@/+=-]{1,64}\Z", app)):
        errors.append(FieldError("app", "must be a short identifier"))
    collapse = obj.get("collapse_key")
    if collapse is not None and (not isinstance(collapse, str) or len(collapse.encode()) > 64):
        errors.append(FieldError("collapse_key", "must be a string of at most 64 bytes"))
    variants: list[Variant] = []
    raw_variants = obj.get("variants", [{"name": "main"}])
    if not isinstance(raw_variants, list) or not 1 <= len(raw_variants) <= MAX_VARIANTS:
        errors.append(FieldError("variants", f"must be a list of 1-{MAX_VARIANTS} variants"))
        raw_variants = []
    names: set[str] = set()
    for i, v in enumerate(raw_variants):
        w = f"variants[{i}]."
        if not isinstance(v, dict):
            errors.append(FieldError(f"variants[{i}]", "must be an object with at least a name"))
            continue
        bad = set(v) - _VARIANT_FIELDS
        if bad:
            errors.append(FieldError(f"variants[{i}]", f"unknown field(s) {sorted(bad)}"))
        name = v.get("name")
        if not isinstance(name, str) or not VALUE_RE.match(name) or name == CONTROL or name in names:
            errors.append(FieldError(w + "name", f"must be a unique name (not {CONTROL!r}): lowercase letters, digits, _ -"))
            continue
        names.add(name)
        weight = _number(v, "weight", w, errors, 0.0001, 1e6)
        vt = v.get("template")
        if vt is not None and (not isinstance(vt, str) or not VALUE_RE.match(vt)):
            errors.append(FieldError(w + "template", "must be a template name"))
            vt = None
        if vt is None and template is None:
            errors.append(FieldError(w + "template", "needs a template (here or the campaign's template)"))
        vsend = _number(v, "send_at", w, errors, 0, now + MAX_SCHEDULE_S)
        delay = _number(v, "delay_s", w, errors, 0, MAX_SCHEDULE_S) or 0
        local = v.get("local_time")
        if local is not None and (not isinstance(local, str) or not _TIME_RE.match(local)):
            errors.append(FieldError(w + "local_time", "must be HH:MM (24 h), in each learner's time zone"))
            local = None
        repeat = None
        r = v.get("repeat")
        if r is not None:
            ok = isinstance(r, dict) and set(r) == {"count", "interval_s"}
            ok = ok and isinstance(r["count"], int) and isinstance(r["interval_s"], int) and not isinstance(r["count"], bool)
            if not ok or not 1 <= r["count"] <= 5 or not 3600 <= r["interval_s"] <= 30 * 86400:
                errors.append(FieldError(w + "repeat", "must be {\"count\": 1-5, \"interval_s\": 3600-2592000}"))
            else:
                repeat = Repeat(r["count"], r["interval_s"])
        send_time = v.get("send_time")
        if send_time is not None and (send_time != "best" or local is not None or repeat is not None
                                      or vsend is not None or delay):
            errors.append(FieldError(w + "send_time", 'must be "best", without send_at, delay_s, local_time or repeat'))
            send_time = None
        variants.append(Variant(name, weight or 1.0, vt, _vars(v.get("vars"), w + "vars", errors), vsend, int(delay),
                                local, repeat, send_time))
    if errors or audience is None:
        raise MessageInvalid(errors or [FieldError("audience", "is required")])
    return Campaign(str(cid), audience, tuple(variants), template, cvars, control, str(category), str(priority),
                    ttl, send_at, app, collapse)


def load_campaign(d: Mapping[str, Any]) -> Campaign:
    """A stored definition (validated when it was created; no clock check on the way back)."""
    return parse_campaign(dict(d), now=float("inf"))
