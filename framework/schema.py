"""The schema language of the run spec: what a parameter's annotation may say and how a value is checked against it.

A target's signature is the schema of its config group (``framework.config`` reads it): the type
(``int``, ``float``, ``bool``, ``str``, lists, ``| None``), the choices (``Literal['max', 'min']``) and the
range, as ``Annotated`` metadata next to the parameter (``Annotated[int, Positive]``). ``checked`` applies the
same check to a Python call of a target, for code that bypasses the config.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig

_F = TypeVar("_F", bound=Callable[..., Any])


class SchemaError(ValueError):
    """A value does not fit its parameter's annotation; one line naming the key and the fix."""


@dataclass(frozen=True)
class Range:
    """Allowed interval of a number, as ``Annotated`` metadata next to a parameter: ``Annotated[int, Positive]``.

    The schema check (``check_config``) and ``checked`` read it; ``None`` bounds are open-ended."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def __contains__(self, value: float) -> bool:
        if math.isnan(value):
            return False
        above = self.low is None or value > self.low or (value == self.low and self.low_inclusive)
        return above and (self.high is None or value < self.high or (value == self.high and self.high_inclusive))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>=' if self.low_inclusive else '>'} {self.low}"
        if self.low is None:
            return f"{'<=' if self.high_inclusive else '<'} {self.high}"
        opening, closing = "[" if self.low_inclusive else "(", "]" if self.high_inclusive else ")"
        return f"in {opening}{self.low}, {self.high}{closing}"


Positive = Range(0, low_inclusive=False)  # sizes, counts, lr, epochs
NonNegative = Range(0)  # weight decay, warmup, intervals where 0 is off
Fraction = Range(0, 1)  # probabilities: [0, 1]
OpenFraction = Range(0, 1, low_inclusive=False, high_inclusive=False)  # (0, 1): EMA decay, a val split
HalfOpenFraction = Range(0, 1, high_inclusive=False)  # [0, 1): momentum, label smoothing, moment decays


def check_value(key: str, value: Any, expected: Any, where: str | None = None) -> None:
    """Raise a one-line SchemaError unless ``value`` fits the annotation ``expected``: its type (when ``where``
    says which target declares it; Python callers pass numpy numbers and tuples), its ``Literal`` choices and
    the ``Range`` in its ``Annotated`` metadata, also inside ``X | None`` and lists."""
    if where is not None and not _matches(value, expected, exact=False):
        raise SchemaError(
            f"{key}={value!r} has the wrong type: expected {_type_name(expected)} ({where}). "
            f"Fix: {key}=<{_type_name(expected)}>"
        )
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is typing.Annotated:
        check_value(key, value, args[0])
        for bound in args[1:]:
            if isinstance(bound, Range) and _is_number(value) and value not in bound:
                raise SchemaError(f"{key} must be {bound}, got {value}. Fix: {key}=<number {bound}>")
    elif origin is typing.Literal and value not in args:
        choices = [str(arg) for arg in args]
        close = choices if len(choices) == 1 else difflib.get_close_matches(str(value), choices, n=1)
        wanted = repr(args[0]) if len(args) == 1 else f"one of {', '.join(map(repr, args))}"
        fix = close[0] if close else "<one of those>"
        raise SchemaError(f"{key} must be {wanted}, got {value!r}. Fix: {key}={fix}")
    elif origin in (typing.Union, types.UnionType):
        _check_union(key, value, args)
    elif isinstance(value, (list, tuple, ListConfig)) and origin in (list, tuple, Sequence):
        _check_items(key, list(value), args)


def _check_union(key: str, value: Any, arms: tuple[Any, ...]) -> None:
    """Fine if ``value`` fits one arm of the union whose type it has (``None`` of ``X | None``); else the first
    such arm's error."""
    errors = []
    for arm in (arm for arm in arms if _matches(value, arm, exact=False)):
        try:
            return check_value(key, value, arm)
        except SchemaError as err:
            errors.append(err)
    if errors:
        raise errors[0]


def _check_items(key: str, items: list[Any], args: tuple[Any, ...]) -> None:
    """Each item against its annotation (``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``: then exactly 2 items)."""
    if not args:
        return
    if (len(args) == 2 and args[1] is Ellipsis) or len(args) == 1:
        args = (args[0],) * len(items)
    elif len(items) != len(args):
        raise SchemaError(f"{key} must be {len(args)} values, got {items}. Fix: {key}=[<{len(args)} values>]")
    for i, (item, expected) in enumerate(zip(items, args, strict=True)):
        check_value(f"{key}[{i}]", item, expected)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _matches(value: Any, expected: Any, exact: bool = True) -> bool:
    """Whether a config value fits an annotation's type; annotations it cannot judge (classes, Any) accept
    anything. A ``Literal`` asks for one of its values, or (not ``exact``) a value of their type."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is typing.Annotated:
        return _matches(value, args[0], exact)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg, exact) for arg in args)
    if origin is typing.Literal:
        return value in args if exact else any(_matches(value, type(arg)) for arg in args)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or expected in (list, tuple, Sequence):
        return isinstance(value, (list, tuple, ListConfig)) and _items_match(list(value), args, exact)
    if origin in (dict, Mapping) or expected in (dict, Mapping):
        return isinstance(value, (dict, DictConfig))
    return True


def _items_match(items: list[Any], args: tuple[Any, ...], exact: bool) -> bool:
    if (len(args) == 2 and args[1] is Ellipsis) or len(args) == 1:
        return all(_matches(item, args[0], exact) for item in items)
    return not args or (len(items) == len(args) and all(map(_matches, items, args, [exact] * len(items))))


def _type_name(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _type_name(arg) for arg in args)
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in args)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    if expected in names:
        return names[expected]
    if origin is tuple and args and Ellipsis not in args:
        numbers_only = all(_type_name(arg) in ("an integer", "a number") for arg in args)
        return f"a list of {len(args)} {'numbers' if numbers_only else 'values'}"
    if origin in (list, tuple, Sequence):
        return "a list" + (f" of {_type_name(args[0])}" if args else "")
    return getattr(expected, "__name__", str(expected))


def annotation_text(expected: Any) -> str:
    """An annotation as written, less its ``Annotated`` metadata: ``int | None``, ``Literal['max', 'min']``."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is typing.Annotated:
        return annotation_text(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(annotation_text(arg) for arg in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin is not None and args:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if arg is Ellipsis else annotation_text(arg) for arg in args)}]"
    return "None" if expected is type(None) else inspect.formatannotation(expected)


def checked(prefix: str, **keys: str) -> Callable[[_F], _F]:
    """Decorate a target also called from Python, bypassing the config: each call's arguments are checked
    against the ``Literal`` choices and ``Range``s annotated on its parameters, as ``check_config`` checks
    config values, and errors name ``<prefix>.<parameter>`` (``keys`` maps a parameter to its config key)."""

    def decorate(function: _F) -> _F:
        signature, hints = inspect.signature(function), {}

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not hints:  # on the first call: annotations may name what is defined after the function
                hints.update(typing.get_type_hints(function, include_extras=True))
            for name, value in signature.bind(*args, **kwargs).arguments.items():
                if name in hints:
                    check_value(f"{prefix}.{keys.get(name, name)}", value, hints[name])
            return function(*args, **kwargs)

        return typing.cast(_F, wrapper)

    return decorate
