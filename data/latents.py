"""Captioned images encoded once, for latent text-to-image training (`pretrain prepare images
--pipeline`): where the captions come from, the record layout, and what a record becomes in the
input pipeline.

A record is an image's VAE moments (mean and log-variance, float32, [h, w, 2 x latent channels])
followed by its caption's text-encoder states (bfloat16, [length, width]); the shapes are the
dataset manifest's. Captions come from a `.txt` file beside each image, or from a JSONL or Parquet
manifest whose rows name an `image` (a path relative to the manifest, or the encoded bytes) and a
`caption` (or `text`).
"""

import dataclasses
import json

import ml_dtypes
import numpy as np
import pyarrow.parquet as pq
from etils import epath

from data import images
from data.prepare.documents import expand
from data.records import DataError

CAPTION_FIELDS = ("caption", "text")
MANIFEST_SUFFIXES = (".jsonl", ".parquet")
LOGVAR_RANGE = (-30.0, 20.0)  # where diffusers' DiagonalGaussianDistribution clips the log-variance


@dataclasses.dataclass(frozen=True)
class Pair:
    """One captioned image: where it came from (for messages), how to read its bytes, its caption."""

    name: str
    read: object  # () -> bytes
    caption: str


def _row_pairs(path: epath.Path) -> list[Pair]:
    if path.suffix == ".parquet":
        rows = pq.read_table(str(path)).to_pylist()
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pairs = []
    for i, row in enumerate(rows, 1):
        where = f"{path}:{i}"
        caption = next((row[f] for f in CAPTION_FIELDS if isinstance(row, dict) and isinstance(row.get(f), str)), None)
        image = row.get("image") if isinstance(row, dict) else None
        if caption is None or not isinstance(image, (str, bytes)):
            raise DataError(f"{where} needs an 'image' (a path or bytes) and a 'caption' (or 'text') string")
        if isinstance(image, bytes):
            pairs.append(Pair(where, lambda b=image: b, caption))
        else:
            file = epath.Path(image) if image.startswith("gs://") or image.startswith("/") else path.parent / image
            pairs.append(Pair(str(file), file.read_bytes, caption))
    return pairs


def pairs(inputs: list[str]) -> list[Pair]:
    """Every captioned image of `inputs` (files, directories or globs; local or gs://), in order."""
    out = []
    for f in expand(inputs):
        suffix = f.suffix.lower()
        if suffix in MANIFEST_SUFFIXES:
            out += _row_pairs(f)
        elif suffix in images.SUFFIXES:
            caption = f.with_suffix(".txt")
            if not caption.exists():
                raise DataError(f"{f} has no caption: put it in {caption.name} beside it, or list the images "
                                "with their captions in a JSONL or Parquet manifest")
            out.append(Pair(str(f), f.read_bytes, caption.read_text().strip()))
    if not out:
        raise DataError(f"the inputs {', '.join(inputs)} hold no captioned images (PNG/JPEG files with a .txt "
                        "beside each, or a JSONL/Parquet manifest); check --input")
    return out


def encode_record(moments: np.ndarray, states: np.ndarray) -> bytes:
    return np.asarray(moments, "<f4").tobytes() + np.asarray(states, ml_dtypes.bfloat16).tobytes()


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a dataset's records hold and how its latents are scaled (its manifest's `latents`)."""

    latent_shape: tuple[int, int, int]  # h, w, latent channels
    context_shape: tuple[int, int]  # length, width
    scaling_factor: float
    shift_factor: float

    @classmethod
    def of(cls, manifest: dict) -> "Layout":
        v = manifest["latents"]
        return cls(tuple(v["shape"]), tuple(manifest["context"]["shape"]), v["scaling_factor"], v["shift_factor"])

    def decode(self, record: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(moments float32 [h, w, 2c], states bfloat16 [length, width]) of a record."""
        h, w, c = self.latent_shape
        size = h * w * 2 * c * 4
        moments = np.frombuffer(record, "<f4", h * w * 2 * c).reshape(h, w, 2 * c)
        return moments, np.frombuffer(record[size:], ml_dtypes.bfloat16).reshape(self.context_shape)


def to_example(record: bytes, rng: np.random.Generator, *, layout: Layout, dropout: float,
               empty: np.ndarray) -> dict:
    """{"images": scaled latents [h, w, c] float32, "labels": -1, "context": states [length, width] bfloat16}:
    latents drawn from the moments as diffusers' latent_dist.sample(), shifted and scaled as its
    pipelines do; the caption replaced by the empty prompt's states with probability `dropout`
    (classifier-free guidance). Seeded per element by Grain: the same draw on every resume."""
    moments, states = layout.decode(record)
    mean, logvar = np.split(moments, 2, axis=-1)
    std = np.exp(0.5 * np.clip(logvar, *LOGVAR_RANGE))
    latents = (mean + std * rng.standard_normal(mean.shape, np.float32) - layout.shift_factor) * layout.scaling_factor
    if dropout and rng.random() < dropout:
        states = empty
    return {"images": latents.astype(np.float32), "labels": np.int32(-1), "context": states}
