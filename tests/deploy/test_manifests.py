"""deploy/: every overlay renders with `kubectl kustomize`, validates against the Kubernetes
schemas, and passes the project's checks; each check fails on a manifest broken on purpose."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.deploy._render import (DEPLOY, KUBECTL_MISSING, checks, find, kustomize, needs_kubectl,
                                  triton_pod, validate)

OVERLAYS = ["gpu", "cpu", "gpu-cpu-hpa"]
KUSTOMIZATIONS = [*(f"overlays/{o}" for o in OVERLAYS), "jobs/batch-inpaint"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    if shutil.which("kubectl") is None:
        pytest.skip(KUBECTL_MISSING)
    return {k: kustomize(k) for k in KUSTOMIZATIONS}


@needs_kubectl
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_kustomization_renders_validates_and_passes_the_checks(rendered, path, tmp_path):
    text = rendered[path]
    out = validate(text, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert checks.run_checks(text) == []


@needs_kubectl
def test_kubernetes_validate_rejects_a_field_kubernetes_does_not_know(rendered, tmp_path):
    docs = checks.load(rendered["overlays/cpu"])
    dep = find(docs, "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    assert validate(yaml.safe_dump(dep), tmp_path).returncode != 0


@needs_kubectl
def test_gpu_overlay_asks_for_a_gpu_and_builds_engines_on_the_node(rendered):
    docs = checks.load(rendered["overlays/gpu"])
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    _, c = triton_pod(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    init = [i["name"] for i in pod["initContainers"]]
    assert init == ["sync-models", "build-engines"]
    build = pod["initContainers"][1]
    assert build["resources"]["limits"]["nvidia.com/gpu"] == 1
    # engines are built by the TensorRT of the very image that serves them
    assert build["image"] == c["image"]
    assert c["image"].startswith("nvcr.io/nvidia/tritonserver:") and c["image"].endswith("-py3")
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "ganforge_triton_queue_us_per_request"


@needs_kubectl
@pytest.mark.parametrize("overlay", ["cpu", "gpu-cpu-hpa"])
def test_fallback_overlays_scale_on_cpu_only(rendered, overlay):
    hpa = find(checks.load(rendered[f"overlays/{overlay}"]), "HorizontalPodAutoscaler")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


@needs_kubectl
def test_cpu_overlay_has_no_gpu(rendered):
    assert "nvidia.com/gpu" not in rendered["overlays/cpu"]


@needs_kubectl
def test_rollout_never_drops_below_the_ready_count_and_drains_for_the_exit_timeout(rendered):
    for o in OVERLAYS:
        docs = checks.load(rendered[f"overlays/{o}"])
        dep = find(docs, "Deployment")
        assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        _, c = triton_pod(docs)
        assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
        assert "--exit-timeout-secs=30" in c["args"]
        find(docs, "PodDisruptionBudget")


@needs_kubectl
def test_services_servicemonitor_and_network_policy(rendered):
    docs = checks.load(rendered["overlays/gpu"])
    grpc = find(docs, "Service", "ganforge-triton")
    assert {p["name"]: p["port"] for p in grpc["spec"]["ports"]}["grpc"] == 8001
    metrics = find(docs, "Service", "ganforge-triton-metrics")
    assert [p["port"] for p in metrics["spec"]["ports"]] == [8002]
    sm = find(docs, "ServiceMonitor")
    assert all(sm["spec"]["selector"]["matchLabels"][k] == v
               for k, v in sm["spec"]["selector"]["matchLabels"].items()
               if k in metrics["metadata"]["labels"])
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    np_ = find(docs, "NetworkPolicy")
    sources = [f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
               for rule in np_["spec"]["ingress"] for f in rule["from"]]
    assert sources == ["ganforge-clients", "monitoring"]
    rules = find(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules if "alert" in r} >= {"GanforgeTritonHighQueueTime",
                                                           "GanforgeTritonDown"}


@needs_kubectl
def test_batch_inpaint_job_maps_the_completion_index_to_the_shard(rendered):
    job = find(checks.load(rendered["jobs/batch-inpaint"]), "Job")
    assert job["spec"]["completionMode"] == "Indexed"
    c = job["spec"]["template"]["spec"]["containers"][0]
    cmd = " ".join(c["args"])
    assert '--shard-index "$JOB_COMPLETION_INDEX"' in cmd
    assert f"--num-shards {job['spec']['completions']}" in cmd
    for flag in ("--url", "--model", "-o"):
        assert f" {flag} " in f" {cmd} "


def test_batch_inpaint_job_names_a_shipped_inpainting_model():
    job = yaml.safe_load((DEPLOY / "jobs" / "batch-inpaint" / "job.yaml").read_text())
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    config = DEPLOY.parent / "model_repository" / env["MODEL"] / "config.pbtxt"
    assert config.is_file(), f"the Job's MODEL {env['MODEL']!r} is not in model_repository/"
    text = config.read_text()
    assert 'name: "image"' in text and 'name: "mask"' in text


def test_prometheus_adapter_rule_serves_the_metric_the_hpa_reads():
    values = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    rule = values["rules"]["custom"][0]
    assert rule["name"]["as"] == "ganforge_triton_queue_us_per_request"
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"]
    assert "nv_inference_request_success" in rule["metricsQuery"]
    hpa = yaml.safe_load((DEPLOY / "base" / "hpa.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]


# -- each check fails on a manifest broken on purpose ---------------------------------------

@pytest.fixture
def good():
    return checks.load((DEPLOY / "base" / "deployment.yaml").read_text().replace(
        "image: tritonserver", "image: nvcr.io/nvidia/tritonserver:25.06-py3").replace(
        "image: model-sync", "image: amazon/aws-cli:2.22.35"))


def pod_of(docs):
    return docs[0]["spec"]["template"]["spec"]


def problems(docs) -> list[str]:
    return checks.run_checks(yaml.safe_dump_all(docs))


def test_the_base_deployment_passes_every_check(good):
    assert problems(good) == []


@pytest.mark.parametrize("probe", ["livenessProbe", "readinessProbe", "startupProbe"])
def test_check_fails_on_a_missing_probe(good, probe):
    del pod_of(good)["containers"][0][probe]
    assert problems(good) == [f"Deployment/ganforge-triton container triton: no {probe}"]


def test_check_fails_on_a_probe_at_the_wrong_path(good):
    pod_of(good)["containers"][0]["livenessProbe"]["httpGet"]["path"] = "/healthz"
    assert "livenessProbe path '/healthz'" in problems(good)[0]


@pytest.mark.parametrize("image", ["nvcr.io/nvidia/tritonserver", "nvcr.io/nvidia/tritonserver:latest",
                                   "localhost:5000/tritonserver"])
def test_check_fails_on_an_unpinned_image(good, image):
    pod_of(good)["containers"][0]["image"] = image
    assert problems(good) == [f"Deployment/ganforge-triton container triton: image {image!r} is "
                              f"not pinned; use an explicit tag (not 'latest') or a digest"]


def test_a_digest_counts_as_pinned(good):
    pod_of(good)["containers"][0]["image"] = "nvcr.io/nvidia/tritonserver@sha256:" + "a" * 64
    assert problems(good) == []


@pytest.mark.parametrize("role", ["containers", "initContainers"])
def test_check_fails_on_a_container_without_limits(good, role):
    del pod_of(good)[role][0]["resources"]["limits"]
    name = pod_of(good)[role][0]["name"]
    assert problems(good) == [f"Deployment/ganforge-triton {role[:-1]} {name}: resources.limits "
                              f"has no cpu or memory"]


def test_check_fails_on_a_missing_dev_shm_volume(good):
    c = pod_of(good)["containers"][0]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/dev/shm"]
    assert problems(good) == ["Deployment/ganforge-triton container triton: no volume mounted "
                              "at /dev/shm"]


def test_check_fails_on_a_dev_shm_on_disk(good):
    vol = next(v for v in pod_of(good)["volumes"] if v["name"] == "dshm")
    vol["emptyDir"] = {}
    assert "is not an emptyDir with medium: Memory" in problems(good)[0]


def test_check_fails_on_a_grace_period_shorter_than_the_exit_timeout(good):
    pod_of(good)["terminationGracePeriodSeconds"] = 35
    assert problems(good) == ["Deployment/ganforge-triton: terminationGracePeriodSeconds 35 is "
                              "shorter than preStop sleep + --exit-timeout-secs (40 s) of "
                              "container triton"]


def test_grace_period_check_reads_the_exit_timeout_flag(good):
    c = pod_of(good)["containers"][0]
    c["args"] = [a if not a.startswith("--exit-timeout-secs") else "--exit-timeout-secs=120"
                 for a in c["args"]]
    assert "(130 s)" in problems(good)[0]


def test_check_fails_on_a_root_writable_container(good):
    sc = pod_of(good)["containers"][0]["securityContext"]
    sc["readOnlyRootFilesystem"] = False
    sc["allowPrivilegeEscalation"] = True
    assert len(problems(good)) == 2


def test_checks_command_exits_1_and_names_the_problem(good, tmp_path):
    broken = copy.deepcopy(good)
    del pod_of(broken)["containers"][0]["startupProbe"]
    f = tmp_path / "broken.yaml"
    f.write_text(yaml.safe_dump_all(broken))
    out = subprocess.run([sys.executable, str(DEPLOY / "checks.py"), str(f)], capture_output=True,
                         text=True)
    assert out.returncode == 1
    assert out.stderr == "Error: Deployment/ganforge-triton container triton: no startupProbe\n"
