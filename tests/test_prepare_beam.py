"""`pretrain prepare text --engine beam` (data/prepare/beam.py) on Beam's DirectRunner, against the
local driver: the same shards byte for byte and the same manifest, on one worker or two, with
documents repeated across files that different workers read."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from data import pipeline, records, tokenizer
from data.prepare import beam
from data.prepare import local as prepare
from pretrain import cli

from conftest import ROOT

SEQ = 16
SHARD_MB = 0.02  # about 21 KB: the train split spans several shards


def write_corpus(root):
    """Eight files of three kinds; the JSONL and Parquet files after the first repeat three documents
    of the first (15 duplicates), so the copies of a document lie in files that different workers read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", "\n", "lambda", "yield"]
    docs = [" ".join(rng.choice(words, rng.integers(1, 120))) for _ in range(320)]
    root.mkdir()
    for f in range(8):
        part = docs[f * 40:(f + 1) * 40] + docs[f:f + 3] * (f > 0)
        if f % 3 == 0:
            (root / f"{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        elif f % 3 == 1:
            pq.write_table(pa.table({"text": part}), root / f"{f}.parquet")
        else:
            (root / f"{f}.txt").write_text(part[0])  # a plain text file is one document
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus, a tokenizer trained once, and the local driver's output as the reference."""
    base = tmp_path_factory.mktemp("beam")
    inputs = [str(write_corpus(base / "in") / "*")]
    reference = prepare.prepare_text(inputs, str(base / "local"), vocab_size=320, seq_len=SEQ, val_fraction=0.2,
                                     shard_mb=SHARD_MB, workers=2)
    return base, inputs, reference


DATAFLOW = ["--runner=DataflowRunner", "--project=my-project", "--region=us-central1",
            "--temp_location=gs://my-bucket/tmp"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project's wheel, built as the README tells Dataflow users to build it."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    (built,) = out.glob("pretrain-*.whl")
    return built


def shard_bytes(directory, manifest) -> dict[str, bytes]:
    return {name: (epath.Path(directory) / name).read_bytes()
            for split in manifest["splits"].values() for name in split["shards"]}


@pytest.mark.parametrize("beam_args", [["--direct_running_mode=in_memory"], ["--direct_num_workers=2"]],
                         ids=["one worker", "two worker processes"])
def test_beam_writes_the_local_drivers_shards_and_manifest(corpus, tmp_path, beam_args):
    base, inputs, reference = corpus
    manifest = beam.prepare_text(inputs, str(tmp_path / "out"), beam_args, tokenizer=str(base / "local"),
                                 seq_len=SEQ, val_fraction=0.2, shard_mb=SHARD_MB)
    train = reference["splits"]["train"]
    assert len(train["shards"]) > 2 and reference["duplicate_documents"] == 15
    assert manifest == reference
    assert json.loads((tmp_path / "out" / records.MANIFEST).read_text()) == manifest
    assert shard_bytes(tmp_path / "out", manifest) == shard_bytes(base / "local", reference)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [records.MANIFEST, "tokenizer.model", *shard_bytes(base / "local", reference)])


def test_the_tokens_digest_sums_the_records_digests(corpus):
    """Both drivers' digest, recomputed from the records read back: it does not depend on order."""
    base, _, reference = corpus
    for split, info in reference["splits"].items():
        source = records.open_split(base / "local", reference, split)
        pieces = [source[i] for i in range(len(source))]
        want = sum(int.from_bytes(hashlib.sha256(p).digest(), "big") for p in reversed(pieces))
        assert info["tokens_digest"] == f"{want % 2**256:064x}"


def test_workers_writing_to_a_bucket_in_place_give_the_same_dataset(corpus, gcs, wheel, monkeypatch):
    """As a remote runner's workers do (no staging directory they could share): each shard written
    to gs:// by the worker that cut it, the manifest last; read back, the local driver's bytes, and
    read in place by the training input pipeline, the local dataset's batches."""
    base, inputs, reference = corpus
    for key in ("STORAGE_EMULATOR_HOST", "NO_GCE_CHECK", "FSSPEC_GCS_TOKEN", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        monkeypatch.setenv(key, gcs[key])
    monkeypatch.setattr(beam, "LOCAL_RUNNERS", ())  # the DirectRunner, taken for a remote one
    for path in epath.Path(base / "in").iterdir():
        (epath.Path("gs://test-bucket/beam-inputs") / path.name).write_bytes(path.read_bytes())
    out = "gs://test-bucket/beam-in-place"
    manifest = beam.prepare_text(["gs://test-bucket/beam-inputs/*"], out,
                                 ["--direct_running_mode=in_memory", f"--extra_package={wheel}"],
                                 tokenizer=str(base / "local"), seq_len=SEQ, val_fraction=0.2, shard_mb=SHARD_MB)
    assert manifest == reference
    assert shard_bytes(out, manifest) == shard_bytes(base / "local", reference)
    assert not (epath.Path(out) / beam.SUMMARY).exists()
    batches = [list(pipeline.text_rows(records.open_split(directory, manifest, "train"), seq_len=SEQ, global_batch=4,
                                       rows=range(4), seed=0, num_epochs=1)) for directory in (out, base / "local")]
    assert len(batches[0]) > 10
    for got, want in zip(*batches, strict=True):
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)


def test_a_remote_runner_with_local_paths_exits_2_before_any_work(corpus, tmp_path, capsys):
    _, inputs, _ = corpus
    rc = cli.main(["prepare", "text", "--input", inputs[0], "--out", str(tmp_path / "out"), "--engine", "beam", "--",
                   "--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://b/tmp"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "is on this machine" in err and "gs://" in err, err
    assert not (tmp_path / "out").exists()


def test_beam_options_without_the_beam_engine_exit_2(corpus, tmp_path, capsys):
    _, inputs, _ = corpus
    rc = cli.main(["prepare", "text", "--input", inputs[0], "--out", str(tmp_path / "out"), "--", "--runner=DirectRunner"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pass --engine beam" in err, err


def test_a_workers_failure_is_one_line_naming_the_file_and_leaves_no_output(corpus, tmp_path):
    """A file only a worker reads (the tokenizer is given, so the launching machine samples
    nothing) fails the job: one line on stderr, exit 2, and nothing at --out or beside it."""
    base, _, _ = corpus
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "good.jsonl").write_text(json.dumps({"text": "fine words"}) + "\n")
    (bad / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pretrain", "prepare", "text", "--input", str(bad), "--out",
                           str(tmp_path / "out"), "--tokenizer", str(base / "local"), "--seq-len", str(SEQ), "--engine",
                           "beam", "--", "--direct_num_workers=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: {bad / 'bad.jsonl'}:2 is not a JSON object with a 'text' field\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_the_dataflow_job_graph_builds_offline_with_the_project_staged(corpus, wheel):
    """Beam's dry run translates the pipeline into a Dataflow job without submitting it (no cloud
    account here): every stage is in the job, and the project's wheel is staged for the workers."""
    base, _, _ = corpus
    options, remote = beam.pipeline_options([*DATAFLOW, "--dry_run=true", f"--extra_package={wheel}"], 0,
                                            ["gs://my-bucket/in/*", "gs://my-bucket/out"])
    p = beam.beam.Pipeline(options=options)
    beam.build(p, ["gs://my-bucket/in/a.jsonl"], tokenizer.load(str(base / "local")), "gs://my-bucket/out", SEQ, 0.2,
               1 << 20)
    result = p.run()
    stages = {t.unique_name.split("/")[0] for t in result.job.proto_pipeline.components.transforms.values()}
    assert remote and {"digests", "by digest", "tokenise", "offsets", "by shard", "write", "write summary"} <= stages
    staged = {d.role_payload for env in result.job.proto_pipeline.components.environments.values()
              for d in env.dependencies}
    assert any(wheel.name.encode() in payload for payload in staged), staged


CLOUD_ERRORS = {
    "no project": ([a for a in DATAFLOW if "project" not in a], "Dataflow needs --project"),
    "no region": ([a for a in DATAFLOW if "region" not in a], "Dataflow needs --region"),
    "a local temp_location": ([*DATAFLOW[:3], "--temp_location=/tmp/x"], "a gs:// --temp_location"),
    "no code for the workers": (DATAFLOW, "the runner's workers need this project: pass --extra_package="),
}


@pytest.mark.parametrize("beam_args, message", CLOUD_ERRORS.values(), ids=CLOUD_ERRORS.keys())
def test_missing_cloud_options_exit_2_in_one_line(beam_args, message, wheel, capsys):
    ship = [] if "workers need" in message else [f"--extra_package={wheel}"]
    rc = cli.main(["prepare", "text", "--input", "gs://my-bucket/in/*", "--out", "gs://my-bucket/out", "--engine", "beam",
                   "--", *beam_args, *ship])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
