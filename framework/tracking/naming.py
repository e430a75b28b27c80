"""What a run is called and where it came from, as MLflow's UI shows it: the run's name (its list tells sibling
runs apart by name and cuts long ones), the command line as its description, and MLflow's own source, user and
git commit tags."""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
from collections.abc import Iterable, Sequence

from omegaconf import DictConfig

from framework.config import overrides
from framework.paths import PROJECT_ROOT

SWEPT_ENV = "FRAMEWORK_SWEPT_KEYS"  # set while a sweep runs: the keys it varies, comma-separated
# overrides a run's name leaves out: what names files, records and inputs rather than what is trained
_NOT_IN_NAMES = (
    "hydra.", "hydra/", "paths.", "tracking.", "task=", "model=", "experiment=", "resume=", "ckpt=", "input=",
    "hardware.compile_cache",
)  # fmt: skip


def run_name(cfg: DictConfig, *words: str) -> str:
    """``tracking.run_name`` when set; else ``words`` (the task's), the model, and the command line's overrides
    of its config and experiment, shortened (``resnext50_32x4d lr=0.02 batch=64``). A sweep's trial names only
    what its sweep varies (its parent's name holds the rest)."""
    if cfg.tracking.get("run_name"):
        return str(cfg.tracking.run_name)
    swept = os.environ[SWEPT_ENV].split(",") if SWEPT_ENV in os.environ else None
    named = [o for o in overrides() if _names_the_run(o) and (swept is None or _key(o) in swept)]
    return " ".join([*words, str(cfg.model.name), *map(short_override, named)])


def sweep_name(model: str, task_overrides: Iterable[str], swept: Iterable[str]) -> str:
    """A sweep parent run's name: what it varies, then the model and the overrides all its trials share
    (``sweep over lr, batch: resnext50_32x4d epochs=3``)."""
    swept = list(swept)
    fixed = [short_override(o) for o in task_overrides if _key(o) not in swept and _names_the_run(o)]
    varied = ", ".join(short_override(key).partition("=")[0] for key in swept)
    return " ".join([f"sweep over {varied}:" if varied else "sweep", *([] if "model" in swept else [model]), *fixed])


def _key(override: str) -> str:
    """``+scheduler.lr=0.1`` → ``scheduler.lr``."""
    return override.lstrip("+~").partition("=")[0]


def _names_the_run(override: str) -> bool:
    """Whether the override is a setting of what is trained (not where files and records go)."""
    key = _key(override)
    return not (key if "." in key else f"{key}=").startswith(_NOT_IN_NAMES)


def short_override(override: str) -> str:
    """``scheduler.lr=0.0123456`` → ``lr=0.01235``: the key's last part, a number to 4 significant digits."""
    key, _, value = override.lstrip("+~").partition("=")
    key = {"batch_size": "batch"}.get(key.rsplit(".", 1)[-1], key.rsplit(".", 1)[-1])
    try:
        number = float(value)
    except ValueError:
        return f"{key}={value}"
    return f"{key}={value if value.lstrip('-').isdigit() else f'{number:.4g}'}"


def command_line(words: Sequence[str] | None = None, multirun: bool = False) -> str:
    """The command that runs this job again: ``python run.py`` (``-m`` for a sweep) and its overrides
    (``words``, default this run's), quoted for a shell."""
    words = [*(["-m"] if multirun else []), *(overrides() if words is None else words)]
    return " ".join(["python run.py", *(shlex.quote(w) for w in words)])


def source_tags(command: str) -> dict[str, str]:
    """MLflow's own tags for what a run page shows: the entry point, the user, the git commit, and ``command``
    as the run's description."""
    tags = {
        "mlflow.source.name": "run.py",
        "mlflow.source.type": "LOCAL",
        "mlflow.user": getpass.getuser(),
        "mlflow.note.content": f"`{command}`",
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit() -> str | None:
    """This checkout's commit, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
