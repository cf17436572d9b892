"""models/vae.py against diffusers' own AutoencoderKL (PyTorch, float32): a pipeline's `vae/` read
by pretrain/formats/diffusers.py gives the same moments and the same decoded images within 1e-4."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TheirVAE
from etils import epath
from flax import nnx

from models.vae import AutoencoderKL
from pretrain.config import ConfigError
from pretrain.formats import diffusers as diffusers_format
from pretrain.formats import params

TINY = dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4, sample_size=16,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            scaling_factor=0.13025)


@pytest.fixture(scope="module")
def pipeline_vae(tmp_path_factory):
    """A random AutoencoderKL saved as a pipeline's vae/ (every weight drawn anew: diffusers zeroes none
    of the VAE's, but its GroupNorms start at the identity), and ours read from it."""
    torch.manual_seed(0)
    theirs = TheirVAE(**TINY).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    directory = tmp_path_factory.mktemp("pipeline")
    theirs.save_pretrained(directory / "vae")
    (directory / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    cfg, flat = diffusers_format.read_vae(epath.Path(directory))
    return theirs, params.build(AutoencoderKL, cfg, flat), directory


def test_moments_and_decoded_images_equal_diffusers(pipeline_vae):
    """On images and on faint images (1e-3 of the range, where GroupNorm's epsilon counts)."""
    theirs, ours, _ = pipeline_vae
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    images[1] *= 1e-3
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        posterior = theirs.encode(x).latent_dist
        their_moments = torch.cat([posterior.mean, posterior.logvar], 1).permute(0, 2, 3, 1).numpy()
        latents = posterior.mean
        their_images = theirs.decode(latents).sample.permute(0, 2, 3, 1).numpy()
    moments = np.asarray(nnx.jit(lambda m, x: m.moments(x))(ours, images))
    assert moments.shape == (2, 4, 4, 8)
    np.testing.assert_allclose(moments, their_moments, atol=1e-4, rtol=1e-4)
    decoded = np.asarray(nnx.jit(lambda m, z: m.decode(z))(ours, latents.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(decoded, their_images, atol=1e-4, rtol=1e-4)
    assert ours.cfg.scaling_factor == 0.13025


def test_a_vae_this_one_cannot_be_is_refused_in_one_line(pipeline_vae):
    _, _, directory = pipeline_vae
    config = json.loads((directory / "vae" / "config.json").read_text())
    for change, message in (({"use_quant_conv": False}, "use_quant_conv=false"),
                            ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, "latents_mean and latents_std"),
                            ({"_class_name": "AutoencoderTiny"}, "holds a AutoencoderTiny model")):
        with pytest.raises(ConfigError, match=message) as e:
            diffusers_format.vae_config(config | change, directory / "vae")
        assert "\n" not in str(e.value)
