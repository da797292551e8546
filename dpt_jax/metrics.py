"""Metrics to ``WORKDIR/metrics.jsonl`` (one JSON object per logged step) and TensorBoard."""
from __future__ import annotations

import json
import logging
import os
from typing import Dict

from dpt_jax.outputs import write_whole


class MetricWriter:
    """Appends to the run's metrics; on resume, rows logged after the restored step (work that
    is about to be redone) are dropped first, so each step appears once."""

    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(path):
            kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
            # Replaced whole: a failed write (a full disk) keeps the history.
            write_whole(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._jsonl = open(path, "a")
        from tensorboardX import SummaryWriter
        # TensorBoard hides the earlier sessions' events from this step on: the redone steps'.
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_metrics(workdir: str) -> list:
    """The rows of ``WORKDIR/metrics.jsonl``; a last line cut off mid-write (a killed run) is
    dropped with a warning, any other bad line named."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        lines = f.readlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines) and not line.endswith("\n"):
                logging.warning("%s: its last line was cut off mid-write; dropped", path)
                continue
            raise ValueError(f"{path}:{number}: not a JSON row ({e.msg})") from None
    return rows
