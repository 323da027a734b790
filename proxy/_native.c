/* proxy._native: the few byte operations of the request path that Python makes expensive, in C.
 *
 * Each function has a reference in proxy/native.py, which pure-Python installs run instead and
 * tests/unit/test_native.py holds it to (randomized and hypothesis tests). They exist because, in
 * compiled code, finding a response head's hop-by-hop lines took a regex pass and a split into line
 * objects, writing a request head four joined pieces per header, and a bytes method call parses its
 * arguments from a tuple, which costs more than the search it makes on a head.
 *
 * header_lines(head, names) walks the head once and returns a flat tuple of offsets (the empty tuple,
 * no object at all, when nothing matches). A line is everything between two CRLFs after the first
 * one (the status or request line is never a header line). Its name is what comes before its first
 * colon, less trailing blanks (SP, HT); it matches names[i] (lower-case) when the two are equal
 * ignoring ASCII case. For each matching line, in head order, the result holds four offsets:
 *     i, start (the CRLF before the line), colon, end (the CRLF after it, or len(head))
 * so head[start:end] is the line with its leading CRLF and head[colon + 1:end] its value.
 *
 * header_block(pairs) is b"".join(name + b": " + value + b"\r\n" for name, value in pairs), written
 * into one bytes object sized first.
 *
 * find(data, needle, start) is data.find(needle, start); visible(value) says that every byte of value
 * is visible ASCII (0x21 to 0x7e).
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
    if (!PyBytes_Check(head) || !PyTuple_Check(names)) {
        PyErr_SetString(PyExc_TypeError, "header_lines(head, names): head must be bytes, names a tuple of bytes");
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(names);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(names, i))) {
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

static PyObject *
header_block(PyObject *module, PyObject *pairs)
{
    (void)module;
    if (!PyList_Check(pairs)) {
        PyErr_SetString(PyExc_TypeError, "header_block(pairs): pairs must be a list of (bytes, bytes) tuples");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(pairs);
    Py_ssize_t size = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(pairs, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0))
            || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError, "header_block(pairs): pairs must be a list of (bytes, bytes) tuples");
            return NULL;
        }
        size += PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 0)) + PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 1)) + 4;
    }
    PyObject *block = PyBytes_FromStringAndSize(NULL, size);
    if (block == NULL) {
        return NULL;
    }
    char *out = PyBytes_AS_STRING(block);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(pairs, i);
        PyObject *name = PyTuple_GET_ITEM(pair, 0);
        PyObject *value = PyTuple_GET_ITEM(pair, 1);
        Py_ssize_t length = PyBytes_GET_SIZE(name);
        memcpy(out, PyBytes_AS_STRING(name), (size_t)length);
        out += length;
        *out++ = ':';
        *out++ = ' ';
        length = PyBytes_GET_SIZE(value);
        memcpy(out, PyBytes_AS_STRING(value), (size_t)length);
        out += length;
        *out++ = '\r';
        *out++ = '\n';
    }
    return block;
}

static PyObject *
find(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1]) || !PyLong_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "find(data, needle, start) takes bytes, bytes and an int");
        return NULL;
    }
    int overflow = 0;
    long long wide = PyLong_AsLongLongAndOverflow(args[2], &overflow);
    if (wide == -1 && PyErr_Occurred()) {
        return NULL;
    }
    /* Out of range: clamped, as bytes.find does (past either end). */
    Py_ssize_t start = overflow > 0 ? PY_SSIZE_T_MAX
                       : overflow < 0 ? PY_SSIZE_T_MIN
                       : wide > PY_SSIZE_T_MAX ? PY_SSIZE_T_MAX
                       : wide < PY_SSIZE_T_MIN ? PY_SSIZE_T_MIN
                       : (Py_ssize_t)wide;
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t length = PyBytes_GET_SIZE(args[1]);
    if (start < 0) {  /* as bytes.find: counted from the end */
        start = start < -size ? 0 : start + size;
    }
    if (start > size || length > size - start) {
        return PyLong_FromLong(-1);
    }
    const char *data = PyBytes_AS_STRING(args[0]);
    const char *want = PyBytes_AS_STRING(args[1]);
    if (length == 0) {
        return PyLong_FromSsize_t(start);
    }
    /* The needles are a few bytes long and heads short: memchr to each candidate first byte beats
     * memmem's setup. */
    const char *last = data + size - length; /* the last place a match may start */
    const char *at = data + start;
    while (at <= last) {
        at = memchr(at, want[0], (size_t)(last - at + 1));
        if (at == NULL) {
            break;
        }
        if (memcmp(at + 1, want + 1, (size_t)(length - 1)) == 0) {
            return PyLong_FromSsize_t(at - data);
        }
        at++;
    }
    return PyLong_FromLong(-1);
}

static PyObject *
visible(PyObject *module, PyObject *value)
{
    (void)module;
    if (!PyBytes_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "visible(value) takes bytes");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(value);
    Py_ssize_t size = PyBytes_GET_SIZE(value);
    for (Py_ssize_t i = 0; i < size; i++) {
        if (p[i] < 0x21 || p[i] > 0x7e) {
            Py_RETURN_FALSE;
        }
    }
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"header_lines", (PyCFunction)(void (*)(void))header_lines, METH_FASTCALL,
     "header_lines(head, names) -> (i, start, colon, end, ...) for each header line named names[i]"},
    {"header_block", header_block, METH_O, "header_block(pairs) -> the header lines of (name, value) pairs"},
    {"find", (PyCFunction)(void (*)(void))find, METH_FASTCALL, "find(data, needle, start) -> data.find(needle, start)"},
    {"visible", visible, METH_O, "visible(value) -> every byte of value is visible ASCII (0x21 to 0x7e)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy._native", "Byte operations of the request path in C (see native.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    for (int c = 0; c < 256; c++) {
        lower[c] = (unsigned char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    return PyModule_Create(&module);
}
