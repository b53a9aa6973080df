"""Seeded latents: (seed, count) -> latent (count, z_dim), as numpy and as a Triton Python model.

Image i of a request is drawn from its own stream, `default_rng([seed, i])`, so it depends only
on (seed, i, z_dim): "8 images for seed 42" starts with the 4 images of "4 images for seed 42",
and the dynamic batcher merging requests changes nothing.

This file is copied as `model.py` into each generator's `NAME_sampler/1/` by `ganforge export`;
inside Triton it must stand alone (numpy only).
"""

from __future__ import annotations

import json
import os
import sys

SEED_MAX = 2**63 - 1


def sample_latents(seed: int, count: int, z_dim: int):
    import numpy as np

    out = np.empty((count, z_dim), dtype=np.float32)
    for i in range(count):
        out[i] = np.random.default_rng([seed, i]).standard_normal(z_dim, dtype=np.float32)
    return out


def check_request(seed, count, max_count: int) -> tuple[int, int]:
    """Validate the raw `seed` and `count` tensors; return them as ints or raise ValueError
    with a message naming the field, the value and what is allowed."""
    import numpy as np

    for name, value, dtype in (("seed", seed, np.int64), ("count", count, np.int32)):
        if value.dtype != dtype:
            raise ValueError(f"{name}: dtype {value.dtype} is not allowed; send {np.dtype(dtype).name}")
        if value.size != 1:
            raise ValueError(f"{name}: expected exactly one value, got shape {list(value.shape)}")
    s, c = int(seed.reshape(-1)[0]), int(count.reshape(-1)[0])
    if s < 0:
        raise ValueError(f"seed: {s} is not allowed; must be in [0, {SEED_MAX}]")
    if not 1 <= c <= max_count:
        raise ValueError(f"count: {c} is not allowed; must be in [1, {max_count}]")
    return s, c


class TritonPythonModel:
    def initialize(self, args):
        # The stub's interpreter ignores PYTHONPATH: put the environment's packages first
        # so numpy is the one the launcher's environment holds, not the base interpreter's.
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:0] = [p for p in extra if p not in sys.path]
        import numpy as np
        import triton_python_backend_utils as pb_utils

        self.np, self.pb = np, pb_utils
        params = json.loads(args["model_config"]).get("parameters", {})
        self.z_dim = int(params["z_dim"]["string_value"])
        self.max_count = int(params["max_count"]["string_value"])

    def execute(self, requests):
        pb = self.pb
        responses = []
        for request in requests:
            try:
                seed = pb.get_input_tensor_by_name(request, "seed")
                count = pb.get_input_tensor_by_name(request, "count")
                if seed is None or count is None:
                    raise ValueError("inputs: 'seed' (INT64 [1]) and 'count' (INT32 [1]) are required")
                s, c = check_request(seed.as_numpy(), count.as_numpy(), self.max_count)
                latent = sample_latents(s, c, self.z_dim)
                responses.append(pb.InferenceResponse([pb.Tensor("latent", latent)]))
            except ValueError as exc:
                responses.append(pb.InferenceResponse(
                    error=pb.TritonError(str(exc), pb.TritonError.INVALID_ARG)))
        return responses
