"""Input pipelines whose global batches are the same however many processes read them.

The records of a split form one global stream: Grain shuffles them (a new order every epoch),
repeats them and applies the per-record transforms (decoding, seeded random flips) by the
record's index in that stream. Row r of every global batch of B rows is a *lane* that reads
records r, r + B, r + 2B, ... of the stream: a text lane packs consecutive records into rows of
exactly seq_len tokens, an image lane takes one record per row. So the global batch at step s
depends only on the seed and s; each process builds just the rows its devices hold (`Rows`);
and the data position is one integer per lane (how many records it has read), which a
checkpoint keeps as a global array and restores onto any number of processes.

Text records are pieces of at most seq_len + 1 token ids (data/prepare.py); a piece gives
inputs = piece[:-1] and targets = piece[1:]. A lane packs pieces until the next one does not
fit, which then starts the lane's next row: rows carry `segment_ids` (1, 2, ... per piece, 0
for padding) and `positions` (restarting at each piece), so no token attends to or predicts
across documents. Packing is done here rather than by Grain's packers because their state
belongs to one iterator; a lane's state is a single count.
"""

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grain
import numpy as np

from data import images
from data.records import DataError

ENDLESS = 2**62  # length of the synthetic streams


class Rows:
    """Rows `rows` (the global batch's row indices, in any order or layout) of every global batch.

    `stream` is random-access (a Grain MapDataset); `make_row(read, k)` builds one row from
    the lane's records k, k+1, ... (`read(i)` is the lane's i-th record, None past the end of
    a finite stream) and returns (row dict, records used). `workers` threads build rows in
    parallel (decoding and reads release the GIL). A finite stream ends when every lane has run
    out or a lane has no row to give (`make_row` returned None).
    """

    def __init__(self, stream, make_row, *, global_batch: int, rows: Sequence[int], workers: int = 0):
        self.stream, self.make_row, self.global_batch, self.rows = stream, make_row, global_batch, rows
        self.positions = np.zeros(len(rows), np.int64)
        self.last_read = {}  # lane -> (k, its k-th record)
        self.pool = ThreadPoolExecutor(workers) if workers else None

    def __iter__(self):
        return self

    def _read(self, lane: int, k: int):
        """The lane's k-th record. The last one read is kept: a record that did not fit in a row
        is the first of the next."""
        last = self.last_read.get(lane)
        if last is None or last[0] != k:
            i = self.rows[lane] + k * self.global_batch
            last = self.last_read[lane] = (k, self.stream[i] if i < len(self.stream) else None)
        return last[1]

    def _lane(self, lane: int):
        return self.make_row(functools.partial(self._read, lane), int(self.positions[lane]))

    def __next__(self) -> dict:
        lanes = range(len(self.rows))
        made = list(self.pool.map(self._lane, lanes) if self.pool else map(self._lane, lanes))
        if all(used == 0 for _, used in made) or any(row is None for row, _ in made):  # a finite stream ran out
            raise StopIteration
        self.positions += [used for _, used in made]
        return {k: np.stack([row[k] for row, _ in made]) for k in made[0][0]}

    def set_positions(self, positions: np.ndarray):
        """Move every lane to where a checkpoint says it was."""
        self.positions = np.asarray(positions, np.int64).copy()


def _stream(source, seed: int, num_epochs: int | None) -> grain.MapDataset:
    return grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)


# --- text ----------------------------------------------------------------------------------


def _text_piece(record: bytes) -> np.ndarray:
    return np.frombuffer(record, np.int32)


def pack_text_row(read, k: int, seq_len: int):
    """Pieces k, k+1, ... of a lane packed into one row until the next does not fit."""
    row = {name: np.zeros(seq_len, np.int32) for name in ("inputs", "targets", "segment_ids", "positions")}
    filled = used = 0
    while (piece := read(k + used)) is not None:
        n = len(piece) - 1
        if filled + n > seq_len:
            if used == 0:
                raise DataError(f"a record of {n + 1} tokens cannot be packed into rows of seq_len={seq_len}; "
                                f"raise data.seq_len to at least {n} or prepare the data with --seq-len {seq_len}")
            break
        row["inputs"][filled : filled + n] = piece[:-1]
        row["targets"][filled : filled + n] = piece[1:]
        row["segment_ids"][filled : filled + n] = used + 1
        row["positions"][filled : filled + n] = np.arange(n)
        filled += n
        used += 1
    return row, used


def text_rows(source, *, seq_len: int, global_batch: int, rows: Sequence[int], seed: int,
              num_epochs: int | None = None, workers: int = 0) -> Rows:
    """Packed rows of `seq_len` tokens from a source of token-id pieces."""
    stream = _stream(source, seed, num_epochs).map(_text_piece)
    return Rows(stream, functools.partial(pack_text_row, seq_len=seq_len), global_batch=global_batch, rows=rows,
                workers=workers)


# --- images --------------------------------------------------------------------------------


def _one_per_row(read, k: int):
    example = read(k)
    return (example, 1) if example is not None else (None, 0)


def image_rows(source, *, size: int, channels: int, global_batch: int, rows: Sequence[int], seed: int,
               num_epochs: int | None = None, augment: bool = True, workers: int = 0) -> Rows:
    """Rows of {"images": [size, size, channels] in [-1, 1], "labels": int32} from image records."""
    stream = _stream(source, seed, num_epochs).map(functools.partial(images.to_array, size=size, channels=channels))
    if augment:
        stream = stream.random_map(images.random_flip, seed=seed)  # seeded by the index in the global stream
    return Rows(stream, _one_per_row, global_batch=global_batch, rows=rows, workers=workers)


# --- synthetic, for benchmarks -------------------------------------------------------------


class _Random:
    """An endless random-access source whose i-th element is drawn from (seed, i) alone."""

    def __init__(self, seed: int, draw):
        self.seed, self.draw = seed, draw

    def __len__(self):
        return ENDLESS

    def __getitem__(self, i: int):
        return self.draw(np.random.default_rng([self.seed, i]))


def synthetic_text_rows(*, vocab_size: int, seq_len: int, global_batch: int, rows: Sequence[int], seed: int) -> Rows:
    """Random token rows of the right shape, one document per row."""
    draw = lambda rng: rng.integers(4, vocab_size, seq_len + 1, dtype=np.int32)  # noqa: E731
    return Rows(grain.MapDataset.source(_Random(seed, draw)), functools.partial(pack_text_row, seq_len=seq_len),
                global_batch=global_batch, rows=rows)


def synthetic_image_rows(*, size: int, channels: int, num_classes: int, global_batch: int, rows: Sequence[int],
                         seed: int) -> Rows:
    """Random images in [-1, 1] (and labels, -1 if unconditional) of the right shape."""

    def draw(rng):
        label = rng.integers(0, num_classes) if num_classes else -1
        return {"images": rng.uniform(-1, 1, (size, size, channels)).astype(np.float32), "labels": np.int32(label)}

    return Rows(grain.MapDataset.source(_Random(seed, draw)), _one_per_row, global_batch=global_batch, rows=rows)
