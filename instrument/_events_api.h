/* The C interface of _sqlite_rows.Events, for _speedups' listeners (through a capsule):
   they write a record's values straight into the queue's cells, making no Python
   object for them and leaving none for the writer to free. */
#ifndef POOLSCOPE_EVENTS_API_H
#define POOLSCOPE_EVENTS_API_H

#include <Python.h>

#define EVENTS_API_CAPSULE "instrument._sqlite_rows._events_api"

enum { CELL_NULL, CELL_INT, CELL_FLOAT, CELL_TEXT };

typedef struct {
    int type;
    int len;          /* CELL_TEXT: bytes */
    union {
        long long i;
        double d;
        size_t off;   /* CELL_TEXT: where its bytes start in the queue's text */
    };
} EventsCell;

typedef struct {
    PyTypeObject *type;                   /* _sqlite_rows.Events */
    Py_ssize_t (*size)(PyObject *events); /* values queued, as len() */
    /* The cells of a new record, past the last one: written by the caller, queued by
       commit(); NULL with MemoryError set. Nothing else may touch the queue between. */
    EventsCell *(*reserve)(PyObject *events);
    void (*commit)(PyObject *events);
    /* One value (None, int, float or str; the empty str is NULL) into `cell`, its text
       copied into the queue's: 0, or -1 with an error set. */
    int (*store)(PyObject *events, PyObject *value, EventsCell *cell);
} EventsAPI;

#endif
