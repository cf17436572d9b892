"""The train step and loop: accumulation, learning, the CLI end to end."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh

from data import corpus, pipeline, records
from pretrain import cli
from pretrain.build import build
from pretrain.tasks import LanguageModelTask
from pretrain.train import loop, sharding
from pretrain.train.step import TrainStep

from conftest import REAL_DATA, TINY, make_train_step, tiny_config
from test_model import batch

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "llm" / "smoke.yaml")


def run_steps(train_step, batches):
    compiled, _ = train_step.compile()
    state, losses = train_step.init_state(), []
    with train_step.context():
        for b in batches:
            state, metrics = compiled(state, train_step.place_batch(b))
            losses.append(float(metrics["loss"]))
    return state, losses


def test_a_bfloat16_step_learns_alike_in_either_cpu_multiply_dtype(cpu_multiply):
    """The tiny model in bfloat16, three steps with its CPU matmuls multiplied in float32 and in
    bfloat16 (model.cpu_matmul_dtype): the compiled steps differ in their dots' operands, the losses
    only by the order of float32 sums."""
    batches = [batch(tiny_config(), seed=0)] * 3  # one batch again and again: the loss must fall
    losses, operands = {}, {}
    for multiply in ("float32", "bfloat16"):
        step = make_train_step("model.dtype=bfloat16", f"model.cpu_matmul_dtype={multiply}")
        with step.context():
            hlo = step.train_jit.lower(step.abstract_state, step.batch_spec).as_text()
        operands[multiply] = re.findall(r"stablehlo.dot_general .*: \(tensor<[^>]*x(\w+)>", hlo)
        losses[multiply] = run_steps(step, batches)[1]
    assert set(operands["float32"]) == {"f32"}
    # In bfloat16 every dot but the two that take the float32 attention scores' gradient, as on a TPU.
    assert operands["bfloat16"].count("f32") == 2 and len(operands["bfloat16"]) == len(operands["float32"])
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=1e-3)
    assert losses["float32"][2] < losses["float32"][0]


def test_microbatches_equal_one_step_on_the_whole_batch(train_step):
    b = batch(train_step.cfg, seed=3)
    b["segment_ids"][:3, -4:] = 0  # padding: rows weigh differently, the sum over tokens must not care
    whole, whole_loss = run_steps(train_step, [b])
    split, split_loss = run_steps(make_train_step("train.microbatches=4"), [b])
    np.testing.assert_allclose(split_loss, whole_loss, rtol=1e-6)
    # Adam's first moment is (1 - b1) x the (clipped) gradient: compare gradients through it,
    # since Adam's first step, ~sign(g), would amplify rounding in near-zero gradients.
    first_moment = lambda state: jax.device_get(state["optimizer"]["opt_state"][1]["mu"])
    jax.tree.map(
        lambda a, c: np.testing.assert_allclose(a, c, atol=1e-8, rtol=1e-5), first_moment(split), first_moment(whole)
    )


def test_two_slices_reduce_their_microbatches_once_and_equal_one_slice():
    """Microbatches on two slices (mesh replica 2 x data 2 x model 2): each slice sums its own
    gradients, and the slices add theirs once per step. The loss and the gradients (through Adam's
    first moment) are those of one slice (data 4 x model 2) reducing every microbatch, within
    float rounding: the sums are taken in another order."""
    cfg = tiny_config("train.microbatches=2", "mesh.data=4", "mesh.model=2")
    task = LanguageModelTask
    resolved = task.resolve(cfg, (4, 2), "cpu")
    b = batch(cfg, seed=3)
    results = []
    for shape in [(1, 4, 2), (2, 2, 2)]:
        mesh = Mesh(np.array(jax.devices()).reshape(shape), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
        results.append(run_steps(TrainStep(resolved, task(resolved), mesh, task.axis_rules(resolved, 2)), [b, b]))
    (one, one_losses), (two, two_losses) = results
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-6)
    first_moment = lambda state: jax.device_get(state["optimizer"]["opt_state"][1]["mu"])  # noqa: E731
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-8, rtol=1e-5), first_moment(two), first_moment(one))


@pytest.mark.parametrize("split, dim", [("length", 1), ("embed", 2)])
def test_split_residual_step_equals_one_device(split, dim):
    """The residual stream split over `model` along its positions or its width (mesh.residual_split,
    data 2 x model 4): the same loss and gradients as the step on one device, within the tolerance
    every mesh gets; and the layers' output really leaves the layer split so."""
    b = batch(tiny_config(), seed=3)
    parallel = make_train_step(f"mesh.residual_split={split}")
    assert dict(parallel.rules)[f"residual_{split}"] == "model"
    state, loss = run_steps(parallel, [b])
    one = build(tiny_config("mesh.data=1", "mesh.model=1"), jax.devices()[:1])
    ref_state, ref_loss = run_steps(one, [b])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    first_moment = lambda state: jax.device_get(state["optimizer"]["opt_state"][1]["mu"])  # noqa: E731
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-8, rtol=1e-5),
                 first_moment(state), first_moment(ref_state))
    with parallel.context():
        model = nnx.merge(parallel.graphdef, state)["params"]
        placed = parallel.place_batch(b)
        hidden = jax.jit(lambda m, x: m(x["inputs"], x["segment_ids"], x["positions"]))(model, placed)
    assert hidden.sharding.spec[dim] == "model", hidden.sharding.spec


def test_thirty_steps_on_a_fixed_batch_drive_the_loss_down(train_step):
    b = batch(train_step.cfg, seed=1)
    _, losses = run_steps(train_step, [b] * 30)
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_command_writes_config_metrics_and_tensorboard(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", SMOKE, *TINY, "run.steps=6", "train.log_every=3", f"run.output_dir={out}"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval_loss" in r) for r in rows] == [(3, False), (6, False), (6, True)]
    rows = rows[:2]
    for key in ("loss", "lr", "grad_norm", "step_time_s", "tokens_per_sec", "mfu", "pad_fraction"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert 0 < rows[-1]["mfu"] < 1
    assert "run:" in (out / "config.yaml").read_text() and "steps: 6" in (out / "config.yaml").read_text()
    assert any((out / "tensorboard").iterdir())
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "mfu" in printed and "eta" in printed


def test_pad_fraction_and_tokens_per_sec_count_the_padding_of_the_batches_themselves(tmp_path):
    """Pieces of at most 16 tokens in rows of 24 leave padding: each logged row's pad_fraction is its
    steps' share of padding, counted here from the pipeline's own batches, and tokens/s counts the
    other tokens only."""
    prepared = corpus.stdlib_dataset(str(ROOT / ".cache"), vocab_size=512, seq_len=16, max_bytes=int(0.3 * 2**20),
                                     val_fraction=0.02)  # the tiny model's real text (conftest.REAL_DATA)
    overrides = [*TINY, f"data.source={prepared}", "model.vocab_size=512", "data.seq_len=24", "run.steps=4",
                 "train.log_every=2", "train.eval_every=0"]
    assert cli.main(["train", SMOKE, *overrides, f"run.output_dir={tmp_path}"]) == 0
    rows = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    task = LanguageModelTask(tiny_config(*overrides))
    task.open_data(model_axis=4)
    batches = task.batches("train", range(task.cfg.train.global_batch))
    for row in rows:
        segments = np.stack([next(batches)["segment_ids"] for _ in range(2)])
        assert row["pad_fraction"] == pytest.approx(np.mean(segments == 0), abs=1e-12) and row["pad_fraction"] > 0.1
        assert row["tokens_per_sec"] == pytest.approx(np.sum(segments > 0) / 2 / row["step_time_s"], rel=1e-9)


def test_batches_read_ahead_are_the_batches_read_in_turn(tmp_path, monkeypatch):
    """data.prefetch: a thread reads batches ahead; the loop gets the same batches, bitwise, each with
    the data position after it (what a checkpoint of its step keeps), from the start or from a
    checkpoint's position. Each row reports how long the loop waited for input: here reading is
    made slow (0.2 s a batch) and nothing reads ahead."""
    train_step = make_train_step(*REAL_DATA)
    train_step.task.open_data(train_step.mesh.shape["model"])

    def feed(prefetch, positions=None):
        rows = train_step.task.batches("train", train_step.rows)
        if positions is not None:
            rows.set_positions(positions)
        with loop.Feed(train_step, rows, prefetch) as f:
            return [jax.tree.map(np.asarray, f.next()) for _ in range(6)]

    in_turn, ahead = feed(0), feed(3)
    for (read, position), (read_ahead, position_ahead) in zip(in_turn, ahead, strict=True):
        assert all(np.array_equal(read[k], read_ahead[k]) for k in read)
        assert np.array_equal(position, position_ahead)
    resumed = feed(3, positions=in_turn[2][1])  # from where a checkpoint of step 3 left the data
    assert all(np.array_equal(a[k], b[k]) for (a, _), (b, _) in zip(in_turn[3:], resumed) for k in a)
    read = pipeline.Rows.__next__
    monkeypatch.setattr(pipeline.Rows, "__next__", lambda rows: time.sleep(0.2) or read(rows))
    assert cli.main(["train", SMOKE, *TINY, "run.steps=3", "train.log_every=1", "data.prefetch=0",
                     f"run.output_dir={tmp_path}"]) == 0
    rows = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0.2 <= r["data_wait_s"] for r in rows[:2])  # the batch of the next step, read while this one ran


def unigram_entropy(source) -> float:
    """Entropy (nats) of the target tokens: the loss of the best model that ignores context."""
    counts = np.bincount(np.concatenate([np.frombuffer(source[i], np.int32)[1:] for i in range(len(source))]))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_smoke_command_trains_on_the_embedded_corpus(tmp_path):
    """The README's smoke run, shortened: real text through the real pipeline on 8 faked devices; the
    held-out loss ends below the unigram entropy of the held-out text, so the model uses context. The
    output dir is relative, as the smoke run's default is."""
    out = tmp_path / "smoke"
    settings = dict(vocab_size=1024, seq_len=128, max_bytes=2 << 20, val_fraction=0.02)
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "smoke", "llm", "run.steps=100", "run.output_dir=smoke",
         "train.eval_every=0", f"data.cache_dir={ROOT / '.cache'}", "data.max_corpus_mb=2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5 < np.log(1024)
    directory = corpus.stdlib_dataset(str(ROOT / ".cache"), **settings)  # the one the run prepared
    held_out = records.open_split(directory, records.read_manifest(directory, "text"), "validation")
    (final_eval,) = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert final_eval < unigram_entropy(held_out), (final_eval, unigram_entropy(held_out))
    assert "mesh data=2 x model=4" in proc.stdout
