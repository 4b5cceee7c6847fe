"""Latent int32 overflow probe of epilogue::reduce_subcenters_row (csrc/cpu/row_epilogue.cpp:210-229), which indexes
row[j * K + k] and scale[j * K + k] with int j, K, k. Calls the exported C++ function directly through ctypes on
cc·K > 2^31 elements of anonymous NORESERVE mappings (untouched pages read as the shared zero page: no RAM).
Only the last class's K values are written (1..K); expected best[cc-1] = K, winner[cc-1] = K-1.

python subcenter_int_overflow.py [float|double] [cc] [K]
"""
import ctypes
import mmap
import sys

import torch  # noqa: F401  (loads libtorch for the extension)
import marginkern  # noqa: F401
import marginkern._C as ext

kind = sys.argv[1] if len(sys.argv) > 1 else "float"
cc = int(sys.argv[2]) if len(sys.argv) > 2 else (1 << 21) + 16
K = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
T, sym = {"float": (ctypes.c_float, "_ZN10marginkern8epilogue21reduce_subcenters_rowEPKfS2_iiPfPi"),
          "double": (ctypes.c_double, "_ZN10marginkern8epilogue21reduce_subcenters_rowEPKdS2_iiPdPi")}[kind]
lib = ctypes.CDLL(ext.__file__)
fn = getattr(lib, sym)
P = ctypes.POINTER(T)
fn.argtypes = [P, P, ctypes.c_int, ctypes.c_int, P, ctypes.POINTER(ctypes.c_int32)]
fn.restype = None

n = cc * K
print(f"{kind}: cc={cc} K={K} cc*K={n} (2^31 = {1 << 31}, over by {n - (1 << 31)})", flush=True)
size = n * ctypes.sizeof(T)
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
row_map = mmap.mmap(-1, size, flags=flags)
scale_map = mmap.mmap(-1, size, flags=flags)
row = (T * n).from_buffer(row_map)
scale = (T * n).from_buffer(scale_map)
base = (cc - 1) * K
for k in range(K):
    row[base + k] = k + 1.0
    scale[base + k] = 1.0
best = (T * cc)()
winner = (ctypes.c_int32 * cc)()
fn(ctypes.cast(row, P), ctypes.cast(scale, P), cc, K, ctypes.cast(best, P), winner)
print(f"best[cc-1] = {best[cc - 1]} (expected {float(K)}), winner[cc-1] = {winner[cc - 1]} (expected {K - 1})")
print(f"best[0] = {best[0]}, winner[0] = {winner[0]} (expected 0.0, 0)")
ok = best[cc - 1] == K and winner[cc - 1] == K - 1
print("OK" if ok else "WRONG RESULT: int32 index overflow")
sys.exit(0 if ok else 1)
