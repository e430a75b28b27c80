"""Checkpoint files: network weights plus a JSON metadata record, written atomically.

A *training-state* checkpoint (``last.ckpt``, periodic ones) also holds what exact resume needs:
optimizer moments and step (hence the lr position), the loss scale, the EMA weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
from mindspore import Parameter, Tensor

META_KEY = "framework_meta"


def save_checkpoint(weights: nn.Cell | dict[str, Parameter], path: Path, meta: dict[str, Any]) -> Path:
    """Write ``weights`` (a network, or named parameters) and ``meta`` to ``path`` via a temporary file,
    so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.ckpt")  # MindSpore insists on the .ckpt suffix
    if isinstance(weights, dict):
        weights = [{"name": name, "data": value} for name, value in weights.items()]
    ms.save_checkpoint(weights, str(partial), append_dict={META_KEY: json.dumps(meta)})
    os.replace(partial, path)
    return path


def read_checkpoint(path: str | Path, meta_only: bool = False) -> tuple[dict[str, Parameter], dict[str, Any]]:
    """(named parameters, metadata) of a checkpoint file; ``meta_only`` builds no parameters (empty dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        params = ms.load_checkpoint(str(path), choice_func=(lambda name: name == META_KEY) if meta_only else None)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from err
    return params, json.loads(str(params.pop(META_KEY, "{}")))


def load_checkpoint(path: str | Path, network: nn.Cell) -> dict[str, Any]:
    """Load weights from ``path`` into ``network`` (every parameter must match) and return the metadata."""
    params, meta = read_checkpoint(path)
    expected = {p.name: tuple(p.shape) for p in network.get_parameters()}
    found = {name: tuple(p.shape) for name, p in params.items()}
    missing = sorted(set(expected) - set(found))
    mismatched = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    if missing or mismatched:
        details = [f"{len(missing)} parameters missing (e.g. {missing[:3]})"] if missing else []
        details += [f"{n}: checkpoint {found[n]} vs model {expected[n]}" for n in mismatched[:3]]
        trained = f" It was written by model '{meta['model']}'." if "model" in meta else ""
        raise ValueError(
            f"checkpoint {path} does not fit the configured model: {'; '.join(details)}.{trained} "
            "Select the model and dataset (num_classes) it was trained with."
        )
    ms.load_param_into_net(network, {name: params[name] for name in expected}, strict_load=True)
    return meta


def restore_parameters(targets: dict[str, Parameter], params: dict[str, Parameter], path: Path) -> None:
    """Copy the values named in ``targets`` from a checkpoint's ``params``; all must be there, same shapes."""
    missing = sorted(name for name in targets if name not in params)
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks training state {missing[:3]} ({len(missing)} entries): "
            "it was not written by a training run of this configuration (e.g. a best.ckpt)"
        )
    for name, target in targets.items():
        value = params[name]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"checkpoint {path}: {name} has shape {value.shape}, the run expects {target.shape}")
        ops.assign(target, Tensor(value.asnumpy()))  # in place: set_data would detach it from compiled graphs


def weights_sha256(weights: nn.Cell | dict[str, Parameter]) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes (in name order): equal iff the weights are."""
    named = {p.name: p for p in weights.get_parameters()} if isinstance(weights, nn.Cell) else weights
    digest = hashlib.sha256()
    for name in sorted(named):
        value = named[name].asnumpy()
        digest.update(f"{name}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
