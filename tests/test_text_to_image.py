"""Text-to-image in latent space on a tiny Stable Diffusion pipeline made here (diffusers' VAE and
transformers' CLIP text encoder with random weights, a CLIP tokenizer over a small vocabulary):
captioned images prepared into records equal to what the PyTorch models compute, the same records
on every prepare, and the conditional UNet trained on them, resumed, and refused bad input."""

import json
import re
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL
from PIL import Image

from data import images, latents
from data.records import MANIFEST, open_split
from pretrain import cli
from pretrain.config import ConfigError
from pretrain.formats import latent
from pretrain.inference.digits_pipeline import write_tokenizer

from conftest import CACHE
from test_checkpoint import losses, resumable_copy

SIZE, LENGTH, WIDTH = 16, 16, 32
WORDS = ["the", "digit", "zero", "one", "two", "three", "a", "photo", "of"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A pipeline directory: vae/, text_encoder/, tokenizer/, model_index.json; and the PyTorch models."""
    root = tmp_path_factory.mktemp("sd") / "pipeline"
    vocab = write_tokenizer(root / "tokenizer", WORDS, LENGTH)["vocab"]
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                        sample_size=SIZE, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.5).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    vae.save_pretrained(root / "vae")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=LENGTH, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)).eval()
    text.save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root, vae, text, transformers.AutoTokenizer.from_pretrained(root / "tokenizer")


def captioned_images(directory, count: int = 12):
    """Digit-like 16x16 RGB images with `.txt` captions, and a JSONL manifest that repeats one pair and
    captions one image a second way."""
    rng = np.random.default_rng(0)
    directory.mkdir()
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (SIZE + 4, SIZE, 3), np.uint8)).save(directory / f"{i}.png")
        (directory / f"{i}.txt").write_text(f"a photo of the digit {WORDS[2 + i % 4]}\n")
    rows = [{"image": "0.png", "caption": "a photo of the digit zero"}, {"image": "1.png", "text": "the digit one"}]
    (directory / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


@pytest.fixture(scope="module")
def prepared(pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    inputs = captioned_images(root / "images")
    out = root / "latents"
    assert cli.main(["prepare", "images", "--input", str(inputs), "--out", str(out), "--pipeline", str(pipeline[0]),
                     "--image-size", str(SIZE), "--val-fraction", "0.2", "--batch", "5", CACHE]) == 0
    return inputs, out


def records(out) -> list[tuple[np.ndarray, np.ndarray]]:
    manifest = json.loads((out / MANIFEST).read_text())
    layout = latents.Layout.of(manifest)
    return [layout.decode(r) for s in ("train", "validation") if (src := open_split(out, manifest, s)) for r in src]


def test_records_hold_what_diffusers_and_transformers_compute(pipeline, prepared):
    """Each record: the VAE's moments of the resized, centre-cropped image (1e-4) and the caption's
    states as the pipeline tokenises and encodes it (to bfloat16's precision)."""
    _, vae, text, tokenizer = pipeline
    inputs, out = prepared
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["input_pairs"] == 14 and manifest["duplicate_pairs"] == 1
    assert manifest["latents"]["shape"] == [SIZE // 2, SIZE // 2, 4] and manifest["latents"]["scaling_factor"] == 0.5
    assert manifest["context"]["shape"] == [LENGTH, WIDTH]
    pairs = [(f"{i}.png", f"a photo of the digit {WORDS[2 + i % 4]}") for i in range(12)] + [("1.png", "the digit one")]
    pixels = np.stack([images.pixels((inputs / f).read_bytes(), SIZE, 3) for f, _ in pairs])
    ids = tokenizer([c for _, c in pairs], padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt")
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)).latent_dist
        moments = torch.cat([posterior.mean, posterior.logvar], 1).permute(0, 2, 3, 1).numpy()
        states = text(ids.input_ids).last_hidden_state.numpy()
    ours = records(out)
    assert len(ours) == len(pairs)
    for m, s in ours:  # records are in split and shard order: each is matched to its pair
        match = min(range(len(pairs)), key=lambda i: np.abs(moments[i] - m).max() + np.abs(states[i] - s).max())
        np.testing.assert_allclose(m, moments[match], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(s.astype(np.float32), states[match], atol=2e-2, rtol=1e-2)
    with torch.no_grad():
        empty = text(tokenizer([""], padding="max_length", max_length=LENGTH, return_tensors="pt").input_ids)
    np.testing.assert_allclose(np.load(out / "empty_prompt.npy"), empty.last_hidden_state.numpy()[0], atol=1e-4)
    for part in ("vae/config.json", "text_encoder/config.json", "tokenizer/vocab.json", "model_index.json"):
        assert (out / "pipeline" / part).read_bytes() == (pipeline[0] / part).read_bytes()


def same_shards(one, other):
    shards = sorted(p.relative_to(one) for p in one.rglob("*.array_record"))
    assert shards and shards == sorted(p.relative_to(other) for p in other.rglob("*.array_record"))
    for shard in shards:
        assert (one / shard).read_bytes() == (other / shard).read_bytes(), shard


def test_the_same_input_gives_the_same_records(pipeline, prepared, tmp_path):
    inputs, out = prepared
    assert cli.main(["prepare", "images", "--input", str(inputs), "--out", str(tmp_path / "again"), "--pipeline",
                     str(pipeline[0]), "--image-size", str(SIZE), "--val-fraction", "0.2", "--batch", "3", CACHE]) == 0
    same_shards(out, tmp_path / "again")


def test_two_hosts_encode_their_shares_into_the_same_records(pipeline, prepared, tmp_path):
    """Two processes joined by jax.distributed (launch/local.sh), 4 faked devices each: each reads and
    encodes its rows of every batch, process 0 writes what one process wrote."""
    from test_multihost import run_launched

    inputs, out = prepared
    log = run_launched(2, ["prepare", "images", "--input", str(inputs), "--out", str(tmp_path / "two"), "--pipeline",
                           str(pipeline[0]), "--image-size", str(SIZE), "--val-fraction", "0.2", "--batch", "5", CACHE],
                       devices=8)
    assert "[0] wrote" in log and "[1] wrote" not in log, log
    same_shards(out, tmp_path / "two")
    assert json.loads((tmp_path / "two" / MANIFEST).read_text()) == json.loads((out / MANIFEST).read_text())


def test_latents_are_drawn_from_the_moments_and_captions_dropped():
    """Sampled as diffusers samples latent_dist (log-variance clipped at -30), shifted and scaled; the
    empty prompt's states in place of the caption at the dropout rate."""
    layout = latents.Layout((2, 2, 4), (3, 5), scaling_factor=0.5, shift_factor=0.1)
    mean, logvar = np.full((2, 2, 4), 0.7, np.float32), np.log(np.full((2, 2, 4), 0.04, np.float32))
    states, empty = np.ones((3, 5), np.float32), np.zeros((3, 5), ml_dtypes.bfloat16)
    record = latents.encode_record(np.concatenate([mean, logvar], -1), states)
    draws = [latents.to_example(record, np.random.default_rng(i), layout=layout, dropout=0.25, empty=empty)
             for i in range(2000)]
    z = np.stack([d["images"] for d in draws])
    assert abs(z.mean() - (0.7 - 0.1) * 0.5) < 0.005 and abs(z.std() - 0.2 * 0.5) < 0.005
    dropped = np.mean([not d["context"].any() for d in draws])
    assert 0.22 < dropped < 0.28 and all(d["labels"] == -1 for d in draws)
    floor = latents.encode_record(np.concatenate([mean, np.full_like(mean, -100.0)], -1), states)
    exact = latents.to_example(floor, np.random.default_rng(0), layout=layout, dropout=0.0, empty=empty)["images"]
    np.testing.assert_allclose(exact, (0.7 - 0.1) * 0.5, atol=5 * np.exp(-15.0))


UNET = ["model.image_size=8", "model.channels=4", "model.cross_attention_dim=32", f"model.context_length={LENGTH}",
        "model.base_channels=16", "model.channel_mults=[1,2]", "model.attention_resolutions=[4]", "model.groups=4",
        "model.head_channels=8", "model.num_classes=0", "model.use_linear_projection=true"]
RUN = [CACHE, "run.steps=6", "optim.warmup_steps=2", "train.log_every=1", "train.global_batch=8", "train.eval_every=3",
       "checkpoint.every=3", "checkpoint.keep=0", "diffusion.sample_steps=4", "diffusion.sample_num=8",
       "diffusion.label_dropout=0.2", "diffusion.clip_sample=false", "diffusion.guidance=2.0",
       "diffusion.prompts=[the digit zero, the digit one]"]


@pytest.fixture(scope="module")
def latent_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert cli.main(["smoke", "diffusion", *UNET, *RUN, f"data.source={prepared[1]}", f"run.output_dir={out}"]) == 0
    return out


def test_the_text_conditioned_unet_trains_on_the_latents_and_resumes_exactly(latent_run, prepared, tmp_path):
    train = losses(latent_run)
    assert sorted(train) == list(range(1, 7)) and all(np.isfinite(v) for v in train.values())
    evals = [json.loads(line) for line in (latent_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "eval_loss" in r] == [3, 6]
    for step in (3, 6):  # 8 samples decoded by the VAE to 16 x 16, one column per prompt
        grid = Image.open(latent_run / "samples" / f"step_{step:07d}.png")
        assert grid.size == (2 * 18 + 2, 4 * 18 + 2) and grid.mode == "RGB"
    out = resumable_copy(latent_run, tmp_path, keep_up_to=3)
    assert cli.main(["smoke", "diffusion", *UNET, *RUN, f"data.source={prepared[1]}", f"run.output_dir={out}"]) == 0
    assert losses(out) == train


@pytest.mark.parametrize("change, message", [
    (["model.channels=3"], r"holds latents for model.channels=4, not 3; set model.channels=4"),
    (["model.cross_attention_dim=0"], r"model.cross_attention_dim=32, not 0; set model.cross_attention_dim=32"),
    (["model.context_length=77"], r"model.context_length=16, not 77"),
])
def test_a_model_that_does_not_fit_the_latents_is_refused(prepared, tmp_path, capsys, change, message):
    code = cli.main(["smoke", "diffusion", *UNET, *RUN, *change, f"data.source={prepared[1]}",
                     f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--image-size", "15"], "--image-size 15 must be a positive multiple of 2"),
    ([], "--pipeline needs --image-size"),
    (["--image-size", "16", "--input", "{bare}"], "has no caption: put it in 0.txt beside it"),
])
def test_bad_captioned_input_is_refused_in_one_line(pipeline, prepared, tmp_path, capsys, args, message):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "0.png").write_bytes((prepared[0] / "0.png").read_bytes())
    inputs = [a.format(bare=bare) for a in args]
    source = [] if "--input" in inputs else ["--input", str(prepared[0])]
    code = cli.main(["prepare", "images", *source, *inputs, "--out", str(tmp_path / "out"), "--pipeline",
                     str(pipeline[0])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def exported(latent_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "pipeline"
    assert cli.main(["export", str(latent_run), "--format", "diffusers", "--dtype", "float32", "--out", str(out)]) == 0
    return out


def test_the_export_is_a_stable_diffusion_pipeline(exported, pipeline):
    """Our UNet (no missing or unexpected keys), a DDIM scheduler with Stable Diffusion's offset, and
    the VAE, text encoder and tokenizer carried byte for byte."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    _, info = UNet2DConditionModel.from_pretrained(exported / "unet", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    pipe = StableDiffusionPipeline.from_pretrained(exported, safety_checker=None)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.unet.config.cross_attention_dim == WIDTH
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/vocab.json"):
        assert (exported / part).read_bytes() == (pipeline[0] / part).read_bytes()


@pytest.mark.parametrize("guidance, negative", [(1.0, None), (3.0, "the digit zero")])
def test_prompted_samples_are_the_stable_diffusion_pipelines_images(latent_run, exported, tmp_path, guidance, negative):
    """The same starting latents, prompt, steps, guidance and scheduler: `pretrain sample --prompt` of
    the run gives the images of diffusers' StableDiffusionPipeline over its export."""
    from diffusers import StableDiffusionPipeline

    noise = np.random.default_rng(1).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    args = ["--prompt", "the digit one", "--noise", str(tmp_path / "noise.npy"), "--steps", "5", "--guidance",
            str(guidance), "--dtype", "float32", "--out", str(tmp_path / "ours")]
    assert cli.main(["sample", str(latent_run), *args, *(["--negative-prompt", negative] if negative else [])]) == 0
    ours = np.load(tmp_path / "ours" / "samples.npy")
    pipe = StableDiffusionPipeline.from_pretrained(exported, safety_checker=None)
    theirs = pipe(["the digit one"] * 2, negative_prompt=negative and [negative] * 2, latents=torch.from_numpy(noise).permute(0, 3, 1, 2),
                  num_inference_steps=5, guidance_scale=guidance, height=SIZE, width=SIZE, output_type="np").images
    assert ours.shape == theirs.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(ours, np.clip(theirs * 2 - 1, -1, 1), atol=1e-5)  # 7e-7 measured
    assert ours.std() > 0.05


def test_an_imported_pipeline_continues_and_exports_the_same_tensors(exported, prepared, tmp_path):
    """import-hf of the Stable Diffusion pipeline: a run that carries its parts, trains on the latents
    and exports the imported UNet bit for bit."""
    from safetensors.numpy import load_file

    run = tmp_path / "imported"
    assert cli.main(["import-hf", str(exported), "--out", str(run)]) == 0
    assert (run / "pipeline" / "vae" / "config.json").read_bytes() == (exported / "vae" / "config.json").read_bytes()
    again = tmp_path / "again"
    assert cli.main(["export", str(run), "--format", "diffusers", "--dtype", "float32", "--out", str(again)]) == 0
    ours, theirs = (load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (exported, again))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    for name in ("scheduler/scheduler_config.json", "unet/config.json"):
        assert json.loads((again / name).read_text()) == json.loads((exported / name).read_text())


def test_captions_are_dropped_in_training_batches_only(prepared):
    """Classifier-free guidance's dropout: about label_dropout of the training captions become the
    empty prompt's states; held-out batches keep every caption, so eval losses stay comparable."""
    from pretrain import config as config_lib
    from pretrain.tasks import DiffusionTask

    cfg = config_lib.load(config_lib.preset_path("diffusion", "smoke"),
                          [*UNET, f"data.source={prepared[1]}", "diffusion.label_dropout=0.5"])
    task = DiffusionTask(cfg)
    task.open_data(1)
    empty = np.load(prepared[1] / "empty_prompt.npy").astype(ml_dtypes.bfloat16)
    is_empty = lambda batch: [np.array_equal(c, empty) for c in batch["context"]]  # noqa: E731
    batches = task.batches("train", range(8))
    train = [e for _ in range(8) for e in is_empty(next(batches))]
    held_out = next(iter(task.eval_batches(range(4)).values()))
    assert 0.25 < np.mean(train) < 0.75 and not any(is_empty(next(held_out)))


@pytest.mark.parametrize("args, message", [
    (["--image-size", "16"], "--image-size and --batch encode captioned images with a pipeline; pass --pipeline DIR"),
    (["runtime.fake_cpu_devices=2"], "runtime settings are for encoding with --pipeline; drop them"),
    (["--pipeline", "{pipeline}", "--image-size", "16", "run.steps=3"], "'run.steps=3' is not a runtime.KEY=VALUE setting"),
])
def test_encoding_options_without_their_pipeline_are_refused_in_one_line(pipeline, prepared, tmp_path, capsys, args,
                                                                          message):
    args = [a.format(pipeline=pipeline[0]) for a in args]
    code = cli.main(["prepare", "images", "--input", str(prepared[0]), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_clip_tokenizers_without_transformers_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    for use in (lambda: write_tokenizer(tmp_path / "tok", ["seven"], 8), lambda: latent.tokenizer(tmp_path)):
        with pytest.raises(ConfigError, match=r"^CLIP tokenizers need transformers; pip install 'pretrain\[text-to-image\]'$"):
            use()
    assert list(tmp_path.iterdir()) == []
