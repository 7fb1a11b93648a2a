"""`record`: a dataclass that is frozen for the type checker and a plain slots class at run time.

A frozen dataclass sets each field through `object.__setattr__` in `__init__`: 494 ns against 147 ns for
four fields (`timeit`, 2026-12-04). The gateway builds several records per message or per delivery (the
message, its stream entry, the delivery handed to a provider, its outcome), so those
are declared with `@record`: mypy still refuses any assignment to a field, and at run time they are
ordinary slots instances. They compare by value but are not hashable (`eq` without `frozen`): nothing
hashes them (docs/decisions.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

_T = TypeVar("_T")

if TYPE_CHECKING:
    from typing import dataclass_transform

    @dataclass_transform(frozen_default=True, field_specifiers=(field,))
    def record(cls: type[_T]) -> type[_T]: ...
else:
    def record(cls):
        return dataclass(slots=True)(cls)
