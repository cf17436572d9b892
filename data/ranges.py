"""ArrayRecord shards read where they lie (gs://) by exact byte ranges: the shard's index once,
then one range per record.

array_record can open gs:// paths itself, but each random read opens an open-ended range
(`bytes=N-`) and hangs up after one record: every record then costs about a receive window
(measured: ~175 KB per record of ~0.5 KB against the emulator), so a host reading half the
records of an epoch would fetch several times the whole dataset. Here a record costs its own
chunk's bytes: the footer of each shard gives the offset of every chunk (prepare writes one
record per chunk, `group_size:1`), and record i is the chunk between offsets i and i + 1.

The layout read is Riegeli's (the container ArrayRecord writes): 64 KiB blocks, each starting
with a 24-byte block header; chunks of a 40-byte header (hash, data size, data hash, type and
record count, decoded size) and data that runs across block headers; a "simple" chunk's data is
a compression byte, the varint size of the (compressed) record sizes, those sizes, then the
(compressed) record bytes, each compressed part being a varint decoded size and a zstd frame.
The shard's last block starts with the postscript chunk, whose record names the footer chunk;
the footer's first record describes the file and each later one a chunk (offset, decoded size,
records). Any other layout (brotli, snappy, several records per chunk) raises ValueError.
"""

import bisect
import functools
import itertools

import zstandard

BLOCK = 1 << 16
BLOCK_HEADER = 24
CHUNK_HEADER = 40
SIMPLE_CHUNK = ord("r")
UNCOMPRESSED, ZSTD = 0, ord("z")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_ints(message: bytes) -> dict[int, int]:
    """The varint fields of a protobuf message (the footer's messages hold nothing else we need)."""
    fields, pos = {}, 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        wire = key & 7
        if wire == 0:
            fields[key >> 3], pos = _varint(message, pos)
        elif wire == 2:
            size, pos = _varint(message, pos)
            pos += size
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return fields


def _without_block_headers(data: bytes, start: int) -> bytes:
    """The bytes of file range [start, start + len(data)) less the block headers inside it."""
    parts, pos, end = [], start, start + len(data)
    while pos < end:
        in_block = pos % BLOCK
        if in_block < BLOCK_HEADER:
            pos = min(pos - in_block + BLOCK_HEADER, end)
            continue
        stop = min(pos - in_block + BLOCK, end)
        parts.append(data[pos - start : stop - start])
        pos = stop
    return b"".join(parts)


def _uncompressed(part: bytes, compression: int) -> bytes:
    if compression == UNCOMPRESSED:
        return part
    size, pos = _varint(part, 0)
    return zstandard.ZstdDecompressor().decompress(part[pos:], max_output_size=size)


def simple_chunk_records(chunk: bytes) -> list[bytes]:
    """The records of one chunk (its header and data, block headers removed). The chunk's hashes are
    not checked (HighwayHash is not at hand); its sizes are, and zstd checks its frames."""
    data_size, decoded_size = int.from_bytes(chunk[8:16], "little"), int.from_bytes(chunk[32:40], "little")
    kind, count = chunk[24], int.from_bytes(chunk[25:32], "little")
    data = chunk[CHUNK_HEADER : CHUNK_HEADER + data_size]
    if kind != SIMPLE_CHUNK or len(data) != data_size or data[0] not in (UNCOMPRESSED, ZSTD):
        raise ValueError("not a simple chunk, zstd or uncompressed")
    sizes_size, pos = _varint(data, 1)
    sizes = _uncompressed(data[pos : pos + sizes_size], data[0])
    values = _uncompressed(data[pos + sizes_size :], data[0])
    if len(values) != decoded_size:
        raise ValueError(f"a chunk decodes to {len(values)} bytes, its header says {decoded_size}")
    records, p, offset = [], 0, 0
    for _ in range(count):
        size, p = _varint(sizes, p)
        records.append(values[offset : offset + size])
        offset += size
    return records


class Shard:
    """One ArrayRecord file read through `fetch(start, stop) -> bytes` (its size known)."""

    def __init__(self, size: int, fetch):
        self.fetch = fetch
        try:
            last_block = (size - 1) // BLOCK * BLOCK
            postscript = self._chunk(last_block + BLOCK_HEADER, size)
            footer_offset = _proto_ints(simple_chunk_records(postscript)[0])[1]
            footer = simple_chunk_records(self._chunk(footer_offset, last_block))
            chunks = [_proto_ints(r) for r in footer[1:]]
        except (IndexError, KeyError, zstandard.ZstdError) as e:
            raise ValueError(f"unreadable index ({e!r})") from None
        if any(c.get(3, 0) != 1 for c in chunks):
            raise ValueError("several records per chunk (written without group_size:1)")
        # Record i is the chunk that starts at offset i; it ends where the next one (or the footer) starts.
        self.offsets = [c.get(1, 0) for c in chunks] + [footer_offset]

    def _chunk(self, start: int, limit: int) -> bytes:
        """The chunk at `start`, its header read first to learn its size, then the rest."""
        head = _without_block_headers(self.fetch(start, min(start + CHUNK_HEADER + BLOCK_HEADER, limit)), start)
        data_size = int.from_bytes(head[8:16], "little")
        length = CHUNK_HEADER + data_size
        crossed = length // (BLOCK - BLOCK_HEADER) + 2  # at most this many block headers inside
        end = start + length + crossed * BLOCK_HEADER
        return _without_block_headers(self.fetch(start, min(end, limit)), start)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        start, stop = self.offsets[i], self.offsets[i + 1]
        return simple_chunk_records(_without_block_headers(self.fetch(start, stop), start))[0]


def gcs_shard(path: str) -> Shard:
    """A shard under gs://: FileNotFoundError if missing, ValueError if not readable."""
    fs = gcsfs_filesystem()
    return Shard(fs.size(path), functools.partial(_read_range, fs, path))


def _read_range(fs, path: str, start: int, stop: int) -> bytes:
    return fs.cat_file(path, start=start, end=stop)


@functools.cache
def gcsfs_filesystem():
    """One client per process: its connections are reused by every read."""
    import gcsfs

    return gcsfs.GCSFileSystem()


class Source:
    """Random access to the records of several shards (a Grain MapDataset source)."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards
        self.ends = list(itertools.accumulate(len(s) for s in shards))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, i: int) -> bytes:
        s = bisect.bisect_right(self.ends, i)
        return self.shards[s][i - (self.ends[s - 1] if s else 0)]
