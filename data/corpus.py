"""The embedded default corpus: the Python standard library's own sources.

Every machine with Python has it, so the smoke run needs no download. Each file is a
document; duplicates are dropped, and the train/validation split is decided by a hash
of the file's path, so it is the same on every machine and every run.
"""

import hashlib
import sysconfig
from pathlib import Path


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts) & set(skip))


def _bucket(name: str) -> float:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def stdlib_documents(max_bytes: int, val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) documents, at most max_bytes of text in all, deterministic."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val, seen, total = [], [], set(), 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        digest = hashlib.sha256(text.encode()).digest()
        if not text.strip() or digest in seen:
            continue
        seen.add(digest)
        name = path.relative_to(root).as_posix()
        (val if _bucket(name) < val_fraction else train).append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return train, val
