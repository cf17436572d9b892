"""The text-to-image smoke run's data, made on this machine (nothing downloaded): the handwritten
digits captioned by their class ("a handwritten seven"), encoded by `pretrain prepare images
--pipeline` with a Stable Diffusion pipeline directory made for them:

- `vae/`: an AutoencoderKL fitted here to the digits at 16x16 (8x8x4 latents), a few hundred steps
  of squared error with a light KL term; its scaling factor, as Stable Diffusion's was, one over the
  standard deviation of the latents it draws;
- `text_encoder/`: a CLIP text encoder with random weights, which gives each caption fixed and
  distinct states: all a UNet needs to learn which digit a caption asks for;
- `tokenizer/`: a CLIP tokenizer (byte-level BPE) whose vocabulary holds the captions' words.

`pretrain smoke text-to-image` makes it on its first start; the same machine makes the same bytes.
"""

import dataclasses
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath
from flax import nnx

from data import digits, images
from models.clip_text import CLIPTextModel
from models.configs import CLIPTextConfig, VAEConfig
from models.vae import AutoencoderKL
from pretrain.config import ConfigError
from pretrain.formats import diffusers, latent, params
from pretrain.inference.encode import prepare_captioned

SIZE = 16  # pixels, as the class-conditional smoke run sees the digits
LENGTH = 8  # tokens per prompt: start, "a handwritten seven", end, padding
VAE = VAEConfig(channels=1, latent_channels=4, block_channels=[16, 32], layers_per_block=1, groups=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, max_positions=LENGTH)
FIT_STEPS, FIT_BATCH, FIT_LR, KL_WEIGHT, SEED = 400, 32, 3e-3, 1e-4, 0
START, END = "<|startoftext|>", "<|endoftext|>"


def write_tokenizer(directory: epath.Path, words: list[str], length: int) -> dict[str, int]:
    """A CLIP tokenizer (byte-level BPE, `</w>` ending a word) whose vocabulary has every byte and
    `words` whole; returns its start and end ids and its size."""
    latent.require_transformers()
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    merges, vocab = [], chars + [c + "</w>" for c in chars]
    for word in words:
        piece = word[0]
        for i, c in enumerate(word[1:], 1):
            tail = c + ("</w>" if i == len(word) - 1 else "")
            if (piece, tail) not in merges:
                merges.append((piece, tail))
                vocab.append(piece + tail)
            piece += tail
    ids = {t: i for i, t in enumerate(dict.fromkeys(vocab + [START, END]))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(ids))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                                 "model_max_length": length, **special}))
    return {"start": ids[START], "end": ids[END], "vocab": len(ids)}


def fit_vae(pixels: np.ndarray, steps: int = FIT_STEPS) -> tuple[VAEConfig, dict]:
    """(settings with the scaling factor measured, flat weights) of the VAE fitted to `pixels`."""
    vae = AutoencoderKL(VAE, rngs=nnx.Rngs(SEED))
    optimizer = nnx.Optimizer(vae, optax.adam(FIT_LR), wrt=nnx.Param)

    def draw(vae, x, key):
        mean, logvar = jnp.split(vae.moments(x), 2, axis=-1)
        return mean, logvar, mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)

    @nnx.jit
    def step(vae, optimizer, x, key):
        def loss(vae):
            mean, logvar, z = draw(vae, x, key)
            kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1 - logvar, axis=-1))
            return jnp.mean(jnp.square(vae.decode(z) - x)) + KL_WEIGHT * kl

        value, grads = nnx.value_and_grad(loss)(vae)
        optimizer.update(vae, grads)
        return value

    rng, key = np.random.default_rng(SEED), jax.random.key(SEED)
    for i in range(steps):
        value = step(vae, optimizer, pixels[rng.choice(len(pixels), FIT_BATCH)], jax.random.fold_in(key, i))
    z = nnx.jit(lambda vae, x: draw(vae, x, key)[2])(vae, pixels)
    print(f"VAE fitted to {len(pixels)} digits: loss {float(value):.4f} after {steps} steps", flush=True)
    return dataclasses.replace(VAE, scaling_factor=round(1 / float(jnp.std(z)), 5)), params.flat(nnx.state(vae, nnx.Param))


def write_pipeline(out: epath.Path, pixels: np.ndarray, fit_steps: int = FIT_STEPS):
    """A Stable Diffusion pipeline directory (vae/, text_encoder/, tokenizer/, model_index.json) for
    the digits' captions, its VAE fitted to `pixels`."""
    ids = write_tokenizer(out / "tokenizer", ["a", "handwritten", *digits.WORDS], LENGTH)
    text = CLIPTextConfig(vocab_size=ids["vocab"], eos_token_id=ids["end"], **TEXT)
    encoder = params.flat(nnx.state(CLIPTextModel(text, rngs=nnx.Rngs(SEED)), nnx.Param))
    diffusers.write_part(out / "text_encoder", diffusers.clip_text_json(text, ids["start"]), encoder, "model")
    vae, weights = fit_vae(pixels, fit_steps)
    diffusers.write_part(out / "vae", diffusers.vae_json(vae, SIZE), weights, diffusers.STEM)
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.VERSION, "vae": ["diffusers", diffusers.VAE],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}, indent=2))


def prepare(out: str, fit_steps: int = FIT_STEPS):
    """The captioned digits encoded under `out` (a latent dataset carrying its pipeline) on this
    process's devices."""
    if jax.process_count() > 1:
        raise ConfigError(f"data.source={out} does not exist yet; make it with one process first: "
                          "`pretrain smoke text-to-image`")
    labelled = digits.pngs()
    with tempfile.TemporaryDirectory() as scratch:
        root = epath.Path(scratch)
        write_pipeline(root / "pipeline", np.stack([images.pixels(png, SIZE, 1) for _, png in labelled]), fit_steps)
        rows = [{"image": png, "caption": digits.CAPTIONS[label]} for label, png in labelled]
        pq.write_table(pa.Table.from_pylist(rows), str(root / "digits.parquet"))
        prepare_captioned([str(root / "digits.parquet")], out, pipeline=str(root / "pipeline"), image_size=SIZE,
                          val_fraction=0.1, batch=256)
