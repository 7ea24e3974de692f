// The Python module tbd_ops._C. Importing it loads the shared library, which
// runs the static operator registrations of csrc/<op>.cpp, csrc/cpu/*.cpp and
// cuda/<op>_glue.cpp; the module itself only records how it was built.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef TBD_OPS_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
