"""Where a run's wall time went, across all its attempts, from a timeline the run keeps itself.

Each start of `pretrain train` (an attempt) writes run.output_dir/goodput/<attempt>.jsonl (process
0): one line per stretch of time, each from the end of the line before to its own `t`, so an
attempt's lines cover it without gaps from its start to its last line. `report` reads them all,
marks the steps a later attempt recomputed (those after the checkpoint it resumed from) as lost,
and counts what no attempt covered (restarts, a killed attempt's unrecorded end) as between
attempts: the parts add up to the wall time from the first start to the last record.
"""

import json
import time
from pathlib import Path

import jax
from etils import epath

from pretrain.config import ConfigError

DIR = "goodput"
PARTS = ("productive", "compile", "restore", "data_wait", "checkpoint", "eval", "startup", "skipped", "lost",
         "between_attempts")


class Timeline:
    """This attempt's lines (process 0). `steps_until(step)` closes the stretch of steps run since
    the last line; the other kinds close a stretch of their own (written right after it)."""

    def __init__(self, local_dir: Path, started: float, launch_id: str):
        self.enabled = jax.process_index() == 0
        self.last_step, self.data_wait_seen, self.skipped_seen = 0, 0.0, 0
        if not self.enabled:
            return
        (local_dir / DIR).mkdir(parents=True, exist_ok=True)
        name = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started)) + f".{int(started * 1000) % 1000:03d}.jsonl"
        self.file = (local_dir / DIR / name).open("a")
        self._write({"kind": "start", "t": started, "launch_id": launch_id})

    def add(self, kind: str, **fields):
        if self.enabled:
            self._write({"kind": kind, "t": time.time(), **fields})

    def steps_until(self, step: int, data_wait_s: float, skipped: int):
        """Closes the stretch of steps last_step+1 .. step (nothing if there were none); `data_wait_s`
        and `skipped`: the loop's total time waiting for input and its non-finite steps so far."""
        if step > self.last_step:
            self.add("steps", first=self.last_step + 1, last=step, data_wait_s=data_wait_s - self.data_wait_seen,
                     skipped=skipped - self.skipped_seen)
            self.last_step, self.data_wait_seen, self.skipped_seen = step, data_wait_s, skipped

    def resumed_at(self, step: int):
        self.last_step = step

    def _write(self, row: dict):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()  # a killed attempt keeps every stretch it closed

    def close(self):
        if self.enabled:
            self.file.close()


# --- the report --------------------------------------------------------------------------


def read_attempts(run_dir: str) -> list[list[dict]]:
    directory = epath.Path(run_dir) / DIR
    files = sorted(directory.glob("*.jsonl")) if directory.exists() else []
    attempts = [[json.loads(line) for line in f.read_text().splitlines() if line.strip()] for f in files]
    return sorted((a for a in attempts if a), key=lambda a: a[0]["t"])


def report(run_dir: str) -> dict:
    """{"wall_s", "goodput", "parts": {part: seconds}, "steps_lost", "attempts"} for a run directory."""
    attempts = read_attempts(run_dir)
    if not attempts:
        raise ConfigError(f"{run_dir} has no goodput timeline ({DIR}/*.jsonl); they are written by `pretrain train`")
    parts = dict.fromkeys(PARTS, 0.0)
    steps_lost = 0
    for i, lines in enumerate(attempts):
        # Steps after the checkpoint the next attempt started from were run again: lost.
        redone_after = _resumed_step(attempts[i + 1]) if i + 1 < len(attempts) else float("inf")
        if i:
            parts["between_attempts"] += lines[0]["t"] - attempts[i - 1][-1]["t"]
        for before, line in zip(lines, lines[1:]):
            seconds = line["t"] - before["t"]
            if line["kind"] != "steps":
                parts[line["kind"]] += seconds
                continue
            count = line["last"] - line["first"] + 1
            lost = max(0, min(count, line["last"] - redone_after))
            steps_lost += lost
            # Skipped steps (not finite) trained nothing; a stretch's time is shared out by its steps.
            skipped = min(line.get("skipped", 0), count - lost)
            parts["lost"] += seconds * lost / count
            parts["data_wait"] += line["data_wait_s"] * (count - lost) / count
            parts["skipped"] += (seconds - line["data_wait_s"]) * skipped / count
            parts["productive"] += (seconds - line["data_wait_s"]) * (count - lost - skipped) / count
    wall = attempts[-1][-1]["t"] - attempts[0][0]["t"]
    return {"wall_s": wall, "goodput": parts["productive"] / wall if wall > 0 else 0.0, "parts": parts,
            "steps_lost": steps_lost, "attempts": len(attempts)}


def _resumed_step(lines: list[dict]) -> int:
    return next((line["step"] for line in lines if line["kind"] == "restore"), 0)


def format_report(r: dict) -> str:
    rows = [f"goodput {100 * r['goodput']:.1f}% of {r['wall_s']:.1f} s over {r['attempts']} attempt(s); "
            f"{r['steps_lost']} steps lost (run again after a restart)"]
    rows += [f"  {part:<17} {seconds:10.1f} s {100 * seconds / max(r['wall_s'], 1e-9):6.1f}%"
             for part, seconds in r["parts"].items()]
    return "\n".join(rows)
