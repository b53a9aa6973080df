"""The onnxruntime stand-in backend's thread split: several instances share the CPUs the
process may use; a set `intra_op_thread_count` or a lone instance keep what they ask for."""

import importlib.util
import sys
import types

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def backend():
    # model.py imports the Python backend's utilities, which only exist inside tritonserver;
    # the functions tested here do not use them
    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location(
        "ganforge_ort_backend", ROOT / "serving" / "backends" / "onnxruntime" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def group(count, kind="KIND_CPU"):
    return {"instance_group": [{"count": count, "kind": kind}]}


@pytest.mark.parametrize("params, config, cpus, expected", [
    ({}, group(1), 2, 0),                                    # one instance: ORT's default
    ({}, group(2), 2, 1),                                    # two share two CPUs
    ({}, group(2), 16, 8),
    ({}, group(3), 2, 1),                                    # at least one each
    ({"intra_op_thread_count": "3"}, group(2), 16, 3),       # asked for: kept
    ({}, {"instance_group": [{"count": 2}, {"count": 2}]}, 8, 2),
    ({}, group(2, "KIND_GPU"), 8, 0),                        # GPU instances do not count
    ({}, {}, 4, 0),
])
def test_intra_op_threads(backend, params, config, cpus, expected):
    assert backend.intra_op_threads(params, config, cpus) == expected


def test_available_cpus_is_at_least_one_and_at_most_the_affinity_mask(backend):
    import os

    n = backend.available_cpus()
    assert 1 <= n <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("cpu_max, cap", [("max 100000\n", None), ("200000 100000\n", 2),
                                          ("150000 100000\n", 1), ("50000 100000\n", 1)])
def test_available_cpus_honours_a_cgroup_cpu_quota(backend, tmp_path, cpu_max, cap):
    import os

    f = tmp_path / "cpu.max"
    f.write_text(cpu_max)
    mask = len(os.sched_getaffinity(0))
    assert backend.available_cpus(str(f)) == (mask if cap is None else min(mask, cap))
