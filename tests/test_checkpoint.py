"""Checkpoints: exact resume, preemption, kills mid-save, another mesh, GCS, refusing foreign run dirs."""

import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
from urllib.request import Request, urlopen

import jax
import numpy as np
import pytest

from data import corpus
from pretrain import cli
from pretrain.run import checkpoint, goodput, outputs
from pretrain.train import loop
from pretrain.build import build

from conftest import REAL_DATA, ROOT, TINY, tiny_config
from test_trainer import SMOKE

STEPS = 60
RUN = [*TINY, *REAL_DATA, f"run.steps={STEPS}", "train.log_every=1", "train.eval_every=0",
       "checkpoint.every=20", "checkpoint.keep=0"]


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def tree_digest(path) -> str:
    """A hash of every file name and content under path: proof that nothing changed."""
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        digest.update(str(p.relative_to(path)).encode() + (p.read_bytes() if p.is_file() else b""))
    return digest.hexdigest()


def resumable_copy(reference, tmp_path, keep_up_to: int):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for step in checkpoint.committed_steps(out / "checkpoints"):
        if step > keep_up_to:
            shutil.rmtree(out / "checkpoints" / str(step))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run on real text with checkpoints at 20, 40 and 60."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(["train", SMOKE, *RUN, f"run.output_dir={out}"]) == 0
    assert checkpoint.committed_steps(out / "checkpoints") == [20, 40, 60]
    return out


def test_resume_equals_uninterrupted_bitwise(reference, tmp_path, capsys):
    out = resumable_copy(reference, tmp_path, keep_up_to=20)
    assert cli.main(["train", SMOKE, *RUN, f"run.output_dir={out}"]) == 0
    assert "resumed from step 20" in capsys.readouterr().out
    # Bitwise: same parameters, optimizer state and data position as the run that never stopped.
    assert losses(out) == losses(reference) and len(losses(out)) == STEPS


def start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "pretrain", "train", SMOKE, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def signal_at_step(proc, step: int, signum) -> str:
    """Read the run's log until it reports `step`, then send `signum`; returns all it printed."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {step:>2}/"):
            proc.send_signal(signum)
            break
    lines += proc.stdout.readlines()
    proc.wait(timeout=120)
    return "".join(lines)


def test_sigterm_saves_exits_75_and_resumes_exactly(reference, tmp_path):
    out, step = tmp_path / "run", random.randint(3, 30)
    proc = start([*RUN, "checkpoint.every=0", f"run.output_dir={out}"])
    printed = signal_at_step(proc, step, signal.SIGTERM)
    assert proc.returncode == 75, printed[-2000:]  # preempted, checkpoint committed: a launcher retries
    assert re.search(r"preempted: checkpoint \d+ committed [\d.]+ s after the notice", printed), printed[-2000:]
    (saved,) = checkpoint.committed_steps(out / "checkpoints")
    assert step <= saved < STEPS, (step, saved)
    assert cli.main(["train", SMOKE, *RUN, "checkpoint.every=0", f"run.output_dir={out}"]) == 0
    assert losses(out) == losses(reference), f"SIGTERM at step {step}"


def test_a_retry_after_sigkill_resumes_from_the_last_committed_save(reference, tmp_path, capsys):
    """A launcher's retry: the same command, checkpoint.overwrite=true and run.launch_id included.
    Its first start clears an earlier launch's run; the retry resumes and never clears."""
    out, step = resumable_copy(reference, tmp_path, keep_up_to=60), random.randint(5, 30)
    command = [*RUN, "checkpoint.every=1", "checkpoint.keep=2", "checkpoint.overwrite=true", "run.launch_id=L1",
               f"run.output_dir={out}"]
    proc = start(command)  # a save is always in flight
    signal_at_step(proc, step, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    committed = checkpoint.committed_steps(out / "checkpoints")
    assert committed and committed[-1] < STEPS, "the earlier launch's run was cleared, this one's saves committed"
    # Whatever the kill interrupted, plus a partial save planted for certain, must be ignored.
    partial = out / "checkpoints" / f"{committed[-1] + 1}.orbax-checkpoint-tmp-1"
    shutil.copytree(out / "checkpoints" / str(committed[-1]) / "params", partial / "params", dirs_exist_ok=True)
    (killed,) = goodput.read_attempts(out)
    recorded = max(r["last"] for r in killed if r["kind"] == "steps")
    assert cli.main(["train", SMOKE, *command]) == 0
    assert f"resumed from step {committed[-1]}" in capsys.readouterr().out
    assert not partial.exists()
    assert losses(out) == losses(reference), f"SIGKILL at step {step}"
    # The goodput report counts exactly the steps after the resumed checkpoint as lost, and its
    # parts cover the wall time from the first start to the end.
    assert cli.main(["goodput", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    # (the kill may land between step `step`'s printed row and its record)
    assert recorded >= step - 1 and r["steps_lost"] == recorded - committed[-1] and r["attempts"] == 2
    assert sum(r["parts"].values()) == pytest.approx(r["wall_s"], abs=1e-6) and 0 < r["goodput"] < 1
    assert r["parts"]["lost"] > 0 and r["parts"]["between_attempts"] > 0 and r["parts"]["compile"] > 0


@pytest.mark.parametrize("shape", [(4, 2), (2, 2)], ids=["mesh 4x2", "4 devices"])
def test_restore_onto_another_mesh(reference, tmp_path, shape):
    out = resumable_copy(reference, tmp_path, keep_up_to=40)
    cfg = tiny_config(*RUN, f"mesh.data={shape[0]}", f"mesh.model={shape[1]}", f"run.output_dir={out}")
    train_step = build(cfg, jax.devices()[: shape[0] * shape[1]])
    train_step.task.open_data(shape[1])
    result = loop.fit(train_step, checkpoint.starting_point(cfg))
    for array, want in zip(jax.tree.leaves(result["state"]), jax.tree.leaves(train_step.state_shardings)):
        assert array.sharding.is_equivalent_to(want, array.ndim)  # restored straight into the new layout
    got, expected = losses(out), losses(reference)
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[s] for s in range(41, STEPS + 1)], [expected[s] for s in range(41, STEPS + 1)], rtol=2e-5)


FOREIGN = {
    "another model": (["model.num_layers=3"], "holds a model with model.num_layers=2"),
    "another run": (["run.name=other"], "holds run 'smoke-llm' .*not 'other'"),
    "no such step": (["checkpoint.resume_from=7"], r"checkpoint.resume_from=7: no such step .*\[20, 40, 60\]"),
    "earlier step": (["checkpoint.resume_from=20"], r"later steps \[40, 60\] exist"),
}


@pytest.mark.parametrize("overrides, message", FOREIGN.values(), ids=FOREIGN.keys())
def test_a_foreign_output_dir_is_refused_and_untouched(reference, overrides, message, capsys):
    before = tree_digest(reference)
    assert cli.main(["train", SMOKE, *RUN, *overrides, f"run.output_dir={reference}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert tree_digest(reference) == before


def test_overwrite_replaces_and_resume_from_starts_from_other_params(reference, tmp_path, capsys):
    out = resumable_copy(reference, tmp_path, keep_up_to=STEPS)
    short = ["run.steps=4", "checkpoint.every=0"]
    assert cli.main(["train", SMOKE, *RUN, *short, "model.num_layers=3", "checkpoint.overwrite=true", f"run.output_dir={out}"]) == 0
    assert checkpoint.committed_steps(out / "checkpoints") == [4] and sorted(losses(out)) == [1, 2, 3, 4]
    # A new run that starts from the reference's step-60 weights (with a fresh optimizer): its first
    # loss is far below a fresh model's. test_export checks that the weights arrive bit for bit.
    warm = tmp_path / "warm"
    assert cli.main(["train", SMOKE, *RUN, *short, f"checkpoint.resume_from={reference}", f"run.output_dir={warm}"]) == 0
    assert f"starting from the parameters in {reference}" in capsys.readouterr().out
    assert losses(warm)[1] < losses(reference)[1] - 1.0


def gs_get(env, name) -> bytes:
    return urlopen(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/test-bucket/o/{name.replace('/', '%2F')}?alt=media").read()


def gs_put(env, name, content: bytes):
    urlopen(Request(f"{env['STORAGE_EMULATOR_HOST']}/upload/storage/v1/b/test-bucket/o?uploadType=media&name={name}",
                    data=content, method="POST")).read()


def gs_ls(env, prefix):
    listing = json.load(urlopen(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/test-bucket/o?prefix={prefix}"))
    return {item["name"] for item in listing.get("items", [])}


def test_the_run_files_mirror_sends_only_new_bytes(gcs, tmp_path, monkeypatch):
    for key in ("STORAGE_EMULATOR_HOST", "NO_GCE_CHECK"):
        monkeypatch.setenv(key, gcs[key])
    local = tmp_path / "local"
    (local / "tensorboard").mkdir(parents=True)
    mirror = outputs.Mirror(local, "gs://test-bucket/mirrored/", every_s=3600)
    events, metrics = local / "tensorboard" / "events", local / "metrics.jsonl"
    events.write_bytes(b"first")
    metrics.write_text("row 1\n")
    mirror.sync()
    with events.open("ab") as f:
        f.write(b" second")
    mirror.sync()
    mirror.sync()  # nothing new: nothing sent
    assert gs_get(gcs, "mirrored/tensorboard/events") == b"first second"
    assert mirror.bytes_sent == len("first" "row 1\n" " second")  # the new bytes only, composed on
    assert gs_ls(gcs, "mirrored/") == {"mirrored/tensorboard/events", "mirrored/metrics.jsonl"}
    tmp = local / "metrics.tmp"  # written anew (another inode): sent whole
    tmp.write_text("row 0\n")
    tmp.replace(metrics)
    mirror.close()
    assert gs_get(gcs, "mirrored/metrics.jsonl") == b"row 0\n"
    # A resumed run's mirror starts from what the bucket has.
    (tmp_path / "again").mkdir()
    again = outputs.Mirror(tmp_path / "again", "gs://test-bucket/mirrored", every_s=3600)
    assert (tmp_path / "again" / "metrics.jsonl").read_text() == "row 0\n"
    again.close()


def test_a_local_output_dir_is_written_in_place_and_kept(tmp_path):
    out = tmp_path / "pretrain-run-mine"  # named like the staging dirs of gs:// runs, which are removed at close
    files = outputs.RunFiles(str(out))
    assert files.local == out
    out.mkdir()
    (out / "metrics.jsonl").write_text("row\n")
    files.close()
    assert (out / "metrics.jsonl").read_text() == "row\n"


def test_a_preempted_run_on_gcs_leaves_every_row_and_its_trace_there(gcs):
    run = [*TINY, "run.steps=40", "train.log_every=1", "train.profile_steps=[2,3]", "run.output_dir=gs://test-bucket/prof"]
    proc = start(run, env=gcs)
    printed = signal_at_step(proc, 8, signal.SIGTERM)
    assert proc.returncode == 75, printed[-2000:]
    rows = [json.loads(line) for line in gs_get(gcs, "prof/metrics.jsonl").decode().splitlines()]
    logged = [int(m) for m in re.findall(r"^step +(\d+)/40 \| loss", printed, re.M)]
    assert [r["step"] for r in rows] == logged and logged[-1] >= 8
    traces = [n for n in gs_ls(gcs, "prof/profile/") if n.endswith(".xplane.pb")]
    assert len(traces) == 1, gs_ls(gcs, "prof/")
    assert b"jit_train_step" in gs_get(gcs, traces[0])
    assert any(n.startswith("prof/goodput/") for n in gs_ls(gcs, "prof/"))


def test_the_whole_cycle_on_gcs(gcs, tmp_path):
    """Prepare a dataset into the bucket, train from it (read in place) into the bucket, get killed, resume
    from the bucket: the losses equal a run on a local copy of the dataset, and no shard was copied."""
    text = tmp_path / "text"
    text.mkdir()
    for f in corpus.stdlib_files(300_000):
        shutil.copy(f, text / f.name)
    data = "gs://test-bucket/data"
    prep = subprocess.run(
        [sys.executable, "-m", "pretrain", "prepare", "text", "--input", str(text), "--out", data,
         "--vocab-size", "512", "--seq-len", "16", "--workers", "1"],
        cwd=ROOT, env=gcs, capture_output=True, text=True, timeout=300,
    )
    assert prep.returncode == 0, prep.stderr[-2000:]
    assert {"data/manifest.json", "data/tokenizer.model"} <= gs_ls(gcs, "data/")
    # Inputs can come from the bucket too.
    files = sorted(text.iterdir())[:2]
    for f in files:
        gs_put(gcs, f"text/{f.name}", f.read_bytes())
    (tmp_path / "sp.model").write_bytes(gs_get(gcs, "data/tokenizer.model"))
    from_gcs = subprocess.run(
        [sys.executable, "-m", "pretrain", "prepare", "text", "--input", "gs://test-bucket/text/*.py", "--out",
         str(tmp_path / "from-bucket"), "--tokenizer", str(tmp_path / "sp.model"), "--workers", "1"],
        cwd=ROOT, env=gcs, capture_output=True, text=True, timeout=300,
    )
    assert from_gcs.returncode == 0, from_gcs.stderr[-2000:]
    assert json.loads((tmp_path / "from-bucket" / "manifest.json").read_text())["input_files"] == 2
    run = [*TINY, "model.vocab_size=512", f"data.source={data}", f"data.cache_dir={tmp_path / 'cache'}",
           f"run.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "checkpoint.every=5", "run.output_dir=gs://test-bucket/run"]
    proc = start(run, env=gcs)
    printed = signal_at_step(proc, random.randint(20, 45), signal.SIGKILL)  # after some saves committed
    assert proc.returncode == -signal.SIGKILL, printed[-2000:]
    resumed = subprocess.run([sys.executable, "-m", "pretrain", "train", SMOKE, *run], cwd=ROOT, env=gcs,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stdout
    names = gs_ls(gcs, "run/")
    assert {"run/config.yaml", "run/metrics.jsonl", f"run/checkpoints/{STEPS}/commit_success.txt"} <= names
    assert any(n.startswith("run/tensorboard/") for n in names)
    assert not list((tmp_path / "cache").rglob("*")), "a gs:// dataset is read in place, never copied"
    # The resumed run's losses equal an uninterrupted local run on a local copy of the data.
    copy = tmp_path / "data-copy"
    copy.mkdir()
    for name in gs_ls(gcs, "data/"):
        (copy / name.removeprefix("data/")).write_bytes(gs_get(gcs, name))
    local = tmp_path / "local"
    assert cli.main(["train", SMOKE, *run[:-1], f"data.source={copy}", f"run.output_dir={local}"]) == 0
    (tmp_path / "from-gcs").mkdir()
    (tmp_path / "from-gcs" / "metrics.jsonl").write_bytes(gs_get(gcs, "run/metrics.jsonl"))
    assert losses(tmp_path / "from-gcs") == losses(local)
