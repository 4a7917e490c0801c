// math_sweep.cpp: csrc/fsgld_math.h's Box-Muller pieces over every uniform input, for
// tests/test_math_sweep.py (loaded with ctypes; no torch headers, so it builds in a second).
// u(w) depends on bits 8..31 of a word only: w = k << 8 for k in [0, 2**24) covers all inputs
// (2**23 of them: bit 8 is forced to 1), each twice.
#include "fsgld_math.h"

extern "C" void fsgld_sweep(float* minus_two_log, float* r, float* s, float* c) {
  for (uint32_t k = 0; k < (1u << 23); ++k) {
    const uint32_t w = (2u * k + 1u) << 8;
    minus_two_log[k] = fsgld::minus_two_log_u(w);
    r[k] = sqrtf(minus_two_log[k]);
    fsgld::sincos_2pi_u(w, &s[k], &c[k]);
  }
}
