/* The writer's inserts without the GIL: optional, like _speedups.

   The sqlite3 module binds every value of every row while holding the GIL, so the
   writer thread took the GIL for about as long as the application spent in the
   listeners. Here the queued values are read into C once, under the GIL (a type
   check each), and then bound and stepped with the GIL released, on the very
   sqlite3 handle of the writer's own sqlite3.Connection, inside its transaction.

   The SQLite functions are looked up in the library the sqlite3 module itself
   uses (dlsym on its extension module), never linked separately: two copies of
   SQLite in one process would not see each other's file locks. Where that lookup
   fails (no dlopen, a statically linked module with hidden symbols, a different
   library version), available() is False and the writer binds through sqlite3. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The Connection layout below is known for CPython 3.8 to 3.14; on another version the
   helper stays off rather than read a handle from a layout it has not seen. It stays
   off without a GIL too: take() moves a list's items as only the GIL makes safe. */
#if (defined(__unix__) || defined(__APPLE__)) && PY_VERSION_HEX < 0x030F0000 && \
    !defined(Py_GIL_DISABLED)
#  include <dlfcn.h>
#  define HAVE_DLOPEN 1
#endif

typedef struct sqlite3 sqlite3;
typedef struct sqlite3_stmt sqlite3_stmt;

#define SQLITE_OK 0
#define SQLITE_DONE 101
#define SQLITE_TRANSIENT_ ((void (*)(void *))-1)
#define SQLITE_STATIC_ ((void (*)(void *))0)

static struct {
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

/* The leading fields of the sqlite3 module's Connection object: the handle comes
   first after the object header in every CPython from 3.8 to 3.14. */
typedef struct {
    PyObject_HEAD
    sqlite3 *db;
} ConnectionHead;

static PyObject *connection_type = NULL; /* sqlite3.Connection */
static PyObject *operational_error = NULL; /* sqlite3.OperationalError */

/* load(module_path, version_number) -> bool: find SQLite's functions in the library
   the sqlite3 module was linked with; true when all are found and the version agrees. */
static PyObject *
load(PyObject *self, PyObject *args)
{
    const char *path;
    int expected;
    if (!PyArg_ParseTuple(args, "si", &path, &expected)) return NULL;
#ifdef HAVE_DLOPEN
    void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (handle == NULL) Py_RETURN_FALSE;
#  define FIND(field, name)                                     \
        *(void **)(&sq.field) = dlsym(handle, name);            \
        if (sq.field == NULL) { loaded = 0; Py_RETURN_FALSE; }
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

static sqlite3 *
handle_of(PyObject *conn)
{
    if (!loaded) {
        PyErr_SetString(PyExc_RuntimeError, "SQLite's functions were not loaded");
        return NULL;
    }
    int ok = PyObject_IsInstance(conn, connection_type);
    if (ok <= 0) {
        if (ok == 0) PyErr_SetString(PyExc_TypeError, "expected a sqlite3.Connection");
        return NULL;
    }
    sqlite3 *db = ((ConnectionHead *)conn)->db;
    if (db == NULL) PyErr_SetString(operational_error, "the connection is closed");
    return db;
}

/* filename(conn) -> str: the main database file of a sqlite3.Connection, as SQLite
   reports it; the writer checks it against its store before trusting insert(). */
static PyObject *
filename(PyObject *self, PyObject *conn)
{
    sqlite3 *db = handle_of(conn);
    if (db == NULL) return NULL;
    const char *name = sq.db_filename(db, "main");
    return PyUnicode_DecodeFSDefault(name ? name : "");
}

enum { CELL_NULL, CELL_INT, CELL_FLOAT, CELL_TEXT };

typedef struct {
    int type;
    int len;
    union {
        long long i;
        double d;
        const char *s;
    };
} Cell;

/* Read one queued value into a cell; the text stays owned by the str (kept alive by
   the caller's list). Returns -1 for a value of another type. */
static int
read_cell(PyObject *v, Cell *cell)
{
    if (v == Py_None) {
        cell->type = CELL_NULL;
    }
    else if (PyFloat_CheckExact(v)) {
        cell->type = CELL_FLOAT;
        cell->d = PyFloat_AS_DOUBLE(v);
    }
    else if (PyLong_CheckExact(v)) {
        int overflow;
        cell->i = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow) return -1;
        cell->type = CELL_INT;
    }
    else if (PyUnicode_CheckExact(v)) {
        Py_ssize_t len;
        cell->s = PyUnicode_AsUTF8AndSize(v, &len);
        if (cell->s == NULL || len > INT32_MAX) {
            PyErr_Clear();
            return -1;
        }
        cell->type = CELL_TEXT;
        cell->len = (int)len;
    }
    else {
        return -1;
    }
    return 0;
}

static int
bind_cell(sqlite3_stmt *stmt, int index, const Cell *cell)
{
    switch (cell->type) {
    case CELL_INT: return sq.bind_int64(stmt, index, cell->i);
    case CELL_FLOAT: return sq.bind_double(stmt, index, cell->d);
    case CELL_TEXT: return sq.bind_text(stmt, index, cell->s, cell->len, SQLITE_STATIC_);
    default: return sq.bind_null(stmt, index);
    }
}

/* Run `sql` (whose parameters take `per_statement` cells) over `cells`, in order;
   without the GIL. Returns SQLITE_OK or an error code, with the message in `error`. */
static int
run(sqlite3 *db, const char *sql, const Cell *cells, Py_ssize_t ncells, int per_statement,
    char *error, size_t error_size)
{
    sqlite3_stmt *stmt = NULL;
    int rc = sq.prepare_v2(db, sql, -1, &stmt, NULL);
    for (Py_ssize_t at = 0; rc == SQLITE_OK && at < ncells; at += per_statement) {
        for (int k = 0; k < per_statement && rc == SQLITE_OK; k++)
            rc = bind_cell(stmt, k + 1, &cells[at + k]);
        if (rc != SQLITE_OK) break;
        rc = sq.step(stmt);
        if (rc == SQLITE_DONE) rc = sq.reset(stmt);
    }
    if (rc != SQLITE_OK) snprintf(error, error_size, "%s", sq.errmsg(db));
    if (stmt != NULL) sq.finalize(stmt);
    return rc;
}

/* Run `sql` (any number of statements, no parameters) unless it is empty. */
static int
run_script(sqlite3 *db, const char *sql, char *error, size_t error_size)
{
    if (sql[0] == '\0') return SQLITE_OK;
    int rc = sq.exec(db, sql, NULL, NULL, NULL);
    if (rc != SQLITE_OK) snprintf(error, error_size, "%s", sq.errmsg(db));
    return rc;
}

/* insert(conn, values, width, many_sql, rows_per_statement, one_sql, remap, before, after)
   -> bool

   Insert the rows of the flat list `values` (`width` values each) through `conn`:
   whole groups of `rows_per_statement` rows with `many_sql`, the rest one by one with
   `one_sql`, between the SQL scripts `before` and `after` (each may be empty), all
   with the GIL released once: the writer's BEGIN, its heartbeat and COMMIT go here,
   since every release is a wait for the GIL to come back, which the application pays
   for in wake-ups while the writer waits. `remap` maps a column index to a dict
   through which that column's values are translated first (a value it lacks becomes
   NULL). Returns False, having run nothing, if a value is not None, int, float or
   str; raises sqlite3.OperationalError if SQLite fails part-way (the caller rolls
   back). */
static PyObject *
insert(PyObject *self, PyObject *args)
{
    PyObject *conn, *values, *remap;
    Py_ssize_t width, rows_per_statement;
    const char *many_sql, *one_sql, *before, *after;
    if (!PyArg_ParseTuple(args, "OO!nsnsO!ss", &conn, &PyList_Type, &values, &width,
                          &many_sql, &rows_per_statement, &one_sql, &PyDict_Type, &remap,
                          &before, &after))
        return NULL;
    sqlite3 *db = handle_of(conn);
    if (db == NULL) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(values);
    if (width <= 0 || n % width != 0 || rows_per_statement <= 0 ||
        width * rows_per_statement > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "values do not make whole rows");
        return NULL;
    }
    PyObject **maps = PyMem_Calloc((size_t)width, sizeof(PyObject *));
    Cell *cells = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Cell));
    if (maps == NULL || cells == NULL) {
        PyMem_Free(maps);
        PyMem_Free(cells);
        return PyErr_NoMemory();
    }
    PyObject *key, *map;
    Py_ssize_t pos = 0;
    while (PyDict_Next(remap, &pos, &key, &map)) {
        Py_ssize_t column = PyLong_AsSsize_t(key);
        if (column >= 0 && column < width && PyDict_Check(map)) maps[column] = map;
    }
    PyErr_Clear();
    /* The list is the writer's own slice: nothing else changes it while we read. */
    Py_INCREF(values);
    int readable = 1;
    for (Py_ssize_t i = 0; i < n && readable; i++) {
        PyObject *v = PyList_GET_ITEM(values, i);
        PyObject *map_for = maps[i % width];
        if (map_for != NULL) {
            v = PyDict_GetItemWithError(map_for, v);
            if (v == NULL) {
                if (PyErr_Occurred()) PyErr_Clear();
                v = Py_None;
            }
            /* Borrowed from the dict, which only the writer thread changes. */
        }
        readable = read_cell(v, &cells[i]) == 0;
    }
    int rc = SQLITE_OK;
    char error[512] = "";
    if (readable) {
        Py_ssize_t whole = n - n % (width * rows_per_statement);
        Py_BEGIN_ALLOW_THREADS
        rc = run_script(db, before, error, sizeof error);
        if (rc == SQLITE_OK && whole)
            rc = run(db, many_sql, cells, whole, (int)(width * rows_per_statement), error,
                     sizeof error);
        if (rc == SQLITE_OK && whole < n)
            rc = run(db, one_sql, cells + whole, n - whole, (int)width, error, sizeof error);
        if (rc == SQLITE_OK) rc = run_script(db, after, error, sizeof error);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(values);
    PyMem_Free(cells);
    PyMem_Free(maps);
    if (rc != SQLITE_OK) {
        PyErr_Format(operational_error, "%s (SQLite error %d)", error, rc);
        return NULL;
    }
    return PyBool_FromLong(readable);
}

/* take(queue, width, spare) -> list: move every whole row out of the writer's queue
   into a new list, in O(1), with the GIL held as list.clear() does. The queue goes on
   in the buffer of `spare`, an empty list whose capacity recycle() kept, so that the
   application's appends do not grow a new buffer from nothing after every batch. The
   queue holds whole rows only (the listeners append a row at a time); should it not,
   the rows are copied out as a slice instead. */
static PyObject *
take(PyObject *self, PyObject *args)
{
    PyObject *queue, *spare;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "O!nO!", &PyList_Type, &queue, &width, &PyList_Type, &spare))
        return NULL;
    if (width <= 0) {
        PyErr_SetString(PyExc_ValueError, "width must be positive");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(queue);
    Py_ssize_t rest = n % width;
    if (rest) {
        PyObject *taken = PyList_GetSlice(queue, 0, n - rest);
        if (taken == NULL || PyList_SetSlice(queue, 0, n - rest, NULL) < 0) {
            Py_XDECREF(taken);
            return NULL;
        }
        return taken;
    }
    PyListObject *taken = (PyListObject *)PyList_New(0);
    if (taken == NULL) return NULL;
    PyListObject *from = (PyListObject *)queue, *buffer = (PyListObject *)spare;
    taken->ob_item = from->ob_item;
    taken->allocated = from->allocated;
    Py_SET_SIZE(taken, n);
    if (Py_SIZE(buffer) == 0 && buffer != from) {
        from->ob_item = buffer->ob_item;
        from->allocated = buffer->allocated;
        buffer->ob_item = NULL;
        buffer->allocated = 0;
    }
    else {
        from->ob_item = NULL;
        from->allocated = 0;
    }
    Py_SET_SIZE(from, 0);
    return (PyObject *)taken;
}

/* recycle(rows, max_capacity) -> None: empty a list taken from the queue but keep its
   buffer (up to `max_capacity` values), to be the queue's next one (see take). */
static PyObject *
recycle(PyObject *self, PyObject *args)
{
    PyObject *rows;
    Py_ssize_t max_capacity;
    if (!PyArg_ParseTuple(args, "O!n", &PyList_Type, &rows, &max_capacity)) return NULL;
    PyListObject *list = (PyListObject *)rows;
    if (list->allocated > max_capacity) {  /* too big to keep: freed as list.clear() does */
        if (PyList_SetSlice(rows, 0, Py_SIZE(rows), NULL) < 0) return NULL;
        Py_RETURN_NONE;
    }
    Py_ssize_t n = Py_SIZE(list);
    PyObject **items = list->ob_item;
    Py_SET_SIZE(list, 0);  /* before the decrefs: a finalizer may look at the list */
    for (Py_ssize_t i = 0; i < n; i++) Py_DECREF(items[i]);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"take", take, METH_VARARGS,
     "take(queue, width, spare) -> list: move the queue's whole rows into a new list, in "
     "O(1); the queue goes on in spare's buffer."},
    {"recycle", recycle, METH_VARARGS,
     "recycle(rows, max_capacity) -> None: empty rows, keeping its buffer for take()."},
    {"load", load, METH_VARARGS,
     "load(module_path, version_number) -> bool: find SQLite in the sqlite3 module's library."},
    {"filename", filename, METH_O,
     "filename(conn) -> str: the main database file of a sqlite3.Connection."},
    {"insert", insert, METH_VARARGS,
     "insert(conn, values, width, many_sql, rows_per_statement, one_sql, remap, before, "
     "after) -> bool: run before, insert flat rows, run after, with the GIL released "
     "once; False (nothing run) for a value of another type than None, int, float or str."},
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
    connection_type = PyObject_GetAttrString(sqlite3_module, "Connection");
    operational_error = PyObject_GetAttrString(sqlite3_module, "OperationalError");
    Py_DECREF(sqlite3_module);
    if (connection_type == NULL || operational_error == NULL) return NULL;
    return PyModule_Create(&module);
}
