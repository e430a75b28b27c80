"""The PyTorch/timm side of ``task=benchmark``, and the timing helpers both sides share.

``task=benchmark`` runs this file as a script in a process of its own (``python benchmark_timm.py SPEC.json``),
so neither framework's threads, allocator or imports touch the other's figures. It measures timm's model
exactly as the MindSpore side measures ours: the same batch shape, classes and thread count, SGD with our
optimizer config's momentum and weight decay (``sgd``), time from process start to the end of the first train
step, warm train-step and eval img/s (median of ``rounds``), peak RSS, and optionally an op-level profile
(``torch.profiler``).

Needs the optional ``bench`` extra (``pip install -e ".[bench]"``: torch and timm); nothing else imports
torch. Module level is standard library only, so the MindSpore side imports the helpers without torch.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any


def seconds_since_process_start() -> float:
    """Wall seconds since this process was created (interpreter start, imports and all)."""
    with open("/proc/self/stat") as f:  # field 22: start time in clock ticks after boot
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def images_per_second(run: Callable[[], Any], batch_size: int, steps: int, rounds: int) -> float:
    """Median over ``rounds`` of the img/s of ``steps`` calls of ``run`` (each call ends synchronised)."""
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            run()
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return median(rates)


def write_profile(rows: list[dict[str, Any]], path: Path) -> None:
    """Op-level profile rows (op, calls_per_step, ms_per_step, percent), slowest first, as CSV."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["op", "calls_per_step", "ms_per_step", "percent"])
        writer.writeheader()
        writer.writerows(rows)


def sgd(model: Any, optimizer: dict[str, Any]) -> Any:
    """torch's SGD as our optimizer config (``benchmark.timm_optimizer`` gives it): weight decay on every parameter but
    those of norm layers, and with ``no_decay_ndim1`` biases and other 1-D parameters and ``no_decay_names``."""
    import torch

    nn = torch.nn
    norm_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)  # timm's subclass them
    norm = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}

    def decayed(name: str, param: Any) -> bool:
        named = name.rsplit(".", 1)[-1] in optimizer["no_decay_names"]
        exempt = named or (optimizer["no_decay_ndim1"] and param.ndim <= 1)
        return id(param) not in norm and not exempt

    decay: list[Any] = []
    no_decay: list[Any] = []
    for name, param in model.named_parameters():
        (decay if decayed(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": optimizer["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    return torch.optim.SGD(groups, lr=0.01, momentum=optimizer["momentum"], nesterov=optimizer["nesterov"])


def measure_timm(spec: dict[str, Any]) -> dict[str, Any]:
    """Train-step and eval throughput of ``timm.create_model(spec['model'], **spec['model_kwargs'])`` (our model
    config's drop rates) on a random batch."""
    import timm
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    model = timm.create_model(spec["model"], num_classes=spec["num_classes"], **spec["model_kwargs"]).to(device)
    optimizer = sgd(model, spec["optimizer"])
    loss_fn = torch.nn.CrossEntropyLoss()
    batch, size = spec["batch_size"], spec["image_size"]
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, spec["num_classes"], (batch,), device=device)

    def train_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss.item()  # synchronises, as the MindSpore side reads its loss every step

    def eval_step() -> None:
        with torch.no_grad():
            model(images).cpu()

    model.train()
    train_step()
    results: dict[str, Any] = {"time_to_first_step_s": seconds_since_process_start()}
    for _ in range(spec["warmup_steps"]):
        train_step()
    results["train_img_per_s"] = images_per_second(train_step, batch, spec["steps"], spec["rounds"])
    model.eval()
    eval_step()
    results["eval_img_per_s"] = images_per_second(eval_step, batch, spec["steps"], spec["rounds"])
    results["peak_rss_mb"] = peak_rss_mb()
    results["versions"] = {"torch": torch.__version__, "timm": timm.__version__}
    if spec.get("profile"):
        model.train()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(spec["steps"]):
                train_step()
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        rows = [
            {
                "op": e.key,
                "calls_per_step": e.count / spec["steps"],
                "ms_per_step": e.self_cpu_time_total / 1000 / spec["steps"],
                "percent": 100 * e.self_cpu_time_total / total,
            }
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)
        ]
        write_profile(rows, Path(spec["profile"]))
    return results


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["result"]).write_text(json.dumps(measure_timm(spec)))
