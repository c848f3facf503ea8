// The stream-order checker (core/device/emulated/emulated_stream_check.h) against closed forms: each
// case makes a known number of unordered cross-stream uses and reads the library's race count,
// through dlsym as moeforge does.
#include "emulated_probe.h"

#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <dlfcn.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <thread>

namespace moeforge::probe {
namespace {

constexpr auto kType = c10::DeviceType::PrivateUse1;

const c10::impl::DeviceGuardImplInterface& guard() { return *c10::impl::getDeviceGuardImpl(kType); }

template <typename Fn>
Fn library_function(const char* name) {
  void* f = dlsym(RTLD_DEFAULT, name);
  require(f != nullptr, std::string("the library does not export ") + name);
  return reinterpret_cast<Fn>(f);
}

long long races() { return library_function<long long (*)()>("moeforge_emulated_stream_races")(); }
void reset_races() { library_function<void (*)()>("moeforge_emulated_stream_races_reset")(); }

void require_races(long long expected, const std::string& what) {
  const long long n = races();
  require(n == expected, what + ": " + std::to_string(n) + " races counted, expected " + std::to_string(expected));
}

// What `body` prints on stderr (printed again, so that the log keeps it).
template <typename Body>
std::string stderr_of(Body body) {
  std::fflush(stderr);
  const int saved = dup(2);
  std::FILE* capture = std::tmpfile();
  require(saved >= 0 && capture != nullptr, "cannot capture stderr");
  dup2(fileno(capture), 2);
  body();
  std::fflush(stderr);
  dup2(saved, 2);
  close(saved);
  std::string text;
  std::rewind(capture);
  for (int c = std::fgetc(capture); c != EOF; c = std::fgetc(capture)) text += static_cast<char>(c);
  std::fclose(capture);
  std::fputs(text.c_str(), stderr);
  return text;
}

// Every stream's work ordered before the host's, so the cases' tensors free without reports.
void settle() { guard().synchronizeDevice(0); }

// Case 1 and its ordered variants: a tensor written on `side`, then (after `order`) read on the default
// stream; returned, so that its free (a report of its own when unordered) waits for settle().
template <typename Order>
torch::Tensor write_then_read(const torch::Device& dev, const c10::Stream& side, Order order) {
  auto x = torch::empty({4, 4}, dev);
  {
    const c10::StreamGuard on(side);
    x.fill_(1.0);
    order();
  }
  (void)x.sum();
  return x;
}

void check_write_then_read(const torch::Device& dev) {
  const c10::Stream side = guard().getStreamFromGlobalPool(dev);
  reset_races();
  torch::Tensor x;
  const std::string report = stderr_of([&] { x = write_then_read(dev, side, [] {}); });
  require_races(1, "fill_ on a pool stream, sum on the default stream, nothing between");
  for (const std::string& part : {std::string("aten::sum"), std::string("reads a tensor of shape [4, 4] Float"),
                                  std::string("emulated:0 stream 0"), std::string("last written by aten::fill_"),
                                  "on stream " + std::to_string(side.id())}) {
    require_contains(report, part);
  }
  settle();
}

void check_printed_races(const torch::Device& dev) {
  const c10::Stream side = guard().getStreamFromGlobalPool(dev);
  auto x = torch::empty({3}, dev);
  {
    const c10::StreamGuard on(side);
    x.fill_(1.0);
  }
  reset_races();
  const std::string report = stderr_of([&] {
    for (int i = 0; i < 25; ++i) (void)x.sum();
  });
  require_races(25, "25 reads on the default stream of a tensor written on a pool stream");
  const std::string mark = "stream-order race: ";
  size_t printed = 0;
  for (size_t at = report.find(mark); at != std::string::npos; at = report.find(mark, at + 1)) ++printed;
  require(printed == 20, std::to_string(printed) + " races printed, expected the first 20");
  require_contains(report, "further stream-order races are counted, not printed");
  settle();
}

void check_ordered_write_then_read(const torch::Device& dev) {
  const c10::Stream side = guard().getStreamFromGlobalPool(dev);
  const c10::Stream main = guard().getDefaultStream(dev);
  reset_races();
  c10::Event done(kType);
  const auto a = write_then_read(dev, side, [&] {
    done.record(side);
    done.block(main);
  });
  require_races(0, "an event recorded on the writing stream and waited for by the reading one");
  const auto b = write_then_read(dev, side, [&] { side.synchronize(); });
  require_races(0, "the writing stream synchronised by the host before the read is issued");
  c10::Event never(kType);
  const auto c = write_then_read(dev, side, [&] { never.block(main); });
  require_races(1, "waiting for an event never recorded orders nothing");
  settle();
}

void check_read_then_write(const torch::Device& dev) {
  const c10::Stream side = guard().getStreamFromGlobalPool(dev);
  const c10::Stream main = guard().getDefaultStream(dev);
  reset_races();
  auto x = torch::ones({8}, dev);
  c10::Event made(kType);
  made.record(main);
  made.block(side);
  {
    const c10::StreamGuard on(side);
    (void)x.sum();
  }
  require_races(0, "reading on the pool stream after waiting for the write");
  x.fill_(2.0);
  require_races(1, "fill_ on the default stream after an unordered read on the pool stream");
  settle();
}

void check_frees(const torch::Device& dev) {
  const c10::Stream side = guard().getStreamFromGlobalPool(dev);
  const c10::Stream main = guard().getDefaultStream(dev);
  // Allocated on the default stream, written on the pool stream, freed by the host: `between`, then free.
  const auto use_and_free = [&](auto between) {
    auto t = torch::empty({256}, dev);
    {
      const c10::StreamGuard on(side);
      t.fill_(3.0);
    }
    between(t);
  };
  reset_races();
  const std::string report = stderr_of([&] { use_and_free([](torch::Tensor&) {}); });
  require_races(1, "freed on the default stream while the pool stream's fill_ is unordered");
  for (const std::string& part : {std::string("freed on stream 0"), "while stream " + std::to_string(side.id()),
                                  std::string("aten::fill_"), std::string("recordStream")}) {
    require_contains(report, part);
  }
  reset_races();
  use_and_free([&](torch::Tensor& t) { t.record_stream(side); });
  require_races(0, "the pool stream named by record_stream");
  use_and_free([&](torch::Tensor& t) { guard().recordDataPtrOnStream(t.storage().data_ptr(), side); });
  require_races(0, "the pool stream named by recordDataPtrOnStream");
  c10::Event done(kType);
  use_and_free([&](torch::Tensor&) {
    done.record(side);
    done.block(main);
  });
  require_races(0, "the default stream waited for the pool stream's event before the free");
}

void check_attention_reads(const torch::Device& dev) {
  const c10::Stream side = guard().getStreamFromGlobalPool(dev);
  const c10::Stream main = guard().getDefaultStream(dev);
  const auto kv = torch::randn({1, 2, 16, 8}).to(dev);
  const auto q = torch::empty({1, 2, 16, 8}, dev);
  reset_races();
  c10::Event made(kType);
  made.record(main);
  made.block(side);
  {
    const c10::StreamGuard on(side);
    q.copy_(kv);
  }
  require_races(0, "copy_ on the pool stream after waiting for its source's write");
  const std::string report = stderr_of([&] {
    (void)at::_scaled_dot_product_fused_attention_overrideable(q, kv, kv, {}, 0.0, /*is_causal=*/true);
  });
  require_races(1, "fused attention on the default stream reads q, written on the pool stream");
  require_contains(report,
                   "aten::_scaled_dot_product_fused_attention_overrideable reads a tensor of shape [1, 2, 16, 8]");
  settle();
}

void check_training_step(const torch::Device& dev) {
  reset_races();
  torch::manual_seed(5);
  torch::nn::Sequential model(torch::nn::Linear(16, 32), torch::nn::GELU(), torch::nn::Linear(32, 8));
  model->to(dev);
  const auto leaf = [&](std::vector<int64_t> shape) { return torch::randn(shape, dev).requires_grad_(); };
  const auto q = leaf({2, 2, 24, 8}), k = leaf({2, 2, 24, 8}), v = leaf({2, 2, 24, 8});
  std::thread::id backward_thread;
  q.register_hook([&](const torch::Tensor& grad) {
    backward_thread = std::this_thread::get_id();
    return grad;
  });
  for (int step = 0; step < 2; ++step) {
    const auto x = torch::randn({10, 16}).to(dev);
    const auto y = torch::randint(0, 8, {10}, torch::kLong).to(dev);
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
    loss = loss + at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true).square().mean();
    loss.backward();
    const torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) {
      p.sub_(p.grad() * 0.1);
      p.grad().zero_();
    }
    require(std::isfinite(loss.item<float>()), "the loss is not finite");
  }
  require(backward_thread != std::this_thread::get_id(),
          "backward ran on the calling thread, not autograd's device thread");
  require_races(0, "two training steps (linear, GELU, attention, backward, update) on the default stream");
}

// Forward on a pool stream (after waiting for its inputs), backward called from the default stream:
// the autograd engine orders the streams with events, so the default stream may read the gradients.
void check_side_stream_step(const torch::Device& dev) {
  const c10::Stream side = guard().getStreamFromGlobalPool(dev);
  const c10::Stream main = guard().getDefaultStream(dev);
  reset_races();
  torch::nn::Linear layer(16, 4);
  layer->to(dev);
  const auto x = torch::randn({6, 16}).to(dev);
  torch::Tensor loss;
  {
    c10::Event ready(kType);
    ready.record(main);
    ready.block(side);
    const c10::StreamGuard on(side);
    loss = layer->forward(x).square().sum();
  }
  loss.backward();
  const torch::NoGradGuard no_grad;
  for (auto& p : layer->parameters()) p.sub_(p.grad() * 0.1);
  require(std::isfinite(layer->weight.sum().item<float>()), "the weights are not finite");
  require_races(0, "a step whose forward and backward ran on a pool stream, updated on the default stream");
}

// Copied from emulated:0 to emulated:1 and used there: CUDA's copy orders the two devices' streams.
void check_copy_between_devices() {
  const torch::Device d0("emulated:0"), d1("emulated:1");
  reset_races();
  auto x = torch::randn({32}).to(d0);
  {
    const auto y = x.to(d1);
    (void)y.sum();
  }
  x.fill_(0.0);
  require_races(0, "a copy from emulated:0 to emulated:1, read on emulated:1, freed there, then the source rewritten");
}

}  // namespace

int run_stream_check_checks() {
  const torch::Device dev("emulated:0");
  check("written on a pool stream, read on the default stream unordered: 1 race naming both", [&] {
    check_write_then_read(dev);
  });
  check("all races counted, the first 20 printed", [&] { check_printed_races(dev); });
  check("ordered by an event or a host synchronize: no race; an unrecorded event orders nothing", [&] {
    check_ordered_write_then_read(dev);
  });
  check("read on a pool stream, written on the default stream unordered: 1 race", [&] { check_read_then_write(dev); });
  check("freed while another stream's use is unordered: 1 report; recordStream or an event wait: none", [&] {
    check_frees(dev);
  });
  check("fused attention's inputs are reads", [&] { check_attention_reads(dev); });
  check("training steps on the default stream (autograd's device thread included): no race", [&] {
    check_training_step(dev);
  });
  check("forward and backward on a pool stream, update on the default stream: the engine's events order them", [&] {
    check_side_stream_step(dev);
  });
  check("a copy between two devices orders their streams: no race", [] { check_copy_between_devices(); });
  return failures() == 0 ? 0 : 1;
}

void check_stream_check_off(const torch::Device& dev) {
  reset_races();
  const auto x = write_then_read(dev, guard().getStreamFromGlobalPool(dev), [] {});
  require_races(0, "the unordered write and read with MOEFORGE_EMULATED_STREAM_CHECK unset");
}

int run_bad_stream_check_setting() {
  check("MOEFORGE_EMULATED_STREAM_CHECK=yes is refused where the device is first used", [] {
    require_contains(error_of<c10::Error>([] { (void)torch::empty({1}, torch::Device("emulated:0")); }),
                     "MOEFORGE_EMULATED_STREAM_CHECK is 'yes': expected 1");
  });
  return failures() == 0 ? 0 : 1;
}

}  // namespace moeforge::probe
