"""The embedded default images: scikit-learn's bundled handwritten digits (UCI, 1,797 8x8
grayscale images of 0-9; installed with the package, nothing is downloaded).

Each image becomes an image record (data/images.py) holding a PNG, so the digits go through
the same decode, resize and batching as any image directory. The split is by a hash of the
image, as `pretrain prepare images` does it.
"""

import io

import numpy as np
from PIL import Image

from data import images
from data.prepare.documents import digest, is_validation

CLASSES = [str(i) for i in range(10)]


def records(val_fraction: float) -> dict[str, list[bytes]]:
    """{"train": [...], "validation": [...]} image records of the digits: white ink on black."""
    from sklearn.datasets import load_digits  # a second of imports that only digits runs need

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # ink counts 0..16 -> 0..255
    out = {"train": [], "validation": []}
    for image, label in zip(pixels, digits.target):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        content = buffer.getvalue()
        split = "validation" if is_validation(digest(content), val_fraction) else "train"
        out[split].append(images.encode_record(int(label), content))
    return out
