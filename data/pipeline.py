"""Grain input pipelines for text: shuffle -> per-process shard -> pack -> batch.

Each document becomes BOS + tokens + EOS and is cut into pieces of at most seq_len + 1
tokens (a long document is split, not dropped); a piece yields inputs = piece[:-1] and
targets = piece[1:]. Grain's first-fit packing fills rows of exactly seq_len and emits
`*_segment_ids` (1, 2, ... per piece, 0 for padding) and `*_positions` (restarting at
each piece), so no token attends to or predicts across documents. The iterator's
get_state()/set_state() resume it exactly.
"""

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from data.tokenizer import BOS_ID, EOS_ID


def split_documents(token_docs, seq_len: int) -> list[np.ndarray]:
    pieces = []
    for ids in token_docs:
        doc = np.asarray([BOS_ID, *ids, EOS_ID], np.int32)
        pieces += [doc[start : start + seq_len + 1] for start in range(0, len(doc) - 1, seq_len)]
    return pieces


def text_pipeline(
    pieces: list[np.ndarray],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
) -> grain.IterDataset:
    """Batches of `batch_size` packed rows from this process's share of the pieces.

    The shuffle is reseeded every epoch; each process reads a disjoint slice of every epoch.
    """
    ds = grain.MapDataset.source(pieces).shuffle(seed=seed).repeat(num_epochs)
    ds = ds[process_index::process_count].map(lambda p: {"inputs": p[:-1], "targets": p[1:]})
    packed = FirstFitPackIterDataset(
        ds.to_iter_dataset(),
        length_struct={"inputs": seq_len, "targets": seq_len},
        num_packing_bins=batch_size,
        shuffle_bins=False,
    )
    return packed.batch(batch_size).map(
        lambda b: {
            "inputs": b["inputs"],
            "targets": b["targets"],
            "segment_ids": b["inputs_segment_ids"],
            "positions": b["inputs_positions"],
        }
    )


def synthetic(vocab_size: int, seq_len: int, batch: int, seed: int):
    """Random token rows of the right shape, one document per row, for throughput benchmarks."""
    rng = np.random.default_rng(seed)
    ones = np.ones((batch, seq_len), np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))
    while True:
        tokens = rng.integers(4, vocab_size, (batch, seq_len + 1), dtype=np.int32)
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones, "positions": positions}
