"""Checks on the composed run spec, made before any work starts, and helpers to read it.

The schema of each config group is the signature of its ``_target_``: every key must be a parameter,
every value must have the parameter's annotated type (``int``, ``float``, ``bool``, ``str``, ``Literal``,
lists, ``| None``), and the ranges below must hold. Only targets under ``framework.`` and ``mindspore.``,
and those listed in ``allowed_targets``, are imported at all: a config cannot run ``os.system``.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
_VARIADIC = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)

ALLOWED_TARGET_PREFIXES = ("framework.", "mindspore.")

# Ranges of values wherever the composed config has them: (lowest, highest, lowest allowed itself).
_POSITIVE, _NON_NEGATIVE, _FRACTION, _OPEN_FRACTION = (0, None, False), (0, None, True), (0, 1, True), (0, 1, False)
RANGES = {
    "seed": (0, 2**32, True),  # what MindSpore, NumPy and the data pipeline take
    "dataset.batch_size": _POSITIVE,
    "dataset.eval_batch_size": _POSITIVE,
    "dataset.image_size": _POSITIVE,
    "scheduler.lr": _POSITIVE,
    "scheduler.warmup_epochs": _NON_NEGATIVE,
    "optimizer.weight_decay": _NON_NEGATIVE,
    "optimizer.momentum": _FRACTION,
    "loss.label_smoothing": _FRACTION,
    "engine.epochs": _POSITIVE,
    "engine.eval_every_n_epochs": _POSITIVE,
    "engine.keep_checkpoint_max": _POSITIVE,
    "engine.checkpoint_every_n_epochs": _NON_NEGATIVE,
    "engine.checkpoint_every_n_steps": _NON_NEGATIVE,
    "engine.accumulation_steps": _POSITIVE,
    "engine.max_nonfinite_steps": _POSITIVE,
    "engine.clip_grad_norm": _POSITIVE,
    "engine.ema_decay": _OPEN_FRACTION,
    "engine.loss_scale_value": _POSITIVE,
    "engine.early_stopping.patience": _POSITIVE,
    "engine.early_stopping.min_delta": _NON_NEGATIVE,
}
# Keys of config.yaml itself; any other top-level key added with +key=... has no reader.
TOP_LEVEL_KEYS = ("seed", "ckpt", "resume", "run_dir", "allowed_targets")


class ConfigError(ValueError):
    """The run spec is wrong; the message names the key and how to fix it."""


def check_config(cfg: DictConfig) -> None:
    """Fail fast on required values left unset, targets outside the allowlist, keys a target does not take,
    values of the wrong type or out of range, and top-level keys nothing reads."""
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra."))
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: required but not set (??? in conf/{missing[0].split('.')[0]}/). "
            f"Fix: add {missing[0]}=<value> to the command line"
        )
    for override in overrides():
        key = override.lstrip("+~").split("=", 1)[0]
        if override.startswith("+") and "." not in key and key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"unknown top-level key '{key}' ({override}): nothing reads it. Top-level keys: "
                f"{', '.join(TOP_LEVEL_KEYS)}; settings belong to a group (e.g. engine.epochs=3)"
            )
    if "seed" in cfg:
        _check_type("seed", cfg.seed, int, "config.yaml")
    for key in ("ckpt", "resume", "run_dir"):
        _check_type(key, cfg.get(key), str | None, "config.yaml")
    allowed = allowed_targets(cfg)
    targets = list(_target_nodes(cfg))
    for path, node in targets:  # first of all: nothing outside the allowlist is even imported
        check_target(path, node._target_, allowed)
    for path, node in targets:
        _check_keys(path, node, allowed)
    for key, (low, high, low_included) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}. Fix: {key}=<number>")
        if value < low or (value == low and not low_included) or (high is not None and value >= high):
            if high is not None:
                expected = f"in {'[' if low_included else '('}{low}, {high})"
            else:
                expected = f">= {low}" if low_included else f"> {low}"
            raise ConfigError(f"{key} must be {expected}, got {value}. Fix: {key}=<number {expected}>")


def allowed_targets(cfg: DictConfig) -> tuple[str, ...]:
    """Target names (or module prefixes ending in '.') that may be instantiated: ours, MindSpore's, the listed."""
    extra = cfg.get("allowed_targets") or []
    if not isinstance(extra, (list, ListConfig)) or not all(isinstance(name, str) for name in extra):
        raise ConfigError(f"allowed_targets must be a list of names, got {extra!r}. Fix: allowed_targets=[pkg.Class]")
    return (*ALLOWED_TARGET_PREFIXES, *extra)


def check_target(path: str, target: Any, allowed: tuple[str, ...]) -> None:
    """Refuse a ``_target_`` outside the allowlist, before anything is imported."""
    name = str(target)
    if not any(name == entry or (entry.endswith(".") and name.startswith(entry)) for entry in allowed):
        raise ConfigError(
            f"{path}._target_={name!r} is not allowed: only framework.*, mindspore.* and the names in "
            f"allowed_targets are instantiated. If you trust it, add allowed_targets=[{name}]"
        )


def build(cfg: DictConfig, group: str, **runtime_args: Any) -> Any:
    """Instantiate ``cfg[group]`` with arguments known only at run time (model params, steps per epoch...).

    A failure inside the target (a bad value or key) becomes a ConfigError naming the group.
    """
    allowed = allowed_targets(cfg)
    for path, node in _target_nodes(cfg[group], group):
        check_target(path, node._target_, allowed)
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


def _check_keys(path: str, node: DictConfig, allowed: tuple[str, ...]) -> None:
    target = node._target_
    check_target(path, target, allowed)
    try:
        obj = get_object(target)
    except Exception as err:
        raise ConfigError(f"{path}._target_: cannot import '{target}' ({err})") from err
    schema_of = getattr(obj, "schema_of", None)  # a factory whose keys depend on what it builds (create_model)
    if schema_of is not None:
        try:
            obj = schema_of(node)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    accepted = _accepted_keys(obj)
    if accepted is None:
        return
    hints = _type_hints(obj)
    for key in node:
        if key in _HYDRA_KEYS:
            continue
        if key in accepted:
            child = node._get_node(key)
            if key in hints and not (isinstance(child, DictConfig) and "_target_" in child):
                annotation = inspect.formatannotation(hints[key])
                _check_type(f"{path}.{key}", node[key], hints[key], f"{target} takes {key}: {annotation}")
            continue
        close = difflib.get_close_matches(str(key), accepted, n=1)
        hint = f"Did you mean '{path}.{close[0]}'? " if close else ""
        raise ConfigError(
            f"unknown key '{path}.{key}': {target} takes {', '.join(accepted)}. {hint}"
            f"Fix the override or remove the key from conf/{path.split('.')[0]}/."
        )


def _type_hints(obj: Any) -> dict[str, Any]:
    """Annotated parameter types of ``obj`` (a class's ``__init__`` and its bases'); empty when unreadable."""
    hints: dict[str, Any] = {}
    for owner in reversed(inspect.getmro(obj)) if inspect.isclass(obj) else (obj,):
        function = owner.__init__ if inspect.isclass(owner) else owner
        try:
            hints.update(typing.get_type_hints(function))
        except Exception:  # annotations naming what cannot be imported here: no type check for them
            continue
    hints.pop("return", None)
    return hints


def _check_type(key: str, value: Any, expected: Any, where: str) -> None:
    if not _matches(value, expected):
        raise ConfigError(
            f"{key}={value!r} has the wrong type: expected {_type_name(expected)} ({where}). "
            f"Fix: {key}=<{_type_name(expected)}>"
        )


def _matches(value: Any, expected: Any) -> bool:
    """Whether a config value fits an annotation; annotations it cannot judge (classes, Any) accept anything."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
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
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        item_types = {arg for arg in args if arg is not Ellipsis}
        return len(item_types) != 1 or all(_matches(item, next(iter(item_types))) for item in value)
    if origin in (dict, Mapping) or expected in (dict, Mapping):
        return isinstance(value, (dict, DictConfig))
    return True


def _type_name(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _type_name(arg) for arg in args)
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in args)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    if expected in names:
        return names[expected]
    if origin in (list, tuple, Sequence):
        return "a list" + (f" of {_type_name(args[0])}" if args else "")
    return getattr(expected, "__name__", str(expected))


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


_OTHER_CONFIG_FLAGS = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")


def command_line_problem(argv: Sequence[str], conf_dir: Path) -> str | None:
    """What is wrong with the command line's overrides, in one line, found by composing them as Hydra will;
    Hydra itself prints several lines and exits 1. A mistyped group or key gets the name it was likely meant to
    be (``optimzer=adamw``, ``engine.epoch=3``); a missing choice the list of choices. A sweep (``-m``) is
    composed at its first value. None when the command line composes (or names another config)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException

    if any(arg.split("=")[0] in _OTHER_CONFIG_FLAGS for arg in argv):
        return None
    parser, given, composed = OverridesParser.create(), {}, {}  # key → the argument as typed / as composed
    for arg in (arg for arg in argv if "=" in arg and not arg.startswith("-")):
        try:
            override = parser.parse_override(arg)
        except HydraException as err:  # the grammar's parse errors
            return f"cannot read the override {arg!r}: {str(err).splitlines()[0]} (Hydra's override grammar)"
        key = override.get_key_element().lstrip("+~")
        given[key], composed[key] = arg, _first_value(override, arg)
    with initialize_config_dir(str(conf_dir.resolve()), version_base="1.3"):
        try:
            compose("config", overrides=list(composed.values()))
        except MissingConfigException as err:
            group, choice = str(err.missing_cfg_file).rsplit("/", 1)
            return (
                f"{group}={choice}: no such choice in config group '{group}'; choices: {', '.join(err.options or [])}"
            )
        except ConfigCompositionException as err:
            message = str(err)
            if not message.startswith("Could not override '"):
                return " ".join(message.split())
            key = message.split("'")[1]
            composed.pop(key)
            return _unknown_key(key, given[key], compose("config", overrides=list(composed.values())))
    return None


def _first_value(override: Any, arg: str) -> str:
    """``arg`` with a sweep's first value (``lr=0.1,0.2`` → ``lr=0.1``); an interval keeps only its key."""
    if not override.is_sweep_override():
        return arg
    values = list(override.sweep_string_iterator()) if override.is_discrete_sweep() else ["null"]
    return f"{override.get_key_element()}={values[0]}" if values else arg


def _unknown_key(key: str, arg: str, cfg: DictConfig) -> str:
    """One line for an override of a key the composed config does not have, with the likely intended key."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    known = sorted(map(str, node.keys())) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.75)
    if close:
        fixed = f"{parent}.{close[0]}" if parent else close[0]
        return f"unknown config group or key '{key}' ({arg}). Did you mean '{fixed}'? Fix: {arg.replace(key, fixed, 1)}"
    where = f"'{parent}' has" if parent else "the config's top level has"
    return f"unknown config group or key '{key}' ({arg}): {where} {', '.join(known)}. Fix: one of those keys"


def overrides() -> list[str]:
    """The command-line overrides of this run, as Hydra recorded them."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
