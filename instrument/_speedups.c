/* C helpers for poolscope's hot path: stack keys, and the common case of the
   checkout and checkin listeners. Optional: without a compiler, the pure-Python
   listeners in _hooks.py do the same work, a few microseconds slower. */
#define POOLSCOPE_WALKS_FRAMES 1
#include "_compat.h"

#include <pythread.h>
#include <stdint.h>
#include <time.h>

#include "_events_api.h"
#include "_record.h"

#define FNV_BASIS 1469598103934665603ULL
#define FNV_PRIME 1099511628211ULL

/* A 64-bit hash of (code address, lasti) per frame, innermost first, starting `skip`
   frames above the Python function that called into C. */
static uint64_t
walk_stack(long skip, long max_frames)
{
    uint64_t h = FNV_BASIS;
    long n = 0;
#ifdef POOLSCOPE_FRAME_RECORDS
    /* The same frames, in the same order, as the PyFrame_GetBack() walk below:
       incomplete frames (still being set up) are skipped, as it skips them. */
    _PyInterpreterFrame *record = PyThreadState_Get()->cframe->current_frame;
    for (; record != NULL; record = record->previous) {
        if (_PyFrame_IsIncomplete(record)) continue;
        if (skip > 0) { skip--; continue; }
        if (n >= max_frames) break;
        h = (h ^ (uint64_t)(uintptr_t)record->f_code) * FNV_PRIME;
        h = (h ^ (uint64_t)_PyInterpreterFrame_LASTI(record)) * FNV_PRIME;
        n++;
    }
#else
    PyFrameObject *frame = PyEval_GetFrame();  /* borrowed */
    Py_XINCREF(frame);
    while (frame != NULL && skip > 0) {
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
        skip--;
    }
    while (frame != NULL && n < max_frames) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        h = (h ^ (uint64_t)(uintptr_t)code) * FNV_PRIME;
        Py_DECREF(code);
        h = (h ^ (uint64_t)PyFrame_GetLasti(frame)) * FNV_PRIME;
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
        n++;
    }
    Py_XDECREF(frame);
#endif
    return h;
}

/* stack_key(skip, max_frames) -> int: the hash above. No allocation but the result. */
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
    return PyLong_FromUnsignedLongLong(walk_stack(skip, max_frames));
}

/* ---- A listener's own failure ------------------------------------------------------ */

/* Pass the exception being raised to failed(name) (_failures.listener_failed) as the
   exception being handled, as a Python "except Exception:" block would, then clear it.
   Returns 0; returns -1 leaving the error set for anything not an Exception
   (KeyboardInterrupt, SystemExit), which propagates as it would from Python. */
static int
report_failure(PyObject *failed, const char *name)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    PyObject *type, *value, *tb, *old_type, *old_value, *old_tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) PyException_SetTraceback(value, tb);
    PyErr_GetExcInfo(&old_type, &old_value, &old_tb);
    PyErr_SetExcInfo(type, value, tb);  /* steals */
    PyObject *result = PyObject_CallFunction(failed, "s", name);
    PyErr_SetExcInfo(old_type, old_value, old_tb);  /* steals */
    Py_XDECREF(result);
    PyErr_Clear();  /* if logging itself failed, there is nothing more to do */
    return 0;
}

/* ---- HotPath: the checkout and checkin listeners' common case ------------------- */

static PyObject *str_name;      /* "_name" */
static PyObject *str_checkout;  /* "checkout" */
static PyObject *str_checkin;   /* "checkin" */
static PyObject *one;           /* 1, appended to `drops` per dropped record */
static PyObject *null;          /* "": NULL in a queued record (see _record.NULL) */

#define THREAD_SLOTS 8  /* threads whose name is found without a lookup in threading */

/* A thread seen before, by its thread state's id (never reused in a process, unlike
   the OS's thread ident): its Thread object's __dict__, where its name is read. */
typedef struct {
    uint64_t id;  /* 0: empty */
    PyObject *dict;
} ThreadSlot;

typedef struct {
    PyObject_HEAD
    PyObject *queue;           /* the writer's queue: a flat list, or an Events */
    const EventsAPI *events;   /* the Events' C interface, NULL for a list */
    Py_ssize_t max_queue;      /* values the queue may hold */
    PyObject *drops;           /* list: one 1 per dropped record */
    PyObject *pool_key;        /* int */
    long long pool_key_value;  /* the same, in C */
    PyObject *open;            /* dict: record -> open-checkout entry tuple */
    PyObject *waits;           /* dict: record -> wait_s, set by the _do_get hook */
    PyObject *connect_times;   /* dict: record -> connect_s */
    PyObject *connection_ids;  /* dict: record -> connection id */
    PyObject *suspected;       /* dict: checkout id -> when flagged */
    PyObject *shared;          /* dict: record -> older entries sharing it (StaticPool) */
    PyObject *state;           /* list: [pool, idle, waiters, size] */
    PyObject *stack_ids;       /* dict: stack key -> stack id */
    PyObject *next_checkout;   /* callable -> next checkout id */
    PyObject *now;             /* callable -> unix time, if the clock cannot be read in C */
    PyObject *threads;         /* dict: thread ident -> Thread (threading._active) */
    PyObject *fallback_checkout; /* the Python checkout listener, for all else */
    PyObject *fallback_checkin;  /* the Python checkin listener, for all else */
    PyObject *failed;          /* _failures.listener_failed(name), called inside "except" */
    long max_frames;
    ThreadSlot thread_slots[THREAD_SLOTS];
} HotPath;

static int
HotPath_traverse(HotPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->queue); Py_VISIT(self->drops); Py_VISIT(self->pool_key);
    Py_VISIT(self->open); Py_VISIT(self->waits); Py_VISIT(self->connect_times);
    Py_VISIT(self->connection_ids); Py_VISIT(self->suspected); Py_VISIT(self->state);
    Py_VISIT(self->shared);
    Py_VISIT(self->stack_ids); Py_VISIT(self->next_checkout); Py_VISIT(self->now);
    Py_VISIT(self->threads); Py_VISIT(self->fallback_checkout);
    Py_VISIT(self->fallback_checkin); Py_VISIT(self->failed);
    for (int k = 0; k < THREAD_SLOTS; k++) Py_VISIT(self->thread_slots[k].dict);
    return 0;
}

static int
HotPath_clear(HotPath *self)
{
    Py_CLEAR(self->queue); Py_CLEAR(self->drops); Py_CLEAR(self->pool_key);
    Py_CLEAR(self->open); Py_CLEAR(self->waits); Py_CLEAR(self->connect_times);
    Py_CLEAR(self->connection_ids); Py_CLEAR(self->suspected); Py_CLEAR(self->state);
    Py_CLEAR(self->shared);
    Py_CLEAR(self->stack_ids); Py_CLEAR(self->next_checkout); Py_CLEAR(self->now);
    Py_CLEAR(self->threads); Py_CLEAR(self->fallback_checkout);
    Py_CLEAR(self->fallback_checkin); Py_CLEAR(self->failed);
    for (int k = 0; k < THREAD_SLOTS; k++) {
        self->thread_slots[k].id = 0;
        Py_CLEAR(self->thread_slots[k].dict);
    }
    return 0;
}

static void
HotPath_dealloc(HotPath *self)
{
    PyObject_GC_UnTrack(self);
    HotPath_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
HotPath_init(HotPath *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {
        "queue", "max_queue", "drops", "pool_key", "open", "waits", "connect_times",
        "connection_ids", "suspected", "shared", "state", "stack_ids", "next_checkout", "now",
        "threads", "max_frames", "fallback_checkout", "fallback_checkin", "failed", NULL,
    };
    PyObject *queue, *drops, *pool_key, *open, *waits, *connect_times, *connection_ids;
    PyObject *suspected, *shared, *state, *stack_ids, *next_checkout, *now, *threads;
    PyObject *fallback_checkout, *fallback_checkin, *failed;
    Py_ssize_t max_queue;
    long max_frames;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "OnO!OO!O!O!O!O!O!O!O!OOO!lOOO", kwlist, &queue,
            &max_queue, &PyList_Type, &drops, &pool_key, &PyDict_Type, &open, &PyDict_Type,
            &waits, &PyDict_Type, &connect_times, &PyDict_Type, &connection_ids, &PyDict_Type,
            &suspected, &PyDict_Type, &shared, &PyList_Type, &state, &PyDict_Type, &stack_ids,
            &next_checkout, &now, &PyDict_Type, &threads, &max_frames, &fallback_checkout,
            &fallback_checkin, &failed))
        return -1;
    if (PyList_GET_SIZE(state) != 4) {
        PyErr_SetString(PyExc_ValueError, "state must be [pool, idle, waiters, size]");
        return -1;
    }
    const EventsAPI *events = NULL;
    if (!PyList_Check(queue)) {  /* the writer's Events: its C interface, or an error */
        events = PyCapsule_Import(EVENTS_API_CAPSULE, 0);
        if (events == NULL) return -1;
        if (!PyObject_TypeCheck(queue, events->type)) {
            PyErr_SetString(PyExc_TypeError, "queue must be a list or an Events");
            return -1;
        }
    }
#define SET(field) Py_INCREF(field); Py_XSETREF(self->field, field)
    SET(queue); SET(drops); SET(pool_key); SET(open); SET(waits); SET(connect_times);
    SET(connection_ids); SET(suspected); SET(shared); SET(state); SET(stack_ids);
    SET(next_checkout);
    SET(now); SET(threads); SET(fallback_checkout); SET(fallback_checkin); SET(failed);
#undef SET
    self->events = events;
    self->pool_key_value = PyLong_AsLongLong(pool_key);
    if (self->pool_key_value == -1 && PyErr_Occurred()) return -1;
    self->max_queue = max_queue;
    self->max_frames = max_frames;
    return 0;
}

/* The calling thread's current name (new reference), or NULL, without an error set,
   where threading does not know the thread yet: the Python listener handles that.

   Read at each event from the Thread's __dict__ (so a rename shows), which is found
   once per thread: through threading's ident -> Thread map, then kept in a slot by
   the thread state's id. That lookup cost more than the rest of the listener. */
static PyObject *
thread_name(HotPath *self)
{
    uint64_t id = PyThreadState_GetID(PyThreadState_Get());
    ThreadSlot *slot = &self->thread_slots[id % THREAD_SLOTS];
    if (slot->id != id || slot->dict == NULL) {
        PyObject *ident = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
        if (ident == NULL) { PyErr_Clear(); return NULL; }
        PyObject *thread = PyDict_GetItemWithError(self->threads, ident);  /* borrowed */
        Py_DECREF(ident);
        if (thread == NULL) { PyErr_Clear(); return NULL; }
        PyObject *dict = PyObject_GenericGetDict(thread, NULL);
        if (dict == NULL || !PyDict_Check(dict)) {
            Py_XDECREF(dict);
            PyErr_Clear();
            return NULL;
        }
        slot->id = id;
        Py_XSETREF(slot->dict, dict);
    }
    PyObject *name = PyDict_GetItemWithError(slot->dict, str_name);  /* borrowed */
    if (name == NULL || !PyUnicode_Check(name)) { PyErr_Clear(); return NULL; }
    return Py_NewRef(name);
}

/* dict.get(key, NULL), or dict.pop(key, NULL) if `pop`: a new reference, or NULL with
   an error set. */
static PyObject *
dict_take(PyObject *dict, PyObject *key, int pop)
{
    PyObject *value = PyDict_GetItemWithError(dict, key);
    if (value == NULL) {
        if (PyErr_Occurred()) return NULL;
        return Py_NewRef(null);
    }
    Py_INCREF(value);
    if (pop && PyDict_DelItem(dict, key) < 0) { Py_DECREF(value); return NULL; }
    return value;
}

/* Values in the writer's queue, as len() tells. */
static Py_ssize_t
queue_size(HotPath *self)
{
    return self->events ? self->events->size(self->queue) : PyList_GET_SIZE(self->queue);
}

/* The record being built, in either kind of queue: cells written straight into an
   Events (no Python object made), or the new references of a list's record. */
typedef struct {
    HotPath *hp;
    EventsCell *cells;                /* the Events' reserved cells, or NULL */
    PyObject *values[RECORD_WIDTH];   /* a list's record: new references */
    int failed;
} Out;

static int
out_start(Out *out, HotPath *hp)
{
    out->hp = hp;
    out->failed = 0;
    out->cells = NULL;
    for (int k = 0; k < RECORD_WIDTH; k++) out->values[k] = NULL;
    if (hp->events) {
        out->cells = hp->events->reserve(hp->queue);
        if (out->cells == NULL) return -1;
    }
    return 0;
}

static void
out_int(Out *out, int k, long long v)
{
    if (out->cells) {
        out->cells[k].type = CELL_INT;
        out->cells[k].i = v;
    }
    else if ((out->values[k] = PyLong_FromLongLong(v)) == NULL) out->failed = 1;
}

static void
out_float(Out *out, int k, double v)
{
    if (out->cells) {
        out->cells[k].type = CELL_FLOAT;
        out->cells[k].d = v;
    }
    else if ((out->values[k] = PyFloat_FromDouble(v)) == NULL) out->failed = 1;
}

static void
out_null(Out *out, int k)
{
    if (out->cells) out->cells[k].type = CELL_NULL;
    else out->values[k] = Py_NewRef(null);
}

/* Any queueable value (borrowed; NULL is a failure already set). */
static void
out_value(Out *out, int k, PyObject *v)
{
    if (v == NULL) out->failed = 1;
    else if (out->cells) {
        if (out->hp->events->store(out->hp->queue, v, &out->cells[k]) < 0) out->failed = 1;
    }
    else out->values[k] = Py_NewRef(v);
}

/* dict[key] if there, else NULL (the connection id a record was given at connect). */
static void
out_id(Out *out, int k, PyObject *dict, PyObject *key)
{
    PyObject *v = PyDict_GetItemWithError(dict, key);  /* borrowed */
    if (v != NULL) out_value(out, k, v);
    else if (PyErr_Occurred()) out->failed = 1;
    else out_null(out, k);
}

/* Queue the record, all or nothing, as list.extend() is in Python: a partial record
   would shift every later one. Returns -1 (with an error set, nothing queued). */
static int
out_finish(Out *out)
{
    if (out->failed) {
        for (int k = 0; k < RECORD_WIDTH; k++) Py_XDECREF(out->values[k]);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return -1;
    }
    if (out->cells) {
        out->hp->events->commit(out->hp->queue);
        return 0;
    }
    PyObject *record = PyTuple_New(RECORD_WIDTH);
    if (record == NULL) {
        for (int k = 0; k < RECORD_WIDTH; k++) Py_XDECREF(out->values[k]);
        return -1;
    }
    for (int k = 0; k < RECORD_WIDTH; k++) PyTuple_SET_ITEM(record, k, out->values[k]);
    PyObject *queue = out->hp->queue;
    Py_ssize_t end = PyList_GET_SIZE(queue);
    int rc = PyList_SetSlice(queue, end, end, record);
    Py_DECREF(record);
    return rc;
}

/* The pool's counts after an event (in use, idle, overflow and waiters) into the
   record's in_use, idle, overflow and waiters. */
static int
out_pool_counts(Out *out, Py_ssize_t idle_extra)
{
    HotPath *self = out->hp;
    Py_ssize_t n_in_use = PyDict_GET_SIZE(self->open);
    Py_ssize_t n_idle = PyObject_Length(PyList_GET_ITEM(self->state, 1));
    Py_ssize_t n_waiters = PyObject_Length(PyList_GET_ITEM(self->state, 2));
    long long size = PyLong_AsLongLong(PyList_GET_ITEM(self->state, 3));
    if (n_idle < 0 || n_waiters < 0 || (size == -1 && PyErr_Occurred())) {
        out->failed = 1;
        return -1;
    }
    if (idle_extra && size != NO_SIZE) n_idle += idle_extra;
    if (n_idle > size) n_idle = (Py_ssize_t)size;
    out_int(out, F_IN_USE, n_in_use);
    out_int(out, F_IDLE, n_idle);
    out_int(out, F_OVERFLOW, n_in_use > size ? n_in_use - size : 0);
    out_int(out, F_WAITERS, n_waiters);
    return 0;
}

/* Unix time now, read from the system's real-time clock as time.time() computes it:
   never through the time module, whose time() a test may have replaced by a fake.
   `now` is called only if that clock cannot be read. -1.0 with an error set on a
   failure. */
static double
now_seconds(HotPath *self)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) == 0)
        return (double)((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec) / 1e9;
    PyObject *at = PyObject_CallNoArgs(self->now);
    if (at == NULL) return -1.0;
    double t = PyFloat_AsDouble(at);
    Py_DECREF(at);
    return t;
}

static int
drop_record(HotPath *self)
{
    return PyList_Append(self->drops, one);
}

/* Record a checkout, as the Python checkout listener does: Py_True (a new reference)
   when done, Py_False when it left everything to the Python listener, NULL on an error.

   It leaves to Python a stack never seen before, a thread not known to threading,
   and a record already checked out (a StaticPool's). Called by SQLAlchemy's dispatch
   itself, so the stack starts at the frame that called in (skip 0), as the Python
   listener's starts at its caller. */
static PyObject *
checkout_fast(HotPath *self, PyObject *record, PyObject *proxy)
{
    int already_open = PyDict_Contains(self->open, record);
    if (already_open < 0) return NULL;
    if (already_open) Py_RETURN_FALSE;
    PyObject *key = PyLong_FromUnsignedLongLong(walk_stack(0, self->max_frames));
    if (key == NULL) return NULL;
    PyObject *sid = PyDict_GetItemWithError(self->stack_ids, key);
    if (sid == NULL) {
        Py_DECREF(key);
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_FALSE;
    }
    Py_INCREF(sid);
    Py_DECREF(key);
    PyObject *thread = thread_name(self);
    if (thread == NULL) {
        Py_DECREF(sid);
        Py_RETURN_FALSE;
    }
    PyObject *result = NULL, *at = NULL, *checkout_id = NULL, *ref = NULL, *entry = NULL;
    double t = now_seconds(self);
    if (t == -1.0 && PyErr_Occurred()) goto done;
    if ((at = PyFloat_FromDouble(t)) == NULL) goto done;
    if ((checkout_id = PyObject_CallNoArgs(self->next_checkout)) == NULL) goto done;
    if ((ref = PyWeakref_NewRef(proxy, NULL)) == NULL) goto done;
    /* The entry, in _record.ENTRY_FIELDS order (CO_ID ... CO_TASK). */
    entry = PyTuple_Pack(ENTRY_WIDTH, checkout_id, at, thread, sid, ref, Py_None);
    if (entry == NULL || PyDict_SetItem(self->open, record, entry) < 0) goto done;
    PyObject *wait = dict_take(self->waits, record, 1);
    PyObject *connect = dict_take(self->connect_times, record, 1);
    if (wait == NULL || connect == NULL) {
        Py_XDECREF(wait);
        Py_XDECREF(connect);
        goto done;
    }
    int rc;
    if (queue_size(self) < self->max_queue) {
        Out out;
        rc = out_start(&out, self);
        if (rc == 0) {
            out_float(&out, F_AT, t);
            out_int(&out, F_POOL, self->pool_key_value);
            out_value(&out, F_KIND, str_checkout);
            out_id(&out, F_CONNECTION_ID, self->connection_ids, record);
            out_value(&out, F_CHECKOUT_ID, checkout_id);
            out_value(&out, F_THREAD, thread);
            out_null(&out, F_TASK);
            out_pool_counts(&out, 0);
            out_value(&out, F_STACK, sid);
            out_value(&out, F_WAIT_S, wait);
            out_value(&out, F_CONNECT_S, connect);
            out_null(&out, F_HOLD_S);
            out_null(&out, F_COUNT);
            rc = out_finish(&out);
        }
    }
    else {
        rc = drop_record(self);
    }
    Py_DECREF(wait);
    Py_DECREF(connect);
    if (rc < 0) goto done;
    result = Py_True;
    Py_INCREF(result);
done:
    Py_XDECREF(entry);
    Py_XDECREF(ref);
    Py_XDECREF(checkout_id);
    Py_XDECREF(at);
    Py_DECREF(thread);
    Py_DECREF(sid);
    return result;
}

/* Record a checkin by code, as the Python checkin listener does: Py_True when done,
   Py_False when it left everything to the Python listener, NULL on an error.

   It leaves to Python a connection returned by the garbage collector, a checkout
   the watchdog flagged, a record shared by overlapping checkouts, and a thread
   not known to threading. */
static PyObject *
checkin_fast(HotPath *self, PyObject *record)
{
    PyObject *entry = PyDict_GetItemWithError(self->open, record);
    if (entry == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_TRUE;  /* checked out before attach: nothing to record */
    }
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != ENTRY_WIDTH ||
        PyDict_GET_SIZE(self->suspected) || PyDict_GET_SIZE(self->shared))
        Py_RETURN_FALSE;
    /* _record.returned_by_gc(): the proxy already gone, the GC returned it. */
    int alive = poolscope_weakref_alive(PyTuple_GET_ITEM(entry, CO_PROXY));
    if (alive < 0) return NULL;
    if (!alive) Py_RETURN_FALSE;  /* gc_checkin */
    PyObject *thread = thread_name(self);
    if (thread == NULL) Py_RETURN_FALSE;
    Py_INCREF(entry);
    PyObject *result = NULL;
    double t = now_seconds(self);
    if (t == -1.0 && PyErr_Occurred()) goto done;
    if (PyDict_DelItem(self->open, record) < 0) goto done;
    double held = t - PyFloat_AsDouble(PyTuple_GET_ITEM(entry, CO_AT));
    if (PyErr_Occurred()) goto done;
    if (queue_size(self) < self->max_queue) {
        Out out;
        if (out_start(&out, self) < 0) goto done;
        out_float(&out, F_AT, t);
        out_int(&out, F_POOL, self->pool_key_value);
        out_value(&out, F_KIND, str_checkin);
        out_id(&out, F_CONNECTION_ID, self->connection_ids, record);
        out_value(&out, F_CHECKOUT_ID, PyTuple_GET_ITEM(entry, CO_ID));
        out_value(&out, F_THREAD, thread);
        PyObject *task = PyTuple_GET_ITEM(entry, CO_TASK);  /* the checkout's task, if any */
        if (task == Py_None) out_null(&out, F_TASK);
        else out_value(&out, F_TASK, task);
        out_pool_counts(&out, 1);
        out_value(&out, F_STACK, PyTuple_GET_ITEM(entry, CO_STACK));
        out_null(&out, F_WAIT_S);
        out_null(&out, F_CONNECT_S);
        out_float(&out, F_HOLD_S, held);
        out_null(&out, F_COUNT);
        if (out_finish(&out) < 0) goto done;
    }
    else if (drop_record(self) < 0) {
        goto done;
    }
    result = Py_True;
    Py_INCREF(result);
done:
    Py_DECREF(thread);
    Py_DECREF(entry);
    return result;
}

/* A listener's own failure: counted and logged, never raised into SQLAlchemy. */
static PyObject *
listener_failed(HotPath *self, const char *name)
{
    if (report_failure(self->failed, name) < 0) return NULL;
    Py_RETURN_NONE;
}

/* Hand the event to a Python listener, which catches its own failures. */
static PyObject *
fall_back(HotPath *self, PyObject *listener, PyObject *const *args, Py_ssize_t nargs,
          const char *name)
{
    PyObject *result = PyObject_Vectorcall(listener, args, nargs, NULL);
    if (result == NULL) return listener_failed(self, name);
    Py_DECREF(result);
    Py_RETURN_NONE;
}

/* on_checkout(dbapi_connection, record, proxy): the checkout listener itself. */
static PyObject *
HotPath_on_checkout(HotPath *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs == 3) {
        PyObject *done = checkout_fast(self, args[1], args[2]);
        if (done == NULL) return listener_failed(self, "_on_checkout");
        Py_DECREF(done);
        if (done == Py_True) Py_RETURN_NONE;
    }
    return fall_back(self, self->fallback_checkout, args, nargs, "_on_checkout");
}

/* on_checkin(dbapi_connection, record): the checkin listener itself. */
static PyObject *
HotPath_on_checkin(HotPath *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs == 2) {
        PyObject *done = checkin_fast(self, args[1]);
        if (done == NULL) return listener_failed(self, "_on_checkin");
        Py_DECREF(done);
        if (done == Py_True) Py_RETURN_NONE;
    }
    return fall_back(self, self->fallback_checkin, args, nargs, "_on_checkin");
}

static PyMethodDef HotPath_methods[] = {
    {"on_checkout", (PyCFunction)(void (*)(void))HotPath_on_checkout, METH_FASTCALL,
     "on_checkout(dbapi_connection, record, proxy): the checkout listener; the common case "
     "in C, the rest handed to fallback_checkout."},
    {"on_checkin", (PyCFunction)(void (*)(void))HotPath_on_checkin, METH_FASTCALL,
     "on_checkin(dbapi_connection, record): the checkin listener; the common case in C, "
     "the rest handed to fallback_checkin."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HotPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "instrument._speedups.HotPath",
    .tp_doc = "The checkout and checkin listeners' common case, in C.",
    .tp_basicsize = sizeof(HotPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)HotPath_init,
    .tp_dealloc = (destructor)HotPath_dealloc,
    .tp_traverse = (traverseproc)HotPath_traverse,
    .tp_clear = (inquiry)HotPath_clear,
    .tp_methods = HotPath_methods,
};

/* ---- TimedGet: the pool's _do_get, timed ---------------------------------------- */

/* Wraps a pool's bound _do_get: how long the caller waited for a connection, and how
   much of that was opening a new one (connect_starts is set by the wrapped creator),
   go into `waits` and `connect_times` by record; the checkout listener takes them
   from there. A TimeoutError is passed to on_timeout(waited) and raised unchanged. */
typedef struct {
    PyObject_HEAD
    PyObject *wrapped;         /* the pool's own bound _do_get */
    PyObject *perf;            /* time.perf_counter */
    PyObject *waits;           /* dict: record -> seconds waited */
    PyObject *connect_starts;  /* dict: record -> perf() when its connect began */
    PyObject *connect_times;   /* dict: record -> seconds connecting */
    PyObject *on_timeout;      /* callable(waited) */
    PyObject *timeout_error;   /* sqlalchemy.exc.TimeoutError */
    PyObject *failed;          /* _failures.listener_failed(name) */
    PyObject *weakreflist;     /* poolscope keeps a weak reference to know it is still set */
} TimedGet;

static int
TimedGet_traverse(TimedGet *self, visitproc visit, void *arg)
{
    Py_VISIT(self->wrapped); Py_VISIT(self->perf); Py_VISIT(self->waits);
    Py_VISIT(self->connect_starts); Py_VISIT(self->connect_times);
    Py_VISIT(self->on_timeout); Py_VISIT(self->timeout_error); Py_VISIT(self->failed);
    return 0;
}

static int
TimedGet_clear(TimedGet *self)
{
    Py_CLEAR(self->wrapped); Py_CLEAR(self->perf); Py_CLEAR(self->waits);
    Py_CLEAR(self->connect_starts); Py_CLEAR(self->connect_times);
    Py_CLEAR(self->on_timeout); Py_CLEAR(self->timeout_error); Py_CLEAR(self->failed);
    return 0;
}

static void
TimedGet_dealloc(TimedGet *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) PyObject_ClearWeakRefs((PyObject *)self);
    TimedGet_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
TimedGet_init(TimedGet *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {
        "wrapped", "perf", "waits", "connect_starts", "connect_times", "on_timeout",
        "timeout_error", "failed", NULL,
    };
    PyObject *wrapped, *perf, *waits, *connect_starts, *connect_times, *on_timeout;
    PyObject *timeout_error, *failed;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO!O!O!OOO", kwlist, &wrapped, &perf,
                                     &PyDict_Type, &waits, &PyDict_Type, &connect_starts,
                                     &PyDict_Type, &connect_times, &on_timeout,
                                     &timeout_error, &failed))
        return -1;
#define SET(field) Py_INCREF(field); Py_XSETREF(self->field, field)
    SET(wrapped); SET(perf); SET(waits); SET(connect_starts); SET(connect_times);
    SET(on_timeout); SET(timeout_error); SET(failed);
#undef SET
    return 0;
}

static double
perf_now(TimedGet *self)
{
    PyObject *t = PyObject_CallNoArgs(self->perf);
    if (t == NULL) return -1.0;
    double value = PyFloat_AsDouble(t);
    Py_DECREF(t);
    return value;
}

/* The pool raised TimeoutError after `t0`: tell on_timeout, then re-raise it as it was. */
static void
report_timeout(TimedGet *self, double t0)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    double t = perf_now(self);
    PyObject *waited = t < 0 && PyErr_Occurred() ? NULL : PyFloat_FromDouble(t - t0);
    PyObject *result = waited ? PyObject_CallOneArg(self->on_timeout, waited) : NULL;
    Py_XDECREF(waited);
    if (result == NULL && report_failure(self->failed, "_on_timeout") < 0) {
        PyErr_Clear();  /* the application gets its own error, not ours */
    }
    Py_XDECREF(result);
    PyErr_Restore(type, value, tb);
}

static PyObject *
TimedGet_call(TimedGet *self, PyObject *args, PyObject *kwds)
{
    double t0 = perf_now(self);
    if (t0 < 0 && PyErr_Occurred()) return NULL;
    PyObject *record = PyObject_Call(self->wrapped, args, kwds);
    if (record == NULL) {
        if (PyErr_ExceptionMatches(self->timeout_error)) report_timeout(self, t0);
        return NULL;
    }
    double t1 = perf_now(self);
    if (t1 < 0 && PyErr_Occurred()) goto fail;
    PyObject *started = PyDict_GetItemWithError(self->connect_starts, record);
    double wait = t1 - t0;
    if (started != NULL) {
        double s = PyFloat_AsDouble(started);
        if (s == -1.0 && PyErr_Occurred()) goto fail;
        if (PyDict_DelItem(self->connect_starts, record) < 0) goto fail;
        if (s >= t0) {
            /* A new connection was opened in _do_get(): the DBAPI connect, the dialect's
               first-connect setup and the app's connect listeners are connect time. */
            PyObject *connect = PyFloat_FromDouble(t1 - s);
            if (connect == NULL) goto fail;
            int rc = PyDict_SetItem(self->connect_times, record, connect);
            Py_DECREF(connect);
            if (rc < 0) goto fail;
            wait = s - t0;
        }
    }
    else if (PyErr_Occurred()) {
        goto fail;
    }
    PyObject *waited = PyFloat_FromDouble(wait);
    if (waited == NULL) goto fail;
    int rc = PyDict_SetItem(self->waits, record, waited);
    Py_DECREF(waited);
    if (rc < 0) goto fail;
    return record;
fail:
    /* The connection is the application's: hand it over, and count our failure. */
    if (report_failure(self->failed, "_do_get") < 0) {
        Py_DECREF(record);
        return NULL;
    }
    return record;
}

static PyObject *
TimedGet_get_wrapped(TimedGet *self, void *closure)
{
    return Py_NewRef(self->wrapped);
}

static PyGetSetDef TimedGet_getset[] = {
    {"__wrapped__", (getter)TimedGet_get_wrapped, NULL, "the pool's own _do_get", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TimedGetType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "instrument._speedups.TimedGet",
    .tp_doc = "A pool's _do_get, timed: waits and connect times by record.",
    .tp_basicsize = sizeof(TimedGet),
    .tp_weaklistoffset = offsetof(TimedGet, weakreflist),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)TimedGet_init,
    .tp_dealloc = (destructor)TimedGet_dealloc,
    .tp_traverse = (traverseproc)TimedGet_traverse,
    .tp_clear = (inquiry)TimedGet_clear,
    .tp_call = (ternaryfunc)TimedGet_call,
    .tp_getset = TimedGet_getset,
};

static PyMethodDef methods[] = {
    {"stack_key", (PyCFunction)(void (*)(void))stack_key, METH_FASTCALL,
     "stack_key(skip, max_frames) -> int: hash of (code, lasti) per frame, innermost first."},
    RECORD_LAYOUT_METHOD,
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups", "C helpers for poolscope's hot path.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    str_name = PyUnicode_InternFromString("_name");
    str_checkout = PyUnicode_InternFromString("checkout");
    str_checkin = PyUnicode_InternFromString("checkin");
    one = PyLong_FromLong(1);
    null = PyUnicode_InternFromString("");
    if (str_name == NULL || str_checkout == NULL || str_checkin == NULL || one == NULL ||
        null == NULL)
        return NULL;
    if (PyType_Ready(&HotPathType) < 0 || PyType_Ready(&TimedGetType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (poolscope_declare_gil(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&HotPathType);
    if (PyModule_AddObject(m, "HotPath", (PyObject *)&HotPathType) < 0) {
        Py_DECREF(&HotPathType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&TimedGetType);
    if (PyModule_AddObject(m, "TimedGet", (PyObject *)&TimedGetType) < 0) {
        Py_DECREF(&TimedGetType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
