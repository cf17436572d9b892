"""Does reading the dataset in place from gs:// slow the step loop? The smoke run reading its
prepared corpus from local disk, then from a GCS emulator behind a proxy that delays every request,
each twice; the step time and the loop's wait for input (data_wait_s) of each.

    python benchmarks/input_gcs.py [--delay-s 0.1] [--steps 200] [key=value ...]

Step time is the median (and mean) of the logged rows' step_time_s after the first two; data_wait_s
is summed over the first row (the first batches) and over the others. Run it on an idle machine (it refuses a 1-minute load above 0.5 without --any-load).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from checkpoint_io import start_emulator  # noqa: E402
from output_gcs import delayed_gcs_args, delaying_proxy  # noqa: E402

from pretrain import config as config_lib  # noqa: E402


def smoke_dataset(overrides: list[str]) -> Path:
    """The smoke run's prepared stdlib corpus (built on first use, as `pretrain smoke llm` does)."""
    from data import corpus

    cfg = config_lib.load(config_lib.preset_path("llm", "smoke"), overrides)
    d = cfg.data
    return corpus.stdlib_dataset(d.cache_dir, vocab_size=cfg.model.vocab_size, seq_len=d.seq_len,
                                 max_bytes=int(d.max_corpus_mb * 2**20), val_fraction=d.val_fraction)


def upload(directory: Path, bucket: str, prefix: str):
    from google.cloud import storage

    target = storage.Client().bucket(bucket)
    for path in directory.iterdir():
        target.blob(f"{prefix}/{path.name}").upload_from_filename(str(path))


def train(source: str, out: str, env: dict, overrides: list[str]) -> tuple[float, float, float, float]:
    """(median and mean step time after the first two rows, the loop's wait for input in the first
    row (the first batches: shard indexes, the lanes' first windows) and in all the others) of one
    smoke run."""
    command = [sys.executable, "-m", "pretrain", "smoke", "llm", *overrides, f"data.source={source}",
               f"run.output_dir={out}", "train.log_every=5", "train.eval_every=0"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    rows = [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    times = [r["step_time_s"] for r in rows[2:]]
    return statistics.median(times), statistics.mean(times), rows[0]["data_wait_s"], sum(r["data_wait_s"] for r in rows[1:])


def main() -> int:
    args = delayed_gcs_args(__doc__, delay_s=0.1)
    overrides = [f"run.steps={args.steps}", *args.overrides]
    local = smoke_dataset(overrides)
    server = start_emulator()
    upload(local, "bench", "data")
    proxy = delaying_proxy(server.url, args.delay_s)
    env = dict(os.environ, STORAGE_EMULATOR_HOST=proxy, TENSORSTORE_GCS_HTTP_URL=proxy)
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in (1, 2):
            for i, (where, source) in enumerate((("local disk", str(local)),
                                                 (f"gs:// +{args.delay_s * 1000:.0f} ms", "gs://bench/data"))):
                median, mean, first, later = train(source, f"{tmp}/{attempt}-{i}", env, overrides)
                print(f"run {attempt}, data on {where:<14}: {1000 * median:7.1f} ms/step median, {1000 * mean:7.1f} mean; "
                      f"waited for input {first:.2f} s before the first row, {later:.2f} s after", flush=True)
    print(f"1-minute load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
