#include "core/kernels/wgrad_accumulation.h"

#include "core/kernels/grouped_gemm.h"
#include "core/kernels/kernels.h"

#include <fmt/format.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>

namespace moeforge::kernels {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Attachment {
  torch::Tensor main_grad;
  std::function<void()> added;
  const void* owner = nullptr;
};

// Keyed by the weight's TensorImpl: the owner (an optimizer holding the weight) keeps it alive
// until it detaches. Looked up once per fused op each way; the backward may run on another thread.
std::shared_mutex g_mutex;
std::unordered_map<const c10::TensorImpl*, std::shared_ptr<const Attachment>> g_attached;

std::shared_ptr<const Attachment> find(int64_t key) {
  std::shared_lock lock(g_mutex);
  const auto it = g_attached.find(reinterpret_cast<const c10::TensorImpl*>(key));
  return it == g_attached.end() ? nullptr : it->second;
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& weight,
                               const std::optional<torch::Tensor>& bias, int64_t key) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["key"] = key;
    ctx->saved_data["bias"] = bias.has_value();
    return torch::linear(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &weight = saved[1];
    const auto g_NM = grads[0].reshape({-1, weight.size(0)});
    const auto x_NJ = x.reshape({-1, weight.size(1)});
    // The input's gradient only where autograd asks (a frozen embedding's output needs none).
    const auto gx = ctx->needs_input_grad(0) ? grads[0].matmul(weight) : torch::Tensor();
    const auto gb = ctx->saved_data["bias"].toBool() ? g_NM.sum(0) : torch::Tensor();
    torch::Tensor gw;
    const bool added = add_to_main_grad(ctx->saved_data["key"].toInt(),
                                        [&](torch::Tensor& main_grad) { accumulate_wgrad(main_grad, g_NM, x_NJ); });
    if (!added) gw = g_NM.t().mm(x_NJ);  // detached since the forward: an ordinary gradient
    return {gx, gw, gb, torch::Tensor()};
  }
};

class GroupedLinearFunction : public torch::autograd::Function<GroupedLinearFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x_NJ, const torch::Tensor& weight_EMJ,
                               const torch::Tensor& offs_E, const std::vector<int64_t>& rows, int64_t key) {
    ctx->save_for_backward({x_NJ, weight_EMJ, offs_E});
    ctx->saved_data["rows"] = c10::IntArrayRef(rows);
    ctx->saved_data["key"] = key;
    return at::_grouped_mm(x_NJ, weight_EMJ.transpose(1, 2), offs_E);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x_NJ = saved[0], &weight_EMJ = saved[1], &offs_E = saved[2];
    const auto g_NM = grads[0].contiguous();  // _grouped_mm refuses an expanded gradient
    const auto gx = ctx->needs_input_grad(0) ? at::_grouped_mm(g_NM, weight_EMJ, offs_E) : torch::Tensor();
    const auto rows = ctx->saved_data["rows"].toIntVector();
    // The CPU widens to fp32 once for all experts; CUDA reads bf16 (cuBLAS accumulates in fp32).
    const bool widen = !x_NJ.is_cuda();
    const auto g = widen ? g_NM.to(torch::kFloat32) : g_NM;
    const auto x = widen ? x_NJ.to(torch::kFloat32) : x_NJ;
    auto add = [&](torch::Tensor& w_EMJ) {
      int64_t at = 0;
      for (size_t e = 0; e < rows.size(); at += rows[e], ++e) {
        if (rows[e] == 0) continue;
        auto w_MJ = w_EMJ[static_cast<int64_t>(e)];
        accumulate_wgrad(w_MJ, g.narrow(0, at, rows[e]), x.narrow(0, at, rows[e]));
      }
    };
    torch::Tensor gw;
    if (!add_to_main_grad(ctx->saved_data["key"].toInt(), add)) {  // detached since the forward
      gw = torch::zeros(weight_EMJ.sizes(), weight_EMJ.options().dtype(torch::kFloat32));
      add(gw);
      gw = gw.to(weight_EMJ.scalar_type());
    }
    return {gx, gw, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

void attach_main_grad(const torch::Tensor& weight, torch::Tensor main_grad_fp32, std::function<void()> added,
                      const void* owner) {
  TORCH_CHECK(main_grad_fp32.scalar_type() == torch::kFloat32 && main_grad_fp32.is_contiguous() &&
                  main_grad_fp32.sizes() == weight.sizes() && main_grad_fp32.device() == weight.device(),
              "attach_main_grad: main_grad must be a contiguous fp32 tensor of the weight's shape and device");
  auto a = std::make_shared<const Attachment>(Attachment{std::move(main_grad_fp32), std::move(added), owner});
  std::unique_lock lock(g_mutex);
  g_attached[weight.unsafeGetTensorImpl()] = std::move(a);
}

void detach_main_grad(const torch::Tensor& weight, const void* owner) {
  std::unique_lock lock(g_mutex);
  const auto it = g_attached.find(weight.unsafeGetTensorImpl());
  if (it != g_attached.end() && it->second->owner == owner) g_attached.erase(it);
}

int64_t fused_wgrad_key(const torch::Tensor& weight) {
  if (!torch::GradMode::is_enabled() || !weight.requires_grad() || weight.scalar_type() != torch::kBFloat16 ||
      !fused(Kernel::wgrad_accumulation, weight.device().type())) {
    return 0;
  }
  const auto key = reinterpret_cast<int64_t>(weight.unsafeGetTensorImpl());
  return find(key) ? key : 0;
}

bool add_to_main_grad(int64_t key, const std::function<void(torch::Tensor& main_grad)>& add) {
  const auto a = find(key);
  if (!a) return false;
  auto main_grad = a->main_grad;
  add(main_grad);
  a->added();
  return true;
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  const auto b = bias.defined() ? std::optional<torch::Tensor>(bias) : std::nullopt;
  const int64_t key = fused_wgrad_key(weight);
  return key ? LinearFunction::apply(x, weight, b, key) : torch::linear(x, weight, bias);
}

torch::Tensor grouped_linear(const torch::Tensor& x_NJ, const torch::Tensor& weight_EMJ, const torch::Tensor& offs_E,
                             const std::vector<int64_t>& rows_per_expert) {
  const int64_t key = fused_wgrad_key(weight_EMJ);
  return key ? GroupedLinearFunction::apply(x_NJ, weight_EMJ, offs_E, rows_per_expert, key)
             : grouped_mm(x_NJ, weight_EMJ.transpose(1, 2), offs_E);
}

namespace {
std::atomic<MixedAccumulate> g_mixed_mode{MixedAccumulate::addmm_dtype};
}  // namespace

const char* mixed_accumulate_name(MixedAccumulate mode) {
  switch (mode) {
    case MixedAccumulate::addmm_dtype: return "addmm with an fp32 out_dtype";
    case MixedAccumulate::mm_dtype_add: return "mm with an fp32 out_dtype, then add";
    case MixedAccumulate::widen: return "inputs widened to fp32";
  }
  return "?";
}

MixedAccumulate mixed_accumulate_mode() { return g_mixed_mode.load(); }

void accumulate_mixed(MixedAccumulate mode, torch::Tensor& main_grad_MJ, const torch::Tensor& g_NM,
                      const torch::Tensor& x_NJ) {
  switch (mode) {
    case MixedAccumulate::addmm_dtype:
      // bf16 in, fp32 accumulated in place: cuBLAS's epilogue adds into main_grad (beta 1).
      at::addmm_out(main_grad_MJ, main_grad_MJ, g_NM.t(), x_NJ, torch::kFloat32, 1, 1);
      return;
    case MixedAccumulate::mm_dtype_add:
      main_grad_MJ.add_(at::mm(g_NM.t(), x_NJ, torch::kFloat32));
      return;
    case MixedAccumulate::widen:
      main_grad_MJ.addmm_(g_NM.t().to(torch::kFloat32), x_NJ.to(torch::kFloat32));
      return;
  }
}

std::string probe_mixed_accumulate(const torch::Device& device) {
  // Small integers: every product and sum is exact in fp32, so any correct kernel matches exactly.
  const auto host_options = torch::TensorOptions().dtype(torch::kFloat32);  // the reference's, on the host
  const auto g_NM = torch::arange(12, host_options).remainder(5).sub(2).reshape({4, 3});
  const auto x_NJ = torch::arange(20, host_options).remainder(7).sub(3).reshape({4, 5});
  const auto start_MJ = torch::full({3, 5}, 0.5, host_options);
  const auto want_MJ = start_MJ + g_NM.t().mm(x_NJ);
  std::string refused;
  for (const auto mode : {MixedAccumulate::addmm_dtype, MixedAccumulate::mm_dtype_add}) {
    try {
      auto main_grad_MJ = start_MJ.to(device);
      accumulate_mixed(mode, main_grad_MJ, g_NM.to(device, torch::kBFloat16), x_NJ.to(device, torch::kBFloat16));
      // host: a start-up read, compared with the host's product
      if (main_grad_MJ.to(torch::kCPU).equal(want_MJ)) {
        g_mixed_mode = mode;
        return refused;
      }
      refused += fmt::format("{} gave a wrong sum on {}; ", mixed_accumulate_name(mode), device.str());
    } catch (const std::exception& e) {
      const std::string what = e.what();
      refused += fmt::format("{} is refused on {} ({}); ", mixed_accumulate_name(mode), device.str(),
                             what.substr(0, what.find('\n')));
    }
  }
  g_mixed_mode = MixedAccumulate::widen;
  return refused + "bf16 weight gradients are accumulated from fp32 copies of both GEMM inputs instead "
                   "(transient memory: each input's size again, twice)";
}

void accumulate_wgrad(torch::Tensor& main_grad_MJ, const torch::Tensor& g_NM, const torch::Tensor& x_NJ) {
  if (g_NM.size(0) == 0) return;
  if (g_NM.scalar_type() == torch::kFloat32) {
    main_grad_MJ.addmm_(g_NM.t(), x_NJ);
    return;
  }
  // The CPU has no mixed-dtype GEMM: widening is exact and costs about twice the bf16 GEMM there.
  accumulate_mixed(g_NM.is_cpu() ? MixedAccumulate::widen : g_mixed_mode.load(), main_grad_MJ, g_NM, x_NJ);
}

}  // namespace moeforge::kernels
