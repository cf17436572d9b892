"""A run whose steps stop being finite: each such step applies nothing and is counted, a run of
them stops the run with exit code 4, and no checkpoint of a step after the first bad one is taken."""

import json

import jax
import numpy as np
import pytest

from pretrain import cli
from pretrain.inference import load
from pretrain.run import checkpoint, goodput

from conftest import TINY
from test_model import batch
from test_trainer import SMOKE


def _nan_scale(state):
    scale = state["params"]["final_norm"]["scale"]
    scale[...] = scale[...] * np.nan  # every logit, so the loss, is NaN


def _huge_moment(state):
    mu = state["optimizer"]["opt_state"][1]["mu"]["final_norm"]["scale"]
    mu[...] = mu[...] + 3e38  # loss and gradients finite, the update it scales is not


@pytest.mark.parametrize("spoil", [_nan_scale, _huge_moment], ids=["nan loss", "overflowing update"])
def test_a_step_that_is_not_finite_changes_nothing(train_step, spoil):
    """Parameters, optimizer state (its step count too) come out of a NaN step as they went in,
    whether the loss shows it or only the parameters the update would leave."""
    compiled, _ = train_step.compile()
    state = train_step.init_state()
    spoil(state)
    before = jax.device_get(state)
    with train_step.context():
        after, metrics = compiled(state, train_step.place_batch(batch(train_step.cfg, seed=1)))
    assert not bool(metrics["finite"])
    assert np.isfinite(float(metrics["grad_norm"])) == (spoil is _huge_moment)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(after), before)


def test_an_overflowing_run_skips_its_steps_then_stops_with_only_finite_checkpoints(tmp_path, capsys):
    """Two good steps; then, at a learning rate that overflows float32, each step would leave NaN
    weights: those steps are skipped and counted, the third in a row stops the run (exit 4, one
    line), no checkpoint after step 2 is committed, and a resume from it at a sane rate goes on."""
    out = tmp_path / "run"
    run = ["train", SMOKE, *TINY, f"run.output_dir={out}", "train.log_every=1", "train.eval_every=0",
           "checkpoint.every=1", "checkpoint.keep=0", "train.max_skipped_steps=3"]
    rows = lambda: [r for line in (out / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                    if "loss" in (r := json.loads(line))]  # the train rows (an eval row has eval_loss)
    assert cli.main([*run, "run.steps=2", "optim.lr=1e-3"]) == 0
    capsys.readouterr()
    assert cli.main([*run, "optim.lr=1e39"]) == 4
    printed = capsys.readouterr()
    assert "| skipped 2" in printed.out  # the row of step 4 says so
    err = printed.err.strip().splitlines()
    assert err[-1].startswith("error: steps 3 to 5 were not finite") and "exit code 4" in err[-1], err
    assert [r["skipped_steps"] for r in rows()] == [0, 0, 1, 2]  # a row per step, but the one that stopped the run
    assert checkpoint.committed_steps(out / "checkpoints") == [1, 2]
    report = goodput.report(str(out))
    assert report["parts"]["skipped"] > 0 and sum(report["parts"].values()) == pytest.approx(report["wall_s"], abs=1e-6)
    for step in (1, 2):
        _, params, _ = load.from_checkpoint(str(out), step)
        assert all(np.isfinite(np.asarray(p)).all() for p in params.values())

    assert cli.main([*run, "optim.lr=1e-3", "run.steps=6"]) == 0
    assert [r["step"] for r in rows()] == [1, 2, 3, 4, 5, 6]  # the skipped steps' rows gave way to the resumed ones
    assert all(np.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in rows())
