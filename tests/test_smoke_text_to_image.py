"""`pretrain smoke text-to-image`: the data it makes on its first start (a pipeline made for the
digits, loaded by diffusers and transformers as they are, a VAE that learned the digits, their
captions encoded) and a shortened run on it, its samples scored by the digit classifier, whose
own accuracy is checked on the digits."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL
from PIL import Image

from data import digits, images, latents
from data.records import MANIFEST, open_split
from pretrain import cli
from pretrain.formats.latent import LatentPipeline
from pretrain.inference import digits_pipeline

from conftest import CACHE
from test_diffusion_training import grid_score, rows

RUN = [CACHE, "run.steps=4", "train.log_every=1", "train.global_batch=16", "train.eval_every=4", "train.eval_batches=1",
       "checkpoint.every=4", "diffusion.sample_steps=3", "diffusion.sample_num=16"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke command on a data.source that does not exist yet: it makes the data, then trains."""
    root = tmp_path_factory.mktemp("smoke-t2i")
    assert cli.main(["smoke", "text-to-image", *RUN, f"run.output_dir={root / 'run'}", f"data.source={root / 'data'}"]) == 0
    return root / "run", root / "data"


def test_the_smoke_run_trains_on_the_captioned_digits_and_scores_its_samples(smoke):
    run, data = smoke
    manifest = json.loads((data / MANIFEST).read_text())
    assert manifest["input_pairs"] == 1797 and manifest["latents"]["shape"] == [8, 8, 4]
    assert manifest["splits"]["train"]["records"] + manifest["splits"]["validation"]["records"] + \
        manifest["duplicate_pairs"] == 1797
    logged = rows(run)
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]
    (score,) = [r["samples/digit_accuracy"] for r in logged if "samples/digit_accuracy" in r]
    assert 0 <= score <= 1
    grid = Image.open(run / "samples" / "step_0000004.png")
    assert grid.size == (10 * 18 + 2, 2 * 18 + 2)  # 16 samples of 16x16, a column per prompt


def test_the_logged_score_is_the_classifiers_reading_of_the_grid(smoke):
    """Each sample is scored against the digit its prompt asks for (its column)."""
    run = smoke[0]
    (logged,) = [r["samples/digit_accuracy"] for r in rows(run) if "samples/digit_accuracy" in r]
    assert abs(grid_score(run / "samples" / "step_0000004.png", 16, 10) - logged) <= 1 / 16  # the PNG rounds to 8 bits


def test_the_pipeline_loads_in_diffusers_and_transformers_and_computes_as_ours(smoke):
    """The VAE and text encoder written from our weights: diffusers' and transformers' own models
    read them and compute what ours compute (1e-4); the tokenizer keeps the captions' words whole."""
    pipeline = smoke[1] / "pipeline"
    ours = LatentPipeline(str(pipeline))
    tokenizer = transformers.AutoTokenizer.from_pretrained(pipeline / "tokenizer")
    ids = tokenizer(digits.CAPTIONS[7]).input_ids
    assert len(ids) == 5 and tokenizer.decode(ids[1:-1]) == "a handwritten seven"
    text = transformers.CLIPTextModel.from_pretrained(pipeline / "text_encoder").eval()
    with torch.no_grad():
        theirs = text(torch.from_numpy(ours.ids(digits.CAPTIONS))).last_hidden_state.numpy()
    np.testing.assert_allclose(ours.states(digits.CAPTIONS), theirs, atol=1e-4)
    vae = AutoencoderKL.from_pretrained(pipeline / "vae").eval()
    z = np.random.default_rng(0).standard_normal((3, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(z / vae.config.scaling_factor).permute(0, 3, 1, 2)).sample
    np.testing.assert_allclose(ours.decode(z), decoded.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_the_vae_learned_the_digits(smoke):
    """Each record holds its digit's caption; the held-out digits decoded from their latents' means
    read as those digits; the scaled latents have about unit variance, as the diffusion model assumes."""
    data = smoke[1]
    manifest = json.loads((data / MANIFEST).read_text())
    layout = latents.Layout.of(manifest)
    pipeline = LatentPipeline(str(data / "pipeline"))
    captions = pipeline.states(digits.CAPTIONS).astype(ml_dtypes.bfloat16).astype(np.float32)
    held_out = [layout.decode(r) for r in open_split(data, manifest, "validation")]
    distances = np.array([[np.abs(states.astype(np.float32) - c).max() for c in captions] for _, states in held_out])
    assert len(held_out) > 100 and np.all(distances.min(axis=1) == 0)
    scale = manifest["latents"]["scaling_factor"]
    means = np.stack([moments[..., :4] for moments, _ in held_out]) * scale
    assert 0.7 < np.std(means) < 1.3
    assert digits.accuracy(pipeline.decode(means), distances.argmin(axis=1)) > 0.9


def test_the_digit_classifier_reads_digits_and_not_noise():
    truth = np.stack([images.pixels(png, 16, 1) for _, png in digits.pngs()])
    labels = np.array([label for label, _ in digits.pngs()])
    assert digits.accuracy(truth, labels) > 0.95
    assert digits.accuracy(np.repeat(truth, 3, axis=-1), labels) > 0.95  # RGB, as a latent pipeline may decode
    noise = np.random.default_rng(0).uniform(-1, 1, truth.shape).astype(np.float32)
    assert digits.accuracy(noise, labels) < 0.2


def test_the_tokenizer_writer_keeps_words_whole_and_falls_back_to_bytes(tmp_path):
    ids = digits_pipeline.write_tokenizer(tmp_path / "tok", ["handwritten", "seven"], 8)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    tokens = tokenizer("seven handwritten").input_ids
    assert len(tokens) == 4 and tokens[0] == ids["start"] and tokens[-1] == ids["end"] and max(tokens) < ids["vocab"]
    assert len(tokenizer("zebra").input_ids) == 2 + 5  # other words: a token per byte


def test_diffusers_samples_the_smoke_runs_export_as_pretrain_sample_does(smoke, tmp_path):
    """From captioned digits to a pipeline diffusers serves: the smoke run's export in
    StableDiffusionPipeline (a one-channel VAE here) gives `pretrain sample --prompt`'s images."""
    from diffusers import StableDiffusionPipeline

    run = smoke[0]
    assert cli.main(["export", str(run), "--format", "diffusers", "--dtype", "float32", "--out", str(tmp_path / "export")]) == 0
    noise = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    assert cli.main(["sample", str(run), "--prompt", digits.CAPTIONS[3], "--noise", str(tmp_path / "noise.npy"),
                     "--steps", "4", "--guidance", "2", "--dtype", "float32", "--out", str(tmp_path / "ours")]) == 0
    ours = np.load(tmp_path / "ours" / "samples.npy")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "export", safety_checker=None)
    theirs = pipe([digits.CAPTIONS[3]] * 2, latents=torch.from_numpy(noise).permute(0, 3, 1, 2), num_inference_steps=4,
                  guidance_scale=2.0, height=16, width=16, output_type="np").images
    assert ours.shape == theirs.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(ours, np.clip(theirs * 2 - 1, -1, 1), atol=1e-5)
    assert ours.std() > 0.05


def test_samples_are_asked_for_the_digit_of_their_class_or_caption():
    from pretrain import config as config_lib
    from pretrain.tasks import DiffusionTask

    text = DiffusionTask(config_lib.load(config_lib.preset_path("diffusion", "smoke-text-to-image")))
    unlabelled = np.full(3, -1)
    assert text._digits_asked(unlabelled, [digits.CAPTIONS[3], digits.CAPTIONS[7], digits.CAPTIONS[3]]).tolist() == [3, 7, 3]
    assert text._digits_asked(unlabelled, [digits.CAPTIONS[3], "a cat", digits.CAPTIONS[3]]) is None
    classes = np.arange(20) % 10
    assert DiffusionTask(config_lib.load(config_lib.preset_path("diffusion", "smoke")))._digits_asked(classes, None) is classes
    elsewhere = config_lib.load(config_lib.preset_path("diffusion", "smoke"), ["data.source=photos"])
    assert DiffusionTask(elsewhere)._digits_asked(classes, None) is None
