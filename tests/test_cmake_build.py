"""The LibTorch build of csrc (CMakeLists.txt) and its C++ tests, as the csrc issue's command runs them:

    cmake -S . -B build -G Ninja -DCMAKE_PREFIX_PATH=$(python -c 'import torch;print(torch.utils.cmake_prefix_path)')
    cmake --build build && ctest --test-dir build

cmake and ninja come with the test extras (pip); one to two minutes on two cores. Then a Python process loads the
LibTorch library (torch.ops.load_library, as a mixed C++/Python program would) and imports marginkern, which must
use the ops already registered instead of loading its own extension over them (that aborted the process).
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO



def _tool(name):
    """The tool from this environment's bin (pip's cmake/ninja) or the PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else shutil.which(name)


@pytest.mark.skipif(_tool("cmake") is None, reason="cmake is not installed (pip install cmake)")
def test_cmake_build_and_ctest(tmp_path):
    build = str(tmp_path / "build")
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}"] if _tool("ninja") else []
    steps = [
        [_tool("cmake"), "-S", REPO, "-B", build, *generator, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        [_tool("cmake"), "--build", build],
        [_tool("ctest") or "ctest", "--test-dir", build, "--output-on-failure"],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode and cmd is steps[0] and torch.version.cuda:
            # find_package(Torch) of a CUDA LibTorch wants a CUDA toolkit that matches it (README: nvrtc, the
            # architectures); this torch's CUDA (12.4 for pip's torch 2.6) and this machine's toolkit may differ
            errors = [line for line in proc.stderr.splitlines() if "Error" in line or "NOTFOUND" in line]
            pytest.skip(f"CMake could not configure against this CUDA LibTorch (CUDA {torch.version.cuda}): "
                        + " | ".join(errors[:3]))
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "100% tests passed" in proc.stdout, proc.stdout[-2000:]
    library = os.path.join(build, "libmarginkern_cpu.so")
    script = (f"import torch; torch.ops.load_library({library!r})\n"
              "import marginkern as mk\n"
              "x = torch.randn(4, 8, requires_grad=True); w = torch.randn(5, 8)\n"
              "mk.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3])).backward()\n"
              "assert x.grad is not None and mk.cpp_tiles.LOAD_ERROR is None\n"
              "print('ok')")
    env = {k: v for k, v in os.environ.items() if k not in ("MARGINKERN_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
