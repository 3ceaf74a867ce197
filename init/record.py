"""Record: a minimal stand-in for @dataclass, because `dataclasses` (with `inspect`, `typing`) and the code it
generates per class cost ~15 ms of import time, a third of this tool's whole start-up budget.

Annotated class attributes are the fields, their class values the defaults (`factory(list)` for mutable ones).
Records compare and hash by value, print like dataclasses, and `replace()` returns a changed copy.
"""
from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Self, TypeVar

    _T = TypeVar("_T")


class _Factory:
    """A default made fresh for every instance."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make


if TYPE_CHECKING:
    def factory(make: Callable[[], _T]) -> _T:
        """Typed like dataclasses.field(default_factory=...): the field's annotation is the made value's type."""
        ...
else:
    factory = _Factory  # reads like dataclasses.field(default_factory=...)


class Record:
    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kw: object) -> None:
        super().__init_subclass__(**kw)
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            for name in vars(klass).get("__annotations__", {}):
                if not name.startswith("_") and name not in names:
                    names.append(name)
        cls._fields = tuple(names)

    def __init__(self, *args: object, **kw: object) -> None:
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}: too many arguments")
        values = dict(zip(fields, args, strict=False))  # fewer args than fields: the rest by keyword or default
        for name, value in kw.items():
            if name not in fields:
                raise TypeError(f"{type(self).__name__}: unexpected field {name!r}")
            if name in values:
                raise TypeError(f"{type(self).__name__}: {name!r} given twice")
            values[name] = value
        cls = type(self)
        for name in fields:
            if name not in values:
                if not hasattr(cls, name):
                    raise TypeError(f"{cls.__name__}: missing field {name!r}")
                default = getattr(cls, name)
                values[name] = default.make() if isinstance(default, _Factory) else default
        self.__dict__.update(values)

    def _values(self) -> tuple[object, ...]:
        return tuple(self.__dict__[n] for n in self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and type(other) is type(self) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __repr__(self) -> str:
        body = ", ".join(f"{n}={self.__dict__[n]!r}" for n in self._fields)
        return f"{type(self).__name__}({body})"

    def replace(self, **changes: object) -> Self:
        values = {n: self.__dict__[n] for n in self._fields}
        values.update(changes)
        return type(self)(**values)
