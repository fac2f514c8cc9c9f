import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Deterministic in CI: the same examples every run, no deadline on a noisy 2-core machine.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=120, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)


@pytest.fixture
def census_data(tmp_path, monkeypatch):
    """600 Census-income rows in the upstream format, found through DECONFLICT_DATA."""
    from test_experiment_data import census_rows, write_census

    write_census(tmp_path / "data" / "census-income", census_rows(600))
    monkeypatch.setenv("DECONFLICT_DATA", str(tmp_path / "data"))
