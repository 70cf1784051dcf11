/* How many vector FMAs per second one core sustains when every FMA's X operand is a broadcast
 * load (the inner loop of a block-sparse kernel) versus when broadcasts are shared by several
 * W vectors, and with no loads at all. The roofline of `results/README.md` rests on it.
 *
 *     cc -O3 -march=native benchmarks/fma_throughput.c -o /tmp/fma && /tmp/fma
 *
 * ROWS broadcasts x WIDTH W vectors = ROWS*WIDTH accumulators, the register tile of the
 * `rows` template (WIDTH = 1 is a 16x1 block on AVX-512, 2 a 32x32 block). Single-threaded;
 * the data stays in L1. Never run by tests.
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#ifdef __AVX512F__
typedef __m512 vec;
#define LANES 16
#define FMA _mm512_fmadd_ps
#define SET1 _mm512_set1_ps
#define LOAD _mm512_load_ps
#else
typedef __m256 vec;
#define LANES 8
#define FMA _mm256_fmadd_ps
#define SET1 _mm256_set1_ps
#define LOAD _mm256_load_ps
#endif

static float data[1 << 13] __attribute__((aligned(64)));
static volatile float sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define TILE(ROWS, WIDTH)                                                                     \
    static double tile_##ROWS##x##WIDTH(void) {                                               \
        vec acc[ROWS][WIDTH];                                                                 \
        for (int i = 0; i < ROWS; i++)                                                        \
            for (int v = 0; v < WIDTH; v++) acc[i][v] = SET1(0.f);                            \
        const long steps = 200000000L / (ROWS * WIDTH) / 64 * 64;                             \
        double start = now();                                                                 \
        for (long s = 0; s < steps; s += 64) {                                                \
            const float *x = data, *w = data + 4096;                                          \
            for (int k = 0; k < 64; k++, x += ROWS, w += LANES * WIDTH) {                     \
                vec wv[WIDTH];                                                                \
                for (int v = 0; v < WIDTH; v++) wv[v] = LOAD(w + LANES * v);                  \
                for (int i = 0; i < ROWS; i++) {                                              \
                    vec b = SET1(x[i]);                                                       \
                    for (int v = 0; v < WIDTH; v++) acc[i][v] = FMA(wv[v], b, acc[i][v]);     \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        double seconds = now() - start;                                                       \
        float total = 0;                                                                      \
        for (int i = 0; i < ROWS; i++)                                                        \
            for (int v = 0; v < WIDTH; v++) total += ((float *)&acc[i][v])[0];                \
        sink = total;                                                                         \
        return (double)steps * ROWS * WIDTH / seconds / 1e9;                                  \
    }

TILE(16, 1)
TILE(14, 2)
TILE(8, 2)

static double no_loads(void) {
    vec acc[16], w = SET1(1e-9f);
    for (int i = 0; i < 16; i++) acc[i] = SET1(0.f);
    const long steps = 200000000L / 16;
    double start = now();
    for (long s = 0; s < steps; s++) {
        for (int i = 0; i < 16; i++) acc[i] = FMA(w, acc[i], w);
        __asm__ volatile("" : "+v"(w));
    }
    double seconds = now() - start;
    float total = 0;
    for (int i = 0; i < 16; i++) total += ((float *)&acc[i])[0];  /* every chain is live */
    sink = total;
    return (double)steps * 16 / seconds / 1e9;
}

int main(void) {
    for (int i = 0; i < (1 << 13); i++) data[i] = 1e-3f * (i & 63);
    double peak = no_loads();
    printf("%d-lane FMAs, one core, G FMA/s (and vs the no-load loop):\n", LANES);
    printf("  no loads (16 chains)             %.2f\n", peak);
    printf("  16 broadcasts x 1 W vector       %.2f  (%.2f)\n", tile_16x1(), tile_16x1() / peak);
    printf("   8 broadcasts x 2 W vectors      %.2f  (%.2f)\n", tile_8x2(), tile_8x2() / peak);
    printf("  14 broadcasts x 2 W vectors      %.2f  (%.2f)\n", tile_14x2(), tile_14x2() / peak);
    return 0;
}
