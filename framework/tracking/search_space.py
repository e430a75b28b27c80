"""A search space written in Hydra's override grammar, as Optuna distributions, and back to overrides.

``key=choice(a,b)`` or ``key=a,b`` → categorical; ``key=range(start,stop,step)`` → integers (or floats) on
that grid, ``stop`` excluded as in Python; ``key=interval(low,high)`` → uniform floats (``int(interval(...))``
→ integers); ``tag(log, interval(...))`` → log-uniform; ``shuffle(range(...))`` → categorical. Any other
override is fixed: every trial gets it unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from framework.config import ConfigError

_PLAIN = re.compile(r"[\w./:+-]*")  # override values that need no quoting


@dataclass
class SearchSpace:
    """Distributions by key, the override text of each categorical choice, and the fixed overrides."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    choice_text: dict[str, list[str]] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """The overrides of one trial: the fixed ones, then each sampled value."""
        return [*self.fixed, *self.sampled(params)]

    def sampled(self, params: dict[str, Any]) -> list[str]:
        """Each sampled value of one trial as an override."""
        sampled = []
        for key, value in params.items():
            if key in self.choice_text:
                choices = self.distributions[key].choices  # type: ignore[attr-defined]
                text = self.choice_text[key][choices.index(value)]
            else:
                text = repr(value) if isinstance(value, float) else str(value)
            sampled.append(f"{key}={text}")
        return sampled

    def grid(self) -> dict[str, list[Any]]:
        """Every value of every key, for Optuna's grid sampler; continuous intervals have no grid."""
        values = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                values[key] = list(dist.choices)
            elif dist.step is None:  # type: ignore[attr-defined]
                raise ConfigError(
                    f"the grid sampler needs a finite set of values, but {key} is a continuous interval. "
                    f"Write {key}=choice(...) or {key}=range(...), or choose another hydra/sweeper/sampler"
                )
            else:
                values[key] = _grid_points(dist)
        return values


def parse_search_space(overrides: list[str]) -> SearchSpace:
    """Split ``overrides`` (sweeper params first, then the command line's) into distributions and fixed ones;
    a later override of the same key wins."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        raise ConfigError(f"cannot read the search space: {str(err).splitlines()[0]}") from err
    space = SearchSpace()
    by_key: dict[str, Override] = {o.get_key_element(): o for o in parsed}
    for key, override in by_key.items():
        if not override.is_sweep_override():
            space.fixed.append(override.input_line)
            continue
        space.distributions[key] = _distribution(override)
        if isinstance(space.distributions[key], CategoricalDistribution):
            space.choice_text[key] = list(override.sweep_string_iterator())
    if not space.distributions:
        raise ConfigError(
            "the Optuna sweep has nothing to search: set hydra.sweeper.params or give a sweep on the command "
            "line, e.g. scheduler.lr=tag(log,interval(0.001,0.1))"
        )
    return space


def _distribution(override: Override) -> BaseDistribution:
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        value.shuffle = False  # the order of a categorical does not matter, and the value texts must keep it
        choices = list(override.sweep_iterator())
        if not all(isinstance(c, (str, int, float, bool)) for c in choices):  # lists, dicts: stored as their text
            choices = list(override.sweep_string_iterator())
        return CategoricalDistribution(choices)
    if override.is_range_sweep():
        start, stop, step = (Decimal(str(v)) for v in (value.start, value.stop, value.step))
        count = max(math.ceil((stop - start) / step), 0)  # in decimal: range(0.01,0.1,0.01) is 9 values, not 10
        if count == 0:
            raise ConfigError(f"{override.input_line} holds no value")
        low, high = sorted((start, start + step * (count - 1)))  # a negative step counts down
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(int(low), int(high), step=abs(value.step))
        return FloatDistribution(float(low), float(high), step=float(abs(step)))
    if override.is_interval_sweep():
        log = "log" in value.tags
        if value.start >= value.end or (log and value.start <= 0):
            raise ConfigError(f"{override.input_line} is empty (or not positive for a log scale)")
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ConfigError(f"{override.input_line} is a sweep the Optuna sweeper does not know")


def _grid_points(dist: IntDistribution | FloatDistribution) -> list[Any]:
    count = int(round((dist.high - dist.low) / dist.step)) + 1
    if isinstance(dist, IntDistribution):
        return [dist.low + i * dist.step for i in range(count)]
    low, step = Decimal(str(dist.low)), Decimal(str(dist.step))  # 0.1 + 2 * 0.1 is 0.3, not 0.30000000000000004
    return [float(low + i * step) for i in range(count)]


def quote(value: str) -> str:
    """``value`` as an override value that Hydra reads back unchanged."""
    if _PLAIN.fullmatch(value):
        return value
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'").replace("${", "\\${")
    return f"'{escaped}'"
