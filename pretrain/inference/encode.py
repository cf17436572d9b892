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

import dataclasses
import io

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
    with several captions is a record per caption (all in one split); a repeated pair is dropped."""
    check_output(epath.Path(out), overwrite)
    pairs = latents.pairs(inputs)
    encoders = LatentPipeline(pipeline)
    if image_size <= 0 or image_size % encoders.factor:
        raise ConfigError(f"--image-size {image_size} must be a positive multiple of {encoders.factor}, the VAE's "
                          "downsampling")
    with staged(epath.Path(out), overwrite) as stage:
        writers = {s: ShardWriter(stage, s, int(shard_mb * 2**20)) for s in SPLITS}
        counts = {s: 0 for s in SPLITS}
        seen, duplicates = set(), 0
        for start in range(0, len(pairs), batch):
            chunk, pixels = [], []
            for pair in pairs[start:start + batch]:
                content = pair.read()
                key = digest(content + pair.caption.encode())
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                chunk.append((pair.caption, "validation" if is_validation(digest(content), val_fraction) else "train"))
                pixels.append(_pixels(pair, content, image_size, encoders.vae_cfg.channels))
            if not chunk:
                continue
            moments, states = encoders.moments(np.stack(pixels)), encoders.states([c for c, _ in chunk])
            for (_, split), m, s in zip(chunk, moments, states):
                writers[split].write(latents.encode_record(m, s))
                counts[split] += 1
        buffer = io.BytesIO()
        np.save(buffer, encoders.states([""])[0])
        (stage / EMPTY_PROMPT).write_bytes(buffer.getvalue())
        carry(epath.Path(pipeline), stage / CARRIED)
        manifest = _manifest(encoders, pipeline, image_size, len(pairs), duplicates, counts, writers)
        write_manifest(stage, manifest)
    return manifest


def _pixels(pair: latents.Pair, content: bytes, size: int, channels: int) -> np.ndarray:
    try:
        return images.pixels(content, size, channels)
    except Exception:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"{pair.name} is not a readable PNG/JPEG image; remove it from --input") from None


def _manifest(encoders: LatentPipeline, pipeline: str, image_size: int, pairs: int, duplicates: int, counts: dict,
              writers: dict) -> dict:
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
        "duplicate_pairs": duplicates,
        "splits": {s: {"shards": writers[s].close(), "records": counts[s]} for s in SPLITS},
    }
