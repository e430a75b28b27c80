"""Checks on the composed run spec, made before any work starts, and helpers to read it."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
_VARIADIC = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)

# Values that must be strictly positive wherever the composed config has them.
POSITIVE_KEYS = (
    "dataset.batch_size",
    "dataset.eval_batch_size",
    "dataset.image_size",
    "scheduler.lr",
    "engine.epochs",
    "engine.eval_every_n_epochs",
    "engine.keep_checkpoint_max",
)


class ConfigError(ValueError):
    """The run spec is wrong; the message names the key and how to fix it."""


def check_config(cfg: DictConfig) -> None:
    """Fail fast on required values left unset, unknown keys under a ``_target_`` and non-positive sizes/lrs/epochs."""
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra."))
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: required but not set (??? in conf/{missing[0].split('.')[0]}/). "
            f"Fix: add {missing[0]}=<value> to the command line"
        )
    for path, node in _target_nodes(cfg):
        _check_keys(path, node)
    for key in POSITIVE_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}. Fix: {key}=<positive number>")
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}. Fix: {key}=<positive number>")


def build(cfg: DictConfig, group: str, **runtime_args: Any) -> Any:
    """Instantiate ``cfg[group]`` with arguments known only at run time (model params, steps per epoch...).

    A failure inside the target (a bad value or key) becomes a ConfigError naming the group.
    """
    try:
        return instantiate(cfg[group], **runtime_args)
    except InstantiationException as err:
        cause = err.__cause__ or err
        target = cfg[group]._target_
        raise ConfigError(f"{group} ({target}): {cause}. Fix the value in conf/{group}/ or the override") from err


def _target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            if key != "hydra":
                yield from _target_nodes(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _target_nodes(item, f"{path}[{i}]")


def _check_keys(path: str, node: DictConfig) -> None:
    target = node._target_
    try:
        obj = get_object(target)
    except Exception as err:
        raise ConfigError(f"{path}._target_: cannot import '{target}' ({err})") from err
    accepted = _accepted_keys(obj)
    if accepted is None:
        return
    for key in node:
        if key in _HYDRA_KEYS or key in accepted:
            continue
        close = difflib.get_close_matches(str(key), accepted, n=1)
        hint = f"Did you mean '{path}.{close[0]}'? " if close else ""
        raise ConfigError(
            f"unknown key '{path}.{key}': {target} takes {', '.join(accepted)}. {hint}"
            f"Fix the override or remove the key from conf/{path.split('.')[0]}/."
        )


def _accepted_keys(obj: Any) -> list[str] | None:
    """Keyword names ``obj`` accepts; None when it takes arbitrary keywords.

    A class whose ``__init__`` forwards ``**kwargs`` to its base (``super().__init__(**kwargs)``)
    accepts the base's names too, so subclasses need not repeat a long shared signature.
    """
    accepted: list[str] = []
    for owner in inspect.getmro(obj) if inspect.isclass(obj) else (obj,):
        try:
            params = _signature(owner).parameters
        except (TypeError, ValueError):
            return None
        accepted += [name for name, p in params.items() if name != "self" and p.kind not in _VARIADIC]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return accepted
        if owner is object or not inspect.isclass(obj):
            return None
    return None


def _signature(obj: Any) -> inspect.Signature:
    """Signature of ``obj``, looking through decorators that hide it behind ``(*args, **kwargs)``.

    MindSpore wraps optimizer ``__init__`` methods this way without ``functools.wraps``; the
    original function is then the one of the same name in the wrapper's closure.
    """
    signature = inspect.signature(obj)
    if set(signature.parameters) != {"args", "kwargs"}:
        return signature
    function, name = (obj.__init__, "__init__") if inspect.isclass(obj) else (obj, obj.__name__)
    for cell in getattr(function, "__closure__", None) or ():
        inner = cell.cell_contents
        if inspect.isfunction(inner) and inner.__name__ == name:
            params = list(inspect.signature(inner).parameters.values())
            return inspect.Signature(params[1:] if inspect.isclass(obj) else params)
    return signature


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as dotted keys (``optimizer.momentum``) for MLflow params; lists stay one value."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def group_choices() -> dict[str, str]:
    """Chosen option of each config group (``{'model': 'resnext50', ...}``) when Hydra composed the run."""
    if not HydraConfig.initialized():
        return {}
    return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None and "hydra" not in k}


def overrides() -> list[str]:
    """The command-line overrides of this run, as Hydra recorded them."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
