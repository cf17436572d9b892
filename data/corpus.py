"""The embedded default corpus: the Python standard library's own sources.

Every machine with Python has it, so the smoke run needs no download. Each file is a
document. It is prepared like any other text (data/prepare/: tokenizer, dedupe,
content-hash train/validation split, ArrayRecord shards) once per setting, into the
cache directory.
"""

import fcntl
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

from data import tokenizer
from data.prepare.local import prepare_text
from data.records import MANIFEST


def stdlib_files(max_bytes: int) -> list[Path]:
    """UTF-8 .py files of the standard library (tests and vendored code left out), up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts) & skip:
            continue
        try:
            size = len(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        files.append(path)
        total += size
        if total >= max_bytes:
            break
    return files


def stdlib_dataset(cache_dir: str, *, vocab_size: int, seq_len: int, max_bytes: int, val_fraction: float) -> Path:
    """The prepared directory for these settings, built on first use (by one process at a time: the
    processes of a multi-process run on one machine share the cache)."""
    files = stdlib_files(max_bytes)
    key = json.dumps([sys.version, tokenizer.VERSION, vocab_size, seq_len, val_fraction, [(f.name, f.stat().st_size) for f in files]])
    out = Path(cache_dir).expanduser() / "datasets" / f"stdlib-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MANIFEST).exists():
            prepare_text(
                [str(f) for f in files], str(out), vocab_size=vocab_size, seq_len=seq_len,
                val_fraction=val_fraction, overwrite=out.exists(),  # only an incomplete one is replaced
            )
    return out
