#include "parallel/data_parallel_optimizer.h"

#include "core/host_sync.h"
#include "core/kernels/adamw.h"
#include "parallel/grad_sync.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <fmt/format.h>

#include <cmath>

namespace moeforge {

namespace {

double all_reduce_sum(double value, Communicator& group) {
  if (group.size() == 1) return value;
  auto t = torch::full({1}, value, torch::kFloat64);  // host: a norm already read
  group.all_reduce(t, ReduceOp::sum);
  return t.item<double>();
}

}  // namespace

namespace {

class GradFinalHook : public torch::autograd::PostAccumulateGradHook {
 public:
  explicit GradFinalHook(std::function<void()> f) : f_(std::move(f)) {}
  void operator()(const torch::autograd::Variable&) override { f_(); }

 private:
  std::function<void()> f_;
};

}  // namespace

DataParallelAdamW::DataParallelAdamW(std::vector<TrainableParameter> params, const TrainingConfig& training,
                                     const ProcessGroups& groups, const ParallelConfig& parallel)
    : AdamW(std::move(params), training), groups_(groups), overlap_(parallel.overlap_comm) {
  if (groups_.dp->size() == 1) return;
  place_.resize(this->params().size());
  std::vector<int64_t> replicated_numels, expert_numels;
  for (size_t n = this->params().size(); n-- > 0;) {
    const auto& p = this->params()[n];
    auto& order = p.expert_parallel ? expert_ : replicated_;
    place_[n] = {p.expert_parallel, order.size()};
    order.push_back(n);
    (p.expert_parallel ? expert_numels : replicated_numels).push_back(p.param.numel());
  }
  const int64_t elements = parallel.ddp_bucket_size > 0 ? parallel.ddp_bucket_size : default_bucket_elements(groups_.dp->size());
  replicated_buckets_ = std::make_unique<GradBuckets>(replicated_numels, groups_.dp, ReduceOp::avg, elements, overlap_);
  // Each expert's gradient already holds the tokens that every EP rank sent it; summing over the
  // ranks holding the same experts covers the global batch once, which the mean divides by DP.
  expert_buckets_ = std::make_unique<GradBuckets>(expert_numels, groups_.edp, ReduceOp::sum, elements, overlap_);
  if (!overlap_) return;
  for (size_t i = 0; i < this->params().size(); ++i) {
    torch::autograd::impl::set_post_acc_grad_hooks(this->params()[i].param,
                                                   std::make_unique<GradFinalHook>([this, i] { grad_final(i); }));
  }
}

DataParallelAdamW::~DataParallelAdamW() {
  if (!overlap_ || place_.empty()) return;
  for (const auto& p : params()) torch::autograd::impl::set_post_acc_grad_hooks(p.param, nullptr);
}

void DataParallelAdamW::begin_last_backward() { armed_ = overlap_ && !place_.empty(); }

void DataParallelAdamW::grad_final(size_t i) {
  if (!armed_) return;
  accumulate_grad(i);  // into fp32 main_grad first (bf16), as after the other micro-batches
  const auto [expert, k] = place_[i];
  if (expert) {
    expert_buckets_->ready(k, [this](size_t j) { return grad(expert_[j]); });
  } else {
    replicated_buckets_->ready(k, [this](size_t j) { return grad(replicated_[j]); });
  }
}

void DataParallelAdamW::reduce_grads() {
  if (place_.empty()) return;
  armed_ = false;
  torch::NoGradGuard no_grad;
  replicated_buckets_->finish([this](size_t j) { return grad(replicated_[j]); });
  expert_buckets_->finish([this](size_t j) { return grad(expert_[j]); });
  for (size_t i : expert_) grad(i).div_(static_cast<double>(groups_.dp->size()));
}

double DataParallelAdamW::grad_norm() {
  // Replicated gradients are equal on every rank after the reduction; expert parameters are split
  // over the EP group, whose ranks each add theirs once.
  // Pipeline stages hold different parameters: their squares add up.
  const auto [replicated, expert] = grad_sq_norms();
  return std::sqrt(all_reduce_sum(replicated + all_reduce_sum(expert, *groups_.ep), *groups_.pp));
}

DistributedAdamW::DistributedAdamW(std::vector<TrainableParameter> params, const TrainingConfig& training,
                                   const ProcessGroups& groups)
    : params_(std::move(params)), groups_(groups), hyper_(training) {
  torch::NoGradGuard no_grad;
  for (const bool expert : {false, true}) {
    for (const bool decay : {true, false}) {
      Bucket b;
      b.group = expert ? groups_.edp : groups_.dp;
      b.decay = decay;
      int64_t numel = 0;
      for (size_t i = 0; i < params_.size(); ++i) {
        if (params_[i].expert_parallel != expert || params_[i].weight_decay != decay) continue;
        b.members.push_back(i);
        b.offsets.push_back(numel);
        numel += params_[i].param.numel();
        mixed_ = mixed_ || params_[i].param.scalar_type() != torch::kFloat32;
      }
      if (b.members.empty()) continue;
      const int64_t g = b.group->size();
      b.padded = (numel + g - 1) / g * g;
      b.shard = b.padded / g;
      const auto fp32_options = params_[b.members[0]].param.options().dtype(torch::kFloat32);
      b.main_grad = torch::zeros({b.padded}, fp32_options);
      b.master = flatten_params(b).narrow(0, b.group->rank() * b.shard, b.shard).clone();
      b.exp_avg = torch::zeros({b.shard}, fp32_options);
      b.exp_avg_sq = torch::zeros({b.shard}, fp32_options);
      const auto dtype = params_[b.members[0]].param.scalar_type();
      if (dtype == torch::kBFloat16) b.model_shard = b.master.to(dtype);
      buckets_.push_back(std::move(b));
    }
  }
}

torch::Tensor DistributedAdamW::flatten_params(const Bucket& b) const {
  auto flat = torch::zeros({b.padded}, params_[b.members[0]].param.options().dtype(torch::kFloat32));
  for (size_t j = 0; j < b.members.size(); ++j) {
    const auto& p = params_[b.members[j]].param;
    flat.narrow(0, b.offsets[j], p.numel()).copy_(p.detach().reshape({-1}));
  }
  return flat;
}

void DistributedAdamW::accumulate_grads() {
  torch::NoGradGuard no_grad;
  for (auto& b : buckets_) {
    for (size_t j = 0; j < b.members.size(); ++j) {
      auto& g = params_[b.members[j]].param.mutable_grad();
      if (!g.defined()) continue;
      b.main_grad.narrow(0, b.offsets[j], g.numel()).add_(g.reshape({-1}));  // cast as read: no fp32 temporary
      g = torch::Tensor();
    }
  }
}

void DistributedAdamW::reduce_grads() {
  torch::NoGradGuard no_grad;
  // Replicated: sum over DP / DP = the mean. Experts: sum over EDP / DP (see DataParallelAdamW).
  const double dp = static_cast<double>(groups_.dp->size());
  for (auto& b : buckets_) b.grad_shard = b.group->reduce_scatter(b.main_grad, ReduceOp::sum).div_(dp);
}

double DistributedAdamW::grad_norm() {
  // Every element of the model lies in exactly one shard across the DP group: replicated buckets
  // are split over DP, expert buckets over EDP within each EP rank's distinct experts.
  // The squares summed in fp64 a chunk at a time (never an fp64 copy of a whole shard: 13 GB for
  // a 3.76B-parameter stage), on the device, read once.
  constexpr int64_t kChunk = int64_t{1} << 24;
  torch::Tensor sq_t;
  for (const auto& b : buckets_) {
    for (int64_t at = 0; at < b.grad_shard.numel(); at += kChunk) {
      const auto part = b.grad_shard.narrow(0, at, std::min(kChunk, b.grad_shard.numel() - at)).to(torch::kFloat64).square().sum();
      sq_t = sq_t.defined() ? sq_t + part : part;
    }
  }
  const double sq = sq_t.defined() ? to_host(sq_t).item<double>() : 0.0;
  return std::sqrt(all_reduce_sum(all_reduce_sum(sq, *groups_.dp), *groups_.pp));
}

void DistributedAdamW::scale_grads(double factor) {
  for (auto& b : buckets_) b.grad_shard.mul_(factor);
}

void DistributedAdamW::gather_into_params(Bucket& b) {
  // In bf16 the shard the update rounded to the model's dtype: half the bytes of the fp32 master.
  const auto full = b.group->all_gather(b.model_shard.defined() ? b.model_shard : b.master);
  for (size_t j = 0; j < b.members.size(); ++j) {
    auto& p = params_[b.members[j]].param;
    p.detach().copy_(full.narrow(0, b.offsets[j], p.numel()).view(p.sizes()));
  }
}

void DistributedAdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  ++steps_;
  std::vector<kernels::AdamWTensors> shards;
  for (auto& b : buckets_) shards.push_back({b.master, b.grad_shard, b.exp_avg, b.exp_avg_sq, b.model_shard, b.decay});
  kernels::adamw_step(shards, kernels::AdamWHyper::of(hyper_, lr, steps_));
  for (auto& b : buckets_) gather_into_params(b);
  zero_grads();
}

void DistributedAdamW::zero_grads() {
  torch::NoGradGuard no_grad;
  for (auto& b : buckets_) {
    b.main_grad.zero_();
    b.grad_shard = torch::Tensor();
  }
  for (auto& p : params_) p.param.mutable_grad() = torch::Tensor();
}

NamedTensors DistributedAdamW::state() {
  NamedTensors out;
  for (auto& b : buckets_) {
    const auto exp_avg = b.group->all_gather(b.exp_avg);
    const auto exp_avg_sq = b.group->all_gather(b.exp_avg_sq);
    const auto master = mixed_ ? b.group->all_gather(b.master) : torch::Tensor();
    for (size_t j = 0; j < b.members.size(); ++j) {
      const auto& p = params_[b.members[j]];
      auto part = [&](const torch::Tensor& flat) { return flat.narrow(0, b.offsets[j], p.param.numel()).view(p.param.sizes()); };
      out.emplace_back("exp_avg." + p.name, part(exp_avg));
      out.emplace_back("exp_avg_sq." + p.name, part(exp_avg_sq));
      if (mixed_) out.emplace_back("master." + p.name, part(master));
    }
  }
  return out;
}

void DistributedAdamW::load_state(const StateLookup& lookup, const std::string& source, int64_t steps) {
  torch::NoGradGuard no_grad;
  std::vector<std::string> problems;
  for (auto& b : buckets_) {
    auto exp_avg = torch::zeros({b.padded}, b.master.options());
    auto exp_avg_sq = torch::zeros({b.padded}, b.master.options());
    auto master = flatten_params(b);
    for (size_t j = 0; j < b.members.size(); ++j) {
      const auto& p = params_[b.members[j]];
      auto restore = [&](const std::string& name, torch::Tensor& flat) {
        const auto t = lookup(name);
        if (!t) {
          problems.push_back(fmt::format("{} is missing", name));
        } else if (t->sizes() != p.param.sizes()) {
          problems.push_back(fmt::format("{} is [{}], the model needs [{}]", name, fmt::join(t->sizes(), ", "),
                                         fmt::join(p.param.sizes(), ", ")));
        } else {
          flat.narrow(0, b.offsets[j], p.param.numel()).copy_(t->reshape({-1}));
        }
      };
      restore("exp_avg." + p.name, exp_avg);
      restore("exp_avg_sq." + p.name, exp_avg_sq);
      if (mixed_) restore("master." + p.name, master);
    }
    const int64_t begin = b.group->rank() * b.shard;
    b.exp_avg.copy_(exp_avg.narrow(0, begin, b.shard));
    b.exp_avg_sq.copy_(exp_avg_sq.narrow(0, begin, b.shard));
    b.master.copy_(master.narrow(0, begin, b.shard));
  }
  report_state_problems(source, problems);
  // The model's weights from the fp32 masters (in bf16 they are more precise than the saved model).
  for (auto& b : buckets_) {
    if (!mixed_) continue;
    if (b.model_shard.defined()) b.model_shard.copy_(b.master);
    gather_into_params(b);
  }
  steps_ = steps;
}

std::unique_ptr<Optimizer> make_optimizer(std::vector<TrainableParameter> params, const TrainingConfig& training,
                                          const ProcessGroups& groups, const ParallelConfig& parallel) {
  if (parallel.use_distributed_optimizer) return std::make_unique<DistributedAdamW>(std::move(params), training, groups);
  return std::make_unique<DataParallelAdamW>(std::move(params), training, groups, parallel);
}

}  // namespace moeforge
