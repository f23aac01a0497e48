/* Compiled kernels of the calibrators (module qcompiler.calibrators._kernels): the per-sample passes
 * over each activation, in one pass over memory, and the inner loops of two range searches.
 *
 * Why compiled code: calibration runs every calibrated activation of every sample through these. With
 * numpy the exact min and max are two passes over memory (min, then max), binning a strided subset
 * takes a third pass with several temporaries, and each update costs a dozen numpy calls; together
 * that was most of the calibration time beyond inference. numba was measured as the alternative: about
 * 0.5 s per process to import it and load its cache, as long as a whole 64-sample calibration of a
 * small CNN, so the kernels are compiled at install time instead. The package works without this
 * module: kernels.py holds the numpy reference of each kernel, used as the fallback, and the tests
 * check the two agree bit for bit.
 *
 * Floats are compared through an integer key that orders them as real numbers
 * (k = bits ^ ((bits >> 31) & 0x7fffffff) for float32): integer min/max vectorises without changing
 * any result, where a float min/max reduction only vectorises if NaN may be ignored. NaN keys lie
 * beyond the keys of +-inf, so a NaN anywhere turns both extremes into NaN. A zero extreme is
 * returned as +0.0, as the numpy path does.
 *
 * Histogram grid (histogram.py): with s = x * scale (scale a power of two, so exact), a value with
 * |s| < 4096 lands in bin 4096 + trunc(s) - signbit(x) of 8192 int64 counts.
 *
 * extremes(values) -> (low, high)
 * bin_strided(values, stride, scale, counts) -> None
 *     Bins values[0], values[stride], ...; raises ValueError, counts unchanged, if one is off the grid.
 * observe(values, stride, scale, with_extremes, counts) -> (low, high, binned)
 *     extremes() and bin_strided() in one pass over memory, plus low and high themselves when
 *     with_extremes. binned is True when every value is on the grid; otherwise (the grid must grow,
 *     or NaN/inf) the counts are left unchanged.
 * Every buffer is C-contiguous; values are float32 or float64 of any shape, read as flat.
 *
 * The two range searches (mse.py, kl.py), whole, without the GIL, so the searches of several tensors
 * can run side by side (the numpy code in those modules is the reference):
 * squared_errors(edges, counts, lows, highs, steps) -> float64 array, one per candidate grid
 *     mse.SquaredErrorModel: clipping error beyond the grid's ends, point masses, and the expected
 *     squared rounding error of candidate c (grid lows[c] + k * step, k = 0..steps,
 *     step = (highs[c] - lows[c]) / steps) over the bins: step^3 * sum_j density[j] *
 *     (G(y(edges[j+1])) - G(y(edges[j]))), y(x) = (x - low) / step clipped to [0, steps],
 *     G(y) = k / 12 + u^3 / 3 with k = floor(y + 0.5), u = y - k. Summed by parts over the edges
 *     the grid reaches.
 * entropy_divergences(counts, first_bins, end_bins, span_of_level, start_bin) -> float64 array
 *     kl.entropy_divergences: KL(P || Q) of every clip candidate start_bin .. len(counts), from the
 *     level spans of kl._level_spans (span_of_level is uint16: 4x less to stream than int64 for
 *     TensorRT's 1921 x 128 levels; its bounds are checked in the same loop).
 * Sums run in four interleaved lanes added in a fixed order, and the build turns off fused
 * multiply-add contraction, so both clones give the same bits on any machine.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define NUM_BINS 8192
#define HALF_BINS 4096
#define OBSERVE_BLOCK 4096  /* values per block: 16-32 KiB, still in L1 cache when its strided values are binned */

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && !defined(QCOMPILER_NO_CLONES)
/* One build runs everywhere; AVX-512 machines get 16 lanes of integer min/max per instruction, AVX2
 * ones 8. QCOMPILER_NO_CLONES builds the plain version alone (the tests compare the two). */
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* Running extremes as keys, so blocks can be folded in one after another. */
typedef struct {
    int64_t low, high;
} KeyRange;

/* fold_keys_f32 / fold_keys_f64: fold the keys of n float bits into the running range. */
#define DEFINE_FOLD_KEYS(name, int_type, sign_shift, magnitude_mask, type_max, type_min)           \
    VECTOR_CLONES                                                                                 \
    static void name(const int_type *bits, Py_ssize_t n, KeyRange *range) {                       \
        int_type lo = type_max, hi = type_min;                                                    \
        for (Py_ssize_t i = 0; i < n; i++) {                                                      \
            int_type b = bits[i];                                                                 \
            int_type k = b ^ ((b >> sign_shift) & magnitude_mask);                                \
            lo = k < lo ? k : lo;                                                                 \
            hi = k > hi ? k : hi;                                                                 \
        }                                                                                         \
        if (lo < range->low) range->low = lo;                                                     \
        if (hi > range->high) range->high = hi;                                                   \
    }

DEFINE_FOLD_KEYS(fold_keys_f32, int32_t, 31, INT32_MAX, INT32_MAX, INT32_MIN)
DEFINE_FOLD_KEYS(fold_keys_f64, int64_t, 63, INT64_MAX, INT64_MAX, INT64_MIN)

static double float_of_key(int64_t key, Py_ssize_t itemsize) {
    if (itemsize == 4) {
        int32_t key32 = (int32_t)key;
        int32_t bits = key32 ^ ((key32 >> 31) & INT32_MAX);  /* the map is its own inverse */
        float value;
        memcpy(&value, &bits, sizeof value);
        return (double)value;
    }
    int64_t bits = key ^ ((key >> 63) & INT64_MAX);
    double value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

typedef struct {
    const void *data;
    Py_ssize_t itemsize, size;
} Values;

static void fold_extremes(const Values *values, Py_ssize_t start, Py_ssize_t stop, KeyRange *range) {
    if (values->itemsize == 4) {
        fold_keys_f32((const int32_t *)values->data + start, stop - start, range);
    } else {
        fold_keys_f64((const int64_t *)values->data + start, stop - start, range);
    }
}

static inline double value_at(const Values *values, Py_ssize_t i) {
    return values->itemsize == 4 ? (double)((const float *)values->data)[i] : ((const double *)values->data)[i];
}

static inline int on_grid(double x, double scale) {
    return fabs(x * scale) < HALF_BINS;  /* false for NaN too */
}

static inline Py_ssize_t bin_of(double x, double scale) {
    return HALF_BINS + (Py_ssize_t)(x * scale) - (signbit(x) ? 1 : 0);
}

/* Bins values[i] for i = start, start + stride, ... < stop; returns the first index off the grid
 * (nothing binned from there on) or the first index >= stop. */
static Py_ssize_t bin_range(const Values *values, Py_ssize_t start, Py_ssize_t stop, Py_ssize_t stride,
                            double scale, int64_t *bins) {
    Py_ssize_t i = start;
    for (; i < stop; i += stride) {
        double x = value_at(values, i);
        if (!on_grid(x, scale)) {
            return i;
        }
        bins[bin_of(x, scale)]++;
    }
    return i;
}

static void unbin_range(const Values *values, Py_ssize_t stop, Py_ssize_t stride, double scale, int64_t *bins) {
    for (Py_ssize_t i = 0; i < stop; i += stride) {
        bins[bin_of(value_at(values, i), scale)]--;
    }
}

/* Argument buffers ------------------------------------------------------------------------------- */

/* The struct format character(s) of a buffer without a native byte-order prefix. */
static const char *plain_format(const Py_buffer *view) {
    const char *format = view->format ? view->format : "B";
    return (format[0] == '<' || format[0] == '=' || format[0] == '@') ? format + 1 : format;
}

static int get_values(PyObject *object, Py_buffer *view, Values *values) {
    if (PyObject_GetBuffer(object, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        return -1;
    }
    const char *format = plain_format(view);
    if (!((strcmp(format, "f") == 0 && view->itemsize == 4) || (strcmp(format, "d") == 0 && view->itemsize == 8))) {
        PyErr_Format(PyExc_TypeError, "expected a float32 or float64 buffer, got format '%s'", view->format);
        PyBuffer_Release(view);
        return -1;
    }
    values->data = view->buf;
    values->itemsize = view->itemsize;
    values->size = view->len / view->itemsize;
    return 0;
}

/* A C-contiguous float64 (kind 'd') or int64 (kind 'q') buffer of `object` (released by the caller),
 * or -1 after setting an error. */
static int get_array(PyObject *object, Py_buffer *view, char kind, int writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(object, view, flags) < 0) {
        return -1;
    }
    const char *format = plain_format(view);
    int ok = view->itemsize == 8 && format[1] == '\0'
             && (kind == 'd' ? format[0] == 'd' : (format[0] == 'q' || format[0] == 'l'));
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "expected a contiguous %s array", kind == 'd' ? "float64" : "int64");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int get_counts(PyObject *object, Py_buffer *view) {
    if (get_array(object, view, 'q', 1) < 0) {
        return -1;
    }
    if (view->len != NUM_BINS * 8) {
        PyErr_SetString(PyExc_ValueError, "counts must be 8192 int64 values");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The buffers of a binning call: values to read and counts to update (both released by the caller
 * on success), or -1 after setting an error. */
static int get_binning_buffers(PyObject *values_object, Py_ssize_t stride, PyObject *counts_object,
                               Py_buffer *values_view, Values *values, Py_buffer *counts_view) {
    if (stride < 1) {
        PyErr_SetString(PyExc_ValueError, "stride must be >= 1");
        return -1;
    }
    if (get_values(values_object, values_view, values) < 0) {
        return -1;
    }
    if (get_counts(counts_object, counts_view) < 0) {
        PyBuffer_Release(values_view);
        return -1;
    }
    return 0;
}

static PyObject *extremes_result(const KeyRange *range, Py_ssize_t itemsize) {
    double low = float_of_key(range->low, itemsize), high = float_of_key(range->high, itemsize);
    if (isnan(low) || isnan(high)) {
        return Py_BuildValue("dd", NAN, NAN);
    }
    return Py_BuildValue("dd", low + 0.0, high + 0.0);  /* + 0.0 turns -0.0 into +0.0 */
}

/* Functions -------------------------------------------------------------------------------------- */

static PyObject *extremes(PyObject *self, PyObject *args) {
    PyObject *values_object;
    Py_buffer view;
    Values values;
    if (!PyArg_ParseTuple(args, "O", &values_object) || get_values(values_object, &view, &values) < 0) {
        return NULL;
    }
    if (values.size == 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "extremes of an empty buffer");
        return NULL;
    }
    KeyRange range = {INT64_MAX, INT64_MIN};
    Py_BEGIN_ALLOW_THREADS
    fold_extremes(&values, 0, values.size, &range);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return extremes_result(&range, values.itemsize);
}

static PyObject *bin_strided(PyObject *self, PyObject *args) {
    PyObject *values_object, *counts_object;
    Py_buffer values_view, counts_view;
    Values values;
    Py_ssize_t stride;
    double scale;
    if (!PyArg_ParseTuple(args, "OndO", &values_object, &stride, &scale, &counts_object)
        || get_binning_buffers(values_object, stride, counts_object, &values_view, &values, &counts_view) < 0) {
        return NULL;
    }
    int64_t *bins = (int64_t *)counts_view.buf;
    Py_ssize_t stop;
    Py_BEGIN_ALLOW_THREADS
    stop = bin_range(&values, 0, values.size, stride, scale, bins);
    if (stop < values.size) {
        unbin_range(&values, stop, stride, scale, bins);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&values_view);
    PyBuffer_Release(&counts_view);
    if (stop < values.size) {
        PyErr_SetString(PyExc_ValueError, "a value lies outside the histogram grid");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *observe(PyObject *self, PyObject *args) {
    PyObject *values_object, *counts_object;
    Py_buffer values_view, counts_view;
    Values values;
    Py_ssize_t stride;
    double scale;
    int with_extremes;
    if (!PyArg_ParseTuple(args, "OndpO", &values_object, &stride, &scale, &with_extremes, &counts_object)
        || get_binning_buffers(values_object, stride, counts_object, &values_view, &values, &counts_view) < 0) {
        return NULL;
    }
    if (values.size == 0) {
        PyBuffer_Release(&values_view);
        PyBuffer_Release(&counts_view);
        PyErr_SetString(PyExc_ValueError, "extremes of an empty buffer");
        return NULL;
    }
    int64_t *bins = (int64_t *)counts_view.buf;
    KeyRange range = {INT64_MAX, INT64_MIN};
    int binned = 1;
    Py_ssize_t next = 0;  /* the next strided index to bin */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t start = 0; start < values.size; start += OBSERVE_BLOCK) {
        Py_ssize_t stop = start + OBSERVE_BLOCK < values.size ? start + OBSERVE_BLOCK : values.size;
        fold_extremes(&values, start, stop, &range);
        if (binned) {
            next = bin_range(&values, next, stop, stride, scale, bins);
            if (next < stop) {
                unbin_range(&values, next, stride, scale, bins);
                binned = 0;
            }
        }
    }
    double low = float_of_key(range.low, values.itemsize) + 0.0, high = float_of_key(range.high, values.itemsize) + 0.0;
    if (binned && !(on_grid(low, scale) && on_grid(high, scale))) {  /* a value off the strided subset is off the grid */
        unbin_range(&values, next, stride, scale, bins);
        binned = 0;
    }
    if (binned && with_extremes) {
        bins[bin_of(low, scale)]++;
        bins[bin_of(high, scale)]++;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&values_view);
    PyBuffer_Release(&counts_view);
    PyObject *bounds = extremes_result(&range, values.itemsize);
    if (bounds == NULL) {
        return NULL;
    }
    PyObject *result = Py_BuildValue("OON", PyTuple_GET_ITEM(bounds, 0), PyTuple_GET_ITEM(bounds, 1), PyBool_FromLong(binned));
    Py_DECREF(bounds);
    return result;
}

/* Range searches --------------------------------------------------------------------------------- */

static PyObject *new_float64_array(Py_ssize_t n, double **data) {
    /* A bytearray the caller wraps with numpy.frombuffer: no numpy C API needed here. */
    PyObject *bytes = PyByteArray_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(double));
    if (bytes != NULL) {
        *data = (double *)PyByteArray_AS_STRING(bytes);
    }
    return bytes;
}

static inline double rounding_potential(double x, double low, double inverse_step, double steps) {
    double y = (x - low) * inverse_step;
    y = y < 0.0 ? 0.0 : (y > steps ? steps : y);
    double k = floor(y + 0.5);
    double u = y - k;
    return k * (1.0 / 12.0) + u * u * u * (1.0 / 3.0);
}

#define POTENTIAL_BLOCK 256  /* edges per block of potentials: 2 KiB on the stack */

VECTOR_CLONES
static void potentials(const double *edges, Py_ssize_t count, double low, double inverse_step, double steps,
                       double *out) {
    for (Py_ssize_t e = 0; e < count; e++) {  /* elementwise, so it vectorises */
        out[e] = rounding_potential(edges[e], low, inverse_step, steps);
    }
}

/* sum_e G(edges[e]) * weights[e] over [first, stop). */
static double weighted_potentials(const double *edges, const double *weights, Py_ssize_t first, Py_ssize_t stop,
                                  double low, double inverse_step, double steps) {
    double block[POTENTIAL_BLOCK];
    double lanes[4] = {0.0, 0.0, 0.0, 0.0};
    for (Py_ssize_t start = first; start < stop; start += POTENTIAL_BLOCK) {
        Py_ssize_t count = stop - start < POTENTIAL_BLOCK ? stop - start : POTENTIAL_BLOCK;
        potentials(edges + start, count, low, inverse_step, steps, block);
        const double *weight = weights + start;
        Py_ssize_t e = 0;
        for (; e + 4 <= count; e += 4) {
            lanes[0] += block[e] * weight[e];
            lanes[1] += block[e + 1] * weight[e + 1];
            lanes[2] += block[e + 2] * weight[e + 2];
            lanes[3] += block[e + 3] * weight[e + 3];
        }
        for (; e < count; e++) {
            lanes[e % 4] += block[e] * weight[e];
        }
    }
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

static Py_ssize_t first_edge_above(const double *edges, Py_ssize_t count, double x) {
    Py_ssize_t low = 0, high = count;  /* first index with edges[i] > x */
    while (low < high) {
        Py_ssize_t middle = low + (high - low) / 2;
        if (edges[middle] > x) high = middle; else low = middle + 1;
    }
    return low;
}

static Py_ssize_t first_edge_at_or_above(const double *edges, Py_ssize_t count, double x) {
    Py_ssize_t low = 0, high = count;
    while (low < high) {
        Py_ssize_t middle = low + (high - low) / 2;
        if (edges[middle] >= x) high = middle; else low = middle + 1;
    }
    return low;
}

/* Adds each candidate's expected squared rounding error to totals (see the header). */
static void add_rounding_errors(const double *edges, const double *density, double *weights, Py_ssize_t num_edges,
                                const double *lows, const double *highs, Py_ssize_t candidates, double steps,
                                double *totals) {
    /* weights[e] = density[e-1] - density[e] inside, one-sided at the ends of each candidate's window */
    weights[0] = -density[0];
    for (Py_ssize_t e = 1; e < num_edges - 1; e++) weights[e] = density[e - 1] - density[e];
    weights[num_edges - 1] = density[num_edges - 2];
    for (Py_ssize_t c = 0; c < candidates; c++) {
        double low = lows[c], step = (highs[c] - low) / steps, inverse_step = 1.0 / step;
        /* edges the grid reaches: from the last edge at or below low to the first edge at or above high */
        Py_ssize_t first = first_edge_above(edges, num_edges, low) - 1;
        Py_ssize_t last = first_edge_at_or_above(edges, num_edges, highs[c]);
        first = first < 0 ? 0 : first;
        last = last > num_edges - 1 ? num_edges - 1 : last;
        double sum = 0.0;
        if (last > first) {
            sum = weighted_potentials(edges, weights, first + 1, last, low, inverse_step, steps)
                  - rounding_potential(edges[first], low, inverse_step, steps) * density[first]
                  + rounding_potential(edges[last], low, inverse_step, steps) * density[last - 1];
        }
        totals[c] += step * step * step * sum;
    }
}

static inline double cube(double x) {
    return x * x * x;
}

/* The whole of mse.SquaredErrorModel(counts, edges)(lows, highs, steps): clipping error beyond each
 * candidate's ends, rounding error inside (add_rounding_errors), and the error of point masses
 * (zero-width bins). Returns 0, or -1 without memory. */
static int squared_errors_into(const double *edges, const double *counts, Py_ssize_t bins, const double *lows,
                               const double *highs, Py_ssize_t candidates, double steps, double *totals) {
    /* density, weights, then prefix and suffix sums of the three clipping moments (bins + 1 each) */
    double *density = PyMem_RawMalloc(sizeof(double) * (size_t)(2 * bins + 1 + 6 * (bins + 1)));
    if (density == NULL) return -1;
    double *weights = density + bins, *prefix = weights + bins + 1, *suffix = prefix + 3 * (bins + 1);
    const double *lower = edges, *upper = edges + 1;
    for (int m = 0; m < 3; m++) {
        prefix[m * (bins + 1)] = 0.0;
        suffix[m * (bins + 1) + bins] = 0.0;
    }
    for (Py_ssize_t j = 0; j < bins; j++) {
        double width = upper[j] - lower[j];
        int spread = width > 0.0;
        density[j] = spread ? counts[j] / width : 0.0;
        double c = spread ? counts[j] : 0.0;
        double moments[3] = {c, c * (lower[j] + upper[j]),
                             c * (lower[j] * lower[j] + lower[j] * upper[j] + upper[j] * upper[j]) / 3.0};
        for (int m = 0; m < 3; m++) prefix[m * (bins + 1) + j + 1] = prefix[m * (bins + 1) + j] + moments[m];
    }
    for (Py_ssize_t j = bins - 1; j >= 0; j--) {
        double width = upper[j] - lower[j];
        double c = width > 0.0 ? counts[j] : 0.0;
        double moments[3] = {c, c * (lower[j] + upper[j]),
                             c * (lower[j] * lower[j] + lower[j] * upper[j] + upper[j] * upper[j]) / 3.0};
        for (int m = 0; m < 3; m++) suffix[m * (bins + 1) + j] = suffix[m * (bins + 1) + j + 1] + moments[m];
    }
    const double *prefix0 = prefix, *prefix1 = prefix + (bins + 1), *prefix2 = prefix + 2 * (bins + 1);
    const double *suffix0 = suffix, *suffix1 = suffix + (bins + 1), *suffix2 = suffix + 2 * (bins + 1);
    for (Py_ssize_t c = 0; c < candidates; c++) {
        double low = lows[c], high = highs[c];
        Py_ssize_t above = first_edge_at_or_above(lower, bins, high);  /* first bin with lower >= high */
        Py_ssize_t below = first_edge_above(upper, bins, low);         /* bins with upper <= low */
        double total = suffix2[above] - high * suffix1[above] + high * high * suffix0[above]
                       + prefix2[below] - low * prefix1[below] + low * low * prefix0[below];
        Py_ssize_t cut_high = above > 0 ? above - 1 : 0;
        if (above > 0 && upper[cut_high] > high) total += density[cut_high] * cube(upper[cut_high] - high) / 3.0;
        Py_ssize_t cut_low = below < bins - 1 ? below : bins - 1;
        if (below < bins && lower[cut_low] < low) total += density[cut_low] * cube(low - lower[cut_low]) / 3.0;
        totals[c] = total;
    }
    add_rounding_errors(edges, density, weights, bins + 1, lows, highs, candidates, steps, totals);
    for (Py_ssize_t j = 0; j < bins; j++) {
        if (upper[j] > lower[j] || !(counts[j] > 0.0)) continue;  /* a point mass: every value at lower[j] */
        for (Py_ssize_t c = 0; c < candidates; c++) {
            double step = (highs[c] - lows[c]) / steps;
            double level = nearbyint((lower[j] - lows[c]) / step);  /* half to even, as numpy.round */
            level = level < 0.0 ? 0.0 : (level > steps ? steps : level);
            double error = lower[j] - (lows[c] + level * step);
            totals[c] += error * error * counts[j];
        }
    }
    PyMem_RawFree(density);
    return 0;
}

static PyObject *squared_errors(PyObject *self, PyObject *args) {
    PyObject *edges_object, *counts_object, *lows_object, *highs_object;
    Py_buffer edges_view, counts_view, lows_view, highs_view;
    PyObject *result = NULL;
    double steps;
    if (!PyArg_ParseTuple(args, "OOOOd", &edges_object, &counts_object, &lows_object, &highs_object, &steps)) {
        return NULL;
    }
    if (get_array(edges_object, &edges_view, 'd', 0) < 0) return NULL;
    if (get_array(counts_object, &counts_view, 'd', 0) < 0) goto release_edges;
    if (get_array(lows_object, &lows_view, 'd', 0) < 0) goto release_counts;
    if (get_array(highs_object, &highs_view, 'd', 0) < 0) goto release_lows;
    Py_ssize_t bins = counts_view.len / 8, candidates = lows_view.len / 8;
    if (edges_view.len / 8 != bins + 1 || highs_view.len / 8 != candidates || bins < 1 || !(steps > 0)) {
        PyErr_SetString(PyExc_ValueError, "need len(counts) == len(edges) - 1 >= 1, len(lows) == len(highs), steps > 0");
        goto release_all;
    }
    double *totals;
    result = new_float64_array(candidates, &totals);
    if (result == NULL) goto release_all;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = squared_errors_into(edges_view.buf, counts_view.buf, bins, lows_view.buf, highs_view.buf, candidates,
                                 steps, totals);
    Py_END_ALLOW_THREADS
    if (status != 0) {
        Py_CLEAR(result);
        PyErr_NoMemory();
    }
release_all:
    PyBuffer_Release(&highs_view);
release_lows:
    PyBuffer_Release(&lows_view);
release_counts:
    PyBuffer_Release(&counts_view);
release_edges:
    PyBuffer_Release(&edges_view);
    return result;
}

/* KL(P || Q) of every candidate i = start_bin .. n for n histogram counts, as kl.entropy_divergences
 * computes it (the numpy reference, where the expansion into prefix sums is explained); the level
 * spans come from kl._level_spans. Not faster than numpy on one core (its time is in the logs of
 * the 18,748 spans, which numpy vectorises), but it runs without the GIL, so the range searches of
 * several tensors share the cores. Returns 0, 1 when a span index is out of range, -1 without memory. */
static int entropy_divergences_into(const double *counts, Py_ssize_t n, const int64_t *first_bins,
                                    const int64_t *end_bins, Py_ssize_t span_count, const uint16_t *span_of_level,
                                    Py_ssize_t levels, Py_ssize_t start_bin, double *divergences) {
    Py_ssize_t candidates = n - start_bin + 1;
    double *p = PyMem_RawMalloc(sizeof(double) * (size_t)(4 * (n + 1) + 2 * span_count));
    int64_t *nonempty_below = PyMem_RawMalloc(sizeof(int64_t) * (size_t)(n + 1));
    if (p == NULL || nonempty_below == NULL) {
        PyMem_RawFree(p);
        PyMem_RawFree(nonempty_below);
        return -1;
    }
    double *mass_below = p + n, *mass_from = mass_below + (n + 1), *plogp_below = mass_from + (n + 1);
    double *span_log = plogp_below + (n + 1), *span_term = span_log + span_count;
    double total = 0.0;
    for (Py_ssize_t j = 0; j < n; j++) {
        p[j] = j == 0 ? counts[n > 1 ? 1 : 0] : counts[j];  /* counts[0] is replaced by counts[1] */
        total += p[j];
    }
    for (Py_ssize_t j = 0; j < n; j++) p[j] /= total;
    mass_below[0] = 0.0;
    plogp_below[0] = 0.0;
    nonempty_below[0] = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        mass_below[j + 1] = mass_below[j] + p[j];
        plogp_below[j + 1] = plogp_below[j] + (p[j] > 0.0 ? p[j] * log(p[j]) : 0.0);
        nonempty_below[j + 1] = nonempty_below[j] + (p[j] > 0.0);
    }
    mass_from[n] = 0.0;
    for (Py_ssize_t j = n - 1; j >= 0; j--) mass_from[j] = mass_from[j + 1] + p[j];
    for (Py_ssize_t s = 0; s < span_count; s++) {
        double mass = mass_below[end_bins[s]] - mass_below[first_bins[s]];
        double bins = (double)(nonempty_below[end_bins[s]] - nonempty_below[first_bins[s]]);
        span_log[s] = log(mass / bins);
        span_term[s] = mass > 0.0 ? span_log[s] * mass : 0.0;  /* m log(m / n) of one level */
    }
    int out_of_range = 0;
    for (Py_ssize_t c = 0; c < candidates && !out_of_range; c++) {
        const uint16_t *row = span_of_level + c * levels;
        double lanes[4] = {0.0, 0.0, 0.0, 0.0};
        uint16_t largest = 0;
        Py_ssize_t l = 0;
        for (; l + 4 <= levels; l += 4) {
            for (int lane = 0; lane < 4; lane++) {
                uint16_t at = row[l + lane];
                largest = at > largest ? at : largest;
                if (at < span_count) lanes[lane] += span_term[at];
            }
        }
        for (; l < levels; l++) {
            largest = row[l] > largest ? row[l] : largest;
            if (row[l] < span_count) lanes[0] += span_term[row[l]];
        }
        if (largest >= span_count) {
            out_of_range = 1;
            break;
        }
        double level_term = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
        Py_ssize_t i = start_bin + c;
        double outliers = mass_from[i];
        double p_last = p[i - 1] + outliers;
        double q_last_log = p[i - 1] > 0.0 ? span_log[row[levels - 1]] : -INFINITY;
        double outlier_term = outliers > 0.0 ? outliers * q_last_log : 0.0;
        double divergence = plogp_below[i - 1] + (p_last > 0.0 ? p_last * log(p_last) : 0.0)
                            - level_term - outlier_term + log(mass_below[i]);
        divergences[c] = isfinite(divergence) ? divergence : INFINITY;  /* nothing inside the range */
    }
    PyMem_RawFree(p);
    PyMem_RawFree(nonempty_below);
    return out_of_range;
}

static PyObject *entropy_divergences(PyObject *self, PyObject *args) {
    PyObject *counts_object, *first_object, *end_object, *index_object;
    Py_ssize_t start_bin;
    Py_buffer counts_view, first_view, end_view, index_view;
    if (!PyArg_ParseTuple(args, "OOOOn", &counts_object, &first_object, &end_object, &index_object, &start_bin)) {
        return NULL;
    }
    if (get_array(counts_object, &counts_view, 'd', 0) < 0) return NULL;
    if (get_array(first_object, &first_view, 'q', 0) < 0) {
        PyBuffer_Release(&counts_view);
        return NULL;
    }
    if (get_array(end_object, &end_view, 'q', 0) < 0) {
        PyBuffer_Release(&counts_view);
        PyBuffer_Release(&first_view);
        return NULL;
    }
    if (PyObject_GetBuffer(index_object, &index_view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&counts_view);
        PyBuffer_Release(&first_view);
        PyBuffer_Release(&end_view);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = counts_view.len / 8, span_count = first_view.len / 8, candidates = n - start_bin + 1;
    const int64_t *first_bins = first_view.buf, *end_bins = end_view.buf;
    const uint16_t *span_of_level = index_view.buf;
    if (strcmp(plain_format(&index_view), "H") != 0 || index_view.itemsize != 2) {
        PyErr_SetString(PyExc_TypeError, "expected a contiguous uint16 index array");
        goto done;
    }
    if (start_bin < 1 || candidates < 1 || end_view.len != first_view.len
        || (index_view.len / 2) % candidates != 0 || index_view.len == 0) {
        PyErr_SetString(PyExc_ValueError, "the spans do not fit the candidates start_bin .. len(counts)");
        goto done;
    }
    for (Py_ssize_t s = 0; s < span_count; s++) {
        if (first_bins[s] < 0 || first_bins[s] > end_bins[s] || end_bins[s] > n) {
            PyErr_SetString(PyExc_IndexError, "span bins out of range");
            goto done;
        }
    }
    Py_ssize_t levels = (index_view.len / 2) / candidates;
    double *divergences;
    result = new_float64_array(candidates, &divergences);
    if (result == NULL) goto done;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = entropy_divergences_into(counts_view.buf, n, first_bins, end_bins, span_count, span_of_level, levels,
                                      start_bin, divergences);
    Py_END_ALLOW_THREADS
    if (status != 0) {
        Py_CLEAR(result);
        if (status < 0) PyErr_NoMemory(); else PyErr_SetString(PyExc_IndexError, "span index out of range");
    }
done:
    PyBuffer_Release(&counts_view);
    PyBuffer_Release(&first_view);
    PyBuffer_Release(&end_view);
    PyBuffer_Release(&index_view);
    return result;
}

static PyMethodDef methods[] = {
    {"extremes", extremes, METH_VARARGS, "(min, max) of a float32/float64 buffer; (nan, nan) if it holds NaN."},
    {"bin_strided", bin_strided, METH_VARARGS, "Add every stride-th value to the 8192 sign-magnitude bin counts."},
    {"observe", observe, METH_VARARGS, "extremes() and bin_strided() in one pass: (low, high, binned)."},
    {"squared_errors", squared_errors, METH_VARARGS, "Expected squared fake-quantization error of each candidate grid over a histogram (bytearray of float64)."},
    {"entropy_divergences", entropy_divergences, METH_VARARGS, "KL divergence of every clip candidate (bytearray of float64)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
