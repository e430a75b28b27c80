"""MindSpore's compile cache made safe for run.py (``hardware.compile_cache``): one folder per exact program.

Measured with MindSpore 2.8 (issue 21): its cache names a process's graphs by their order (``compile_cache_0``,
``_1``, ...) and checks only the entry script, so another model compiled after the same script loads the earlier
model's graph (wrong output shapes, no error); the cache folder is fixed at the first cached compile of a
process. So each folder here holds the graphs of one program: its key hashes MindSpore's and Python's versions,
the source of every module loaded from outside the installed packages (this project and a user's own code) and
of its C++ kernels, and what the caller says decides the graphs (the resolved config, the data, the weights
files, the rank). Only the first cached program of a process uses it, a folder in use by another process is left
alone, and a folder whose program did not finish (killed mid-write) is emptied before it is filled again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mindspore as ms
from mindspore.common.api import entry_script_path  # what MindSpore's cache hashes and reads

from framework.models.kernels import SOURCES as KERNEL_SOURCES

COMPLETE = "complete"  # written when the program that filled the folder ended normally
_state = {"used": False}  # the cache folder is fixed for a process at its first cached compile


def code_digest() -> str:
    """sha256 of the source of every loaded module that is not part of Python or an installed package, and of
    this project's C++ kernels (a graph names their library, whose file name changes with their source)."""
    installed = {
        str(Path(p).resolve())
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
        if (p := sysconfig.get_paths().get(key))
    }
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in KERNEL_SOURCES))
    files = {getattr(m, "__file__", None) for m in list(sys.modules.values())}
    for name in sorted(f for f in files if f and f.endswith(".py")):
        path = Path(name).resolve()
        if not any(path.is_relative_to(root) for root in installed) and path.is_file():
            digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def file_fingerprint(path: str | os.PathLike | None) -> list[Any] | None:
    """A local file's path, size and modification time (None for no file, the text alone for a URI): a changed
    file changes the key."""
    if path is None:
        return None
    if not Path(path).is_file():
        return [str(path)]
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def cache_key(program: dict[str, Any]) -> str:
    """The folder name of a program: its description plus the versions and code that compile it."""
    described = {"program": program, "mindspore": ms.__version__, "python": sys.version, "code": code_digest()}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


@contextmanager
def compile_cache(root: str | os.PathLike | None, program: dict[str, Any]) -> Iterator[str]:
    """Compile the graphs of the block with MindSpore's cache in ``root/<key of program>``; yields what happened.

    ``off`` (no root), ``not first`` (this process already cached another program), ``no script`` (MindSpore
    hashes the entry script, which ``python -c`` and pytest-xdist workers lack), ``busy`` (another process uses
    the folder), ``filled`` (compiled and stored) or ``reused`` (the folder held this program's graphs).
    """
    if root is None or _state["used"] or not Path(str(entry_script_path)).is_file():
        yield "off" if root is None else "not first" if _state["used"] else "no script"
        return
    folder = Path(root) / cache_key(program)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield "busy"
            return
        reused = (folder / COMPLETE).is_file()
        if not reused:
            shutil.rmtree(folder / "graphs", ignore_errors=True)
        _state["used"] = True
        # MindSpore reads these at each compile (its set_context switch is deprecated in 2.8)
        os.environ.update(MS_COMPILER_CACHE_ENABLE="1", MS_COMPILER_CACHE_PATH=str(folder / "graphs"))
        try:
            yield "reused" if reused else "filled"
            (folder / COMPLETE).touch()
        finally:  # later graphs of this process are another program's
            os.environ.pop("MS_COMPILER_CACHE_ENABLE")
            os.environ.pop("MS_COMPILER_CACHE_PATH")
