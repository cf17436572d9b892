"""The diffusion task: a UNet denoising images (the embedded digits, a prepared dataset or a
directory), or the latents of captioned images (a dataset of `pretrain prepare images --pipeline`)
for a text-conditioned UNet; min-SNR weighting and classifier-free guidance; sample grids after
each eval."""

import dataclasses
import functools
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from data import digits, images, latents, pipeline, records
from data.prepare.local import image_directory
from models import diffusion
from models.diffusion import SCHEDULES, SPACINGS, TARGETS
from models.unet import TIME_CONDITIONING, UNet
from pretrain.config import ConfigError, require
from pretrain.config.schema import DiffusionConfig, DiffusionRun
from pretrain.formats.latent import LatentPipeline
from pretrain.tasks.base import Task, check_execution


def _check_unet(cfg: DiffusionRun, data: int, model: int):
    m, d = cfg.model, cfg.diffusion
    for key in ("image_size", "base_channels", "blocks_per_resolution", "num_heads", "groups"):
        require(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive")
    require(m.channels > 0, f"model.channels={m.channels} must be positive")
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
        if m.head_channels:
            require(c % m.head_channels == 0, f"{where} are not divisible by model.head_channels={m.head_channels}; "
                                              "change model.head_channels")
        else:
            require(c % m.num_heads == 0, f"{where} are not divisible by model.num_heads={m.num_heads}; change model.num_heads")
    require(m.head_channels >= 0, f"model.head_channels={m.head_channels} must be >= 0 (0: model.num_heads heads per block)")
    require(m.cross_attention_dim >= 0, f"model.cross_attention_dim={m.cross_attention_dim} must be >= 0 (0: no text)")
    if m.cross_attention_dim:
        require(m.context_length > 0, f"model.context_length={m.context_length} must be positive")
        require(m.num_classes == 0, f"model.num_classes={m.num_classes} and model.cross_attention_dim="
                                    f"{m.cross_attention_dim} condition on both labels and text; set one of them to 0")
    require(m.time_conditioning in TIME_CONDITIONING,
            f"model.time_conditioning='{m.time_conditioning}' is unknown; use one of {list(TIME_CONDITIONING)}")
    require(m.downsample_padding in (0, 1), f"model.downsample_padding={m.downsample_padding} must be 0 (bottom and "
                                            "right only) or 1 (every side)")
    require(0 <= m.freq_shift < m.base_channels // 2,
            f"model.freq_shift={m.freq_shift} must be in [0, model.base_channels / 2)")
    _check_process(cfg, data)


def _check_process(cfg: DiffusionRun, data: int):
    """The diffusion process, the sampler and the data settings."""
    d = cfg.diffusion
    require(d.schedule in SCHEDULES, f"diffusion.schedule='{d.schedule}' is unknown; use one of {list(SCHEDULES)}")
    require(d.spacing in SPACINGS, f"diffusion.spacing='{d.spacing}' is unknown; use one of {list(SPACINGS)}")
    require(d.target in TARGETS, f"diffusion.target='{d.target}' is unknown; use one of {list(TARGETS)}")
    require(d.timesteps > 1, f"diffusion.timesteps={d.timesteps} must be at least 2")
    require(d.min_snr_gamma >= 0, f"diffusion.min_snr_gamma={d.min_snr_gamma} must be >= 0 (0: off)")
    require(0 <= d.label_dropout < 1, f"diffusion.label_dropout={d.label_dropout} must be in [0, 1)")
    require(0 < d.sample_steps <= d.timesteps, f"diffusion.sample_steps={d.sample_steps} must be in [1, diffusion.timesteps]")
    require(0 <= d.steps_offset < d.timesteps // d.sample_steps,
            f"diffusion.steps_offset={d.steps_offset} must be in [0, diffusion.timesteps / diffusion.sample_steps)")
    require(0 <= d.eta <= 1, f"diffusion.eta={d.eta} must be in [0, 1] (0: DDIM, 1: DDPM)")
    require(d.guidance >= 0, f"diffusion.guidance={d.guidance} must be >= 0")
    require(
        d.sample_num > 0 and d.sample_num % data == 0,
        f"diffusion.sample_num={d.sample_num} must be a positive multiple of the data axis ({data})",
    )
    require(0 <= cfg.data.val_fraction < 1, f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    require(cfg.mesh.residual_split == "none", "mesh.residual_split splits a language model's residual stream; "
                                               "task diffusion has none: set it to none")


def draw_images(model, d: DiffusionConfig, key, *, num: int, steps: int, guidance: float, label: int | None = None,
                eta: float | None = None, noise=None, context=None, null_context=None):
    """(images [num, H, W, C] on the host (latents of a latent model), labels [num]) from a UNet: all
    of class `label`, else cycling through the classes, else -1 (unconditional); a text-conditioned
    UNet reads `context` [num, T, D] (guided towards it from null_context [T, D]). From the starting
    `noise` if given; eta defaults to the run's diffusion.eta."""
    classes = model.cfg.num_classes
    labels = np.full(num, -1 if label is None else label, np.int32)
    if classes and label is None:
        labels = np.arange(num, dtype=np.int32) % classes
    out = diffusion.generate(model, jnp.asarray(labels) if classes else None, key, schedule=d.schedule,
                             timesteps=d.timesteps, kind=d.target, num=num, steps=steps,
                             eta=d.eta if eta is None else eta, guidance=guidance, spacing=d.spacing,
                             clip=d.clip_sample, offset=d.steps_offset, alpha_to_one=d.set_alpha_to_one,
                             x_T=None if noise is None else jnp.asarray(noise, jnp.float32),
                             context=None if context is None else jnp.asarray(context),
                             null_context=None if null_context is None else jnp.asarray(null_context))
    return np.asarray(multihost_utils.process_allgather(out, tiled=True)), labels


def grid_columns(labels: np.ndarray) -> int:
    """One column per class when the labels cycle through several classes, else a square-ish grid."""
    if labels.min() >= 0 and len(set(labels.tolist())) > 1:
        return int(labels.max()) + 1
    return int(np.ceil(np.sqrt(len(labels))))



class LatentData(NamedTuple):
    """What a latent dataset gives beside its records."""

    layout: latents.Layout
    empty: np.ndarray  # the empty prompt's states, bfloat16 [length, width]
    carried: str  # where under the dataset its pipeline's VAE, text encoder and tokenizer are


class DiffusionTask(Task):
    """Denoising a UNet over images: noise at a random timestep, predict the config's target,
    min-SNR-weighted squared error; labels dropped to "no label" at random for guidance."""

    unit = "images"
    model_class = UNet
    samples_from_ema = True

    @staticmethod
    def resolve(cfg: DiffusionRun, mesh_shape: tuple[int, int], platform: str) -> DiffusionRun:
        """The config checked for this model on this mesh and platform, with `auto` attention decided."""
        check_execution(cfg.model, platform)
        if cfg.model.attention == "auto":
            attention = "splash" if platform == "tpu" else "xla"
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention))
        require(cfg.model.attention in ("xla", "splash"),
                f"model.attention='{cfg.model.attention}' is unknown for a UNet; use auto, xla or splash")
        require(cfg.model.attention == "xla" or platform in ("tpu", "cpu"),
                f"model.attention=splash is a TPU kernel (this is {platform}); use model.attention=auto")
        _check_unet(cfg, *mesh_shape)
        return cfg

    def __init__(self, cfg: DiffusionRun):
        super().__init__(cfg)
        self.abar = diffusion.alpha_bar(cfg.diffusion.schedule, cfg.diffusion.timesteps)
        self.latents: LatentData | None = None

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
        labels, context = None, batch.get("context")
        if m.num_classes:
            labels = batch["labels"]
            if key is not None and d.label_dropout > 0:
                labels = jnp.where(jax.random.bernoulli(drop_key, d.label_dropout, (b,)), m.num_classes, labels)
        out = model(diffusion.noise(x0, t, eps, self.abar), t, labels, context)
        err = jnp.mean(jnp.square(out - diffusion.target(d.target, x0, eps, t, self.abar)), axis=(1, 2, 3))
        total = jnp.sum(err * diffusion.loss_weight(d.target, t, self.abar, d.min_snr_gamma))
        return total, jnp.float32(b), {"loss": total}

    def units_per_step(self) -> int:
        return self.cfg.train.global_batch

    def flops_per_step(self) -> float:
        """3x the forward pass (the backward costs two), counted by XLA on one image."""
        return 3 * self._flops_per_image(lambda forward: forward) * self.units_per_step()

    def planned_flops(self) -> dict[str, float]:
        """The MFU count, and executed: XLA's count of one image's gradient, the forward passes that
        remat recomputes included (a UNet has no loop over its blocks, whose body XLA would count
        once). Under splash, the self-attention its kernels run, where the program's text does not
        show it ("hidden")."""
        executed = self._flops_per_image(lambda forward: jax.grad(lambda *a: jnp.sum(forward(*a)))) * self.units_per_step()
        return {"model": self.flops_per_step(), "executed": executed, "hidden": self._splash_flops()}

    def _splash_flops(self) -> float:
        """The matmuls of the self-attentions that splash runs (both lengths multiples of 128), as XLA
        counts them: 4 L^2 C forward per image, twice that backward, once more where remat recomputes."""
        m = self.cfg.model
        if m.attention != "splash":
            return 0.0
        widths = [m.base_channels * mult for mult in m.channel_mults]
        attentions = [(res, c, 2 * m.blocks_per_resolution + 1)  # a level's down and up blocks
                      for res, c in zip(m.resolutions, widths) if res in m.attention_resolutions]
        attentions.append((m.resolutions[-1], widths[-1], 1))  # the mid block's
        forward = sum(n * 4 * (res * res) ** 2 * c for res, c, n in attentions if res * res % 128 == 0)
        return forward * (3 + (m.remat != "none")) * self.units_per_step()

    def _flops_per_image(self, transform) -> float:
        """XLA's FLOP count of transform(the UNet's forward pass as a function of (state, x, t, y)) on
        one image, its attention counted as XLA's (splash does the same math in kernels XLA cannot count)."""
        m = dataclasses.replace(self.cfg.model, attention="xla")
        graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet(m, rngs=nnx.Rngs(0))))
        image = jax.ShapeDtypeStruct((1, m.image_size, m.image_size, m.channels), jnp.float32)
        ints = jax.ShapeDtypeStruct((1,), jnp.int32)
        text = jax.ShapeDtypeStruct((1, m.context_length, m.cross_attention_dim), jnp.bfloat16)
        forward = transform(lambda s, x, t, y, c: nnx.merge(graphdef, s)(x, t, y if m.num_classes else None,
                                                                        c if m.cross_attention_dim else None))
        return jax.jit(forward).lower(state, image, ints, ints, text).cost_analysis()["flops"]

    def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        m, b = self.cfg.model, self.cfg.train.global_batch
        shapes = {"images": ((b, m.image_size, m.image_size, m.channels), np.dtype(np.float32)),
                  "labels": ((b,), np.dtype(np.int32))}
        if m.cross_attention_dim:
            shapes["context"] = ((b, m.context_length, m.cross_attention_dim), np.dtype(ml_dtypes.bfloat16))
        return shapes

    def open_data(self, model_axis: int):
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
            manifest = json.loads((epath.Path(d.source) / records.MANIFEST).read_text())
            if manifest.get("kind") == "latents":
                self._open_latents(manifest)
                return
            manifest = records.read_manifest(d.source, "images")
            classes = manifest["classes"]
            sources = {s: records.open_split(d.source, manifest, s) for s in ("train", "validation")}
        else:
            classes, sources = image_directory(d.source, d.val_fraction)
        if m.cross_attention_dim:
            raise ConfigError(f"model.cross_attention_dim={m.cross_attention_dim} trains on captions, which data.source="
                              f"{d.source} has none of; prepare captioned images with `pretrain prepare images --pipeline`")
        if m.channels not in (1, 3):
            raise ConfigError(f"model.channels={m.channels} must be 1 (grayscale) or 3 (RGB) for images")
        if sources["train"] is None:
            raise ConfigError(f"data.source={d.source} has no training images; lower data.val_fraction or add images")
        if m.num_classes and not classes:
            raise ConfigError(f"model.num_classes={m.num_classes} asks for class conditioning, but data.source={d.source} "
                              "has no labels; put the images in one subdirectory per class, or set model.num_classes=0")
        if len(classes) > m.num_classes > 0:
            raise ConfigError(f"data.source={d.source} has {len(classes)} classes, more than model.num_classes="
                              f"{m.num_classes}; set model.num_classes={len(classes)}")
        self._one_dataset(sources)

    def _open_latents(self, manifest: dict):
        """A dataset of `pretrain prepare images --pipeline`, checked against the model."""
        d, m = self.cfg.data, self.cfg.model
        layout = latents.Layout.of(manifest)
        (side, _, channels), (length, width) = layout.latent_shape, layout.context_shape
        for key, theirs in (("image_size", side), ("channels", channels), ("context_length", length),
                            ("cross_attention_dim", width)):
            if getattr(m, key) != theirs:
                raise ConfigError(f"data.source={d.source} holds latents for model.{key}={theirs}, not {getattr(m, key)}; "
                                  f"set model.{key}={theirs}")
        sources = {s: records.open_split(d.source, manifest, s) for s in ("train", "validation")}
        if sources["train"] is None:
            raise ConfigError(f"data.source={d.source} has no training images; prepare it with a lower --val-fraction")
        empty = np.load(io.BytesIO((epath.Path(d.source) / manifest["context"]["empty_prompt"]).read_bytes()))
        self.latents = LatentData(layout, empty.astype(ml_dtypes.bfloat16), manifest["pipeline"]["carried"])
        self._one_dataset(sources)

    def _synthetic(self, rows: Sequence[int]):
        c = self.cfg
        m = c.model
        return pipeline.synthetic_image_rows(size=m.image_size, channels=m.channels, num_classes=m.num_classes,
                                             global_batch=c.train.global_batch, rows=rows, seed=c.run.seed,
                                             context=(m.context_length, m.cross_attention_dim) if m.cross_attention_dim else None)

    @staticmethod
    def _record(position: int) -> int:
        return position  # one image per row

    def _pipeline(self, source, train: bool, **kwargs):
        m = self.cfg.model
        if self.latents is not None:
            return pipeline.latent_rows(source, layout=self.latents.layout, empty=self.latents.empty,
                                        dropout=self.cfg.diffusion.label_dropout * train, **kwargs)
        return pipeline.image_rows(source, size=m.image_size, channels=m.channels,
                                   augment=self.cfg.data.augment and train, **kwargs)

    def eval_metrics(self, loss: float) -> dict:
        return {"eval_loss": loss}

    def write_samples(self, model, step: int, local_dir: Path) -> dict[str, float]:
        """A grid of diffusion.sample_num images (one column per class, or per prompt of a text-to-image
        run, decoded by its dataset's VAE) under samples/ of the run's local files (pretrain/run/outputs.py).
        Samples of the digits are scored: the share a digit classifier reads as the digit asked for."""
        d = self.cfg.diffusion
        text, prompts = {}, None
        if self.latents is not None:
            prompts = [d.prompts[i % len(d.prompts)] if d.prompts else "" for i in range(d.sample_num)]
            text = {"context": self.decoder.states(prompts).astype(ml_dtypes.bfloat16), "null_context": self.latents.empty}
        batch, labels = draw_images(model, d, jax.random.key(self.cfg.run.seed), num=d.sample_num,
                                    steps=d.sample_steps, guidance=d.guidance, **text)
        columns = grid_columns(labels)
        if self.latents is not None:
            batch, columns = self.decoder.decode(batch), max(1, min(len(d.prompts), d.sample_num))
        if jax.process_index() == 0:
            out = local_dir / "samples"
            out.mkdir(parents=True, exist_ok=True)
            (out / f"step_{step:07d}.png").write_bytes(images.grid_png(batch, columns))
        wanted = self._digits_asked(labels, prompts)
        return {} if wanted is None else {"samples/digit_accuracy": digits.accuracy(batch, wanted)}

    def _digits_asked(self, labels: np.ndarray, prompts: list[str] | None) -> np.ndarray | None:
        """The digit each sample was asked for: by its class on the embedded digits, by its prompt
        where every prompt is a digit's caption (the text-to-image smoke run's); else None."""
        if prompts is not None:
            return np.array([digits.CAPTIONS.index(p) for p in prompts]) if set(prompts) <= set(digits.CAPTIONS) else None
        return labels if self.cfg.data.source == "digits" and self.cfg.model.num_classes == len(digits.CLASSES) else None

    @functools.cached_property
    def decoder(self) -> LatentPipeline:
        """The text encoder and VAE that the latent dataset carries, for eval samples."""
        return LatentPipeline(str(epath.Path(self.cfg.data.source) / self.latents.carried))
