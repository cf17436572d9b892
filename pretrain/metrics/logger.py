"""The run's log rows, handed to every sink (pretrain/metrics/sinks.py) on process 0; progress and
notes go to the console alone."""

from pathlib import Path

import jax

from pretrain.metrics.sinks import Console, Jsonl, TensorBoard
from pretrain.metrics.wandb_sink import WandB

SINKS = (Jsonl, TensorBoard, WandB, Console)  # in the order a row reaches them: stored before it is shown


class MetricsLogger:
    def __init__(self, cfg, local_dir: Path, unit: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.sinks = [sink(cfg, local_dir, unit, resume_step) for sink in SINKS if sink.wanted(cfg)] if self.enabled else []
        self.console = next((s for s in self.sinks if isinstance(s, Console)), None)

    def write(self, row: dict):
        for sink in self.sinks:
            sink.write(row)

    def progress(self, step: int, eta_s: float):
        """A live status line between log rows, only on a terminal."""
        if self.console:
            self.console.progress(step, eta_s)

    def note(self, text: str):
        if self.console:
            self.console.note(text)

    def close(self):
        for sink in self.sinks:
            sink.close()
