"""The embedded default images: scikit-learn's bundled handwritten digits (UCI, 1,797 8x8
grayscale images of 0-9; installed with the package, nothing is downloaded).

Each image becomes an image record (data/images.py) holding a PNG, so the digits go through
the same decode, resize and batching as any image directory. The split is by a hash of the
image, as `pretrain prepare images` does it. Captioned by their class ("a handwritten seven"),
they are the text-to-image smoke run's images; a classifier fitted to them scores the digits a
diffusion model samples.
"""

import functools
import io

import numpy as np
from PIL import Image

from data import images
from data.prepare.documents import digest, is_validation

CLASSES = [str(i) for i in range(10)]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = [f"a handwritten {word}" for word in WORDS]  # the caption of each class


def _load():
    from sklearn.datasets import load_digits  # a second of imports that only digits runs need

    return load_digits()


def pngs() -> list[tuple[int, bytes]]:
    """(label, PNG) of every digit, white ink on black, in the dataset's order."""
    digits = _load()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # ink counts 0..16 -> 0..255
    out = []
    for image, label in zip(pixels, digits.target):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append((int(label), buffer.getvalue()))
    return out


def records(val_fraction: float) -> dict[str, list[bytes]]:
    """{"train": [...], "validation": [...]} image records of the digits."""
    out = {"train": [], "validation": []}
    for label, content in pngs():
        split = "validation" if is_validation(digest(content), val_fraction) else "train"
        out[split].append(images.encode_record(label, content))
    return out


@functools.cache
def _classifier():
    from sklearn.linear_model import LogisticRegression

    digits = _load()
    return LogisticRegression(max_iter=5000).fit(digits.data / 16, digits.target)


def classify(batch: np.ndarray) -> np.ndarray:
    """The digit that a classifier fitted to all the digits (multinomial logistic regression on the
    8x8 pixels) reads in each image of `batch` ([N, H, W, C] in [-1, 1], white ink on black),
    shrunk to 8x8 by area and made grayscale first."""
    gray = np.clip((batch.astype(np.float32).mean(-1) + 1) / 2, 0, 1)
    small = np.stack([np.asarray(Image.fromarray(g).resize((8, 8), Image.Resampling.BOX)) for g in gray])
    return _classifier().predict(small.reshape(len(batch), 64))


def accuracy(batch: np.ndarray, labels: np.ndarray) -> float:
    """The share of `batch` that the classifier reads as the digit of `labels`."""
    return float(np.mean(classify(batch) == labels))
