"""Splash attention (the Pallas TPU kernel, in interpret mode here) against the einsum backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.attention import BACKENDS
from pretrain.config import checks
from pretrain.train import sharding
from pretrain.tasks import LanguageModelTask

from conftest import make_train_step, tiny_config
from test_trainer import run_steps

LENGTH = 128  # the kernel's smallest block


def packed_segments(batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Rows of 2 to 4 documents each, with a padded tail (segment 0) in some rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(8, length - 8), rng.integers(1, 4), replace=False))
        row = np.searchsorted(cuts, np.arange(length), side="right") + 1
        if rng.random() < 0.5:
            row[-5:] = 0
        rows.append(row)
    return np.stack(rows).astype(np.int32)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["kv heads replicated", "kv heads sharded"])
def test_splash_equals_xla_forward_and_gradients_on_the_mesh(kv_heads):
    """GQA with 4 query heads on the 2 x 4 mesh: 2 K/V heads (fewer than the model axis: each
    device gets copies) and 4 (split with the query heads)."""
    b, heads, dim = 4, 4, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, LENGTH, heads, dim))
    k, v = (jax.random.normal(key, (b, LENGTH, kv_heads, dim)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape)
    segments = jnp.asarray(packed_segments(b, LENGTH))
    assert len(np.unique(segments)) >= 4

    def run(name):
        def loss(q, k, v):
            out = BACKENDS[name](q, k, v, segments)
            return jnp.sum(out * cotangent), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    with jax.set_mesh(sharding.make_mesh((2, 4))), nnx.logical_axis_rules(sharding.axis_rules(kv_heads, 4)):
        (_, ref), ref_grads = run("xla")
        (_, out), grads = run("splash")
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-4)


def test_twenty_training_steps_with_splash_match_xla():
    """The tiny model trained 20 steps on one packed batch: the same losses with either backend."""
    tokens = np.random.default_rng(0).integers(1, 256, (8, LENGTH + 1), dtype=np.int32)
    segments = packed_segments(8, LENGTH)
    starts = np.maximum.accumulate(np.where(np.diff(segments, prepend=-1, axis=1) != 0, np.arange(LENGTH), 0), axis=1)
    b = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
         "positions": (np.arange(LENGTH) - starts).astype(np.int32)}
    overrides = [f"data.seq_len={LENGTH}", f"model.max_seq_len={LENGTH}"]
    _, ref = run_steps(make_train_step(*overrides, "model.attention=xla"), [b] * 20)
    _, losses = run_steps(make_train_step(*overrides, "model.attention=splash"), [b] * 20)
    np.testing.assert_allclose(losses, ref, atol=1e-4)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("platform, backend", [("tpu", "splash"), ("gpu", "cudnn"), ("cpu", "xla")])
def test_auto_picks_the_platform_backend(platform, backend):
    cfg = tiny_config("model.attention=auto", f"data.seq_len={LENGTH}", f"model.max_seq_len={LENGTH}")
    resolved = LanguageModelTask.resolve(cfg, checks.validate(cfg, 8, platform), platform)
    assert resolved.model.attention == backend and cfg.model.attention == "auto"  # a new config


@pytest.mark.parametrize("base", [32, 16], ids=["4 heads, one per device", "2 heads, on every device"])
def test_a_unet_attends_with_splash_as_with_xla_on_the_mesh(base):
    """A text-conditioned UNet with model.attention=splash on the 2 x 4 mesh: its self-attention over
    256 pixels runs the kernel unmasked (the cross-attention on 8 text states, no multiple of 128,
    stays XLA's), and its output and gradients are those of model.attention=xla; heads split over
    `model`, or whole on each device where there are fewer of them."""
    from models.configs import UNetConfig
    from models.unet import UNet

    cfg = UNetConfig(image_size=16, channels=4, base_channels=base, channel_mults=[1, 2], attention_resolutions=[16],
                     head_channels=8, groups=4, cross_attention_dim=32, context_length=8, remat="none")
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (4, 16, 16, 4))
    t, context = jnp.arange(4) * 200, jax.random.normal(keys[1], (4, 8, 32))

    def run(attention):
        import dataclasses

        model = UNet(dataclasses.replace(cfg, attention=attention), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(keys[2], p.shape), state)  # no zero outputs

        def loss(state):
            out = nnx.merge(graphdef, state)(x, t, None, context)
            return jnp.sum(jnp.sin(out)), out

        kernels = str(jax.make_jaxpr(loss)(state)).count("pallas_call")
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(state), kernels

    with jax.set_mesh(sharding.make_mesh((2, 4))), nnx.logical_axis_rules(sharding.LOGICAL_RULES):
        ((_, ref), ref_grads), none = run("xla")
        ((_, out), grads), kernels = run("splash")
    assert none == 0 and kernels > 0  # the kernel runs only where asked for
    np.testing.assert_allclose(out, ref, atol=1e-4)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):  # some in the hundreds: a few ulps
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-4)


def test_a_splash_unet_counts_the_flops_of_an_xla_one_and_its_kernels_as_hidden():
    """The MFU count and the executed count are the math's, whatever runs the attention; what the
    kernels run is counted apart for the plan's forecast: here 3 attentions over 16 x 16 pixels (one
    down, two up) of 32 channels, 4 L^2 C each, forward, backward (twice) and recomputed (remat full)."""
    import dataclasses

    from pretrain import config as config_lib
    from pretrain.tasks import DiffusionTask

    cfg = config_lib.load(config_lib.preset_path("diffusion", "smoke"), ["model.attention_resolutions=[16]",
                                                                          "model.remat=full"])
    counts = {a: DiffusionTask(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=a))).planned_flops()
              for a in ("xla", "splash")}
    assert counts["splash"]["model"] == counts["xla"]["model"] > 0
    assert counts["splash"]["executed"] == counts["xla"]["executed"]
    assert counts["xla"]["hidden"] == 0 and counts["splash"]["hidden"] == 3 * 4 * 256**2 * 32 * 4 * cfg.train.global_batch
