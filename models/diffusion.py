"""The diffusion process: noise schedules, training targets and loss weights, and samplers.

Discrete time t = 0 .. T-1 with alpha_bar[t] = prod(1 - beta). Forward noising is
x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps. The model predicts `eps` or
`v` = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho). Sampling walks a subsequence
of the timesteps with the DDIM update; eta=0 is DDIM (deterministic), eta=1 is DDPM's ancestral
sampler on that subsequence (Song et al., 2021). The subsequence and each update are those of
diffusers' DDIMScheduler (its timestep_spacing; a step goes from t to t - T // steps), so the same
network and starting noise give the same image here and there. The loop is one lax.scan.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SCHEDULES = ("linear", "cosine", "scaled_linear")
TARGETS = ("eps", "v")
SPACINGS = ("linspace", "leading", "trailing")  # diffusers' timestep_spacing


def alpha_bar(schedule: str, timesteps: int) -> np.ndarray:
    """[T] cumulative signal fractions, float64 for accuracy, decreasing from ~1 towards 0."""
    if schedule == "linear":  # DDPM's betas, scaled so that other T keep the same endpoints
        scale = 1000 / timesteps
        betas = np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
    elif schedule == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta)
        betas = np.linspace(0.00085**0.5, 0.012**0.5, timesteps, dtype=np.float64) ** 2
    elif schedule == "cosine":  # Nichol & Dhariwal, 2021
        s, steps = 0.008, np.arange(timesteps + 1, dtype=np.float64) / timesteps
        f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
        betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    return np.cumprod(1 - betas)


def _coefficients(abar, t, ndim: int):
    a = jnp.asarray(abar, jnp.float32)[t].reshape((-1,) + (1,) * (ndim - 1))
    return jnp.sqrt(a), jnp.sqrt(1 - a)


def noise(x0, t, eps, abar):
    """x_t for clean images x0 [B, ...], timesteps t [B] and noise eps."""
    signal, sigma = _coefficients(abar, t, x0.ndim)
    return signal * x0 + sigma * eps


def target(kind: str, x0, eps, t, abar):
    """What the model learns to output at x_t."""
    if kind == "eps":
        return eps
    signal, sigma = _coefficients(abar, t, x0.ndim)
    return signal * eps - sigma * x0


def loss_weight(kind: str, t, abar, gamma: float):
    """Per-example weight of the squared error: min-SNR-gamma expressed for the eps or v target;
    all ones when gamma is 0."""
    if gamma <= 0:
        return jnp.ones(jnp.shape(t), jnp.float32)
    snr = jnp.asarray(abar / (1 - abar), jnp.float32)[t]  # from the float64 table: 1 - abar is tiny near t=0
    return jnp.minimum(snr, gamma) / (snr if kind == "eps" else snr + 1)


def predict_x0_eps(kind: str, output, x_t, t, abar):
    """(x0, eps) implied by the model's output at x_t."""
    signal, sigma = _coefficients(abar, t, x_t.ndim)
    if kind == "eps":
        return (x_t - sigma * output) / signal, output
    return signal * x_t - sigma * output, sigma * x_t + signal * output


def sampler_timesteps(spacing: str, timesteps: int, steps: int, offset: int = 0) -> np.ndarray:
    """The timesteps a sampler of `steps` visits, noisiest first, spaced as diffusers spaces them
    (`offset`: its steps_offset, which only leading spacing adds)."""
    if spacing == "linspace":
        return np.linspace(0, timesteps - 1, steps).round()[::-1].astype(np.int32)
    if spacing == "leading":
        return (np.arange(steps) * (timesteps // steps) + offset)[::-1].astype(np.int32)
    if spacing == "trailing":
        return (np.round(np.arange(timesteps, 0, -timesteps / steps)) - 1).astype(np.int32)
    raise ValueError(f"unknown spacing {spacing!r}; use one of {SPACINGS}")


def step_noise(key, steps: int, shape) -> jax.Array:
    """[steps, *shape]: the noise each sampler update adds (times its sigma; none at eta 0)."""
    return jax.vmap(lambda k: jax.random.normal(k, shape))(jax.random.split(key, steps))


def sample(model_fn, kind: str, abar, x_T, key, *, steps: int, eta: float, spacing: str = "trailing",
           clip: bool = True, offset: int = 0, alpha_to_one: bool = True):
    """Images from noise x_T by `steps` DDIM updates (diffusers' DDIMScheduler.step).

    model_fn(x_t, t [B]) -> output; eta 0 is deterministic DDIM, eta 1 is DDPM, adding
    step_noise(key) scaled. With clip, the predicted x0 is kept in [-1, 1] (the noise prediction is
    left as the model gave it, as diffusers' pipelines do); the last step lands on alpha_bar 1, or
    on alpha_bar[0] without alpha_to_one (diffusers' set_alpha_to_one, false in Stable Diffusion's)."""
    timesteps, batch = len(abar), x_T.shape[0]
    ts = sampler_timesteps(spacing, timesteps, steps, offset)
    prev = ts - timesteps // steps
    abar32 = np.asarray(abar, np.float32)
    a = jnp.asarray(abar32[ts])
    a_prev = jnp.asarray(np.where(prev >= 0, abar32[np.maximum(prev, 0)], 1.0 if alpha_to_one else abar32[0]))

    def update(x, inputs):
        t, a, a_prev, z = inputs
        x0, eps = predict_x0_eps(kind, model_fn(x, jnp.full((batch,), t)), x, jnp.full((batch,), t), abar)
        if clip:
            x0 = jnp.clip(x0, -1.0, 1.0)
        sigma_t = eta * jnp.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        direction = jnp.sqrt(jnp.maximum(1 - a_prev - sigma_t**2, 0.0)) * eps
        return jnp.sqrt(a_prev) * x0 + direction + sigma_t * z, None

    x, _ = jax.lax.scan(update, x_T, (jnp.asarray(ts), a, a_prev, step_noise(key, steps, x_T.shape)))
    return x


def guided(model, cond: dict, uncond: dict, guidance: float):
    """model_fn for `sample` with classifier-free guidance: out_uncond + w * (out_cond - out_uncond),
    both halves in one batched call; `cond` and `uncond` are the model's conditioning keywords
    (labels, context) with and without the condition."""

    def model_fn(x, t):
        both = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                     **{k: jnp.concatenate([cond[k], uncond[k]]) for k in cond})
        cond_out, uncond_out = jnp.split(both, 2)
        return uncond_out + guidance * (cond_out - uncond_out)

    return model_fn


@functools.partial(nnx.jit, static_argnames=("schedule", "timesteps", "kind", "num", "steps", "eta", "guidance",
                                             "spacing", "clip", "offset", "alpha_to_one"))
def generate(model, labels, key, *, schedule: str, timesteps: int, kind: str, num: int, steps: int, eta: float,
             guidance: float, spacing: str = "trailing", clip: bool = True, offset: int = 0, alpha_to_one: bool = True,
             x_T=None, context=None, null_context=None):
    """`num` images (or latents) [num, H, W, C] from a UNet: starting noise x_T (default: drawn from
    `key`), then `steps` sampler updates. labels [num] for a class-conditional model, context [num,
    T, D] (and null_context [T, D], the empty prompt's) for a text-conditioned one; guided unless
    guidance is 1."""
    cfg = model.cfg
    noise_key, sample_key = jax.random.split(key)
    if x_T is None:
        x_T = jax.random.normal(noise_key, (num, cfg.image_size, cfg.image_size, cfg.channels))
    cond, uncond = {}, {}
    if labels is not None:
        cond["labels"], uncond["labels"] = labels, jnp.full_like(labels, cfg.num_classes)
    if context is not None:
        cond["context"], uncond["context"] = context, jnp.broadcast_to(null_context, context.shape).astype(context.dtype)
    if guidance == 1.0 or not cond:
        model_fn = lambda x, t: model(x, t, **cond)  # noqa: E731
    else:
        model_fn = guided(model, cond, uncond, guidance)
    return sample(model_fn, kind, alpha_bar(schedule, timesteps), x_T, sample_key, steps=steps, eta=eta,
                  spacing=spacing, clip=clip, offset=offset, alpha_to_one=alpha_to_one)
