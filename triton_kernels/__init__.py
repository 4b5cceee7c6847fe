"""Triton kernels of marginkern, installed as ``marginkern.triton_kernels``."""
from .tiles import TritonTiles

__all__ = ["TritonTiles"]
