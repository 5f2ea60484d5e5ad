"""Shared fixtures: small models and updates, seeded."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fedagg

settings.register_profile(
    "fedagg",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    print_blob=True,
)
settings.load_profile("fedagg")


def make_model(kind: str = "dict", dtype: Any = np.float32, seed: int = 0) -> Any:
    """A model with a matrix, a vector and a scalar-shaped array: tiny, or with a "big" matrix
    (70,000 elements: large enough for the compiled kernels)."""
    rng = np.random.default_rng(seed)
    arrays = [
        rng.standard_normal((280, 250) if kind == "big" else (3, 4)).astype(dtype),
        rng.standard_normal(4).astype(dtype),
        np.asarray(rng.standard_normal(()), dtype=dtype),
    ]
    if kind in ("dict", "big"):
        return dict(zip(["w", "b", "s"], arrays, strict=True))
    return arrays


def random_delta(spec: fedagg.ParamSpec, rng: np.random.Generator, scale: float = 1.0) -> Any:
    flat = (rng.standard_normal(spec.size) * scale).astype(spec.dtype)
    return (
        {k: v.copy() for k, v in spec.unflatten(flat).items()}
        if spec.keyed
        else [v.copy() for v in spec.unflatten(flat)]
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
