"""Build and install marginkern.

The Triton kernels live in ./triton_kernels and are installed as the subpackage
``marginkern.triton_kernels`` (a bare top-level ``triton_kernels`` would clash with the PyPI package of
that name). The C++ extension ``marginkern._C`` (csrc/) is optional: it is built when the sources are
present and a compiler works; importing marginkern never requires it.
"""
from setuptools import setup

setup(
    name="marginkern",
    version="0.1.0",
    description="Fused streaming kernels for losses over very many classes (ArcFace/CosFace, LLM CE, ...)",
    packages=["marginkern", "marginkern.triton_kernels"],
    package_dir={"marginkern": "marginkern", "marginkern.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "numpy", "triton>=3.2"],
        "bench": ["matplotlib", "pytest-benchmark"],
        "peers": ["liger-kernel", "cut-cross-entropy"],
    },
)
