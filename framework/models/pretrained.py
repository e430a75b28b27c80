"""Starting weights for a model (``model.pretrained``, ``create_model(name, pretrained=...)``).

Read as data, never as code: this project's checkpoints (weights or a training state), timm/torchvision weights
(``.safetensors`` through safetensors' NumPy API, no torch needed; ``.pth``/``.pt``/``.bin`` through
``torch.load(weights_only=True)``) and mindcv's MindSpore checkpoints. Each family maps the names of its twins in
one table next to its model code (``<Model>.weight_names``: regex renames per source); PyTorch's norm tensor names
(weight, bias, running_mean, running_var) become MindSpore's (gamma, beta, moving_mean, moving_variance) wherever
the model has a norm layer. Every tensor is accounted for: loaded, a classifier re-initialised for another class
count, or bookkeeping (PyTorch's ``num_batches_tracked``, a training state's optimizer). Anything else stops the
load with one line naming the first tensor at fault.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import mindspore as ms
import mindspore.nn as nn
import numpy as np

META_KEY = "framework_meta"  # this project's checkpoints keep their JSON record under this name (engine.checkpoint)
HeadPolicy = Literal["auto", "keep", "reset"]
TORCH_FILES = (".pth", ".pt", ".bin")
_TORCH_NORM = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
_BOOKKEEPING = "num_batches_tracked"  # PyTorch BatchNorm's update counter: no weight


class PretrainedError(ValueError):
    """Weights that cannot start this model: the message is one line, naming the first tensor at fault."""


@dataclass
class WeightsFile:
    """A weights file as read: its tensors by name, where they come from, and a training state's metadata."""

    path: Path
    tensors: dict[str, np.ndarray]
    source: Literal["framework", "torch", "mindcv"]
    meta: dict = field(default_factory=dict)

    @property
    def described(self) -> str:
        kind = {"framework": "checkpoint", "torch": "timm/torch weights", "mindcv": "mindcv checkpoint"}[self.source]
        return f"{kind} {self.path.name}"


@dataclass
class LoadReport:
    """What a load did, as the one-line summary a run logs."""

    loaded: int
    source: str
    head: tuple[int, int] | None = None  # (classes in the file, classes of the model) when re-initialised
    ignored: dict[str, int] = field(default_factory=dict)  # kind of tensor → count
    initialised: dict[str, int] = field(default_factory=dict)  # part the source's model lacks → its tensors
    variant: dict = field(default_factory=dict)  # model settings taken from the source (registry.weights_variant)

    def line(self) -> str:
        source = self.source + (f" (built as its source: {_settings(self.variant)})" if self.variant else "")
        head = f"head re-initialised: {self.head[0]} → {self.head[1]} classes" if self.head else "head loaded"
        ignored = ", ".join(f"{count} {kind}" for kind, count in self.ignored.items()) or "none"
        absent = "".join(f"; {part} initialised: not in the file ({n} tensors)" for part, n in self.initialised.items())
        return f"loaded {self.loaded} tensors from {source}; {head}{absent}; ignored: {ignored}"


def _settings(values: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())


def read_weights(path: str | Path) -> WeightsFile:
    """The tensors of a weights file by its suffix (.safetensors, .pth/.pt/.bin, .ckpt)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return WeightsFile(path, dict(load_file(str(path))), "torch")
    if suffix in TORCH_FILES:
        return WeightsFile(path, _read_torch(path), "torch")
    if suffix == ".ckpt":
        params = ms.load_checkpoint(str(path))
        meta = params.pop(META_KEY, None)
        tensors = {name: p.asnumpy() for name, p in params.items()}
        if meta is None:
            return WeightsFile(path, tensors, "mindcv")
        return WeightsFile(path, tensors, "framework", json.loads(str(meta)))
    raise PretrainedError(f"{path.name}: unknown weights format '{suffix}'; give .safetensors, .pth/.pt/.bin or .ckpt")


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict, unpickled with ``weights_only=True`` (tensors and plain containers only)."""
    try:
        import torch
    except ImportError as err:
        raise PretrainedError(
            f"{path.name} is a PyTorch file: reading it needs torch (pip install torch), or convert it to "
            ".safetensors, which needs nothing"
        ) from err
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):  # training scripts' wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {name: value.detach().float().numpy() for name, value in state.items() if hasattr(value, "detach")}


def load_pretrained(network: nn.Cell, weights: WeightsFile | str | Path, head: HeadPolicy = "auto") -> LoadReport:
    """Load ``weights`` (a file, or one as read) into ``network`` (mapped by its family's table); the classifier is
    re-initialised when its class count differs or the file has none (``head="auto"``), always (``"reset"``) or
    never (``"keep"``: another class count is an error). Parts the source's model lacks (the family's
    ``absent_parts``: mindcv's NASNet has no aux head) keep the model's initialisation."""
    weights = weights if isinstance(weights, WeightsFile) else read_weights(weights)
    targets = {p.name: p for p in network.get_parameters()}
    mapped, ignored = _rename(network, weights, targets)
    heads = {name for name in targets if name.startswith(tuple(f"{h}." for h in _classifiers(network)))}
    reset = _head_reset(network, mapped, targets, head)
    report = LoadReport(0, weights.described, head=reset, ignored=ignored)
    absent = getattr(type(network), "absent_parts", {}).get(weights.source, ())
    for name, param in targets.items():
        if reset is not None and name in heads:
            mapped.pop(name, None)  # keeps the model's own initialisation
            continue
        part = name.split(".")[0]
        if name not in mapped and part in absent:
            report.initialised[part] = report.initialised.get(part, 0) + 1
            continue
        if name not in mapped:
            raise PretrainedError(f"{weights.described} has no tensor for {name} {tuple(param.shape)}")
        source_name, value = mapped.pop(name)
        if value.shape != tuple(param.shape):
            raise PretrainedError(
                f"{weights.described}: {source_name} {value.shape} does not fit {name} {tuple(param.shape)}"
            )
        param.set_data(ms.Tensor(value, dtype=param.dtype))
        report.loaded += 1
    if mapped:
        first = sorted(mapped)[0]
        raise PretrainedError(
            f"{weights.described}: {mapped[first][0]} {mapped[first][1].shape} has no place in {type(network).__name__}"
            f" ({len(mapped)} such tensors)"
        )
    return report


def _classifiers(network: nn.Cell) -> tuple[str, ...]:
    """The cells whose tensors depend on the class count (``head.fc`` unless the family says otherwise)."""
    return getattr(type(network), "classifiers", ("head.fc",))


def _head_reset(
    network: nn.Cell, mapped: dict[str, tuple[str, np.ndarray]], targets: dict, head: HeadPolicy
) -> tuple[int, int] | None:
    """(classes in the file, classes of the model) when the classifier is to be re-initialised, else None."""
    weight = f"{_classifiers(network)[0]}.weight"
    model_classes = int(targets[weight].shape[0])
    file_classes = int(mapped[weight][1].shape[0]) if weight in mapped else 0
    if head == "reset" or (head == "auto" and file_classes != model_classes):
        return file_classes, model_classes
    return None


def _rename(
    network: nn.Cell, weights: WeightsFile, targets: dict
) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, int]]:
    """The file's tensors under the model's names (model name → (file name, value)) and what was left aside."""
    ignored: dict[str, int] = {}
    if weights.source == "framework":
        mapped = {name: (name, value) for name, value in weights.tensors.items()}
        if "rng_state" in weights.meta:  # a training state (engine.checkpoint): optimizer and EMA tensors too
            state = [name for name in mapped if name not in targets]
            for name in state:
                del mapped[name]
            if state:
                ignored["training-state tensors (optimizer, EMA)"] = len(state)
        return mapped, ignored
    renames = getattr(type(network), "weight_names", {}).get(weights.source)
    if renames is None:
        raise PretrainedError(f"{type(network).__name__} has no twin among {weights.described.rsplit(' ', 1)[0]}s")
    mapped = {}
    for name, value in weights.tensors.items():
        if name.endswith(_BOOKKEEPING):
            ignored[_BOOKKEEPING] = ignored.get(_BOOKKEEPING, 0) + 1
            continue
        ours = name
        for pattern, replacement in renames:
            ours = re.sub(pattern, replacement, ours)
        prefix, _, leaf = ours.rpartition(".")
        if ours not in targets and f"{prefix}.{_TORCH_NORM.get(leaf)}" in targets:
            ours = f"{prefix}.{_TORCH_NORM[leaf]}"
        mapped[ours] = (name, value)
    return mapped, ignored
