// The Python module init of marginkern._C, compiled by setup.py only.
//
// `import marginkern._C` loads the shared library, and loading it runs the static initialisers of
// csrc/cpu (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL) that register torch.ops.marginkern.streaming_*.
// The ops need nothing from Python, so the module is empty and the CMake build (LibTorch, no Python)
// leaves this file out.
#include <Python.h>

static PyModuleDef marginkern_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "C++ CPU kernels of marginkern; use them via torch.ops.marginkern.*",
    -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&marginkern_c_module); }
