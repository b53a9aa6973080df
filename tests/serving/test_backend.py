"""The onnxruntime stand-in backend's pure parts: the thread split (several instances share the
CPUs the process may use; a set `intra_op_thread_count` or a lone instance keep what they ask
for) and the `allowed_values` parameter that limits the inpainter's mask to 0 and 255."""

import importlib.util
import sys
import types

import numpy as np
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


def test_allowed_values_parameter_round_trips_from_the_config(backend):
    from ganforge.serving.repository import format_allowed_values

    text = format_allowed_values({"mask": (0, 255), "labels": (1, 2, 3)})
    assert text == "mask=0,255;labels=1,2,3"
    tables = backend.parse_allowed_values(text)
    assert sorted(tables) == ["labels", "mask"]
    assert list(np.flatnonzero(tables["mask"])) == [0, 255]
    assert list(np.flatnonzero(tables["labels"])) == [1, 2, 3]
    assert backend.parse_allowed_values("") == {}


@pytest.mark.parametrize("text, message", [
    ("mask", "'mask' is not NAME=V1,V2,..."),
    ("=0,255", "'=0,255' is not NAME=V1,V2,..."),
    ("mask=0,x", "'mask=0,x' holds a value that is not an integer"),
    ("mask=0,256", "'mask=0,256' holds a value outside [0, 255]"),
])
def test_a_bad_allowed_values_parameter_is_refused_with_its_text(backend, text, message):
    with pytest.raises(ValueError) as err:
        backend.parse_allowed_values(text)
    assert str(err.value) == f"parameter allowed_values: {message}"


def test_check_values_names_the_first_value_that_is_not_allowed(backend):
    table = backend.parse_allowed_values("mask=0,255")["mask"]
    m = np.zeros((2, 4, 4, 1), np.uint8)
    m[0, 1:3, 1:3] = 255
    backend.check_values("mask", m, table)  # 0 and 255 only: fine
    m[1, 2, 3, 0] = 254
    m[1, 3, 3, 0] = 1
    with pytest.raises(ValueError) as err:
        backend.check_values("mask", m, table)
    assert str(err.value) == "input 'mask': value 254 at [1, 2, 3, 0] is not allowed; send only 0, 255"
