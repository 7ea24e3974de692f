// tbd_ops_emu: the test-only build of the CUDA path on the SIMT emulator.
// Loading it registers the emulated CUDA kernels (cuda/*.cu compiled by the
// host compiler, with the registration glue cuda/<op>_glue.cpp) for CPU tensors
// under the operator namespace tbd_ops_emu; tests/emu/dispatch.py routes
// torch.ops.tbd_ops calls there. Never installed.
#include <Python.h>

#include "../../cuda/channel_max_spatial_softmax.h"
#include "../../cuda/emu/simt.h"

namespace {

PyObject* set_schedule(PyObject*, PyObject* args) {
  int s = 0;
  unsigned long long seed = 0;
  if (!PyArg_ParseTuple(args, "iK", &s, &seed)) return nullptr;
  if (s < 0 || s > 2) {
    PyErr_Format(PyExc_ValueError, "schedule must be 0 (forward), 1 (reverse) or 2 (shuffle), got %d", s);
    return nullptr;
  }
  tbd_emu::set_schedule(static_cast<tbd_emu::Schedule>(s), seed);
  Py_RETURN_NONE;
}

PyObject* launch_count(PyObject*, PyObject*) {
  return PyLong_FromUnsignedLongLong(tbd_emu::launch_count());
}

PyObject* op_counts(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  for (const auto& [name, count] : tbd_emu::op_counts()) {
    PyObject* v = PyLong_FromUnsignedLongLong(count);
    if (v == nullptr || PyDict_SetItemString(d, name.c_str(), v) != 0) {
      Py_XDECREF(v);
      Py_DECREF(d);
      return nullptr;
    }
    Py_DECREF(v);
  }
  return d;
}

PyObject* reset_op_counts(PyObject*, PyObject*) {
  tbd_emu::reset_op_counts();
  Py_RETURN_NONE;
}

PyObject* set_grid_yz_limit(PyObject*, PyObject* args) {
  unsigned limit = 0;
  if (!PyArg_ParseTuple(args, "I", &limit)) return nullptr;
  tbd_emu::set_grid_yz_limit(limit);
  return PyLong_FromUnsignedLong(tbd_emu::grid_yz_limit());
}

PyObject* set_channel_split_policy(PyObject*, PyObject* args) {
  int policy = 0;
  if (!PyArg_ParseTuple(args, "i", &policy)) return nullptr;
  if (policy < 0 || policy > 2) {
    PyErr_Format(PyExc_ValueError, "policy must be 0 (rule), 1 (serial) or 2 (split), got %d", policy);
    return nullptr;
  }
  return PyLong_FromLong(tbd_ops::cuda::set_channel_split_policy(policy));
}

PyMethodDef methods[] = {
    {"set_channel_split_policy", set_channel_split_policy, METH_VARARGS,
     "set_channel_split_policy(p): how the kernels of p_c and the masked reductions spread a "
     "location's channels over threads: 0 by the rule on the launch's location count, 1 one "
     "thread per location, 2 split (channels_last always splits over lanes); returns the "
     "previous policy."},
    {"op_counts", op_counts, METH_NOARGS,
     "op_counts(): {name: count} of the device operations since the last reset: kernel launches "
     "by kernel name, 'memset' and 'sort_pairs' (the stream operations of cuda/backend.cuh)."},
    {"reset_op_counts", reset_op_counts, METH_NOARGS, "Clears op_counts()."},
    {"set_grid_yz_limit", set_grid_yz_limit, METH_VARARGS,
     "set_grid_yz_limit(n): the grid.y/grid.z limit launches are checked against and launchers "
     "chunk by (0 restores 65535); returns the limit in force."},
    {"set_schedule", set_schedule, METH_VARARGS,
     "set_schedule(schedule, seed): thread resume order of later launches from this thread "
     "(0 forward, 1 reverse, 2 seeded shuffle)."},
    {"launch_count", launch_count, METH_NOARGS, "Kernel launches emulated so far."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit_tbd_ops_emu(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "tbd_ops_emu", nullptr, -1, methods};
  return PyModule_Create(&def);
}
