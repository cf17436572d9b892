"""A latent pipeline's frozen parts in JAX: the VAE (images <-> latents) and the text encoder with
its tokenizer (prompts -> states), read from a diffusers pipeline directory (`vae/`,
`text_encoder/`, `tokenizer/`). Prompts are tokenised by the pipeline's own tokenizer through
transformers, padded and truncated as diffusers' StableDiffusionPipeline does.

`pretrain prepare images --pipeline` encodes with it; a text-to-image run decodes its eval samples
and `pretrain sample --prompt` its images with the copy its dataset carries.
"""

import tempfile

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from models.clip_text import CLIPTextModel
from models.vae import AutoencoderKL
from pretrain.config import ConfigError
from pretrain.formats import diffusers, params


def require_transformers():
    """transformers, from the text-to-image extra (only CLIP tokenizers need it), or a one-line error naming it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("CLIP tokenizers need transformers; pip install 'pretrain[text-to-image]'") from None
    return transformers


def tokenizer(pipeline: epath.Path):
    """The pipeline's `tokenizer/` through transformers (copied locally first: it may be on gs://)."""
    transformers = require_transformers()
    source = pipeline / "tokenizer"
    if not source.is_dir():
        raise ConfigError(f"{pipeline} has no tokenizer/; pass a Stable Diffusion pipeline directory")
    with tempfile.TemporaryDirectory() as local:
        for f in source.iterdir():
            (epath.Path(local) / f.name).write_bytes(f.read_bytes())
        return transformers.AutoTokenizer.from_pretrained(local)


class LatentPipeline:
    """Images to moments (with their captions' states), prompts to states and latents to images, in batches split over `devices`
    (default: this process's; each batch padded to a multiple of them: one compile per shape). Over
    the devices of several processes, each process gives the inputs of its own rows (`run`)."""

    def __init__(self, directory: str, devices=None):
        root = epath.Path(directory)
        if not (root / "model_index.json").exists():
            raise ConfigError(f"{directory} holds no model_index.json; pass a Stable Diffusion pipeline directory "
                              "(vae/, text_encoder/, tokenizer/)")
        self.vae_cfg, vae = diffusers.read_vae(root)
        self.text_cfg, text = diffusers.read_text_encoder(root)
        self.tokenizer = tokenizer(root)
        self.length = self.tokenizer.model_max_length
        if self.length > self.text_cfg.max_positions:
            raise ConfigError(f"{root}/tokenizer pads prompts to {self.length} tokens, more than the text encoder's "
                              f"{self.text_cfg.max_positions} positions")
        self.factor = 2 ** (len(self.vae_cfg.block_channels) - 1)
        devices = devices or jax.local_devices()
        self.devices = len(devices)
        mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
        self.rows, whole = (jax.sharding.NamedSharding(mesh, jax.P(s)) for s in ("batch", None))
        graphdef, state = nnx.split((params.build(AutoencoderKL, self.vae_cfg, vae),
                                     params.build(CLIPTextModel, self.text_cfg, text)))
        self.state = jax.device_put(jax.tree.map(np.asarray, state), whole)  # from the host: devices of every process
        jitted = lambda f: jax.jit(lambda s, x: f(*nnx.merge(graphdef, s), x), in_shardings=(whole, self.rows),  # noqa: E731
                                   out_shardings=self.rows)
        self._moments = jitted(lambda vae, _, x: vae.moments(x))
        self._states = jitted(lambda _, text, ids: text(ids)[0])
        self._decode = jitted(lambda vae, _, z: vae.decode(z / vae.cfg.scaling_factor + vae.cfg.shift_factor))

    def _padded(self, n: int) -> int:
        return -(-n // self.devices) * self.devices

    def mine(self, n: int) -> list[int]:
        """The rows of an n-row batch, padded to a multiple of the devices, whose inputs this process
        gives (all of them on one process)."""
        padded = self._padded(n)
        index = self.rows.addressable_devices_indices_map((padded,))
        return sorted({i for (rows,) in index.values() for i in range(*rows.indices(padded))})

    def run(self, fn, local: np.ndarray, n: int) -> np.ndarray:
        """fn(state, x) (None: x itself) over an n-row batch of which this process gives `local`, its
        rows `mine(n)` in order: every row of the result, on every process."""
        x = jax.make_array_from_process_local_data(self.rows, local, (self._padded(n), *local.shape[1:]))
        return np.asarray(multihost_utils.process_allgather(x if fn is None else fn(self.state, x), tiled=True))[:n]

    def _whole(self, fn, x: np.ndarray) -> np.ndarray:
        """fn over a batch every process holds whole."""
        return self.run(fn, x[np.minimum(self.mine(len(x)), len(x) - 1)], len(x))

    def ids(self, prompts: list[str]) -> np.ndarray:
        return self.tokenizer(prompts, padding="max_length", max_length=self.length, truncation=True,
                              return_tensors="np").input_ids.astype(np.int32)

    def encode_rows(self, pixels: np.ndarray, captions: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        """(moments, states) of an n-row batch of images and captions, of which this process gives
        its rows, mine(n)."""
        return self.run(self._moments, pixels.astype(np.float32), n), self.run(self._states, self.ids(captions), n)

    def states(self, prompts: list[str]) -> np.ndarray:
        """[n, length, width] float32: the text encoder's last states of each prompt."""
        return self._whole(self._states, self.ids(prompts))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents as the diffusion model sees them (scaled and shifted) -> images in about [-1, 1]."""
        return self._whole(self._decode, latents.astype(np.float32))
