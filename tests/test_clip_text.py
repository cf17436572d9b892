"""models/clip_text.py against transformers' own CLIPTextModel (PyTorch, float32): a pipeline's
`text_encoder/` read by pretrain/formats/diffusers.py gives the same states at every position and
the same pooled state, within 1e-4, with either MLP activation and either end-of-text rule."""

import json

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from etils import epath
from flax import nnx

from models.clip_text import CLIPTextModel
from pretrain.config import ConfigError
from pretrain.formats import diffusers as diffusers_format
from pretrain.formats import params

TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, bos_token_id=97, pad_token_id=1)


@pytest.mark.parametrize("act, eos, prefixed", [("quick_gelu", 50, True), ("gelu", 2, False)])
def test_states_and_pooled_state_equal_transformers(tmp_path, act, eos, prefixed):
    """eos 50: the end of text is the first 50 (a larger id sits before it); eos 2, the rule of older
    configs: the largest id. Files with Stable Diffusion's `text_model.` names, or transformers 5's."""
    torch.manual_seed(0)
    theirs = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY, hidden_act=act, eos_token_id=eos)).eval()
    theirs.save_pretrained(tmp_path / "text_encoder")
    if prefixed:
        path = tmp_path / "text_encoder" / "model.safetensors"
        safetensors.numpy.save_file({f"text_model.{k}": v for k, v in safetensors.numpy.load_file(path).items()}, path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    cfg, flat = diffusers_format.read_text_encoder(epath.Path(tmp_path))
    ours = params.build(CLIPTextModel, cfg, flat)
    ids = np.random.default_rng(0).integers(51, 90, (3, 16))
    ids[:, 0] = 97
    for row, end in enumerate((5, 15, 9)):  # each prompt's end of text, then padding
        ids[row, end] = 50 if eos == 50 else 98
        ids[row, end + 1:] = 1
    with torch.no_grad():
        out = theirs(torch.from_numpy(ids))
    states, pooled = nnx.jit(lambda m, i: m(i))(ours, ids)
    np.testing.assert_allclose(np.asarray(states), out.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(states)[np.arange(3), [5, 15, 9]], atol=0)


def test_another_text_model_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is not a CLIPTextModel") as e:
        diffusers_format.clip_text_config({"model_type": "t5", "hidden_act": "gelu"}, tmp_path)
    assert "\n" not in str(e.value)
