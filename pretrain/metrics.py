"""Throughput, MFU and the metric sinks: a line on stdout, metrics.jsonl, TensorBoard."""

import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from pretrain import tpu

# Dense bfloat16 peak FLOP/s per chip of the accelerators outside pretrain/tpu.py's table, by
# device_kind prefix.
PEAK_FLOPS = {
    "TPU7x": 2307e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA B200": 2250e12,
}


@functools.cache  # the host's peak: measured once per process
def measure_cpu_flops(n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of a jitted float32 matmul on one CPU device (which uses every host core), from
    its fastest repetition: a peak, and steady from run to run where a mean follows the load."""
    x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices("cpu")[0])
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    fastest = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * n**3 / fastest


def total_peak_flops(per_device_override: float = 0.0) -> float:
    """Peak FLOP/s of all devices of the run, the denominator of MFU."""
    devices = jax.devices()
    if per_device_override > 0:
        return per_device_override * len(devices)
    kind = devices[0].device_kind
    if tpu.peak_flops(kind):
        return tpu.peak_flops(kind) * len(devices)
    for prefix, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return peak * len(devices)
    if devices[0].platform == "cpu":
        # Faked CPU devices share the host's cores: the host is the unit of peak.
        return measure_cpu_flops() * jax.process_count()
    raise ValueError(f"no peak FLOP/s known for device '{kind}'; set runtime.peak_flops_per_device")


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Writes every logged row to stdout, metrics.jsonl and TensorBoard (process 0 only), under a
    local directory (pretrain/outputs.py copies it to a gs:// run.output_dir)."""

    def __init__(self, local_dir: Path, total_steps: int, unit: str, resume_step: int = 0):
        """A resumed run keeps the rows up to its checkpoint and drops those of steps it will redo."""
        self.total_steps, self.unit = total_steps, unit
        self.enabled = jax.process_index() == 0
        self.tty = sys.stdout.isatty()
        if not self.enabled:
            return
        local_dir.mkdir(parents=True, exist_ok=True)
        path = local_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if resume_step and path.exists() else []
        kept = [line for line in lines if json.loads(line)["step"] <= resume_step]
        if kept != lines or not resume_step:  # written anew; otherwise appended to as it is
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self.jsonl = path.open("a")
        from tensorboardX import SummaryWriter  # process 0 only: it imports torch where torch is installed

        self.tb = SummaryWriter(str(local_dir / "tensorboard"))

    def write(self, row: dict):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, row["step"])
        self.tb.flush()
        print(("\r\033[K" if self.tty else "") + self._line(row), flush=True)

    def _line(self, row: dict) -> str:
        step = f"step {row['step']:>{len(str(self.total_steps))}}/{self.total_steps}"
        if "eval_loss" in row:
            ppl = f" | eval_ppl {row['eval_perplexity']:.2f}" if "eval_perplexity" in row else ""
            return f"{step} | eval_loss {row['eval_loss']:.4f}{ppl}"
        rate = row[f"{self.unit}_per_sec"]
        return (
            f"{step} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | grad_norm {row['grad_norm']:.3f} | "
            f"{self.unit}/s {rate:,.0f} | mfu {100 * row['mfu']:.2f}% | pad {100 * row['pad_fraction']:.1f}% | "
            f"step {1000 * row['step_time_s']:.1f} ms | "
            f"eta {_fmt_duration(row['eta_s'])}"
        )

    def progress(self, step: int, eta_s: float):
        """A live status line between log rows, only on a terminal."""
        if self.enabled and self.tty:
            width = 30
            done = int(width * step / self.total_steps)
            bar = "#" * done + "." * (width - done)
            print(f"\r\033[K[{bar}] {step}/{self.total_steps} eta {_fmt_duration(eta_s)}", end="", flush=True)

    def note(self, text: str):
        if self.enabled:
            print(("\r\033[K" if self.tty else "") + text, flush=True)

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
