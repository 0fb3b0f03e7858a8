import os

import pytest

try:
    from hypothesis import settings

    settings.register_profile("rotorquant", deadline=None, max_examples=50, derandomize=True)
    settings.load_profile("rotorquant")
except ImportError:  # hypothesis is in the [test] extra
    pass


def pytest_collection_modifyitems(config, items):
    """Skips `cuda` tests cleanly when no CUDA device is usable (CI has none)."""
    import rotorquant

    if rotorquant.has_cuda():
        return
    try:
        import torch  # noqa: F401

        has_torch_cuda = torch.cuda.is_available()
    except ImportError:
        has_torch_cuda = False
    reason = ("no usable CUDA device" if rotorquant._core.built_with_cuda else "rotorquant built without CUDA")
    if not has_torch_cuda:
        reason += " (and torch has no CUDA)"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # not item.keywords: a folder named cuda matches it
            item.add_marker(skip)
