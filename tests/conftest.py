import os

import pytest
import torch


def pytest_configure(config):
    # CI sets MARGINKERN_REQUIRE_CPP=1: without it a C++ extension that failed to build (setup.py turns that
    # into a warning, and the C++ tests skip) would leave a green run that tested no C++ at all.
    if os.environ.get("MARGINKERN_REQUIRE_CPP") == "1":
        from marginkern import cpp_tiles
        if cpp_tiles.LOAD_ERROR is not None:
            raise pytest.UsageError(f"MARGINKERN_REQUIRE_CPP=1, but {cpp_tiles.LOAD_ERROR}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["cpp", "reference"])
def cpu_backend(request, monkeypatch):
    """Both CPU backends for the test: the C++ kernels (the default; their own backward loops) and the PyTorch tiles
    (the engine's loop), skipping the C++ one where marginkern._C is not built."""
    from marginkern import cpp_tiles
    if request.param == "cpp" and cpp_tiles.LOAD_ERROR is not None:
        pytest.skip(cpp_tiles.LOAD_ERROR)
    monkeypatch.setenv("MARGINKERN_BACKEND", request.param)
    return request.param
