"""The Apache Beam driver of `pretrain prepare text --engine beam`: the local driver's records,
counts and digest from a pipeline that Dataflow spreads over many machines (or Beam's DirectRunner
over this one's cores).

Record order is the local driver's: documents by input file and position in it, the first of each
set of duplicates kept, pieces in order. Each split's records are cut into shards by their byte
offset in that order (shard k holds the records that start within [k, k + 1) x --shard-mb), so the
shards do not depend on how many workers ran or how the runner split the work. The stages:

1. duplicates: each file's document digests, grouped by digest; every position but the first drops;
2. pieces: each file read again and tokenised (the tokenizer shipped with the job and loaded once
   per worker), its kept documents cut into pieces with their offsets in the file, its bytes per
   split, and its share of the manifest's totals;
3. shards: each piece's offset in its split (the bytes of the files before it: a side input),
   pieces grouped by shard and written in order (ArrayRecord writes local files; a gs:// shard is
   written locally, then copied);
4. the totals combined, for the launching machine to write the manifest with, last.
"""

import contextlib
import logging
import os
import pickle
import re
import sys
import tempfile

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions, SetupOptions, StandardOptions,
                                                  WorkerOptions)
from apache_beam.pvalue import AsList, AsSingleton
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from data import tokenizer as tokenizer_lib
from data.prepare.documents import SPLITS, digest, is_validation, read_documents, split_pieces
from data.prepare.local import text_inputs
from data.prepare.manifest import SplitTotals, text_manifest
from data.prepare.output import in_place, staged
from data.records import DataError, shard_name, write_manifest

LOCAL_RUNNERS = (None, "DirectRunner", "direct")
SUMMARY = ".beam-summary.pkl"
FAILED = "pretrain prepare failed: "  # marks a worker's one-line error inside the runner's wrapping


def prepare_text(inputs: list[str], out: str, beam_args: list[str], *, tokenizer: str | None = None,
                 vocab_size: int = 32000, model_type: str = "bpe", seq_len: int = 2048, val_fraction: float = 0.01,
                 workers: int = 0, shard_mb: float = 256, tokenizer_sample_mb: int = 256, overwrite: bool = False) -> dict:
    """`inputs` tokenised into ArrayRecord shards under `out` by a Beam pipeline run with
    `beam_args` (Beam's own options); returns the manifest, as data/prepare/local.py's does."""
    options, remote = pipeline_options(beam_args, workers, [*inputs, out])
    files, out, tok = text_inputs(inputs, out, tokenizer=tokenizer, vocab_size=vocab_size, model_type=model_type,
                                  seq_len=seq_len, val_fraction=val_fraction, sample_mb=tokenizer_sample_mb,
                                  overwrite=overwrite)
    with (in_place if remote else staged)(out, overwrite) as target:
        tok.write(target)
        with contextlib.nullcontext() if remote else _quiet_workers():
            _run(options, [str(f) for f in files], tok, str(target), seq_len, val_fraction, int(shard_mb * 2**20))
        summary = target / SUMMARY
        totals, shards, duplicates = pickle.loads(summary.read_bytes())
        summary.unlink()
        if not sum(t.documents for t in totals.values()):
            raise DataError(f"the inputs {', '.join(inputs)} hold no text; check --input")
        manifest = text_manifest(tok, seq_len, len(files), duplicates, totals,
                                 {s: sorted(name for split, name in shards if split == s) for s in SPLITS})
        write_manifest(target, manifest)
    return manifest


def pipeline_options(beam_args: list[str], workers: int, paths: list[str]):
    """Beam's options, checked, and whether the runner's workers are on other machines. The
    DirectRunner runs in worker processes here (one per CPU unless --workers or Beam's
    --direct_num_workers says), quietly, and never through Prism, its default since Beam 2.68,
    which downloads a binary at start; the options given override these."""
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner
    if runner in LOCAL_RUNNERS:
        local = ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers or os.cpu_count() or 1}",
                 "--default_sdk_harness_log_level=CRITICAL"]
        # The runner relays its workers' logs, a failure's traceback among them; the failure is reported in one line.
        logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
        return PipelineOptions(local + beam_args), False
    if here := [p for p in paths if not str(p).startswith("gs://")]:
        raise DataError(f"{here[0]} is on this machine, which the runner's workers cannot reach; use gs:// for --input "
                        "and --out, or Beam's DirectRunner")
    setup = options.view_as(SetupOptions)
    if not (setup.setup_file or setup.requirements_file or setup.extra_packages
            or options.view_as(WorkerOptions).sdk_container_image):
        raise DataError("the runner's workers need this project: pass --extra_package=dist/pretrain-0.1.0-py3-none-any.whl "
                        "(built by `pip wheel --no-deps -w dist .`), or --setup_file, --requirements_file or "
                        "--sdk_container_image")
    if runner in ("DataflowRunner", "dataflow"):
        cloud = options.view_as(GoogleCloudOptions)
        missing = [f"--{name}" for name in ("project", "region") if not getattr(cloud, name)]
        if missing or not str(cloud.temp_location or "").startswith("gs://"):
            raise DataError(f"Dataflow needs {', '.join(missing + ['a gs:// --temp_location'])} (after --); "
                            "e.g. --project=my-project --region=us-central1 --temp_location=gs://my-bucket/tmp")
    return options, True


def build(p, files: list[str], tok, out_dir: str, seq_len: int, val_fraction: float, shard_bytes: int):
    """The pipeline's transforms on `p`: the stages of this module's docstring."""
    indexed = p | "files" >> beam.Create(list(enumerate(files))) | "spread" >> beam.Reshuffle()
    dropped = (indexed | "digests" >> beam.FlatMap(_digests) | "by digest" >> beam.GroupByKey()
               | "all but the first" >> beam.FlatMap(_all_but_first))
    tokenised = ({"path": indexed, "dropped": dropped} | "by file" >> beam.CoGroupByKey()
                 | "tokenise" >> beam.ParDo(_Tokenise(tok.files, seq_len, val_fraction)).with_outputs(
                     "sizes", "totals", main="records"))
    offsets = tokenised.sizes | "sizes" >> beam.combiners.ToList() | "offsets" >> beam.Map(_split_offsets)
    shards = (tokenised.records
              | "to shards" >> beam.Map(_to_shard, AsSingleton(offsets), shard_bytes)
              | "by shard" >> beam.GroupByKey() | "write" >> beam.Map(_write_shard, out_dir))
    totals = tokenised.totals | "add up" >> beam.CombineGlobally(_AddUp(tok.vocab_size))
    duplicates = dropped | "duplicates" >> beam.combiners.Count.Globally()
    (p | "summary" >> beam.Create([out_dir])
     | "write summary" >> beam.Map(_write_summary, AsSingleton(totals), AsList(shards), AsSingleton(duplicates)))


def _run(options, *args):
    """Run the pipeline to its end; a worker's failure raised as the one line it reported."""
    try:
        with beam.Pipeline(options=options) as p:
            build(p, *args)
    except Exception as e:  # noqa: BLE001 - runners wrap a worker's error in their own types and traces
        failed = re.search(re.escape(FAILED) + r"(.*)", str(e))
        if failed is None:
            raise
        raise DataError(failed.group(1).strip()) from None


@contextlib.contextmanager
def _quiet_workers():
    """The DirectRunner's worker processes print a failed bundle's traceback to the stderr they
    inherit (Beam's sdk_worker.py, whatever the log level); here they inherit a scratch file, and
    the failure comes back as one line through the runner's error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _reporting(path: str):
    """A worker's failure on `path` as one line the launching machine finds in the runner's error."""
    try:
        yield
    except DataError as e:
        raise RuntimeError(f"{FAILED}{e}") from None
    except Exception as e:  # noqa: BLE001 - whatever reading the file raised, named with the file
        raise RuntimeError(f"{FAILED}{path}: {type(e).__name__}: {e}") from None


def _digests(indexed_file):
    index, path = indexed_file
    with _reporting(path):
        for position, text in enumerate(read_documents(epath.Path(path))):
            yield digest(text.encode()), (index, position)


def _all_but_first(grouped):
    _, places = grouped
    yield from sorted(places)[1:]


class _Tokenise(beam.DoFn):
    """One file's kept documents as records with their byte offsets in the file, per split, and the
    file's totals."""

    def __init__(self, tokenizer_files: dict[str, bytes], seq_len: int, val_fraction: float):
        self.tokenizer_files, self.seq_len, self.val_fraction = tokenizer_files, seq_len, val_fraction

    def setup(self):
        self.tok = tokenizer_lib.from_files(self.tokenizer_files, "the tokenizer")

    def process(self, grouped):
        yield from _tokenise(self.tok, self.seq_len, self.val_fraction, grouped)


def _tokenise(tok, seq_len: int, val_fraction: float, grouped):
    index, parts = grouped
    (path,), dropped = parts["path"], set(parts["dropped"])
    with _reporting(path):
        docs = [text for position, text in enumerate(read_documents(epath.Path(path))) if position not in dropped]
        encoded = tok.encode(docs)
    offsets = dict.fromkeys(SPLITS, 0)
    totals = {s: SplitTotals(tok.vocab_size) for s in SPLITS}
    for text, ids in zip(docs, encoded):
        split = "validation" if is_validation(digest(text.encode()), val_fraction) else "train"
        ids = np.asarray(ids, np.int32)
        pieces = split_pieces(ids, seq_len, tok.bos_id, tok.eos_id)
        for piece in pieces:
            record = piece.tobytes()
            yield split, index, offsets[split], record
            offsets[split] += len(record)
        totals[split].add(ids, pieces)
    for split in SPLITS:
        yield beam.pvalue.TaggedOutput("sizes", (split, index, offsets[split]))
    yield beam.pvalue.TaggedOutput("totals", totals)


def _split_offsets(sizes) -> dict:
    """(split, file index) -> the bytes of that split's records in the files before it."""
    offsets, running = {}, dict.fromkeys(SPLITS, 0)
    for split, index, size in sorted(sizes):
        offsets[split, index] = running[split]
        running[split] += size
    return offsets


def _to_shard(record, offsets: dict, shard_bytes: int):
    split, index, offset, data = record
    start = offsets[split, index] + offset
    return (split, start // shard_bytes), (start, data)


def _write_shard(grouped, out_dir: str) -> tuple[str, str]:
    (split, shard), records = grouped
    name = shard_name(split, shard)
    with tempfile.TemporaryDirectory() as scratch:
        local = out_dir if not out_dir.startswith("gs://") else scratch
        writer = ArrayRecordWriter(os.path.join(local, name), "group_size:1")  # as records.ShardWriter writes
        for _, data in sorted(records):
            writer.write(data)
        writer.close()
        if local == scratch:
            epath.Path(scratch, name).copy(epath.Path(out_dir) / name)
    return split, name


class _AddUp:
    """A CombineGlobally function: files' totals added up per split (no files: zeros)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, parts) -> dict:
        totals = {s: SplitTotals(self.vocab_size) for s in SPLITS}
        for part in parts:
            totals = {s: totals[s].merge(part[s]) for s in SPLITS}
        return totals


def _write_summary(out_dir: str, totals: dict, shards: list, duplicates: int):
    (epath.Path(out_dir) / SUMMARY).write_bytes(pickle.dumps((totals, shards, duplicates)))
