"""Training metrics on disk: a CSV file always, TensorBoard event files too when ``tensorboard`` is installed."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

__all__ = ["METRICS_COLUMNS", "MetricsLog"]

METRICS_COLUMNS = ("step", "loss", "lr", "val_loss", "examples_per_s", "elapsed_s")
"""Columns of ``metrics.csv``; ``step`` counts optimizer steps done, ``val_loss`` is empty where not evaluated."""


class MetricsLog:
    """Rows of :data:`METRICS_COLUMNS` appended to ``directory/metrics.csv`` (and TensorBoard scalars under
    ``directory/tensorboard`` when ``tensorboard`` is importable and ``tensorboard`` is not False).

    Args:
        directory: created if missing.
        resume_step: continue a run: rows of steps after it (written by an interrupted run after its last
            checkpoint) are dropped, so the file reads like one uninterrupted run. ``None``: start a new file.
        tensorboard: ``None``: when installed; ``False``: never; ``True``: required.
    """

    def __init__(self, directory: str | Path, resume_step: int | None = None, tensorboard: bool | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.csv"
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._file = open(self.path, "w", newline="")  # closed by close()
        self._csv = csv.DictWriter(self._file, fieldnames=METRICS_COLUMNS)
        self._csv.writeheader()
        self._csv.writerows(rows)
        self._tb: Any = None
        if tensorboard is not False:
            try:  # optional dependency: torch's writer needs the tensorboard package
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    raise ImportError("MetricsLog(tensorboard=True) needs: pip install tensorboard") from None
            else:
                self._tb = SummaryWriter(str(self.directory / "tensorboard"), purge_step=resume_step)

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def log(self, step: int, **values: float | None) -> None:
        """One row; ``values`` keys among :data:`METRICS_COLUMNS` (``None``: left empty)."""
        unknown = sorted(set(values) - set(METRICS_COLUMNS))
        if unknown:
            raise ValueError(f"values: unknown metrics {unknown}; expected some of {METRICS_COLUMNS[1:]}")
        row = {"step": str(step)}
        for key, value in values.items():
            row[key] = "" if value is None else repr(float(value))
            if self._tb is not None and value is not None and math.isfinite(value):
                self._tb.add_scalar(f"train/{key}", value, step)
        self._csv.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
