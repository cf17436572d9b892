"""A JAX profiler trace of the train steps that `train.profile_steps` names, for TensorBoard's
profile plugin and XProf, under run.output_dir/profile/ (process 0 only; local or gs://)."""

import shutil
import tempfile
from pathlib import Path

import jax
from etils import epath


class StepProfiler:
    """Traces steps start..end (inclusive): begin(n) before step n is dispatched, end(n, outputs) after."""

    def __init__(self, profile_steps: list[int], output_dir: str):
        self.start, self.end_step = profile_steps if profile_steps else (0, -1)
        self.enabled = bool(profile_steps) and jax.process_index() == 0
        self.out = epath.Path(output_dir) / "profile"
        self.local = None  # where the running trace is written

    def begin(self, step: int):
        if self.enabled and step == self.start:
            # The profiler writes to the local file system; a gs:// trace is copied up when it ends.
            self.local = tempfile.mkdtemp() if str(self.out).startswith("gs://") else str(self.out)
            jax.profiler.start_trace(self.local)

    def end(self, step: int, outputs):
        if self.local is not None and step == self.end_step:
            self.close(outputs)

    def close(self, outputs=None):
        """Stop the trace, if one runs, once `outputs` (the last traced step's) are computed."""
        if self.local is None:
            return
        jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        if self.local != str(self.out):
            for f in Path(self.local).rglob("*"):
                if f.is_file():
                    target = self.out / f.relative_to(self.local)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(f.read_bytes())
            shutil.rmtree(self.local)
        self.local = None
