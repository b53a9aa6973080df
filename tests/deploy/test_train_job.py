"""deploy/jobs/train: multi-node torchrun training as an Indexed Job with a headless Service.
Rendered with `kubectl kustomize`, validated strictly against the Kubernetes schemas, passed
through deploy/checks.py (each torchrun check also fails on a manifest broken on purpose), and
train.sh, the pod's entry point, run here with a stand-in torchrun."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.deploy._render import (DEPLOY, KUBECTL_MISSING, checks, find, kustomize, needs_kubectl,
                                  validate)

TRAIN = DEPLOY / "jobs" / "train"


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    if shutil.which("kubectl") is None:
        pytest.skip(KUBECTL_MISSING)
    return {"train": kustomize(TRAIN), "volumes": kustomize(TRAIN / "volumes"),
            "gpu": kustomize("overlays/gpu"), "batch-inpaint": kustomize("jobs/batch-inpaint")}


@pytest.fixture
def docs(rendered) -> list[dict]:
    return checks.load(rendered["train"])


def parts(docs):
    job = find(docs, "Job", "ganforge-train")
    pod = job["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "train")
    return job, pod, c


def settings(docs) -> dict[str, str]:
    """The ganforge-train ConfigMap's values (the name carries kustomize's hash suffix)."""
    _, _, c = parts(docs)
    name = c["envFrom"][0]["configMapRef"]["name"]
    assert name.startswith("ganforge-train-")
    return find(docs, "ConfigMap", name)["data"]


def command(docs) -> list[str]:
    """The container's command and args with Kubernetes' $(VAR) expansion applied."""
    job, _, c = parts(docs)
    env = checks._env_of(docs, job, c)
    return [checks.expand(str(a), env) for a in [*c["command"], *c["args"]]]


# -- the rendered manifests ------------------------------------------------------------------

@needs_kubectl
@pytest.mark.parametrize("name", ["train", "volumes"])
def test_renders_validates_strictly_and_passes_the_checks(rendered, name, tmp_path):
    out = validate(rendered[name], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert checks.run_checks(rendered[name]) == []


@needs_kubectl
def test_one_indexed_pod_per_node_all_at_once(docs):
    job, _, _ = parts(docs)
    nnodes = int(settings(docs)["NNODES"])
    assert nnodes >= 2
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nnodes


@needs_kubectl
def test_nnodes_and_gpus_per_node_are_set_in_one_place(tmp_path):
    """Changing the ConfigMap's literals in kustomization.yaml changes the Job."""
    copy_ = tmp_path / "train"
    shutil.copytree(TRAIN, copy_)
    k = copy_ / "kustomization.yaml"
    k.write_text(k.read_text().replace("NNODES=2 ", "NNODES=4 ").replace("GPUS_PER_NODE=8 ", "GPUS_PER_NODE=2 ")
                 .replace("RUN=dcgan-default ", "RUN=big "))
    d = checks.load(kustomize(copy_))
    job, _, c = parts(d)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 2
    cmd = command(d)
    assert "--nnodes=4" in cmd and "--nproc-per-node=2" in cmd and "/checkpoints/big" in cmd
    assert checks.run_checks(yaml.safe_dump_all(d)) == []


@needs_kubectl
def test_an_overlay_that_changes_only_the_configmap_is_caught(tmp_path):
    """The replacements run inside deploy/jobs/train: an overlay merging NNODES into the
    ConfigMap leaves completions behind, and deploy/checks.py says so."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(TRAIN, tmp_path)],
        "configMapGenerator": [{"name": "ganforge-train", "behavior": "merge", "literals": ["NNODES=4"]}]}))
    assert checks.run_checks(kustomize(tmp_path)) == [
        "Job/ganforge-train: completions 2 is not --nnodes 4",
        "Job/ganforge-train: parallelism 2 is not --nnodes 4"]


@needs_kubectl
def test_the_headless_service_gives_pod_0_the_rendezvous_name(docs):
    job, pod, c = parts(docs)
    svc = find(docs, "Service", pod["subdomain"])
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["port"] for p in svc["spec"]["ports"]} == {29400}
    policy = find(docs, "NetworkPolicy", "ganforge-train")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"].items() <= labels.items()


@needs_kubectl
def test_torchrun_command(docs):
    cmd = command(docs)
    s = settings(docs)
    assert cmd[:3] == ["/bin/sh", "/scripts/train.sh", "torchrun"]
    flags = [a for a in cmd if a.startswith("--")]
    assert f"--nnodes={s['NNODES']}" in flags
    assert f"--nproc-per-node={s['GPUS_PER_NODE']}" in flags
    assert "--rdzv-backend=c10d" in flags
    assert "--rdzv-endpoint=ganforge-train-0.ganforge-train:29400" in flags
    assert "--rdzv-id=$(JOB_ID)" in flags     # expanded by Kubernetes in the pod: the Job's uid
    _, _, c = parts(docs)
    job_id = next(e for e in c["env"] if e["name"] == "JOB_ID")
    assert job_id["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['batch.kubernetes.io/controller-uid']"
    assert any(a.startswith("--max-restarts=") and int(a.split("=")[1]) >= 1 for a in flags)
    tail = cmd[cmd.index("-m"):]
    assert tail == ["-m", "ganforge", "train", s["MODEL"], "--preset", s["PRESET"], "--data", "/data",
                    "--out", f"/checkpoints/{s['RUN']}", "--resume", "--device", "cuda"]


@needs_kubectl
def test_gpus_nodes_and_resources(rendered, docs):
    _, pod, c = parts(docs)
    gpus = int(settings(docs)["GPUS_PER_NODE"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    for r in ("cpu", "memory"):
        assert r in c["resources"]["limits"] and r in c["resources"]["requests"]
    serving = find(checks.load(rendered["gpu"]), "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == serving["nodeSelector"]
    assert pod["tolerations"] == serving["tolerations"]


@needs_kubectl
def test_volumes_shm_and_grace_period(rendered, docs):
    _, pod, c = parts(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    data = mounts["/data"]
    assert data["readOnly"] is True and volumes[data["name"]]["persistentVolumeClaim"]["readOnly"] is True
    ckpt = volumes[mounts["/checkpoints"]["name"]]["persistentVolumeClaim"]["claimName"]
    pvcs = {d["metadata"]["name"]: d for d in checks.load(rendered["volumes"])}
    assert pvcs[ckpt]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert volumes[data["name"]]["persistentVolumeClaim"]["claimName"] in pvcs
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert "medium" not in volumes[mounts["/tmp"]["name"]]["emptyDir"]
    shutdown = int(next(a for a in command(docs) if a.startswith("--shutdown-timeout=")).split("=")[1])
    assert pod["terminationGracePeriodSeconds"] >= max(30, shutdown + 10)


@needs_kubectl
def test_security_context_as_strict_as_the_serving_pods(docs):
    _, pod, c = parts(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HOME"].startswith("/tmp")


@needs_kubectl
def test_preemption_and_early_stops_restart_the_pod_without_counting(docs):
    job, pod, _ = parts(docs)
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["podReplacementPolicy"] == "Failed"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    stopped_early = int(next(line.split("=")[1] for line in (TRAIN / "train.sh").read_text().splitlines()
                             if line.startswith("STOPPED_EARLY=")))
    assert rules[1] == {"action": "Ignore", "onExitCodes": {"containerName": "train", "operator": "In",
                                                            "values": [stopped_early]}}
    assert job["spec"]["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    assert job["spec"]["backoffLimit"] >= 1


@needs_kubectl
def test_the_script_in_the_configmap_is_train_sh(docs):
    _, pod, c = parts(docs)
    vol = next(v for v in pod["volumes"] if v["name"] == "scripts")
    cm = find(docs, "ConfigMap", vol["configMap"]["name"])
    assert cm["data"]["train.sh"] == (TRAIN / "train.sh").read_text()


@needs_kubectl
def test_same_image_as_the_batch_job(rendered, docs):
    _, _, c = parts(docs)
    batch = find(checks.load(rendered["batch-inpaint"]), "Job")["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == batch["image"]


# -- the torchrun checks fail on manifests broken on purpose ---------------------------------

def broken(docs, edit) -> list[str]:
    d = copy.deepcopy(docs)
    edit(d, *parts(d))
    return checks.run_checks(yaml.safe_dump_all(d))


@needs_kubectl
def test_check_fails_when_completions_are_not_nnodes(docs):
    def edit(d, job, pod, c):
        job["spec"]["parallelism"] = 1
    assert broken(docs, edit) == ["Job/ganforge-train: parallelism 1 is not --nnodes 2"]


@needs_kubectl
def test_check_fails_on_a_non_indexed_job(docs):
    def edit(d, job, pod, c):
        job["spec"]["completionMode"] = "NonIndexed"
        del job["spec"]["successPolicy"]
    assert broken(docs, edit)[0].startswith("Job/ganforge-train: completionMode is not Indexed")


@needs_kubectl
def test_check_fails_when_preemption_counts_as_a_failure(docs):
    def edit(d, job, pod, c):
        job["spec"]["podFailurePolicy"]["rules"] = job["spec"]["podFailurePolicy"]["rules"][1:]
    assert broken(docs, edit) == ["Job/ganforge-train: podFailurePolicy does not Ignore DisruptionTarget: "
                                  "a preempted pod counts as a failure"]


@needs_kubectl
def test_check_fails_on_a_rendezvous_that_is_not_pod_0(docs):
    def edit(d, job, pod, c):
        c["args"] = [a.replace("$(MASTER_ADDR)", "ganforge-train") for a in c["args"]]
    assert broken(docs, edit) == ["Job/ganforge-train container train: --rdzv-endpoint host "
                                  "'ganforge-train' is not pod 0's name 'ganforge-train-0.ganforge-train'"]


@needs_kubectl
def test_check_fails_on_a_service_that_misses_the_pods(docs):
    def edit(d, job, pod, c):
        find(d, "Service", "ganforge-train")["spec"]["selector"] = {"app.kubernetes.io/name": "other"}
    assert broken(docs, edit) == ["Service/ganforge-train: selector {'app.kubernetes.io/name': 'other'} "
                                  "does not select the pods of Job/ganforge-train"]


@needs_kubectl
def test_check_fails_on_a_dev_shm_on_disk_and_a_short_grace_period(docs):
    def edit(d, job, pod, c):
        next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"] = {}
        pod["terminationGracePeriodSeconds"] = 20
    got = broken(docs, edit)
    assert len(got) == 2
    assert "/dev/shm volume 'dshm' is not an emptyDir with medium: Memory" in got[0]
    assert got[1] == ("Job/ganforge-train: terminationGracePeriodSeconds 20 is shorter than torchrun's "
                      "--shutdown-timeout (60 s) of container train: the SIGTERM checkpoint would be cut off")


# -- train.sh with a stand-in torchrun -------------------------------------------------------

STAND_IN = """#!/bin/sh
# stand-in torchrun: records its arguments, runs one "worker" that stops on SIGTERM, exits $RC
printf '%s\\n' "$@" > "$WORK/args"
sh -c 'trap "echo stopped > $WORK/worker-term; exit 0" TERM; touch $WORK/ready; while :; do sleep 0.1; done' &
worker=$!
if [ -n "${WAIT_FOR_SIGNAL:-}" ]; then wait "$worker"; else kill -9 "$worker"; fi
exit "${RC:-0}"
"""


@pytest.fixture
def run_dir(tmp_path):
    torch = pytest.importorskip("torch")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "torchrun").write_text(STAND_IN)
    (bin_ / "torchrun").chmod(0o755)
    out = tmp_path / "checkpoints" / "run"
    out.mkdir(parents=True)

    def checkpoint(finished: bool):
        torch.save({"format": "ganforge-checkpoint", "step": 7, "resume": {"finished": finished}},
                   out / "checkpoint.pt")

    return tmp_path, out, checkpoint


def train_sh(tmp: Path, out: Path, index: int, **env) -> subprocess.Popen:
    args = ["torchrun", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:29400",
            "--rdzv-conf=join_timeout=1800,read_timeout=300", "-m", "ganforge", "train", "dcgan",
            "--out", str(out), "--resume"]
    e = {**os.environ, "PATH": f"{tmp / 'bin'}:{os.environ['PATH']}", "WORK": str(tmp),
         "PYTHON": sys.executable, "JOB_COMPLETION_INDEX": str(index), **env}
    return subprocess.Popen(["sh", str(TRAIN / "train.sh"), *args], env=e, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("index,host", [(0, "true"), (1, "false")])
def test_train_sh_runs_torchrun_with_pod_0_as_rendezvous_host(run_dir, index, host):
    tmp, out, checkpoint = run_dir
    checkpoint(finished=True)
    p = train_sh(tmp, out, index)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    args = (tmp / "args").read_text().splitlines()
    assert f"--rdzv-conf=join_timeout=1800,read_timeout=300,is_host={host}" in args
    assert args[-3:] == ["--out", str(out), "--resume"]
    assert "run finished" in stdout


def test_train_sh_asks_for_a_restart_when_training_stopped_before_the_end(run_dir):
    tmp, out, checkpoint = run_dir
    checkpoint(finished=False)       # another node was preempted: every rank stopped, exit 0
    p = train_sh(tmp, out, 1)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 75
    assert "stopped before the end; checkpoint" in stderr


def test_train_sh_passes_a_failure_on(run_dir):
    tmp, out, checkpoint = run_dir
    checkpoint(finished=False)
    p = train_sh(tmp, out, 0, RC="3")
    p.communicate(timeout=60)
    assert p.returncode == 3


def test_train_sh_does_not_finish_a_run_without_a_checkpoint(run_dir):
    tmp, out, _ = run_dir
    p = train_sh(tmp, out, 0)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 1
    assert "cannot be read" in stderr


def test_train_sh_sends_sigterm_to_the_training_processes(run_dir):
    tmp, out, checkpoint = run_dir
    checkpoint(finished=False)
    p = train_sh(tmp, out, 0, WAIT_FOR_SIGNAL="1")
    deadline = time.monotonic() + 30
    while not (tmp / "ready").exists():
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=30)
    assert (tmp / "worker-term").read_text().strip() == "stopped"
    assert p.returncode == 75
    assert "stopped before the end on SIGTERM" in stderr
