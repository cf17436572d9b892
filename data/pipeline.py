"""Grain input pipelines: shuffle -> per-process shard -> decode -> pack or augment -> batch -> prefetch.

Both read a random-access source of records (ArrayRecord shards, see data/records.py).
The shuffle is seeded and redrawn every epoch; process i of n reads elements i, i+n, ...
of every epoch, so processes never overlap and together cover the data. The returned
iterators' get_state()/set_state() resume exactly, with or without worker processes.

Text records are pieces of at most seq_len + 1 token ids (data/prepare.py); a piece gives
inputs = piece[:-1] and targets = piece[1:]. Grain's first-fit packing fills rows of
exactly seq_len and emits `*_segment_ids` (1, 2, ... per piece, 0 for padding) and
`*_positions` (restarting at each piece), so no token attends to or predicts across
documents.
"""

import functools

import grain
import numpy as np
from absl import flags
from grain.experimental import FirstFitPackIterDataset

from data import images


def _shuffled_slice(source, seed, process_index, process_count, num_epochs) -> grain.MapDataset:
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    return ds[process_index::process_count]


def _prefetch(ds: grain.IterDataset, workers: int) -> grain.IterDataset:
    """Decode and pack in `workers` processes (0: in this process)."""
    if workers == 0:
        return ds
    if not flags.FLAGS.is_parsed():  # Grain reads absl flags when it starts workers; we define none
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def _text_example(record: bytes) -> dict:
    piece = np.frombuffer(record, np.int32)
    return {"inputs": piece[:-1], "targets": piece[1:]}


def _rename_packed(batch: dict) -> dict:
    return {
        "inputs": batch["inputs"],
        "targets": batch["targets"],
        "segment_ids": batch["inputs_segment_ids"],
        "positions": batch["inputs_positions"],
    }


def text_pipeline(
    source,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    workers: int = 0,
) -> grain.IterDataset:
    """Batches of `batch_size` packed rows of `seq_len` tokens from this process's share of `source`."""
    ds = _shuffled_slice(source, seed, process_index, process_count, num_epochs).map(_text_example)
    packed = FirstFitPackIterDataset(
        ds.to_iter_dataset(),
        length_struct={"inputs": seq_len, "targets": seq_len},
        num_packing_bins=batch_size,
        shuffle_bins=False,
    )
    return _prefetch(packed.batch(batch_size).map(_rename_packed), workers)


def image_pipeline(
    source,
    *,
    size: int,
    channels: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    augment: bool = True,
    workers: int = 0,
) -> grain.IterDataset:
    """Batches of {"images": [b, size, size, channels] in [-1, 1], "labels": [b]} from image records."""
    ds = _shuffled_slice(source, seed, process_index, process_count, num_epochs)
    ds = ds.map(functools.partial(images.to_array, size=size, channels=channels))
    if augment:
        ds = ds.random_map(images.random_flip, seed=seed)
    return _prefetch(ds.to_iter_dataset().batch(batch_size, drop_remainder=True), workers)


def synthetic(vocab_size: int, seq_len: int, batch: int, seed: int):
    """Random token rows of the right shape, one document per row, for throughput benchmarks."""
    rng = np.random.default_rng(seed)
    ones = np.ones((batch, seq_len), np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))
    while True:
        tokens = rng.integers(4, vocab_size, (batch, seq_len + 1), dtype=np.int32)
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones, "positions": positions}


def synthetic_images(size: int, channels: int, num_classes: int, batch: int, seed: int):
    """Random images in [-1, 1] (and labels, -1 if unconditional) of the right shape, for benchmarks."""
    rng = np.random.default_rng(seed)
    while True:
        labels = rng.integers(0, num_classes, batch, dtype=np.int32) if num_classes else np.full(batch, -1, np.int32)
        yield {"images": rng.uniform(-1, 1, (batch, size, size, channels)).astype(np.float32), "labels": labels}
