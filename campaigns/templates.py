"""Message templates: locale variants and personalization variables, validated when saved, rendered per learner.

`{name}` is a variable (`{{` and `}}` are literal braces). Every variable a text uses must be
declared in `variables`, with a fallback (`"first_name": "there"`) or `null` (required), so a typo
such as `{frist_name}` is refused when the template is saved, not discovered in a learner's
notification. Rendering never produces a broken text: a missing required variable, or a locale the
template lacks when `missing_locale` is "error", raises `RenderError` naming what is missing.

A locale variant may also carry a message's rich fields (core/schema.py): `subtitle`, `link` and the
buttons' titles in `actions` are texts with variables (a variable in `link` is percent-encoded, so a
learner's value is one URL component: it adds no `/`, `?`, `#`, `:` or `@` of its own);
`image`, `thread`, `badge`, `sound`, `interruption_level` and `actions_category` are fixed per locale.
They are checked when the template is saved by the rules of a message's own fields (`parse_rich`),
rendered with the fallbacks, so `locales.fr.image` over http is a 422 then, not a failed fan-out.
"""

from __future__ import annotations

import functools
import re
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from ..core.schema import MAX_URL_LEN, FieldError, MessageInvalid, parse_rich, reserved_data_key
from ..queue.keys import Keys
from .audiences import LOCALE_RE, VALUE_RE, VAR_RE

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
TEXT_FIELDS = ("title", "body")
RICH_TEXT_FIELDS = ("subtitle", "link")  # texts with variables, beside the buttons' titles in `actions`
RICH_FIXED_FIELDS = ("image", "thread", "badge", "sound", "interruption_level", "actions_category")
RICH_FIELDS = (*RICH_TEXT_FIELDS, "actions", *RICH_FIXED_FIELDS)
VARIANT_FIELDS = frozenset({*TEXT_FIELDS, "data", *RICH_FIELDS})
MAX_LOCALES = 64
LIMITS = {"title": 1024, "body": 4096, "subtitle": 1024, "link": MAX_URL_LEN}
ACTION_TITLE_LIMIT = 128  # core/schema.py: a button title is at most 128 bytes
DATA_LIMIT = 1024
REQUIRED_PROBE = "x"  # what a required variable stands for when a template's rich fields are checked at save


class RenderError(ValueError):
    """The template cannot be rendered for this learner without a gap: `field` names what is missing."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@functools.lru_cache(maxsize=4096)
def placeholders(text: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """(variable names used, syntax problems) of one text; cached, since a fan-out renders the same texts 100k times."""
    names: set[str] = set()
    problems: list[str] = []
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        if tok in ("{{", "}}"):
            continue
        if m.group(1) is None:
            problems.append(f"unmatched {tok!r} at {m.start()} (write {tok * 2} for a literal brace)")
        elif not VAR_RE.match(m.group(1)):
            problems.append(f"{{{m.group(1)}}} is not a variable name (lowercase letters, digits, _)")
        else:
            names.add(m.group(1))
    return frozenset(names), tuple(problems)


def variant_texts(variant: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(path in the variant, text) of every text of a locale variant that may use variables."""
    texts: list[tuple[str, Any]] = [(f, variant[f]) for f in (*TEXT_FIELDS, *RICH_TEXT_FIELDS) if f in variant]
    actions = variant.get("actions")
    if isinstance(actions, list):
        texts += [(f"actions[{i}].title", a["title"]) for i, a in enumerate(actions) if isinstance(a, dict) and "title" in a]
    data = variant.get("data")
    if isinstance(data, dict):
        texts += [(f"data.{k}", v) for k, v in data.items()]
    return texts


def text_limit(path: str) -> int:
    """Bytes a text at this path of a variant may have (the limits of a message's own fields)."""
    if path.startswith("actions["):
        return ACTION_TITLE_LIMIT
    return LIMITS.get(path, DATA_LIMIT)


def _fill(text: str, values: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        tok = m.group(0)
        if tok == "{{":
            return "{"
        if tok == "}}":
            return "}"
        return values[m.group(1)]

    return _TOKEN.sub(sub, text)


@dataclass(frozen=True, slots=True)
class Rendered:
    locale: str
    title: str | None
    body: str | None
    data: dict[str, str]
    rich: dict[str, Any] = field(default_factory=dict)  # the variant's rich fields, as a message's top-level fields


def render_variant(variant: Mapping[str, Any], values: Mapping[str, str]) -> dict[str, Any]:
    """A variant's fields with every variable filled (the caller checked that `values` has them all):
    title, body, data and the rich fields, by the names of a message's fields."""
    out: dict[str, Any] = {}
    for f in (*TEXT_FIELDS, "subtitle"):
        if f in variant:
            out[f] = _fill(variant[f], values)
    if "link" in variant:
        out["link"] = _fill(variant["link"], {k: urllib.parse.quote(v, safe="") for k, v in values.items()})
    actions = variant.get("actions")
    if actions is not None:  # as given when malformed, for parse_rich to name the fault
        out["actions"] = [{**a, "title": _fill(a["title"], values)}
                          if isinstance(a, dict) and isinstance(a.get("title"), str) else a
                          for a in actions] if isinstance(actions, list) else actions
    for f in RICH_FIXED_FIELDS:
        if f in variant:
            out[f] = variant[f]
    if "data" in variant:
        out["data"] = {k: _fill(v, values) for k, v in variant["data"].items()}
    return out


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    default_locale: str
    locales: Mapping[str, Mapping[str, Any]]  # locale -> {"title", "body", "data": {k: text}}
    variables: Mapping[str, str | None]  # name -> fallback (None: required)
    missing_locale: str = "default"  # "default": fall back to default_locale; "error": refuse
    version: int = 1
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "default_locale": self.default_locale, "missing_locale": self.missing_locale,
                "locales": {k: dict(v) for k, v in self.locales.items()}, "variables": dict(self.variables),
                "version": self.version, "updated_at": self.updated_at}

    def pick_locale(self, wanted: str | None) -> str:
        """The exact locale, else its language (pt-BR -> pt), else the default or an error as configured."""
        if wanted:
            if wanted in self.locales:
                return wanted
            lang = wanted.split("-", 1)[0]
            if lang in self.locales:
                return lang
            if self.missing_locale == "error":
                raise RenderError("locale", f"template {self.name} has no {wanted!r} variant "
                                            f"(it has {sorted(self.locales)}; missing_locale is \"error\")")
        return self.default_locale

    def render(self, variables: Mapping[str, str], locale: str | None = None) -> Rendered:
        chosen = self.pick_locale(locale)
        values: dict[str, str] = {}
        for name, fallback in self.variables.items():
            v = variables.get(name)
            if v is None or v == "":
                if fallback is None:
                    continue  # an error only if this locale's text uses it (below)
                v = fallback
            values[name] = str(v)
        variant = self.locales[chosen]
        for _, text in variant_texts(variant):
            missing = sorted(placeholders(text)[0] - values.keys())
            if missing:
                raise RenderError(f"vars.{missing[0]}", f"template {self.name} ({chosen}) needs {missing} and they "
                                                        "have no fallback")
        out = render_variant(variant, values)
        title, body, data = out.pop("title", None), out.pop("body", None), out.pop("data", None)
        return Rendered(chosen, title, body, data or {}, out)


def _overlong_renders(locales: Mapping[str, Mapping[str, Any]], variables: Mapping[str, str | None]) -> list[FieldError]:
    """Texts that exceed their limit once the fallbacks are filled in (a required variable counted as empty):
    no learner could ever be sent them."""
    values = {k: v or "" for k, v in variables.items()}
    errors: list[FieldError] = []
    for loc, variant in locales.items():
        for path, text in variant_texts(variant):
            size = len(_fill(text, values).encode())
            limit = text_limit(path)
            if size > limit:
                errors.append(FieldError(f"locales.{loc}.{path}", f"renders to {size} bytes with the fallbacks; "
                                                                  f"at most {limit}"))
    return errors


def _rich_errors(where: str, variant: Mapping[str, Any], variables: Mapping[str, str | None]) -> list[FieldError]:
    """A variant's rich fields checked by a message's rules (core/schema.py `parse_rich`), rendered with the
    fallbacks (a required variable stands for REQUIRED_PROBE); each error names `locales.<loc>.<field>`."""
    if not any(f in variant for f in RICH_FIELDS):
        return []
    probe = render_variant(variant, {k: REQUIRED_PROBE if v is None else v for k, v in variables.items()})
    errors: list[FieldError] = []
    parse_rich(probe, errors, title=probe.get("title"), body=probe.get("body"))
    return [FieldError(f"{where}.{e.field}", e.message) for e in errors]


def parse_template(name: str, obj: Any) -> Template:
    """Validate a template; `MessageInvalid` names every field at fault (e.g. `locales.fr.body`)."""
    errors: list[FieldError] = []
    if not isinstance(name, str) or not VALUE_RE.match(name):
        errors.append(FieldError("name", "must be lowercase letters, digits, _ and - (at most 48)"))
    if not isinstance(obj, dict):
        raise MessageInvalid([*errors, FieldError("$", "a template must be a JSON object")])
    unknown = set(obj) - {"name", "default_locale", "missing_locale", "locales", "variables", "version", "updated_at"}
    if unknown:
        errors.append(FieldError("$", f"unknown field(s) {sorted(unknown)}"))
    variables_in = obj.get("variables", {})
    variables: dict[str, str | None] = {}
    if not isinstance(variables_in, dict) or len(variables_in) > 32:
        errors.append(FieldError("variables", "must be an object (at most 32) of name -> fallback text or null (required)"))
    else:
        for k, v in variables_in.items():
            if not VAR_RE.match(k):
                errors.append(FieldError(f"variables.{k}", "a variable name is lowercase letters, digits and _"))
            elif v is not None and (not isinstance(v, str) or len(v) > 256 or placeholders(v)[0] or placeholders(v)[1]):
                errors.append(FieldError(f"variables.{k}", "the fallback must be plain text (at most 256) or null"))
            else:
                variables[k] = v
    locales_in = obj.get("locales")
    locales: dict[str, dict[str, Any]] = {}
    if not isinstance(locales_in, dict) or not locales_in or len(locales_in) > MAX_LOCALES:
        errors.append(FieldError("locales", f'must map 1-{MAX_LOCALES} locales to {{"title", "body", "data"}}'))
        locales_in = {}
    for loc, variant in locales_in.items():
        where = f"locales.{loc}"
        if not LOCALE_RE.match(loc):
            errors.append(FieldError(where, "the key must be a language tag such as fr or pt-BR"))
            continue
        if not isinstance(variant, dict):
            errors.append(FieldError(where, "must be an object with title, body and/or data (and rich fields)"))
            continue
        extra = sorted(set(variant) - VARIANT_FIELDS)
        if extra:
            errors.append(FieldError(where, f"unknown field(s) {extra}; a variant has {sorted(VARIANT_FIELDS)}"))
            continue
        before = len(errors)
        if not any(isinstance(variant.get(f), str) and variant.get(f) for f in TEXT_FIELDS):
            errors.append(FieldError(where, "needs a title or a body"))
        data = variant.get("data", {})
        if not isinstance(data, dict) or len(data) > 16:
            errors.append(FieldError(f"{where}.data", "must be an object of at most 16 text values"))
            data = {}
        errors += [FieldError(f"{where}.data.{k}", "is a key reserved by APNs or FCM") for k in data if reserved_data_key(k)]
        for path, text in variant_texts({**variant, "data": data}):
            path = f"{where}.{path}"
            if not isinstance(text, str):
                errors.append(FieldError(path, "must be a string"))
                continue
            limit = text_limit(path.split(".", 2)[2])
            if len(text.encode()) > limit:
                errors.append(FieldError(path, f"must be at most {limit} bytes"))
            used, problems = placeholders(text)
            errors += [FieldError(path, p) for p in problems]
            undeclared = sorted(used - variables.keys())
            if undeclared:
                errors.append(FieldError(path, f"uses undeclared variable(s) {undeclared}; declare them in variables "
                                               "with a fallback or null (required)"))
        if len(errors) == before:
            errors += _rich_errors(where, variant, variables)
        locales[loc] = {k: v for k, v in variant.items()}
    if not errors:
        errors += _overlong_renders(locales, variables)
    default = obj.get("default_locale")
    if not isinstance(default, str) or default not in locales_in:
        errors.append(FieldError("default_locale", f"must be one of the template's locales {sorted(locales_in)}"))
    missing = obj.get("missing_locale", "default")
    if missing not in ("default", "error"):
        errors.append(FieldError("missing_locale", 'must be "default" (use default_locale) or "error"'))
    if errors:
        raise MessageInvalid(errors)
    return Template(name, str(default), locales, variables, str(missing))


def load_template(raw: bytes | str) -> Template:
    d = orjson.loads(raw)
    return Template(d["name"], d["default_locale"], d["locales"], d["variables"], d.get("missing_locale", "default"),
                    int(d.get("version", 1)), float(d.get("updated_at", 0.0)))


class Templates:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def save(self, name: str, obj: Any) -> Template:
        """Validate and store (a new version replaces the old one; messages already queued keep their text)."""
        t = parse_template(name, obj)
        old = await self.get(name)
        t = Template(t.name, t.default_locale, t.locales, t.variables, t.missing_locale,
                     (old.version + 1) if old else 1, time.time())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.template(name), orjson.dumps(t.to_json()))
            pipe.sadd(self.keys.templates, name)
            await pipe.execute()
        return t

    async def get(self, name: str) -> Template | None:
        raw = await self.redis.get(self.keys.template(name))
        return load_template(raw) if raw else None

    async def require(self, name: str, where: str = "template") -> Template:
        t = await self.get(name) if isinstance(name, str) and VALUE_RE.match(name) else None
        if t is None:
            raise MessageInvalid([FieldError(where, f"no template named {name!r}")])
        return t

    async def names(self) -> list[str]:
        return sorted(n.decode() if isinstance(n, bytes) else n for n in await self.redis.smembers(self.keys.templates))

    async def delete(self, name: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.template(name))
            pipe.srem(self.keys.templates, name)
            n, _ = await pipe.execute()
        return bool(n)
