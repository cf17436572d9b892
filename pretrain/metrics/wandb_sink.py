"""Weights & Biases as a log sink (run.wandb): every row and the resolved config, from process 0, on
a thread of its own, so that the step loop never waits for the W&B client. A resumed run goes on
with the same W&B run: its id is kept in the run directory (wandb_run_id). A failure of W&B (no
network, a bad key) is one warning, and the run goes on without it."""

import queue
import sys
import threading
import uuid
from pathlib import Path

from pretrain import config as config_lib
from pretrain.metrics.sinks import Sink

ID_FILE = "wandb_run_id"


class WandB(Sink):
    @staticmethod
    def wanted(cfg) -> bool:
        return cfg.run.wandb.mode != "disabled"

    def __init__(self, cfg, local_dir: Path, unit: str, resume_step: int):
        self.rows = queue.Queue()
        self.thread = threading.Thread(target=self._log, args=(cfg, local_dir), daemon=True)
        self.thread.start()

    def write(self, row: dict):
        self.rows.put(row)

    def close(self):
        self.rows.put(None)
        self.thread.join()

    def _log(self, cfg, local_dir: Path):
        run = self._start(cfg, local_dir)
        while (row := self.rows.get()) is not None:
            if run is None:
                continue  # W&B failed: the rows go to the other sinks only
            try:
                run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
            except Exception as e:  # noqa: BLE001 - whatever the client raises, the run goes on
                run = _warn(e)
        if run is not None:
            try:
                run.finish()
            except Exception as e:  # noqa: BLE001
                _warn(e)

    @staticmethod
    def _start(cfg, local_dir: Path):
        w = cfg.run.wandb
        try:
            import wandb  # only where a run asks for it

            id_file = local_dir / ID_FILE
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            return wandb.init(project=w.project, entity=w.entity or None, mode=w.mode, id=run_id, resume="allow",
                              name=cfg.run.name, dir=str(local_dir), config=config_lib.to_dict(cfg),
                              settings=wandb.Settings(silent=True))
        except Exception as e:  # noqa: BLE001
            return _warn(e)


def _warn(error: Exception) -> None:
    """One line on stderr; the run goes on without W&B."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"warning: W&B stopped logging ({message}); the run goes on, its rows in metrics.jsonl", file=sys.stderr,
          flush=True)
    return None
