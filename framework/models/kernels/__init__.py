"""This project's CPU kernels for MindSpore (``ops.Custom`` ahead-of-time C++), built once per machine with g++.

MindSpore 2.8's CPU depthwise convolution (grouped, one channel per group) took 42 % of EfficientNet-B2's train
step; ``depthwise.cc`` computes the same convolution and its two gradients per channel plane on every core.
``convolution.cc`` runs convolutions as OpenBLAS matrix products where those beat MindSpore's (``conv2d``).
``activations.cc`` holds fused activations (GELU, SiLU) whose backward keeps only their input, where MindSpore's
autodiff of the formula keeps every intermediate. ``standardisation.cc`` standardises NFNet's weights and
differentiates that, one pass each way per output channel. The sources (with ``parallel.h``, their one thread
helper) are compiled together on first use into ``~/.cache/mindspore-hydra-classification/`` (``$XDG_CACHE_HOME``),
named by a hash of the sources, the compiler, its flags and the CPU, so a changed source or another machine builds
its own. Without a compiler the layers keep MindSpore's kernels (one warning).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import mindspore as ms
from mindspore import ops

log = logging.getLogger(__name__)

SOURCES = tuple(sorted(Path(__file__).parent.glob("*.cc")))
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))  # parallel.h: part of the build key
ANY_SIZE = 1 << 62  # a kernel's max_pixels when it runs on maps of any size
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-pthread", "-shared", "-fPIC")


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (the library is built for this CPU: -march=native)."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return os.uname().machine


def _blas_flags() -> tuple[str, ...]:
    """g++ flags for OpenBLAS from the scipy-openblas32 wheel (convolution.cc): its headers, its library, and that
    library's folder as the run path, so MindSpore loads it from the environment it was built in."""
    import scipy_openblas32

    lib = scipy_openblas32.get_lib_dir()
    return f"-I{scipy_openblas32.get_include_dir()}", f"-L{lib}", f"-Wl,-rpath,{lib}", "-lscipy_openblas"


@functools.cache
def library() -> str | None:
    """The built kernels' path, compiling them if this source, compiler and CPU have none yet; None if it fails."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        log.warning("no C++ compiler (g++) found: layers train on MindSpore's slower CPU kernels")
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    blas = _blas_flags()
    texts = (source.read_text() for source in (*SOURCES, *HEADERS))
    key = "\0".join((*texts, version, " ".join((*FLAGS, *blas)), _cpu_flags()))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mindspore-hydra-classification"
    target = cache / f"kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if target.is_file():
        return str(target)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # processes building at once each rename
    try:
        cache.mkdir(parents=True, exist_ok=True)
        command = [compiler, *FLAGS, "-o", str(partial), *map(str, SOURCES), *blas]
        built = subprocess.run(command, capture_output=True, text=True)
        if built.returncode != 0:
            raise OSError(built.stderr[-500:])
        os.replace(partial, target)
    except OSError as err:
        log.warning("building %s into %s failed, layers use MindSpore's kernels: %s", SOURCES[0].parent, cache, err)
        partial.unlink(missing_ok=True)
        return None
    return str(target)


def cpu_library() -> str | None:
    """The kernels' library when MindSpore runs on the CPU and it builds; None otherwise."""
    return library() if ms.get_context("device_target") == "CPU" else None


def spec(stride: int, same: bool = False) -> ms.Tensor:
    """The convolution kernels' last input: the stride and the padding rule (TensorFlow's "SAME", else k//2)."""
    return ms.Tensor([stride, int(same)], ms.int32)


def _convolution(path: str, name: str, out_shape: Callable[..., list[int]], **attributes: int) -> ops.Custom:
    """The AOT op ``{name}Forward(x, weight, spec)``, differentiated by ``{name}BackwardInput(dy, weight, x, spec)``
    and ``{name}BackwardWeight(dy, x, weight, spec)``. ``attributes`` tell the ops apart: MindSpore reuses one
    primitive's shape inference for another with equal attributes (a stride-1 convolution got the output shape of a
    stride-2 one)."""
    backward_input = ops.Custom(f"{path}:{name}BackwardInput", lambda dy, w, x, s: x, lambda dy, w, x, s: x, "aot")
    backward_weight = ops.Custom(f"{path}:{name}BackwardWeight", lambda dy, x, w, s: w, lambda dy, x, w, s: w, "aot")

    def bprop(x: ms.Tensor, weight: ms.Tensor, spec: ms.Tensor, out: ms.Tensor, dout: ms.Tensor) -> tuple:
        return backward_input(dout, weight, x, spec), backward_weight(dout, x, weight, spec), ops.zeros_like(spec)

    forward = ops.Custom(f"{path}:{name}Forward", out_shape, lambda x, w, s: x, "aot", bprop=bprop)
    for key, value in attributes.items():
        forward.add_prim_attr(key, value)
    return forward


def depthwise_conv2d(kernel: int, stride: int) -> Callable[..., ms.Tensor] | None:
    """``op(x, weight, spec(stride))``: a k×k depthwise convolution with zero padding k//2 and its gradients, on the
    CPU; None elsewhere or without the library."""
    path = cpu_library()
    if path is None:
        return None

    def out_shape(x: list[int], weight: list[int], _: list[int]) -> list[int]:
        return [x[0], x[1], *(_output_size(size, kernel, stride, same=False) for size in x[2:])]

    return _convolution(path, "Depthwise", out_shape, kernel_size=kernel, stride=stride)


def conv2d(
    in_channels: int, kernel: int, stride: int, groups: int, same: bool = False
) -> tuple[Callable[..., ms.Tensor], int, int] | None:
    """``(op, min_pixels, max_pixels)``: ``op(x, weight, spec(stride, same))`` is a k×k convolution (no bias) with
    zero padding k//2 or TensorFlow's "SAME", and its gradients, on the CPU as OpenBLAS products; it beats MindSpore
    2.8's kernel on inputs of ``min_pixels`` to ``max_pixels`` pixels (H·W). None where it does not, off the CPU or
    without the library.

    Measured per layer (train step, 2 threads): 1×1 convolutions gain on output maps of 2 × 2 and less (batch 32,
    2048 -> 1024 channels on 2 × 2: 48.4 -> 16.0 ms; at stride 2, 1024 -> 2048 from 4 × 4: 21.3-23.5 -> 5.7-5.8),
    are even on 4 × 4 and lose from 8 × 8 on (256 -> 512 channels on 8 × 8: 6.1 -> 18.6 ms; on 56 × 56 at 224 px
    99 -> 129 ms; at stride 2 from 56 × 56 47 -> 60, 512 -> 1024 from 28 × 28 38 -> 56). Stems (at most 576 products per
    output pixel) gain at any size (ResNet's 7×7 at 64 px 30.4 -> 19.1 ms). Narrow groups (ResNeXt's 32, of at
    most 32 channels) gain from 14 × 14 output pixels on (batch 32: 128 channels on 56 × 56 271 -> 114 ms, on
    16 × 16 22-25 -> 14-20; 512 on 14 × 14 76-87 -> 64-66) and lose below (256 on 8 × 8 18.8 -> 31.1). Wider
    3×3 and wide groups lose or draw (128 channels on 16 × 16: 35.9 -> 61.2 ms; NFNet's groups of 128, 768
    channels on 14 × 14, batch 8: 55-66 -> 62-64)."""
    if groups == 1 and kernel == 1:
        pixels = 0, 4 * stride * stride  # output maps of 2 x 2 and less
    elif groups == 1 and in_channels * kernel * kernel <= 576:
        pixels = 0, ANY_SIZE
    elif groups > 1 and in_channels // groups <= 32:
        pixels = 196 * stride * stride, ANY_SIZE  # 14 x 14 output pixels
    else:
        return None
    op = convolution(kernel, stride, same)
    return None if op is None else (op, *pixels)


def convolution(kernel: int, stride: int, same: bool = False) -> Callable[..., ms.Tensor] | None:
    """``op(x, weight, spec(stride, same))``: the OpenBLAS convolution (any groups, as the weight's shape says) and
    its gradients wherever it runs; ``conv2d`` says where that is faster. None off the CPU or without the library."""
    path = cpu_library()
    if path is None:
        return None

    def out_shape(x: list[int], weight: list[int], _: list[int]) -> list[int]:
        return [x[0], weight[0], *(_output_size(size, kernel, stride, same) for size in x[2:])]

    return _convolution(path, "Convolution", out_shape, kernel_size=kernel, stride=stride, same=int(same))


def _output_size(size: int, kernel: int, stride: int, same: bool) -> int:
    """A side of the output map: ceil(size / stride) for "SAME", else with k//2 padding on both sides."""
    return -(-size // stride) if same else (size + 2 * (kernel // 2) - kernel) // stride + 1


def activation(name: Literal["Gelu", "Silu"]) -> Callable[[ms.Tensor, ms.Tensor], ms.Tensor] | None:
    """``op(x, scale)``: ``scale`` (a one-element float32 tensor) times the activation of ``x`` (float32), with a
    backward that keeps only ``x``; None off the CPU or without the library. ``Gelu`` is GELU's tanh form."""
    path = cpu_library()
    if path is None:
        return None
    backward = ops.Custom(f"{path}:{name}Backward", lambda dy, x, s: x, lambda dy, x, s: x, "aot")

    def bprop(x: ms.Tensor, scale: ms.Tensor, out: ms.Tensor, dout: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor]:
        return backward(dout, x, scale), ops.zeros_like(scale)

    return ops.Custom(f"{path}:{name}Forward", lambda x, s: x, lambda x, s: x, "aot", bprop=bprop)


def weight_standardisation() -> Callable[[ms.Tensor, ms.Tensor, ms.Tensor], ms.Tensor] | None:
    """``op(weight, gain, spec)``: each output channel's weights (O, I, k, k) standardised over its fan-in (biased
    variance, as batch norm) times ``gain`` (O, 1, 1, 1) times ``scale``, with ``spec`` the float32 tensor
    ``[scale, eps]``; its backward gives the weight's and the gain's gradients and keeps nothing but its inputs.
    None off the CPU or without the library."""
    path = cpu_library()
    if path is None:
        return None
    backward = ops.Custom(f"{path}:StandardiseBackward", lambda dy, w, g, s: (w, g), lambda dy, w, g, s: (w, g), "aot")

    def bprop(weight: ms.Tensor, gain: ms.Tensor, spec: ms.Tensor, out: ms.Tensor, dout: ms.Tensor) -> tuple:
        dweight, dgain = backward(dout, weight, gain, spec)
        return dweight, dgain, ops.zeros_like(spec)

    return ops.Custom(f"{path}:StandardiseForward", lambda w, g, s: w, lambda w, g, s: w, "aot", bprop=bprop)
