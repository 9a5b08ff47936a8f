// The Python module of aserve's CPU kernels.
#include "ops.h"
#include "simd.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &aserve::paged_attention, "Paged attention over a block-pooled KV cache (CPU)");
  m.def("rms_norm", &aserve::rms_norm, "RMSNorm in float32, optionally after residual += x (in place)");
  m.def("rope_store", &aserve::rope_store, "RoPE on q and k inside qkv (in place), k and v into the cache");
  m.def("int8_group_mm", &aserve::int8_group_mm, "x W^T for int8 W with a float32 scale per group of a row");
  m.def("vector_width", [] { return aserve::simd::kW; }, "floats per vector in the hot loops (16: AVX-512, 8: AVX2)");
  m.def("silu_mul", &aserve::silu_mul, "silu(gate) * up of a fused [T, 2I] gate/up projection");
}
