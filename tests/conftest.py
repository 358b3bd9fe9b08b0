"""Test set-up. Triton's interpreter must be chosen before triton is imported: without a GPU
every Triton kernel runs under TRITON_INTERPRET=1, on the CPU."""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import random

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "lowrank",
    deadline=None,
    max_examples=int(os.environ.get("LOWRANK_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("CI") == "true",
)
settings.load_profile("lowrank")

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: runs on the GPU machine via bench/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
