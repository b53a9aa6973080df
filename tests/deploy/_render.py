"""What the deploy tests share: deploy/checks.py, loaded once; `kubectl kustomize` of a
kustomization, or of a base with components added as a user's kustomization would; strict
validation against the Kubernetes schemas; and finding documents in rendered manifests."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

_spec = importlib.util.spec_from_file_location("deploy_checks", DEPLOY / "checks.py")
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)

KUBECTL_MISSING = "kubectl is not installed (.ci/run installs it)"
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason=KUBECTL_MISSING)


def kustomize(path: str | Path) -> str:
    """`kubectl kustomize` of a kustomization: `path` relative to deploy/, or absolute."""
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def render(tmp: Path, base: str, components: list[str]) -> str:
    """`kubectl kustomize` of a kustomization in `tmp` that takes `base` and adds `components`
    (both relative to deploy/)."""
    rel = os.path.relpath(DEPLOY, tmp)
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{rel}/{base}"], "components": [f"{rel}/{c}" for c in components]}))
    return kustomize(tmp)


def validate(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """kubernetes-validate --strict over rendered manifests."""
    f = tmp_path / "rendered.yaml"
    f.write_text(text)
    exe = Path(sys.executable).parent / "kubernetes-validate"
    return subprocess.run([str(exe), "--strict", "--quiet", str(f)], capture_output=True, text=True,
                          timeout=120)


def find(docs, kind, name=None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert hits, f"no {kind} {name or ''}"
    return hits[0]


def triton_pod(docs) -> tuple[dict, dict]:
    """The serving Deployment's pod spec and its `triton` container."""
    pod = find(docs, "Deployment", "ganforge-triton")["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "triton")
