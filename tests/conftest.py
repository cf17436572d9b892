"""Tests run on CPU with 8 faked devices, set before JAX starts."""

import os
from pathlib import Path

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Compiles dominate on CPU: keep them across test sessions.
jax.config.update("jax_compilation_cache_dir", str(Path(__file__).resolve().parent.parent / ".cache" / "xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import pytest  # noqa: E402

from pretrain import config as config_lib  # noqa: E402

# A model small enough to compile in seconds, still exercising GQA (2 kv heads on a 4-way model axis).
TINY = [
    "runtime.fake_cpu_devices=8",
    "runtime.compilation_cache_dir=",
    "run.steps=30",
    "model.vocab_size=256",
    "model.num_layers=2",
    "model.embed_dim=32",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=8",
    "model.mlp_dim=64",
    "model.max_seq_len=32",
    "data.source=synthetic",
    "data.seq_len=16",
    "train.global_batch=8",
    "optim.warmup_steps=0",
]


def tiny_config(*overrides):
    return config_lib.load(config_lib.preset_path("llm", "smoke"), TINY + list(overrides))


@pytest.fixture
def tiny():
    return tiny_config


def make_trainer(*overrides):
    from pretrain import sharding
    from pretrain.tasks import LanguageModelTask
    from pretrain.trainer import Trainer

    cfg = tiny_config(*overrides)
    mesh = sharding.make_mesh((cfg.mesh.data, cfg.mesh.model))
    rules = sharding.axis_rules(cfg.model.num_kv_heads, cfg.mesh.model)
    return Trainer(cfg, LanguageModelTask(cfg), mesh, rules)


@pytest.fixture(scope="session")
def trainer():
    """The tiny model on a 2 x 4 mesh, shared so its train step compiles once per session."""
    return make_trainer()
