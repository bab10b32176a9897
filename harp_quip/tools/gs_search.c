/*
 * Stochastic local search for four +-1 sequences A, B, C, D of odd length v
 * whose periodic autocorrelations sum to zero at every nonzero shift:
 *
 *     P_A(s) + P_B(s) + P_C(s) + P_D(s) = 0,   s = 1 .. (v-1)/2,
 *
 * with prescribed row sums a, b, c, d (a^2 + b^2 + c^2 + d^2 = 4v).  Their
 * circulants plugged into the Goethals-Seidel array give a Hadamard matrix
 * of order 4v.  Driven by tools/search_gs_sequences.py.
 *
 * Method: Metropolis search at a fixed temperature on
 * E = sum_s (sum_k P_k(s))^2.  A move swaps a +1 and a -1 inside one sequence
 * (row sums stay fixed); the change of every P(s) is computed in O(v).  The
 * walk restarts from a random point when it has not improved for a while.
 *
 * Usage: gs_search v a b c d seed seconds temperature
 * Prints one line of four '+'/'-' strings on success, "FAIL" otherwise.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define MAXV 128
#define STALL_LIMIT 2000000L

static uint64_t rng_state;

static uint64_t rng_next(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static int rng_below(int n) { return (int)(rng_next() % (uint64_t)n); }

static double rng_unit(void) { return (rng_next() >> 11) * (1.0 / 9007199254740992.0); }

static int v, half;
static int sums[4];
/* ext[k][v + i] = x_k[i mod v] for i in -v .. 2v-1, so shifts need no modulo. */
static int ext[4][3 * MAXV];
/* pos[k][0 .. nplus-1] are the +1 positions of sequence k, the rest the -1 ones. */
static int pos[4][MAXV], nplus[4];
static int paf_total[MAXV];

static int value(int k, int i) { return ext[k][v + i]; }

static void set_value(int k, int i, int x)
{
    ext[k][i] = ext[k][v + i] = ext[k][2 * v + i] = x;
}

static void random_start(void)
{
    for (int k = 0; k < 4; k++) {
        nplus[k] = (v + sums[k]) / 2;
        for (int i = 0; i < v; i++)
            pos[k][i] = i;
        for (int i = v - 1; i > 0; i--) {
            int j = rng_below(i + 1), t = pos[k][i];
            pos[k][i] = pos[k][j];
            pos[k][j] = t;
        }
        for (int i = 0; i < v; i++)
            set_value(k, pos[k][i], i < nplus[k] ? 1 : -1);
    }
    for (int s = 1; s <= half; s++) {
        int total = 0;
        for (int k = 0; k < 4; k++)
            for (int i = 0; i < v; i++)
                total += value(k, i) * value(k, i + s);
        paf_total[s] = total;
    }
}

static long energy(void)
{
    long e = 0;
    for (int s = 1; s <= half; s++)
        e += (long)paf_total[s] * paf_total[s];
    return e;
}

/*
 * Change of P_k(s), s = 1..half, when positions i (+1) and j (-1) of sequence
 * k both flip.  A single flip of x_i changes P(s) by -2 x_i (x_{i+s} + x_{i-s});
 * the product x_i x_j (present when j - i = +-s) is counted by both single
 * flips although it does not change, hence the correction of -4 (x_i x_j = -1).
 * Returns the change of E.
 */
static long swap_delta(int k, int i, int j, int *delta)
{
    const int *xi = ext[k] + v + i, *xj = ext[k] + v + j;
    int d = (j - i + v) % v;
    long de = 0;
    for (int s = 1; s <= half; s++) {
        int change = -2 * (xi[s] + xi[-s]) + 2 * (xj[s] + xj[-s]);
        if (s == d || s == v - d)
            change -= 4;
        delta[s] = change;
        de += (long)change * (2 * paf_total[s] + change);
    }
    return de;
}

static void print_solution(void)
{
    for (int k = 0; k < 4; k++) {
        for (int i = 0; i < v; i++)
            putchar(value(k, i) > 0 ? '+' : '-');
        putchar(k < 3 ? ' ' : '\n');
    }
}

int main(int argc, char **argv)
{
    if (argc != 9) {
        fprintf(stderr, "usage: gs_search v a b c d seed seconds temperature\n");
        return 2;
    }
    v = atoi(argv[1]);
    for (int k = 0; k < 4; k++)
        sums[k] = atoi(argv[2 + k]);
    rng_state = strtoull(argv[6], NULL, 10) * 0x9E3779B97F4A7C15ULL + 1;
    double seconds = atof(argv[7]), temp = atof(argv[8]);
    if (v < 3 || v > MAXV || v % 2 == 0) {
        fprintf(stderr, "v must be odd, 3..%d\n", MAXV);
        return 2;
    }
    half = (v - 1) / 2;
    clock_t deadline = clock() + (clock_t)(seconds * CLOCKS_PER_SEC);
    int delta[MAXV];

    while (clock() < deadline) {
        random_start();
        long e = energy(), best = e, since_best = 0;
        for (long step = 1; e > 0 && since_best < STALL_LIMIT; step++) {
            int k = rng_below(4);
            int a = rng_below(nplus[k]), b = nplus[k] + rng_below(v - nplus[k]);
            int i = pos[k][a], j = pos[k][b];
            long de = swap_delta(k, i, j, delta);
            if (de <= 0 || rng_unit() < exp(-(double)de / temp)) {
                for (int s = 1; s <= half; s++)
                    paf_total[s] += delta[s];
                set_value(k, i, -1);
                set_value(k, j, 1);
                pos[k][a] = j;
                pos[k][b] = i;
                e += de;
            }
            if (e < best) {
                best = e;
                since_best = 0;
            } else {
                since_best++;
            }
            if ((step & 0xFFFFF) == 0 && clock() > deadline)
                break;
        }
        if (e == 0) {
            print_solution();
            return 0;
        }
    }
    puts("FAIL");
    return 1;
}
