"""Input pipelines whose global batches are the same however many processes read them.

The records of a split form one global stream: Grain shuffles them (a new order every epoch),
repeats them and applies the per-record transforms (decoding, seeded random flips) by the
record's index in that stream. Row r of every global batch of B rows is a *lane* that reads
records r, r + B, r + 2B, ... of the stream: a text lane packs its records into rows of exactly
seq_len tokens, an image lane takes one record per row. So the global batch at step s depends
only on the seed and s; each process builds just the rows its devices hold (`Rows`); and the
data position is one integer per lane, which a checkpoint keeps as a global array and restores
onto any number of processes.

Text records are pieces of at most seq_len + 1 token ids (data/prepare/); a piece gives
inputs = piece[:-1] and targets = piece[1:]. A lane packs a *window* of its next records, as many
as fit in PACK_WINDOW rows' worth of tokens, into rows by best fit (longest first, each into the
fullest row it fits), and emits those rows one per step before it reads the next window. Packing
only consecutive records (the next one that does not fit starts a new row) left 9.2% of the
smoke corpus's tokens padding at seq_len 2048, where most pieces fill a row alone and a
document's short last piece rarely had a short neighbour; a window pairs them (3.2%). A lane's position is
still one integer, `window start x ROWS_PER_WINDOW + row within the window`. Rows carry
`segment_ids` (1, 2, ... per piece, 0 for padding) and `positions` (restarting at each piece), so
no token attends to or predicts across documents. Packing is done here rather than by Grain's
packers because their state belongs to one iterator.

A `Mixture` of several text datasets is one stream too: each dataset is shuffled and repeated on its
own, and Grain's `MapDataset.mix` interleaves them in fixed proportions of records, a function of
the stream index alone; so everything above holds for mixtures unchanged, and rows also carry
`dataset_ids` (which dataset each token came from).
"""

import dataclasses
import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grain
import ml_dtypes
import numpy as np

from data import images, latents
from data.records import DataError

ENDLESS = 2**62  # length of the synthetic streams
MAX_FETCHES = 128  # records a process reads at once


class Rows:
    """Rows `rows` (the global batch's row indices, in any order or layout) of every global batch.

    `stream` is random-access (a Grain MapDataset); `make_row(read, position, memo)` builds the
    lane's row at `position` (`read(k)` is the lane's k-th record, None past the end of a finite
    stream; `memo` a dict of the lane's own, kept between its rows) and returns (row dict, how far
    the lane's position moves; 0 if it had nothing left). A lane that reads a record it does not
    have fetches it and its next `read_ahead - 1` at once, concurrently: on GCS each record is a
    request, which then overlap. `workers` threads build the lanes' rows in parallel (decoding and
    reads release the GIL). A finite stream ends when every lane has run out or a lane has no row to
    give (`make_row` returned None).
    """

    def __init__(self, stream, make_row, *, global_batch: int, rows: Sequence[int], workers: int = 0, read_ahead: int = 1):
        self.stream, self.make_row, self.global_batch, self.rows = stream, make_row, global_batch, rows
        self.positions = np.zeros(len(rows), np.int64)
        self.fetched = [{} for _ in rows]  # lane -> {k: its k-th record}, from the last one read on
        self.memos = [{} for _ in rows]
        self.pool = ThreadPoolExecutor(workers) if workers else None
        self.read_ahead = read_ahead
        # Enough threads for every lane that reads at once to have its records in flight together.
        fetchers = min(read_ahead * max(workers, 1), MAX_FETCHES)
        self.fetch_pool = ThreadPoolExecutor(fetchers) if read_ahead > 1 else None

    def __iter__(self):
        return self

    def _record(self, lane: int, k: int):
        i = self.rows[lane] + k * self.global_batch
        return self.stream[i] if i < len(self.stream) else None

    def _read(self, lane: int, k: int):
        """The lane's k-th record. Those before it are dropped: a lane reads on, except that a record
        that did not fit in a window is the first of the next."""
        fetched = self.fetched[lane]
        if k not in fetched:
            ks = range(k, k + self.read_ahead)
            records = self.fetch_pool.map(self._record, [lane] * len(ks), ks) if self.fetch_pool else [self._record(lane, k)]
            fetched.update(zip(ks, records))
        for old in [j for j in fetched if j < k]:
            del fetched[old]
        return fetched[k]

    def _lane(self, lane: int):
        return self.make_row(functools.partial(self._read, lane), int(self.positions[lane]), self.memos[lane])

    def __next__(self) -> dict:
        lanes = range(len(self.rows))
        made = list(self.pool.map(self._lane, lanes) if self.pool else map(self._lane, lanes))
        if all(moved == 0 for _, moved in made) or any(row is None for row, _ in made):  # a finite stream ran out
            raise StopIteration
        self.positions += [moved for _, moved in made]
        return {k: np.stack([row[k] for row, _ in made]) for k in made[0][0]}

    def set_positions(self, positions: np.ndarray):
        """Move every lane to where a checkpoint says it was."""
        self.positions = np.asarray(positions, np.int64).copy()
        self.fetched = [{} for _ in self.rows]


def _stream(source, seed: int, num_epochs: int | None) -> grain.MapDataset:
    return grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)


# --- text ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Several sources of text records, drawn in proportions `shares` of records."""

    sources: Sequence
    shares: Sequence[float]


def _tagged_piece(dataset: int, record: bytes) -> tuple[int, np.ndarray]:
    return dataset, np.frombuffer(record, np.int32)


def _text_stream(source, seed: int, num_epochs: int | None) -> grain.MapDataset:
    """(dataset index, piece) pairs; a mixture ends when its first dataset runs out (with num_epochs)."""
    if not isinstance(source, Mixture):
        return _stream(source, seed, num_epochs).map(functools.partial(_tagged_piece, 0))
    streams = [_stream(s, seed + j, num_epochs).map(functools.partial(_tagged_piece, j)) for j, s in enumerate(source.sources)]
    return grain.MapDataset.mix(streams, list(source.shares))


PACK_WINDOW = 16  # rows' worth of tokens a text lane packs together
# Best fit never leaves two rows at most half full, so a window of at most PACK_WINDOW rows' worth
# of tokens makes at most 2 x PACK_WINDOW + 1 rows.
ROWS_PER_WINDOW = 2 * PACK_WINDOW + 1


def _window(read, start: int, seq_len: int) -> list[tuple[int, np.ndarray]]:
    """The lane's (dataset, piece) records from `start` on, as many as fit in PACK_WINDOW rows' worth
    of tokens (at least one)."""
    pieces, tokens = [], 0
    while (record := read(start + len(pieces))) is not None:
        n = len(record[1]) - 1
        if n > seq_len:
            raise DataError(f"a record of {n + 1} tokens cannot be packed into rows of seq_len={seq_len}; "
                            f"raise data.seq_len to at least {n} or prepare the data with --seq-len {seq_len}")
        if pieces and tokens + n > PACK_WINDOW * seq_len:
            break
        pieces.append(record)
        tokens += n
    return pieces


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity`: longest first, each into the
    fullest row it fits (the first such row on ties), else a new row. Deterministic."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: free[r])
            rows[r].append(i)
            free[r] -= lengths[i]
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


def text_record(position: int) -> int:
    """The lane's first record not yet trained on at a text lane's `position`."""
    return position // ROWS_PER_WINDOW


def pack_text_row(read, position: int, memo: dict, seq_len: int, dataset_ids: bool = False):
    """The lane's row at `position`: row `position % ROWS_PER_WINDOW` of the best-fit packing of the
    window of records that starts at record `position // ROWS_PER_WINDOW`."""
    names = ("inputs", "targets", "segment_ids", "positions") + (("dataset_ids",) if dataset_ids else ())
    row = {name: np.zeros(seq_len, np.int32) for name in names}
    start, index = divmod(position, ROWS_PER_WINDOW)
    if memo.get("start") != start:  # a new window (or a resume): read and pack it once for all its rows
        pieces = _window(read, start, seq_len)
        memo.update(start=start, pieces=pieces, packed=best_fit([len(p) - 1 for _, p in pieces], seq_len))
    pieces, packed = memo["pieces"], memo["packed"]
    if not pieces:
        return row, 0
    if index >= len(packed):
        raise DataError(f"data position {position} is not one of this data's rows (a checkpoint of other data, or "
                        "from before windowed packing); train afresh with checkpoint.overwrite=true")
    filled = 0
    for segment, i in enumerate(packed[index], 1):
        dataset, piece = pieces[i]
        n = len(piece) - 1
        row["inputs"][filled : filled + n] = piece[:-1]
        row["targets"][filled : filled + n] = piece[1:]
        row["segment_ids"][filled : filled + n] = segment
        row["positions"][filled : filled + n] = np.arange(n)
        if dataset_ids:
            row["dataset_ids"][filled : filled + n] = dataset
        filled += n
    following = position + 1 if index + 1 < len(packed) else (start + len(pieces)) * ROWS_PER_WINDOW
    return row, following - position


def text_rows(source, *, seq_len: int, global_batch: int, rows: Sequence[int], seed: int,
              num_epochs: int | None = None, workers: int = 0) -> Rows:
    """Packed rows of `seq_len` tokens from a source of token-id pieces, or a `Mixture` of them."""
    make_row = functools.partial(pack_text_row, seq_len=seq_len, dataset_ids=isinstance(source, Mixture))
    # A window holds at least PACK_WINDOW records (each fills at most a row): reading them together wastes none.
    return Rows(_text_stream(source, seed, num_epochs), make_row, global_batch=global_batch, rows=rows, workers=workers,
                read_ahead=PACK_WINDOW)


# --- images --------------------------------------------------------------------------------


def _one_per_row(read, k: int, memo: dict):
    example = read(k)
    return (example, 1) if example is not None else (None, 0)


def image_rows(source, *, size: int, channels: int, global_batch: int, rows: Sequence[int], seed: int,
               num_epochs: int | None = None, augment: bool = True, workers: int = 0) -> Rows:
    """Rows of {"images": [size, size, channels] in [-1, 1], "labels": int32} from image records."""
    stream = _stream(source, seed, num_epochs).map(functools.partial(images.to_array, size=size, channels=channels))
    if augment:
        stream = stream.random_map(images.random_flip, seed=seed)  # seeded by the index in the global stream
    return Rows(stream, _one_per_row, global_batch=global_batch, rows=rows, workers=workers)


def latent_rows(source, *, layout: latents.Layout, dropout: float, empty: np.ndarray, global_batch: int,
                rows: Sequence[int], seed: int, num_epochs: int | None = None, workers: int = 0) -> Rows:
    """Rows of {"images": scaled latents, "context": text states} from latent records (data/latents.py),
    each latent drawn (and each caption dropped) by a generator seeded by the record's stream index."""
    draw = functools.partial(latents.to_example, layout=layout, dropout=dropout, empty=empty)
    stream = _stream(source, seed, num_epochs).random_map(draw, seed=seed)
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
    draw = lambda rng: (0, rng.integers(4, vocab_size, seq_len + 1, dtype=np.int32))  # noqa: E731
    return Rows(grain.MapDataset.source(_Random(seed, draw)), functools.partial(pack_text_row, seq_len=seq_len),
                global_batch=global_batch, rows=rows)


def synthetic_image_rows(*, size: int, channels: int, num_classes: int, global_batch: int, rows: Sequence[int],
                         seed: int, context: tuple[int, int] | None = None) -> Rows:
    """Random images in [-1, 1] (and labels, -1 if unconditional; text states of shape `context`
    for a text-conditioned model) of the right shape."""

    def draw(rng):
        label = rng.integers(0, num_classes) if num_classes else -1
        example = {"images": rng.uniform(-1, 1, (size, size, channels)).astype(np.float32), "labels": np.int32(label)}
        if context:
            example["context"] = rng.standard_normal(context, np.float32).astype(ml_dtypes.bfloat16)
        return example

    return Rows(grain.MapDataset.source(_Random(seed, draw)), _one_per_row, global_batch=global_batch, rows=rows)
