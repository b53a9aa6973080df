"""Checks on rendered manifests for what Triton operators learned the hard way.

    kubectl kustomize deploy/overlays/gpu | python deploy/checks.py -

Each check returns the problems it finds as lines naming the object, the container and the
field; the command prints them and exits 1 when there is any. Pure Python + PyYAML: it runs
wherever the manifests are rendered.
"""

from __future__ import annotations

import re
import sys

import yaml

TRITON_DEFAULT_EXIT_TIMEOUT_S = 30   # tritonserver's --exit-timeout-secs default
TORCHRUN_DEFAULT_SHUTDOWN_S = 30     # torchrun's --shutdown-timeout default (SIGTERM to SIGKILL)
K8S_DEFAULT_GRACE_S = 30             # terminationGracePeriodSeconds default
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


def load(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def pod_specs(docs: list[dict]):
    """(object label, kind, pod spec) for every workload."""
    for d in docs:
        kind = d.get("kind")
        if kind not in WORKLOADS:
            continue
        spec = d.get("spec", {})
        if kind == "CronJob":
            spec = spec.get("jobTemplate", {}).get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        yield f"{kind}/{d.get('metadata', {}).get('name')}", kind, pod


def containers(pod: dict, init: bool = True):
    for c in pod.get("containers", []):
        yield "container", c
    if init:
        for c in pod.get("initContainers", []):
            yield "initContainer", c


def is_triton(c: dict) -> bool:
    """The Triton server container: its command starts tritonserver."""
    cmd = [*c.get("command", []), *c.get("args", [])][:1]
    return bool(cmd) and str(cmd[0]).rsplit("/", 1)[-1] == "tritonserver"


def is_torchrun(c: dict) -> bool:
    """A container that starts torchrun (itself or through a wrapper script)."""
    words = [str(w) for w in [*c.get("command", []), *c.get("args", [])]]
    return any(w.rsplit("/", 1)[-1] == "torchrun" or w == "torch.distributed.run" for w in words)


def triton_arg(c: dict, flag: str) -> str | None:
    for a in [*c.get("command", []), *c.get("args", [])]:
        if str(a).startswith(flag + "="):
            return str(a).split("=", 1)[1]
    return None


def check_images_pinned(docs) -> list[str]:
    out = []
    for obj, _, pod in pod_specs(docs):
        for role, c in containers(pod):
            image = c.get("image", "")
            name = image.rsplit("/", 1)[-1]
            if "@sha256:" in image:
                continue
            tag = name.split(":", 1)[1] if ":" in name else None
            if not tag or tag == "latest":
                out.append(f"{obj} {role} {c.get('name')}: image {image!r} is not pinned; "
                           f"use an explicit tag (not 'latest') or a digest")
    return out


def check_limits(docs) -> list[str]:
    out = []
    for obj, _, pod in pod_specs(docs):
        for role, c in containers(pod):
            limits = (c.get("resources") or {}).get("limits") or {}
            missing = [r for r in ("cpu", "memory") if r not in limits]
            if missing:
                out.append(f"{obj} {role} {c.get('name')}: resources.limits has no "
                           f"{' or '.join(missing)}")
    return out


def check_probes(docs) -> list[str]:
    """Long-running servers need all three probes; Triton's must hit its health endpoints."""
    out = []
    expect = {"livenessProbe": "/v2/health/live", "readinessProbe": "/v2/health/ready"}
    for obj, kind, pod in pod_specs(docs):
        if kind in ("Job", "CronJob"):
            continue
        for role, c in containers(pod, init=False):
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe not in c:
                    out.append(f"{obj} container {c.get('name')}: no {probe}")
            if is_triton(c):
                for probe, path in expect.items():
                    got = (c.get(probe) or {}).get("httpGet", {}).get("path")
                    if probe in c and got != path:
                        out.append(f"{obj} container {c.get('name')}: {probe} path {got!r}, "
                                   f"expected {path!r}")
    return out


def check_dev_shm(docs) -> list[str]:
    """Triton's Python backend passes tensors through /dev/shm, and so do torchrun's DataLoader
    workers and NCCL: an in-memory emptyDir there."""
    out = []
    for obj, _, pod in pod_specs(docs):
        volumes = {v.get("name"): v for v in pod.get("volumes", [])}
        for role, c in containers(pod, init=False):
            if not (is_triton(c) or is_torchrun(c)):
                continue
            mounts = [m for m in c.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
            if not mounts:
                out.append(f"{obj} container {c.get('name')}: no volume mounted at /dev/shm")
                continue
            vol = volumes.get(mounts[0].get("name"), {})
            if (vol.get("emptyDir") or {}).get("medium") != "Memory":
                out.append(f"{obj} container {c.get('name')}: /dev/shm volume "
                           f"{mounts[0].get('name')!r} is not an emptyDir with medium: Memory")
    return out


def _prestop_sleep(c: dict) -> int:
    pre = (c.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return int(pre["sleep"].get("seconds", 0))
    cmd = " ".join(str(w) for w in (pre.get("exec") or {}).get("command", []))
    m = re.search(r"\bsleep\s+(\d+)", cmd)
    return int(m.group(1)) if m else 0


def check_grace_period(docs) -> list[str]:
    """The pod must outlive preStop + Triton's drain (--exit-timeout-secs), or in-flight
    requests are cut off by SIGKILL; a torchrun pod must outlive torchrun's --shutdown-timeout,
    the time its workers get to write the SIGTERM checkpoint."""
    out = []
    for obj, _, pod in pod_specs(docs):
        grace = int(pod.get("terminationGracePeriodSeconds", K8S_DEFAULT_GRACE_S))
        for role, c in containers(pod, init=False):
            if not (is_triton(c) or is_torchrun(c)):
                continue
            if not is_triton(c):
                shutdown = int(triton_arg(c, "--shutdown-timeout") or TORCHRUN_DEFAULT_SHUTDOWN_S)
                if grace < shutdown:
                    out.append(f"{obj}: terminationGracePeriodSeconds {grace} is shorter than torchrun's "
                               f"--shutdown-timeout ({shutdown} s) of container {c.get('name')}: the "
                               f"SIGTERM checkpoint would be cut off")
                continue
            exit_timeout = int(triton_arg(c, "--exit-timeout-secs") or TRITON_DEFAULT_EXIT_TIMEOUT_S)
            need = exit_timeout + _prestop_sleep(c)
            if grace < need:
                out.append(f"{obj}: terminationGracePeriodSeconds {grace} is shorter than preStop "
                           f"sleep + --exit-timeout-secs ({need} s) of container {c.get('name')}")
    return out


def check_security(docs) -> list[str]:
    out = []
    for obj, _, pod in pod_specs(docs):
        pod_sc = pod.get("securityContext") or {}
        for role, c in containers(pod):
            sc = c.get("securityContext") or {}
            if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))):
                out.append(f"{obj} {role} {c.get('name')}: runAsNonRoot is not true")
            if sc.get("readOnlyRootFilesystem") is not True:
                out.append(f"{obj} {role} {c.get('name')}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{obj} {role} {c.get('name')}: allowPrivilegeEscalation is not false")
    return out


def _mount_of(c: dict, volumes: dict, path: str) -> tuple[dict | None, dict]:
    """The container's volume mount holding `path` (longest mount path first) and its volume."""
    mounts = sorted(c.get("volumeMounts", []), key=lambda m: -len(m.get("mountPath", "")))
    for m in mounts:
        root = m.get("mountPath", "").rstrip("/") + "/"
        if path.startswith(root):
            return m, volumes.get(m.get("name"), {})
    return None, {}


def check_grpc_tls(docs) -> list[str]:
    """Triton's gRPC TLS flags come with their files, each on a read-only mount of a Secret,
    and no probe speaks plain gRPC to a TLS port (the kubelet's gRPC probe has no TLS)."""
    out = []
    for obj, _, pod in pod_specs(docs):
        volumes = {v.get("name"): v for v in pod.get("volumes", [])}
        for role, c in containers(pod, init=False):
            if not is_triton(c):
                continue
            ssl = triton_arg(c, "--grpc-use-ssl") == "true"
            mutual = triton_arg(c, "--grpc-use-ssl-mutual") == "true"
            if not (ssl or mutual):
                continue
            where = f"{obj} container {c.get('name')}"
            needed = ["--grpc-server-cert", "--grpc-server-key"] + (["--grpc-root-cert"] if mutual else [])
            for flag in needed:
                path = triton_arg(c, flag)
                if not path:
                    out.append(f"{where}: gRPC TLS is on but {flag} is not set")
                    continue
                mount, vol = _mount_of(c, volumes, path)
                if mount is None:
                    out.append(f"{where}: {flag} {path} is on no mounted volume")
                elif mount.get("readOnly") is not True or not ("secret" in vol or "projected" in vol):
                    out.append(f"{where}: {flag} {path} is not on a read-only Secret volume "
                               f"(volume {mount.get('name')!r})")
            grpc_port = int(triton_arg(c, "--grpc-port") or 8001)
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                g = (c.get(probe) or {}).get("grpc")
                if g is not None and ports.get(g.get("port"), g.get("port")) == grpc_port:
                    out.append(f"{where}: {probe} is a gRPC probe of the TLS port {grpc_port}; the "
                               f"kubelet's gRPC probe has no TLS: probe /v2/health/* over HTTP")
    return out


def _env_of(docs: list[dict], job: dict, c: dict) -> dict[str, str]:
    """The container's environment as far as the manifests tell: literal values (with $(VAR)
    references expanded), ConfigMaps from envFrom, and the Job's name from the job-name label."""
    maps = {d.get("metadata", {}).get("name"): d.get("data") or {} for d in docs if d.get("kind") == "ConfigMap"}
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef") or {}
        env.update({src.get("prefix", "") + k: str(v) for k, v in maps.get(ref.get("name"), {}).items()})
    job_name = job.get("metadata", {}).get("name", "")
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env)
        elif "job-name" in ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath", ""):
            env[e["name"]] = job_name
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values (unknown names stay)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def check_torchrun_jobs(docs) -> list[str]:
    """A multi-node torchrun Job: one pod per node, all at once (Indexed, parallelism ==
    completions == --nnodes), the c10d rendezvous on pod 0's name on a headless Service that
    selects the pods, and a preempted pod restarted without counting as a failure."""
    out = []
    services = {d.get("metadata", {}).get("name"): d for d in docs if d.get("kind") == "Service"}
    for d in docs:
        if d.get("kind") != "Job":
            continue
        spec = d.get("spec", {})
        template = spec.get("template", {})
        pod = template.get("spec", {})
        name = d.get("metadata", {}).get("name")
        obj = f"Job/{name}"
        for c in pod.get("containers", []):
            if not is_torchrun(c):
                continue
            env = _env_of(docs, d, c)
            args = [expand(str(a), env) for a in [*c.get("command", []), *c.get("args", [])]]
            flags = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
            nnodes = flags.get("--nnodes", "1")
            if nnodes == "1":
                continue
            where = f"{obj} container {c.get('name')}"
            if spec.get("completionMode") != "Indexed":
                out.append(f"{obj}: completionMode is not Indexed (torchrun on {nnodes} nodes needs one "
                           f"stable pod name per node)")
            if nnodes.isdigit():
                for field in ("completions", "parallelism"):
                    if str(spec.get(field)) != nnodes:
                        out.append(f"{obj}: {field} {spec.get(field)} is not --nnodes {nnodes}")
            else:
                out.append(f"{where}: --nnodes {nnodes!r} is not a number the manifests define")
            if flags.get("--rdzv-backend") != "c10d":
                out.append(f"{where}: --rdzv-backend is {flags.get('--rdzv-backend')!r}, expected 'c10d'")
            subdomain = pod.get("subdomain")
            host = flags.get("--rdzv-endpoint", "").rsplit(":", 1)[0]
            if not subdomain:
                out.append(f"{obj}: the pod template has no subdomain (no DNS name per pod)")
            elif host != f"{name}-0.{subdomain}":
                out.append(f"{where}: --rdzv-endpoint host {host!r} is not pod 0's name "
                           f"'{name}-0.{subdomain}'")
            svc = services.get(subdomain)
            labels = template.get("metadata", {}).get("labels", {})
            if subdomain and svc is None:
                out.append(f"{obj}: no Service {subdomain!r} for the pods' subdomain")
            elif svc is not None:
                sel = svc.get("spec", {}).get("selector") or {}
                if svc.get("spec", {}).get("clusterIP") != "None":
                    out.append(f"Service/{subdomain}: clusterIP is not None (not headless)")
                if not sel or not sel.items() <= labels.items():
                    out.append(f"Service/{subdomain}: selector {sel} does not select the pods of {obj}")
            if pod.get("restartPolicy") != "Never":
                out.append(f"{obj}: restartPolicy is {pod.get('restartPolicy')!r}, expected 'Never' "
                           f"(podFailurePolicy)")
            rules = (spec.get("podFailurePolicy") or {}).get("rules", [])
            if not any(r.get("action") == "Ignore" and any(
                    p.get("type") == "DisruptionTarget" and p.get("status", "True") == "True"
                    for p in r.get("onPodConditions", [])) for r in rules):
                out.append(f"{obj}: podFailurePolicy does not Ignore DisruptionTarget: a preempted "
                           f"pod counts as a failure")
    return out


CHECKS = [check_probes, check_images_pinned, check_limits, check_dev_shm, check_grace_period,
          check_security, check_grpc_tls, check_torchrun_jobs]


def run_checks(text: str) -> list[str]:
    docs = load(text)
    return [problem for check in CHECKS for problem in check(docs)]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python deploy/checks.py RENDERED.yaml|-", file=sys.stderr)
        return 2
    text = sys.stdin.read() if argv[0] == "-" else open(argv[0]).read()
    problems = run_checks(text)
    for p in problems:
        print(f"Error: {p}", file=sys.stderr)
    if not problems:
        print(f"ok: {len(CHECKS)} checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
