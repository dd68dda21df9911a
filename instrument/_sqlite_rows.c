/* The writer's inserts without the GIL: optional, like _speedups.

   The sqlite3 module binds every value of every row while holding the GIL, so the
   writer thread took the GIL for about as long as the application spent in the
   listeners. Here the queued values are read into C once, under the GIL (a type
   check each), and then bound and stepped with the GIL released, on a SQLite handle
   of this module's own (Store), opened on the writer's store file.

   The SQLite functions are looked up in the library the sqlite3 module itself
   uses (dlsym on its extension module), never linked separately: two copies of
   SQLite in one process would not see each other's file locks. Only SQLite's public
   C API is used, nothing of the sqlite3 module's objects. Where that lookup fails
   (no dlopen, a statically linked module with hidden symbols, a different library
   version), load() is False and the writer binds through sqlite3. */
#include "_compat.h"

#include <math.h>

#include <stdint.h>
#include <string.h>

#include "_events_api.h"
#include "_record.h"

typedef struct sqlite3 sqlite3;
typedef struct sqlite3_stmt sqlite3_stmt;

#define SQLITE_OK 0
#define SQLITE_ROW 100
#define SQLITE_DONE 101
#define SQLITE_OPEN_READWRITE 0x00000002
#define SQLITE_TRANSIENT_ ((void (*)(void *))-1)
#define SQLITE_STATIC_ ((void (*)(void *))0)

static struct {
    int (*open_v2)(const char *, sqlite3 **, int, const char *);
    int (*close_v2)(sqlite3 *);
    int (*busy_timeout)(sqlite3 *, int);
    int (*get_autocommit)(sqlite3 *);
    long long (*last_insert_rowid)(sqlite3 *);
    long long (*column_int64)(sqlite3_stmt *, int);
    int (*prepare_v2)(sqlite3 *, const char *, int, sqlite3_stmt **, const char **);
    int (*bind_double)(sqlite3_stmt *, int, double);
    int (*bind_int64)(sqlite3_stmt *, int, long long);
    int (*bind_text)(sqlite3_stmt *, int, const char *, int, void (*)(void *));
    int (*bind_null)(sqlite3_stmt *, int);
    int (*step)(sqlite3_stmt *);
    int (*reset)(sqlite3_stmt *);
    int (*finalize)(sqlite3_stmt *);
    const char *(*errmsg)(sqlite3 *);
    const char *(*db_filename)(sqlite3 *, const char *);
    int (*libversion_number)(void);
    int (*exec)(sqlite3 *, const char *, void *, void *, char **);
} sq;

static int loaded = 0;

static PyObject *operational_error = NULL; /* sqlite3.OperationalError */

/* load(module_path, version_number) -> bool: find SQLite's functions in the library
   the sqlite3 module was linked with; true when all are found and the version agrees. */
static PyObject *
load(PyObject *self, PyObject *args)
{
    const char *path;
    int expected;
    if (!PyArg_ParseTuple(args, "si", &path, &expected)) return NULL;
#ifdef POOLSCOPE_HAVE_DLOPEN
    void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (handle == NULL) Py_RETURN_FALSE;
#  define FIND(field, name)                                     \
        *(void **)(&sq.field) = dlsym(handle, name);            \
        if (sq.field == NULL) { loaded = 0; Py_RETURN_FALSE; }
    FIND(open_v2, "sqlite3_open_v2")
    FIND(close_v2, "sqlite3_close_v2")
    FIND(busy_timeout, "sqlite3_busy_timeout")
    FIND(get_autocommit, "sqlite3_get_autocommit")
    FIND(last_insert_rowid, "sqlite3_last_insert_rowid")
    FIND(column_int64, "sqlite3_column_int64")
    FIND(prepare_v2, "sqlite3_prepare_v2")
    FIND(bind_double, "sqlite3_bind_double")
    FIND(bind_int64, "sqlite3_bind_int64")
    FIND(bind_text, "sqlite3_bind_text")
    FIND(bind_null, "sqlite3_bind_null")
    FIND(step, "sqlite3_step")
    FIND(reset, "sqlite3_reset")
    FIND(finalize, "sqlite3_finalize")
    FIND(errmsg, "sqlite3_errmsg")
    FIND(db_filename, "sqlite3_db_filename")
    FIND(libversion_number, "sqlite3_libversion_number")
    FIND(exec, "sqlite3_exec")
#  undef FIND
    /* The handle stays open: the module it names is never unloaded anyway. */
    loaded = sq.libversion_number() == expected;
    return PyBool_FromLong(loaded);
#else
    (void)path;
    (void)expected;
    Py_RETURN_FALSE;
#endif
}

/* ---- Store: this module's own SQLite handle on the writer's store ---------------- */

typedef struct {
    PyObject_HEAD
    sqlite3 *db;  /* NULL once closed or forgotten */
} Store;

static PyTypeObject StoreType;

/* Run `sql` (any number of statements, no parameters) unless it is empty. */
static int
run_script(sqlite3 *db, const char *sql, char *error, size_t error_size)
{
    if (sql[0] == '\0') return SQLITE_OK;
    int rc = sq.exec(db, sql, NULL, NULL, NULL);
    if (rc != SQLITE_OK) snprintf(error, error_size, "%s", sq.errmsg(db));
    return rc;
}

static PyObject *
sqlite_error(const char *message, int rc)
{
    PyErr_Format(operational_error, "%s (SQLite error %d)", message, rc);
    return NULL;
}

/* open(path, busy_timeout_ms, pragmas) -> Store: a handle of its own on the existing
   database `path` (never created here: the writer's sqlite3 connection makes the store
   and its schema), with the busy timeout set and the SQL script `pragmas` run. */
static PyObject *
store_open(PyObject *module, PyObject *args)
{
    PyObject *path;
    int busy_timeout_ms;
    const char *pragmas;
    if (!PyArg_ParseTuple(args, "O&is", PyUnicode_FSConverter, &path, &busy_timeout_ms,
                          &pragmas))
        return NULL;
    if (!loaded) {
        Py_DECREF(path);
        PyErr_SetString(PyExc_RuntimeError, "SQLite's functions were not loaded");
        return NULL;
    }
    sqlite3 *db = NULL;
    char error[512] = "";
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sq.open_v2(PyBytes_AS_STRING(path), &db, SQLITE_OPEN_READWRITE, NULL);
    if (rc != SQLITE_OK) snprintf(error, sizeof error, "%s", db ? sq.errmsg(db) : "no memory");
    if (rc == SQLITE_OK) rc = sq.busy_timeout(db, busy_timeout_ms);
    if (rc == SQLITE_OK) rc = run_script(db, pragmas, error, sizeof error);
    if (rc != SQLITE_OK && db != NULL) {
        sq.close_v2(db);
        db = NULL;
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(path);
    if (rc != SQLITE_OK) return sqlite_error(error, rc);
    Store *store = PyObject_New(Store, &StoreType);
    if (store == NULL) {
        sq.close_v2(db);
        return NULL;
    }
    store->db = db;
    return (PyObject *)store;
}

static void
Store_dealloc(Store *self)
{
    if (self->db != NULL) sq.close_v2(self->db);
    PyObject_Free(self);
}

static sqlite3 *
store_db(Store *self)
{
    if (self->db == NULL) PyErr_SetString(operational_error, "the store handle is closed");
    return self->db;
}

static PyObject *
Store_filename(Store *self, PyObject *Py_UNUSED(ignored))
{
    sqlite3 *db = store_db(self);
    if (db == NULL) return NULL;
    const char *name = sq.db_filename(db, "main");
    return PyUnicode_DecodeFSDefault(name ? name : "");
}

static PyObject *
Store_execute(Store *self, PyObject *args)
{
    const char *sql;
    if (!PyArg_ParseTuple(args, "s", &sql)) return NULL;
    sqlite3 *db = store_db(self);
    if (db == NULL) return NULL;
    char error[512] = "";
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_script(db, sql, error, sizeof error);
    Py_END_ALLOW_THREADS
    if (rc != SQLITE_OK) return sqlite_error(error, rc);
    Py_RETURN_NONE;
}

/* run(sql, params) -> int: one statement, its parameters bound from the sequence `params`
   (None, int, float or str), stepped once with the GIL released (BEGIN IMMEDIATE may
   wait for a lock): the first column of its first row, as an integer, if it returns
   rows (SELECT id ...), else the last inserted rowid. */
static PyObject *
Store_run(Store *self, PyObject *args)
{
    const char *sql;
    PyObject *params;
    if (!PyArg_ParseTuple(args, "sO", &sql, &params)) return NULL;
    sqlite3 *db = store_db(self);
    if (db == NULL) return NULL;
    PyObject *seq = PySequence_Fast(params, "params must be a sequence");
    if (seq == NULL) return NULL;
    sqlite3_stmt *stmt = NULL;
    char error[512] = "";
    int rc = sq.prepare_v2(db, sql, -1, &stmt, NULL);
    for (Py_ssize_t k = 0; rc == SQLITE_OK && k < PySequence_Fast_GET_SIZE(seq); k++) {
        PyObject *v = PySequence_Fast_GET_ITEM(seq, k);
        int i = (int)k + 1;
        if (v == Py_None) {
            rc = sq.bind_null(stmt, i);
        }
        else if (PyLong_Check(v)) {
            long long n = PyLong_AsLongLong(v);
            if (n == -1 && PyErr_Occurred()) goto fail;
            rc = sq.bind_int64(stmt, i, n);
        }
        else if (PyFloat_Check(v)) {
            rc = sq.bind_double(stmt, i, PyFloat_AS_DOUBLE(v));
        }
        else if (PyUnicode_Check(v)) {
            Py_ssize_t len;
            const char *text = PyUnicode_AsUTF8AndSize(v, &len);
            if (text == NULL) goto fail;
            if (len > INT32_MAX) {
                PyErr_SetString(PyExc_OverflowError, "a str past 2 GB cannot be bound");
                goto fail;
            }
            rc = sq.bind_text(stmt, i, text, (int)len, SQLITE_TRANSIENT_);
        }
        else {
            PyErr_Format(PyExc_TypeError, "a value of type %.100s cannot be bound",
                         Py_TYPE(v)->tp_name);
            goto fail;
        }
    }
    long long result = 0;
    Py_BEGIN_ALLOW_THREADS
    if (rc == SQLITE_OK) {
        rc = sq.step(stmt);
        if (rc == SQLITE_ROW) {
            result = sq.column_int64(stmt, 0);
            rc = SQLITE_OK;
        }
        else if (rc == SQLITE_DONE) {
            result = sq.last_insert_rowid(db);
            rc = SQLITE_OK;
        }
    }
    if (rc != SQLITE_OK) snprintf(error, sizeof error, "%s", sq.errmsg(db));
    if (stmt != NULL) sq.finalize(stmt);
    Py_END_ALLOW_THREADS
    Py_DECREF(seq);
    if (rc != SQLITE_OK) return sqlite_error(error, rc);
    return PyLong_FromLongLong(result);
fail:
    if (stmt != NULL) sq.finalize(stmt);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *
Store_close(Store *self, PyObject *Py_UNUSED(ignored))
{
    if (self->db != NULL) {
        sqlite3 *db = self->db;
        self->db = NULL;
        Py_BEGIN_ALLOW_THREADS
        sq.close_v2(db);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyObject *
Store_forget(Store *self, PyObject *Py_UNUSED(ignored))
{
    self->db = NULL;  /* a forked child's copy: the parent's, neither to use nor to close */
    Py_RETURN_NONE;
}

static PyMethodDef Store_methods[] = {
    {"filename", (PyCFunction)Store_filename, METH_NOARGS,
     "filename() -> str: the main database file, as SQLite reports it."},
    {"execute", (PyCFunction)Store_execute, METH_VARARGS,
     "execute(sql): run an SQL script (no parameters, no rows) on this handle."},
    {"run", (PyCFunction)Store_run, METH_VARARGS,
     "run(sql, params) -> int: one statement with its parameters; the first column of its "
     "first row, or the last inserted rowid."},
    {"close", (PyCFunction)Store_close, METH_NOARGS, "close(): close the handle."},
    {"forget", (PyCFunction)Store_forget, METH_NOARGS,
     "forget(): drop the handle without closing it (in a forked child)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "instrument._sqlite_rows.Store",
    .tp_basicsize = sizeof(Store),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A SQLite handle of this module's own on the writer's store (see open()).",
    .tp_dealloc = (destructor)Store_dealloc,
    .tp_methods = Store_methods,
};

/* ---- Events: the writer's queue, as C values ---------------------------------------- */

typedef EventsCell Cell;  /* _events_api.h */

/* Records of `width` cells each, and the text they hold. The application appends under
   the GIL; the writer takes everything at once (take(), a swap of buffers) and binds it
   with the GIL released: nothing here is a Python object, so nothing needs the GIL to be
   read or freed. */
typedef struct {
    PyObject_HEAD
    Py_ssize_t width;
    Cell *cells;
    Py_ssize_t nrecords, capacity;  /* in records */
    char *text;
    size_t text_len, text_capacity;
} Events;

static PyTypeObject EventsType;

static int
Events_init(Events *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"width", NULL};
    Py_ssize_t width;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n", kwlist, &width)) return -1;
    if (width <= 0 || width > 1024) {
        PyErr_SetString(PyExc_ValueError, "width must be between 1 and 1024");
        return -1;
    }
    if (self->nrecords) {
        PyErr_SetString(PyExc_ValueError, "Events is already in use");
        return -1;
    }
    self->width = width;
    return 0;
}

static void
Events_dealloc(Events *self)
{
    PyMem_RawFree(self->cells);
    PyMem_RawFree(self->text);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t
Events_length(Events *self)
{
    return self->nrecords * self->width;
}

/* Room for one more record; -1 (MemoryError set) if it cannot be had. */
static int
reserve_record(Events *self)
{
    if (self->nrecords < self->capacity) return 0;
    Py_ssize_t capacity = self->capacity ? self->capacity * 2 : 1024;
    if ((size_t)capacity > PY_SSIZE_T_MAX / sizeof(Cell) / (size_t)self->width) {
        PyErr_NoMemory();
        return -1;
    }
    Cell *cells = PyMem_RawRealloc(self->cells, (size_t)(capacity * self->width) * sizeof(Cell));
    if (cells == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->cells = cells;
    self->capacity = capacity;
    return 0;
}

static int
append_text(Events *self, const char *s, size_t len, Cell *cell)
{
    if (self->text_len + len > self->text_capacity) {
        size_t capacity = self->text_capacity ? self->text_capacity * 2 : 16384;
        while (capacity < self->text_len + len) capacity *= 2;
        char *text = PyMem_RawRealloc(self->text, capacity);
        if (text == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->text = text;
        self->text_capacity = capacity;
    }
    memcpy(self->text + self->text_len, s, len);
    cell->type = CELL_TEXT;
    cell->len = (int)len;
    cell->off = self->text_len;
    self->text_len += len;
    return 0;
}

/* A str UTF-8 cannot encode (a lone surrogate: a thread named after a file name, say),
   with the error that said so set: held as _store.valid_text() writes it, so that both
   queues store the same text. A file name's undecodable byte (surrogateescape) becomes
   \xff, any other lone surrogate \ud800. Only such a str pays for this. */
static int
store_invalid_text(Events *self, PyObject *v, Cell *cell)
{
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) return -1;
    PyErr_Clear();
    PyObject *valid = NULL;
    PyObject *raw = PyUnicode_AsEncodedString(v, "utf-8", "surrogateescape");
    if (raw != NULL) {
        valid = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw),
                                     "backslashreplace");
        Py_DECREF(raw);
    }
    else if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
        PyErr_Clear();
        raw = PyUnicode_AsEncodedString(v, "utf-8", "backslashreplace");
        if (raw == NULL) return -1;
        valid = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), NULL);
        Py_DECREF(raw);
    }
    if (valid == NULL) return -1;
    Py_ssize_t len;
    const char *s = PyUnicode_AsUTF8AndSize(valid, &len);
    int rc = -1;
    if (s != NULL && len > INT32_MAX)
        PyErr_SetString(PyExc_OverflowError, "a str past 2 GB cannot be queued");
    else if (s != NULL)
        rc = append_text(self, s, (size_t)len, cell);
    Py_DECREF(valid);
    return rc;
}

/* One value into a cell: None, int (bool included), float or str; else TypeError. The
   empty str, which is how the listeners write NULL (see _record.NULL), is held as NULL.
   Text is checked first: most of a record's values are text or NULL. */
static int
store_value(Events *self, PyObject *v, Cell *cell)
{
    if (PyUnicode_Check(v)) {
        if (PyUnicode_GET_LENGTH(v) == 0) {
            cell->type = CELL_NULL;
            return 0;
        }
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(v, &len);
        if (s == NULL) return store_invalid_text(self, v, cell);
        if (len > INT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "a str past 2 GB cannot be queued");
            return -1;
        }
        return append_text(self, s, (size_t)len, cell);
    }
    if (PyLong_Check(v)) {
        int overflow;
        cell->i = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (cell->i == -1 && PyErr_Occurred()) return -1;
        if (overflow) {
            PyErr_SetString(PyExc_OverflowError, "an int past 64 bits cannot be queued");
            return -1;
        }
        cell->type = CELL_INT;
    }
    else if (PyFloat_Check(v)) {
        cell->type = CELL_FLOAT;
        cell->d = PyFloat_AS_DOUBLE(v);
    }
    else if (v == Py_None) {
        cell->type = CELL_NULL;
    }
    else {
        PyErr_Format(PyExc_TypeError, "a value of type %.100s cannot be queued",
                     Py_TYPE(v)->tp_name);
        return -1;
    }
    return 0;
}

/* Append one record of `width` values, all or nothing. 0, or -1 with an error set. */
static int
append_values(Events *self, PyObject *const *values)
{
    if (reserve_record(self) < 0) return -1;
    Cell *record = self->cells + self->nrecords * self->width;
    size_t text_len = self->text_len;
    for (Py_ssize_t k = 0; k < self->width; k++) {
        if (store_value(self, values[k], &record[k]) < 0) {
            self->text_len = text_len;  /* the record's text so far is forgotten */
            return -1;
        }
    }
    self->nrecords++;
    return 0;
}

/* The C interface for _speedups' listeners (_events_api.h). */
static Py_ssize_t
api_size(PyObject *events)
{
    return Events_length((Events *)events);
}

static Cell *
api_reserve(PyObject *events)
{
    Events *self = (Events *)events;
    if (reserve_record(self) < 0) return NULL;
    return self->cells + self->nrecords * self->width;
}

static void
api_commit(PyObject *events)
{
    ((Events *)events)->nrecords++;
}

static int
api_store(PyObject *events, PyObject *value, Cell *cell)
{
    return store_value((Events *)events, value, cell);
}

static const EventsAPI events_api = {
    .type = &EventsType,
    .size = api_size,
    .reserve = api_reserve,
    .commit = api_commit,
    .store = api_store,
};

static PyObject *
Events_extend(Events *self, PyObject *values)
{
    PyObject *seq = PySequence_Fast(values, "extend() takes a sequence of values");
    if (seq == NULL) return NULL;
    if (PySequence_Fast_GET_SIZE(seq) != self->width) {
        PyErr_Format(PyExc_ValueError, "a record is %zd values, not %zd", self->width,
                     PySequence_Fast_GET_SIZE(seq));
        Py_DECREF(seq);
        return NULL;
    }
    int rc = append_values(self, PySequence_Fast_ITEMS(seq));
    Py_DECREF(seq);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

static void
swap_buffers(Events *a, Events *b)
{
    Events t = *a;
    a->cells = b->cells; a->nrecords = b->nrecords; a->capacity = b->capacity;
    a->text = b->text; a->text_len = b->text_len; a->text_capacity = b->text_capacity;
    b->cells = t.cells; b->nrecords = t.nrecords; b->capacity = t.capacity;
    b->text = t.text; b->text_len = t.text_len; b->text_capacity = t.text_capacity;
}

static PyObject *
Events_take(Events *self, PyObject *spare)
{
    if (!PyObject_TypeCheck(spare, &EventsType) || ((Events *)spare)->width != self->width ||
        ((Events *)spare)->nrecords || spare == (PyObject *)self) {
        PyErr_SetString(PyExc_ValueError, "take() needs another, empty Events of the same width");
        return NULL;
    }
    swap_buffers(self, (Events *)spare);
    return Py_NewRef(spare);
}

static PyObject *
Events_clear(Events *self, PyObject *args)
{
    Py_ssize_t keep = PY_SSIZE_T_MAX;
    if (!PyArg_ParseTuple(args, "|n", &keep)) return NULL;
    self->nrecords = 0;
    self->text_len = 0;
    if (self->capacity > keep) {
        PyMem_RawFree(self->cells);
        PyMem_RawFree(self->text);
        self->cells = NULL;
        self->text = NULL;
        self->capacity = 0;
        self->text_capacity = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *
cell_value(Events *self, const Cell *cell)
{
    switch (cell->type) {
    case CELL_INT: return PyLong_FromLongLong(cell->i);
    case CELL_FLOAT: return PyFloat_FromDouble(cell->d);
    case CELL_TEXT: return PyUnicode_DecodeUTF8(self->text + cell->off, cell->len, NULL);
    default: Py_RETURN_NONE;
    }
}

/* tolist([start]) -> list: the values of the records from the index `start` (0 by
   default; past the last: none) to the last, flat. */
static PyObject *
Events_tolist(Events *self, PyObject *args)
{
    Py_ssize_t start = 0;
    if (!PyArg_ParseTuple(args, "|n", &start)) return NULL;
    if (start < 0) {
        PyErr_SetString(PyExc_ValueError, "tolist() takes a record index of 0 or more");
        return NULL;
    }
    if (start > self->nrecords) start = self->nrecords;
    Py_ssize_t first = start * self->width, n = Events_length(self) - first;
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = cell_value(self, &self->cells[first + i]);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

/* The UTF-8 text and length of each str in the tuple `texts` into `names` and `lens`
   (borrowed: they live as long as the tuple). 0, or -1 with an error set. */
static int
text_names(PyObject *texts, const char **names, Py_ssize_t *lens)
{
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(texts); k++) {
        names[k] = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(texts, k), &lens[k]);
        if (names[k] == NULL) return -1;
    }
    return 0;
}

/* The index of a text cell's value in `names` (n of them, with their `lens`), else n
   (also for a cell that is not text). */
static Py_ssize_t
text_index(const Events *self, const Cell *c, const char **names, const Py_ssize_t *lens,
           Py_ssize_t n)
{
    if (c->type != CELL_TEXT) return n;
    for (Py_ssize_t k = 0; k < n; k++)
        if (lens[k] == c->len && memcmp(names[k], self->text + c->off, (size_t)c->len) == 0)
            return k;
    return n;
}

/* numbers(texts[, fields[, rows]]) -> bytes: every value of the `fields` (a tuple of
   field indices; all by default) of the records at `rows` (a list of indices; all by
   default) as a float64, field by field (all the records' first field, then all their
   second, ...: len(fields) columns of one value per record): an int or float as its
   value, NULL as NaN, text as its index in the tuple of str `texts` (-1 where it is none
   of them). For the writer's rollups: the batch as numpy columns, without a Python object
   per value. Many records are read with the GIL released, as insert() reads: nothing
   else may append to these Events meanwhile (the writer calls it on the batch it took);
   a few are read with it held (taking it back would cost the application more). */
static PyObject *
Events_numbers(Events *self, PyObject *args)
{
    enum { MAX_TEXTS = 64, MAX_FIELDS = 1024, LONG = 32 };
    PyObject *texts, *wanted = Py_None, *only = Py_None;
    if (!PyArg_ParseTuple(args, "O|OO", &texts, &wanted, &only)) return NULL;
    const char *names[MAX_TEXTS];
    Py_ssize_t lens[MAX_TEXTS];
    if (!PyTuple_Check(texts) || PyTuple_GET_SIZE(texts) > MAX_TEXTS) {
        PyErr_SetString(PyExc_TypeError, "numbers() takes a tuple of at most 64 str");
        return NULL;
    }
    Py_ssize_t ntexts = PyTuple_GET_SIZE(texts);
    if (text_names(texts, names, lens) < 0) return NULL;
    Py_ssize_t width = self->width, nrecords = self->nrecords;
    Py_ssize_t fields[MAX_FIELDS], nfields = width;
    if (wanted == Py_None) {
        for (Py_ssize_t f = 0; f < width; f++) fields[f] = f;
    }
    else {
        if (!PyTuple_Check(wanted) || PyTuple_GET_SIZE(wanted) > width) {
            PyErr_SetString(PyExc_TypeError, "numbers() takes a tuple of at most width fields");
            return NULL;
        }
        nfields = PyTuple_GET_SIZE(wanted);
        for (Py_ssize_t j = 0; j < nfields; j++) {
            fields[j] = PyLong_AsSsize_t(PyTuple_GET_ITEM(wanted, j));
            if (fields[j] == -1 && PyErr_Occurred()) return NULL;
            if (fields[j] < 0 || fields[j] >= width) {
                PyErr_SetString(PyExc_ValueError, "a field index is out of range");
                return NULL;
            }
        }
    }
    /* The names by length (LONG: any longer), each length's in the tuple's order: a text
       is compared with the names of its length only, the first that matches wins. */
    int first[LONG + 1], next[MAX_TEXTS];
    for (int l = 0; l <= LONG; l++) first[l] = -1;
    for (int k = (int)ntexts - 1; k >= 0; k--) {
        int l = lens[k] < LONG ? (int)lens[k] : LONG;
        next[k] = first[l];
        first[l] = k;
    }
    Py_ssize_t *rows = NULL;  /* the records to read (`only`), else all of them */
    if (only != Py_None) {
        if (!PyList_Check(only)) {
            PyErr_SetString(PyExc_TypeError, "numbers() takes a list of record indices");
            return NULL;
        }
        Py_ssize_t n = PyList_GET_SIZE(only);
        rows = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Py_ssize_t));
        if (rows == NULL) return PyErr_NoMemory();
        for (Py_ssize_t i = 0; i < n; i++) {
            rows[i] = PyLong_AsSsize_t(PyList_GET_ITEM(only, i));
            if (rows[i] == -1 && PyErr_Occurred()) {
                PyMem_Free(rows);
                return NULL;
            }
            if (rows[i] < 0 || rows[i] >= nrecords) {
                PyMem_Free(rows);
                PyErr_SetString(PyExc_IndexError, "a record index is out of range");
                return NULL;
            }
        }
        nrecords = n;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, nfields * nrecords * (Py_ssize_t)sizeof(double));
    if (out == NULL) {
        PyMem_Free(rows);
        return NULL;
    }
    double *d = (double *)PyBytes_AS_STRING(out);
    const Cell *cells = self->cells;
    const char *text = self->text;
    Py_INCREF(self);
    Py_INCREF(texts);  /* names[] point into its str */
    PyThreadState *released = nrecords > 4096 ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t r = 0; r < nrecords; r++) {  /* the records in order, into the columns */
        const Cell *record = cells + (rows != NULL ? rows[r] : r) * width;
        double *value = d + r;
        for (Py_ssize_t j = 0; j < nfields; j++, value += nrecords) {
            const Cell *c = record + fields[j];
            switch (c->type) {
            case CELL_INT: *value = (double)c->i; break;
            case CELL_FLOAT: *value = c->d; break;
            case CELL_TEXT:
                *value = -1.0;
                for (int k = first[c->len < LONG ? c->len : LONG]; k >= 0; k = next[k]) {
                    if (lens[k] == c->len && (c->len == 0 || names[k][0] == text[c->off]) &&
                        memcmp(names[k], text + c->off, c->len) == 0) {
                        *value = (double)k;
                        break;
                    }
                }
                break;
            default: *value = Py_NAN;
            }
        }
    }
    if (released != NULL) PyEval_RestoreThread(released);
    PyMem_Free(rows);
    Py_DECREF(texts);
    Py_DECREF(self);
    return out;
}

static PyObject *Events_rollup(Events *self, PyObject *args);  /* below */
static PyObject *Events_survey(Events *self, PyObject *args);

static PyMethodDef Events_methods[] = {
    {"extend", (PyCFunction)Events_extend, METH_O,
     "extend(values): append one record of exactly `width` values (None, int, float or "
     "str), all or nothing."},
    {"take", (PyCFunction)Events_take, METH_O,
     "take(spare) -> spare: move every record into `spare` (an empty Events), in O(1); "
     "this queue goes on in spare's buffers."},
    {"clear", (PyCFunction)Events_clear, METH_VARARGS,
     "clear([keep]): forget every record; free the buffers if they hold more than "
     "`keep` records, else keep them for the next take()."},
    {"tolist", (PyCFunction)Events_tolist, METH_VARARGS,
     "tolist([start]) -> list: the values of the records from the index `start` (0: all) "
     "on, flat, as Python objects (text as str, NULL as None)."},
    {"rollup", (PyCFunction)Events_rollup, METH_VARARGS,
     "rollup(fields, pool_ids, stack_ids, period_s, carry, base, log_g, kinds) -> (sites, "
     "pools, carry, records) or None: the rollups of these records in one pass (see "
     "_rollups.Rollups.feed_events); None where numpy is to compute them."},
    {"survey", (PyCFunction)Events_survey, METH_VARARGS,
     "survey(kinds, checkouts, ends, marks, whole, fields, pool_ids, lowest) -> (counts, "
     "first, last, rows) or None: the records of each kind, the first and last time, and "
     "the records the keeper's notable checkouts are found in (see "
     "_retention._survey); None where numpy is to read the batch."},
    {"numbers", (PyCFunction)Events_numbers, METH_VARARGS,
     "numbers(texts[, fields[, rows]]) -> bytes: the values of the fields at the indices "
     "`fields` (all by default; None: all) of the records at the indices `rows` (a list; "
     "all by default) as float64, field by field (a column each): numbers as they are, "
     "NULL as NaN, text as its index in the tuple `texts` (-1 if not in it)."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Events_as_sequence = {
    .sq_length = (lenfunc)Events_length,
};

static PyTypeObject EventsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "instrument._sqlite_rows.Events",
    .tp_basicsize = sizeof(Events),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Events(width): the writer's queue of records, held as C values.\n\n"
              "len() counts values (records times width), as the flat list it replaces.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Events_init,
    .tp_dealloc = (destructor)Events_dealloc,
    .tp_methods = Events_methods,
    .tp_as_sequence = &Events_as_sequence,
};

/* ---- insert ------------------------------------------------------------------------ */

#define NO_MAP INT64_MIN  /* a local id with no store id: bound as NULL */

typedef struct {
    long long *ids;  /* store id by local id */
    Py_ssize_t n;
} ColumnMap;

/* The dict `map` (int -> int) as an array indexed by key; keys outside 0..2**24 are left
   out (they become NULL). -1 with an error set on failure. */
static int
column_map(PyObject *map, ColumnMap *out)
{
    PyObject *key, *value;
    Py_ssize_t pos = 0, n = 0;
    while (PyDict_Next(map, &pos, &key, &value)) {
        long long k = PyLong_Check(key) ? PyLong_AsLongLong(key) : -1;
        if (k == -1) PyErr_Clear();
        if (k >= 0 && k < (1 << 24) && k >= n) n = (Py_ssize_t)k + 1;
    }
    out->ids = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(long long));
    if (out->ids == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->n = n;
    for (Py_ssize_t i = 0; i < n; i++) out->ids[i] = NO_MAP;
    pos = 0;
    while (PyDict_Next(map, &pos, &key, &value)) {
        long long k = PyLong_Check(key) ? PyLong_AsLongLong(key) : -1;
        long long v = PyLong_Check(value) ? PyLong_AsLongLong(value) : NO_MAP;
        if (PyErr_Occurred()) {
            PyErr_Clear();
            continue;
        }
        if (k >= 0 && k < n) out->ids[k] = v;
    }
    return 0;
}

static void
free_column_maps(ColumnMap *maps, Py_ssize_t width)
{
    for (Py_ssize_t k = 0; k < width; k++) PyMem_Free(maps[k].ids);
    PyMem_Free(maps);
}

/* The maps of `remap` (column index -> dict, see column_map) for `width` columns, as an
   array (NULL ids: no map); entries that name no column are left out. NULL with an error
   set on failure. Freed with free_column_maps. */
static ColumnMap *
column_maps(PyObject *remap, Py_ssize_t width)
{
    ColumnMap *maps = PyMem_Calloc((size_t)width, sizeof(ColumnMap));
    if (maps == NULL) return (ColumnMap *)PyErr_NoMemory();
    PyObject *key, *map;
    Py_ssize_t pos = 0;
    while (PyDict_Next(remap, &pos, &key, &map)) {
        Py_ssize_t column = PyLong_AsSsize_t(key);
        if (column >= 0 && column < width && PyDict_Check(map) && maps[column].ids == NULL) {
            if (column_map(map, &maps[column]) < 0) {
                free_column_maps(maps, width);
                return NULL;
            }
        }
        else
            PyErr_Clear();
    }
    return maps;
}

static int
bind_cell(sqlite3_stmt *stmt, int index, const Cell *cell, const char *text,
          const ColumnMap *map)
{
    if (map != NULL && map->ids != NULL) {
        if (cell->type == CELL_INT && cell->i >= 0 && cell->i < map->n &&
            map->ids[cell->i] != NO_MAP)
            return sq.bind_int64(stmt, index, map->ids[cell->i]);
        return sq.bind_null(stmt, index);
    }
    switch (cell->type) {
    case CELL_INT: return sq.bind_int64(stmt, index, cell->i);
    case CELL_FLOAT: return sq.bind_double(stmt, index, cell->d);
    case CELL_TEXT:
        return sq.bind_text(stmt, index, text + cell->off, cell->len, SQLITE_STATIC_);
    default: return sq.bind_null(stmt, index);
    }
}

/* Run `sql` (whose parameters take `per_statement` cells) over `cells`, in order;
   without the GIL. Returns SQLITE_OK or an error code, with the message in `error`. */
static int
run(sqlite3 *db, const char *sql, const Cell *cells, Py_ssize_t ncells, int per_statement,
    const char *text, const ColumnMap *maps, Py_ssize_t width, char *error,
    size_t error_size)
{
    sqlite3_stmt *stmt = NULL;
    int rc = sq.prepare_v2(db, sql, -1, &stmt, NULL);
    for (Py_ssize_t at = 0; rc == SQLITE_OK && at < ncells; at += per_statement) {
        for (int k = 0; k < per_statement && rc == SQLITE_OK; k++)
            rc = bind_cell(stmt, k + 1, &cells[at + k], text, &maps[k % width]);
        if (rc != SQLITE_OK) break;
        rc = sq.step(stmt);
        if (rc == SQLITE_DONE) rc = sq.reset(stmt);
    }
    if (rc != SQLITE_OK) snprintf(error, error_size, "%s", sq.errmsg(db));
    if (stmt != NULL) sq.finalize(stmt);
    return rc;
}

/* insert(store, events, many_sql, rows_per_statement, one_sql, remap, before, after)
   -> True

   Insert the records of `events` (an Events the writer took from the queue) through
   `store` (a Store): whole groups of `rows_per_statement` records with `many_sql`, the rest one by
   one with `one_sql`, between the SQL scripts `before` and `after` (each may be empty),
   all with the GIL released once: the writer's BEGIN, its heartbeat and COMMIT go here,
   since every release is a wait for the GIL to come back, which the application pays
   for in wake-ups while the writer waits. `remap` maps a column index to a dict (int ->
   int) through which that column's values are translated (a value it lacks becomes
   NULL). Raises sqlite3.OperationalError if SQLite fails part-way, having rolled back
   the transaction `before` began. Nothing else may use `events` meanwhile. */
static PyObject *
insert(PyObject *self, PyObject *args)
{
    PyObject *remap;
    Store *store;
    Events *events;
    Py_ssize_t rows_per_statement;
    const char *many_sql, *one_sql, *before, *after;
    if (!PyArg_ParseTuple(args, "O!O!snsO!ss", &StoreType, &store, &EventsType, &events,
                          &many_sql, &rows_per_statement, &one_sql, &PyDict_Type, &remap,
                          &before, &after))
        return NULL;
    sqlite3 *db = store_db(store);
    if (db == NULL) return NULL;
    Py_ssize_t width = events->width, n = Events_length(events);
    if (rows_per_statement <= 0 || width * rows_per_statement > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "rows_per_statement is out of range");
        return NULL;
    }
    ColumnMap *maps = column_maps(remap, width);
    if (maps == NULL) return NULL;
    int rc = SQLITE_OK;
    char error[512] = "";
    Py_ssize_t whole = n - n % (width * rows_per_statement);
    const Cell *cells = events->cells;
    const char *text = events->text;
    Py_INCREF(events);
    Py_BEGIN_ALLOW_THREADS
    rc = run_script(db, before, error, sizeof error);
    if (rc == SQLITE_OK && whole)
        rc = run(db, many_sql, cells, whole, (int)(width * rows_per_statement), text, maps,
                 width, error, sizeof error);
    if (rc == SQLITE_OK && whole < n)
        rc = run(db, one_sql, cells + whole, n - whole, (int)width, text, maps, width,
                 error, sizeof error);
    if (rc == SQLITE_OK) rc = run_script(db, after, error, sizeof error);
    /* Never left open: the next batch's BEGIN would fail, and every batch after. */
    if (rc != SQLITE_OK && !sq.get_autocommit(db)) sq.exec(db, "ROLLBACK", NULL, NULL, NULL);
    Py_END_ALLOW_THREADS
    Py_DECREF(events);
    free_column_maps(maps, width);
    if (rc != SQLITE_OK) return sqlite_error(error, rc);
    Py_RETURN_TRUE;
}

/* ---- copy_binary: the records as PostgreSQL's binary COPY stream ------------------- */

static const char copy_signature[19] = "PGCOPY\n\377\r\n\0\0\0\0\0\0\0\0\0";

static char *
put_be(char *p, unsigned long long v, int bytes)
{
    for (int k = bytes - 1; k >= 0; k--) *p++ = (char)(v >> (8 * k));
    return p;
}

/* The bytes one cell takes in the stream (its length word included), or -1 where its
   value does not go into a column of type `type` as it is: text in a number column or
   the reverse, a float in an int8 column, text holding a NUL byte. */
static Py_ssize_t
copy_cell_size(const Cell *cell, char type, const char *text, const ColumnMap *map)
{
    if (map != NULL && map->ids != NULL) {
        if (cell->type == CELL_NULL) return 4;
        if (cell->type != CELL_INT) return -1;
        return cell->i >= 0 && cell->i < map->n && map->ids[cell->i] != NO_MAP ? 12 : 4;
    }
    switch (cell->type) {
    case CELL_NULL: return 4;
    case CELL_INT: return type == 'q' || type == 'd' ? 12 : -1;
    case CELL_FLOAT: return type == 'd' ? 12 : -1;
    case CELL_TEXT:
        if (type != 't' || memchr(text + cell->off, '\0', (size_t)cell->len) != NULL) return -1;
        return 4 + (Py_ssize_t)cell->len;
    default: return -1;
    }
}

static char *
copy_cell(char *p, const Cell *cell, char type, const char *text, const ColumnMap *map)
{
    if (map != NULL && map->ids != NULL) {
        long long id = NO_MAP;
        if (cell->type == CELL_INT && cell->i >= 0 && cell->i < map->n) id = map->ids[cell->i];
        if (id == NO_MAP) return put_be(p, 0xFFFFFFFFu, 4);  /* NULL */
        p = put_be(p, 8, 4);
        return put_be(p, (unsigned long long)id, 8);
    }
    switch (cell->type) {
    case CELL_INT:
        p = put_be(p, 8, 4);
        if (type == 'd') {
            double d = (double)cell->i;
            unsigned long long bits;
            memcpy(&bits, &d, 8);
            return put_be(p, bits, 8);
        }
        return put_be(p, (unsigned long long)cell->i, 8);
    case CELL_FLOAT: {
        unsigned long long bits;
        memcpy(&bits, &cell->d, 8);
        p = put_be(p, 8, 4);
        return put_be(p, bits, 8);
    }
    case CELL_TEXT:
        p = put_be(p, (unsigned long long)cell->len, 4);
        memcpy(p, text + cell->off, (size_t)cell->len);
        return p + cell->len;
    default:
        return put_be(p, 0xFFFFFFFFu, 4);  /* NULL */
    }
}

static PyObject *format_copy(Events *events, const char *types, const ColumnMap *maps,
                             const char *suffix, Py_ssize_t suffix_len, int suffix_fields);

/* copy_binary(events, types, remap, suffix, suffix_fields) -> bytes | None

   The records of `events` as one whole binary COPY stream (signature, one tuple per
   record, trailer), formatted with the GIL released. `types` gives each field's column
   type: 'd' float8, 'q' int8, 't' text (UTF-8). `remap` maps a field's index to a dict
   (int -> int) through which its values become int8 ids (one it lacks: NULL). `suffix`
   (already in the stream's encoding: `suffix_fields` fields) ends every tuple. None,
   having formatted nothing, where a value does not go into its column as it is (text
   in a number column or the reverse, a float in an int8 column, text holding a NUL
   byte): the caller formats those records another way. */
static PyObject *
copy_binary(PyObject *self, PyObject *args)
{
    Events *events;
    const char *types;
    Py_ssize_t ntypes, suffix_len;
    PyObject *remap;
    const char *suffix;
    int suffix_fields;
    if (!PyArg_ParseTuple(args, "O!s#O!y#i", &EventsType, &events, &types, &ntypes,
                          &PyDict_Type, &remap, &suffix, &suffix_len, &suffix_fields))
        return NULL;
    Py_ssize_t width = events->width;
    if (ntypes != width) {
        PyErr_Format(PyExc_ValueError, "types names %zd columns, not %zd", ntypes, width);
        return NULL;
    }
    if (suffix_fields < 0 || width + suffix_fields > 0x7FFF) {
        PyErr_SetString(PyExc_ValueError, "suffix_fields is out of range");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < width; k++) {
        if (types[k] != 'd' && types[k] != 'q' && types[k] != 't') {
            PyErr_Format(PyExc_ValueError, "unknown column type %c", types[k]);
            return NULL;
        }
    }
    ColumnMap *maps = column_maps(remap, width);
    if (maps == NULL) return NULL;
    PyObject *out = format_copy(events, types, maps, suffix, suffix_len, suffix_fields);
    free_column_maps(maps, width);
    return out;
}

/* copy_binary's stream, once its maps are made. */
static PyObject *
format_copy(Events *events, const char *types, const ColumnMap *maps, const char *suffix,
            Py_ssize_t suffix_len, int suffix_fields)
{
    Py_ssize_t width = events->width, nrecords = events->nrecords;
    const Cell *cells = events->cells;
    const char *text = events->text;
    char *buffer = NULL;
    Py_ssize_t size = 0;
    int fits = 1;
    PyObject *out = NULL;
    Py_INCREF(events);
    Py_BEGIN_ALLOW_THREADS
    size = (Py_ssize_t)sizeof copy_signature + 2;
    for (Py_ssize_t i = 0; fits && i < nrecords; i++) {
        size += 2 + suffix_len;
        for (Py_ssize_t k = 0; k < width; k++) {
            Py_ssize_t n = copy_cell_size(&cells[i * width + k], types[k], text, &maps[k]);
            if (n < 0 || size > PY_SSIZE_T_MAX / 2) {
                fits = 0;
                break;
            }
            size += n;
        }
    }
    if (fits) buffer = PyMem_RawMalloc((size_t)size);
    if (buffer != NULL) {
        char *p = buffer;
        memcpy(p, copy_signature, sizeof copy_signature);
        p += sizeof copy_signature;
        for (Py_ssize_t i = 0; i < nrecords; i++) {
            p = put_be(p, (unsigned long long)(width + suffix_fields), 2);
            for (Py_ssize_t k = 0; k < width; k++)
                p = copy_cell(p, &cells[i * width + k], types[k], text, &maps[k]);
            memcpy(p, suffix, (size_t)suffix_len);
            p += suffix_len;
        }
        p = put_be(p, 0xFFFFu, 2);  /* the trailer: -1 as int16 */
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(events);
    if (!fits) {
        out = Py_NewRef(Py_None);
    }
    else if (buffer == NULL) {
        PyErr_NoMemory();
    }
    else {
        out = PyBytes_FromStringAndSize(buffer, size);
        PyMem_RawFree(buffer);
    }
    return out;
}

/* ---- rollup: the rollups of a batch in one pass ------------------------------------- */

/* Events.rollup() computes what _rollups.Rollups.feed() computes from a Batch, for the
   common batch, reading the cells once with the GIL held: numpy gives the GIL up around
   every operation on a batch's columns, and each time the writer takes it back it waits
   for the application's thread (which wakes it at every release of its own). An unusual
   batch (a pool's records out of time order, an infinite value, text in a number's
   field, thousands of groups) is left to numpy: rollup() then returns None. The sums are
   added in record order, as numpy's bincount adds them, so both give the same bits. */

#define RU_MAX_GROUPS 4096     /* (period, pool, call site) groups, and (period, pool) ones */
#define RU_TABLE 8192          /* hash slots: twice the groups at most */
#define RU_MAX_POOLS 1024
#define RU_MAX_BUCKET 65535
#define RU_MAX_HIST_BYTES (16 << 20)  /* the histograms' counts of one batch, at most */

typedef struct {
    long long *counts;  /* by bucket, 0 .. cap - 1 */
    Py_ssize_t cap;
    long long n;
    size_t *budget;  /* bytes the batch's histograms may still take */
} RuHist;

typedef struct {
    double start;
    long long pool, stack;
    long long checkouts, checkins, gc_checkins, timeouts, leaks, connects;
    double hold_sum, hold_max, wait_sum, wait_max, connect_sum;
    int has_hold_max, has_wait_max;
    RuHist hold, wait;
} RuSite;

typedef struct {
    double start;
    long long pool;
    long long events, invalidations, disconnects;
    double peak[4];  /* in use, overflow, waiters, demand */
    int has_peak[4];
    double integral;
} RuPool;

typedef struct {
    long long pool;
    double last_at, last_in_use;  /* the carry: the pool's last event so far */
    int has_last;
    double seen_at;  /* this batch's last time of the pool: the order check */
    int seen;
} RuPoolState;

typedef struct {
    long long pool;
    double start, end, value;
} RuCrossing;

typedef struct {
    RuSite *sites;
    Py_ssize_t nsites;
    int site_slot[RU_TABLE];
    RuPool *pools;
    Py_ssize_t npools;
    int pool_slot[RU_TABLE];
    RuPoolState states[RU_MAX_POOLS];
    Py_ssize_t nstates;
    RuCrossing *crossings;
    Py_ssize_t ncrossings, crossings_cap;
    size_t hist_budget;
} Rollup;

static unsigned
ru_hash(double start, long long pool, long long stack)
{
    uint64_t bits;
    memcpy(&bits, &start, sizeof bits);
    uint64_t h = bits * 0x9E3779B97F4A7C15ull ^ (uint64_t)pool * 0xC2B2AE3D27D4EB4Full ^
                 (uint64_t)stack * 0x165667B19E3779F9ull;
    return (unsigned)((h ^ (h >> 29)) & (RU_TABLE - 1));
}

/* The site group of (start, pool, stack), made if new; NULL past RU_MAX_GROUPS. */
static RuSite *
ru_site(Rollup *r, double start, long long pool, long long stack)
{
    unsigned h = ru_hash(start, pool, stack);
    for (;; h = (h + 1) & (RU_TABLE - 1)) {
        int i = r->site_slot[h];
        if (i < 0) break;
        RuSite *s = &r->sites[i];
        if (s->start == start && s->pool == pool && s->stack == stack) return s;
    }
    if (r->nsites >= RU_MAX_GROUPS) return NULL;
    r->site_slot[h] = (int)r->nsites;
    RuSite *s = &r->sites[r->nsites++];
    memset(s, 0, sizeof *s);
    s->start = start;
    s->pool = pool;
    s->stack = stack;
    s->hold.budget = s->wait.budget = &r->hist_budget;
    return s;
}

static RuPool *
ru_pool(Rollup *r, double start, long long pool)
{
    unsigned h = ru_hash(start, pool, -1);
    for (;; h = (h + 1) & (RU_TABLE - 1)) {
        int i = r->pool_slot[h];
        if (i < 0) break;
        RuPool *p = &r->pools[i];
        if (p->start == start && p->pool == pool) return p;
    }
    if (r->npools >= RU_MAX_GROUPS) return NULL;
    r->pool_slot[h] = (int)r->npools;
    RuPool *p = &r->pools[r->npools++];
    memset(p, 0, sizeof *p);
    p->start = start;
    p->pool = pool;
    return p;
}

/* Count `bucket` once: 1; 0 past the batch's budget (numpy rolls it up); -1
   (MemoryError set) if the counts cannot grow. */
static int
ru_count(RuHist *h, long long bucket)
{
    if (bucket >= h->cap) {
        Py_ssize_t cap = h->cap ? h->cap : 256;
        while (cap <= bucket) cap *= 2;
        size_t more = (size_t)(cap - h->cap) * sizeof(long long);
        if (more > *h->budget) return 0;
        *h->budget -= more;
        long long *counts = PyMem_Realloc(h->counts, (size_t)cap * sizeof(long long));
        if (counts == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memset(counts + h->cap, 0, (size_t)(cap - h->cap) * sizeof(long long));
        h->counts = counts;
        h->cap = cap;
    }
    h->counts[bucket]++;
    h->n++;
    return 1;
}

/* _histogram.buckets_of() of one value that is not NaN; -1: past RU_MAX_BUCKET. */
static long long
ru_bucket(double x, double base, double log_g)
{
    if (!(x > base)) return 0;
    double b = ceil(log(x / base) / log_g - 1e-9);
    if (b < 1) b = 1;
    return b > RU_MAX_BUCKET ? -1 : (long long)b;
}

/* np.nan_to_num() of a value already known not to be infinite. */
static double
ru_finite(double x)
{
    return x != x ? 0.0 : x;
}

/* One wait or hold `x` into a group's sum, maximum and histogram (NaN: into none of
   them; added to the sum as 0, as numpy adds it). 1; 0 past the buckets or the budget
   (numpy rolls the batch up); -1 with an error set. */
static int
ru_duration(double x, double *sum, double *max, int *has_max, RuHist *h, double base,
            double log_g)
{
    *sum += ru_finite(x);
    if (x != x) return 1;
    if (!*has_max || x > *max) *max = x;
    *has_max = 1;
    long long bucket = ru_bucket(x, base, log_g);
    return bucket < 0 ? 0 : ru_count(h, bucket);
}

static PyObject *
ru_hist(RuHist *h)
{
    if (!h->n) Py_RETURN_NONE;
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    for (Py_ssize_t b = 0; b < h->cap; b++) {
        if (!h->counts[b]) continue;
        PyObject *k = PyLong_FromSsize_t(b), *v = PyLong_FromLongLong(h->counts[b]);
        int rc = (k && v) ? PyDict_SetItem(d, k, v) : -1;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (rc < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

static PyObject *
ru_max(int has, double x)
{
    if (has) return PyFloat_FromDouble(x);
    Py_RETURN_NONE;
}

static PyObject *
ru_peak(int has, double x)
{
    if (has) return PyLong_FromDouble(x);
    Py_RETURN_NONE;
}

/* A number cell as a double: 1 (NULL is NaN), 0 for text (not a number: the batch is
   left to numpy). */
static int
ru_number(const Cell *c, double *out)
{
    switch (c->type) {
    case CELL_INT: *out = (double)c->i; return 1;
    case CELL_FLOAT: *out = c->d; return 1;
    case CELL_NULL: *out = Py_NAN; return 1;
    default: return 0;
    }
}

/* _rollups._mapped() of one local id (a number, NaN for NULL). */
static long long
ru_map(double local, const ColumnMap *map)
{
    /* NaN, and numbers past int64 (numpy makes those INT64_MIN), are no key. */
    long long k = local > -9.2e18 && local < 9.2e18 ? (long long)local : -1;
    if (map == NULL) return k > 0 ? k : 0;
    if (k < 0 || k >= map->n || map->ids[k] == NO_MAP) return 0;
    return map->ids[k];
}

static RuPoolState *
ru_state(Rollup *r, long long pool, PyObject *carry)
{
    for (Py_ssize_t i = r->nstates - 1; i >= 0; i--)
        if (r->states[i].pool == pool) return &r->states[i];
    if (r->nstates >= RU_MAX_POOLS) return NULL;
    RuPoolState *s = &r->states[r->nstates++];
    memset(s, 0, sizeof *s);
    s->pool = pool;
    PyObject *key = PyLong_FromLongLong(pool);
    if (key == NULL) return NULL;
    PyObject *last = PyDict_GetItemWithError(carry, key);
    Py_DECREF(key);
    if (last == NULL && PyErr_Occurred()) return NULL;
    if (last != NULL) {
        if (!PyTuple_Check(last) || PyTuple_GET_SIZE(last) != 2) {
            PyErr_SetString(PyExc_TypeError, "a carry is a (time, in use) tuple");
            return NULL;
        }
        s->last_at = PyFloat_AsDouble(PyTuple_GET_ITEM(last, 0));
        s->last_in_use = PyFloat_AsDouble(PyTuple_GET_ITEM(last, 1));
        if (PyErr_Occurred()) return NULL;
        s->has_last = 1;
    }
    return s;
}

enum { RU_AT, RU_POOL, RU_KIND, RU_CHECKOUT_ID, RU_IN_USE, RU_OVERFLOW, RU_WAITERS, RU_STACK,
       RU_WAIT_S, RU_CONNECT_S, RU_HOLD_S, RU_COUNT, RU_NFIELDS };
enum { K_CHECKOUT, K_CHECKIN, K_GC_CHECKIN, K_TIMEOUT, K_LEAK, K_CONNECT, K_INVALIDATE,
       K_OTHER };

/* The tuple of field indices `wanted` into `fields` (as many as it holds), each checked
   against the records' `width`. 0, or -1 with an error set. */
static int
field_indices(PyObject *wanted, Py_ssize_t width, Py_ssize_t *fields)
{
    for (Py_ssize_t f = 0; f < PyTuple_GET_SIZE(wanted); f++) {
        fields[f] = PyLong_AsSsize_t(PyTuple_GET_ITEM(wanted, f));
        if (fields[f] == -1 && PyErr_Occurred()) return -1;
        if (fields[f] < 0 || fields[f] >= width) {
            PyErr_SetString(PyExc_ValueError, "a field index is out of range");
            return -1;
        }
    }
    return 0;
}

/* One pass over the records; 1 done, 0 left to numpy, -1 error set. */
static int
ru_pass(Events *self, Rollup *r, const Py_ssize_t *fields, const char **kinds,
        const Py_ssize_t *kind_lens, const ColumnMap *pools, const ColumnMap *stacks, double p, PyObject *carry,
        double base, double log_g)
{
    Py_ssize_t width = self->width;
    RuSite *site = NULL;
    for (Py_ssize_t i = 0; i < self->nrecords; i++) {
        const Cell *rec = self->cells + i * width;
        double v[RU_NFIELDS];
        for (int f = 0; f < RU_NFIELDS; f++) {
            if (f == RU_KIND) continue;
            if (!ru_number(&rec[fields[f]], &v[f]) || isinf(v[f])) return 0;
        }
        double at = v[RU_AT];
        if (at != at) return 0;
        /* One of the K_ codes: K_OTHER for any other kind, or none. */
        int kind = (int)text_index(self, &rec[fields[RU_KIND]], kinds, kind_lens, K_OTHER);
        long long pool = ru_map(v[RU_POOL], pools);
        double start = floor(at / p) * p;
        RuPoolState *state = ru_state(r, pool, carry);
        if (state == NULL) return PyErr_Occurred() ? -1 : 0;
        if (state->seen && at < state->seen_at) return 0;  /* out of order: numpy sorts */
        state->seen = 1;
        state->seen_at = at;
        /* The integral of in use: the pool's previous count held from its event to this one. */
        if (state->has_last) {
            double t0 = state->last_at, end = at > t0 ? at : t0;
            double value = ru_finite(state->last_in_use), s0 = floor(t0 / p) * p;
            if (end < s0 + p) {
                RuPool *agg = ru_pool(r, s0, pool);
                if (agg == NULL) return 0;
                volatile double w = (end - t0) * value;  /* rounded, never fused */
                agg->integral += w;
            }
            else {
                if (r->ncrossings == r->crossings_cap) {
                    Py_ssize_t cap = r->crossings_cap ? r->crossings_cap * 2 : 64;
                    RuCrossing *c = PyMem_Realloc(r->crossings, (size_t)cap * sizeof *c);
                    if (c == NULL) {
                        PyErr_NoMemory();
                        return -1;
                    }
                    r->crossings = c;
                    r->crossings_cap = cap;
                }
                r->crossings[r->ncrossings++] = (RuCrossing){pool, t0, end, value};
            }
        }
        state->has_last = 1;
        state->last_at = at;
        state->last_in_use = v[RU_IN_USE];
        /* The pool's period: its events, invalidations and peaks. */
        RuPool *agg = ru_pool(r, start, pool);
        if (agg == NULL) return 0;
        agg->events++;
        if (kind == K_INVALIDATE) {
            agg->invalidations++;
            if (v[RU_COUNT] == 1.0) agg->disconnects++;
        }
        double peaks[4] = {v[RU_IN_USE], v[RU_OVERFLOW], v[RU_WAITERS],
                           v[RU_IN_USE] + ru_finite(v[RU_WAITERS])};
        for (int k = 0; k < 4; k++) {
            if (peaks[k] != peaks[k]) continue;
            if (!agg->has_peak[k] || peaks[k] > agg->peak[k]) agg->peak[k] = peaks[k];
            agg->has_peak[k] = 1;
        }
        if (kind > K_CONNECT) continue;  /* the call sites count the site kinds only */
        long long stack = ru_map(v[RU_STACK], stacks);
        if (site == NULL || site->start != start || site->pool != pool || site->stack != stack) {
            site = ru_site(r, start, pool, stack);
            if (site == NULL) return 0;
        }
        int rc;
        switch (kind) {
        case K_CHECKOUT:
            site->checkouts++;
            rc = ru_duration(v[RU_WAIT_S], &site->wait_sum, &site->wait_max,
                             &site->has_wait_max, &site->wait, base, log_g);
            if (rc <= 0) return rc;
            break;
        case K_CHECKIN:
        case K_GC_CHECKIN:
            if (kind == K_CHECKIN) site->checkins++;
            else site->gc_checkins++;
            rc = ru_duration(v[RU_HOLD_S], &site->hold_sum, &site->hold_max,
                             &site->has_hold_max, &site->hold, base, log_g);
            if (rc <= 0) return rc;
            break;
        case K_TIMEOUT: site->timeouts++; break;
        case K_LEAK: site->leaks++; break;
        case K_CONNECT:
            site->connects++;
            site->connect_sum += ru_finite(v[RU_CONNECT_S]);
            break;
        }
    }
    /* Intervals across periods, after the others, as numpy adds them: split at each period. */
    for (Py_ssize_t c = 0; c < r->ncrossings; c++) {
        RuCrossing *x = &r->crossings[c];
        double t = x->start;
        while (t < x->end) {
            double period = floor(t / p) * p, upto = period + p < x->end ? period + p : x->end;
            RuPool *agg = ru_pool(r, period, x->pool);
            if (agg == NULL) return 0;
            volatile double w = (upto - t) * x->value;
            agg->integral += w;
            t = upto;
        }
    }
    return 1;
}

static PyObject *
ru_result(Events *self, Rollup *r)
{
    PyObject *sites = PyList_New(r->nsites), *pools = PyList_New(r->npools);
    PyObject *carry = PyList_New(r->nstates), *out = NULL;
    if (sites == NULL || pools == NULL || carry == NULL) goto done;
    for (Py_ssize_t i = 0; i < r->nsites; i++) {
        RuSite *s = &r->sites[i];
        PyObject *t = Py_BuildValue(
            "(dLLLLLLLdNdNdLNN)", s->start, s->pool, s->stack, s->checkouts,
            s->checkins + s->gc_checkins, s->gc_checkins, s->timeouts, s->leaks, s->hold_sum,
            ru_max(s->has_hold_max, s->hold_max), s->wait_sum,
            ru_max(s->has_wait_max, s->wait_max), s->connect_sum, s->connects,
            ru_hist(&s->hold), ru_hist(&s->wait));
        if (t == NULL) goto done;
        PyList_SET_ITEM(sites, i, t);
    }
    for (Py_ssize_t i = 0; i < r->npools; i++) {
        RuPool *p = &r->pools[i];
        PyObject *t = Py_BuildValue(
            "(dLLdLLNNNN)", p->start, p->pool, p->events, p->integral, p->invalidations,
            p->disconnects, ru_peak(p->has_peak[0], p->peak[0]),
            ru_peak(p->has_peak[1], p->peak[1]), ru_peak(p->has_peak[2], p->peak[2]),
            ru_peak(p->has_peak[3], p->peak[3]));
        if (t == NULL) goto done;
        PyList_SET_ITEM(pools, i, t);
    }
    for (Py_ssize_t i = 0; i < r->nstates; i++) {
        RuPoolState *s = &r->states[i];
        PyObject *t = Py_BuildValue("(Ldd)", s->pool, s->last_at, ru_finite(s->last_in_use));
        if (t == NULL) goto done;
        PyList_SET_ITEM(carry, i, t);
    }
    out = Py_BuildValue("(OOOn)", sites, pools, carry, self->nrecords);
done:
    Py_XDECREF(sites);
    Py_XDECREF(pools);
    Py_XDECREF(carry);
    return out;
}

/* rollup(fields, pool_ids, stack_ids, period_s, carry, base, log_g): see Rollups.feed_events. */
static PyObject *
Events_rollup(Events *self, PyObject *args)
{
    PyObject *wanted, *pool_ids, *stack_ids, *carry, *names;
    double p, base, log_g;
    if (!PyArg_ParseTuple(args, "O!OOdO!ddO!", &PyTuple_Type, &wanted, &pool_ids, &stack_ids, &p,
                          &PyDict_Type, &carry, &base, &log_g, &PyTuple_Type, &names))
        return NULL;
    if (PyTuple_GET_SIZE(wanted) != RU_NFIELDS || !(p > 0)
        || PyTuple_GET_SIZE(names) != K_OTHER) {
        PyErr_SetString(PyExc_ValueError,
                        "rollup() takes 12 fields, a positive period and 7 kind names");
        return NULL;
    }
    Py_ssize_t fields[RU_NFIELDS];
    if (field_indices(wanted, self->width, fields) < 0) return NULL;
    const char *kinds[K_OTHER];  /* the K_ kinds' names, in their order: Python's */
    Py_ssize_t kind_lens[K_OTHER];
    if (text_names(names, kinds, kind_lens) < 0) return NULL;
    ColumnMap maps[2] = {{NULL, 0}, {NULL, 0}};
    PyObject *given[2] = {pool_ids, stack_ids};
    for (int m = 0; m < 2; m++) {
        if (given[m] == Py_None) continue;
        if (!PyDict_Check(given[m])) {
            PyErr_SetString(PyExc_TypeError, "id maps are dicts or None");
            PyMem_Free(maps[0].ids);
            return NULL;
        }
        if (column_map(given[m], &maps[m]) < 0) {
            PyMem_Free(maps[0].ids);
            return NULL;
        }
    }
    PyObject *out = NULL;
    Rollup *r = PyMem_Calloc(1, sizeof *r);
    if (r == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    r->sites = PyMem_Malloc(RU_MAX_GROUPS * sizeof(RuSite));
    r->pools = PyMem_Malloc(RU_MAX_GROUPS * sizeof(RuPool));
    if (r->sites == NULL || r->pools == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    r->hist_budget = RU_MAX_HIST_BYTES;
    memset(r->site_slot, -1, sizeof r->site_slot);
    memset(r->pool_slot, -1, sizeof r->pool_slot);
    int rc = ru_pass(self, r, fields, kinds, kind_lens, pool_ids == Py_None ? NULL : &maps[0],
                     stack_ids == Py_None ? NULL : &maps[1], p, carry, base, log_g);
    if (rc > 0) out = ru_result(self, r);
    else if (rc == 0) out = Py_NewRef(Py_None);
done:
    if (r != NULL) {
        for (Py_ssize_t i = 0; r->sites != NULL && i < r->nsites; i++) {
            PyMem_Free(r->sites[i].hold.counts);
            PyMem_Free(r->sites[i].wait.counts);
        }
        PyMem_Free(r->sites);
        PyMem_Free(r->pools);
        PyMem_Free(r->crossings);
        PyMem_Free(r);
    }
    PyMem_Free(maps[0].ids);
    PyMem_Free(maps[1].ids);
    return out;
}

/* ---- survey: what the keeper needs of a batch besides its rollups ------------------- */

typedef struct {
    long long *pool, *id;
    unsigned char *used;
    size_t mask;
} KeySet;

static int
keyset_init(KeySet *k, Py_ssize_t n)
{
    size_t cap = 64;
    while (cap < (size_t)n * 2) cap *= 2;
    k->pool = PyMem_Malloc(cap * sizeof(long long));
    k->id = PyMem_Malloc(cap * sizeof(long long));
    k->used = PyMem_Calloc(cap, 1);
    k->mask = cap - 1;
    if (k->pool == NULL || k->id == NULL || k->used == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void
keyset_free(KeySet *k)
{
    PyMem_Free(k->pool);
    PyMem_Free(k->id);
    PyMem_Free(k->used);
}

/* Whether (pool, id) is in the set; `add`: put it in (it has room: at most half full). */
static int
keyset_has(KeySet *k, long long pool, long long id, int add)
{
    uint64_t h = (uint64_t)pool * 0x9E3779B97F4A7C15ull ^ (uint64_t)id * 0xC2B2AE3D27D4EB4Full;
    for (size_t i = (size_t)(h ^ (h >> 31)) & k->mask;; i = (i + 1) & k->mask) {
        if (!k->used[i]) {
            if (add) {
                k->used[i] = 1;
                k->pool[i] = pool;
                k->id[i] = id;
            }
            return 0;
        }
        if (k->pool[i] == pool && k->id[i] == id) return 1;
    }
}

/* Whether the tuple of str `roles` names kind `name`. */
static int
survey_role(PyObject *roles, PyObject *name)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(roles); i++) {
        int eq = PyObject_RichCompareBool(PyTuple_GET_ITEM(roles, i), name, Py_EQ);
        if (eq != 0) return eq;
    }
    return 0;
}

enum { SV_AT, SV_POOL, SV_KIND, SV_CHECKOUT_ID, SV_HOLD_S, SV_NFIELDS };
enum { ROLE_CHECKOUT = 1, ROLE_END = 2, ROLE_MARK = 4, ROLE_WHOLE = 8 };

/* survey(kinds, checkouts, ends, marks, whole, fields, pool_ids, lowest): see
   _retention._survey. One pass (three where records are picked), the GIL held. */
static PyObject *
Events_survey(Events *self, PyObject *args)
{
    enum { MAX_KINDS = 64 };
    PyObject *kinds, *roles[4], *wanted, *pool_ids;
    double lowest;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!Od", &PyTuple_Type, &kinds, &PyTuple_Type,
                          &roles[0], &PyTuple_Type, &roles[1], &PyTuple_Type, &roles[2],
                          &PyTuple_Type, &roles[3], &PyTuple_Type, &wanted, &pool_ids, &lowest))
        return NULL;
    Py_ssize_t nkinds = PyTuple_GET_SIZE(kinds);
    if (nkinds > MAX_KINDS || PyTuple_GET_SIZE(wanted) != SV_NFIELDS) {
        PyErr_SetString(PyExc_ValueError, "survey() takes at most 64 kinds and 5 fields");
        return NULL;
    }
    const char *names[MAX_KINDS];
    Py_ssize_t lens[MAX_KINDS];
    int role[MAX_KINDS + 1] = {0};
    if (text_names(kinds, names, lens) < 0) return NULL;
    for (Py_ssize_t k = 0; k < nkinds; k++) {
        for (int r = 0; r < 4; r++) {
            int has = survey_role(roles[r], PyTuple_GET_ITEM(kinds, k));
            if (has < 0) return NULL;
            if (has) role[k] |= 1 << r;
        }
    }
    Py_ssize_t fields[SV_NFIELDS];
    if (field_indices(wanted, self->width, fields) < 0) return NULL;
    ColumnMap map = {NULL, 0};
    if (pool_ids != Py_None) {
        if (!PyDict_Check(pool_ids)) {
            PyErr_SetString(PyExc_TypeError, "pool_ids is a dict or None");
            return NULL;
        }
        if (column_map(pool_ids, &map) < 0) return NULL;
    }
    Py_ssize_t n = self->nrecords, width = self->width;
    long long counts[MAX_KINDS + 1] = {0};
    double first = Py_HUGE_VAL, last = -Py_HUGE_VAL;
    int whole = 0, plain = 1;
    /* The checkouts' keys, the returns', and those of returns picked with their checkout
       in the batch: that checkout is picked too, so that neither looks unmatched. */
    KeySet out = {0}, back = {0}, pair = {0};
    PyObject *result = NULL, *rows = NULL;
    if (keyset_init(&out, n) < 0 || keyset_init(&back, n) < 0 || keyset_init(&pair, n) < 0)
        goto done;
    for (int pass = 0; pass < 3 && plain; pass++) {
        if (pass == 1 && whole) break;
        if (pass == 2 && (rows = PyList_New(0)) == NULL) goto done;
        for (Py_ssize_t i = 0; i < n; i++) {
            const Cell *rec = self->cells + i * width;
            Py_ssize_t kind = text_index(self, &rec[fields[SV_KIND]], names, lens, nkinds);
            int is = role[kind];
            double at, pool, cid, hold;
            if (!ru_number(&rec[fields[SV_AT]], &at) || !ru_number(&rec[fields[SV_POOL]], &pool) ||
                !ru_number(&rec[fields[SV_CHECKOUT_ID]], &cid) ||
                !ru_number(&rec[fields[SV_HOLD_S]], &hold) || at != at || isinf(at) ||
                isinf(cid) || !(cid != cid || fabs(cid) < 9e18)) {
                plain = 0;  /* numpy reads this one */
                break;
            }
            int has_id = cid == cid;
            long long p = ru_map(pool, pool_ids == Py_None ? NULL : &map), id = (long long)cid;
            if (pass == 0) {
                counts[kind]++;
                if (at < first) first = at;
                if (at > last) last = at;
                if (is & ROLE_WHOLE) whole = 1;
                if (has_id && (is & ROLE_CHECKOUT)) keyset_has(&out, p, id, 1);
                if (has_id && (is & ROLE_END)) keyset_has(&back, p, id, 1);
                continue;
            }
            int kept_return = has_id && (is & ROLE_END) && ((is & ROLE_MARK) || hold > lowest);
            if (pass == 1) {
                if (kept_return && keyset_has(&out, p, id, 0)) keyset_has(&pair, p, id, 1);
                continue;
            }
            int pick = (is & ROLE_MARK) || kept_return ||
                       (has_id && (is & ROLE_END) && !keyset_has(&out, p, id, 0)) ||
                       (has_id && (is & ROLE_CHECKOUT) &&
                        (!keyset_has(&back, p, id, 0) || keyset_has(&pair, p, id, 0)));
            if (pick) {
                PyObject *index = PyLong_FromSsize_t(i);
                if (index == NULL || PyList_Append(rows, index) < 0) {
                    Py_XDECREF(index);
                    goto done;
                }
                Py_DECREF(index);
            }
        }
    }
    if (!plain) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *tally = PyList_New(nkinds + 1);
    if (tally == NULL) goto done;
    for (Py_ssize_t k = 0; k <= nkinds; k++) {
        PyObject *c = PyLong_FromLongLong(counts[k]);
        if (c == NULL) {
            Py_DECREF(tally);
            goto done;
        }
        PyList_SET_ITEM(tally, k, c);
    }
    result = Py_BuildValue("(NddO)", tally, first, last, whole || rows == NULL ? Py_None : rows);
done:
    Py_XDECREF(rows);
    keyset_free(&out);
    keyset_free(&back);
    keyset_free(&pair);
    PyMem_Free(map.ids);
    return result;
}

static PyMethodDef methods[] = {
    {"load", load, METH_VARARGS,
     "load(module_path, version_number) -> bool: find SQLite in the sqlite3 module's library."},
    {"open", store_open, METH_VARARGS,
     "open(path, busy_timeout_ms, pragmas) -> Store: a SQLite handle of this module's own "
     "on the existing database path."},
    {"insert", insert, METH_VARARGS,
     "insert(store, events, many_sql, rows_per_statement, one_sql, remap, before, after) -> "
     "True: run before, insert the records of an Events, run after, with the GIL released "
     "once (rolled back on a failure)."},
    {"copy_binary", copy_binary, METH_VARARGS,
     "copy_binary(events, types, remap, suffix, suffix_fields) -> bytes | None: the "
     "records of an Events as a whole binary COPY stream, formatted with the GIL "
     "released; None where a value does not fit its column's type as it is."},
    RECORD_LAYOUT_METHOD,
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sqlite_rows", "The writer's inserts without the GIL.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__sqlite_rows(void)
{
    PyObject *sqlite3_module = PyImport_ImportModule("sqlite3");
    if (sqlite3_module == NULL) return NULL;
    operational_error = PyObject_GetAttrString(sqlite3_module, "OperationalError");
    Py_DECREF(sqlite3_module);
    if (operational_error == NULL) return NULL;
    if (PyType_Ready(&EventsType) < 0 || PyType_Ready(&StoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (poolscope_declare_gil(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *api = PyCapsule_New((void *)&events_api, EVENTS_API_CAPSULE, NULL);
    if (api == NULL || PyModule_AddObject(m, "_events_api", api) < 0) {
        Py_XDECREF(api);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&EventsType);
    if (PyModule_AddObject(m, "Events", (PyObject *)&EventsType) < 0) {
        Py_DECREF(&EventsType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
