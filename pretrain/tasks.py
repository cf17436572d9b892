"""What a model family brings to the shared trainer: its model, loss, data and FLOP count.

The trainer owns everything else (mesh, optimizer, train step, logging); a task is the
only place the language model and the diffusion model differ.
"""

import jax.numpy as jnp
import numpy as np

from data import corpus, pipeline, tokenizer
from models.transformer import Transformer
from pretrain.config import Config, ConfigError
from pretrain.loss import cross_entropy


class LanguageModelTask:
    unit = "tokens"  # what throughput counts

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._pieces = None

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

    def prepare(self):
        """Tokenise and pack the corpus (a tokenizer is trained on it and cached). Bad data
        settings raise ConfigError here, before the run writes anything."""
        d = self.cfg.data
        if d.source == "synthetic" or self._pieces is not None:
            return
        train_docs, val_docs = corpus.stdlib_documents(int(d.max_corpus_mb * 2**20), d.val_fraction)
        try:
            sp = tokenizer.train(train_docs, self.cfg.model.vocab_size, d.cache_dir)
        except RuntimeError as e:  # SentencePiece refuses a vocabulary the corpus cannot fill
            raise ConfigError(
                f"cannot train a {self.cfg.model.vocab_size}-piece tokenizer on the corpus ({str(e).strip()}); "
                "change model.vocab_size or data.max_corpus_mb"
            ) from None
        self._pieces = {
            "train": pipeline.split_documents(sp.encode(train_docs), d.seq_len),
            "validation": pipeline.split_documents(sp.encode(val_docs), d.seq_len),
        }

    def batches(self, split: str, process_index: int, process_count: int):
        """Endless iterator of this process's slice of each global batch; None if the split is empty."""
        cfg = self.cfg
        local = cfg.train.global_batch // process_count
        if cfg.data.source == "synthetic":
            return pipeline.synthetic(cfg.model.vocab_size, cfg.data.seq_len, local, cfg.run.seed + process_index)
        self.prepare()
        pieces = self._pieces[split]
        if not pieces:
            return None
        seed = cfg.run.seed if split == "train" else 0
        return iter(
            pipeline.text_pipeline(
                pieces, seq_len=cfg.data.seq_len, batch_size=local, seed=seed,
                process_index=process_index, process_count=process_count,
            )
        )


TASKS = {"llm": LanguageModelTask}
