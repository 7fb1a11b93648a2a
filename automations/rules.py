"""Automation rules: when a learning event (or a spell of inactivity) sends which template, to whom, when.

A rule, as JSON (API), TOML (`[[automations]]`, `pushgw automations load`) or Python:

    {"id": "quiz-reward", "trigger": "quiz_completed",
     "conditions": [{"field": "event.score", "op": ">=", "value": 80},
                    {"field": "learner.cohort", "op": "in", "value": ["2026-a", "2026-b"]}],
     "template": "quiz-badge", "vars": {"badge": "gold"},
     "timing": {"delay_s": 0}}

- `trigger`: a learning event type (automations/events.py) or `inactivity` with `inactive_days`;
- `conditions` (all must hold): `event.<field>` of the trigger's type, or `learner.<attribute>` (cohort, track,
  locale, timezone, first_name, skills, topics, vars.<name>), with ==, !=, >=, >, <=, < (numbers) or in, not_in;
- the action: `template` (+ `vars`), rendered with the event's fields and the learner's attributes as variables;
  optional `variants` ({name, weight, template, vars}) and `control_percent` use the campaign assignment
  (campaigns/experiments.py), and the figures go to the campaign report of `auto-<rule id>`;
- `timing`: `{"delay_s": N}` (default now), `{"relative_to": "starts_at", "offsets_s": [-86400, -900]}` (a
  message per offset from a time of the event; those already past are skipped), or `{"send_time": "best"}`;
- at most once per (rule, learner, entity); the messages go through the queue, so the delivery policy (caps,
  windows, opt-outs) applies to them as to every message.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from dataclasses import field as dc_field
from typing import Any

from ..campaigns.audiences import VALUE_RE, Attributes
from ..campaigns.experiments import CONTROL, Campaign, Variant, parse_campaign
from ..core.schema import MAX_SCHEDULE_S, MAX_TTL_S, FieldError, MessageInvalid
from .events import ENTITY_FIELD, NUMBER_FIELDS, TIME_FIELDS, LearningEvent, fields_of

INACTIVITY = "inactivity"
TRIGGERS = (*ENTITY_FIELD, INACTIVITY)
OPS = ("==", "!=", ">=", ">", "<=", "<", "in", "not_in")
NUMERIC_OPS = (">=", ">", "<=", "<")
LEARNER_FIELDS = ("cohort", "track", "locale", "timezone", "first_name", "skills", "topics")
MAX_CONDITIONS = 16
MAX_OFFSETS = 5
MAX_RULES = 200  # stored rules: also the bound on the `rule` label of the automation metrics
PREFIX = "auto-"  # the campaign id that holds a rule's figures: auto-<rule id>
_RULE_FIELDS = {"id", "trigger", "inactive_days", "conditions", "template", "vars", "timing", "variants",
                "control_percent", "category", "priority", "ttl", "paused"}


@dataclass(frozen=True, slots=True)
class Condition:
    field: str  # event.<name> or learner.<name> (learner.vars.<name>)
    op: str
    value: Any
    # Set once from `field` and `value`: the engine tests every rule of a trigger on every event.
    scope: str = dc_field(init=False, repr=False, compare=False)  # event, vars or learner
    name: str = dc_field(init=False, repr=False, compare=False)
    wanted: frozenset[str] = dc_field(init=False, repr=False, compare=False)  # ==, !=, in, not_in: the values as keys

    def __post_init__(self) -> None:
        scope, _, rest = self.field.partition(".")
        if scope == "learner" and rest.startswith("vars."):
            scope, rest = "vars", rest[5:]
        values = self.value if isinstance(self.value, tuple) else (self.value,)
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "name", rest)
        object.__setattr__(self, "wanted", frozenset(_key(v) for v in values) if self.op not in NUMERIC_OPS
                           else frozenset())

    def holds(self, event: LearningEvent | None, learner: Attributes) -> bool:
        if self.scope == "event":
            got = event.fields.get(self.name) if event is not None else None
        elif self.scope == "vars":
            got = learner.vars.get(self.name)
        else:
            got = getattr(learner, self.name, None)
        op = self.op
        if op in NUMERIC_OPS:
            if isinstance(got, str):
                try:
                    got = float(got)
                except ValueError:
                    return False
            if not isinstance(got, int | float):
                return False
            want = self.value
            return bool(got >= want if op == ">=" else got > want if op == ">" else got <= want if op == "<=" else got < want)
        if got is None:
            hit = False
        elif isinstance(got, tuple):
            hit = any(_key(v) in self.wanted for v in got)
        else:
            hit = _key(got) in self.wanted
        return hit if op in ("==", "in") else not hit

    def to_json(self) -> dict[str, Any]:
        return {"field": self.field, "op": self.op, "value": list(self.value) if isinstance(self.value, tuple)
                else self.value}


def _key(v: Any) -> str:
    """A value as compared by ==, in: numbers by value (85 == 85.0 == "85"), everything else as text."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


@dataclass(frozen=True, slots=True)
class Timing:
    delay_s: int = 0
    relative_to: str | None = None  # a time field of the trigger event (starts_at, due_at)
    offsets_s: tuple[int, ...] = ()
    best: bool = False  # send_time "best": the learner's own most-opened hour (automations/besttime.py)

    def to_json(self) -> dict[str, Any]:
        if self.relative_to:
            return {"relative_to": self.relative_to, "offsets_s": list(self.offsets_s)}
        if self.best:
            return {"send_time": "best"}
        return {"delay_s": self.delay_s}


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    trigger: str
    template: str | None
    conditions: tuple[Condition, ...] = ()
    vars: Mapping[str, str] = field(default_factory=dict)
    timing: Timing = Timing()
    variants: tuple[Variant, ...] = ()
    control_percent: float = 0.0
    category: str = "reminder"
    priority: str = "normal"
    ttl: int | None = None
    inactive_days: float | None = None
    paused: bool = False

    @property
    def campaign_id(self) -> str:
        return f"{PREFIX}{self.id}"

    @property
    def moves_with_sessions(self) -> bool:
        """A session_scheduled rule: session_cancelled withdraws its pending messages, session_rescheduled moves them."""
        return self.trigger == "session_scheduled"

    def matches(self, event: LearningEvent | None, learner: Attributes) -> bool:
        return all(c.holds(event, learner) for c in self.conditions)

    def campaign(self) -> Campaign:
        """The campaign view of the rule: its variants, control group and message fields, under `auto-<id>`."""
        obj: dict[str, Any] = {"id": self.campaign_id, "audience": {"topic": self.campaign_id},
                               "variants": [v.to_json() for v in self.variants] or [{"name": "main"}],
                               "control_percent": self.control_percent, "category": self.category,
                               "priority": self.priority}
        if self.template:
            obj["template"] = self.template
        if self.vars:
            obj["vars"] = dict(self.vars)
        if self.ttl is not None:
            obj["ttl"] = self.ttl
        return parse_campaign(obj, now=math.inf)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "trigger": self.trigger,
                               "conditions": [c.to_json() for c in self.conditions], "timing": self.timing.to_json(),
                               "control_percent": self.control_percent, "category": self.category,
                               "priority": self.priority, "paused": self.paused}
        for k in ("template", "ttl", "inactive_days"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.vars:
            out["vars"] = dict(self.vars)
        if self.variants:
            out["variants"] = [v.to_json() for v in self.variants]
        return out


def _condition(obj: Any, where: str, trigger: str, errors: list[FieldError]) -> Condition | None:
    if not isinstance(obj, dict) or set(obj) != {"field", "op", "value"}:
        errors.append(FieldError(where, 'must be {"field": "event.score", "op": ">=", "value": 80}'))
        return None
    name, op, value = obj["field"], obj["op"], obj["value"]
    scope, _, rest = name.partition(".") if isinstance(name, str) else ("", "", "")
    numeric = False
    if scope == "event" and trigger != INACTIVITY and rest in fields_of(trigger):
        numeric = rest in NUMBER_FIELDS.get(trigger, ()) or rest in TIME_FIELDS.get(trigger, ())
    elif scope == "learner" and (rest in LEARNER_FIELDS or (rest.startswith("vars.") and len(rest) > 5)):
        pass
    else:
        own = [f"event.{f}" for f in fields_of(trigger)] if trigger != INACTIVITY else []
        errors.append(FieldError(f"{where}.field", f"must be one of {own} or learner.<{'|'.join(LEARNER_FIELDS)}"
                                                   "|vars.name>"))
        return None
    if op not in OPS:
        errors.append(FieldError(f"{where}.op", f"must be one of {list(OPS)}"))
        return None
    if op in NUMERIC_OPS:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            errors.append(FieldError(f"{where}.value", f"{op} compares numbers: give a number"))
            return None
        if scope == "event" and not numeric:
            errors.append(FieldError(f"{where}.op", f"{name} is not a number: use ==, !=, in or not_in"))
            return None
        return Condition(name, op, float(value))
    if op in ("in", "not_in"):
        if not isinstance(value, list) or not 1 <= len(value) <= 100 or not all(
                isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
            errors.append(FieldError(f"{where}.value", "must be a list of 1-100 strings or numbers"))
            return None
        return Condition(name, op, tuple(value))
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        errors.append(FieldError(f"{where}.value", "must be a string or a number"))
        return None
    return Condition(name, op, value)


def _timing(obj: Any, trigger: str, errors: list[FieldError]) -> Timing:
    if obj is None:
        return Timing()
    if not isinstance(obj, dict):
        errors.append(FieldError("timing", 'must be {"delay_s": N}, {"relative_to": "starts_at", "offsets_s": '
                                           '[-86400, -900]} or {"send_time": "best"}'))
        return Timing()
    if set(obj) == {"send_time"}:
        if obj["send_time"] != "best":
            errors.append(FieldError("timing.send_time", 'must be "best"'))
        return Timing(best=True)
    if set(obj) == {"delay_s"}:
        d = obj["delay_s"]
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_SCHEDULE_S:
            errors.append(FieldError("timing.delay_s", f"must be whole seconds from 0 to {MAX_SCHEDULE_S}"))
            return Timing()
        return Timing(delay_s=d)
    if set(obj) == {"relative_to", "offsets_s"}:
        rel, offs = obj["relative_to"], obj["offsets_s"]
        allowed = TIME_FIELDS.get(trigger, ())
        if rel not in allowed:
            errors.append(FieldError("timing.relative_to", f"must be a time of the {trigger} event: {list(allowed)}"))
            return Timing()
        if not isinstance(offs, list) or not 1 <= len(offs) <= MAX_OFFSETS or not all(
                isinstance(o, int) and not isinstance(o, bool) and abs(o) <= MAX_TTL_S for o in offs) or len(
                set(offs)) != len(offs):
            errors.append(FieldError("timing.offsets_s", f"must be 1-{MAX_OFFSETS} distinct whole seconds (negative: "
                                                         f"before), at most {MAX_TTL_S} each way"))
            return Timing()
        return Timing(relative_to=str(rel), offsets_s=tuple(sorted(offs)))
    errors.append(FieldError("timing", 'give one of {"delay_s": N}, {"relative_to": ..., "offsets_s": [...]}, '
                                       '{"send_time": "best"}'))
    return Timing()


def parse_rule(obj: Any, rule_id: str | None = None) -> Rule:
    """Validate a rule; `MessageInvalid` names every field at fault (`conditions[0].value`, `timing.offsets_s`).

    `rule_id` (the URL's) wins over an `id` in the body, which must then agree."""
    if not isinstance(obj, dict):
        raise MessageInvalid([FieldError("$", "a rule must be a JSON object")])
    errors: list[FieldError] = []
    unknown = set(obj) - _RULE_FIELDS
    if unknown:
        errors.append(FieldError("$", f"unknown field(s) {sorted(unknown)}"))
    rid = rule_id if rule_id is not None else obj.get("id")
    if "id" in obj and rule_id is not None and obj["id"] != rule_id:
        errors.append(FieldError("id", "differs from the rule id in the path"))
    if not isinstance(rid, str) or not VALUE_RE.match(rid) or len(rid) > 40:
        errors.append(FieldError("id", "must be lowercase letters, digits, _ and - (at most 40)"))
        rid = "invalid"
    trigger = obj.get("trigger")
    if trigger not in TRIGGERS:
        errors.append(FieldError("trigger", f"must be one of {list(TRIGGERS)}"))
        trigger = INACTIVITY
    inactive = obj.get("inactive_days")
    if trigger == INACTIVITY and "trigger" in obj:
        if isinstance(inactive, bool) or not isinstance(inactive, int | float) or not 0 < inactive <= 366:
            errors.append(FieldError("inactive_days", "an inactivity rule needs a number of days in (0, 366]"))
            inactive = None
    elif inactive is not None:
        errors.append(FieldError("inactive_days", "only for trigger inactivity"))
    raw_conditions = obj.get("conditions", [])
    conditions: list[Condition] = []
    if not isinstance(raw_conditions, list) or len(raw_conditions) > MAX_CONDITIONS:
        errors.append(FieldError("conditions", f"must be a list of at most {MAX_CONDITIONS} conditions"))
    else:
        for i, c in enumerate(raw_conditions):
            cond = _condition(c, f"conditions[{i}]", str(trigger), errors)
            if cond is not None:
                conditions.append(cond)
    timing = _timing(obj.get("timing"), str(trigger), errors)
    paused = obj.get("paused", False)
    if not isinstance(paused, bool):
        errors.append(FieldError("paused", "must be true or false"))
    # The action and its experiment: the campaign's own validation, field names kept.
    campaign_obj: dict[str, Any] = {"id": f"{PREFIX}{rid}", "audience": {"topic": f"{PREFIX}{rid}"},
                                    "category": obj.get("category", "reminder")}
    for k in ("template", "vars", "variants", "control_percent", "priority", "ttl"):
        if k in obj:
            campaign_obj[k] = obj[k]
    campaign: Campaign | None = None
    try:
        campaign = parse_campaign(campaign_obj, now=math.inf)
    except MessageInvalid as e:
        for err in e.errors:
            if err.field in ("id", "audience"):
                continue
            if "variants" not in obj and err.field.startswith("variants[0]."):  # the implicit single variant
                err = FieldError(err.field.removeprefix("variants[0]."), err.message)
            errors.append(err)
    if errors or campaign is None:
        raise MessageInvalid(errors or [FieldError("$", "invalid rule")])
    variants = campaign.variants if "variants" in obj else ()
    return Rule(str(rid), str(trigger), campaign.template, tuple(conditions), dict(campaign.vars), timing, variants,
                campaign.control_percent, campaign.category, campaign.priority, campaign.ttl,
                float(inactive) if isinstance(inactive, int | float) else None, bool(paused))


def rules_from_toml(text: str) -> list[Any]:
    """The `[[automations]]` tables of a TOML document (each one rule, with its `id`), for `RuleStore.save_many`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MessageInvalid([FieldError("$", f"not TOML: {e}")]) from None
    rules = data.get("automations")
    if not isinstance(rules, list) or set(data) != {"automations"}:
        raise MessageInvalid([FieldError("automations", "give the rules as [[automations]] tables, and nothing else")])
    return rules


def load_rule(d: Mapping[str, Any]) -> Rule:
    """A stored rule (validated when it was saved)."""
    return parse_rule(dict(d))


def arm_of(rule: Rule, campaign: Campaign, user: str) -> str:
    """`control` or the learner's variant: the campaign assignment (a pure hash of rule and learner)."""
    return CONTROL if campaign.is_control(user) else campaign.variant_of(user).name


def sample_vars(trigger: str) -> dict[str, str]:
    """Stand-in values of a trigger's event variables: a rule's template must render with them when it is saved."""
    return {name: "0" if name in NUMBER_FIELDS.get(trigger, ()) else "2026-01-01 09:00"
            if name in TIME_FIELDS.get(trigger, ()) else "x" for name in fields_of(trigger) if trigger != INACTIVITY}

