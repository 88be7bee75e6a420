"""Test-wide setup: without CUDA, run the real Triton kernels on CPU tensors through
Triton's interpreter. This must happen before anything imports Triton."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA (the Triton interpreter cannot run this, e.g. bfloat16)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: CUDA when present, else the CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
