"""The run's own files (metrics.jsonl, TensorBoard events, goodput timelines, profiles, samples) on
local disk, and, for a gs:// run.output_dir, copied there by a background thread: the step loop
never waits for GCS except at a checkpoint, where everything logged so far is sent before the
checkpoint that covers it starts.

GCS objects cannot be appended to; a file that grew has only its new bytes sent, composed onto
its object (GCS compose), so nothing that is already there is sent again. A file written anew
(another inode) is sent whole. Checkpoints, config.yaml and the tokenizer are written straight to
run.output_dir by their own writers.
"""

import shutil
import sys
import tempfile
import threading
from pathlib import Path

import jax

MIRROR_EVERY_S = 30.0
MAX_COMPONENTS = 1000  # compose appends before an object is sent whole again (GCS counts components)
# A resumed run keeps its rows up to the checkpoint, and its W&B run (pretrain/metrics/wandb_sink.py).
FETCHED_ON_START = ("metrics.jsonl", "wandb_run_id")


class RunFiles:
    """`local`: where this process writes the run's files. Process 0 mirrors it to a gs:// output dir."""

    def __init__(self, output_dir: str, every_s: float = MIRROR_EVERY_S):
        self.mirror, self.staging = None, str(output_dir).startswith("gs://")
        if not self.staging:
            self.local = Path(output_dir)
            return
        self.local = Path(tempfile.mkdtemp(prefix="pretrain-run-"))
        if jax.process_index() == 0:
            self.mirror = Mirror(self.local, str(output_dir), every_s)

    def sync(self):
        """Send what is new now (blocking)."""
        if self.mirror is not None:
            self.mirror.sync()

    def close(self):
        if self.mirror is not None:
            self.mirror.close()
        if self.staging:  # never the run's own local output dir
            shutil.rmtree(self.local, ignore_errors=True)


class Mirror:
    """Copies the files under `local` to the gs:// prefix `remote`: every `every_s` seconds in a
    thread, and on `sync()`."""

    def __init__(self, local: Path, remote: str, every_s: float):
        from google.cloud import storage  # noqa: PLC0415 - only runs that write to gs:// need it

        bucket, _, prefix = remote.removeprefix("gs://").partition("/")
        self.bucket = storage.Client().bucket(bucket)
        self.local, self.every_s = local, every_s
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.sent = {}  # name -> (inode, bytes sent, components of its object)
        self.bytes_sent = 0
        for name in FETCHED_ON_START:
            self._fetch(name)
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _fetch(self, name: str):
        blob = self.bucket.blob(self.prefix + name)
        if blob.exists():
            path = self.local / name
            blob.download_to_filename(str(path))
            self.sent[name] = (path.stat().st_ino, path.stat().st_size, blob.component_count or 1)

    def _run(self):
        while not self.stopped.wait(self.every_s):
            try:
                self.sync()
            except Exception as e:  # a GCS hiccup must not end the run: the next pass sends it
                print(f"warning: copying the run's files to gs:// failed ({e}); retrying in {self.every_s:g} s",
                      file=sys.stderr, flush=True)

    def sync(self):
        with self.lock:
            for path in sorted(self.local.rglob("*")):
                if path.is_file() and not path.name.endswith(".tmp"):
                    try:
                        self._send(path)
                    except FileNotFoundError:  # removed since listed (a writer's scratch file): nothing to send
                        pass

    def _send(self, path: Path):
        name, stat = path.relative_to(self.local).as_posix(), path.stat()
        inode, sent, components = self.sent.get(name, (None, 0, 0))
        if (stat.st_ino, stat.st_size) == (inode, sent):
            return
        blob = self.bucket.blob(self.prefix + name)
        with path.open("rb") as f:
            if stat.st_ino == inode and stat.st_size > sent and components < MAX_COMPONENTS:
                f.seek(sent)
                tail = self.bucket.blob(self.prefix + name + ".tail")
                tail.upload_from_string(f.read(stat.st_size - sent))
                self.bytes_sent += stat.st_size - sent
                blob.compose([blob, tail])
                tail.delete()
                components += 1
            else:
                blob.upload_from_string(f.read(stat.st_size))
                self.bytes_sent += stat.st_size
                components = 1
        self.sent[name] = (stat.st_ino, stat.st_size, components)

    def close(self):
        """The last pass: everything written is in gs:// when it returns."""
        self.stopped.set()
        self.thread.join()
        self.sync()
