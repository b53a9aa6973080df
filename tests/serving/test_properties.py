"""Property-based tests (hypothesis) of every function that parses client input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ganforge.cli import _key_value
from ganforge.errors import UsageError
from ganforge.serving.client import check_count, check_seed
from ganforge.serving.sampler import SEED_MAX, latent_graph, latents, sample_latents

anything = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=5),
                     st.integers(min_value=-2**70, max_value=2**70), st.lists(st.integers(), max_size=2))


@given(anything)
def test_check_seed_accepts_exactly_the_integers_in_range(value):
    valid = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SEED_MAX
    if valid:
        assert check_seed(value) == value
    else:
        with pytest.raises(UsageError, match=r"^seed: .* is not allowed"):
            check_seed(value)


@given(anything, st.integers(min_value=1, max_value=1024))
def test_check_count_accepts_exactly_the_integers_from_one_to_the_limit(value, limit):
    valid = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit
    if valid:
        assert check_count(value, limit) == value
    else:
        with pytest.raises(UsageError, match=r"^count: .* is not allowed"):
            check_count(value, limit)


@pytest.fixture(scope="module")
def latent_sessions():
    import onnxruntime as ort

    return {z: ort.InferenceSession(latent_graph(z).SerializeToString(), providers=["CPUExecutionProvider"])
            for z in (1, 7, 64)}


int64s = st.integers(min_value=-2**63, max_value=2**63 - 1)


@settings(max_examples=60)
@given(st.lists(st.tuples(int64s, int64s), min_size=1, max_size=9), st.sampled_from([1, 7, 64]))
def test_the_onnx_sampler_draws_the_numpy_latents_for_any_int64_seed_and_index(latent_sessions, rows, z_dim):
    """Whatever a raw client sends (negative values included: two's complement in both), the
    served graph and numpy agree to float32 rounding, and every latent is finite."""
    seeds = np.array([[r[0]] for r in rows], np.int64)
    index = np.array([[r[1]] for r in rows], np.int64)
    got = latent_sessions[z_dim].run(None, {"seed": seeds, "index": index})[0]
    want = latents(seeds, index, z_dim)
    assert got.shape == (len(rows), z_dim) and np.isfinite(got).all()
    assert np.abs(got - want).max() <= 1e-6


def test_latents_are_standard_normal():
    z = sample_latents(11, 4000, 64).ravel().astype(np.float64)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    # the tails: 4.55 % of a standard normal lies beyond 2 sigma
    assert abs((np.abs(z) > 2).mean() - 0.0455) < 0.003
    # neighbouring seeds and indices are not correlated
    a, b = sample_latents(11, 2000, 64), sample_latents(12, 2000, 64)
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(a[:-1].ravel(), a[1:].ravel())[0, 1]) < 0.01


@settings(max_examples=30)
@given(st.integers(min_value=0, max_value=SEED_MAX), st.integers(min_value=1, max_value=16),
       st.integers(min_value=1, max_value=128))
def test_latents_depend_only_on_seed_and_index(seed, count, z_dim):
    a = sample_latents(seed, count, z_dim)
    assert a.shape == (count, z_dim) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(sample_latents(seed, count + 3, z_dim)[:count], a)
    assert np.array_equal(sample_latents(seed, count, z_dim), a)


@given(st.text(max_size=20))
def test_key_value_flag_parses_or_names_the_flag(text):
    key, sep, value = text.partition("=")
    if sep and key.strip() and value.strip():
        assert _key_value(text, "--key") == (key.strip().lower(), value.strip())
    else:
        with pytest.raises(UsageError, match=r"^--key: .* expected KEY=VALUE"):
            _key_value(text, "--key")
