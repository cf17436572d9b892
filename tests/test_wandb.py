"""run.wandb: the log rows and the resolved config in Weights & Biases (offline here: no network),
the same W&B run continued by a resumed run, and a failing W&B client that never stops the run."""

import pytest

from pretrain import cli

from conftest import TINY
from test_trainer import SMOKE

RUN = ["train", SMOKE, *TINY, "train.log_every=1", "train.eval_every=0", "run.wandb.mode=offline",
       "run.wandb.project=tests"]


def test_an_offline_run_logs_its_rows_and_a_resumed_run_continues_it(tmp_path):
    out = tmp_path / "run"
    assert cli.main([*RUN, "run.steps=3", f"run.output_dir={out}"]) == 0
    run_id = (out / "wandb_run_id").read_text()
    (first,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    (records,) = first.glob("*.wandb")
    data = records.read_bytes()
    assert b"grad_norm" in data and b"tokens_per_sec" in data and b"global_batch" in data  # rows and the config
    assert cli.main([*RUN, "run.steps=5", f"run.output_dir={out}"]) == 0
    assert (out / "wandb_run_id").read_text() == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # the resumed start logs to the same run


def test_a_failing_wandb_is_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")

    def refuse(**kwargs):
        raise wandb.errors.CommError("could not reach api.wandb.ai")

    monkeypatch.setattr(wandb, "init", refuse)
    assert cli.main([*RUN, "run.steps=3", f"run.output_dir={tmp_path / 'run'}"]) == 0
    err = capsys.readouterr().err
    assert "warning: W&B stopped logging (could not reach api.wandb.ai); the run goes on" in err
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4  # 3 steps and the final eval
