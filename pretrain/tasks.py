"""What a model family brings to the shared trainer: its model, loss, data and FLOP count.

The trainer owns everything else (mesh, optimizer, train step, logging); a task is the
only place the language model and the diffusion model differ.
"""

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from data import corpus, digits, images, pipeline, prepare, records
from data import tokenizer as tokenizer_lib
from models import diffusion
from models.attention import BACKENDS, splash_blocks
from models.configs import REMAT_CHOICES, ROPE_SCALINGS, RopeScaling
from models.diffusion import SCHEDULES, TARGETS
from models.layers import REMAT_POLICIES
from models.transformer import Transformer
from models.unet import UNet
from pretrain import checkpoint, export
from pretrain.config import ConfigError, require
from pretrain.schema import DiffusionRun, LanguageModelRun
from pretrain.loss import output_cross_entropy
from pretrain.sample import draw_images, grid_columns


# --- checks of a task's own config, before anything is compiled (pretrain.config checks the rest) ---


def _check_execution(m, platform: str, policies=tuple(REMAT_POLICIES)):
    """How either model family runs: remat policy and compute dtype."""
    require(m.remat in policies, f"model.remat='{m.remat}' is unknown; use one of {sorted(policies)}")
    offloads = m.remat == "offload" or (m.remat == "custom" and "offload" in dataclasses.asdict(m.remat_custom).values())
    require(
        not (offloads and platform == "cpu"),
        f"model.remat={m.remat} offloads to host memory, which the CPU backend lacks; use model.remat=full or dots"
        + ", or no offload in model.remat_custom" * (m.remat == "custom"),
    )
    require(m.dtype in ("float32", "bfloat16", "float16"), f"model.dtype='{m.dtype}' must be float32, bfloat16 or float16")


AUTO_ATTENTION = {"tpu": "splash", "gpu": "cudnn"}  # model.attention=auto by platform; xla elsewhere


def _check_transformer(cfg: LanguageModelRun, data: int, model: int, platform: str):
    m = cfg.model
    known = sorted(BACKENDS) + ["auto"]
    require(m.attention in known, f"model.attention='{m.attention}' is unknown; use one of {known}")
    require(
        not (m.attention == "cudnn" and platform != "gpu"),
        f"model.attention=cudnn needs an NVIDIA GPU (this is {platform}); use model.attention=xla",
    )
    for key in ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "vocab_size", "max_seq_len", "loss_chunk_tokens"):
        require(getattr(m, key) > 0, f"model.{key} must be positive")
    require(m.head_dim % 2 == 0, f"model.head_dim={m.head_dim} must be even for rotary embeddings")
    _check_rope_scaling(m.rope_scaling)
    for name, choice in dataclasses.asdict(m.remat_custom).items():
        require(choice in REMAT_CHOICES, f"model.remat_custom.{name}='{choice}' is unknown; use one of {list(REMAT_CHOICES)}")
    require(
        m.num_heads % m.num_kv_heads == 0,
        f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}",
    )
    for key in ("num_heads", "mlp_dim", "vocab_size"):
        require(
            getattr(m, key) % model == 0,
            f"model.{key}={getattr(m, key)} is not divisible by the model axis ({model}); "
            f"change model.{key} or mesh.model",
        )
    split = cfg.mesh.residual_split
    if split != "none":
        key, size = ("data.seq_len", cfg.data.seq_len) if split == "length" else ("model.embed_dim", m.embed_dim)
        require(size % model == 0, f"mesh.residual_split={split} splits {key}={size} over the model axis ({model}), "
                f"which does not divide it; change {key} or mesh.model")
    require(
        m.num_kv_heads < model or m.num_kv_heads % model == 0,
        f"model.num_kv_heads={m.num_kv_heads} is not divisible by the model axis ({model}); "
        "use a multiple of it, or fewer kv heads than it (they are then replicated)",
    )
    require(
        m.embed_dim % data == 0,
        f"model.embed_dim={m.embed_dim} is not divisible by the data axis ({data}), which shards parameters (FSDP)",
    )
    require(
        cfg.data.seq_len <= m.max_seq_len,
        f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower data.seq_len",
    )
    require(cfg.data.seq_len > 0, "data.seq_len must be positive")
    if m.attention == "splash":
        _check_splash(cfg, platform)


def _check_mixture(d):
    """data.sources, its names already resolved."""
    if not d.sources:
        return
    require(d.source != "synthetic", "data.sources and data.source=synthetic exclude each other; drop one")
    for i, s in enumerate(d.sources):
        require(s.path, f"data.sources[{i}] has no path; give the directory of a prepared text dataset")
        require(s.weight > 0, f"data.sources[{i}] ({s.name}) has weight {s.weight}; weights must be positive")
    names = [s.name for s in d.sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    require(not twice, f"data.sources names {twice} more than one dataset; give each a distinct name")


def _check_rope_scaling(s: RopeScaling):
    require(s.type in ROPE_SCALINGS, f"model.rope_scaling.type='{s.type}' is unknown; use one of {list(ROPE_SCALINGS)}")
    if s.type == "none":
        return
    require(s.factor >= 1, f"model.rope_scaling.factor={s.factor} must be >= 1 (how many times longer the context gets)")
    if s.type == "llama3":
        require(0 < s.low_freq_factor < s.high_freq_factor,
                f"model.rope_scaling: low_freq_factor={s.low_freq_factor} and high_freq_factor={s.high_freq_factor} "
                "must satisfy 0 < low < high (Llama 3.1 uses 1 and 4)")
        require(s.original_max_position_embeddings > 0, "model.rope_scaling.original_max_position_embeddings must be "
                                                         "positive (the context of pretraining, 8192 for Llama 3)")


def _check_resumed_tokenizer(cfg: LanguageModelRun, tokenizer: tokenizer_lib.Tokenizer | None):
    """Continued pretraining must read text as the weights learnt it: the data's tokenizer is the one
    kept with the parameters of checkpoint.resume_from, where that run kept one."""
    wanted = cfg.checkpoint.resume_from
    if not wanted or wanted.isdigit() or tokenizer is None:
        return
    try:
        directory, _ = checkpoint.locate(wanted)
    except ConfigError:
        return  # the resume plan reports a path without checkpoints
    theirs = tokenizer_lib.read(export.run_dir(directory))
    require(theirs is None or theirs.same_ids(tokenizer),
            f"data.source={cfg.data.source} was tokenised with another tokenizer than the one of checkpoint.resume_from="
            f"{wanted}; prepare the data with `pretrain prepare text --tokenizer {export.run_dir(directory)}`")


def _check_splash(cfg: LanguageModelRun, platform: str):
    m, length = cfg.model, cfg.data.seq_len
    require(
        platform in ("tpu", "cpu"),
        f"model.attention=splash is a TPU kernel (this is {platform}); use model.attention=auto",
    )
    blocks = splash_blocks(length, m.splash_block_q, m.splash_block_kv)
    for key, block in zip(("splash_block_q", "splash_block_kv"), blocks):
        require(
            block % 128 == 0 and length % block == 0,
            f"model.attention=splash: its blocks of {block} tokens (model.{key}={getattr(m, key)}, capped at "
            f"data.seq_len={length}) must be a multiple of 128 that divides data.seq_len; change data.seq_len or "
            f"model.{key}, or use model.attention=xla",
        )


def _check_unet(cfg: DiffusionRun, data: int, model: int):
    m, d = cfg.model, cfg.diffusion
    for key in ("image_size", "base_channels", "blocks_per_resolution", "num_heads", "groups"):
        require(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive")
    require(m.channels in (1, 3), f"model.channels={m.channels} must be 1 (grayscale) or 3 (RGB)")
    require(m.num_classes >= 0, f"model.num_classes={m.num_classes} must be >= 0 (0: unconditional)")
    require(bool(m.channel_mults) and min(m.channel_mults) > 0, "model.channel_mults must be a non-empty list of positive ints")
    downsamples = len(m.channel_mults) - 1
    require(
        m.image_size % 2**downsamples == 0,
        f"model.image_size={m.image_size} is not divisible by 2^{downsamples}={2**downsamples}, which the "
        f"{downsamples} downsamples of model.channel_mults={m.channel_mults} need; change one of them",
    )
    for r in m.attention_resolutions:
        require(
            r in m.resolutions,
            f"model.attention_resolutions has {r}, which is not among the model's resolutions {m.resolutions}; "
            "list only those",
        )
    for mult in sorted(set(m.channel_mults)):
        c = m.base_channels * mult
        where = f"channels={c} (model.base_channels x {mult})"
        require(c % m.groups == 0, f"{where} are not divisible by model.groups={m.groups}; change model.groups")
        require(c % model == 0, f"{where} are not divisible by the model axis ({model}); change model.base_channels or mesh.model")
        require(c % data == 0, f"{where} are not divisible by the data axis ({data}), which shards parameters (FSDP); "
                                "change model.base_channels or mesh.data")
        require(c % m.num_heads == 0, f"{where} are not divisible by model.num_heads={m.num_heads}; change model.num_heads")
    require(d.schedule in SCHEDULES, f"diffusion.schedule='{d.schedule}' is unknown; use one of {list(SCHEDULES)}")
    require(d.target in TARGETS, f"diffusion.target='{d.target}' is unknown; use one of {list(TARGETS)}")
    require(d.timesteps > 1, f"diffusion.timesteps={d.timesteps} must be at least 2")
    require(d.min_snr_gamma >= 0, f"diffusion.min_snr_gamma={d.min_snr_gamma} must be >= 0 (0: off)")
    require(0 <= d.label_dropout < 1, f"diffusion.label_dropout={d.label_dropout} must be in [0, 1)")
    require(0 < d.sample_steps <= d.timesteps, f"diffusion.sample_steps={d.sample_steps} must be in [1, diffusion.timesteps]")
    require(0 <= d.eta <= 1, f"diffusion.eta={d.eta} must be in [0, 1] (0: DDIM, 1: DDPM)")
    require(d.guidance >= 0, f"diffusion.guidance={d.guidance} must be >= 0")
    require(
        d.sample_num > 0 and d.sample_num % data == 0,
        f"diffusion.sample_num={d.sample_num} must be a positive multiple of the data axis ({data})",
    )
    require(0 <= cfg.data.val_fraction < 1, f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")


class Task:
    """A task gives the trainer: build_model(rngs); loss(model, batch, mesh, rules, key) -> (summed
    loss, weight, summed metrics), key being a training step's randomness (None in eval, which must
    be deterministic), the metrics' "units" (if there) counting what was trained on per dataset;
    units_per_step and flops_per_step for throughput and MFU; batch_shapes; prepare(model_axis) to
    open and check the data, which sets `sources`, `held_out` and `passes`; batches(split, rows) and
    eval_batches(rows); eval_metrics(loss) for the eval row; write_samples(model, step, local_dir)
    after each eval. Subclasses say how to read a source (_pipeline), where a lane's position is in
    its records (_record), and what random batches look like (_synthetic)."""

    unit: str  # what throughput counts
    sources: dict | None  # split -> random-access source of records (a mixture's: pipeline.Mixture), or None if empty
    held_out: dict  # eval set name ("": the one dataset; a mixture: each dataset's name) -> held-out source
    passes: list  # (metric name, share of the training stream's records, records in one pass) per dataset

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
            raise RuntimeError(f"{type(self).__name__}.prepare() must run before batches()")

    def _rows(self, source, train: bool, rows: Sequence[int]):
        cfg = self.cfg
        return self._pipeline(source, train, global_batch=cfg.train.global_batch, rows=rows,
                              seed=cfg.run.seed if train else 0, workers=cfg.data.workers if train else 0,
                              num_epochs=(cfg.data.num_epochs or None) if train else None)

    def _one_dataset(self, sources: dict):
        """`sources` (split -> source) as the run's data."""
        self.sources, self.held_out = sources, {"": sources["validation"]} if sources["validation"] is not None else {}
        self.passes = [("epoch", 1.0, len(sources["train"]))]


class LanguageModelTask(Task):
    unit = "tokens"

    @staticmethod
    def resolve(cfg: LanguageModelRun, mesh_shape: tuple[int, int], platform: str) -> LanguageModelRun:
        """The config checked for this model on this mesh and platform, with `auto` attention
        resolved (a new config: the run's config.yaml then names the backend it ran)."""
        if cfg.model.attention == "auto":
            attention = AUTO_ATTENTION.get(platform, "xla")
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention))
        if any(not s.name for s in cfg.data.sources):  # a dataset is named by its directory
            named = [dataclasses.replace(s, name=s.name or s.path.rstrip("/").rsplit("/", 1)[-1]) for s in cfg.data.sources]
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=named))
        _check_execution(cfg.model, platform, (*REMAT_POLICIES, "custom"))  # custom: the layers name their tensors
        _check_transformer(cfg, *mesh_shape, platform)
        _check_mixture(cfg.data)
        return cfg

    def __init__(self, cfg: LanguageModelRun):
        self.cfg = cfg
        self.sources = None
        self.tokenizer = None  # the dataset's data.tokenizer.Tokenizer, once prepared (none for synthetic data)

    def build_model(self, rngs):
        return Transformer(self.cfg.model, rngs=rngs)

    def loss(self, model, batch, mesh, rules, key=None):
        """(summed loss, number of target tokens, summed metrics) over a batch; needs no randomness.
        A mixture's batch also counts its target tokens per dataset (the metrics' "units")."""
        hidden = model(batch["inputs"], batch["segment_ids"], batch["positions"])
        mask = (batch["segment_ids"] > 0).astype(jnp.float32)
        total, ce_sum, z_sum = output_cross_entropy(
            hidden, model.output_weight(), batch["targets"], mask, z_loss=self.cfg.optim.z_loss,
            chunk_tokens=self.cfg.model.loss_chunk_tokens, mesh=mesh, rules=rules,
        )
        sums = {"loss": ce_sum, "z_loss": z_sum}
        if "dataset_ids" in batch:
            ids = batch["dataset_ids"]
            sums["units"] = jnp.stack([jnp.sum(mask * (ids == j)) for j in range(len(self.cfg.data.sources))])
        return total, jnp.sum(mask), sums

    def units_per_step(self) -> int:
        return self.cfg.train.global_batch * self.cfg.data.seq_len

    def flops_per_step(self) -> float:
        return self.cfg.model.flops_per_token(self.cfg.data.seq_len) * self.units_per_step()

    def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        shape = (self.cfg.train.global_batch, self.cfg.data.seq_len)
        names = ("inputs", "targets", "segment_ids", "positions") + (("dataset_ids",) if self.cfg.data.sources else ())
        return {k: (shape, np.dtype(np.int32)) for k in names}

    def prepare(self, model_axis: int):
        """Open (and for the embedded corpus, build once) the prepared dataset, or each dataset of a
        mixture, and check it against the model. Bad data raises ConfigError or DataError here, before
        the run writes anything."""
        d, m = self.cfg.data, self.cfg.model
        if d.source == "synthetic" or self.sources is not None:
            return
        if d.sources:
            return self._prepare_mixture(model_axis)
        if d.source == "stdlib":
            directory = corpus.stdlib_dataset(
                d.cache_dir, vocab_size=m.vocab_size, seq_len=d.seq_len,
                max_bytes=int(d.max_corpus_mb * 2**20), val_fraction=d.val_fraction,
            )
        else:
            directory = epath.Path(d.source)  # local or gs://, read in place
        _, sources = self._open(directory, f"data.source={d.source}", model_axis)
        self._one_dataset(sources)

    def _open(self, directory, label: str, model_axis: int) -> tuple[dict, dict]:
        """(manifest, split -> source) of one prepared text dataset, checked against the model."""
        d, m = self.cfg.data, self.cfg.model
        manifest = records.read_manifest(directory, "text")
        self.tokenizer = tokenizer_lib.read(directory)
        _check_resumed_tokenizer(self.cfg, self.tokenizer)
        vocab = manifest["vocab_size"]
        padded = -(-vocab // model_axis) * model_axis
        if m.vocab_size not in (vocab, padded):
            pad_note = f" (its {vocab} pieces padded to a multiple of the model axis, {model_axis})" if padded != vocab else ""
            raise ConfigError(
                f"model.vocab_size={m.vocab_size} does not match the tokenizer of {label}; set model.vocab_size={padded}{pad_note}"
            )
        if manifest["seq_len"] > d.seq_len:
            raise ConfigError(
                f"data.seq_len={d.seq_len} is shorter than the pieces prepared in {label} (up to {manifest['seq_len']} "
                f"tokens), which cannot be packed into rows; set data.seq_len>={manifest['seq_len']} or prepare again "
                f"with --seq-len {d.seq_len}"
            )
        sources = {split: records.open_split(directory, manifest, split) for split in ("train", "validation")}
        if sources["train"] is None:
            raise ConfigError(f"{label} has no training records; prepare it with more text")
        return manifest, sources

    def _prepare_mixture(self, model_axis: int):
        """data.sources: one tokenizer for all; each dataset's weight, a share of tokens, becomes a share
        of records by its mean targets per record."""
        opened, first = [], None
        for i, s in enumerate(self.cfg.data.sources):
            label = f"data.sources[{i}] ({s.name}: {s.path})"
            manifest, sources = self._open(epath.Path(s.path), label, model_axis)
            if first is None:
                first = (label, manifest["tokenizer_sha256"], s.path)
            elif manifest["tokenizer_sha256"] != first[1]:
                raise ConfigError(f"{first[0]} and {label} were prepared with different tokenizers; prepare {s.path} "
                                  f"again with the first's: `pretrain prepare text --tokenizer {first[2]} ...`")
            train = manifest["splits"]["train"]
            opened.append((s, sources, (train["tokens"] - train["documents"]) / train["records"]))
        weights = [s.weight / targets for s, _, targets in opened]
        shares = [w / sum(weights) for w in weights]
        self.sources = {"train": pipeline.Mixture([src["train"] for _, src, _ in opened], shares)}
        self.held_out = {s.name: src["validation"] for s, src, _ in opened if src["validation"] is not None}
        self.passes = [(f"epoch/{s.name}", share, len(src["train"])) for (s, src, _), share in zip(opened, shares)]

    @staticmethod
    def _record(position: int) -> int:
        return pipeline.text_record(position)

    def _synthetic(self, rows: Sequence[int]):
        c = self.cfg
        return pipeline.synthetic_text_rows(vocab_size=c.model.vocab_size, seq_len=c.data.seq_len,
                                            global_batch=c.train.global_batch, rows=rows, seed=c.run.seed)

    def _pipeline(self, source, train: bool, **kwargs):
        return pipeline.text_rows(source, seq_len=self.cfg.data.seq_len, **kwargs)

    def eval_metrics(self, loss: float) -> dict:
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def write_samples(self, model, step: int, local_dir: Path):
        """Nothing: `pretrain sample` generates text from any checkpoint."""


class DiffusionTask(Task):
    """Denoising a UNet over images: noise at a random timestep, predict the config's target,
    min-SNR-weighted squared error; labels dropped to "no label" at random for guidance."""

    unit = "images"

    @staticmethod
    def resolve(cfg: DiffusionRun, mesh_shape: tuple[int, int], platform: str) -> DiffusionRun:
        """The config checked for this model on this mesh and platform."""
        _check_execution(cfg.model, platform)
        _check_unet(cfg, *mesh_shape)
        return cfg

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
            manifest = records.read_manifest(d.source, "images")
            classes = manifest["classes"]
            sources = {s: records.open_split(d.source, manifest, s) for s in ("train", "validation")}
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
        self._one_dataset(sources)

    def _synthetic(self, rows: Sequence[int]):
        c = self.cfg
        return pipeline.synthetic_image_rows(size=c.model.image_size, channels=c.model.channels,
                                             num_classes=c.model.num_classes, global_batch=c.train.global_batch,
                                             rows=rows, seed=c.run.seed)

    @staticmethod
    def _record(position: int) -> int:
        return position  # one image per row

    def _pipeline(self, source, train: bool, **kwargs):
        m = self.cfg.model
        return pipeline.image_rows(source, size=m.image_size, channels=m.channels,
                                   augment=self.cfg.data.augment and train, **kwargs)

    def eval_metrics(self, loss: float) -> dict:
        return {"eval_loss": loss}

    def write_samples(self, model, step: int, local_dir: Path):
        """A grid of diffusion.sample_num images (one column per class) under samples/ of the run's
        local files (pretrain/outputs.py)."""
        d = self.cfg.diffusion
        batch, labels = draw_images(model, d, jax.random.key(self.cfg.run.seed), num=d.sample_num,
                                    steps=d.sample_steps, guidance=d.guidance)
        if jax.process_index() == 0:
            out = local_dir / "samples"
            out.mkdir(parents=True, exist_ok=True)
            (out / f"step_{step:07d}.png").write_bytes(images.grid_png(batch, grid_columns(labels)))


TASKS = {"llm": LanguageModelTask, "diffusion": DiffusionTask}
