/* Every Python-version and platform gate of the C helpers, in one place. poolscope
   claims CPython 3.10 and later; a helper that cannot be built or used somewhere is
   simply left off there (the pure-Python path does the same work). */
#ifndef POOLSCOPE_COMPAT_H
#define POOLSCOPE_COMPAT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <stddef.h>  /* offsetof: Python.h brings it from 3.11 on, not on 3.10 */

/* 3.11 and 3.12: the stack walk reads the interpreter's own frame records, as greenlet
   and profilers do; PyFrame_GetBack() would allocate a frame object for every caller,
   which costs more than the rest of the walk on a deep stack. Elsewhere it uses the
   public frame API. Only for a helper that walks frames (it defines POOLSCOPE_WALKS_FRAMES
   before including this header): the internal header needs Py_BUILD_CORE. */
#if defined(POOLSCOPE_WALKS_FRAMES) && PY_VERSION_HEX >= 0x030B0000 && \
    PY_VERSION_HEX < 0x030D0000
#  define POOLSCOPE_FRAME_RECORDS 1
#  ifndef Py_BUILD_CORE
#    define Py_BUILD_CORE 1
#  endif
#  include <internal/pycore_frame.h>
#endif

/* 3.10: no PyFrame_GetLasti(). */
#if PY_VERSION_HEX < 0x030B0000
static inline int PyFrame_GetLasti(PyFrameObject *frame) { return frame->f_lasti; }
#endif

/* Whether the weak reference `ref` still points to its object: 1, 0, or -1 on an error.
   3.13 deprecates PyWeakref_GetObject() for PyWeakref_GetRef(). */
static inline int
poolscope_weakref_alive(PyObject *ref)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *object;
    int alive = PyWeakref_GetRef(ref, &object);
    Py_XDECREF(object);
    return alive;
#else
    PyObject *object = PyWeakref_GetObject(ref);  /* borrowed */
    if (object == NULL) return -1;
    return object != Py_None;
#endif
}

/* _sqlite_rows finds SQLite's functions in the sqlite3 module's own library with
   dlopen/dlsym; without them it loads nothing and the writer binds through sqlite3. */
#if defined(__unix__) || defined(__APPLE__)
#  include <dlfcn.h>
#  define POOLSCOPE_HAVE_DLOPEN 1
#endif

/* Free-threaded builds: the helpers rely on the GIL (the listeners read and write the
   monitor's dicts and the queue without locks), and say so. poolscope does not import
   them where the GIL is off (see _native.py), so this never turns a disabled GIL back
   on behind the application's back; it is the honest answer for an interpreter run
   with the GIL on (PYTHON_GIL=1). */
static inline int
poolscope_declare_gil(PyObject *module)
{
#ifdef Py_GIL_DISABLED
    return PyUnstable_Module_SetGIL(module, Py_MOD_GIL_USED);
#else
    (void)module;
    return 0;
#endif
}

#endif
