"""Packed next-token batches from tokenised documents, held in memory.

Each document becomes BOS + tokens + EOS, is cut into pieces of at most seq_len + 1
tokens (a long document is split, not dropped), and each piece yields inputs = piece[:-1]
and targets = piece[1:]. Pieces are packed greedily into rows of exactly seq_len;
`segment_ids` number the pieces in a row from 1 (0 is padding) and `positions`
restart at 0 with each piece, so no token attends to or predicts across documents.
"""

import numpy as np

from data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def pack(token_docs, seq_len: int) -> dict[str, np.ndarray]:
    """All rows of an epoch, in document order: inputs, targets, segment_ids, positions [N, seq_len]."""
    rows = []
    row = {k: [] for k in ("inputs", "targets", "segment_ids", "positions")}

    def flush():
        if row["inputs"]:
            pad = seq_len - len(row["inputs"])
            rows.append({k: np.asarray(v + [PAD_ID] * pad, np.int32) for k, v in row.items()})
            for v in row.values():
                v.clear()

    for ids in token_docs:
        doc = [BOS_ID, *ids, EOS_ID]
        for start in range(0, len(doc) - 1, seq_len):
            piece = doc[start : start + seq_len + 1]
            n = len(piece) - 1
            if len(row["inputs"]) + n > seq_len:
                flush()
            segment = (row["segment_ids"][-1] if row["segment_ids"] else 0) + 1
            row["inputs"] += piece[:-1]
            row["targets"] += piece[1:]
            row["segment_ids"] += [segment] * n
            row["positions"] += list(range(n))
    flush()
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class Batches:
    """Endless seeded batches of packed rows; each process takes its own slice of every global batch."""

    def __init__(self, rows: dict[str, np.ndarray], global_batch: int, seed: int, process_index=0, process_count=1):
        self.rows, self.seed = rows, seed
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self.global_batch = global_batch
        self.num_rows = len(next(iter(rows.values())))

    def __iter__(self):
        epoch, order, cursor = 0, None, self.num_rows
        while True:
            if cursor + self.global_batch > self.num_rows:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
                epoch, cursor = epoch + 1, 0
            take = np.resize(order[cursor:], self.global_batch)  # wraps when an epoch is shorter than a batch
            cursor += self.global_batch
            take = take[self.offset : self.offset + self.local]
            yield {k: v[take] for k, v in self.rows.items()}


def synthetic(vocab_size: int, seq_len: int, batch: int, seed: int):
    """Random token rows of the right shape, one document per row, for throughput benchmarks."""
    rng = np.random.default_rng(seed)
    ones = np.ones((batch, seq_len), np.int32)
    while True:
        tokens = rng.integers(4, vocab_size, (batch, seq_len + 1), dtype=np.int32)
        yield {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": ones,
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
        }
