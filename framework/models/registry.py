"""Model registry: model families register builder functions; configs name a model by its function."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mindspore.nn as nn

from framework.models.pretrained import HeadPolicy, WeightsFile, load_pretrained, read_weights

_MODELS: dict[str, Callable[..., nn.Cell]] = {}
_SETTABLE = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def register_model(fn: Callable[..., nn.Cell]) -> Callable[..., nn.Cell]:
    """Register a builder under its function name (e.g. ``resnext50_32x4d``); its return annotation names the
    model class, whose keyword parameters are the settings a config may give it."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model '{fn.__name__}' is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def _builder(name: str) -> Callable[..., nn.Cell]:
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}' (model.name); registered models: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(
    name: str, pretrained: str | Path | None = None, pretrained_head: HeadPolicy = "auto", **kwargs: Any
) -> nn.Cell:
    """Build a registered model, e.g. ``create_model('resnext50_32x4d', num_classes=10)``; ``pretrained``: a
    weights file to start from (this project's checkpoint, timm/torch ``.safetensors``/``.pth``, a mindcv
    ``.ckpt``), its classifier re-initialised by ``pretrained_head`` (see ``load_pretrained``). What was loaded
    is in the model's ``pretrained_report``."""
    if pretrained is None:
        return _builder(name)(**kwargs)
    weights = read_weights(pretrained)
    variant = {key: value for key, value in weights_variant(name, weights).items() if key not in kwargs}
    return start_from(weights, pretrained_head, variant, lambda: _builder(name)(**variant, **kwargs))


def start_from(
    weights: WeightsFile, head: HeadPolicy, variant: dict[str, Any], build: Callable[[], nn.Cell]
) -> nn.Cell:
    """``build()`` (the model built with ``variant``, see ``weights_variant``) holding ``weights``; what the
    load did is its ``pretrained_report``."""
    network = build()
    network.pretrained_report = load_pretrained(network, weights, head)
    network.pretrained_report.variant = variant
    return network


def parameter_depth(network: nn.Cell) -> dict[str, tuple[int, int]]:
    """Each parameter's depth as (layer, last layer): the family's ``depth_patterns`` in order (numbers they
    capture order the matches of one pattern), so the stem is layer 0; what no pattern matches (the classifier)
    is the last layer. For layer-wise lr decay (``optimizer.layer_decay``)."""
    patterns = getattr(type(network), "depth_patterns", ())
    keys: dict[str, tuple[int, ...]] = {}
    for param in network.get_parameters():
        for index, pattern in enumerate(patterns):
            found = re.match(pattern, param.name)
            if found:
                keys[param.name] = (index, *(int(g) for g in found.groups() if g and g.isdigit()))
                break
    order = {key: layer for layer, key in enumerate(sorted(set(keys.values())))}
    last = len(order)
    return {p.name: (order[keys[p.name]], last) if p.name in keys else (last, last) for p in network.get_parameters()}


def weights_variant(name: str, weights: WeightsFile) -> dict[str, Any]:
    """The model settings ``weights`` were trained with where the family differs from its twin's (mindcv's
    ResNeXt pools with "same" padding): the model is built so, unless the caller sets them. A checkpoint of this
    project records the settings it was written with (``model_settings``)."""
    if weights.source == "framework":
        return dict(weights.meta.get("model_settings") or {})
    settings = getattr(model_class(name), "pretrained_settings", {}).get(weights.source)  # per model name
    return settings(name) if settings is not None else {}


def _fixed_by(builder: Callable[..., nn.Cell]) -> set[str]:
    """Keywords a builder passes itself (``cardinality=32`` in ``resnext50_32x4d``): not settings of the model."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(builder)))
    return {kw.arg for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords if kw.arg}


def model_class(name: str) -> type:
    """The class a registered builder makes (its return annotation)."""
    return typing.get_type_hints(_builder(name))["return"]


def image_size_problems(name: str, size: int) -> tuple[str | None, str | None]:
    """(why model ``name`` cannot run on ``size`` px images, why it would run poorly), each None when fine.

    Below its ``reduction`` (the input pixels per pixel of its last feature map) a model's last stages see
    less than one pixel: it runs, but on padding more than on the image."""
    cls = model_class(name)
    rule = getattr(cls, "image_size_error", None)
    error = rule(size) if rule is not None else None
    reduction = getattr(cls, "reduction", 1)
    warning = None
    if size < reduction:
        warning = (
            f"downsamples by {reduction}: at {size} px its last stages see less than one pixel of the image "
            f"(it trains, but poorly); {reduction} px or more suits it"
        )
    return error, warning


def model_schema(name: str) -> Callable[..., Any]:
    """A signature-only function standing for ``create_model(name, ...)``: ``name``, the starting weights
    (``pretrained``, ``pretrained_head``) and the model class's keyword parameters with defaults, less those the
    builder sets itself."""
    cls, fixed = model_class(name), _fixed_by(_builder(name))
    hints = typing.get_type_hints(cls.__init__)
    hints["num_classes"] = int | None  # null: the dataset's class count (tasks.common.build_model)
    creation, creation_hints = inspect.signature(create_model).parameters, typing.get_type_hints(create_model)
    params = [
        creation[key].replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=creation_hints[key])
        for key in ("name", "pretrained", "pretrained_head")
    ]
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.kind in _SETTABLE and param.default is not inspect.Parameter.empty and param.name not in fixed:
            params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(param.name, Any)))

    def schema(**kwargs: Any) -> None:
        """Never called: its signature is the model config's schema."""

    schema.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    schema.__annotations__ = {p.name: p.annotation for p in params}
    schema.__qualname__ = f"{cls.__name__} (model.name={name})"
    return schema


# framework.config checks a `model` config against the model it names, not against create_model's **kwargs
create_model.schema_of = lambda node: model_schema(str(node.get("name")))  # type: ignore[attr-defined]
