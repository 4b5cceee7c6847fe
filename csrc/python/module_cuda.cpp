// The Python module init of marginkern._C_cuda: module.cpp under another name.
#define MARGINKERN_PY_MODULE _C_cuda
#define MARGINKERN_PY_DOC "CUDA kernels of marginkern; use them via torch.ops.marginkern.*"
#include "module.cpp"
