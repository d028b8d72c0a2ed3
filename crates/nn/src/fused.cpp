// The C face of what tch does not wrap: libtorch's fused Adam kernel (aten::_fused_adam_),
// one pass over each parameter, its gradient and its moments, on CPU and on CUDA; and
// cuDNN's process-wide flags.
//
// Tensors come as tch's handles (at::Tensor*). C++ exceptions come back as text: nothing
// unwinds into Rust.

#include <ATen/Context.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/empty_like.h>

#include <cstring>
#include <string>
#include <vector>

namespace {

void put_error(const std::string& what, char* err, size_t len) {
  if (err == nullptr || len == 0) return;
  std::string first = what.substr(0, what.find('\n'));
  size_t n = std::min(first.size(), len - 1);
  std::memcpy(err, first.data(), n);
  err[n] = '\0';
}

std::vector<at::Tensor> gather(const at::Tensor* const* ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; i++) out.push_back(ts == nullptr ? at::Tensor() : *ts[i]);
  return out;
}

}  // namespace

extern "C" {

// One Adam (or AMSGrad) step of `n` parameters. `steps` are float32 scalars on each
// parameter's device, already counting this step. `max_exp_avg_sqs` is null without
// AMSGrad. The kernel walks each tensor's memory in order, so a gradient whose strides
// differ from its parameter's is copied into the parameter's layout first; a moment whose
// strides differ is refused (it is updated in place). Returns 0, or -1 with `err` set.
int lw_fused_adam(const at::Tensor* const* params, const at::Tensor* const* grads, const at::Tensor* const* exp_avgs,
                  const at::Tensor* const* exp_avg_sqs, const at::Tensor* const* max_exp_avg_sqs,
                  const at::Tensor* const* steps, size_t n, double lr, double beta1, double beta2,
                  double weight_decay, double eps, int amsgrad, char* err, size_t err_len) {
  try {
    auto p = gather(params, n), g = gather(grads, n), m = gather(exp_avgs, n), v = gather(exp_avg_sqs, n),
         s = gather(steps, n);
    std::vector<at::Tensor> vmax = amsgrad ? gather(max_exp_avg_sqs, n) : std::vector<at::Tensor>();
    for (size_t i = 0; i < n; i++) {
      if (g[i].strides() != p[i].strides()) g[i] = at::empty_like(p[i]).copy_(g[i]);
      bool moments_match = m[i].strides() == p[i].strides() && v[i].strides() == p[i].strides() &&
                           (!amsgrad || vmax[i].strides() == p[i].strides());
      TORCH_CHECK(moments_match, "fused Adam: parameter ", i, "'s moments are not in its memory layout");
    }
    at::_fused_adam_(p, g, m, v, vmax, s, lr, beta1, beta2, weight_decay, eps, amsgrad != 0, false);
    return 0;
  } catch (const c10::Error& e) {
    put_error(e.what_without_backtrace(), err, err_len);
  } catch (const std::exception& e) {
    put_error(e.what(), err, err_len);
  } catch (...) {
    put_error("unknown C++ exception", err, err_len);
  }
  return -1;
}

// cuDNN's process-wide choices: `benchmark` lets it time its algorithms for each new shape
// and keep the fastest (which may differ from run to run); `deterministic` restricts it to
// algorithms whose results do not depend on scheduling. Plain flags: no CUDA needed.
void lw_set_cudnn(int benchmark, int deterministic) {
  at::globalContext().setBenchmarkCuDNN(benchmark != 0);
  at::globalContext().setDeterministicCuDNN(deterministic != 0);
}

void lw_cudnn(int* benchmark, int* deterministic) {
  *benchmark = at::globalContext().benchmarkCuDNN() ? 1 : 0;
  *deterministic = at::globalContext().deterministicCuDNN() ? 1 : 0;
}

}  // extern "C"
