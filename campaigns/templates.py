"""Message templates: locale variants and personalization variables, validated when saved, rendered per learner.

`{name}` is a variable (`{{` and `}}` are literal braces). Every variable a text uses must be
declared in `variables`, with a fallback (`"first_name": "there"`) or `null` (required), so a typo
such as `{frist_name}` is refused when the template is saved, not discovered in a learner's
notification. Rendering never produces a broken text: a missing required variable, or a locale the
template lacks when `missing_locale` is "error", raises `RenderError` naming what is missing.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from ..core.schema import FieldError, MessageInvalid, reserved_data_key
from ..queue.keys import Keys
from .audiences import LOCALE_RE, VALUE_RE, VAR_RE

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
TEXT_FIELDS = ("title", "body")
MAX_LOCALES = 64
LIMITS = {"title": 1024, "body": 4096}


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
        out: dict[str, Any] = {}
        for f in (*TEXT_FIELDS, "data"):
            texts = variant.get(f)
            if texts is None:
                continue
            items = texts.items() if f == "data" else [(None, texts)]
            rendered: dict[str | None, str] = {}
            for k, text in items:
                used, _ = placeholders(text)
                missing = sorted(used - values.keys())
                if missing:
                    raise RenderError(f"vars.{missing[0]}", f"template {self.name} ({chosen}) needs {missing} and they "
                                                            "have no fallback")
                rendered[k] = _fill(text, values)
            out[f] = rendered if f == "data" else rendered[None]
        return Rendered(chosen, out.get("title"), out.get("body"), out.get("data") or {})


def _overlong_renders(locales: Mapping[str, Mapping[str, Any]], variables: Mapping[str, str | None]) -> list[FieldError]:
    """Texts that exceed their limit once the fallbacks are filled in (a required variable counted as empty):
    no learner could ever be sent them."""
    values = {k: v or "" for k, v in variables.items()}
    errors: list[FieldError] = []
    for loc, variant in locales.items():
        texts = [(f, variant.get(f)) for f in TEXT_FIELDS]
        texts += [(f"data.{k}", v) for k, v in (variant.get("data") or {}).items()]
        for path, text in texts:
            if not isinstance(text, str):
                continue
            size = len(_fill(text, values).encode())
            limit = LIMITS.get(path, 1024)
            if size > limit:
                errors.append(FieldError(f"locales.{loc}.{path}", f"renders to {size} bytes with the fallbacks; "
                                                                  f"at most {limit}"))
    return errors


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
        if not isinstance(variant, dict) or set(variant) - {"title", "body", "data"}:
            errors.append(FieldError(where, "must be an object with title, body and/or data"))
            continue
        if not any(isinstance(variant.get(f), str) and variant.get(f) for f in TEXT_FIELDS):
            errors.append(FieldError(where, "needs a title or a body"))
        texts: list[tuple[str, Any]] = [(f"{where}.{f}", variant.get(f)) for f in TEXT_FIELDS if f in variant]
        data = variant.get("data", {})
        if not isinstance(data, dict) or len(data) > 16:
            errors.append(FieldError(f"{where}.data", "must be an object of at most 16 text values"))
            data = {}
        errors += [FieldError(f"{where}.data.{k}", "is a key reserved by APNs or FCM") for k in data if reserved_data_key(k)]
        texts += [(f"{where}.data.{k}", v) for k, v in data.items()]
        for path, text in texts:
            if not isinstance(text, str):
                errors.append(FieldError(path, "must be a string"))
                continue
            limit = LIMITS.get(path.rsplit(".", 1)[-1], 1024)
            if len(text.encode()) > limit:
                errors.append(FieldError(path, f"must be at most {limit} bytes"))
            used, problems = placeholders(text)
            errors += [FieldError(path, p) for p in problems]
            undeclared = sorted(used - variables.keys())
            if undeclared:
                errors.append(FieldError(path, f"uses undeclared variable(s) {undeclared}; declare them in variables "
                                               "with a fallback or null (required)"))
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
