"""The cloud launchers without a cloud: pretrain/tpu/kinds.py's table, launch/tpu_vm.sh (its dry run, and
its retry loop against a stand-in gcloud), and launch/gke.py's JobSets, checked against the
vendored JobSet schema and fed to JAX's own GKE TPU detection."""

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest
import yaml
from jax._src.clusters import cloud_tpu_cluster

from pretrain.tpu import kinds

from conftest import ROOT

sys.path.insert(0, str(ROOT / "launch"))
import gke  # noqa: E402

TPU_VM = str(ROOT / "launch" / "tpu_vm.sh")
TRAIN = ["train", "configs/llm/8b.yaml", "run.output_dir=gs://bucket/runs/8b"]
# what the workers run: JAX's cluster detection and the launch's id first, so that the user's
# overrides can change them
REMOTE_TRAIN = ["train", "configs/llm/8b.yaml", "runtime.distributed=auto", "run.launch_id=ID",
                "run.output_dir=gs://bucket/runs/8b"]
LAUNCH_ID = re.compile(r"run\.launch_id=(\d{8}-\d{6}-[0-9a-f]{6})")


def launch_ids(text: str) -> tuple[str, set]:
    """`text` with each run.launch_id=... as run.launch_id=ID, and the ids found."""
    return LAUNCH_ID.sub("run.launch_id=ID", text), set(LAUNCH_ID.findall(text))


@pytest.mark.parametrize("name, chips, vms, chips_per_vm, topology, cloud_name", [
    ("v5p-64", 32, 8, 4, "2x4x4", "v5p-64"),
    ("v6e-16", 16, 4, 4, "4x4", "v6e-16"),
    ("v5e-256", 256, 64, 4, "16x16", "v5litepod-256"),
    ("v5litepod-256", 256, 64, 4, "16x16", "v5litepod-256"),
    ("v5p-8", 4, 1, 4, "2x2x1", "v5p-8"),
    ("v5e-8", 8, 1, 8, "2x4", "v5litepod-8"),
    ("v4-32", 16, 4, 4, "2x2x4", "v4-32"),
])
def test_tpu_table(name, chips, vms, chips_per_vm, topology, cloud_name):
    s = kinds.parse(name)
    assert (s.chips, s.vms, s.chips_per_vm, s.topology, s.cloud_accelerator_type) == (
        chips, vms, chips_per_vm, topology, cloud_name)


@pytest.mark.parametrize("name, nearest", [("v5p-63", "v5p-64"), ("v5e-12", "v5e-128"), ("v6e-3", "v6e-32")])
def test_unknown_accelerator_suggests_the_nearest(name, nearest):
    with pytest.raises(kinds.TpuError, match=f"did you mean '{nearest}'"):
        kinds.parse(name)


# --- launch/tpu_vm.sh ------------------------------------------------------------------------

FAKE_GCLOUD = """\
#!{python}
# Stands in for gcloud: logs each call; `describe` answers the next of states.txt (READY when
# none are left); the start on all workers answers the next of outcomes.txt for each worker.
import json, os, sys
d = os.environ["FAKE_DIR"]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
def pop(name, default):
    path = os.path.join(d, name)
    lines = open(path).read().split() if os.path.exists(path) else []
    open(path, "w").write("\\n".join(lines[1:]))
    return lines[0] if lines else default
if "describe" in sys.argv:
    print(pop("states.txt", "READY"))
elif "ssh" in sys.argv and "pretrain exit code" in sys.argv[sys.argv.index("--command") + 1]:
    outcome = pop("outcomes.txt", "0")
    if outcome == "lost":
        sys.exit(255)
    for worker in range(int(os.environ["FAKE_WORKERS"])):
        print(f"pretrain exit code {{outcome}} on worker-{{worker}}")
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    """An environment whose gcloud is the stand-in above; calls() lists what it was asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path), PYTHON=sys.executable,
               TMPDIR=str(tmp_path))

    def calls():
        path = tmp_path / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return env, calls


def tpu_vm(env, *args):
    return subprocess.run([TPU_VM, *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)


def gcloud_lines(stdout):
    """The gcloud commands a dry run shows, each from its '+ ' to the next (remote scripts span lines)."""
    return [c.strip() for c in re.split(r"^\+ ", stdout, flags=re.M) if c.startswith("gcloud ")]


def test_tpu_vm_dry_run_v5p_64(fake_gcloud):
    env, calls = fake_gcloud
    r = tpu_vm(env, "run", "--dry-run", "--name", "n", "--zone", "us-east5-a", "--accelerator-type", "v5p-64",
               "--repo", "https://example.com/pretrain.git", "--", *TRAIN)
    assert r.returncode == 0, r.stderr
    assert calls() == []  # a dry run runs nothing
    assert "v5p-64: 32 chips in a 2x4x4 torus, 8 VMs of 4 chips, runtime v2-alpha-tpuv5" in r.stdout
    lines = gcloud_lines(r.stdout)
    assert lines[0] == "gcloud compute tpus tpu-vm describe n '--format=value(state)' --zone us-east5-a"
    assert lines[1] == ("gcloud compute tpus tpu-vm create n --accelerator-type v5p-64 --version v2-alpha-tpuv5 "
                        "--zone us-east5-a")
    setup, start = lines[2:]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for line in (setup, start):
        assert line.startswith("gcloud compute tpus tpu-vm ssh n --worker=all --command ")
    clone = f"git clone -q https://example.com/pretrain.git ~/pretrain && git -C ~/pretrain checkout -q {commit}"
    assert clone in setup
    assert "pip install -q -e \".[tpu]\"" in setup
    assert "sudo lsof -t /dev/accel* /dev/vfio/[0-9]*" in start and "sudo kill -9 $pids" in start
    assert "sudo rm -f /tmp/libtpu_lockfile" in start
    command, ids = launch_ids(start)
    assert f"~/pretrain-venv/bin/python -m pretrain {shlex.join(REMOTE_TRAIN)} >" in command and len(ids) == 1
    assert start.index("libtpu_lockfile") < start.index("-m pretrain")


def test_tpu_vm_dry_run_v6e_16_queued_spot_tarball(fake_gcloud):
    env, calls = fake_gcloud
    r = tpu_vm(env, "run", "--dry-run", "--queued", "--spot", "--name", "q", "--accelerator-type", "v6e-16",
               "--tarball", "gs://bucket/code/", "--", *TRAIN)
    assert r.returncode == 0, r.stderr
    assert calls() == []
    assert "v6e-16: 16 chips in a 4x4 torus, 4 VMs of 4 chips, runtime v2-alpha-tpuv6e" in r.stdout
    lines = gcloud_lines(r.stdout)
    assert lines[0] == "gcloud compute tpus queued-resources describe q '--format=value(state.state)'"
    assert lines[1] == ("gcloud compute tpus queued-resources create q --node-id q --accelerator-type v6e-16 "
                        "--runtime-version v2-alpha-tpuv6e --spot")
    assert re.search(r"^\+ git archive --format=tar.gz \w+ \| gcloud storage cp - gs://bucket/code/q-\w+\.tar\.gz$",
                     r.stdout, re.M)
    assert re.search(r"gcloud storage cat gs://bucket/code/q-\w+\.tar\.gz \| tar -xz -C ~/pretrain", lines[-2])
    assert lines[-1].startswith("gcloud compute tpus tpu-vm ssh q --worker=all --command ")


def test_tpu_vm_dry_run_v5e_256_create_reserved(fake_gcloud):
    env, calls = fake_gcloud
    r = tpu_vm(env, "create", "--dry-run", "--reserved", "--name", "big", "--accelerator-type", "v5e-256",
               "--project", "p", "--runtime-version", "v2-alpha-tpuv5-lite-custom")
    assert r.returncode == 0, r.stderr
    assert calls() == []
    assert "v5litepod-256: 256 chips in a 16x16 torus, 64 VMs of 4 chips" in r.stdout
    assert gcloud_lines(r.stdout) == ["gcloud compute tpus tpu-vm create big --accelerator-type v5litepod-256 "
                                      "--version v2-alpha-tpuv5-lite-custom --reserved --project p"]


@pytest.mark.parametrize("command, expected", [
    (["logs", "--worker", "3"], "--worker=3 --command 'tail -n 200 -f ~/pretrain-run/train.log'"),
    (["stop"], "--worker=all --command 'kill -TERM \"$(cat ~/pretrain-run/pid)\"'"),
    (["delete"], "gcloud compute tpus tpu-vm delete n --quiet"),
    (["delete", "--queued"], "gcloud compute tpus queued-resources delete n --force --quiet"),
])
def test_tpu_vm_dry_run_other_commands(fake_gcloud, command, expected):
    env, calls = fake_gcloud
    r = tpu_vm(env, *command, "--name", "n", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert calls() == [] and expected in r.stdout


@pytest.mark.parametrize("states, outcomes, retries, rc, starts, recreated", [
    # a stuck step (exit 3), an error, an abort (a peer died), a preemption (SIGTERM, checkpoint
    # committed, exit 75): each is started again on the same VMs, until the run finishes
    ([], ["3", "1", "134", "75", "0"], 4, 0, 5, False),
    (["READY", "PREEMPTED"], ["lost", "0"], 1, 0, 2, True),  # the slice went away: created again
    ([], ["3"], 0, 3, 1, False),  # no retries left
    ([], ["2"], 5, 2, 1, False),  # bad input: starting again would not help
    ([], ["4"], 5, 4, 1, False),  # steps no longer finite: a retry would diverge again
])
def test_tpu_vm_run_retries(fake_gcloud, tmp_path, states, outcomes, retries, rc, starts, recreated):
    env, calls = fake_gcloud
    (tmp_path / "states.txt").write_text("\n".join(states))
    (tmp_path / "outcomes.txt").write_text("\n".join(outcomes))
    r = tpu_vm(dict(env, FAKE_WORKERS="8"), "run", "--name", "n", "--accelerator-type", "v5p-64", "--retries",
               str(retries), "--repo", "https://example.com/pretrain.git", "--", *TRAIN)
    assert r.returncode == rc, r.stderr
    made = [c for c in calls() if c[:4] == ["compute", "tpus", "tpu-vm", "create"]]
    started = [c for c in calls() if "ssh" in c and "pretrain exit code" in c[c.index("--command") + 1]]
    assert len(started) == starts
    # every start is the same launch: a retry resumes what checkpoint.overwrite=true began
    assert len(launch_ids(json.dumps(started))[1]) == 1
    assert len(made) == (1 if recreated else 0)
    assert any(c[:4] == ["compute", "tpus", "tpu-vm", "delete"] for c in calls()) == recreated


@pytest.mark.parametrize("args, message", [
    (["run", "--name", "n", "--accelerator-type", "v5p-63", "--", *TRAIN], "did you mean 'v5p-64'"),
    (["run", "--accelerator-type", "v5p-64", "--", *TRAIN], "--name NAME is required"),
    (["launch", "--name", "n"], "unknown command 'launch'"),
    (["run", "--name", "n", "--accelerator-type", "v5p-64"], "run needs the pretrain arguments after --"),
    (["run", "--name", "n", "--accelerator-type", "v5p-64", "--", "train", "configs/llm/8b.yaml"],
     "set run.output_dir=gs://"),
    (["create", "--name", "n", "--accelerator-type", "v5p-64", "--spot", "--reserved"], "exclude each other"),
    (["run", "--name", "n", "--bogus"], "unknown option --bogus"),
])
def test_tpu_vm_bad_input_exits_2_with_one_line(fake_gcloud, args, message):
    env, calls = fake_gcloud
    r = tpu_vm(env, *args)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr
    assert r.stdout == "" and calls() == []


def test_tpu_vm_help(fake_gcloud):
    r = tpu_vm(fake_gcloud[0], "--help")
    assert r.returncode == 0 and "usage: launch/tpu_vm.sh COMMAND" in r.stdout


# --- launch/gke.py ---------------------------------------------------------------------------

def render(capsys, *args):
    rc = gke.main([*args, "--image", "registry/pretrain:1", "--", *TRAIN])
    out = capsys.readouterr()
    assert rc == 0, out.err
    xpk = next(line[2:] for line in out.out.splitlines() if line.startswith("# xpk workload create"))
    return yaml.safe_load(out.out), shlex.split(xpk)


def pod_env(container, slice_id, pod):
    """A pod's environment as Kubernetes makes it: the JobSet and Job annotations for the field
    references, then $(VAR) references to variables defined earlier."""
    annotations = {"jobset.sigs.k8s.io/jobset-name": "js", "jobset.sigs.k8s.io/replicatedjob-name": "slice",
                   "jobset.sigs.k8s.io/job-index": str(slice_id), "batch.kubernetes.io/job-completion-index": str(pod)}
    env = {}
    for var in container["env"]:
        if "valueFrom" in var:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            env[var["name"]] = annotations[re.fullmatch(r"metadata\.annotations\['(.+)'\]", path).group(1)]
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], var["value"])
    return env


@pytest.mark.parametrize("accelerator, slices, vms, chips_per_vm, topology, label, xpk_type", [
    ("v5p-64", 1, 8, 4, "2x4x4", "tpu-v5p-slice", "v5p-64"),
    ("v6e-16", 1, 4, 4, "4x4", "tpu-v6e-slice", "v6e-16"),
    ("v5e-256", 2, 64, 4, "16x16", "tpu-v5-lite-podslice", "v5litepod-256"),
])
def test_gke_jobset(capsys, monkeypatch, accelerator, slices, vms, chips_per_vm, topology, label, xpk_type):
    manifest, xpk = render(capsys, "--accelerator-type", accelerator, "--slices", str(slices), "--name", "js",
                           "--max-restarts", "7")
    assert gke.problems(manifest) == []
    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and manifest["kind"] == "JobSet"
    assert manifest["spec"]["failurePolicy"]["maxRestarts"] == 7
    (rjob,) = manifest["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert rjob["replicas"] == slices
    assert job["parallelism"] == job["completions"] == vms and job["backoffLimit"] == 0
    chips = {"google.com/tpu": chips_per_vm}
    assert container["resources"] == {"limits": chips, "requests": chips}
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": label,
                                   "cloud.google.com/gke-tpu-topology": topology}
    assert (pod["restartPolicy"], pod["hostNetwork"], pod["dnsPolicy"]) == ("Never", True, "ClusterFirstWithHostNet")
    command, ids = launch_ids(shlex.join(container["command"]))
    assert shlex.split(command) == ["python", "-m", "pretrain", *REMOTE_TRAIN] and len(ids) == 1
    rules = job["podFailurePolicy"]["rules"]  # bad input and divergence end the JobSet; 75, 3 and crashes restart it
    assert [(r["action"], r["onExitCodes"]["values"]) for r in rules] == [("FailJob", [2, 4])]

    # JAX's own GKE TPU detection, on each pod's environment, numbers the processes 0..N-1 and
    # puts the coordinator on process 0's host. (What the environment lacks, JAX asks the
    # metadata server of a TPU VM, which has no slice variables on a GKE node.)
    monkeypatch.setattr(cloud_tpu_cluster, "get_tpu_env_value_from_metadata", lambda key: None)
    ids = set()
    for slice_id in range(slices):
        for i in range(vms):
            env = pod_env(container, slice_id, i)
            monkeypatch.setattr(os, "environ", env)
            cluster = cloud_tpu_cluster.GkeTpuCluster
            assert cluster.get_process_count() == slices * vms
            ids.add(cluster.get_process_id())
            hosts = env["TPU_WORKER_HOSTNAMES"].split(",")
            assert hosts[i] == f"js-slice-{slice_id}-{i}.js"  # this pod's own name under JobSet's service
            assert env.get("MEGASCALE_COORDINATOR_ADDRESS", hosts[0]) == "js-slice-0-0.js"
    assert ids == set(range(slices * vms))
    assert ("MEGASCALE_NUM_SLICES" in env) == (slices > 1)

    assert xpk[:3] == ["xpk", "workload", "create"]
    options = dict(zip(xpk[3::2], xpk[4::2]))
    assert options["--tpu-type"] == xpk_type and options["--num-slices"] == str(slices)
    assert options["--workload"] == "js" and options["--docker-image"] == "registry/pretrain:1"
    assert shlex.split(options["--command"]) == container["command"]


def _path(manifest, *keys):
    for k in keys:
        manifest = manifest[k]
    return manifest


POD = ("spec", "replicatedJobs", 0, "template", "spec", "template", "spec")
BREAKAGES = {
    "a wrong type": (lambda m: _path(m, *POD[:5]).update(parallelism="8"), "parallelism: '8' is not of type 'integer'"),
    "an unknown field": (lambda m: _path(m, *POD[:5]).update(paralelism=8), "'paralelism' was unexpected"),
    "a value outside an enum": (lambda m: _path(m, "spec", "failurePolicy", "rules", 0).update(action="Retry"),
                                "'Retry' is not one of"),
    "a missing required field": (lambda m: _path(m, *POD, "containers", 0).pop("name"),
                                 "'name' is a required property"),
    "chips per VM": (lambda m: _path(m, *POD, "containers", 0, "resources", "limits").update({"google.com/tpu": 8}),
                     "limits google.com/tpu is 8, but a v5p-64 VM has 4 chips"),
    "a topology that does not exist": (lambda m: _path(m, *POD, "nodeSelector").update({gke.TOPOLOGY_LABEL: "4x4x4x4"}),
                                       "'4x4x4x4' is not a v5p slice"),
    "pods per slice": (lambda m: _path(m, *POD[:5]).update(parallelism=4, completions=4),
                       "parallelism and completions must be 8"),
    "a pod name over 63 characters": (lambda m: m["metadata"].update(name="x" * 50), "pod name 'xxxx"),
    "the restart policy": (lambda m: _path(m, *POD).update(restartPolicy="OnFailure"), "needs restartPolicy: Never"),
}


@pytest.mark.parametrize("breakage, message", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_gke_check_catches_a_broken_manifest(capsys, tmp_path, breakage, message):
    manifest, _ = render(capsys, "--accelerator-type", "v5p-64", "--name", "js")
    broken = copy.deepcopy(manifest)
    breakage(broken)
    assert any(message in p for p in gke.problems(broken)), gke.problems(broken)
    path = tmp_path / "jobset.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert gke.main(["--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err
    path.write_text(yaml.safe_dump(manifest))
    assert gke.main(["--check", str(path)]) == 0


@pytest.mark.parametrize("args, message", [
    (["--accelerator-type", "v5p-63", "--name", "js", "--image", "i", "--", *TRAIN], "did you mean 'v5p-64'"),
    (["--accelerator-type", "v5p-64", "--image", "i", "--", *TRAIN], "--name required"),
    (["--accelerator-type", "v5p-64", "--name", "js", "--", *TRAIN], "--image required"),
    (["--accelerator-type", "v5p-64", "--name", "Big_Name", "--image", "i", "--", *TRAIN], "is not a DNS label"),
    (["--accelerator-type", "v5p-64", "--name", "js", "--image", "i", "--slices", "0", "--", *TRAIN], "--slices must"),
    (["--accelerator-type", "v5p-64", "--name", "js", "--image", "i", "--", "train", "configs/llm/8b.yaml"],
     "set run.output_dir=gs://"),
    (["--accelerator-type", "v5p-64", "--name", "js", "--image", "i", "--", *TRAIN, "run.stpes=3"],
     "did you mean 'run.steps'"),
    (["--accelerator-type", "v5p-64", "--name", "js", "--image", "i", "--", "smoke"], "must be `train CONFIG"),
    (["--accelerator-type", "v5p-64", "--name", "js", "--image", "i", "--", "train", "/etc/passwd"],
     "is not a file of this repository"),
    (["--check", "/nonexistent/jobset.yaml"], "No such file"),
    (["--slices", "two"], "invalid int value"),
])
def test_gke_bad_input_exits_2_with_one_line(capsys, args, message):
    assert gke.main(args) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1 and message in out.err, out.err


def test_gke_runs_as_a_program():
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "gke.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--accelerator-type" in r.stdout
    assert textwrap.dedent(gke.__doc__).splitlines()[0] in r.stdout
