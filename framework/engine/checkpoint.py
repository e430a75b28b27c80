"""Checkpoint files: network weights plus a JSON metadata record, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mindspore as ms
import mindspore.nn as nn

META_KEY = "framework_meta"


def save_checkpoint(network: nn.Cell, path: Path, meta: dict[str, Any]) -> Path:
    """Write ``network`` and ``meta`` to ``path`` via a temporary file, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.ckpt")  # MindSpore insists on the .ckpt suffix
    ms.save_checkpoint(network, str(partial), append_dict={META_KEY: json.dumps(meta)})
    os.replace(partial, path)
    return path


def load_checkpoint(path: str | Path, network: nn.Cell) -> dict[str, Any]:
    """Load weights from ``path`` into ``network`` (every parameter must match) and return the metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        params = ms.load_checkpoint(str(path))
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from err
    meta = json.loads(params.pop(META_KEY, "{}"))
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
    ms.load_param_into_net(network, params, strict_load=True)
    return meta
