// The rows of layer_norm_modulate (primitives.h, NormModulate), shared by the primitive and by
// rht_quantize's normed rows.
#pragma once

#include <cstdint>

#include "primitives.h"

namespace convrot::cpu {

// Row r of layer_norm_modulate's input (from the prefix or x, by its token) into row[0, k).
void load_norm_input_row(const void* x, Float dtype, const NormModulate& p, int64_t r, float* row);

// Normalises and modulates row[0, k) (of batch b) in place, each value rounded to dtype as
// layer_norm_modulate stores it; terms is scratch of k floats.
void normalize_modulate_row(Float dtype, const NormModulate& p, int64_t b, float* row, float* terms);

}  // namespace convrot::cpu
