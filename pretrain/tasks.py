"""What a model family brings to the shared trainer: its model, loss, data and FLOP count.

The trainer owns everything else (mesh, optimizer, train step, logging); a task is the
only place the language model and the diffusion model differ.
"""

import jax.numpy as jnp
import numpy as np

from data import corpus, pipeline, records
from data.prepare import TOKENIZER_FILE
from models.transformer import Transformer
from pretrain.config import Config, ConfigError
from pretrain.loss import cross_entropy


class LanguageModelTask:
    unit = "tokens"  # what throughput counts

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.manifest, self.sources = None, None
        self.tokenizer = None  # the SentencePiece model's bytes, once prepared (none for synthetic data)

    def build_model(self, rngs):
        return Transformer(self.cfg.model, rngs=rngs)

    def loss(self, model, batch, mesh, rules):
        """(summed loss, number of target tokens, summed metrics) over a batch."""
        hidden = model(batch["inputs"], batch["segment_ids"], batch["positions"])
        ce, log_z = cross_entropy(model.logits(hidden), batch["targets"], mesh, rules)
        weight = (batch["segment_ids"] > 0).astype(jnp.float32)
        ce_sum = jnp.sum(ce * weight)
        z_sum = jnp.sum(jnp.square(log_z) * weight)
        return ce_sum + self.cfg.optim.z_loss * z_sum, jnp.sum(weight), {"loss": ce_sum, "z_loss": z_sum}

    def units_per_step(self) -> int:
        return self.cfg.train.global_batch * self.cfg.data.seq_len

    def flops_per_step(self) -> float:
        return self.cfg.model.flops_per_token(self.cfg.data.seq_len) * self.units_per_step()

    def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        shape = (self.cfg.train.global_batch, self.cfg.data.seq_len)
        return {k: (shape, np.dtype(np.int32)) for k in ("inputs", "targets", "segment_ids", "positions")}

    def prepare(self, model_axis: int):
        """Open (and for the embedded corpus, build once) the prepared dataset and check it against
        the model. Bad data raises ConfigError or DataError here, before the run writes anything."""
        d, m = self.cfg.data, self.cfg.model
        if d.source == "synthetic" or self.sources is not None:
            return
        if d.source == "stdlib":
            directory = corpus.stdlib_dataset(
                d.cache_dir, vocab_size=m.vocab_size, seq_len=d.seq_len,
                max_bytes=int(d.max_corpus_mb * 2**20), val_fraction=d.val_fraction,
            )
        else:
            directory = records.local_copy(d.source, d.cache_dir)
        manifest = records.read_manifest(directory, "text")
        vocab = manifest["vocab_size"]
        padded = -(-vocab // model_axis) * model_axis
        if m.vocab_size not in (vocab, padded):
            pad_note = f" (its {vocab} pieces padded to a multiple of the model axis, {model_axis})" if padded != vocab else ""
            raise ConfigError(
                f"model.vocab_size={m.vocab_size} does not match the tokenizer of {d.source}; set model.vocab_size={padded}{pad_note}"
            )
        if manifest["seq_len"] > d.seq_len:
            raise ConfigError(
                f"data.seq_len={d.seq_len} is shorter than the pieces prepared in {d.source} (up to {manifest['seq_len']} "
                f"tokens), which cannot be packed into rows; set data.seq_len>={manifest['seq_len']} or prepare again "
                f"with --seq-len {d.seq_len}"
            )
        sources = {split: records.open_split(directory, manifest, split) for split in ("train", "validation")}
        if sources["train"] is None:
            raise ConfigError(f"data.source={d.source} has no training records; prepare it with more text")
        self.manifest, self.sources = manifest, sources
        self.tokenizer = (directory / TOKENIZER_FILE).read_bytes()

    def batches(self, split: str, process_index: int, process_count: int):
        """Endless iterator of this process's slice of each global batch; None if the split is empty.

        The training iterator is a Grain iterator whose get_state()/set_state() checkpoint it."""
        cfg = self.cfg
        local = cfg.train.global_batch // process_count
        if cfg.data.source == "synthetic":
            return pipeline.synthetic(cfg.model.vocab_size, cfg.data.seq_len, local, cfg.run.seed + process_index)
        if self.sources is None:
            raise RuntimeError("LanguageModelTask.prepare() must run before batches()")
        if self.sources[split] is None:
            return None
        train = split == "train"
        return iter(
            pipeline.text_pipeline(
                self.sources[split], seq_len=cfg.data.seq_len, batch_size=local, seed=cfg.run.seed if train else 0,
                process_index=process_index, process_count=process_count, workers=cfg.data.workers if train else 0,
            )
        )


TASKS = {"llm": LanguageModelTask}
