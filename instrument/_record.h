/* The record contract, for the C helpers: the same numbers as _record.py, which is the
   definition. Each helper's layout() returns them, and poolscope uses a helper only if
   that equals _record.LAYOUT: a helper built against another contract is left off. */
#ifndef POOLSCOPE_RECORD_H
#define POOLSCOPE_RECORD_H

#include <Python.h>

/* A record's fields (_record.RECORD_FIELDS), in order. */
enum {
    F_AT, F_POOL, F_KIND, F_CONNECTION_ID, F_CHECKOUT_ID, F_THREAD, F_TASK, F_IN_USE,
    F_IDLE, F_OVERFLOW, F_WAITERS, F_STACK, F_WAIT_S, F_CONNECT_S, F_HOLD_S, F_COUNT,
    RECORD_WIDTH
};

/* An open checkout's entry (_record.ENTRY_FIELDS), in order. */
enum { CO_ID, CO_AT, CO_THREAD, CO_STACK, CO_PROXY, CO_TASK, ENTRY_WIDTH };

#define NO_SIZE (1LL << 62)  /* _record.NO_SIZE: the size of a pool without one */

/* layout() -> dict: these numbers, shaped as _record.LAYOUT. */
static PyObject *
record_layout(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    static const char *const fields[RECORD_WIDTH] = {
        "at", "pool", "kind", "connection_id", "checkout_id", "thread", "task", "in_use",
        "idle", "overflow", "waiters", "stack", "wait_s", "connect_s", "hold_s", "count",
    };
    static const char *const entry[ENTRY_WIDTH] = {
        "checkout_id", "at", "thread", "stack", "proxy", "task",
    };
    PyObject *f = PyDict_New(), *e = PyDict_New(), *result = NULL;
    if (f == NULL || e == NULL) goto done;
    for (int k = 0; k < RECORD_WIDTH; k++) {
        PyObject *v = PyLong_FromLong(k);
        int rc = v == NULL ? -1 : PyDict_SetItemString(f, fields[k], v);
        Py_XDECREF(v);
        if (rc < 0) goto done;
    }
    for (int k = 0; k < ENTRY_WIDTH; k++) {
        PyObject *v = PyLong_FromLong(k);
        int rc = v == NULL ? -1 : PyDict_SetItemString(e, entry[k], v);
        Py_XDECREF(v);
        if (rc < 0) goto done;
    }
    result = Py_BuildValue("{s:i,s:O,s:L,s:i,s:O}", "width", (int)RECORD_WIDTH, "fields", f,
                           "no_size", (long long)NO_SIZE, "entry_width", (int)ENTRY_WIDTH,
                           "entry", e);
done:
    Py_XDECREF(f);
    Py_XDECREF(e);
    return result;
}

#define RECORD_LAYOUT_METHOD                                                               \
    {"layout", record_layout, METH_NOARGS,                                                 \
     "layout() -> dict: the record contract this helper was built with (_record.LAYOUT)."}

#endif
