"""Checkpoint files: network weights plus a JSON metadata record, written atomically, with a checksum.

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

from framework.models.pretrained import META_KEY

CHECKSUM_KEY = "weights_sha256"  # in the metadata: SHA-256 of the weights saved with it
# In the metadata: micro-batches trained when the file was written (the optimizer has made micro_step /
# accumulation_steps updates). Files written before this name call it "global_step"; they are read the same.
MICRO_STEP = "micro_step"
_OLD_MICRO_STEP = "global_step"


def save_checkpoint(weights: nn.Cell | dict[str, Parameter], path: Path, meta: dict[str, Any]) -> Path:
    """Write ``weights`` (a network, or named parameters) and ``meta`` to ``path`` atomically and durably.

    The file is written under a temporary name, flushed to disk, then renamed over ``path`` (and the folder
    entry flushed), so a crash leaves the old file or the new one, never half of one. ``meta`` records a
    SHA-256 of the weights, which ``read_checkpoint`` checks: damage inside the tensor bytes is caught too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.ckpt")  # MindSpore insists on the .ckpt suffix
    named = named_parameters(weights)
    meta = {**meta, CHECKSUM_KEY: weights_sha256(named)}
    entries = [{"name": name, "data": value} for name, value in named.items()]
    ms.save_checkpoint(entries, str(partial), append_dict={META_KEY: json.dumps(meta)})
    _fsync(partial)
    os.replace(partial, path)
    _fsync(path.parent)
    return path


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_checkpoint(path: str | Path, meta_only: bool = False) -> tuple[dict[str, Parameter], dict[str, Any]]:
    """(named parameters, metadata) of a checkpoint file; ``meta_only`` builds no parameters (empty dict).

    A file that cannot be parsed (e.g. truncated) or whose weights differ from the checksum written with them
    raises ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        params = ms.load_checkpoint(str(path), choice_func=(lambda name: name == META_KEY) if meta_only else None)
        meta = json.loads(str(params.pop(META_KEY, "{}")))
    except (RuntimeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from err
    checksum = meta.pop(CHECKSUM_KEY, None)  # callers get back the metadata they wrote
    if _OLD_MICRO_STEP in meta:
        meta.setdefault(MICRO_STEP, meta.pop(_OLD_MICRO_STEP))
    if not meta_only and checksum is not None and weights_sha256(params) != checksum:
        raise ValueError(
            f"checkpoint {path} is corrupt: its weights do not match the SHA-256 written with them. "
            "Use another checkpoint of the run (a periodic one, or best.ckpt)"
        )
    return params, meta


def is_training_state(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's metadata belongs to a training-state file (resumable), not weights only."""
    return MICRO_STEP in meta and "rng_state" in meta


def checkpoint_micro_step(meta: dict[str, Any]) -> int:
    """The micro-step a training-state checkpoint (its metadata as read) was written at."""
    return int(meta[MICRO_STEP])


def read_micro_step(path: Path) -> int:
    """The micro-step of the training-state checkpoint at ``path``, from its metadata alone."""
    return checkpoint_micro_step(read_checkpoint(path, meta_only=True)[1])


def latest_training_state(
    directory: Path,
) -> tuple[Path | None, tuple[dict[str, Parameter], dict[str, Any]] | None, list[str]]:
    """The newest intact training-state checkpoint in ``directory`` (most optimizer steps; ``last.ckpt`` first
    among equals), its (tensors, metadata) as read, and why each newer file was passed over (unreadable, or
    weights failing their checksum)."""
    found, problems = [], []
    for path in Path(directory).glob("*.ckpt"):
        if path.name.startswith("."):  # an unfinished write
            continue
        try:
            _, meta = read_checkpoint(path, meta_only=True)
        except ValueError as err:
            problems.append(str(err))
            continue
        if is_training_state(meta):
            found.append((checkpoint_micro_step(meta), path.name == "last.ckpt", path))
    for _, _, path in sorted(found, reverse=True):
        try:
            content = read_checkpoint(path)  # reads every tensor, checks the checksum
        except ValueError as err:
            problems.append(str(err))
            continue
        return path, content, problems
    return None, None, problems


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


def restore_parameters(targets: dict[str, Parameter], params: dict[str, Parameter]) -> None:
    """Copy the values named in ``targets`` from a checkpoint's ``params`` (checked to fit beforehand)."""
    for name, target in targets.items():
        ops.assign(target, Tensor(params[name].asnumpy()))  # in place: set_data would detach it from compiled graphs


def named_parameters(weights: nn.Cell | dict[str, Parameter]) -> dict[str, Parameter]:
    """A network's parameters by name; a dict of named parameters as it is."""
    return {p.name: p for p in weights.get_parameters()} if isinstance(weights, nn.Cell) else weights


def weights_sha256(weights: nn.Cell | dict[str, Parameter]) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes (in name order): equal iff the weights are."""
    named = named_parameters(weights)
    digest = hashlib.sha256()
    for name in sorted(named):
        value = named[name].asnumpy()
        digest.update(f"{name}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
