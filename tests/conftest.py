"""Shared fixtures: a tiny trained DCGAN, its exported repository, and a real tritonserver
serving it for the whole session (no mocks of Triton or gRPC)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (real training or a server)")
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU; skipped without one")
    config.addinivalue_line("markers", "tensorrt: needs TensorRT and a GPU; skipped without them")


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
    if not has_gpu():
        skip, marks = pytest.mark.skip(reason="no NVIDIA GPU on this machine (nvidia-smi -L fails)"), ("gpu", "tensorrt")
    elif importlib.util.find_spec("tensorrt") is None:
        skip, marks = pytest.mark.skip(reason="TensorRT is not installed (pip install 'ganforge[gpu]')"), ("tensorrt",)
    else:
        return
    for item in items:
        if any(m in item.keywords for m in marks):
            item.add_marker(skip)


TINY = dict(z_dim=16, ngf=8, ndf=8, resolution=64)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A DCGAN trained for a few steps: enough to have non-trivial weights."""
    from ganforge.training.gan import DCGANConfig
    from ganforge.training.loop import TrainConfig, train_dcgan

    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = TrainConfig(steps=6, batch_size=16, n_images=64, sample_every=3, log_every=2,
                      threads=2, network=DCGANConfig(**TINY))
    train_dcgan(cfg, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_repo(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    from ganforge.export.triton import export_generator

    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    summary = export_generator(tiny_run, repo, name="tiny", max_batch_size=8, log=lambda m: None)
    return repo, summary


@pytest.fixture(scope="session")
def server(tiny_repo):
    """The real tritonserver from nvidia-pytriton serving the tiny repository."""
    from ganforge.serving.server import LocalServer, ServerOptions, free_port

    repo, _ = tiny_repo
    opts = ServerOptions(model_repository=repo, grpc_port=free_port(), http_port=free_port(),
                         metrics_port=free_port(), exit_timeout_s=5)
    srv = LocalServer(opts).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    from ganforge.serving.client import Client

    with Client(server.grpc_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def digit_cache(tmp_path_factory) -> Path:
    """A cache directory holding the digit classifier, trained once (a few seconds on one core)."""
    import torch

    from ganforge.training.metrics import load_digit_classifier

    cache = tmp_path_factory.mktemp("cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_digit_classifier(cache)
    finally:
        torch.set_num_threads(threads)
    return cache


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    """The classifiers' default cache for this session (GANFORGE_CACHE, inherited by the CLI
    runs): no test writes into the user's ~/.cache, and a classifier a run needs (the ProGAN
    doctor's judge) is trained at most once per session."""
    cache = tmp_path_factory.mktemp("ganforge_cache")
    before = os.environ.get("GANFORGE_CACHE")
    os.environ["GANFORGE_CACHE"] = str(cache)
    yield cache
    if before is None:
        os.environ.pop("GANFORGE_CACHE", None)
    else:
        os.environ["GANFORGE_CACHE"] = before


@pytest.fixture(scope="session")
def shapes_cache(session_cache) -> Path:
    """The session's cache holding the shapes classifier of the Fréchet distance, trained once
    from its seed (under a minute on 2 cores) and shared by the tests that need it."""
    from ganforge.training.metrics import load_classifier

    load_classifier(session_cache)
    return session_cache


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `ganforge` command as a user would."""
    exe = Path(sys.executable).parent / "ganforge"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ganforge"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
