"""diffusers' UNet2DModel pipelines both ways, against diffusers itself: tiny seeded pipelines built
offline imported and predicting what diffusers predicts, exported again tensor for tensor; what
either side cannot express refused in one line with nothing written."""

import json
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from flax import nnx
from safetensors.numpy import load_file

from models.configs import UNetConfig
from models.unet import UNet
from pretrain import cli
from pretrain.config.schema import DiffusionConfig, DiffusionRun, RunConfig
from pretrain.formats import diffusers as diffusers_format, params
from pretrain.inference import load
from pretrain.run import checkpoint

SMALL = dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4)
ATTENTION_BELOW = dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
VARIANTS = {
    "class-conditional, add, cosines first (UNet2DModel's defaults)": (
        dict(**SMALL, **ATTENTION_BELOW, in_channels=3, out_channels=3, attention_head_dim=8, num_class_embeds=5),
        dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing")),
    "unconditional, scale-shift (ADM), sines first, shifted frequencies, bottom-right padding": (
        dict(sample_size=16, block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, in_channels=1,
             out_channels=1, down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"), attention_head_dim=16,
             resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8, flip_sin_to_cos=False, freq_shift=1,
             downsample_padding=0),
        dict(beta_schedule="linear", beta_start=2e-4, beta_end=0.04, num_train_timesteps=500, timestep_spacing="leading")),
    "class-conditional, scale-shift, one head per block": (
        dict(**SMALL, **ATTENTION_BELOW, in_channels=3, out_channels=3, attention_head_dim=None, num_class_embeds=3,
             resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)),
}


def seeded_pipeline(directory, unet: dict, scheduler: dict) -> UNet2DModel:
    """A DDIMPipeline saved in `directory` whose every UNet parameter is moved off its initial value,
    so that zero-initialised layers carry weight too; returns its UNet."""
    torch.manual_seed(0)
    model = UNet2DModel(**unet).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    DDIMPipeline(unet=model, scheduler=DDIMScheduler(**scheduler)).save_pretrained(str(directory))
    return model


def predictions(model, unet: UNet2DModel, timesteps: int, classes: int):
    """(ours, theirs): both UNets' outputs on the same noisy images at t = 0, T/2 and T-1, with real
    labels and the no-label row where the model has classes."""
    rng, forward = np.random.default_rng(0), nnx.jit(lambda model, x, t, labels: model(x, t, labels))
    ours, theirs = [], []
    for t in (0, timesteps // 2, timesteps - 1):
        x = rng.standard_normal((4, 16, 16, unet.config.in_channels)).astype(np.float32)
        steps = np.full(4, t)
        labels = np.array([0, classes - 1, classes, classes]) if classes else None  # the last two: "no label"
        ours.append(np.asarray(forward(model, x, steps, labels)))
        with torch.no_grad():
            out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(steps),
                       class_labels=None if labels is None else torch.from_numpy(labels)).sample
        theirs.append(out.numpy().transpose(0, 2, 3, 1))
    return np.stack(ours), np.stack(theirs)


@pytest.mark.parametrize("unet, scheduler", VARIANTS.values(), ids=VARIANTS.keys())
def test_imported_pipeline_predicts_what_diffusers_predicts_and_exports_back(unet, scheduler, tmp_path):
    original = seeded_pipeline(tmp_path / "pipeline", unet, scheduler)
    run, back = tmp_path / "run", tmp_path / "back"
    assert cli.main(["import-hf", str(tmp_path / "pipeline"), "--out", str(run)]) == 0
    model, cfg, _ = load.load(str(run), "diffusion")
    classes = cfg.model.num_classes
    assert classes == (unet.get("num_class_embeds") or 1) - 1
    ours, theirs = predictions(model, original, cfg.diffusion.timesteps, classes)
    assert np.abs(ours - theirs).max() < 1e-4 and np.abs(theirs).max() > 0.5, (np.abs(ours - theirs).max(), np.abs(theirs).max())
    reference = DDIMScheduler.from_pretrained(str(tmp_path / "pipeline" / "scheduler"))
    assert cfg.diffusion.spacing == reference.config.timestep_spacing

    # Exported again: diffusers' own tensors, bit for bit, and a config that builds the same UNet.
    assert cli.main(["export", str(run), "--out", str(back), "--dtype", "float32"]) == 0
    exported, loaded = (load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors")) for d in (back, tmp_path / "pipeline"))
    assert exported.keys() == loaded.keys()
    for name, tensor in loaded.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    again = UNet2DModel.from_pretrained(str(back / "unet"))
    assert json.dumps({k: again.config[k] for k in unet}) == json.dumps({k: original.config[k] for k in unet})
    np.testing.assert_allclose(DDIMScheduler.from_pretrained(str(back / "scheduler")).alphas_cumprod.numpy(),
                               reference.alphas_cumprod.numpy(), rtol=2e-5)


def unet_checkpoint(tmp_path, **model) -> str:
    """A step-0 checkpoint of a UNet of these settings, its parameters zeros (what is exported does not
    matter to a config that is refused), written as import-hf writes one."""
    cfg = DiffusionRun(run=RunConfig(name="unet", steps=1, output_dir=str(tmp_path / "run")), model=UNetConfig(**model))
    checkpoint.save_params(cfg, [(k, lambda s=s: np.zeros(s, np.float32)) for k, s in params.shapes(UNet, cfg.model).items()])
    return cfg.run.output_dir


EXPORT_REFUSALS = {
    "two head sizes": (dict(channel_mults=[1, 2], attention_resolutions=[16, 8], num_heads=2),
                       r"model.num_heads=2 gives heads of \[16, 32\] channels, .* set model.head_channels"),
    "wider first level": (dict(channel_mults=[2, 2]), r"model.channel_mults=\[2, 2\] does not start at 1"),
}


@pytest.mark.parametrize("model, message", EXPORT_REFUSALS.values(), ids=EXPORT_REFUSALS.keys())
def test_export_refuses_what_diffusers_cannot_express(model, message, tmp_path, capsys):
    run = unet_checkpoint(tmp_path, base_channels=32, groups=8, **model)
    assert cli.main(["export", run, "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "export").exists()
    # This stack's own format holds any UNet.
    assert cli.main(["export", run, "--format", "unet", "--out", str(tmp_path / "own")]) == 0
    assert json.loads((tmp_path / "own" / "config.json").read_text())["architecture"] == "UNet"


BASE = dict(_class_name="UNet2DModel", sample_size=16, in_channels=3, out_channels=3, block_out_channels=[16, 32],
            down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
            norm_num_groups=4, layers_per_block=1)
IMPORT_REFUSALS = {
    "centred input": ({"center_input_sample": True}, {}, "center_input_sample"),
    "Fourier time": ({"time_embedding_type": "fourier"}, {}, "time_embedding_type=fourier"),
    "mid attention without a norm": ({"resnet_time_scale_shift": "scale_shift"}, {}, "attn_norm_num_groups=None"),
    "resnet downsampling": ({"down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"]}, {}, "down_block_types="),
    "unmatched up path": ({"up_block_types": ["UpBlock2D", "UpBlock2D"]}, {}, "up_block_types="),
    "sigmoid betas": ({}, {"beta_schedule": "sigmoid"}, "beta_schedule=sigmoid"),
    "other linear betas": ({}, {"beta_schedule": "linear", "beta_start": 0.001}, r"beta_start=0.001, .*has 0.0001 and 0.02"),
    "thresholding": ({}, {"thresholding": True}, "thresholding"),
    "sample prediction": ({}, {"prediction_type": "sample"}, "prediction_type=sample"),
}


@pytest.mark.parametrize("unet, scheduler, message", IMPORT_REFUSALS.values(), ids=IMPORT_REFUSALS.keys())
def test_import_refuses_what_this_unet_cannot_be(unet, scheduler, message, tmp_path, capsys):
    pipeline = tmp_path / "pipeline"
    for name, content in (("unet/config.json", BASE | unet), ("model_index.json", {"_class_name": "DDIMPipeline"}),
                          ("scheduler/scheduler_config.json", {"_class_name": "DDIMScheduler", **scheduler})):
        (pipeline / name).parent.mkdir(parents=True, exist_ok=True)
        (pipeline / name).write_text(json.dumps(content))
    assert cli.main(["import-hf", str(pipeline), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and "not supported" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_diffusion_settings_round_trip_through_a_diffusers_scheduler():
    for d in (DiffusionConfig(), DiffusionConfig(schedule="linear", timesteps=250, target="eps", spacing="leading",
                                                 clip_sample=False)):
        config = DDIMScheduler.from_config(diffusers_format.scheduler_config(d)).config
        assert diffusers_format.diffusion_config(dict(config), "here") == d
