import os

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
