"""Property-based tests (hypothesis) of every function that parses client input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ganforge.cli import _key_value
from ganforge.errors import UsageError
from ganforge.serving.client import check_count, check_seed
from ganforge.serving.sampler import SEED_MAX, check_request, sample_latents

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


dtypes = st.sampled_from([np.int64, np.int32, np.int16, np.uint64, np.float32, np.float64])


@given(st.integers(min_value=-2**63, max_value=2**63 - 1), st.integers(min_value=-2**31, max_value=2**31 - 1),
       dtypes, dtypes, st.integers(min_value=0, max_value=3), st.integers(min_value=1, max_value=128))
def test_sampler_check_request_validates_dtype_size_and_range(seed, count, seed_dtype, count_dtype, size, limit):
    s = np.full((size,), seed if np.dtype(seed_dtype).kind == "i" and np.can_cast(np.min_scalar_type(seed), seed_dtype) else 1, seed_dtype)
    c = np.full((size,), count if np.dtype(count_dtype).kind == "i" and np.can_cast(np.min_scalar_type(count), count_dtype) else 1, count_dtype)
    ok = (seed_dtype is np.int64 and count_dtype is np.int32 and size == 1
          and int(s[0]) >= 0 and 1 <= int(c[0]) <= limit)
    if ok:
        assert check_request(s, c, limit) == (int(s[0]), int(c[0]))
    else:
        with pytest.raises(ValueError, match=r"^(seed|count): "):
            check_request(s, c, limit)


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
