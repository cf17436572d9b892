"""`pretrain prepare images --pipeline DIR`: captioned images encoded once, with a latent pipeline's
VAE and text encoder (in JAX, on this machine's devices; pretrain/formats/latent.py), into the
records that text-to-image training reads (data/latents.py). The dataset carries the pipeline's
VAE, text encoder and tokenizer (under `pipeline/`, files unchanged): training hosts decode their
eval samples with them, and an export carries them into the pipeline it writes.

Records hold the VAE's moments (float32) and the text encoder's states (bfloat16), not token ids:
the train step then runs no text encoder (no frozen weights beside the trained ones, no encoder
forward per image and step), at a cost of 2 x length x width bytes per image (154 KiB for Stable
Diffusion 2's 77 x 1024; its 512-pixel moments are 128 KiB).
"""

import contextlib
import dataclasses
import io

import jax
import numpy as np
from etils import epath

from data import images, latents
from data.prepare.documents import SPLITS, digest, is_validation
from data.prepare.output import check_output, staged
from data.records import DataError, ShardWriter, write_manifest
from pretrain.config import ConfigError
from pretrain.formats.diffusers import CARRIED, carry
from pretrain.formats.latent import LatentPipeline

EMPTY_PROMPT = "empty_prompt.npy"  # the states of "", which caption dropout trains on


def prepare_captioned(inputs: list[str], out: str, *, pipeline: str, image_size: int, val_fraction: float = 0.01,
                      shard_mb: float = 256, batch: int = 32, overwrite: bool = False) -> dict:
    """Captioned images of `inputs` as latent records under `out`; returns the manifest. An image
    with several captions is a record per caption (all in one split); a repeated pair is dropped.
    Over several processes (jax.distributed), each reads and encodes its rows of every batch on its
    own devices and process 0 writes: the same records as one process writes."""
    check_output(epath.Path(out), overwrite)
    pairs = latents.pairs(inputs)
    encoders = LatentPipeline(pipeline, jax.devices())
    if image_size <= 0 or image_size % encoders.factor:
        raise ConfigError(f"--image-size {image_size} must be a positive multiple of {encoders.factor}, the VAE's "
                          "downsampling")
    writes = jax.process_index() == 0
    with staged(epath.Path(out), overwrite) if writes else contextlib.nullcontext() as stage:
        shards = _Shards(stage, shard_mb, val_fraction) if writes else None
        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            encoded = _encode(encoders, chunk, image_size)
            if writes:
                for pair, *record in zip(chunk, *encoded):
                    shards.add(pair.caption, *record)
        empty = encoders.states([""])[0]
        if not writes:
            return {}
        buffer = io.BytesIO()
        np.save(buffer, empty)
        (stage / EMPTY_PROMPT).write_bytes(buffer.getvalue())
        carry(epath.Path(pipeline), stage / CARRIED)
        manifest = _manifest(encoders, pipeline, image_size, len(pairs), shards)
        write_manifest(stage, manifest)
    return manifest


def _encode(encoders: LatentPipeline, chunk: list[latents.Pair], size: int):
    """(moments, states, image digests) of every pair of `chunk`; this process reads its rows only."""
    n = len(chunk)
    mine = [chunk[min(i, n - 1)] for i in encoders.mine(n)]
    contents = [p.read() for p in mine]
    pixels = np.stack([_pixels(p, c, size, encoders.vae_cfg.channels) for p, c in zip(mine, contents)])
    digests = encoders.run(None, np.stack([np.frombuffer(digest(c), np.uint8) for c in contents]), n)
    return (*encoders.encode_rows(pixels, [p.caption for p in mine], n), digests)


class _Shards:
    """Records into the shards of their split (by the image's digest), repeated pairs dropped."""

    def __init__(self, stage: epath.Path, shard_mb: float, val_fraction: float):
        self.writers = {s: ShardWriter(stage, s, int(shard_mb * 2**20)) for s in SPLITS}
        self.counts = {s: 0 for s in SPLITS}
        self.val_fraction, self.seen, self.duplicates = val_fraction, set(), 0

    def add(self, caption: str, moments: np.ndarray, states: np.ndarray, image: np.ndarray):
        key = digest(image.tobytes() + caption.encode())
        if key in self.seen:
            self.duplicates += 1
            return
        self.seen.add(key)
        split = "validation" if is_validation(image.tobytes(), self.val_fraction) else "train"
        self.writers[split].write(latents.encode_record(moments, states))
        self.counts[split] += 1


def _pixels(pair: latents.Pair, content: bytes, size: int, channels: int) -> np.ndarray:
    try:
        return images.pixels(content, size, channels)
    except Exception:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"{pair.name} is not a readable PNG/JPEG image; remove it from --input") from None


def _manifest(encoders: LatentPipeline, pipeline: str, image_size: int, pairs: int, shards: _Shards) -> dict:
    """What the records hold and which pipeline made them. Closes the shards."""
    v, t = encoders.vae_cfg, encoders.text_cfg
    side = image_size // encoders.factor
    return {
        "kind": "latents",
        "pipeline": {"source": str(pipeline), "carried": CARRIED},
        "image_size": image_size,
        "latents": {"shape": [side, side, v.latent_channels], "scaling_factor": v.scaling_factor,
                    "shift_factor": v.shift_factor, "vae": dataclasses.asdict(v)},
        "context": {"shape": [encoders.length, t.hidden_size], "text_encoder": dataclasses.asdict(t),
                    "tokenizer": type(encoders.tokenizer).__name__, "empty_prompt": EMPTY_PROMPT},
        "input_pairs": pairs,
        "duplicate_pairs": shards.duplicates,
        "splits": {s: {"shards": shards.writers[s].close(), "records": shards.counts[s]} for s in SPLITS},
    }
