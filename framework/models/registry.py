"""Model registry: model families register builder functions; configs name a model by its function."""

from __future__ import annotations

from typing import Callable

import mindspore.nn as nn

_MODELS: dict[str, Callable[..., nn.Cell]] = {}


def register_model(fn: Callable[..., nn.Cell]) -> Callable[..., nn.Cell]:
    """Register a builder under its function name (e.g. ``resnext50_32x4d``)."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model '{fn.__name__}' is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Cell:
    """Build a registered model, e.g. ``create_model('resnext50_32x4d', num_classes=10)``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}' (model.name); registered models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
