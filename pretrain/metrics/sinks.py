"""Where the log rows go, each a Sink: a line on stdout, metrics.jsonl, TensorBoard (and W&B,
pretrain/metrics/wandb_sink.py). A sink the config wants is made with (cfg, local_dir, unit,
resume_step) on process 0 only, gets every row (`write`) and is closed at the end; the local
directory is the run's (pretrain/run/outputs.py copies it to a gs:// run.output_dir). A new sink
is a Sink here or in its own module plus one entry in pretrain/metrics/logger.py's SINKS."""

import json
import os
import sys
from pathlib import Path


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Sink:
    @staticmethod
    def wanted(cfg) -> bool:
        """Whether the run's config asks for this sink."""
        return True

    def write(self, row: dict):
        raise NotImplementedError

    def close(self):
        pass


class Console(Sink):
    """One line per row on stdout and, on a terminal only, a live progress bar between rows."""

    def __init__(self, cfg, local_dir: Path, unit: str, resume_step: int):
        self.total_steps, self.unit, self.tty = cfg.run.steps, unit, sys.stdout.isatty()

    def write(self, row: dict):
        self.note(self._line(row))

    def _line(self, row: dict) -> str:
        step = f"step {row['step']:>{len(str(self.total_steps))}}/{self.total_steps}"
        if "eval_loss" in row:
            ppl = f" | eval_ppl {row['eval_perplexity']:.2f}" if "eval_perplexity" in row else ""
            return f"{step} | eval_loss {row['eval_loss']:.4f}{ppl}"
        scores = [k.split("/", 1) for k in row if k.startswith(("harness/", "samples/"))]  # downstream, sample scores
        if scores:
            return f"{step} | {scores[0][0]} " + " | ".join(f"{name} {row[f'{kind}/{name}']:.4g}" for kind, name in scores)
        rate = row[f"{self.unit}_per_sec"]
        return (
            f"{step} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | grad_norm {row['grad_norm']:.3f} | "
            f"{self.unit}/s {rate:,.0f} | mfu {100 * row['mfu']:.2f}% | pad {100 * row['pad_fraction']:.1f}% | "
            f"step {1000 * row['step_time_s']:.1f} ms | "
            f"eta {duration(row['eta_s'])}" + (f" | skipped {row['skipped_steps']}" if row.get("skipped_steps") else "")
        )

    def progress(self, step: int, eta_s: float):
        if self.tty:
            width = 30
            done = int(width * step / self.total_steps)
            bar = "#" * done + "." * (width - done)
            print(f"\r\033[K[{bar}] {step}/{self.total_steps} eta {duration(eta_s)}", end="", flush=True)

    def note(self, text: str):
        print(("\r\033[K" if self.tty else "") + text, flush=True)


class Jsonl(Sink):
    """metrics.jsonl, one object per row. A resumed run keeps the rows up to its checkpoint and drops
    those of the steps it will redo."""

    def __init__(self, cfg, local_dir: Path, unit: str, resume_step: int):
        local_dir.mkdir(parents=True, exist_ok=True)
        path = local_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if resume_step and path.exists() else []
        kept = [line for line in lines if json.loads(line)["step"] <= resume_step]
        if kept != lines or not resume_step:  # written anew; otherwise appended to as it is
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self.file = path.open("a")

    def write(self, row: dict):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class TensorBoard(Sink):
    """Every number of a row as a scalar under tensorboard/."""

    def __init__(self, cfg, local_dir: Path, unit: str, resume_step: int):
        from tensorboardX import SummaryWriter  # process 0 only: it imports torch where torch is installed

        self.writer = SummaryWriter(str(local_dir / "tensorboard"))

    def write(self, row: dict):
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def close(self):
        self.writer.close()

