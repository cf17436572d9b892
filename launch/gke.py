#!/usr/bin/env python3
"""Render the JobSet that trains on GKE TPU slices, check it offline, and print it.

    launch/gke.py --accelerator-type v5p-64 --name llm-8b --image IMAGE [--slices 2] \\
        -- train configs/llm/8b.yaml run.output_dir=gs://BUCKET/runs/8b | kubectl apply -f -
    launch/gke.py --check FILE        # check a manifest (a hand-edited one, say) the same way

One replicated job of `--slices` Jobs, one Job per slice with one pod per TPU VM, each pod
running `python -m pretrain train CONFIG runtime.distributed=auto ...` in the image's working
directory
(launch/Dockerfile builds such an image). The pods get the variables that JAX's GKE TPU
detection reads (TPU_WORKER_ID, TPU_WORKER_HOSTNAMES and, for several slices, MEGASCALE_*),
from the indexes JobSet and the Job controller annotate each pod with. GKE's TPU webhook
injects the same TPU_* values; setting them here keeps the manifest complete on its own.

Every manifest printed has passed the JobSet CRD's schema from a pinned release
(schemas/jobset-v0.10.1.json, with unknown fields refused as `kubectl apply` refuses them) and
the checks the schema cannot make: the names JobSet derives must be DNS labels of at most 63
characters, and the TPU labels, chips per VM and pods per slice must make a real slice of
pretrain/tpu/kinds.py's table. The YAML comments at the top give the equivalent `xpk workload create`.
Bad input: one line on stderr, exit code 2.
"""

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import yaml

import tpu_args
from pretrain.tpu import kinds as tpu

SCHEMA = Path(__file__).resolve().parent / "schemas" / "jobset-v0.10.1.json"
REPLICATED_JOB = "slice"
CONTAINER = "pretrain"
TPU_RESOURCE = "google.com/tpu"
ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
# The exit codes no restart can fix (pretrain/run/runtime.py): 2, bad input, and
# 4, steps that stopped being finite, fail the JobSet at once. Any other failure
# restarts it (up to --max-restarts): 75 when preempted (the trainer's checkpoint is committed),
# 3 from the stuck-step watchdog, a crash (a peer died, a storage hiccup), a lost node. The
# trainer resumes from its latest checkpoint; the restarts keep the manifest's run.launch_id, so
# checkpoint.overwrite=true never clears what they resume.
FINAL_EXIT_CODES = [2, 4]
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


class ManifestError(ValueError):
    """A manifest that the cluster would refuse or that would not make a TPU slice."""


def _from_pod(name: str, path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def tpu_env(s: tpu.Slice, slices: int) -> list[dict]:
    """What jax.distributed.initialize() reads on GKE TPU pods. Pod i of Job j is reachable as
    <jobset>-<replicated job>-<j>-<i>.<jobset> (JobSet's headless service)."""
    host = "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-{job}-{pod}.$(JOBSET_NAME)"
    env = [
        _from_pod("JOBSET_NAME", "metadata.annotations['jobset.sigs.k8s.io/jobset-name']"),
        _from_pod("REPLICATED_JOB_NAME", "metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']"),
        _from_pod("JOB_INDEX", "metadata.annotations['jobset.sigs.k8s.io/job-index']"),  # the slice
        _from_pod("TPU_WORKER_ID", "metadata.annotations['batch.kubernetes.io/job-completion-index']"),
        {"name": "TPU_WORKER_HOSTNAMES",
         "value": ",".join(host.format(job="$(JOB_INDEX)", pod=i) for i in range(s.vms))},
    ]
    if slices > 1:  # slices talk over the data-centre network through libtpu's megascale layer
        env += [
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": host.format(job=0, pod=0)},
            {"name": "MEGASCALE_NUM_SLICES", "value": str(slices)},
            {"name": "MEGASCALE_SLICE_ID", "value": "$(JOB_INDEX)"},
        ]
    return env


def container_command(args: list[str]) -> list[str]:
    """The trainer itself as PID 1: SIGTERM reaches it, and its exit code is the pod's."""
    return ["python", "-m", "pretrain", *args]


def render(s: tpu.Slice, slices: int, name: str, image: str, command: list[str], max_restarts: int,
           grace_s: int) -> dict:
    chips = {TPU_RESOURCE: s.chips_per_vm}
    pod = {
        "restartPolicy": "Never",  # JobSet's default restarts one rank alone, which JAX cannot rejoin
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "terminationGracePeriodSeconds": grace_s,  # time to save a checkpoint on SIGTERM
        "nodeSelector": {ACCELERATOR_LABEL: s.kind.gke_accelerator, TOPOLOGY_LABEL: s.topology},
        "containers": [{
            "name": CONTAINER,
            "image": image,
            "command": container_command(command),
            "env": tpu_env(s, slices),
            "ports": [{"containerPort": 8471}, {"containerPort": 8080}],  # TPU runtime, megascale
            "resources": {"limits": chips, "requests": chips},
        }],
    }
    job = {
        "parallelism": s.vms,
        "completions": s.vms,
        "completionMode": "Indexed",  # the completion index is TPU_WORKER_ID
        "backoffLimit": 0,  # one failed pod fails the slice; the JobSet restarts as a whole
        "podFailurePolicy": {"rules": [{
            "action": "FailJob",
            "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": FINAL_EXIT_CODES},
        }]},
        "template": {"spec": pod},
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": name,
            # one slice per TPU node pool, as XPK places them
            "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"},
        },
        "spec": {
            "network": {"enableDNSHostnames": True},
            "failurePolicy": {
                "maxRestarts": max_restarts,
                "rules": [{"name": "final-exit-code", "action": "FailJobSet",
                           "onJobFailureReasons": ["PodFailurePolicy"]}],
            },
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": slices, "template": {"spec": job}}],
        },
    }


def xpk_command(s: tpu.Slice, slices: int, name: str, image: str, command: list[str], max_restarts: int,
                grace_s: int, cluster: str) -> str:
    return shlex.join([
        "xpk", "workload", "create", "--cluster", cluster, "--workload", name,
        "--tpu-type", s.cloud_accelerator_type, "--num-slices", str(slices), "--docker-image", image,
        "--max-restarts", str(max_restarts), "--termination-grace-period-seconds", str(grace_s),
        # xpk restarts on 42 and 127-255 and fails on the rest; this makes it fail on 2 and 4 only
        "--restart-on-exit-codes", "1,3,5-126",
        "--command", shlex.join(container_command(command)),
    ])


def _strict(schema):
    """The schema with unknown fields refused, as `kubectl apply` (strict field validation)
    refuses them; a CRD schema alone lets them through, and the API server drops them silently."""
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def _validator() -> jsonschema.Draft4Validator:  # OpenAPI v3 schemas are JSON Schema draft 4, near enough
    return jsonschema.Draft4Validator(_strict(json.loads(SCHEMA.read_text())))


def _dns_label(what: str, value: str) -> list[str]:
    if len(value) <= 63 and DNS_LABEL.fullmatch(value):
        return []
    return [f"{what} '{value}' is not a DNS label (at most 63 of a-z, 0-9 and '-', starting with a letter); "
            "use a shorter --name"]


def problems(manifest: dict) -> list[str]:
    """Everything wrong with a JobSet manifest for a TPU run, one line each; empty if none."""
    errors = sorted(_validator().iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        return [f"{'.'.join(map(str, e.absolute_path)) or 'manifest'}: {e.message}" for e in errors]
    name = manifest.get("metadata", {}).get("name", "")
    out = _dns_label("JobSet name", name)
    for rjob in manifest["spec"]["replicatedJobs"]:
        job = rjob["template"]["spec"]
        pod = job["template"]["spec"]
        last_job = f"{name}-{rjob['name']}-{rjob.get('replicas', 1) - 1}"  # JobSet's job and pod names
        out += _dns_label("job name", last_job)
        out += _dns_label("pod name", f"{last_job}-{job.get('completions', 1) - 1}-abcde")
        settings = (pod.get("restartPolicy"), job.get("backoffLimit"), job.get("completionMode"))
        if settings != ("Never", 0, "Indexed"):
            out.append(f"replicated job '{rjob['name']}' needs restartPolicy: Never, backoffLimit: 0 and "
                       "completionMode: Indexed, so that a failed pod restarts the whole JobSet")
        selector = pod.get("nodeSelector", {})
        try:
            s = from_gke_labels(selector.get(ACCELERATOR_LABEL, ""), selector.get(TOPOLOGY_LABEL, ""))
        except tpu.TpuError as e:
            out.append(str(e))
            continue
        if job.get("parallelism") != s.vms or job.get("completions") != s.vms:
            out.append(f"{s.accelerator_type} has {s.vms} VMs: parallelism and completions must be {s.vms}")
        for c in pod["containers"]:
            for part in ("limits", "requests"):
                got = c.get("resources", {}).get(part, {}).get(TPU_RESOURCE)
                if got != s.chips_per_vm:
                    out.append(f"container '{c['name']}': {part} {TPU_RESOURCE} is {got}, but a {s.accelerator_type} "
                               f"VM has {s.chips_per_vm} chips")
    return out


def from_gke_labels(accelerator: str, topology: str) -> tpu.Slice:
    """The slice that GKE's two TPU node labels describe, from pretrain/tpu/kinds.py's table."""
    kinds = [k for k in tpu.KINDS.values() if k.gke_accelerator == accelerator]
    if not kinds:
        known = ", ".join(k.gke_accelerator for k in tpu.KINDS.values())
        raise tpu.TpuError(f"{ACCELERATOR_LABEL} '{accelerator}' is not a TPU kind; use one of {known}")
    (kind,) = kinds
    slices = [tpu.Slice(kind, f"{kind.name}-{n * kind.cores_per_chip}", n) for n in kind.sizes]
    for s in slices:
        if s.topology == topology:
            return s
    raise tpu.TpuError(f"{TOPOLOGY_LABEL} '{topology}' is not a {kind.name} slice; use one of "
                       f"{', '.join(s.topology for s in slices)}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise ManifestError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launch/gke.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                usage="%(prog)s --accelerator-type TYPE --name NAME --image IMAGE [options] -- train CONFIG ...\n"
                      "       %(prog)s --check FILE",
                description=__doc__)
    p.add_argument("--accelerator-type", help="TPU slice, e.g. v5p-64, v6e-16, v5litepod-256")
    p.add_argument("--slices", type=int, default=1, help="slices of that type (multislice over DCN)")
    p.add_argument("--name", help="JobSet name (a DNS label; its pods' names must stay within 63 characters)")
    p.add_argument("--image", help="container image with this repository installed at its working directory")
    p.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts after failures and preemptions")
    p.add_argument("--termination-grace-period-seconds", type=int, default=300, dest="grace_s",
                   help="time a pod has after SIGTERM to save its checkpoint")
    p.add_argument("--cluster", default="CLUSTER", help="GKE cluster, for the xpk command line")
    p.add_argument("--check", metavar="FILE", help="only check this JobSet manifest ('-': stdin)")
    p.add_argument("--dry-run", action="store_true", help="accepted for symmetry: this program only prints")
    return p


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    try:
        args = _parser().parse_args(argv[:split])
        if args.check:
            text = sys.stdin.read() if args.check == "-" else Path(args.check).read_text()
            found = problems(yaml.safe_load(text))
            if found:
                raise ManifestError(f"{args.check}: " + "; ".join(found))
            print(f"{args.check}: a valid JobSet for a TPU slice")
            return 0
        missing = [f"--{k.replace('_', '-')}" for k in ("accelerator_type", "name", "image") if not getattr(args, k)]
        if missing:
            raise ManifestError(f"{', '.join(missing)} required; see launch/gke.py --help")
        if args.slices < 1 or args.max_restarts < 0 or args.grace_s < 0:
            raise ManifestError("--slices must be at least 1, --max-restarts and the grace period at least 0")
        s = tpu.parse(args.accelerator_type)
        command = tpu_args.pretrain_command(argv[split + 1:], tpu_args.new_launch_id())
        common = (s, args.slices, args.name, args.image, command, args.max_restarts, args.grace_s)
        manifest = render(*common)
        found = problems(manifest)
        if found:
            raise ManifestError("; ".join(found))
    except (ValueError, OSError, yaml.YAMLError) as e:  # ValueError: ours, TpuError, ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# JobSet {args.name}: {args.slices} x {s.accelerator_type} ({s.vms} VMs of {s.chips_per_vm} chips, "
          f"topology {s.topology} per slice), checked against {SCHEMA.name}")
    print(f"# kubectl apply -f - reads this; the same workload through xpk:\n# {xpk_command(*common, args.cluster)}")
    print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
