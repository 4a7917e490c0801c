// fsgld_ops.h: the host-side argument checks shared by the CPU and CUDA kernels of the fsgld::
// ops (the schemas are in fsgld_schemas.h). Python-side checks live in fsgld_fused/optimizer.py;
// these guard direct torch.ops.fsgld calls and give the same kind of message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fsgld {

// Validates one multi-tensor call; `device_type` is the dispatch key's device.
inline void check_lists(c10::DeviceType device_type, at::TensorList params, at::TensorList grads,
                        at::TensorList momentum_buffers, at::TensorList masters, at::IntArrayRef param_ids,
                        at::IntArrayRef offsets) {
  const size_t n = params.size();
  TORCH_CHECK(param_ids.size() == n, "fsgld: ", param_ids.size(), " param_ids for ", n, " params");
  TORCH_CHECK(offsets.size() == n, "fsgld: ", offsets.size(), " offsets for ", n, " params");
  TORCH_CHECK(grads.empty() || grads.size() == n, "fsgld: ", grads.size(), " grads for ", n, " params");
  TORCH_CHECK(momentum_buffers.empty() || momentum_buffers.size() == n, "fsgld: ", momentum_buffers.size(),
              " momentum buffers for ", n, " params");
  TORCH_CHECK(masters.empty() || masters.size() == n, "fsgld: ", masters.size(), " masters for ", n, " params");
  if (n == 0) return;
  const auto dtype = params[0].scalar_type();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().type() == device_type && p.device() == params[0].device(),
                "fsgld: param ", i, " is on ", p.device(), ", expected every tensor on ", params[0].device());
    TORCH_CHECK(p.scalar_type() == dtype, "fsgld: param ", i, " is ", p.scalar_type(), ", expected ", dtype,
                " (one call per dtype)");
    TORCH_CHECK(p.is_contiguous(), "fsgld: param ", i, " is not contiguous; the kernels index the row-major "
                "element order (use backend='reference' for strided parameters)");
    TORCH_CHECK(param_ids[i] >= 0 && param_ids[i] < (int64_t(1) << 31), "fsgld: param id ", param_ids[i],
                " out of range [0, 2**31)");
    TORCH_CHECK(offsets[i] >= 0, "fsgld: negative element offset ", offsets[i]);
    auto same = [&](const at::Tensor& t, const char* what, c10::ScalarType want) {
      TORCH_CHECK(t.device() == p.device() && t.sizes() == p.sizes() && t.is_contiguous() && t.scalar_type() == want,
                  "fsgld: ", what, " ", i, " must be a contiguous ", want, " tensor of shape ", p.sizes(), " on ",
                  p.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
    };
    if (!masters.empty()) {
      same(masters[i], "master", at::kFloat);
    }
    if (!grads.empty()) same(grads[i], "grad", dtype);
    if (!momentum_buffers.empty()) same(momentum_buffers[i], "momentum buffer", masters.empty() ? dtype : at::kFloat);
  }
}


inline void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* what, c10::Device device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == device, "fsgld: ", what,
              " must be a one-element float32 tensor on ", device);
}

inline void check_step_tensor(const std::optional<at::Tensor>& t, c10::Device device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kLong && t->device() == device,
              "fsgld: step_t must be a one-element int64 tensor on ", device);
}

// Everything fused_step_ needs of its arguments, for every device's kernel.
inline void check_fused_step(c10::DeviceType device_type, at::TensorList params, at::TensorList grads,
                             at::TensorList momentum_buffers, at::TensorList masters, at::IntArrayRef param_ids,
                             at::IntArrayRef offsets, double momentum, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& step_t,
                             const std::optional<at::Tensor>& lr_t) {
  TORCH_CHECK(grads.size() == params.size(), "fsgld::fused_step_: ", grads.size(), " grads for ", params.size(),
              " params");
  TORCH_CHECK((momentum != 0.0) == !momentum_buffers.empty() || params.empty(),
              "fsgld::fused_step_: pass one momentum buffer per param exactly when momentum != 0");
  check_lists(device_type, params, grads, momentum_buffers, masters, param_ids, offsets);
  if (params.empty()) return;
  check_scalar_tensor(grad_scale, "grad_scale", params[0].device());
  check_scalar_tensor(found_inf, "found_inf", params[0].device());
  check_scalar_tensor(lr_t, "lr_t", params[0].device());
  check_step_tensor(step_t, params[0].device());
}

// normals_ / philox_words_ (raw stream access for tests and benchmarks), for every device's kernel.
inline void check_stream_args(const at::Tensor& out, c10::DeviceType device_type, int64_t param_id, int64_t kind) {
  TORCH_CHECK(out.device().type() == device_type && out.is_contiguous(), "fsgld: out must be a contiguous ",
              device_type, " tensor");
  TORCH_CHECK(kind == 0 || kind == 1, "fsgld: kind must be 0 (eps) or 1 (xi)");
  TORCH_CHECK(param_id >= 0 && param_id < (int64_t(1) << 31), "fsgld: param id ", param_id, " out of range [0, 2**31)");
}

inline void check_normals(const at::Tensor& out, c10::DeviceType device_type, int64_t param_id, int64_t kind,
                          int64_t offset) {
  check_stream_args(out, device_type, param_id, kind);
  TORCH_CHECK(out.scalar_type() == at::kFloat, "fsgld::normals_: out must be float32");
  TORCH_CHECK(offset >= 0, "fsgld::normals_: negative element offset ", offset);
}

inline void check_words(const at::Tensor& out, c10::DeviceType device_type, int64_t param_id, int64_t kind) {
  check_stream_args(out, device_type, param_id, kind);
  TORCH_CHECK(out.scalar_type() == at::kInt && out.dim() == 2 && out.size(1) == 4,
              "fsgld::philox_words_: out must be an int32 tensor of shape (n, 4)");
}

// SPEC 2c: whether a call's params are rounded stochastically (bf16 without masters, and asked for).
inline bool rounds_stochastically(at::TensorList params, at::TensorList masters, bool asked) {
  return asked && !params.empty() && params[0].scalar_type() == at::kBFloat16 && masters.empty();
}

inline void check_rounding_op(int64_t rounding_op) {
  TORCH_CHECK(rounding_op == -1 || rounding_op == 1 || rounding_op == 2,
              "fsgld::perturb_: rounding_op must be -1 (to nearest), 1 (perturb_) or 2 (restore_), got ", rounding_op);
}

// Python ints are int64 in schemas: the 64-bit seed travels as its two's-complement bits.
inline uint64_t seed_bits(int64_t seed) { return static_cast<uint64_t>(seed); }

}  // namespace fsgld
