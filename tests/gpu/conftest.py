"""GPU tests run on the GPU machine only (never in CI): skipped where CUDA is absent."""

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        item.add_marker(skip)
