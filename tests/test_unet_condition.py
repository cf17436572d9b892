"""The UNet with cross-attention (models/unet.py under model.cross_attention_dim) against diffusers'
own UNet2DConditionModel (PyTorch, float32), read by pretrain/formats/diffusers.py: the same
prediction within 1e-4, in Stable Diffusion 1's layout (heads by count, 1x1 projections) and 2's
(heads of one size, linear projections)."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from flax import nnx

from models.unet import UNet
from pretrain.config import ConfigError
from pretrain.formats import diffusers as diffusers_format, params
from pretrain.formats.weights import open_weights

TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=4, cross_attention_dim=12,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
LAYOUTS = {
    "Stable Diffusion 1: 4 heads at every level, 1x1 projections": dict(block_out_channels=(8, 16, 16), attention_head_dim=4),
    "Stable Diffusion 2: heads of 4 channels, linear projections, upcast": dict(
        block_out_channels=(8, 16, 32), attention_head_dim=[2, 4, 8], use_linear_projection=True, upcast_attention=True),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_predictions_equal_diffusers(layout, tmp_path):
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**TINY, **layout).eval()
    with torch.no_grad():  # diffusers zero-initialises no layer, but draw everything anew to reach every weight
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    theirs.save_pretrained(tmp_path)
    m = diffusers_format.model_config(theirs.config, tmp_path)
    assert m.cross_attention_dim == 12 and m.attention_resolutions == [8, 4]
    with open_weights(tmp_path, diffusers_format.STEM) as read:
        ours = params.build(UNet, m, {p: thunk() for p, thunk in diffusers_format.our_tensors(params.shapes(UNet, m), read)})
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    t = np.array([10, 900])
    context = rng.normal(size=(2, 7, 12)).astype(np.float32)
    with torch.no_grad():
        want = theirs(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(t),
                      torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()
    got = nnx.jit(lambda model, x, t, c: model(x, t, context=c))(ours, latents, t, context)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_a_conditional_unet_this_one_cannot_be_is_refused_in_one_line(tmp_path):
    config = {"_class_name": "UNet2DConditionModel", **TINY, "block_out_channels": [8, 16, 16]}
    for change, message in (({"transformer_layers_per_block": 2}, "transformer_layers_per_block=2"),
                            ({"addition_embed_type": "text_time"}, "addition_embed_type=text_time"),
                            ({"attention_head_dim": [2, 2, 8]}, "one head size per UNet")):
        with pytest.raises(ConfigError, match=message) as e:
            diffusers_format.model_config(config | change, tmp_path)
        assert "\n" not in str(e.value)
