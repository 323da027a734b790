/* proxy.http1._headscan: find the header lines of an HTTP/1.1 head whose names are in a given set.
 *
 * One function, header_lines(head, names), the C twin of proxy.http1.headscan.header_lines (the
 * reference, which pure-Python installs run; tests/unit/test_headscan.py holds the two to the same
 * output). It exists because the slow part of rewriting a response head in Python was finding
 * its lines (a regex pass, then a split into line objects): this walks the head once, without
 * creating an object per line, and returns a flat tuple of offsets (no object at all when nothing
 * matches).
 *
 * A line is everything between two CRLFs after the first one (the status or request line is never
 * a header line). Its name is what comes before its first colon, less trailing blanks (SP, HT);
 * it matches names[i] when the two are equal ignoring ASCII case. For each matching line, in head
 * order, the result holds four offsets into head:
 *     i, start (the CRLF before the line), colon, end (the CRLF after it, or len(head))
 * so head[start:end] is the line with its leading CRLF and head[colon + 1:end] its value.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* ASCII lower-casing only, as bytes.lower() does. */
static unsigned char lower[256];

static int
same_name(const unsigned char *a, const unsigned char *lowered, Py_ssize_t n)
{
    for (Py_ssize_t k = 0; k < n; k++) {
        if (lower[a[k]] != lowered[k]) {
            return 0;
        }
    }
    return 1;
}

/* The offset of the next CRLF at or after `from`, or -1. */
static Py_ssize_t
next_crlf(const char *p, Py_ssize_t n, Py_ssize_t from)
{
    while (from + 1 < n) {
        const char *cr = memchr(p + from, '\r', (size_t)(n - 1 - from));
        if (cr == NULL) {
            return -1;
        }
        from = cr - p;
        if (p[from + 1] == '\n') {
            return from;
        }
        from++;
    }
    return -1;
}

static PyObject *
header_lines(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "header_lines(head, names) takes 2 positional arguments");
        return NULL;
    }
    PyObject *head = args[0];
    PyObject *names = args[1];
    if (!PyBytes_CheckExact(head) || !PyTuple_CheckExact(names)) {
        PyErr_SetString(PyExc_TypeError, "header_lines(head, names): head must be bytes, names a tuple of bytes");
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(names);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(names, i))) {
            PyErr_SetString(PyExc_TypeError, "header_lines(head, names): names must be bytes");
            return NULL;
        }
    }
    const char *p = PyBytes_AS_STRING(head);
    Py_ssize_t n = PyBytes_GET_SIZE(head);

    /* Offsets found: on the stack for the usual few lines, on the heap past that. */
    Py_ssize_t local[64];
    Py_ssize_t *found = local;
    Py_ssize_t capacity = 64;
    Py_ssize_t used = 0;

    Py_ssize_t start = next_crlf(p, n, 0);
    while (start >= 0) {
        Py_ssize_t first = start + 2;
        Py_ssize_t end = next_crlf(p, n, first);
        Py_ssize_t stop = end >= 0 ? end : n;
        const char *colon = first < stop ? memchr(p + first, ':', (size_t)(stop - first)) : NULL;
        if (colon != NULL) {
            Py_ssize_t name_end = colon - p;
            while (name_end > first && (p[name_end - 1] == ' ' || p[name_end - 1] == '\t')) {
                name_end--;
            }
            Py_ssize_t length = name_end - first;
            for (Py_ssize_t i = 0; i < count; i++) {
                PyObject *name = PyTuple_GET_ITEM(names, i);
                if (PyBytes_GET_SIZE(name) == length && length > 0
                    && same_name((const unsigned char *)p + first, (const unsigned char *)PyBytes_AS_STRING(name),
                                 length)) {
                    if (used + 4 > capacity) {
                        Py_ssize_t grown = capacity * 2;
                        Py_ssize_t *bigger;
                        if (found == local) {
                            bigger = PyMem_Malloc((size_t)grown * sizeof(Py_ssize_t));
                            if (bigger != NULL) {
                                memcpy(bigger, local, (size_t)used * sizeof(Py_ssize_t));
                            }
                        }
                        else {
                            bigger = PyMem_Realloc(found, (size_t)grown * sizeof(Py_ssize_t));
                        }
                        if (bigger == NULL) {
                            if (found != local) {
                                PyMem_Free(found);
                            }
                            return PyErr_NoMemory();
                        }
                        found = bigger;
                        capacity = grown;
                    }
                    found[used++] = i;
                    found[used++] = start;
                    found[used++] = colon - p;
                    found[used++] = stop;
                    break;
                }
            }
        }
        start = end;
    }

    PyObject *result = PyTuple_New(used);
    if (result != NULL) {
        for (Py_ssize_t k = 0; k < used; k++) {
            PyObject *offset = PyLong_FromSsize_t(found[k]);
            if (offset == NULL) {
                Py_CLEAR(result);
                break;
            }
            PyTuple_SET_ITEM(result, k, offset);
        }
    }
    if (found != local) {
        PyMem_Free(found);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"header_lines", (PyCFunction)(void (*)(void))header_lines, METH_FASTCALL,
     "header_lines(head, names) -> (i, start, colon, end, ...) for each header line named names[i]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy.http1._headscan", "Header line scanning in C (see headscan.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__headscan(void)
{
    for (int c = 0; c < 256; c++) {
        lower[c] = (unsigned char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    return PyModule_Create(&module);
}
