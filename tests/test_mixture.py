"""Weighted mixtures of prepared text datasets (data.sources): batches independent of the process
count and resumable across it, shares of tokens as weighted, one tokenizer, per-dataset metrics and
held-out losses, and a finite run (data.num_epochs) that ends with a checkpoint."""

import json

import numpy as np
import pytest

from data import corpus, tokenizer
from data.prepare import local as prepare
from pretrain import cli, config as config_lib
from pretrain.tasks import LanguageModelTask

from conftest import CACHE, TINY, tiny_config
from test_data import assemble, assert_batches_equal
from test_multihost import run_launched
from test_trainer import SMOKE

SEQ = 16


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two text datasets from different parts of the standard library, one tokenizer ("web" and
    "code"), and a third with a tokenizer of its own ("other"). "code" is cut into pieces half as
    long, so a share of records is not a share of tokens."""
    root = tmp_path_factory.mktemp("mixture")
    files = [str(f) for f in corpus.stdlib_files(1_000_000) if f.stat().st_size < 20_000][:36]  # about 90 kB each
    web, code, other = files[0::3], files[1::3], files[2::3]
    (root / "tok").mkdir()
    tokenizer.train([open(f).read() for f in web], 512).write(root / "tok")
    paths = {}
    for name, inputs, tok, seq in (("web", web, str(root / "tok"), SEQ), ("code", code, str(root / "tok"), SEQ // 2),
                                   ("other", other, None, SEQ)):
        paths[name] = root / name
        prepare.prepare_text(inputs, str(paths[name]), tokenizer=tok, vocab_size=512, seq_len=seq, val_fraction=0.2,
                             tokenizer_sample_mb=1)
    return paths


def mixture(datasets, weights=(0.7, 0.3), names=("web", "code")):
    return "data.sources=" + ",".join(f"{n}={datasets[n]}:{w}" for n, w in zip(names, weights))


MIXED = ["data.source=stdlib", "model.vocab_size=512"]  # (TINY's data.source=synthetic would exclude data.sources)


def task_of(*overrides):
    cfg = tiny_config(*MIXED, *overrides)
    task = LanguageModelTask(LanguageModelTask.resolve(cfg, (2, 4), "cpu"))
    task.open_data(model_axis=4)
    return task


def test_the_mixed_batches_do_not_depend_on_the_process_count_and_resume_across_it(datasets):
    task = task_of(mixture(datasets))
    whole = task.batches("train", range(8))
    for processes in (2, 4):
        splits = [list(range(8))[p::processes] for p in range(processes)]  # rows apart, as on a TPU slice
        parts = [task.batches("train", rows) for rows in splits]
        reference = task.batches("train", range(8))
        for _ in range(5):
            assert_batches_equal(assemble([next(p) for p in parts], splits), next(reference))
    for _ in range(7):
        next(whole)
    position = whole.positions.copy()  # a checkpoint of one process, resumed on four
    want = [next(whole) for _ in range(5)]
    splits = [[0, 1], [2, 3], [4, 5], [6, 7]]
    resumed = [task.batches("train", rows) for rows in splits]
    for part, rows in zip(resumed, splits):
        part.set_positions(position[rows])
    for batch in want:
        assert_batches_equal(assemble([next(p) for p in resumed], splits), batch)
    assert {0, 1} == set(np.unique([b["dataset_ids"] for b in want]))  # both datasets are in these batches


def test_shares_of_tokens_follow_the_weights_over_a_thousand_steps(datasets):
    task = task_of(mixture(datasets))
    batches = task.batches("train", range(8))
    drawn = np.zeros(2)
    for _ in range(1000):
        b = next(batches)
        real = b["segment_ids"] > 0
        drawn += [np.sum(real & (b["dataset_ids"] == j)) for j in (0, 1)]
    share = drawn / drawn.sum()
    assert share == pytest.approx([0.7, 0.3], abs=0.02), share
    epochs = task.epochs(batches.positions, range(8))
    assert set(epochs) == {"epoch/web", "epoch/code"} and epochs["epoch/code"] > 1  # code has repeated


def test_datasets_of_different_tokenizers_exit_2_naming_both(datasets, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", SMOKE, *TINY, *MIXED, mixture(datasets, names=("web", "other")),
                   f"run.output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "data.sources[0] (web:" in err and "data.sources[1] (other:" in err and "different tokenizers" in err
    assert not out.exists()


def test_the_shorthand_and_the_yaml_list_are_one_config(datasets):
    listed = f"data.sources=[{{path: {datasets['web']}, weight: 0.7, name: web}}, {{path: {datasets['code']}, weight: 0.3, name: code}}]"
    assert tiny_config(mixture(datasets)).data.sources == tiny_config(listed).data.sources
    with pytest.raises(config_lib.ConfigError, match="is not NAME=PATH:WEIGHT"):
        tiny_config(f"data.sources=web={datasets['web']}")


def test_a_mixed_run_logs_each_dataset_and_ends_when_one_runs_out(datasets, tmp_path):
    """With data.num_epochs=1 the run ends, with a checkpoint, before the first batch it cannot fill;
    rows count tokens per dataset and passes through each, evals give each dataset's held-out loss."""
    out = tmp_path / "run"
    assert cli.main(["train", SMOKE, *TINY, *MIXED, mixture(datasets, (0.5, 0.5)),
                     "data.num_epochs=1", "run.steps=10000", "train.log_every=20", "train.eval_every=40",
                     "train.eval_batches=1", f"run.output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    last = train[-1]["step"]
    assert 40 < last < 10000 and last % 20  # the final row is the data's end, not a log_every step
    for r, steps in zip(train, np.diff([0] + [r["step"] for r in train])):  # a row counts the steps since the last
        assert r["tokens/web"] + r["tokens/code"] == pytest.approx(r["tokens_per_sec"] * r["step_time_s"] * steps, rel=1e-6)
        assert 0 <= r["epoch/web"] <= 1 and 0 <= r["epoch/code"] <= 1
    assert max(train[-1]["epoch/web"], train[-1]["epoch/code"]) > 0.9
    assert [r["step"] for r in evals] == [s for s in range(40, last, 40)] + [last]
    for r in evals:
        losses = [r["eval_loss/web"], r["eval_loss/code"]]
        assert min(losses) <= r["eval_loss"] <= max(losses)
    assert (out / "checkpoints" / str(last)).is_dir()


def test_a_mixed_run_logs_the_same_numbers_on_one_process_and_on_two(datasets, tmp_path):
    """The smoke model on a 0.7/0.3 mixture, 12 steps, on `launch/local.sh 1` x 8 devices and
    `launch/local.sh 2` x 4: every logged number but the timings bitwise equal at every step (the
    matmuls of the weights' gradients sum 1,024 tokens a device, which XLA's CPU client splits by
    its thread pool: the runtime sizes it by the run's devices, not the process's)."""
    rows = {}
    for n in (1, 2):
        out = tmp_path / f"{n}"
        run_launched(n, ["train", SMOKE, CACHE, "model.vocab_size=512", mixture(datasets), "run.steps=12",
                         "train.global_batch=16", "train.log_every=1", "train.eval_every=0", f"run.output_dir={out}"])
        timings = {"step_time_s", "tokens_per_sec", "mfu", "data_wait_s", "eta_s"}
        rows[n] = [{k: v for k, v in r.items() if k not in timings} for r in map(json.loads, (out / "metrics.jsonl").open())]
    assert rows[2] == rows[1]
    assert [r["step"] for r in rows[1] if "loss" in r] == list(range(1, 13))
    assert all(sum(r[f"tokens/{name}"] for r in rows[1] if "loss" in r) > 0 for name in ("web", "code"))
