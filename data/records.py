"""Prepared datasets on disk: ArrayRecord shards plus a manifest.json that describes them.

A prepared directory holds `<split>-NNNNN.array_record` shards, `manifest.json` (written
last, so a directory without one is incomplete) and, for text, the tokenizer's files. It may
live on local disk or under gs://, where it is read in place: each process fetches the shard
indexes and the records it reads, nothing else (data/ranges.py).
"""

import json
import os

import grain
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

MANIFEST = "manifest.json"
SHARD_SUFFIX = ".array_record"


class DataError(ValueError):
    """Bad input data; the message names the file and the fix."""


class ShardWriter:
    """Writes records into `<prefix>-NNNNN.array_record` shards of about max_bytes: shard k holds
    the records that start within bytes [k, k + 1) x max_bytes of all written (a number is skipped
    only where one record is longer than max_bytes). Cut by offset, shards depend on the records
    alone, so the Beam driver (data/prepare/beam.py) cuts the same ones from many workers."""

    def __init__(self, directory: epath.Path, prefix: str, max_bytes: int):
        self.directory, self.prefix, self.max_bytes = directory, prefix, max_bytes
        self.files: list[str] = []
        self._writer, self._shard, self._offset = None, -1, 0

    def write(self, record: bytes):
        shard = self._offset // self.max_bytes
        if shard != self._shard:
            self._close_shard()
            self.files.append(shard_name(self.prefix, shard))
            # group_size:1 keeps every record individually addressable for random access.
            self._writer, self._shard = ArrayRecordWriter(str(self.directory / self.files[-1]), "group_size:1"), shard
        self._writer.write(record)
        self._offset += len(record)

    def _close_shard(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[str]:
        self._close_shard()
        return self.files


def shard_name(prefix: str, shard: int) -> str:
    return f"{prefix}-{shard:05d}{SHARD_SUFFIX}"


def write_manifest(directory: epath.Path, manifest: dict):
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: epath.Path, kind: str) -> dict:
    path = epath.Path(directory) / MANIFEST
    if not path.exists():
        raise DataError(
            f"{directory} holds no {MANIFEST}; prepare it with `pretrain prepare {kind} --out {directory}` "
            "(an interrupted prepare leaves none)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != kind:
        raise DataError(f"{path} describes a {manifest.get('kind')} dataset, not {kind}; point data.source at a {kind} dataset")
    return manifest


def open_split(directory, manifest: dict, split: str):
    """A random-access source over one split's records, checked against the manifest; None if empty."""
    info = manifest["splits"].get(split)
    if not info or not info["records"]:
        return None
    paths = [str(epath.Path(directory) / f) for f in info["shards"]]
    if str(directory).startswith("gs://"):
        source = _gcs_source(paths)
    else:
        for p in paths:
            _check_local_shard(p)
        source = grain.sources.ArrayRecordDataSource(paths)
    count = len(source)
    if count != info["records"]:
        raise DataError(f"{directory}: {split} shards hold {count} records, the manifest says {info['records']}; prepare it again")
    return source


def _gcs_source(paths: list[str]):
    from data import ranges  # gcsfs and zstandard are loaded only where a bucket is read

    shards = []
    for p in paths:
        try:
            shards.append(ranges.gcs_shard(p))
        except FileNotFoundError:
            raise DataError(f"shard {p} listed in the manifest is missing; prepare the dataset again") from None
        except ValueError as e:
            raise DataError(f"{p} is not a readable ArrayRecord shard: {e}; prepare the dataset again") from None
    return ranges.Source(shards)


def _check_local_shard(path: str):
    if not os.path.isfile(path):
        raise DataError(f"shard {path} listed in the manifest is missing; prepare the dataset again")
    try:  # the index and the first and last chunks: truncation and most damage show up here, cheaply
        shard = grain.sources.ArrayRecordDataSource([path])
        shard[0], shard[len(shard) - 1]
    except Exception:  # noqa: BLE001 - the reader raises several types for broken files
        raise DataError(f"{path} is not a readable ArrayRecord shard (truncated or corrupt); prepare the dataset again") from None
