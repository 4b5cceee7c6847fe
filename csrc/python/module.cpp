// The Python module init of marginkern._C (and, compiled by module_cuda.cpp, of marginkern._C_cuda);
// setup.py only.
//
// `import marginkern._C` loads the shared library, and loading it runs the static initialisers of
// csrc/cpu (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL) that register torch.ops.marginkern.streaming_*;
// marginkern._C_cuda's register the CUDA kernels of csrc/cuda. The ops need nothing from Python, so the
// module is empty and the CMake build (LibTorch, no Python) leaves this file out.
#include <Python.h>

#ifndef MARGINKERN_PY_MODULE
#define MARGINKERN_PY_MODULE _C
#define MARGINKERN_PY_DOC "C++ CPU kernels of marginkern; use them via torch.ops.marginkern.*"
#endif

#define MARGINKERN_STR_(name) #name
#define MARGINKERN_STR(name) MARGINKERN_STR_(name)
#define MARGINKERN_INIT_(name) PyInit_##name
#define MARGINKERN_INIT(name) MARGINKERN_INIT_(name)

static PyModuleDef marginkern_c_module = {
    PyModuleDef_HEAD_INIT, MARGINKERN_STR(MARGINKERN_PY_MODULE), MARGINKERN_PY_DOC, -1, nullptr,
};

PyMODINIT_FUNC MARGINKERN_INIT(MARGINKERN_PY_MODULE)(void) { return PyModule_Create(&marginkern_c_module); }
