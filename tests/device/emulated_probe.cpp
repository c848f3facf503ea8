// The emulated device (core/device/emulated) against the CPU. Each numeric check runs one
// computation on emulated tensors and the same one on CPU tensors, and requires the same bits: the
// CPU run is the independent reference, and as the emulator runs the CPU's kernels on the device
// bytes, any difference is the emulator's bug. The rest checks what only a device has, against
// closed forms: memory statistics, out-of-memory errors, streams and events.
//   emulated_probe LIBRARY           every check; runs itself again for the environment's checks
//   emulated_probe LIBRARY --small   (with MOEFORGE_EMULATED_DEVICES=2, MEMORY_BYTES=4 MiB set)
//   emulated_probe LIBRARY --bad-env (with MOEFORGE_EMULATED_DEVICES=two set)
//   emulated_probe LIBRARY --stream-check (with MOEFORGE_EMULATED_STREAM_CHECK=1, DEVICES=2 set)
//   emulated_probe LIBRARY --bad-stream-check (with MOEFORGE_EMULATED_STREAM_CHECK=yes set)
// Prints PASS or FAIL per check; exits non-zero on any failure.
#include "emulated_probe.h"

#include <torch/torch.h>

#include <dlfcn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>

namespace probe = moeforge::probe;
using probe::require;
using probe::require_same;

namespace {

void check_copies(const torch::Device& dev) {
  const auto x = torch::randn({5, 7});
  const auto d = x.to(dev);
  require(d.device().type() == c10::DeviceType::PrivateUse1 && d.device().str() == "emulated:0",
          "the copy is on " + d.device().str());
  require(d.data_ptr() != x.data_ptr(), "the device copy shares the host tensor's memory");
  require_same(d, x, "CPU -> emulated -> CPU");
  require_same(x.t().to(dev), x.t(), "a transposed source");
  require_same(x.to(dev, torch::kDouble), x.to(torch::kDouble), "with a dtype conversion");
  require_same(d.to(torch::Device("emulated:0"), torch::kHalf), x.to(torch::kHalf), "emulated -> emulated");
  require_same(x.pin_memory().to(dev, /*non_blocking=*/true), x, "from pinned memory, non-blocking");
  require(probe::same_bits(d.to(torch::kCPU, /*non_blocking=*/true), x), "to the host, non-blocking");
  // Backward through the copy: the gradient comes back to the host.
  const auto w = torch::randn({5, 7}).requires_grad_();
  (w.to(dev) * d).sum().backward();
  require(w.grad().is_cpu() && probe::same_bits(w.grad(), x), "the gradient through a host-to-device copy");
}

void check_views(const torch::Device& dev) {
  auto base_c = torch::arange(60, torch::kFloat).reshape({3, 4, 5});
  auto base_d = base_c.to(dev);
  const auto chain = [](const torch::Tensor& t) { return t.transpose(0, 2).slice(1, 1, 3).select(2, 1); };
  require_same(chain(base_d), chain(base_c), "transpose, slice, select");
  require(chain(base_d).storage().data() == base_d.storage().data(), "the view chain does not share the base's storage");
  require_same(chain(base_d).reshape({-1}), chain(base_c).reshape({-1}), "reshape of the non-contiguous view");
  require_same(base_d.view({12, 5}).select(0, 3), base_c.view({12, 5}).select(0, 3), "view");
  for (auto* b : {&base_c, &base_d}) {
    b->slice(1, 1, 3).add_(1.5);
    chain(*b).mul_(-2);
    b->unfold(2, 2, 2).sub_(0.25);  // unfold runs in the fallback: its view must come back as one
  }
  require_same(base_d, base_c, "in-place add_, mul_, sub_ through views change the base");
}

void check_out_resize(const torch::Device& dev) {
  const auto a = torch::randn({6, 9});
  const auto b = torch::randn({6, 9});
  auto out = torch::empty({0}, dev);
  const auto* impl = out.unsafeGetTensorImpl();
  const auto& returned = at::add_out(out, a.to(dev), b.to(dev));
  require(returned.unsafeGetTensorImpl() == impl, "add_out returned another tensor than its out= argument");
  require_same(out, a + b, "add_out into an empty emulated tensor");
  auto mm = torch::empty({0}, dev);
  at::mm_out(mm, a.to(dev), b.t().to(dev));
  require_same(mm, at::mm(a, b.t()), "mm_out into an empty emulated tensor");
  // Storage enough for the result: the CPU kernel only reshapes the alias, in the device's memory.
  auto roomy = torch::empty({100}, dev).resize_(0);
  const void* memory = roomy.storage().data();
  at::sub_out(roomy, a.to(dev), b.to(dev));
  require_same(roomy, a - b, "sub_out into an emulated tensor with room");
  require(roomy.storage().data() == memory, "sub_out moved a result that fitted to other memory");
}

void check_ops(const torch::Device& dev) {
  const auto a = torch::randn({4, 8, 16});
  const auto b = torch::randn({4, 16, 5});
  const auto m = torch::randn({33, 17});
  const auto n = torch::randn({17, 9});
  require_same(torch::matmul(a.to(dev), b.to(dev)), torch::matmul(a, b), "matmul (batched)");
  require_same(torch::matmul(m.to(dev), n.to(dev)), torch::matmul(m, n), "matmul");
  require_same(torch::bmm(a.to(dev), b.to(dev)), torch::bmm(a, b), "bmm");
  const auto idx = torch::tensor({3, 0, 3, 7, 1}, torch::kLong);
  require_same(m.to(dev).index_select(0, idx.to(dev)), m.index_select(0, idx), "index_select");
  const auto vals = torch::randn({5, 17});
  auto put_c = m.clone();
  auto put_d = m.to(dev);
  put_c.index_put_({idx}, vals, /*accumulate=*/true);
  put_d.index_put_({idx.to(dev)}, vals.to(dev), /*accumulate=*/true);
  require_same(put_d, put_c, "index_put_ (accumulate, repeated indices)");
  const auto target = torch::randint(0, 9, {33, 17}, torch::kLong);
  auto sc_c = torch::zeros({9, 17});
  auto sc_d = sc_c.to(dev);
  sc_c.scatter_add_(0, target, m);
  sc_d.scatter_add_(0, target.to(dev), m.to(dev));
  require_same(sc_d, sc_c, "scatter_add_");
  require_same(m.to(dev).cumsum(1), m.cumsum(1), "cumsum");
  const auto [tv_d, ti_d] = m.to(dev).topk(4, 1);
  const auto [tv_c, ti_c] = m.topk(4, 1);
  require_same(tv_d, tv_c, "topk values");
  require_same(ti_d, ti_c, "topk indices");
  const auto [sv_d, si_d] = m.to(dev).sort(0, /*descending=*/true);
  const auto [sv_c, si_c] = m.sort(0, true);
  require_same(sv_d, sv_c, "sort values");
  require_same(si_d, si_c, "sort indices");
  require_same(torch::softmax(m.to(dev), 1), torch::softmax(m, 1), "softmax");
  const auto gamma = torch::randn({17});
  require_same(torch::layer_norm(m.to(dev), {17}, gamma.to(dev)), torch::layer_norm(m, {17}, gamma), "layer_norm");
  const auto mb = m.to(torch::kBFloat16);
  const auto nb = n.to(torch::kBFloat16);
  require_same(torch::matmul(mb.to(dev), nb.to(dev)), torch::matmul(mb, nb), "matmul (bf16)");
  require_same(torch::softmax(mb.to(dev), 1, torch::kFloat), torch::softmax(mb, 1, torch::kFloat), "softmax (bf16 in)");
  const auto labels = torch::randint(0, 17, {33}, torch::kLong);
  require_same(torch::nn::functional::cross_entropy(m.to(dev), labels.to(dev)),
               torch::nn::functional::cross_entropy(m, labels), "cross_entropy");
}

void check_attention(const torch::Device& dev, torch::Dtype dtype) {
  const auto leaf = [](const torch::Tensor& t) { return t.detach().requires_grad_(); };
  std::vector<torch::Tensor> cpu, emu;
  for (int i = 0; i < 3; ++i) {
    const auto t = torch::randn({2, 4, 96, 32}).to(dtype);
    cpu.push_back(leaf(t));
    emu.push_back(leaf(t.to(dev)));
  }
  const auto choice = at::_fused_sdp_choice(emu[0], emu[1], emu[2], {}, 0.0, true);
  require(choice == static_cast<int64_t>(at::SDPBackend::overrideable),
          "the emulated device chose SDPA backend " + std::to_string(choice) + ", not overrideable (4)");
  const auto out_c = at::scaled_dot_product_attention(cpu[0], cpu[1], cpu[2], {}, 0.0, /*is_causal=*/true);
  const auto out_d = at::scaled_dot_product_attention(emu[0], emu[1], emu[2], {}, 0.0, true);
  require(out_d.grad_fn() && out_d.grad_fn()->name().find("Overrideable") != std::string::npos,
          "the emulated forward ran " + (out_d.grad_fn() ? out_d.grad_fn()->name() : std::string("no autograd node")));
  require_same(out_d, out_c, "causal forward");
  // The CPU flash kernel's own output; the math path's differs from it, so equality shows it ran.
  const torch::NoGradGuard no_grad;
  const auto flash = std::get<0>(at::_scaled_dot_product_flash_attention_for_cpu(cpu[0], cpu[1], cpu[2], 0.0, true));
  const auto math = std::get<0>(at::_scaled_dot_product_attention_math(cpu[0], cpu[1], cpu[2], {}, 0.0, true));
  require(!probe::same_bits(math, flash), "the math path gives the flash kernel's bits: the check cannot tell them apart");
  require_same(out_d, flash, "forward against the CPU flash kernel");
  {
    const at::AutoGradMode grad(true);
    const auto grad_out = torch::randn(out_c.sizes()).to(dtype);
    out_c.backward(grad_out);
    out_d.backward(grad_out.to(dev));
  }
  for (int i = 0; i < 3; ++i) require_same(emu[i].grad(), cpu[i].grad(), "gradient of input " + std::to_string(i));
}

void check_mlp(const torch::Device& dev) {
  const auto make = [] {
    torch::manual_seed(3);
    return torch::nn::Sequential(torch::nn::Linear(16, 32), torch::nn::GELU(), torch::nn::Linear(32, 8));
  };
  auto cpu = make();
  auto emu = make();
  emu->to(dev);
  for (const auto& p : emu->parameters()) require(p.device() == dev, "a parameter stayed on " + p.device().str());
  const auto x = torch::randn({10, 16});
  const auto y = torch::randint(0, 8, {10}, torch::kLong);
  const auto loss_c = torch::nn::functional::cross_entropy(cpu->forward(x), y);
  const auto loss_d = torch::nn::functional::cross_entropy(emu->forward(x.to(dev)), y.to(dev));
  loss_c.backward();
  loss_d.backward();
  require_same(loss_d, loss_c, "loss");
  const auto pc = cpu->named_parameters();
  const auto pd = emu->named_parameters();
  for (const auto& item : pc) require_same(pd[item.key()].grad(), item.value().grad(), "gradient of " + item.key());
}

void check_item_and_random(const torch::Device& dev) {
  const auto x = torch::randn({1000});
  require(x.to(dev).sum().item<float>() == x.sum().item<float>(), "sum().item() differs");
  require(x.to(dev).argmax().item<int64_t>() == x.argmax().item<int64_t>(), "argmax().item() differs");
  torch::manual_seed(1234);
  const auto r_d = torch::randn({1000}, dev);
  const auto drop_d = torch::dropout(torch::ones({1000}, dev), 0.5, /*train=*/true);
  torch::manual_seed(1234);
  const auto r_c = torch::randn({1000});
  const auto drop_c = torch::dropout(torch::ones({1000}), 0.5, true);
  require_same(r_d, r_c, "randn after manual_seed");
  require_same(drop_d, drop_c, "dropout after manual_seed");
}

// This program run again as `mode`, with `variables` (name, value) set; its exit code.
int child(const char* self, const char* library, const char* mode,
          std::initializer_list<std::pair<const char*, const char*>> variables) {
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) {
    for (const auto& [name, value] : variables) setenv(name, value, 1);
    execl(self, self, library, mode, static_cast<char*>(nullptr));
    std::perror("exec");
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s LIBRARY [--small|--bad-env]\n", argv[0]);
    return 2;
  }
  const std::string mode = argc > 2 ? argv[2] : "";
  if (mode.empty()) {
    // The defaults: one device of 16 GiB.
    unsetenv("MOEFORGE_EMULATED_DEVICES");
    unsetenv("MOEFORGE_EMULATED_MEMORY_BYTES");
    unsetenv("MOEFORGE_EMULATED_STREAM_CHECK");
  }
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "FAIL  loading %s: %s\n", argv[1], dlerror());
    return 1;
  }
  if (mode == "--small") return probe::run_small_device_checks();
  if (mode == "--bad-env") return probe::run_bad_environment_checks();
  if (mode == "--stream-check") return probe::run_stream_check_checks();
  if (mode == "--bad-stream-check") return probe::run_bad_stream_check_setting();

  const torch::Device dev("emulated:0");
  probe::check("copy CPU -> emulated -> CPU round trip", [&] { check_copies(dev); });
  probe::check("views (transpose, slice, select, reshape, unfold) and in-place ops through them", [&] { check_views(dev); });
  probe::check("out= ops resize their emulated out= argument", [&] { check_out_resize(dev); });
  probe::check("matmul, bmm, index_select, index_put_, scatter_add_, cumsum, topk, sort, softmax, layer_norm, cross_entropy",
               [&] { check_ops(dev); });
  probe::check("scaled_dot_product_attention (causal, fp32 and bf16) runs the CPU flash kernels, forward and backward",
               [&] {
                 check_attention(dev, torch::kFloat);
                 check_attention(dev, torch::kBFloat16);
               });
  probe::check("an MLP moved with Module::to: loss and gradients", [&] { check_mlp(dev); });
  probe::check(".item(), and randn and dropout after manual_seed", [&] { check_item_and_random(dev); });
  probe::check("caching allocator: rounding, statistics, per-stream reuse, recordStream", [&] { probe::check_memory(dev); });
  probe::check("the accelerator hooks: availability, pointers, pinned memory, generators, storage resize",
               [&] { probe::check_hooks(dev); });
  probe::check("streams and events: record, query, block, elapsedTime", [&] { probe::check_events(dev); });
  const std::string self = "/proc/self/exe";
  probe::check("2 devices of 4 MiB: out-of-memory, cache flush and retry, per-device memory", [&] {
    require(child(self.c_str(), argv[1], "--small",
                  {{"MOEFORGE_EMULATED_DEVICES", "2"}, {"MOEFORGE_EMULATED_MEMORY_BYTES", "4194304"}}) == 0,
            "the --small run failed (see above)");
  });
  probe::check("a malformed MOEFORGE_EMULATED_DEVICES is refused by name", [&] {
    require(child(self.c_str(), argv[1], "--bad-env", {{"MOEFORGE_EMULATED_DEVICES", "two"}}) == 0,
            "the --bad-env run failed (see above)");
  });
  probe::check("stream-order checker off (MOEFORGE_EMULATED_STREAM_CHECK unset): no race counted", [&] {
    probe::check_stream_check_off(dev);
  });
  probe::check("stream-order checker on (MOEFORGE_EMULATED_STREAM_CHECK=1): races, event waits, frees", [&] {
    require(child(self.c_str(), argv[1], "--stream-check", {{"MOEFORGE_EMULATED_STREAM_CHECK", "1"}, {"MOEFORGE_EMULATED_DEVICES", "2"}}) == 0,
            "the --stream-check run failed (see above)");
  });
  probe::check("a malformed MOEFORGE_EMULATED_STREAM_CHECK is refused by name", [&] {
    require(child(self.c_str(), argv[1], "--bad-stream-check", {{"MOEFORGE_EMULATED_STREAM_CHECK", "yes"}}) == 0,
            "the --bad-stream-check run failed (see above)");
  });
  return probe::failures() == 0 ? 0 : 1;
}
