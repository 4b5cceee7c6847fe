"""Build and install marginkern.

The Triton kernels live in ./triton_kernels and are installed as the subpackage
``marginkern.triton_kernels`` (a bare top-level ``triton_kernels`` would clash with the PyPI package of
that name).

The C++ extension ``marginkern._C`` (csrc/cpu/*.cpp, csrc/common/*.cpp and the Python module init
csrc/python/module.cpp) is optional: it is built with torch's cpp_extension when torch is importable at
build time (install with ``--no-build-isolation``), and a failed compile only warns, so installing never
fails because of a compiler problem and importing marginkern never requires the extension (it falls back
to plain PyTorch and says so). MARGINKERN_BUILD_EXTENSION=0 skips it.

The CUDA kernels (csrc/cuda) are a second extension, ``marginkern._C_cuda``, built when torch has CUDA
and nvcc is found (CUDA_HOME); a failure there leaves ``marginkern._C`` intact. MARGINKERN_BUILD_CUDA=0
skips it; TORCH_CUDA_ARCH_LIST picks the GPU architectures (default: the GPUs of this machine).
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _warn(message):
    # setuptools hides warnings.warn output of a build; stderr reaches pip's log (and the user with -v).
    print(f"WARNING (marginkern): {message}", file=sys.stderr)


def cpp_extension_build():
    """(ext_modules, cmdclass) that build marginkern._C (and marginkern._C_cuda), or nothing when they cannot
    or should not be built."""
    if os.environ.get("MARGINKERN_BUILD_EXTENSION", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:
        _warn(f"torch is not importable at build time ({e}): building without the C++ extension; "
              "install torch first and use pip install --no-build-isolation to get it")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension whose failures leave the package installable without the extension."""

        def run(self):
            self.failed = set()
            try:
                super().run()
            except Exception as e:  # a compiler problem must never break the install
                _warn(f"building the C++ extension failed, installing without it ({type(e).__name__}: {e})")
                self.failed.update(ext.name for ext in self.extensions)
            # What was not built is not an output (an editable install links the outputs).
            self.extensions = [ext for ext in self.extensions if ext.name not in self.failed]

        def build_extensions(self):
            # torch's checks of the CUDA toolchain (nvcc's version against torch's CUDA, the host compiler
            # nvcc accepts) run once for all extensions, before any is built: their failure must only cost
            # the CUDA extension, never the CPU one.
            try:
                super().build_extensions()
            except Exception as e:
                cuda = [ext for ext in self.extensions if any(src.endswith(".cu") for src in ext.sources)]
                if not cuda or all(ext.name in self.failed for ext in cuda):
                    raise
                _warn(f"the CUDA toolchain check failed, building without {', '.join(ext.name for ext in cuda)} "
                      f"({type(e).__name__}: {e})")
                self.failed.update(ext.name for ext in cuda)
                self.extensions = [ext for ext in self.extensions if ext not in cuda]
                super().build_extensions()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                _warn(f"building {ext.name} failed, installing without it ({type(e).__name__}: {e})")
                self.failed.add(ext.name)

    if sys.platform == "win32":
        compile_args, link_args = ["/O2", "/openmp"], []
    elif sys.platform == "darwin":  # Apple clang has no -fopenmp: the row loops run on one thread
        compile_args, link_args = ["-O3", "-fno-trapping-math"], []
    else:
        # -fno-trapping-math (as torch's own build): without it GCC will not if-convert, hence not
        # vectorize, the clamps of the epilogue's exp.
        compile_args, link_args = ["-O3", "-fno-trapping-math", "-fopenmp"], ["-fopenmp"]
    common = sorted(glob.glob("csrc/common/*.cpp"))
    extensions = [CppExtension(
        "marginkern._C",
        sources=sorted(glob.glob("csrc/cpu/*.cpp")) + common + ["csrc/python/module.cpp"],
        include_dirs=[os.path.join(HERE, "csrc", "cpu")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        optional=True,  # an in-place (editable) build then skips copying it when it failed
    )]
    cuda = cuda_extension(common)
    if cuda is not None:
        extensions.append(cuda)
    return extensions, {"build_ext": OptionalBuildExtension}


def cuda_extension(common_sources):
    """The CUDA extension marginkern._C_cuda, or None when torch has no CUDA or nvcc is missing."""
    if os.environ.get("MARGINKERN_BUILD_CUDA", "1") == "0":
        return None
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    if torch.version.cuda is None:
        return None  # a CPU build of torch: nothing to link the kernels against, and nothing to say
    if CUDA_HOME is None:
        _warn("torch has CUDA but nvcc was not found (set CUDA_HOME): building without the CUDA kernels")
        return None
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        # torch picks the architectures from the visible GPUs; with none it fails with an IndexError
        _warn("torch has CUDA but no GPU is visible to pick the CUDA architectures from: building without the CUDA "
              "kernels (set TORCH_CUDA_ARCH_LIST, e.g. 9.0, to build them on a machine without a GPU)")
        return None
    return CUDAExtension(
        "marginkern._C_cuda",
        sources=sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp")) + common_sources
        + ["csrc/python/module_cuda.cpp"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17"]},
        optional=True,
    )


ext_modules, cmdclass = cpp_extension_build()

setup(
    name="marginkern",
    version="0.1.0",
    description="Fused streaming kernels for losses over very many classes (ArcFace/CosFace, LLM CE, ...)",
    packages=["marginkern", "marginkern.triton_kernels"],
    package_dir={"marginkern": "marginkern", "marginkern.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={
        # no version floor here: a CUDA torch pins its Triton, and a floor above that pin would make pip replace the
        # user's torch; the Triton backend itself refuses a Triton older than it is tested with (dispatch.MIN_TRITON)
        "triton": ["triton"],
        # transformers, trl: the versions marginkern.huggingface's and marginkern.trl's patches are tested against
        # (tests/test_huggingface.py, tests/test_trl.py)
        "test": ["pytest", "numpy", "triton", "scikit-learn", "cmake", "ninja", "transformers==5.25.0",
                 "accelerate==1.16.0", "trl==1.16.0"],
        "bench": ["matplotlib", "pytest-benchmark", "transformers==5.25.0"],  # transformers: bench/hf_cases.py
        "peers": ["liger-kernel", "cut-cross-entropy"],
    },
)
