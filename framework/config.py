"""Checks on the composed run spec, made before any work starts, and helpers to read it.

The schema of each config group is the signature of its ``_target_``: every key must be a parameter,
every value must have the parameter's annotated type (``int``, ``float``, ``bool``, ``str``, ``Literal``,
lists, ``| None``), be one of its ``Literal`` choices and in the ``Range`` annotated next to it
(``Annotated[int, Positive]``). Only targets under ``framework.`` and ``mindspore.``,
and those listed in ``allowed_targets``, are imported at all: a config cannot run ``os.system``.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from framework.errors import UserError
from framework.schema import Range, SchemaError, annotation_text, check_value

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
_VARIADIC = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)

ALLOWED_TARGET_PREFIXES = ("framework.", "mindspore.")

# The top level of config.yaml, the one schema that is no target's signature; allowed_targets is checked apart.
TOP_LEVEL: dict[str, Any] = {
    "seed": Annotated[int, Range(0, 2**32, high_inclusive=False)],  # what MindSpore, NumPy and the pipeline take
    "ckpt": str | None,
    "resume": str | None,
    "run_dir": str | None,
}
# Keys of config.yaml itself; any other top-level key added with +key=... has no reader.
TOP_LEVEL_KEYS = (*TOP_LEVEL, "allowed_targets")


class ConfigError(UserError, ValueError):
    """The run spec is wrong; the message names the key and how to fix it."""

    kind, exit_status = "config error", 2


def check_config(cfg: DictConfig) -> None:
    """Fail fast on required values left unset, targets outside the allowlist, keys a target does not take,
    values of the wrong type, out of their range or not one of their choices, and top-level keys nothing reads.

    Values set in the config are checked before interpolations of them (``${loss.label_smoothing}``), so an
    error names the key to fix."""
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
    for key, expected in TOP_LEVEL.items():
        if key in cfg:
            _check_value(key, cfg[key], expected, "config.yaml")
    allowed = allowed_targets(cfg)
    targets = list(_target_nodes(cfg))
    for path, node in targets:  # first of all: nothing outside the allowlist is even imported
        check_target(path, node._target_, allowed)
    values = [value for path, node in targets for value in _check_keys(path, node, allowed)]
    for key, value, expected, where, _ in sorted(values, key=lambda item: item[-1]):  # interpolations last
        _check_value(key, value, expected, where)


def _check_value(key: str, value: Any, expected: Any, where: str) -> None:
    try:
        check_value(key, value, expected, where)
    except SchemaError as err:
        raise ConfigError(str(err)) from None


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


def _check_keys(path: str, node: DictConfig, allowed: tuple[str, ...]) -> list[tuple[str, Any, Any, str, bool]]:
    """Refuse keys the target does not take; the values to check against its annotations, as (key, value,
    annotation, where it is declared, whether the value is an interpolation)."""
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
        return []
    hints, values = _type_hints(obj), []
    for key in node:
        if key in _HYDRA_KEYS:
            continue
        if key in accepted:
            child = node._get_node(key)
            if key in hints and not (isinstance(child, DictConfig) and "_target_" in child):
                where = f"{target} takes {key}: {annotation_text(hints[key])}"
                values.append((f"{path}.{key}", node[key], hints[key], where, child._is_interpolation()))
            continue
        close = difflib.get_close_matches(str(key), accepted, n=1)
        hint = f"Did you mean '{path}.{close[0]}'? " if close else ""
        raise ConfigError(
            f"unknown key '{path}.{key}': {target} takes {', '.join(accepted)}. {hint}"
            f"Fix the override or remove the key from conf/{path.split('.')[0]}/."
        )
    return values


def _type_hints(obj: Any) -> dict[str, Any]:
    """Annotated parameter types of ``obj`` (a class's ``__init__`` and its bases'), ``Annotated`` metadata kept;
    empty when unreadable."""
    hints: dict[str, Any] = {}
    for owner in reversed(inspect.getmro(obj)) if inspect.isclass(obj) else (obj,):
        function = owner.__init__ if inspect.isclass(owner) else owner
        try:
            hints.update(typing.get_type_hints(function, include_extras=True))
        except Exception:  # annotations naming what cannot be imported here: no type check for them
            continue
    hints.pop("return", None)
    return hints


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
    """One line for an override of a key the composed config does not have: its first missing part, with the
    likely intended key or the keys its parent has (``trainer.epochs``: ``trainer`` is the unknown part)."""
    parts = key.split(".")
    depth = 0
    while depth < len(parts) - 1 and isinstance(OmegaConf.select(cfg, ".".join(parts[: depth + 1])), DictConfig):
        depth += 1
    parent, missing = ".".join(parts[:depth]), ".".join(parts[: depth + 1])
    node = OmegaConf.select(cfg, parent) if parent else cfg
    known = sorted(map(str, node.keys())) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(parts[depth], known, n=1, cutoff=0.75)
    if close:
        fixed = f"{parent}.{close[0]}" if parent else close[0]
        fix = arg.replace(missing, fixed, 1)
        return f"unknown config group or key '{missing}' ({arg}). Did you mean '{fixed}'? Fix: {fix}"
    where = f"'{parent}' has" if parent else "the config's top level has"
    return f"unknown config group or key '{missing}' ({arg}): {where} {', '.join(known)}. Fix: one of those keys"


def overrides() -> list[str]:
    """The command-line overrides of this run, as Hydra recorded them."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
