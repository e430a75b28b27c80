"""This project's CPU kernels for MindSpore (``ops.Custom`` ahead-of-time C++), built once per machine with g++.

MindSpore 2.8's CPU depthwise convolution (grouped, one channel per group) took 42 % of EfficientNet-B2's train
step; ``depthwise.cc`` computes the same convolution and its two gradients per channel plane on every core.
``pointwise.cc`` runs 1×1 convolutions as OpenBLAS matrix products (MindSpore's reached ~25 GFLOP/s on them).
``activations.cc`` holds fused activations (GELU, SiLU) whose backward keeps only their input, where MindSpore's
autodiff of the formula keeps every intermediate. The sources are compiled together on first use into
``~/.cache/mindspore-hydra-classification/`` (``$XDG_CACHE_HOME``), named by a hash of the sources, the compiler,
its flags and the CPU, so a changed source or another machine builds its own. Without a compiler the layers keep
MindSpore's kernels (one warning).
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
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-pthread", "-shared", "-fPIC")


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (the library is built for this CPU: -march=native)."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return os.uname().machine


def _blas_flags() -> tuple[str, ...]:
    """g++ flags for OpenBLAS from the scipy-openblas32 wheel (pointwise.cc): its headers, its library, and that
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
    flags = (*FLAGS, *_blas_flags())
    key = "\0".join((*(source.read_text() for source in SOURCES), version, " ".join(flags), _cpu_flags()))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mindspore-hydra-classification"
    target = cache / f"kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if target.is_file():
        return str(target)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # processes building at once each rename
    try:
        cache.mkdir(parents=True, exist_ok=True)
        command = [compiler, *FLAGS, "-o", str(partial), *map(str, SOURCES), *_blas_flags()]
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


def _convolution(path: str, name: str, out_shape: Callable[[list[int], list[int]], list[int]]) -> ops.Custom:
    """The AOT op ``{name}Forward(x, weight)``, differentiated by ``{name}BackwardInput(dy, weight, x)`` and
    ``{name}BackwardWeight(dy, x, weight)``."""
    backward_input = ops.Custom(f"{path}:{name}BackwardInput", lambda dy, w, x: x, lambda dy, w, x: x, "aot")
    backward_weight = ops.Custom(f"{path}:{name}BackwardWeight", lambda dy, x, w: w, lambda dy, x, w: w, "aot")

    def bprop(x: ms.Tensor, weight: ms.Tensor, out: ms.Tensor, dout: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor]:
        return backward_input(dout, weight, x), backward_weight(dout, x, weight)

    return ops.Custom(f"{path}:{name}Forward", out_shape, lambda x, w: x, "aot", bprop=bprop)


def depthwise_conv2d(kernel: int, stride: int) -> Callable[..., ms.Tensor] | None:
    """``op(x, weight)``: a k×k depthwise convolution with zero padding k//2 and its gradients, on the CPU;
    None elsewhere or without the library."""
    path = cpu_library()
    if path is None:
        return None
    padding = kernel // 2

    def out_shape(x: list[int], weight: list[int]) -> list[int]:
        return [x[0], x[1], (x[2] + 2 * padding - kernel) // stride + 1, (x[3] + 2 * padding - kernel) // stride + 1]

    # attributes that tell the convolutions apart: MindSpore reuses one primitive's shape inference for another
    # with equal attributes (a stride-1 convolution got the output shape of a stride-2 one)
    forward = _convolution(path, "Depthwise", out_shape)
    return forward.add_prim_attr("kernel_size", kernel).add_prim_attr("stride", stride)


def pointwise_conv2d() -> Callable[..., ms.Tensor] | None:
    """``op(x, weight)``: a 1×1 convolution at stride 1 (one group, no bias) and its gradients, on the CPU
    through OpenBLAS; None elsewhere or without the library."""
    path = cpu_library()
    if path is None:
        return None
    return _convolution(path, "Pointwise", lambda x, weight: [x[0], weight[0], x[2], x[3]])


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
