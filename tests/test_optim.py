import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.transformer import Transformer
from pretrain.config.schema import ParamGroup
from pretrain.train import optim

from conftest import tiny_config


def params_and_labels(cfg):
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    labels = {optim.path_name(p): l for p, l in jax.tree_util.tree_leaves_with_path(optim.group_labels(cfg.optim, params))}
    return params, labels


def test_default_groups_exclude_norms_and_embeddings_from_decay():
    cfg = tiny_config()
    _, labels = params_and_labels(cfg)
    no_decay = {name for name, label in labels.items() if label == "group0"}
    assert no_decay == {"embed", "final_norm/scale", "layers/attn_norm/scale", "layers/mlp_norm/scale"}
    assert labels["lm_head"] == labels["layers/wq"] == "default"


def test_decay_and_lr_multiplier_follow_the_groups():
    """One update on zero gradients is pure weight decay: -lr * mult * decay * p, per group."""
    cfg = tiny_config("optim.warmup_steps=0", "optim.lr=0.5", "optim.weight_decay=0.1", "optim.clip_norm=0")
    cfg.optim.groups = [ParamGroup(pattern="norm", weight_decay=0.0), ParamGroup(pattern="^embed$", lr_mult=2.0)]
    params, _ = params_and_labels(cfg)
    tx = optim.make(cfg.optim, 10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["embed"][...], -0.5 * 2.0 * 0.1 * params["embed"][...], rtol=1e-6)
    np.testing.assert_allclose(updates["layers"]["wq"][...], -0.5 * 0.1 * params["layers"]["wq"][...], rtol=1e-6)
    assert not np.any(updates["final_norm"]["scale"][...])


def test_schedule_peaks_after_warmup_and_ends_at_min():
    cfg = tiny_config("optim.lr=1e-3", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1").optim
    lr = optim.schedule(cfg, 100)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(100)), 1e-4, rtol=1e-6)
    assert float(lr(5)) < float(lr(10)) and float(lr(50)) < float(lr(10))


def test_clipping_bounds_the_update():
    cfg = tiny_config("optim.clip_norm=1.0", "optim.weight_decay=0", "optim.warmup_steps=0").optim
    params = {"w": jnp.ones((4,))}
    g = {"w": jnp.full((4,), 10.0)}  # global norm 20
    tx = optim.make(cfg, 10)
    # Adam normalises the step, so look at the gradient that reached the first moment.
    _, state = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(state[1].mu["w"], (1 - cfg.b1) * g["w"] / 20.0, rtol=1e-6)
