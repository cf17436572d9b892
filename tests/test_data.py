"""Preparation (tokenizer, ArrayRecord shards, manifest) and the Grain pipelines."""

import hashlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from array_record.python.array_record_module import ArrayRecordWriter

from data import corpus, images, pipeline, ranges, records, tokenizer
from data.prepare import documents, local as prepare
from data.tokenizer import BOS_ID, EOS_ID

from conftest import ROOT
from gcs_proxy import CountingProxy
from test_checkpoint import gs_put

SEQ = 16
DOCS = [list(np.random.default_rng(0).integers(4, 100, n)) for n in (3, 40, 9, 1, 17, 12, 5, 30)]  # 40 > SEQ


def as_records(docs):
    return [p.tobytes() for ids in docs for p in documents.split_pieces(np.asarray(ids), SEQ, BOS_ID, EOS_ID)]


def epoch(source, **kw):
    """Every batch of one epoch, stacked: dict of [rows, SEQ]."""
    batches = list(pipeline.text_rows(source, seq_len=SEQ, global_batch=2, rows=range(2), seed=3, num_epochs=1, **kw))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_packing_keeps_every_token_once_and_restarts_segments():
    rows = epoch(as_records(DOCS))
    assert rows["inputs"].shape[1] == SEQ
    real = rows["segment_ids"] > 0
    # Every document token is a target exactly once, each document ends with EOS; BOS is only an input.
    targets = rows["targets"][real]
    assert sorted(targets[targets > 3]) == sorted(t for d in DOCS for t in d)
    assert (targets == EOS_ID).sum() == len(DOCS)
    assert (rows["inputs"][real] == BOS_ID).sum() == len(DOCS)
    for r in range(len(rows["inputs"])):
        seg, pos = rows["segment_ids"][r], rows["positions"][r]
        for s in set(seg[seg > 0]):
            assert list(pos[seg == s]) == list(range((seg == s).sum()))  # positions restart per piece
        same = (seg[1:] == seg[:-1]) & (seg[1:] > 0)  # within a piece, each target is the next input
        assert np.all(rows["targets"][r][:-1][same] == rows["inputs"][r][1:][same])


def test_a_lane_packs_short_pieces_together_that_consecutive_packing_would_pad():
    """Eight pieces that fill a row and eight of half a row, in shuffled order, on one lane: packing only
    consecutive pieces pads wherever a lone half piece meets a full one; the lane's window packs them
    into twelve full rows, every token once."""
    pieces = [np.arange(100 * i, 100 * i + n + 1, dtype=np.int32) for i, n in enumerate([SEQ] * 8 + [SEQ // 2] * 8)]
    source = [p.tobytes() for p in pieces]
    batches = list(pipeline.text_rows(source, seq_len=SEQ, global_batch=1, rows=[0], seed=3, num_epochs=1))
    rows = {k: np.concatenate([b[k] for b in batches]) for k in ("segment_ids", "targets")}
    assert rows["segment_ids"].shape == (12, SEQ) and np.all(rows["segment_ids"] > 0)
    assert sorted(rows["targets"].ravel()) == sorted(t for p in pieces for t in p[1:])


def text_rows(source, rows, workers=0):
    return pipeline.text_rows(source, seq_len=SEQ, global_batch=4, rows=rows, seed=0, workers=workers)


def assert_batches_equal(got, want):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def assemble(parts, splits):
    """The global batch from each process's rows (`splits[i]`, in any layout)."""
    order = np.argsort(np.concatenate(splits))
    return {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("splits", [([0, 1], [2, 3]), ([0, 3], [1, 2])], ids=["blocks", "interleaved"])
def test_the_global_batch_does_not_depend_on_how_its_rows_are_split(workers, splits):
    """Rows read by two processes, each its share (one block, or rows apart as on a TPU slice), make
    the batches one process reads whole; with worker threads too, and after a resume from the
    positions of the other split."""
    source = as_records(DOCS * 5)
    whole = text_rows(source, range(4))
    parts = [text_rows(source, rows, workers) for rows in splits]
    for _ in range(5):
        want = next(whole)
        assert_batches_equal(assemble([next(p) for p in parts], splits), want)
    # The whole batch's data position, handed to the parts: a resume on another process count.
    position = whole.positions.copy()
    expected = [next(whole) for _ in range(6)]
    resumed = [text_rows(source, rows, workers) for rows in splits]
    for part, rows in zip(resumed, splits):
        part.set_positions(position[rows])
    for want in expected:
        assert_batches_equal(assemble([next(p) for p in resumed], splits), want)


def test_processes_sharing_a_cache_prepare_the_embedded_corpus_once(tmp_path, monkeypatch):
    """The processes of a run on one machine all ask for the stdlib corpus at once: one builds it,
    the others wait for it and read it whole (threads here, each with its own lock file handle)."""
    built, prepare_text = [], corpus.prepare_text
    monkeypatch.setattr(corpus, "prepare_text", lambda *a, **k: built.append(a) or prepare_text(*a, **k))
    ask = lambda: corpus.stdlib_dataset(str(tmp_path), vocab_size=512, seq_len=64, max_bytes=200_000,  # noqa: E731
                                        val_fraction=0.1)
    with ThreadPoolExecutor(3) as pool:
        dirs = list(pool.map(lambda _: (d := ask(), records.read_manifest(d, "text")), range(3)))
    assert len(built) == 1  # without the lock, each thread finds no manifest and builds its own
    for directory, manifest in dirs:  # each read a complete dataset as soon as it returned
        assert len(records.open_split(directory, manifest, "train")) == manifest["splits"]["train"]["records"] > 0


def test_tokenizer_round_trips_code_and_has_fixed_special_ids():
    texts = [f.read_text() for f in corpus.stdlib_files(1_000_000)]
    sp = tokenizer.train(texts, 512)
    sample = "def f(x):\n\tif x:\n        return 'é'  # ünïcode\n"
    assert sp.decode(sp.encode([sample])[0]) == sample
    assert (sp.pad_id, sp.bos_id, sp.eos_id, sp.unk_id) == (0, 1, 2, 3)
    assert sp.vocab_size == 512


def write_inputs(root):
    """The same kinds of input a user brings: plain text, JSONL and Parquet, with a duplicate and long documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", "\n", "    "]
    docs = [" ".join(rng.choice(words, rng.integers(1, 60))) for _ in range(60)]
    root.mkdir()
    (root / "a.txt").write_text(docs[0])
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[1:30])))
    pq.write_table(pa.table({"text": docs[30:] + [docs[5]]}), root / "c.parquet")  # docs[5] again: a duplicate
    return docs


def read_records(directory, manifest, split):
    source = records.open_split(directory, manifest, split)
    return [np.frombuffer(source[i], np.int32) for i in range(len(source))] if source else []


def test_prepared_shards_hold_exactly_the_documents(tmp_path):
    docs = write_inputs(tmp_path / "in")
    sp = tokenizer.train(docs, 320)
    (tmp_path / "sp.model").write_bytes(sp.files["tokenizer.model"])
    out = tmp_path / "prepared"
    manifest = prepare.prepare_text(
        [str(tmp_path / "in" / "*")], str(out), tokenizer=str(tmp_path / "sp.model"), seq_len=SEQ, val_fraction=0.2, workers=2
    )
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["tokenizer_kind"] == "sentencepiece" and (out / "tokenizer.model").read_bytes() == sp.files["tokenizer.model"]
    expected = sorted([BOS_ID, *ids, EOS_ID] for ids in sp.encode(docs))  # every document once, duplicate dropped
    got, total_split = [], 0
    for split in ("train", "validation"):
        pieces = read_records(out, manifest, split)
        assert all(len(p) <= SEQ + 1 for p in pieces)
        info = manifest["splits"][split]
        assert info["records"] == len(pieces) and pieces
        digests = sum(int.from_bytes(hashlib.sha256(p.tobytes()).digest(), "big") for p in pieces)
        assert info["tokens_digest"] == f"{digests % 2**256:064x}"
        # Rebuild documents: each starts with BOS, and consecutive pieces overlap by one token.
        split_docs = []
        for p in pieces:
            if p[0] == BOS_ID:
                split_docs.append(list(p))
            else:
                split_docs[-1] += list(p[1:])
        assert info["documents"] == len(split_docs)
        assert info["tokens"] == sum(len(d) for d in split_docs)
        total_split += info["split_documents"]
        got += split_docs
    assert sorted(got) == expected
    assert total_split == sum(len(d) > SEQ + 1 for d in expected) > 0
    assert manifest["duplicate_documents"] == 1 and manifest["input_files"] == 3


def make_images(root, sizes):
    """Class subdirectories of PNGs with distinct random pixels; returns {path: (pixels, label)}."""
    rng, made = np.random.default_rng(0), {}
    for label, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = root / name / f"{i}.png"
            Image.fromarray(pixels).save(path)
            made[path] = (pixels, label)
    return made


def test_image_pipeline_crops_flips_and_scales(tmp_path):
    made = make_images(tmp_path / "img", [(16, 24), (24, 16), (16, 16)])  # only crops, no resize at size 16
    manifest = prepare.prepare_images([str(tmp_path / "img")], str(tmp_path / "prep"), val_fraction=0.0, workers=1)
    assert manifest["classes"] == ["cat", "dog"] and manifest["splits"]["train"]["records"] == 6
    source = records.open_split(tmp_path / "prep", manifest, "train")
    batches = list(pipeline.image_rows(source, size=16, channels=3, global_batch=3, rows=range(3), seed=0, num_epochs=1))
    assert len(batches) == 2
    got = np.concatenate([b["images"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    assert got.shape == (6, 16, 16, 3) and got.dtype == np.float32 and got.min() >= -1 and got.max() <= 1
    expected = []  # NumPy reference: centre crop, then [-1, 1]
    for pixels, label in made.values():
        h, w = pixels.shape[:2]
        crop = pixels[(h - 16) // 2 : (h - 16) // 2 + 16, (w - 16) // 2 : (w - 16) // 2 + 16] / 127.5 - 1
        expected.append((crop, label))
    flipped = 0
    for image, label in zip(got, labels):
        match = [(np.allclose(image, e, atol=1e-6), np.allclose(image, e[:, ::-1], atol=1e-6)) for e, l in expected if l == label]
        assert any(a or b for a, b in match)
        flipped += any(b and not a for a, b in match)
    assert 0 < flipped < 6  # the flip is random, seeded per image
    # A plain directory reads the same images as its prepared shards.
    files = sorted(made)
    classes, dir_labels = images.labels_from_directories(files)
    direct = images.FileSource(files, dir_labels)
    again = list(pipeline.image_rows(direct, size=16, channels=3, global_batch=3, rows=range(3), seed=0, num_epochs=1))
    np.testing.assert_array_equal(np.concatenate([b["images"] for b in again]), got)
    assert classes == manifest["classes"]


@pytest.mark.parametrize("options", ["group_size:1", "group_size:1,uncompressed"])
def test_range_reads_give_back_what_array_record_wrote(tmp_path, options):
    """data/ranges.py reads back what array_record wrote, each record by its own byte range, on records
    small and large (spanning several 64 KiB blocks), compressed or not."""
    rng = np.random.default_rng(0)
    sizes = [*rng.integers(1, 40, 300), 50_000, 3, 70_000]  # int32s: 200 and 280 KB span several blocks
    expected = [rng.integers(0, 1000, n, dtype=np.int32).tobytes() for n in sizes]
    path = tmp_path / "shard.array_record"
    writer = ArrayRecordWriter(str(path), options)
    for record in expected:
        writer.write(record)
    writer.close()
    content, fetched = path.read_bytes(), []

    def fetch(start, stop):
        fetched.append(stop - start)
        return content[start:stop]

    shard = ranges.Shard(len(content), fetch)
    index_bytes = sum(fetched)
    assert [shard[i] for i in range(len(shard))] == expected
    assert index_bytes + sum(fetched[-len(expected):]) <= len(content)  # the index and each record once: nothing else
    content = content[: len(content) // 2]
    with pytest.raises(ValueError):  # records.open_split turns this into a DataError naming the shard
        ranges.Shard(len(content), fetch)


GCS_SEQ = 64
READ_EPOCH = f"""
import sys
import numpy as np
from data import pipeline, records
directory, rows, out = sys.argv[1], [int(r) for r in sys.argv[2].split(",")], sys.argv[3]
source = records.open_split(directory, records.read_manifest(directory, "text"), "train")
batches = list(pipeline.text_rows(source, seq_len={GCS_SEQ}, global_batch=4, rows=rows, seed=0, num_epochs=1))
np.savez(out, **{{k: np.stack([b[k] for b in batches]) for k in batches[0]}})
"""


def test_a_gcs_dataset_is_read_in_place_each_process_fetching_its_rows_records(gcs, tmp_path):
    """A prepared dataset in the bucket, read by a process of its own per share of the rows (behind a
    proxy that counts what it fetches): one process reading every row of an epoch fetches less than the
    dataset's size, each of two about half of that, and the batches equal those of the local copy."""
    local = corpus.stdlib_dataset(str(ROOT / ".cache"), vocab_size=512, seq_len=GCS_SEQ, max_bytes=200_000,
                                  val_fraction=0.02)
    manifest = records.read_manifest(local, "text")
    shards = manifest["splits"]["train"]["shards"]
    for name in [*shards, records.MANIFEST]:
        gs_put(gcs, f"inplace/{name}", (local / name).read_bytes())
    size = sum((local / s).stat().st_size for s in shards)
    source = records.open_split(local, manifest, "train")
    fetched = {}
    for rows in ([0, 1, 2, 3], [0, 2], [1, 3]):
        proxy = CountingProxy(gcs["STORAGE_EMULATOR_HOST"])
        subprocess.run([sys.executable, "-c", READ_EPOCH, "gs://test-bucket/inplace", ",".join(map(str, rows)),
                        str(tmp_path / "got.npz")], cwd=ROOT, env=dict(gcs, STORAGE_EMULATOR_HOST=proxy.url),
                       check=True, timeout=300)
        proxy.close()
        fetched[len(rows)] = fetched.get(len(rows), []) + [proxy.bytes]
        want = list(pipeline.text_rows(source, seq_len=GCS_SEQ, global_batch=4, rows=rows, seed=0, num_epochs=1))
        assert_batches_equal(dict(np.load(tmp_path / "got.npz")), {k: np.stack([b[k] for b in want]) for k in want[0]})
    (whole,), halves = fetched[4], fetched[2]
    print(f"dataset {size:,} bytes; one process fetched {whole:,}, each of two {halves[0]:,} and {halves[1]:,}")
    assert whole < size
    assert all(0.45 < h / whole < 0.55 for h in halves), (whole, halves)
