"""`pretrain` command line: train, smoke."""

import argparse
import sys

import jax
from etils import epath

from pretrain import config as config_lib
from pretrain import runtime, sharding
from pretrain.config import ConfigError
from pretrain.tasks import TASKS
from pretrain.trainer import Trainer

SMOKE_OVERRIDES = {"llm": ["runtime.fake_cpu_devices=8", "run.output_dir=runs/smoke-llm"]}


def build(cfg: config_lib.Config) -> Trainer:
    """Devices, validation, mesh, task and trainer: everything up to the first compile."""
    runtime.setup(cfg)  # before anything asks JAX for its devices
    shape = config_lib.validate(cfg, jax.device_count(), jax.default_backend())
    mesh = sharding.make_mesh(shape)
    rules = sharding.axis_rules(cfg.model.num_kv_heads, shape[1])
    task = TASKS[cfg.task](cfg)
    task.prepare()
    return Trainer(cfg, task, mesh, rules)


def train(cfg_path, overrides) -> dict:
    """Load and validate first; only then write anything, and train."""
    cfg = config_lib.load(cfg_path, overrides)
    trainer = build(cfg)
    if jax.process_index() == 0:
        out = epath.Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_lib.to_yaml(cfg))
    return trainer.fit()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pretrain", description="Pretrain language and diffusion models with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a YAML config; key=value pairs override it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("smoke", help="the tiny preset on 8 faked CPU devices with the embedded data")
    p.add_argument("family", nargs="?", default="llm", choices=sorted(SMOKE_OVERRIDES))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            train(args.config, args.overrides)
        else:
            train(config_lib.preset_path(args.family, "smoke"), SMOKE_OVERRIDES[args.family] + args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
