"""A JAX profiler trace of the train steps that `train.profile_steps` names, for TensorBoard's
profile plugin and XProf, under run.output_dir/profile/ (process 0 only; written locally, and
copied to a gs:// run.output_dir with the run's other files by pretrain/run/outputs.py)."""

from pathlib import Path

import jax


class StepProfiler:
    """Traces steps start..end (inclusive): begin(n) before step n is dispatched, end(n, outputs) after."""

    def __init__(self, profile_steps: list[int], local_dir: Path):
        self.start, self.end_step = profile_steps if profile_steps else (0, -1)
        self.enabled = bool(profile_steps) and jax.process_index() == 0
        self.out = local_dir / "profile"
        self.tracing = False

    def begin(self, step: int):
        if self.enabled and step == self.start:
            jax.profiler.start_trace(str(self.out))
            self.tracing = True

    def end(self, step: int, outputs):
        if self.tracing and step == self.end_step:
            self.close(outputs)

    def close(self, outputs=None):
        """Stop the trace, if one runs, once `outputs` (the last traced step's) are computed."""
        if not self.tracing:
            return
        jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self.tracing = False
