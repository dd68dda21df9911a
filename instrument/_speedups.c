/* Stack keys for poolscope's hot path: the pure-Python walk, in C. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <stdint.h>

#define MAX_FRAMES 64

#if PY_VERSION_HEX < 0x030B0000
static int PyFrame_GetLasti(PyFrameObject *frame) { return frame->f_lasti; }
#endif

/* stack_key(skip, max_frames) -> int: a 64-bit hash of (code address, lasti) per frame,
   innermost first, starting `skip` frames above the caller. No allocation but the result. */
static PyObject *
stack_key(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "stack_key(skip, max_frames)");
        return NULL;
    }
    long skip = PyLong_AsLong(args[0]);
    long max_frames = PyLong_AsLong(args[1]);
    if ((skip == -1 || max_frames == -1) && PyErr_Occurred()) return NULL;
    uint64_t h = 1469598103934665603ULL;  /* FNV-1a offset basis */
    PyFrameObject *frame = PyEval_GetFrame();  /* borrowed */
    Py_XINCREF(frame);
    while (frame != NULL && skip > 0) {
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
        skip--;
    }
    long n = 0;
    while (frame != NULL && n < max_frames) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        h = (h ^ (uint64_t)(uintptr_t)code) * 1099511628211ULL;
        Py_DECREF(code);
        h = (h ^ (uint64_t)PyFrame_GetLasti(frame)) * 1099511628211ULL;
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
        n++;
    }
    Py_XDECREF(frame);
    return PyLong_FromUnsignedLongLong(h);
}

static PyMethodDef methods[] = {
    {"stack_key", (PyCFunction)(void (*)(void))stack_key, METH_FASTCALL,
     "stack_key(skip, max_frames) -> int: hash of (code, lasti) per frame, innermost first."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups", "C helpers for poolscope's hot path.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
