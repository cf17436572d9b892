"""`pretrain` command line: train, smoke, prepare."""

import argparse
import sys

import jax
from etils import epath

from data import prepare
from data.records import DataError
from data.tokenizer import MODEL_TYPES

from pretrain import config as config_lib
from pretrain import checkpoint, runtime, sharding
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
    task.prepare(shape[1])
    return Trainer(cfg, task, mesh, rules)


def train(cfg_path, overrides) -> dict:
    """Load and validate first (data, output dir, what to resume from); only then write anything, and train."""
    cfg = config_lib.load(cfg_path, overrides)
    trainer = build(cfg)
    checkpoint.check_output_dir(cfg)
    plan = checkpoint.resume_plan(cfg)
    if jax.process_index() == 0:
        if cfg.checkpoint.overwrite:
            checkpoint.clear_output_dir(cfg)
        out = epath.Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_lib.to_yaml(cfg))
    return trainer.fit(plan)


def run_prepare(args):
    common = dict(val_fraction=args.val_fraction, workers=args.workers, shard_mb=args.shard_mb, overwrite=args.overwrite)
    if args.kind == "text":
        manifest = prepare.prepare_text(
            args.input, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            model_type=args.model_type, seq_len=args.seq_len, **common,
        )
    else:
        manifest = prepare.prepare_images(args.input, args.out, **common)
    for split, info in manifest["splits"].items():
        counts = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in info.items() if isinstance(v, int))
        print(f"{split}: {counts} in {len(info['shards'])} shard(s)")
    print(f"wrote {args.out}")


def _prepare_parser(sub):
    p = sub.add_parser("prepare", help="build ArrayRecord shards (and a SentencePiece model for text) from raw files")
    kinds = p.add_subparsers(dest="kind", required=True)
    text = kinds.add_parser("text", help="text files, JSONL or Parquet (a 'text' field) -> token-id shards")
    images = kinds.add_parser("images", help="PNG/JPEG files (class subdirectories give labels) -> image shards")
    for k in (text, images):
        k.add_argument("--input", action="append", required=True, help="file, directory or glob; local or gs://; repeatable")
        k.add_argument("--out", required=True, help="output directory, local or gs://")
        k.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
        k.add_argument("--workers", type=int, default=0, help="worker processes (0: one per CPU)")
        k.add_argument("--shard-mb", type=int, default=256, help="size of each ArrayRecord shard")
        k.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    text.add_argument("--tokenizer", help="an existing SentencePiece .model file (default: train one on the input)")
    text.add_argument("--vocab-size", type=int, default=32000, help="pieces of the trained tokenizer")
    text.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    text.add_argument("--seq-len", type=int, default=2048, help="longer documents are split into pieces of this many tokens")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pretrain", description="Pretrain language and diffusion models with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a YAML config; key=value pairs override it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("smoke", help="the tiny preset on 8 faked CPU devices with the embedded data")
    p.add_argument("family", nargs="?", default="llm", choices=sorted(SMOKE_OVERRIDES))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    _prepare_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            train(args.config, args.overrides)
        elif args.command == "smoke":
            train(config_lib.preset_path(args.family, "smoke"), SMOKE_OVERRIDES[args.family] + args.overrides)
        else:
            run_prepare(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
