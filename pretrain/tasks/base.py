"""What a model family brings to the shared trainer, as a typed protocol (`Task`), and the data
plumbing both families share: batches of a split as Grain rows, held-out sets, epochs.

The trainer owns everything else (mesh, optimizer, train step, logging); a task is the only place
the families differ, and it checks its own model and data config (`resolve`) before anything is
compiled. A new family is a module here plus one line in pretrain/tasks/__init__.py.
"""

import abc
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.layers import REMAT_POLICIES
from pretrain.config import require
from pretrain.config.schema import Config
from pretrain.train import sharding


def check_execution(m, platform: str, policies=tuple(REMAT_POLICIES)):
    """How either model family runs: remat policy and compute dtype."""
    require(m.remat in policies, f"model.remat='{m.remat}' is unknown; use one of {sorted(policies)}")
    offloads = m.remat == "offload" or (m.remat == "custom" and "offload" in dataclasses.asdict(m.remat_custom).values())
    require(
        not (offloads and platform == "cpu"),
        f"model.remat={m.remat} offloads to host memory, which the CPU backend lacks; use model.remat=full or dots"
        + ", or no offload in model.remat_custom" * (m.remat == "custom"),
    )
    require(m.dtype in ("float32", "bfloat16", "float16"), f"model.dtype='{m.dtype}' must be float32, bfloat16 or float16")
    require(m.cpu_matmul_dtype in ("auto", "float32", "bfloat16"),
            f"model.cpu_matmul_dtype='{m.cpu_matmul_dtype}' must be auto, float32 or bfloat16")


class Task(abc.ABC):
    """What the trainer asks of a model family. `open_data` sets `sources`, `held_out` and `passes`;
    the batches, eval batches and epochs below are read from them. A subclass says how to read a
    source (_pipeline), where a lane's position is in its records (_record), and what random batches
    look like (_synthetic)."""

    unit: str  # what throughput counts
    model_class: type  # the NNX model, built as model_class(cfg.model, rngs=...)
    samples_from_ema = False  # whether sampling and serving read the EMA of the parameters, where a run kept one
    sources: dict | None  # split -> random-access source of records (a mixture's: pipeline.Mixture), or None if empty
    held_out: dict  # eval set name ("": the one dataset; a mixture: each dataset's name) -> held-out source
    passes: list  # (metric name, share of the training stream's records, records in one pass) per dataset

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.sources = None

    @staticmethod
    @abc.abstractmethod
    def resolve(cfg: Config, mesh_shape: tuple[int, int], platform: str) -> Config:
        """The config checked for this family on this mesh and platform (ConfigError if not), with
        its `auto` values decided."""

    @staticmethod
    def axis_rules(cfg: Config, model_axis: int) -> tuple:
        """The logical-axis rules of this family's parameters and activations (pretrain/train/sharding.py)."""
        return sharding.LOGICAL_RULES

    def build_model(self, rngs):
        return self.model_class(self.cfg.model, rngs=rngs)

    @abc.abstractmethod
    def loss(self, model, batch: dict, mesh, rules, key=None) -> tuple:
        """(summed loss, weight, summed metrics) over a batch; `key` is a training step's randomness
        (None in eval, which must be deterministic). The metrics' "units", if there, count what was
        trained on per dataset."""

    @abc.abstractmethod
    def units_per_step(self) -> int:
        """What throughput counts in one step if nothing were padding."""

    @abc.abstractmethod
    def flops_per_step(self) -> float:
        """Training FLOPs of one step, the MFU numerator."""

    @abc.abstractmethod
    def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """The global batch: name -> (shape, dtype)."""

    @abc.abstractmethod
    def open_data(self, model_axis: int):
        """Open and check the data (bad data raises ConfigError or DataError, before the run writes
        anything); sets `sources`, `held_out` and `passes`."""

    @abc.abstractmethod
    def eval_metrics(self, loss: float) -> dict:
        """The eval row's values for a held-out loss."""

    @abc.abstractmethod
    def write_samples(self, model, step: int, local_dir: Path) -> dict[str, float]:
        """What the task shows after each eval, under the run's local files; returns the samples'
        scores for a log row (none: empty)."""

    @abc.abstractmethod
    def planned_flops(self) -> dict[str, float]:
        """For `pretrain plan`, per step: "model" (the MFU count), "executed" (what the chips execute,
        recomputation included), "hidden" (of which inside custom calls the compiled program's text
        does not show), and any other count the task reports an MFU for ("causal")."""

    def downstream_every(self) -> int | None:
        """Steps between downstream evals (0: at the end only), or None where the run has none."""
        return None

    def downstream(self, model) -> dict[str, float]:
        """The downstream scores of `model` for a log row."""
        return {}

    @staticmethod
    @abc.abstractmethod
    def _record(position: int) -> int:
        """The record a lane at data position `position` reads next."""

    @abc.abstractmethod
    def _synthetic(self, rows: Sequence[int]):
        """Random batches of the right shape (data.source=synthetic), as `batches`."""

    @abc.abstractmethod
    def _pipeline(self, source, train: bool, **kwargs):
        """The Grain rows of one source."""

    def batches(self, split: str, rows: Sequence[int]):
        """Endless iterator (data.pipeline.Rows) over rows `rows` of each global batch; None if the
        split is empty. Its `positions` are the data position a checkpoint keeps. Training data ends
        after data.num_epochs, if set."""
        if self.cfg.data.source == "synthetic":
            return self._synthetic(rows)
        self._check_prepared()
        return self._rows(self.sources[split], split == "train", rows) if self.sources[split] is not None else None

    def eval_batches(self, rows: Sequence[int]) -> dict:
        """Rows (as `batches`) of each held-out set, by name; {} without held-out data."""
        if self.cfg.data.source == "synthetic":
            return {"": self._synthetic(rows)}
        self._check_prepared()
        return {name: self._rows(source, False, rows) for name, source in self.held_out.items()}

    def epochs(self, positions: np.ndarray, rows: Sequence[int]) -> dict[str, float]:
        """Passes through each training dataset so far, at this process's lanes' `positions`: the lane
        furthest behind has trained on every record before its next one in the stream."""
        if self.cfg.data.source == "synthetic":
            return {}
        index = min(row + self._record(int(p)) * self.cfg.train.global_batch for row, p in zip(rows, positions))
        return {name: index * share / length for name, share, length in self.passes}

    def _check_prepared(self):
        if self.sources is None:
            raise RuntimeError(f"{type(self).__name__}.open_data() must run before batches()")

    def _rows(self, source, train: bool, rows: Sequence[int]):
        cfg = self.cfg
        return self._pipeline(source, train, global_batch=cfg.train.global_batch, rows=rows,
                              seed=cfg.run.seed if train else 0, workers=cfg.data.workers if train else 0,
                              num_epochs=(cfg.data.num_epochs or None) if train else None)

    def _one_dataset(self, sources: dict):
        """`sources` (split -> source) as the run's data."""
        self.sources, self.held_out = sources, {"": sources["validation"]} if sources["validation"] is not None else {}
        self.passes = [("epoch", 1.0, len(sources["train"]))]

