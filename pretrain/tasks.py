"""What a model family brings to the shared trainer: its model, loss, data and FLOP count.

The trainer owns everything else (mesh, optimizer, train step, logging); a task is the
only place the language model and the diffusion model differ.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from data import corpus, digits, images, pipeline, prepare, records
from data.prepare import TOKENIZER_FILE
from models import diffusion
from models.transformer import Transformer
from models.unet import UNet
from pretrain.config import Config, ConfigError, DiffusionRun
from pretrain.loss import output_cross_entropy
from pretrain.sample import draw_images, grid_columns


class Task:
    """A task gives the trainer: build_model(rngs); loss(model, batch, mesh, rules, key) -> (summed
    loss, weight, summed metrics), key being a training step's randomness (None in eval, which must
    be deterministic); units_per_step and flops_per_step for throughput and MFU; batch_shapes;
    prepare(model_axis) to open and check the data, which sets `sources`; batches(split, rows);
    eval_metrics(loss) for the eval row; write_samples(model, step)
    after each eval. Subclasses say how to read a source (_pipeline) and what random batches
    look like (_synthetic)."""

    unit: str  # what throughput counts
    sources: dict | None  # split -> random-access source of records, or None for an empty split

    def batches(self, split: str, rows: Sequence[int]):
        """Endless iterator (data.pipeline.Rows) over rows `rows` of each global batch; None if the
        split is empty. Its `positions` are the data position a checkpoint keeps."""
        cfg = self.cfg
        if cfg.data.source == "synthetic":
            return self._synthetic(rows)
        if self.sources is None:
            raise RuntimeError(f"{type(self).__name__}.prepare() must run before batches()")
        if self.sources[split] is None:
            return None
        train = split == "train"
        return self._pipeline(self.sources[split], train, global_batch=cfg.train.global_batch, rows=rows,
                              seed=cfg.run.seed if train else 0, workers=cfg.data.workers if train else 0)


class LanguageModelTask(Task):
    unit = "tokens"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.manifest, self.sources = None, None
        self.tokenizer = None  # the SentencePiece model's bytes, once prepared (none for synthetic data)

    def build_model(self, rngs):
        return Transformer(self.cfg.model, rngs=rngs)

    def loss(self, model, batch, mesh, rules, key=None):
        """(summed loss, number of target tokens, summed metrics) over a batch; needs no randomness."""
        hidden = model(batch["inputs"], batch["segment_ids"], batch["positions"])
        mask = (batch["segment_ids"] > 0).astype(jnp.float32)
        total, ce_sum, z_sum = output_cross_entropy(
            hidden, model.output_weight(), batch["targets"], mask, z_loss=self.cfg.optim.z_loss,
            chunk_tokens=self.cfg.model.loss_chunk_tokens, mesh=mesh, rules=rules,
        )
        return total, jnp.sum(mask), {"loss": ce_sum, "z_loss": z_sum}

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

    def _synthetic(self, rows: Sequence[int]):
        c = self.cfg
        return pipeline.synthetic_text_rows(vocab_size=c.model.vocab_size, seq_len=c.data.seq_len,
                                            global_batch=c.train.global_batch, rows=rows, seed=c.run.seed)

    def _pipeline(self, source, train: bool, **kwargs):
        return pipeline.text_rows(source, seq_len=self.cfg.data.seq_len, **kwargs)

    def eval_metrics(self, loss: float) -> dict:
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def write_samples(self, model, step: int):
        """Nothing: `pretrain sample` generates text from any checkpoint."""


class DiffusionTask(Task):
    """Denoising a UNet over images: noise at a random timestep, predict the config's target,
    min-SNR-weighted squared error; labels dropped to "no label" at random for guidance."""

    unit = "images"

    def __init__(self, cfg: DiffusionRun):
        self.cfg = cfg
        self.abar = diffusion.alpha_bar(cfg.diffusion.schedule, cfg.diffusion.timesteps)
        self.sources = None

    def build_model(self, rngs):
        return UNet(self.cfg.model, rngs=rngs)

    def loss(self, model, batch, mesh, rules, key=None):
        """(summed weighted squared error, number of images, summed metrics). Without a key (eval) the
        timesteps are spread evenly over the schedule and the noise is fixed: the same every eval."""
        d, m = self.cfg.diffusion, self.cfg.model
        x0 = batch["images"]
        b = x0.shape[0]
        if key is None:
            t = (jnp.arange(b) * d.timesteps + d.timesteps // 2) // b
            eps = jax.random.normal(jax.random.key(0), x0.shape)
        else:
            t_key, eps_key, drop_key = jax.random.split(key, 3)
            t = jax.random.randint(t_key, (b,), 0, d.timesteps)
            eps = jax.random.normal(eps_key, x0.shape)
        labels = None
        if m.num_classes:
            labels = batch["labels"]
            if key is not None and d.label_dropout > 0:
                labels = jnp.where(jax.random.bernoulli(drop_key, d.label_dropout, (b,)), m.num_classes, labels)
        out = model(diffusion.noise(x0, t, eps, self.abar), t, labels)
        err = jnp.mean(jnp.square(out - diffusion.target(d.target, x0, eps, t, self.abar)), axis=(1, 2, 3))
        total = jnp.sum(err * diffusion.loss_weight(d.target, t, self.abar, d.min_snr_gamma))
        return total, jnp.float32(b), {"loss": total}

    def units_per_step(self) -> int:
        return self.cfg.train.global_batch

    def flops_per_step(self) -> float:
        """3x the forward pass (the backward costs two), counted by XLA on one image."""
        m = self.cfg.model
        graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet(m, rngs=nnx.Rngs(0))))
        image = jax.ShapeDtypeStruct((1, m.image_size, m.image_size, m.channels), jnp.float32)
        ints = jax.ShapeDtypeStruct((1,), jnp.int32)
        forward = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y if m.num_classes else None))
        return 3 * forward.lower(state, image, ints, ints).cost_analysis()["flops"] * self.units_per_step()

    def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        m, b = self.cfg.model, self.cfg.train.global_batch
        return {"images": ((b, m.image_size, m.image_size, m.channels), np.dtype(np.float32)),
                "labels": ((b,), np.dtype(np.int32))}

    def prepare(self, model_axis: int):
        """Open the images (the embedded digits, a prepared dataset or a plain directory) and check
        their labels against the model."""
        d, m = self.cfg.data, self.cfg.model
        if d.source == "synthetic" or self.sources is not None:
            return
        if d.source == "digits":
            classes, sources = digits.CLASSES, {k: v or None for k, v in digits.records(d.val_fraction).items()}
        elif not epath.Path(d.source).is_dir():
            raise ConfigError(f"data.source={d.source} is not a directory; use digits, synthetic, a directory of "
                              "images or one from `pretrain prepare images`")
        elif (epath.Path(d.source) / records.MANIFEST).exists():
            directory = records.local_copy(d.source, d.cache_dir)
            manifest = records.read_manifest(directory, "images")
            classes = manifest["classes"]
            sources = {s: records.open_split(directory, manifest, s) for s in ("train", "validation")}
        else:
            classes, sources = prepare.image_directory(d.source, d.val_fraction)
        if sources["train"] is None:
            raise ConfigError(f"data.source={d.source} has no training images; lower data.val_fraction or add images")
        if m.num_classes and not classes:
            raise ConfigError(f"model.num_classes={m.num_classes} asks for class conditioning, but data.source={d.source} "
                              "has no labels; put the images in one subdirectory per class, or set model.num_classes=0")
        if len(classes) > m.num_classes > 0:
            raise ConfigError(f"data.source={d.source} has {len(classes)} classes, more than model.num_classes="
                              f"{m.num_classes}; set model.num_classes={len(classes)}")
        self.sources = sources

    def _synthetic(self, rows: Sequence[int]):
        c = self.cfg
        return pipeline.synthetic_image_rows(size=c.model.image_size, channels=c.model.channels,
                                             num_classes=c.model.num_classes, global_batch=c.train.global_batch,
                                             rows=rows, seed=c.run.seed)

    def _pipeline(self, source, train: bool, **kwargs):
        m = self.cfg.model
        return pipeline.image_rows(source, size=m.image_size, channels=m.channels,
                                   augment=self.cfg.data.augment and train, **kwargs)

    def eval_metrics(self, loss: float) -> dict:
        return {"eval_loss": loss}

    def write_samples(self, model, step: int):
        """A grid of diffusion.sample_num images (one column per class) under run.output_dir/samples/."""
        d = self.cfg.diffusion
        batch, labels = draw_images(model, d, jax.random.key(self.cfg.run.seed), num=d.sample_num,
                                    steps=d.sample_steps, guidance=d.guidance)
        if jax.process_index() == 0:
            out = epath.Path(self.cfg.run.output_dir) / "samples"
            out.mkdir(parents=True, exist_ok=True)
            (out / f"step_{step:07d}.png").write_bytes(images.grid_png(batch, grid_columns(labels)))


TASKS = {"llm": LanguageModelTask, "diffusion": DiffusionTask}
