"""Each bad input: exit code 2, one line on stderr naming the problem, nothing written."""

import re
import shutil
import subprocess
import sys

import pytest

from data import corpus
from data.prepare import local as prepare

from pretrain import cli

from conftest import ROOT, TINY
from test_checkpoint import gs_put
from test_trainer import SMOKE

CASES = {
    "mesh product": (["mesh.data=3", "mesh.model=4"], "mesh.data x mesh.model = 3 x 4 = 12, but there are 8 devices"),
    "batch vs data axis": (["train.global_batch=6", "mesh.data=4", "mesh.model=2"], "train.global_batch=6 is not divisible"),
    "batch vs microbatches": (["train.microbatches=3"], r"data axis x microbatches \(2 x 3 = 6\)"),
    "heads vs model axis": (["model.num_heads=6", "model.num_kv_heads=2"], "model.num_heads=6 is not divisible by the model axis"),
    "mlp vs model axis": (["model.mlp_dim=66"], "model.mlp_dim=66 is not divisible by the model axis"),
    "vocab vs model axis": (["model.vocab_size=258"], "model.vocab_size=258 is not divisible by the model axis"),
    "kv heads vs model axis": (["model.num_heads=24", "model.num_kv_heads=6"], "model.num_kv_heads=6 is not divisible by the model axis"),
    "kv heads vs heads": (["model.num_kv_heads=3"], "model.num_kv_heads=3 must divide model.num_heads=4"),
    "seq_len": (["data.seq_len=64"], "data.seq_len=64 exceeds model.max_seq_len=32"),
    "remat": (["model.remat=some"], "model.remat='some' is unknown"),
    "cpu matmul dtype": (["model.cpu_matmul_dtype=float16"], "model.cpu_matmul_dtype='float16' must be auto, float32 or bfloat16"),
    "wandb mode": (["run.wandb.mode=cloud"], r"run.wandb.mode='cloud' is unknown; use one of \['disabled', 'offline', 'online'\]"),
    "wandb without a project": (["run.wandb.mode=offline"], "run.wandb.mode=offline needs run.wandb.project"),
    "max skipped steps": (["train.max_skipped_steps=0"], "train.max_skipped_steps=0 must be positive"),
    "attention": (["model.attention=flash"], "model.attention='flash' is unknown; use one of .*'auto'"),
    "splash blocks vs seq_len": (
        ["model.attention=splash"],
        r"model.attention=splash: its blocks of 16 tokens \(model.splash_block_q=512, capped at data.seq_len=16\) must be",
    ),
    "offload on cpu": (["model.remat=offload"], "model.remat=offload offloads to host memory, which the CPU backend lacks"),
    "custom offload on cpu": (["model.remat=custom", "model.remat_custom.layer_input=offload"],
                              "model.remat=custom offloads .* or no offload in model.remat_custom"),
    "custom remat choice": (["model.remat=custom", "model.remat_custom.qkv=keep"],
                            r"model.remat_custom.qkv='keep' is unknown; use one of \['device', 'offload', 'remat'\]"),
    "residual split": (["mesh.residual_split=width"],
                       r"mesh.residual_split='width' is unknown; use one of \['none', 'length', 'embed'\]"),
    "residual split vs seq_len": (["mesh.residual_split=length", "data.seq_len=14"],
                                  r"mesh.residual_split=length splits data.seq_len=14 over the model axis \(4\)"),
    "residual split vs embed_dim": (["mesh.residual_split=embed", "model.embed_dim=18"],
                                    r"mesh.residual_split=embed splits model.embed_dim=18 over the model axis \(4\)"),
    "steps": (["run.steps=0"], "run.steps=0 must be positive"),
    "local tier in a bucket": (["checkpoint.local_dir=gs://b/local"],
                               "checkpoint.local_dir=gs://b/local must be a path on each host's own disk"),
    "local tier cadence": (["checkpoint.local_every=-2"], "checkpoint.local_every=-2 must be >= 0"),
    "harness without a tokenizer": (["eval.harness_tasks=[hellaswag]"], "eval.harness_tasks needs the model's tokenizer"),
    "harness cadence": (["eval.harness_every=-1"], "eval.harness_every=-1 must be >= 0"),
    "harness few-shot": (["eval.harness_num_fewshot=-2"], "eval.harness_num_fewshot=-2 must be >= 0, or -1"),
    "profile steps": (["train.profile_steps=[5,40]"], r"train.profile_steps=\[5, 40\] must be \[start, end\]"),
    "lr": (["optim.lr=-1e-3"], "optim.lr=-0.001 must be positive"),
    "rope scaling": (["model.rope_scaling.type=yarn"], r"model.rope_scaling.type='yarn' is unknown; use one of \['none', 'linear', 'llama3'\]"),
    "llama3 frequency factors": (["model.rope_scaling.type=llama3", "model.rope_scaling.factor=8", "model.rope_scaling.high_freq_factor=1"],
                                 "low_freq_factor=1.0 and high_freq_factor=1.0 must satisfy 0 < low < high"),
    "vocab too small for the tokenizer": (
        ["data.source=stdlib", "data.max_corpus_mb=0.5", "model.vocab_size=128"], "cannot train a 128-piece tokenizer"
    ),
    "unknown key": (["model.layers=3"], "unknown config key 'model.layers'"),
    "wrong type": (["train.global_batch=big"], "config key 'train.global_batch' wants int"),
}


@pytest.mark.parametrize("overrides, message", CASES.values(), ids=CASES.keys())
def test_bad_input_exits_2_with_one_line(overrides, message, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", SMOKE, *TINY, *overrides, f"run.output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small prepared text dataset: 510 tokenizer pieces (padded to 512 for a 4-way model axis), pieces of 16."""
    root = tmp_path_factory.mktemp("data")
    files = [str(f) for f in corpus.stdlib_files(300_000)]
    prepare.prepare_text(files, str(root / "ds"), vocab_size=510, seq_len=16, val_fraction=0.1, workers=1)
    return root / "ds"


def one_line_error(capsys, message):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_a_prepared_dataset_trains_with_its_vocab_padded_to_the_model_axis(prepared, tmp_path):
    rc = cli.main(["train", SMOKE, *TINY, f"data.source={prepared}", "model.vocab_size=512", "run.steps=2",
                   f"run.output_dir={tmp_path / 'run'}"])
    assert rc == 0


def corrupt(prepared, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    shard = bad / "train-00000.array_record"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return bad


TRAIN_DATA_CASES = {
    "no such dataset": (lambda p, t: t / "nothing", [], "holds no manifest.json"),
    "corrupt shard": (corrupt, ["model.vocab_size=512"], r"train-00000.array_record is not a readable ArrayRecord shard"),
    "vocab mismatch": (lambda p, t: p, ["model.vocab_size=256"], r"set model.vocab_size=512 \(its 510 pieces padded"),
    "seq_len shorter than pieces": (lambda p, t: p, ["model.vocab_size=512", "data.seq_len=8"], "data.seq_len=8 is shorter"),
}


@pytest.mark.parametrize("make, overrides, message", TRAIN_DATA_CASES.values(), ids=TRAIN_DATA_CASES.keys())
def test_bad_training_data_exits_2(make, overrides, message, prepared, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", SMOKE, *TINY, f"data.source={make(prepared, tmp_path)}", *overrides, f"run.output_dir={out}"])
    assert rc == 2
    one_line_error(capsys, message)
    assert not out.exists()


GCS_DATA_CASES = {
    "missing shard": (lambda shard: None,
                      r"shard gs://test-bucket/\w+/train-00000.array_record listed in the manifest is missing"),
    "truncated shard": (lambda shard: shard[: len(shard) // 2],
                        r"gs://test-bucket/\w+/train-00000.array_record is not a readable ArrayRecord shard"),
}


@pytest.mark.parametrize("damage, message", GCS_DATA_CASES.values(), ids=GCS_DATA_CASES.keys())
def test_a_bad_shard_in_a_bucket_exits_2(damage, message, prepared, gcs, tmp_path):
    """Read in place, a missing or broken shard on gs:// is named in one line before anything runs."""
    bucket_dir = tmp_path.name  # one per case
    for f in prepared.iterdir():
        content = damage(f.read_bytes()) if f.name == "train-00000.array_record" else f.read_bytes()
        if content is not None:
            gs_put(gcs, f"{bucket_dir}/{f.name}", content)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pretrain", "train", SMOKE, *TINY, "model.vocab_size=512",
                           f"data.source=gs://test-bucket/{bucket_dir}", f"run.output_dir={out}"],
                          cwd=ROOT, env=gcs, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and re.search(message, proc.stderr), proc.stderr
    assert not out.exists()


def write_files(root):
    root.mkdir()
    (root / "blank.txt").write_text("  \n\n")
    (root / "notes.jsonl").write_text('{"body": "no text field"}\n')
    (root / "fake.model").write_text("not a tokenizer")
    (root / "hf").mkdir()
    (root / "hf" / "tokenizer.json").write_text("{}")
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("mine")
    return root


PREPARE_CASES = {
    "missing input": (["--input", "{r}/nope.txt"], "input .*nope.txt does not exist"),
    "glob matches nothing": (["--input", "{r}/*.parquet"], r"matches no files"),
    "blank input": (["--input", "{r}/blank.txt"], "hold no text"),
    "jsonl without text": (["--input", "{r}/notes.jsonl"], r"notes.jsonl:1 is not a JSON object with a 'text' field"),
    "not a tokenizer": (["--input", "{r}/blank.txt", "--tokenizer", "{r}/fake.model"], "fake.model is not a SentencePiece model"),
    "tokenizer.json alone": (["--input", "{r}/blank.txt", "--tokenizer", "{r}/hf/tokenizer.json"],
                             "has tokenizer.json but no tokenizer_config.json beside it"),
    "no tokenizer in a directory": (["--input", "{r}/blank.txt", "--tokenizer", "{r}"], "holds neither tokenizer.json nor tokenizer.model"),
    "output not empty": (["--input", "{r}/blank.txt", "--out", "{r}/out"], "output directory .*out is not empty; pass --overwrite"),
    "shard size": (["--input", "{r}/blank.txt", "--shard-mb", "0"], "--shard-mb 0 must be positive"),
}


@pytest.mark.parametrize("engine", ["local", "beam"])
@pytest.mark.parametrize("args, message", PREPARE_CASES.values(), ids=PREPARE_CASES.keys())
def test_bad_prepare_input_exits_2(args, message, engine, tmp_path, capsys):
    """The same one line from either engine (the Beam driver checks before its job starts)."""
    root = write_files(tmp_path / "in")
    args = [a.format(r=root) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "new")]
    assert cli.main(["prepare", "text", *args, *out, "--vocab-size", "300", "--engine", engine]) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in (root / "out").iterdir()) == ["keep.txt"]
