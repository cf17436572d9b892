"""Output directories written whole or not at all: built in a staging directory and only moved into
place (or uploaded, for gs://, with a marker file last) once complete, so a crash never leaves a
half directory that looks whole, and an existing one is replaced only with overwrite=True."""

import contextlib
import os
import pathlib
import shutil
import tempfile

from etils import epath

from data.records import MANIFEST, DataError


def check_output(out: epath.Path, overwrite: bool):
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"output directory {out} is not empty; pass --overwrite to replace it, or choose another --out")


@contextlib.contextmanager
def staged(out: epath.Path, overwrite: bool, last: str = MANIFEST):
    """A local directory to build an output in; moved or uploaded to `out` only on success, the
    file `last` uploaded last so that its presence marks a complete directory."""
    check_output(out, overwrite)
    remote = str(out).startswith("gs://")
    if remote:
        stage = epath.Path(tempfile.mkdtemp(prefix="pretrain-prepare-"))
    else:
        stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
        stage.mkdir(parents=True, exist_ok=True)
    try:
        yield stage
        if out.exists():
            out.rmtree()
        if remote:
            files = sorted(str(p.relative_to(stage)) for p in pathlib.Path(stage).rglob("*") if p.is_file())
            for name in sorted(files, key=lambda n: n == last):
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (stage / name).copy(out / name)
        else:
            stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


@contextlib.contextmanager
def in_place(out: epath.Path, overwrite: bool, last: str = MANIFEST):
    """`out` itself (gs://), for workers on other machines to write into, where no staging
    directory on this one can serve them: an old output goes first, its `last` file before the
    rest, so that no state of `out` looks complete until the new `last` is written; a failure
    removes what was written."""
    check_output(out, overwrite)
    if out.exists():
        (out / last).unlink(missing_ok=True)
        out.rmtree()
    try:
        yield out
    except BaseException:
        if out.exists():
            out.rmtree()
        raise
