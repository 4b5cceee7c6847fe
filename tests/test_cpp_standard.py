"""The C++ extension's sources compile as C++17 as well as C++20.

setup.py supports torch >= 2.6, and torch.utils.cpp_extension compiles with -std=c++17 before torch 2.13 (C++20
since): a C++20-only construct in csrc (std::bit_cast was one) fails the extension's build there, and the install
falls back to plain PyTorch (a warning in pip's log, which -q hides), losing the C++ path's speed and memory bound.
CI's torch (2.13) compiles these with C++20, so this checks C++17 by hand, with -fsyntax-only against this torch's
headers; torch >= 2.14's headers refuse C++17 themselves, and then it skips.
"""
import glob
import os
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch.utils.cpp_extension as cpp_extension

from tests.helpers import CXX, REPO, TORCH_REFUSES_CPP17

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


def extension_sources():
    """What setup.py compiles into marginkern._C."""
    found = sorted(glob.glob(os.path.join(REPO, "csrc", "cpu", "*.cpp")) +
                   glob.glob(os.path.join(REPO, "csrc", "common", "*.cpp")))
    return found + [os.path.join(REPO, "csrc", "python", "module.cpp")]


def compile_as(std, source):
    includes = ([f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
                + [f"-I{os.path.join(REPO, 'csrc', 'cpu')}"])
    proc = subprocess.run([CXX, f"-std={std}", "-fsyntax-only", "-fopenmp", *includes, source], capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_extension_sources_compile_as_cpp17():
    sources = extension_sources()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda source: compile_as("c++17", source), sources))
    if any(TORCH_REFUSES_CPP17 in log for _, log in results):
        pytest.skip("this torch's headers need C++20 (torch >= 2.14): its cpp_extension builds with C++20")
    failed = {os.path.relpath(source, REPO): log for source, (rc, log) in zip(sources, results) if rc != 0}
    assert not failed, "\n\n".join(f"{name}:\n{log}" for name, log in failed.items())


def test_a_cpp20_construct_is_caught(tmp_path):
    """The check itself: std::bit_cast (C++20) in a source the extension compiles fails it."""
    source = tmp_path / "uses_bit_cast.cpp"
    source.write_text('#include "row_epilogue.h"\n#include <bit>\n'
                      'int bits(float x) { return std::bit_cast<int>(x); }\n')
    rc, log = compile_as("c++17", str(source))
    assert rc != 0 and "bit_cast" in log, log
    assert compile_as("c++20", str(source))[0] == 0
