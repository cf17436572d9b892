"""run.wandb: the log rows and the resolved config in Weights & Biases (offline here: no network),
the same W&B run continued by a resumed run, and a failing W&B client that never stops the run."""

import json
import struct
from pathlib import Path

import pytest

from pretrain import cli

from conftest import TINY
from test_trainer import SMOKE

RUN = ["train", SMOKE, *TINY, "train.log_every=1", "train.eval_every=0", "run.wandb.mode=offline",
       "run.wandb.project=tests"]


def records(path: Path):
    """The protobuf Records of an offline W&B run file: W&B's 7-byte header, then a LevelDB log
    (32 KiB blocks of [crc32, length, kind] chunks; kind 1 a whole record, 2-4 its first, middle
    and last part). W&B writes it from its Go core and ships no Python reader."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, parts = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        parts, pos = parts + data[pos + header:pos + header + length], pos + header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def history(run_dir: Path) -> dict[int, dict]:
    """Each W&B step's row in an offline run directory, without W&B's own keys."""
    (path,) = run_dir.glob("*.wandb")
    rows = [r.history for r in records(path) if r.WhichOneof("record_type") == "history"]
    key = lambda item: item.key or "/".join(item.nested_key)
    return {h.step.num: {key(i): json.loads(i.value_json) for i in h.item if not key(i).startswith("_")} for h in rows}


def logged(out: Path, steps) -> dict[int, dict]:
    """metrics.jsonl's rows at `steps`, a step's rows (train, eval) merged as W&B merges them."""
    merged = {}
    for row in map(json.loads, (out / "metrics.jsonl").open()):
        if row["step"] in steps:
            merged.setdefault(row.pop("step"), {}).update(row)
    return merged


def test_an_offline_run_logs_its_rows_and_a_resumed_run_continues_it(tmp_path):
    out = tmp_path / "run"
    assert cli.main([*RUN, "run.steps=3", f"run.output_dir={out}"]) == 0
    run_id = (out / "wandb_run_id").read_text()
    (first,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    assert history(first) == logged(out, range(1, 4))  # row for row, value for value
    assert b"global_batch" in next(first.glob("*.wandb")).read_bytes()  # the resolved config
    assert cli.main([*RUN, "run.steps=5", f"run.output_dir={out}"]) == 0
    assert (out / "wandb_run_id").read_text() == run_id
    starts = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))  # the resumed start logs to the same run
    assert len(starts) == 2 and history(starts[1]) == logged(out, range(4, 6))


def test_a_failing_wandb_is_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")

    def refuse(**kwargs):
        raise wandb.errors.CommError("could not reach api.wandb.ai")

    monkeypatch.setattr(wandb, "init", refuse)
    assert cli.main([*RUN, "run.steps=3", f"run.output_dir={tmp_path / 'run'}"]) == 0
    err = capsys.readouterr().err
    assert "warning: W&B stopped logging (could not reach api.wandb.ai); the run goes on" in err
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4  # 3 steps and the final eval
