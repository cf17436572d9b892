"""Each bad input: exit code 2, one line on stderr naming the problem, nothing written."""

import re

import pytest

from pretrain import cli

from conftest import TINY
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
    "offload on cpu": (["model.remat=offload"], "model.remat=offload needs host offload"),
    "steps": (["run.steps=0"], "run.steps=0 must be positive"),
    "lr": (["optim.lr=-1e-3"], "optim.lr=-0.001 must be positive"),
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
