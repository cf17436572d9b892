"""Warmup-cosine AdamW with per-parameter-group weight decay and learning-rate multipliers."""

import re

import jax
import optax

from pretrain.config.schema import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def path_name(path) -> str:
    """'layers/attn_norm/scale' for a tree path into an nnx.State (the Variable's own 'value' dropped)."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def group_labels(cfg: OptimConfig, params):
    """The name of the group each parameter falls in: the first matching pattern, else 'default'."""

    def label(path, _):
        name = path_name(path)
        for i, group in enumerate(cfg.groups):
            if re.search(group.pattern, name):
                return f"group{i}"
        return "default"

    return jax.tree_util.tree_map_with_path(label, params)


def make(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip, Adam moments, decoupled weight decay and learning-rate multiplier by group, schedule.

    One Adam state covers every parameter (so the optimizer state mirrors the parameters
    and shards like them); groups differ only in the stateless decay and scale steps.
    """
    decays = {"default": cfg.weight_decay}
    mults = {"default": 1.0}
    for i, g in enumerate(cfg.groups):
        decays[f"group{i}"] = cfg.weight_decay if g.weight_decay is None else g.weight_decay
        mults[f"group{i}"] = g.lr_mult

    def mask(name):
        return lambda params: jax.tree.map(lambda label: label == name, group_labels(cfg, params))

    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        *(optax.add_decayed_weights(decay, mask=mask(name)) for name, decay in decays.items() if decay),
        *(optax.masked(optax.scale(mult), mask(name)) for name, mult in mults.items() if mult != 1.0),
        optax.scale_by_learning_rate(schedule(cfg, total_steps)),
    )
