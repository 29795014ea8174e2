"""Shared fixtures. Hypothesis profiles: "ci" (default, fast), "thorough" and "fuzz" (long runs: `make fuzz`,
which selects the tests marked ``fuzz``; or HYPOTHESIS_PROFILE=thorough for the whole suite)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def rand_model():
    """A random-weight model of the default architecture (192x192x1, one class)."""
    from app.randmodel import random_model

    return random_model(seed=0)


@pytest.fixture(scope="session")
def rand_model_file(rand_model, tmp_path_factory):
    """rand_model written to a temporary .xnc file."""
    from app.modelfile import write_model

    path = tmp_path_factory.mktemp("models") / "random.xnc"
    write_model(path, rand_model)
    return path
