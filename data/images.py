"""Image records and the per-image transforms of the image pipeline.

A record is a little-endian int32 label (-1: unlabelled) followed by the encoded PNG/JPEG
bytes. Decoding resizes the shorter side to `size`, centre-crops to size x size and
scales to [-1, 1]; the random flip is the only augmentation, seeded per element by Grain.
"""

import io
import struct

import numpy as np
from PIL import Image

SUFFIXES = (".png", ".jpg", ".jpeg")


def encode_record(label: int, content: bytes) -> bytes:
    return struct.pack("<i", label) + content


def decode(content: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(content))
    image.load()
    return image


def labels_from_directories(files) -> tuple[list[str], list[int]]:
    """(class names, label per file): the parent directory names, or no classes if all share one."""
    parents = [f.parent.name for f in files]
    if len(set(parents)) < 2:
        return [], [-1] * len(files)
    classes = sorted(set(parents))
    return classes, [classes.index(p) for p in parents]


def pixels(content: bytes, size: int, channels: int) -> np.ndarray:
    """float32 [size, size, channels] in [-1, 1] of an encoded image: the shorter side resized to
    `size`, then centre-cropped."""
    image = decode(content).convert("L" if channels == 1 else "RGB")
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.float32).reshape(size, size, channels) / 127.5 - 1.0


def to_array(record: bytes, size: int, channels: int) -> dict:
    """{"images": float32 [size, size, channels] in [-1, 1], "labels": int32} from a record."""
    (label,) = struct.unpack_from("<i", record)
    return {"images": pixels(record[4:], size, channels), "labels": np.int32(label)}


def grid_png(batch: np.ndarray, columns: int) -> bytes:
    """[N, H, W, C] images in [-1, 1] as one PNG, row-major in a grid of `columns` with 2-pixel gaps."""
    n, h, w, c = batch.shape
    rows = -(-n // columns)
    pixels = np.round((np.clip(batch, -1, 1) + 1) * 127.5).astype(np.uint8)
    grid = np.zeros((rows * (h + 2) + 2, columns * (w + 2) + 2, c), np.uint8)
    for i, image in enumerate(pixels):
        top, left = 2 + (i // columns) * (h + 2), 2 + (i % columns) * (w + 2)
        grid[top : top + h, left : left + w] = image
    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(buffer, format="PNG")
    return buffer.getvalue()


def random_flip(example: dict, rng: np.random.Generator) -> dict:
    if rng.random() < 0.5:
        example = {**example, "images": example["images"][:, ::-1]}
    return example


class FileSource:
    """Image files as a random-access source of records, for training straight from a directory."""

    def __init__(self, files, labels):
        self.files, self.labels = list(files), list(labels)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return encode_record(self.labels[index], self.files[index].read_bytes())
