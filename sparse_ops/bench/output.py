"""Where a benchmark run's results go: CSV rows written as they come, a JSON header, a table for the terminal.

``RunFiles`` owns ``<out>/<stem>.csv`` and ``<out>/<stem>.json`` (and the caller's ``<stem>.png``): the header
(command, arguments, environment) is written first with ``"status": "running"``, each row is appended and
flushed as soon as it is measured, and ``finish`` rewrites the header with the final status. A run that fails
before its first row (bad input found late) removes the files it created, so nothing half-written is left; one
that fails later keeps its rows and says ``"failed: <error>"`` (a one-shot GPU run must not lose what it
measured); a run stopped with Ctrl-C keeps its rows and says ``"interrupted"``.

Example:
    >>> import json, tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> with RunFiles(out, "demo", ("a", "b"), {"command": "demo"}) as files:
    ...     files.add({"a": 1, "b": 2.5})
    ...     files.finish("complete")
    >>> (out / "demo.csv").read_text().split()
    ['a,b', '1,2.5']
    >>> json.loads((out / "demo.json").read_text())["status"]
    'complete'
    >>> print(table(["name", "x"], [["dense", "1.00"], ["csr", "12.50"]]))
    name       x
    dense   1.00
    csr    12.50
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from sparse_ops.tables import text_table


def write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as indented JSON through a temporary file and a rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class RunFiles:
    """The result files of one run in ``out``: ``stem.csv`` (rows, incremental), ``stem.json`` (header)."""

    def __init__(self, out: Path, stem: str, columns: Sequence[str], header: Mapping[str, object]):
        self.out, self.stem, self.columns = Path(out), stem, tuple(columns)
        self.header = dict(header)
        self.rows = 0
        self._created: list[Path] = []
        self._csv: IO[str] | None = None
        self._writer: csv.DictWriter | None = None

    def path(self, suffix: str) -> Path:
        """``<out>/<stem><suffix>``, remembered so that a failed run removes it too."""
        p = self.out / f"{self.stem}{suffix}"
        if p not in self._created:
            self._created.append(p)
        return p

    def __enter__(self) -> RunFiles:
        if not self.out.exists():
            self.out.mkdir(parents=True)
            self._created.append(self.out)
        self._csv = open(self.path(".csv"), "w", newline="")
        self._writer = csv.DictWriter(self._csv, fieldnames=self.columns)
        self._writer.writeheader()
        write_json(self.path(".json"), {**self.header, "status": "running"})
        return self

    def add(self, row: Mapping[str, object]) -> None:
        """Append one row (keys exactly ``columns``) and flush it to disk."""
        self._writer.writerow(row)
        self._csv.flush()
        self.rows += 1

    def finish(self, status: str, **extra: object) -> None:
        """Close the CSV and rewrite the header with the final ``status`` and any summary."""
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        self.header.update(extra)
        write_json(self.path(".json"), {**self.header, "status": status, "rows": self.rows})

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is KeyboardInterrupt:
            self.finish("interrupted")
        elif exc_type is not None and self.rows == 0:
            self._remove_created()
        elif exc_type is not None:
            self.finish(f"failed: {exc_type.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        elif self._csv is not None:
            self.finish("complete")

    def _remove_created(self) -> None:
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        for p in reversed(self._created):  # files first, then the folder if this run made it
            if p.is_dir():
                if not any(p.iterdir()):
                    p.rmdir()
            elif p.exists():
                p.unlink()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned (numbers)."""
    return text_table(headers, rows, right=True)
