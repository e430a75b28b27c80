"""The ordered tracking records of one run, kept until the MLflow server has them.

With a folder (training: ``<run dir>/tracking/``) the records outlive the process: ``records.jsonl`` is
appended as they are logged and ``state.json`` holds the run id and how many records were delivered, so a
killed or disconnected job loses nothing and ``task=sync`` (or the resumed job) delivers the rest.
Without a folder the records live in memory for the length of the process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RECORDS_FILE = "records.jsonl"
STATE_FILE = "state.json"


class Spool:
    """Records (dicts with a ``kind``) in logging order; ``delivered`` of them have reached the server."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.records: list[dict[str, Any]] = []
        self.delivered = 0
        self.state: dict[str, Any] = {}  # run_id, spool_id: what identifies the run on the server
        if self.folder is not None and (self.folder / STATE_FILE).is_file():
            self.state = json.loads((self.folder / STATE_FILE).read_text())
            self.delivered = int(self.state.pop("delivered", 0))
            records = self.folder / RECORDS_FILE
            lines = records.read_text().splitlines() if records.is_file() else []
            for line in lines:
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:  # the last line, torn by a kill while it was written
                    break
            if len(self.records) < len(lines):  # later records must not be appended to the torn line
                _write_atomically(records, "".join(json.dumps(r) + "\n" for r in self.records))
            self.delivered = min(self.delivered, len(self.records))

    @classmethod
    def fresh(cls, folder: Path) -> Spool:
        """An empty spool in ``folder``, replacing one whose records were all delivered."""
        for name in (RECORDS_FILE, STATE_FILE):
            (Path(folder) / name).unlink(missing_ok=True)
        return cls(folder)

    @property
    def exists(self) -> bool:
        """Whether an earlier process left this spool (a run to continue)."""
        return bool(self.state)

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.folder is not None:
            with open(self.folder / RECORDS_FILE, "a") as file:
                file.write(json.dumps(record) + "\n")

    def pending(self) -> list[dict[str, Any]]:
        return self.records[self.delivered :]

    def set_state(self, **values: Any) -> None:
        self.state.update(values)
        self._save_state()

    def mark_delivered(self, count: int) -> None:
        """``count`` more records reached the server; a fully delivered spool starts a new file."""
        self.delivered += count
        if self.delivered == len(self.records):
            self.records, self.delivered = [], 0
            if self.folder is not None:
                (self.folder / RECORDS_FILE).write_text("")  # emptied first: a crash before the state re-sends nothing
        self._save_state()

    def discard_metrics_after(self, micro_step: int) -> int:
        """Drop undelivered metrics logged after training ``micro_step`` (they are about to be recomputed)."""
        kept = self.records[: self.delivered] + [
            r for r in self.pending() if not (r["kind"] == "metrics" and record_micro_step(r) > micro_step)
        ]
        dropped = len(self.records) - len(kept)
        if dropped:
            self.records = kept
            if self.folder is not None:
                _write_atomically(self.folder / RECORDS_FILE, "".join(json.dumps(r) + "\n" for r in kept))
        return dropped

    def sync(self) -> None:
        """Flush the records file to disk (at checkpoints: the spool is as durable as the training state)."""
        if self.folder is not None and (self.folder / RECORDS_FILE).is_file():
            with open(self.folder / RECORDS_FILE, "a") as file:
                os.fsync(file.fileno())

    def _save_state(self) -> None:
        if self.folder is not None:
            _write_atomically(self.folder / STATE_FILE, json.dumps({**self.state, "delivered": self.delivered}))


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def record_micro_step(record: dict[str, Any]) -> int:
    """The training micro-step that produced a metrics record (spools written before this name say ``at``)."""
    return int(record["micro_step"] if "micro_step" in record else record["at"])
