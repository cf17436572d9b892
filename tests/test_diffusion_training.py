"""The diffusion task in the shared train_step, on the embedded digits: learning, EMA, resume, sample
grids, the sampling CLI and export, bad input."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data import digits
from data.prepare import local as prepare
from models import diffusion
from pretrain import cli, config as config_lib
from models.unet import UNet
from pretrain.formats import params
from pretrain.inference import load
from pretrain.tasks import DiffusionTask
from pretrain.train import sharding
from pretrain.train.step import TrainStep

from conftest import CACHE, ROOT
from test_checkpoint import losses, resumable_copy
from test_diffusers import predictions

SMOKE = str(ROOT / "configs" / "diffusion" / "smoke.yaml")
STEPS = 40
RUN = [CACHE, f"run.steps={STEPS}", "optim.warmup_steps=10", "train.log_every=1", "train.global_batch=32",
       "train.eval_every=20", "checkpoint.every=20", "checkpoint.keep=0", "diffusion.sample_steps=10",
       "diffusion.sample_num=20"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """`pretrain smoke diffusion`, shortened: the class-conditional UNet on the digits, mesh 2 x 4."""
    out = tmp_path_factory.mktemp("digits") / "run"
    assert cli.main(["smoke", "diffusion", *RUN, f"run.output_dir={out}"]) == 0
    return out


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def grid_score(png, num: int, columns: int, size: int = 16) -> float:
    """The digit classifier's accuracy on a sample grid's tiles, each asked for its column's digit."""
    grid = np.asarray(Image.open(png), np.float32)[..., None] / 127.5 - 1
    tiles = [grid[2 + (i // columns) * (size + 2):][:size, 2 + (i % columns) * (size + 2):][:, :size] for i in range(num)]
    return digits.accuracy(np.stack(tiles), np.arange(num) % columns)


def test_short_run_on_the_digits_drives_the_loss_down(digits_run):
    train = losses(digits_run)
    assert len(train) == STEPS
    first, last = np.mean([train[s] for s in range(1, 6)]), np.mean([train[s] for s in range(STEPS - 4, STEPS + 1)])
    assert last < 0.5 * first, (first, last)
    evals = {r["step"]: r["eval_loss"] for r in rows(digits_run) if "eval_loss" in r}
    assert list(evals) == [20, 40] and evals[40] < evals[20]
    logged = [r for r in rows(digits_run) if "loss" in r]
    assert all(r["images_per_sec"] > 0 and 0 < r["mfu"] < 1 for r in logged)


def test_smoke_run_writes_a_sample_grid(digits_run):
    for step in (20, 40):
        grid = Image.open(digits_run / "samples" / f"step_{step:07d}.png")
        # 20 samples of 16x16 in 10 columns (one per class) and 2 rows, with 2-pixel gaps.
        assert grid.size == (10 * 18 + 2, 2 * 18 + 2) and grid.mode == "L"
        assert np.asarray(grid).std() > 10  # not a blank image
    scores = {r["step"]: r["samples/digit_accuracy"] for r in rows(digits_run) if "samples/digit_accuracy" in r}
    assert list(scores) == [20, 40]
    for step, logged in scores.items():  # each sample scored against its class, its column
        assert abs(grid_score(digits_run / "samples" / f"step_{step:07d}.png", 20, 10) - logged) <= 1 / 20


def test_resume_equals_uninterrupted(digits_run, tmp_path, capsys):
    out = resumable_copy(digits_run, tmp_path, keep_up_to=20)
    (out / "samples" / "step_0000040.png").unlink()
    assert cli.main(["smoke", "diffusion", *RUN, f"run.output_dir={out}"]) == 0
    assert "resumed from step 20" in capsys.readouterr().out
    # Same noise, timesteps and label dropout as the run that never stopped: equal losses, bitwise.
    assert losses(out) == losses(digits_run)
    # The EMA was checkpointed and resumed too: the same samples, byte for byte.
    name = "samples/step_0000040.png"
    assert (out / name).read_bytes() == (digits_run / name).read_bytes()


def test_exported_unet_samples_as_the_checkpoint(digits_run, tmp_path, capsys):
    exported = tmp_path / "export"
    assert cli.main(["export", str(digits_run), "--out", str(exported), "--dtype", "float32"]) == 0
    assert json.loads((exported / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    # The export holds the EMA of the parameters, not the parameters.
    directory = digits_run / "checkpoints"
    cfg = config_lib.load(SMOKE)
    ema, weights = (params.restore(directory, STEPS, UNet, cfg.model, item=item) for item in ("ema", "params"))
    model, _, _ = load.load(str(exported), "diffusion")
    loaded = params.flat(nnx.state(model))
    assert loaded.keys() == ema.keys()
    for key in ema:
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(ema[key]))
    assert any(not np.array_equal(ema[k], weights[k]) for k in ema)

    outputs = {}
    for name, source in (("checkpoint", digits_run), ("export", exported)):
        args = ["sample", str(source), "--num", "10", "--steps", "5", "--guidance", "2", "--out", str(tmp_path / name)]
        assert cli.main(args) == 0
        outputs[name] = {f: np.load(tmp_path / name / f"{f}.npy") for f in ("samples", "labels")}
        assert (tmp_path / name / "samples.png").exists()
    np.testing.assert_array_equal(outputs["checkpoint"]["samples"], outputs["export"]["samples"])
    assert outputs["export"]["samples"].shape == (10, 16, 16, 1)
    np.testing.assert_array_equal(outputs["export"]["labels"], np.arange(10))
    assert cli.main(["sample", str(exported), "--num", "4", "--steps", "5", "--class", "7", "--out", str(tmp_path / "c7")]) == 0
    # Given the starting noise, the images are its alone (eta 0): the seed no longer matters.
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).standard_normal((3, 16, 16, 1)).astype(np.float32))
    for seed in ("0", "1"):
        assert cli.main(["sample", str(exported), "--noise", str(tmp_path / "noise.npy"), "--seed", seed, "--steps", "5",
                         "--eta", "0", "--out", str(tmp_path / f"noise{seed}")]) == 0
    first, second = (np.load(tmp_path / f"noise{seed}" / "samples.npy") for seed in ("0", "1"))
    assert first.shape == (3, 16, 16, 1) and np.array_equal(first, second)
    # --dtype bfloat16 computes the float32 run's network in bfloat16: the same images, rounded.
    assert cli.main(["sample", str(exported), "--noise", str(tmp_path / "noise.npy"), "--steps", "5", "--eta", "0",
                     "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    rounded = np.load(tmp_path / "bf16" / "samples.npy")
    assert not np.array_equal(rounded, first) and np.abs(rounded - first).mean() < 0.05
    np.testing.assert_array_equal(np.load(tmp_path / "c7" / "labels.npy"), [7] * 4)


def test_diffusers_loads_the_export_and_samples_what_pretrain_sample_samples(digits_run, tmp_path):
    """The smoke run's export in diffusers' own classes: every tensor placed, the checkpoint's
    predictions, and from the same starting noise the images of `pretrain sample` through a
    DDIMScheduler loop: eta 0, eta 1 with the same per-step noise, and guidance 2 with the no-label
    row."""
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    exported = tmp_path / "export"
    assert cli.main(["export", str(digits_run), "--out", str(exported), "--dtype", "float32"]) == 0
    unet, info = UNet2DModel.from_pretrained(str(exported / "unet"), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    model, cfg, _ = load.load(str(digits_run), "diffusion")
    ours, theirs = predictions(model, unet.eval(), cfg.diffusion.timesteps, cfg.model.num_classes)
    assert np.abs(ours - theirs).max() < 1e-4 and np.abs(theirs).max() > 0.5

    steps, shape, labels, null = 10, (3, 16, 16, 1), np.array([0, 1, 2]), cfg.model.num_classes
    start = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "noise.npy", start)
    step_noise = np.array(diffusion.step_noise(jax.random.split(jax.random.key(0))[1], steps, shape))  # --seed 0's
    scheduler = DDIMScheduler.from_pretrained(str(exported / "scheduler"))
    scheduler.set_timesteps(steps)

    def predict(x, t, y):
        with torch.no_grad():
            out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), int(t), class_labels=torch.from_numpy(y)).sample
        return out.numpy().transpose(0, 2, 3, 1)

    for guidance, eta in ((1.0, 0.0), (1.0, 1.0), (2.0, 0.0)):
        out = tmp_path / f"g{guidance}-eta{eta}"
        assert cli.main(["sample", str(exported), "--noise", str(tmp_path / "noise.npy"), "--steps", str(steps),
                         "--guidance", str(guidance), "--eta", str(eta), "--dtype", "float32", "--out", str(out)]) == 0
        x = start
        for i, t in enumerate(scheduler.timesteps.numpy()):
            cond = predict(x, t, labels)
            prediction = cond if guidance == 1 else predict(x, t, np.full(3, null)) * (1 - guidance) + guidance * cond
            x = scheduler.step(torch.from_numpy(prediction), int(t), torch.from_numpy(x), eta=eta,
                               variance_noise=torch.from_numpy(step_noise[i]) if eta else None).prev_sample.numpy()
        np.testing.assert_allclose(np.load(out / "samples.npy"), x, atol=1e-3, err_msg=f"guidance {guidance}, eta {eta}")
        assert np.abs(x).max() > 0.5


def test_diffusers_pipeline_to_and_from_gcs(digits_run, gcs, tmp_path):
    """`pretrain export` writes the pipeline's folders (unet/, scheduler/) to gs:// in place, and
    `pretrain import-hf` continues from there: the checkpoint's EMA weights, bit for bit, and its
    sampler settings."""
    out = "gs://test-bucket/digits-diffusers"
    for args in (["export", str(digits_run), "--out", out, "--dtype", "float32"],
                 ["import-hf", out, "--out", str(tmp_path / "imported")]):
        proc = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=ROOT, env=gcs, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    cfg, original, _ = load.from_checkpoint(str(digits_run))
    imported_cfg, imported, _ = load.from_checkpoint(str(tmp_path / "imported"))
    assert sorted(imported) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(np.asarray(imported[key]), np.asarray(original[key]), err_msg=key)
    scheduler = ("schedule", "timesteps", "target", "spacing", "clip_sample")  # what the scheduler's config carries
    assert [getattr(imported_cfg.diffusion, k) for k in scheduler] == [getattr(cfg.diffusion, k) for k in scheduler]


def test_ema_update_matches_the_formula():
    """Two steps of a small UNet on random images: the EMA in the state follows
    ema <- d ema + (1 - d) params with d = min(decay, (1 + n) / (10 + n)) at update n."""
    decay = 0.9
    cfg = config_lib.load(SMOKE, ["data.source=synthetic", "model.base_channels=8", "model.groups=4", "model.num_heads=2",
                                  "model.channel_mults=[1]", "model.attention_resolutions=[]", "model.image_size=8",
                                  "train.global_batch=8", f"train.ema_decay={decay}"])
    train_step = TrainStep(cfg, DiffusionTask(cfg), sharding.make_mesh((2, 4)), sharding.LOGICAL_RULES)
    batches = train_step.task.batches("train", train_step.rows)
    state = train_step.init_state()
    ema = [np.asarray(x) for x in jax.tree.leaves(state["ema"])]
    for p, e in zip(jax.tree.leaves(state["params"]), ema):  # the average starts at the weights
        np.testing.assert_array_equal(np.asarray(p), e)
    step = jax.jit(train_step.train_step, donate_argnums=0)
    with train_step.context():
        for n in range(2):
            state, _ = step(state, train_step.place_batch(next(batches)))
            d = min(decay, (1 + n) / (10 + n))
            params = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
            ema = [d * e + (1 - d) * p for e, p in zip(ema, params)]
            for got, want in zip(jax.tree.leaves(state["ema"]), ema):
                np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(e, p) for e, p in zip(ema, params))


def image_dir(root, classes: bool):
    for i in range(4):
        folder = root / (f"class{i % 2}" if classes else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return root


CASES = {
    "image size vs downsamples": (["model.image_size=15"], r"model.image_size=15 is not divisible by 2\^1=2"),
    "attention resolution": (["model.attention_resolutions=[4]"], r"model.attention_resolutions has 4, which is not among the model's resolutions \[16, 8\]"),
    "groups": (["model.groups=12"], "channels=32 .* are not divisible by model.groups=12"),
    "model axis": (["model.base_channels=18", "model.groups=6", "model.num_heads=2"], r"channels=18 .* not divisible by the model axis \(4\)"),
    "target": (["diffusion.target=x0"], "diffusion.target='x0' is unknown"),
    "spacing": (["diffusion.spacing=even"], r"diffusion.spacing='even' is unknown; use one of \['linspace', 'leading', 'trailing'\]"),
    "residual split": (["mesh.residual_split=embed"], "mesh.residual_split splits a language model's residual stream"),
    "sample grid vs data axis": (["diffusion.sample_num=21"], r"diffusion.sample_num=21 must be a positive multiple of the data axis \(2\)"),
    "text conditioning without text": (["model.cross_attention_dim=768", "model.num_classes=0"],
                                       "model.cross_attention_dim=768 trains on captions, which data.source=digits has none of"),
    "unet attention": (["model.attention=flash"], "model.attention='flash' is unknown for a UNet; use auto, xla or splash"),
    "labels and text": (["model.cross_attention_dim=768"], "model.num_classes=10 and model.cross_attention_dim=768 "
                                                           "condition on both labels and text; set one of them to 0"),
}


@pytest.mark.parametrize("overrides, message", CASES.values(), ids=CASES.keys())
def test_bad_config_exits_2_with_one_line(overrides, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", SMOKE, *overrides, f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize("classes, message", [
    (False, "model.num_classes=10 asks for class conditioning, but data.source=.* has no labels"),
    (None, "holds no PNG or JPEG images"),
])
def test_bad_image_data_exits_2(classes, message, tmp_path, capsys):
    data = image_dir(tmp_path / "images", classes) if classes is not None else tmp_path / "empty"
    data.mkdir(exist_ok=True)
    out = tmp_path / "run"
    assert cli.main(["train", SMOKE, f"data.source={data}", f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


def test_training_reads_image_directories_plain_and_prepared(tmp_path):
    """Class subdirectories give labels, in a plain directory and in one from `pretrain prepare images`."""
    images = image_dir(tmp_path / "images", True)
    prepare.prepare_images([str(images)], str(tmp_path / "prepared"), val_fraction=0.0, workers=1)
    for source in (images, tmp_path / "prepared"):
        task = DiffusionTask(config_lib.load(SMOKE, [f"data.source={source}", "data.val_fraction=0", "train.global_batch=4"]))
        task.open_data(4)
        batch = next(task.batches("train", range(4)))
        assert batch["images"].shape == (4, 16, 16, 1)
        pixels_and_labels = sorted(zip(np.round((batch["images"][:, 0, 0, 0] + 1) * 127.5).tolist(), batch["labels"].tolist()))
        assert pixels_and_labels == [(0, 0), (40, 1), (80, 0), (120, 1)]
        assert task.batches("validation", range(4)) is None


def test_sample_refuses_bad_flags(digits_run, tmp_path, capsys):
    np.save(tmp_path / "wrong.npy", np.zeros((2, 8, 8, 3), np.float32))
    for args, message in ((["--class", "10"], r"--class=10 is not a class of this model .*use 0..9"),
                          (["--prompt", "hi"], "holds a diffusion model without text, which takes no --prompt"),
                          (["--steps", "5000"], r"--steps=5000 must be in \[1, 1000\]"),
                          (["--eta", "2"], r"--eta=2.0 must be in \[0, 1\]"),
                          (["--noise", str(tmp_path / "wrong.npy")], r"shape \[2, 8, 8, 3\]; this model starts from \[N, 16, 16, 1\]")):
        assert cli.main(["sample", str(digits_run), "--out", str(tmp_path / "s"), *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "s").exists()
