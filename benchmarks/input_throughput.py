"""Input pipeline throughput alone (no model): tokens/s of the text pipeline, images/s of the image pipeline.

    python benchmarks/input_throughput.py [--batches N] [--workers 0 2] [--image-size 32]

Text: the smoke config's prepared stdlib corpus (built on first use), batches of
global_batch x seq_len packed rows. Images: PNGs generated into a temporary directory and
prepared into ArrayRecord shards, decoded, cropped, flipped and batched. Compare the text
figure with the train step's tokens/s (benchmarks/train_throughput.py or the smoke log):
the pipeline must outrun the step.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import idle  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data import corpus, pipeline, records  # noqa: E402
from data.prepare import local as prepare  # noqa: E402
from pretrain import config as config_lib  # noqa: E402


def rate(iterator, batches: int, per_batch: int) -> float:
    next(iterator)  # start-up (worker threads, first reads) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * per_batch / (time.perf_counter() - start)


def text_source(cfg):
    d = cfg.data
    directory = corpus.stdlib_dataset(
        d.cache_dir, vocab_size=cfg.model.vocab_size, seq_len=d.seq_len,
        max_bytes=int(d.max_corpus_mb * 2**20), val_fraction=d.val_fraction,
    )
    return records.open_split(directory, records.read_manifest(directory, "text"), "train")


def image_source(root: Path, size: int, count: int = 512):
    rng = np.random.default_rng(0)
    for i in range(count):
        (root / "raw" / str(i % 10)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size + 8, size + 4, 3), dtype=np.uint8)).save(root / "raw" / str(i % 10) / f"{i}.png")
    manifest = prepare.prepare_images([str(root / "raw")], str(root / "prepared"), val_fraction=0.0)
    return records.open_split(root / "prepared", manifest, "train")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--image-batch", type=int, default=64)
    idle.add_flag(parser)
    args = parser.parse_args()
    idle.check(args.any_load)
    cfg = config_lib.load(config_lib.preset_path("llm", "smoke"))
    batch, seq = cfg.train.global_batch, cfg.data.seq_len
    source = text_source(cfg)
    for workers in args.workers:
        it = pipeline.text_rows(source, seq_len=seq, global_batch=batch, rows=range(batch), seed=0, workers=workers)
        print(f"text   workers={workers}: {rate(it, args.batches, batch * seq):>12,.0f} tokens/s  (batch {batch} x {seq})")
    with tempfile.TemporaryDirectory() as tmp:
        source = image_source(Path(tmp), args.image_size)
        for workers in args.workers:
            it = pipeline.image_rows(source, size=args.image_size, channels=3, global_batch=args.image_batch,
                                     rows=range(args.image_batch), seed=0, workers=workers)
            print(f"images workers={workers}: {rate(it, args.batches // 4, args.image_batch):>12,.0f} images/s "
                  f"(batch {args.image_batch} x {args.image_size}x{args.image_size}x3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
