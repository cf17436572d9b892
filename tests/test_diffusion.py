"""The diffusion UNet and process against references: unsharded forward, NumPy closed forms, an
oracle model for the sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import diffusion
from models.unet import UNet, UNetConfig
from pretrain.config.schema import DiffusionConfig
from pretrain.formats import diffusers as diffusers_format
from pretrain.train import sharding

SMALL = dict(base_channels=16, groups=4, num_heads=2)
PRESETS = {
    "digits 16x16, class-conditional": UNetConfig(image_size=16, channels=1, channel_mults=[1, 2], attention_resolutions=[8],
                                                   num_classes=10, **SMALL),
    "rgb 32x32, three levels, attention at two": UNetConfig(image_size=32, channels=3, channel_mults=[1, 2, 2],
                                                             blocks_per_resolution=2, attention_resolutions=[16, 8], **SMALL),
}


def inputs(cfg, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32)
    t = rng.integers(0, 1000, batch).astype(np.int32)
    labels = rng.integers(0, cfg.num_classes + 1, batch).astype(np.int32) if cfg.num_classes else None
    return x, t, labels


def randomized(cfg):
    """(graphdef, state) of a UNet whose every parameter is noise (zero-initialised output layers make
    a fresh one output 0). Built from shapes, filled by NumPy, run jitted: op by op, each small op
    would compile alone."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0))))
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(1)
    return graphdef, jax.tree.unflatten(tree, [jnp.asarray(0.2 * rng.standard_normal(l.shape), jnp.float32) for l in leaves])


def forward(graphdef):
    return jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))


@pytest.mark.parametrize("cfg", PRESETS.values(), ids=PRESETS.keys())
def test_unet_output_has_the_input_shape(cfg):
    graphdef, state = randomized(cfg)
    x, t, labels = inputs(cfg, batch=2)
    out = forward(graphdef)(state, x, t, labels)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-3


def test_sharded_unet_equals_unsharded():
    cfg = PRESETS["digits 16x16, class-conditional"]
    graphdef, state = randomized(cfg)
    x, t, labels = inputs(cfg)
    reference = np.asarray(forward(graphdef)(state, x, t, labels))  # on one device

    mesh = sharding.make_mesh((2, 4))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_RULES):
        shardings = nnx.get_named_sharding(state, mesh)
        state = jax.device_put(state, shardings)
        kernel = state["down_blocks"][0]["resnets"][0]["conv1"]["kernel"][...]
        assert tuple(kernel.sharding.spec) == (None, None, "data", "model")  # conv_in on data, conv_out on model
        batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        out = forward(graphdef)(state, *(jax.device_put(a, batch) for a in (x, t, labels)))
    np.testing.assert_allclose(np.asarray(out), reference, atol=1e-5, rtol=1e-5)


def test_schedules_noising_and_targets_match_closed_forms():
    T = 1000
    betas = np.linspace(1e-4, 0.02, T)
    np.testing.assert_allclose(diffusion.alpha_bar("linear", T), np.array([np.prod(1 - betas[: i + 1]) for i in range(T)]), rtol=1e-12)
    s = 0.008
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
    cosine = diffusion.alpha_bar("cosine", T)
    np.testing.assert_allclose(cosine[:-1], f(np.arange(1, T)) / f(0), rtol=1e-6)  # the last beta is clipped at 0.999

    rng = np.random.default_rng(0)
    x0, eps = rng.uniform(-1, 1, (4, 8, 8, 3)), rng.standard_normal((4, 8, 8, 3))
    t = np.array([0, 10, 500, 999])
    a = cosine[t][:, None, None, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    np.testing.assert_allclose(diffusion.noise(x0, t, eps, cosine), x_t, atol=1e-5)
    np.testing.assert_allclose(diffusion.target("eps", x0, eps, t, cosine), eps, atol=1e-6)
    np.testing.assert_allclose(diffusion.target("v", x0, eps, t, cosine), np.sqrt(a) * eps - np.sqrt(1 - a) * x0, atol=1e-5)
    snr = cosine[t] / (1 - cosine[t])
    np.testing.assert_allclose(diffusion.loss_weight("eps", t, cosine, 5.0), np.minimum(snr, 5) / snr, rtol=1e-4)
    np.testing.assert_allclose(diffusion.loss_weight("v", t, cosine, 5.0), np.minimum(snr, 5) / (snr + 1), rtol=1e-4)


@pytest.mark.parametrize("kind, schedule", [("eps", "linear"), ("v", "cosine")])
def test_ddim_with_an_oracle_model_recovers_x0_exactly(kind, schedule):
    abar = diffusion.alpha_bar(schedule, 1000)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
    t_last = jnp.full((4,), 999)
    x_T = diffusion.noise(x0, t_last, eps, abar)
    oracle = lambda x, t: diffusion.target(kind, x0, eps, t, abar)  # the true noise, as a perfect model would predict
    out = jax.jit(lambda x: diffusion.sample(oracle, kind, abar, x, jax.random.key(0), steps=50, eta=0.0, clip=False))(x_T)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-4)


@pytest.mark.parametrize("key", ["labels", "context"])
def test_classifier_free_guidance_mixes_conditional_and_unconditional(key):
    """By a label (the null label 10) or by text states (the empty prompt's)."""
    model = lambda x, t, **c: x * (c[key].reshape(len(x), -1)[:, :1] + 1.0)  # output depends on the condition
    x, t = jnp.ones((3, 2)), jnp.zeros(3, jnp.int32)
    y, null = (jnp.array([0, 1, 2]), jnp.full(3, 10)) if key == "labels" else (jnp.arange(12.0).reshape(3, 2, 2),
                                                                                jnp.full((3, 2, 2), -5.0))
    cond, uncond = model(x, t, **{key: y}), model(x, t, **{key: null})
    mixed = lambda w: diffusion.guided(model, {key: y}, {key: null}, w)(x, t)  # noqa: E731
    np.testing.assert_allclose(mixed(1.0), cond)
    np.testing.assert_allclose(mixed(0.0), uncond)
    np.testing.assert_allclose(mixed(3.0), uncond + 3.0 * (cond - uncond), rtol=1e-6)


# --- the sampler against diffusers' DDIMScheduler --------------------------------------------


def toy_model(x, t, labels=None):
    """A smooth stand-in for a network (the sampler's arithmetic is what is compared): any array
    module's tanh and cos, label-dependent where labels are given."""
    xp = jnp if isinstance(x, jax.Array) else np
    shift = 0.0 if labels is None else 0.1 * labels.reshape(-1, 1, 1, 1)
    return 0.8 * xp.tanh(x + shift) * xp.cos(t.reshape(-1, 1, 1, 1) / 400.0)


def scheduler(schedule: str, timesteps: int, kind: str, spacing: str, clip: bool, offset: int = 0,
              alpha_to_one: bool = True):
    """The DDIMScheduler an export of these settings carries."""
    from diffusers import DDIMScheduler

    settings = DiffusionConfig(schedule=schedule, timesteps=timesteps, target=kind, spacing=spacing, clip_sample=clip,
                               steps_offset=offset, set_alpha_to_one=alpha_to_one)
    return DDIMScheduler.from_config(diffusers_format.scheduler_config(settings))


@pytest.mark.parametrize("schedule, timesteps", [("cosine", 1000), ("linear", 1000), ("scaled_linear", 1000),
                                                 ("linear", 500)])
def test_our_schedules_are_the_exported_schedulers(schedule, timesteps):
    theirs = scheduler(schedule, timesteps, "eps", "trailing", True).alphas_cumprod.numpy()
    np.testing.assert_allclose(diffusion.alpha_bar(schedule, timesteps), theirs, rtol=2e-5)


@pytest.mark.parametrize("spacing, kind, schedule, eta, guidance, sd", [
    ("trailing", "v", "cosine", 0.0, None, False), ("leading", "eps", "scaled_linear", 0.0, None, False),
    ("linspace", "v", "linear", 0.0, None, False), ("trailing", "eps", "linear", 1.0, None, False),
    ("trailing", "v", "cosine", 0.0, 2.0, False), ("leading", "eps", "scaled_linear", 0.0, 3.0, True)])
def test_our_sampler_is_a_ddim_scheduler_loop(spacing, kind, schedule, eta, guidance, sd):
    """The same starting noise (and, at eta 1, the same noise at each step), the same model: the image
    of our sampler equals that of diffusers' DDIMScheduler stepping the model's outputs (with
    classifier-free guidance written out as diffusers' pipelines write it, the no-label row last).
    sd: Stable Diffusion's scheduler settings, steps_offset 1 and set_alpha_to_one false."""
    import torch

    steps, shape = 10, (3, 4, 4, 1)
    x_T = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    labels = np.array([0, 1, 2])
    if guidance is None:
        model_fn = toy_model
    else:
        model_fn = diffusion.guided(lambda x, t, labels: toy_model(x, t, labels), {"labels": jnp.asarray(labels)},
                                    {"labels": jnp.full(3, 10)}, guidance)
    key = jax.random.key(1)
    abar = diffusion.alpha_bar(schedule, 1000)
    ours = diffusion.sample(model_fn, kind, abar, jnp.asarray(x_T), key, steps=steps, eta=eta, spacing=spacing,
                            clip=not sd, offset=int(sd), alpha_to_one=not sd)
    noise = np.array(diffusion.step_noise(key, steps, shape))  # a copy torch may write
    sched = scheduler(schedule, 1000, kind, spacing, not sd, int(sd), not sd)
    sched.set_timesteps(steps)
    x = x_T
    for i, t in enumerate(sched.timesteps.numpy()):
        ts = np.full(3, t)
        out = toy_model(x, ts)
        if guidance is not None:
            cond, uncond = toy_model(x, ts, labels), toy_model(x, ts, np.full(3, 10))
            out = uncond + guidance * (cond - uncond)
        x = sched.step(torch.from_numpy(out), int(t), torch.from_numpy(x), eta=eta,
                       variance_noise=torch.from_numpy(noise[i]) if eta else None).prev_sample.numpy()
    np.testing.assert_allclose(np.asarray(ours), x, atol=1e-3)
    assert np.abs(x).max() > 0.1
