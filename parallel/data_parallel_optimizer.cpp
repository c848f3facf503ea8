#include "parallel/data_parallel_optimizer.h"

#include "core/device/host_sync.h"
#include "core/kernels/adamw.h"
#include "core/kernels/wgrad_accumulation.h"
#include "parallel/grad_sync.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <fmt/format.h>

#include <cmath>
#include <utility>

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
    : AdamW(std::move(params), training), groups_(groups), overlap_(parallel.overlap_comm), last_(this->params().size()) {
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
  replicated_buckets_ = std::make_unique<GradBuckets>(replicated_numels, groups_.dp, ReduceOp::avg, elements, overlap_,
                                                      [this](size_t j) { return grad(replicated_[j]); });
  // Each expert's gradient already holds the tokens that every EP rank sent it; summing over the
  // ranks holding the same experts covers the global batch once, which the mean divides by DP.
  expert_buckets_ = std::make_unique<GradBuckets>(expert_numels, groups_.edp, ReduceOp::sum, elements, overlap_,
                                                  [this](size_t j) { return grad(expert_[j]); });
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

void DataParallelAdamW::begin_last_backward(const std::vector<size_t>& params) {
  if (overlap_ && !place_.empty()) last_.arm(params);
}

void DataParallelAdamW::grad_final(size_t i) {
  if (!last_.take(i)) return;
  accumulate_grad(i);  // into fp32 main_grad first (bf16), as after the other micro-batches
  const auto [expert, k] = place_[i];
  (expert ? expert_buckets_ : replicated_buckets_)->ready(k);
}

void DataParallelAdamW::reduce_grads() {
  torch::NoGradGuard no_grad;
  if (!place_.empty()) {
    last_.reset();
    replicated_buckets_->finish();
    expert_buckets_->finish();
    for (size_t i : expert_) grad(i).div_(static_cast<double>(groups_.dp->size()));
  }
  // Sequence parallelism: each TP rank holds the gradient of its chunk of the sequence.
  std::vector<torch::Tensor> partial;
  for (size_t i = 0; i < params().size(); ++i) {
    if (params()[i].sequence_parallel) partial.push_back(grad(i));
  }
  all_reduce_packed(partial, *groups_.tp);
}

double DataParallelAdamW::grad_norm() {
  // Replicated gradients are equal on every DP rank after the reduction; expert parameters are
  // split over the EP group, whose ranks each add theirs once. Tensor-parallel ranks add their
  // parts of split parameters; a parameter whole on each of them counts on TP rank 0 only.
  // Pipeline stages hold different parameters: their squares add up.
  const GradSquares sq = grad_sq_norms();
  const double whole = groups_.tp->rank() == 0 ? sq.whole : 0.0;
  const double tensor_parallel = all_reduce_sum(whole + sq.split + all_reduce_sum(sq.expert, *groups_.ep), *groups_.tp);
  return std::sqrt(all_reduce_sum(tensor_parallel, *groups_.pp));
}

DistributedAdamW::DistributedAdamW(std::vector<TrainableParameter> params, const TrainingConfig& training,
                                   const ProcessGroups& groups, const ParallelConfig& parallel)
    : params_(std::move(params)), groups_(groups), hyper_(training), overlap_(parallel.overlap_comm), last_(params_.size()) {
  torch::NoGradGuard no_grad;
  const int64_t elements = parallel.ddp_bucket_size > 0 ? parallel.ddp_bucket_size : default_bucket_elements(groups_.dp->size());
  place_.resize(params_.size());
  std::vector<std::pair<size_t, size_t>> replicated_ranges, expert_ranges;
  for (const bool expert : {false, true}) {
    if (expert) expert_begin_ = buckets_.size();
    // Backward order: reverse model order.
    std::vector<size_t> order;
    std::vector<int64_t> numels;
    for (size_t n = params_.size(); n-- > 0;) {
      if (params_[n].expert_parallel != expert) continue;
      place_[n].order = order.size();
      order.push_back(n);
      numels.push_back(params_[n].param.numel());
    }
    auto ranges = bucket_ranges(numels, elements);
    for (const auto& [first, end] : ranges) {
      Bucket bucket;
      bucket.group = expert ? groups_.edp : groups_.dp;
      int64_t numel = 0;
      for (size_t k = first; k < end; ++k) {
        const size_t i = order[k];
        place_[i].bucket = buckets_.size();
        place_[i].member = bucket.members.size();
        bucket.members.push_back(i);
        bucket.offsets.push_back(numel);
        numel += params_[i].param.numel();
        mixed_ = mixed_ || params_[i].param.scalar_type() != torch::kFloat32;
      }
      const int64_t g = bucket.group->size();
      bucket.padded = (numel + g - 1) / g * g;
      bucket.shard = bucket.padded / g;
      // This rank's shard cut into runs of equal weight decay (the padding decays nothing).
      const int64_t begin = bucket.group->rank() * bucket.shard, end_at = begin + bucket.shard;
      auto add_run = [&](int64_t from, int64_t to, bool decay) {
        if (to <= from) return;
        auto& runs = bucket.runs;
        if (!runs.empty() && std::get<2>(runs.back()) == decay) {
          std::get<1>(runs.back()) += to - from;
        } else {
          runs.emplace_back(from - begin, to - from, decay);
        }
      };
      for (size_t j = 0; j < bucket.members.size(); ++j) {
        const int64_t from = bucket.offsets[j], to = from + params_[bucket.members[j]].param.numel();
        add_run(std::max(from, begin), std::min(to, end_at), params_[bucket.members[j]].weight_decay);
      }
      add_run(std::max(numel, begin), end_at, false);
      // The shard's runs of the members with `flag` set: {begin in the shard, length}.
      auto runs_of = [&](bool TrainableParameter::*flag) {
        std::vector<std::pair<int64_t, int64_t>> out;
        for (size_t j = 0; j < bucket.members.size(); ++j) {
          const auto& p = params_[bucket.members[j]];
          const int64_t from = std::max(bucket.offsets[j], begin), to = std::min(bucket.offsets[j] + p.param.numel(), end_at);
          if (p.*flag && to > from) out.emplace_back(from - begin, to - from);
        }
        return out;
      };
      // The shard's elements this rank adds to the norm: all on TP rank 0, only parameters split
      // over the tensor-parallel ranks on the others.
      bucket.norm_runs = groups_.tp->rank() == 0 ? std::vector<std::pair<int64_t, int64_t>>{{0, bucket.shard}}
                                                 : runs_of(&TrainableParameter::tensor_parallel);
      bucket.sequence_parallel_runs = runs_of(&TrainableParameter::sequence_parallel);
      const auto fp32_options = params_[bucket.members[0]].param.options().dtype(torch::kFloat32);
      bucket.main_grad = torch::zeros({bucket.padded}, fp32_options);
      bucket.master = flatten_params(bucket).narrow(0, begin, bucket.shard).clone();
      bucket.exp_avg = torch::zeros({bucket.shard}, fp32_options);
      bucket.exp_avg_sq = torch::zeros({bucket.shard}, fp32_options);
      const auto dtype = params_[bucket.members[0]].param.scalar_type();
      if (dtype == torch::kBFloat16) bucket.model_shard = bucket.master.to(dtype);
      buckets_.push_back(std::move(bucket));
    }
    // The schedules number their buckets from 0 within each kind.
    (expert ? expert_ranges : replicated_ranges) = std::move(ranges);
  }
  replicated_schedule_ = std::make_unique<BucketSchedule>(replicated_ranges, [this](size_t b) { return start_reduce(buckets_[b]); });
  expert_schedule_ = std::make_unique<BucketSchedule>(
      expert_ranges, [this](size_t b) { return start_reduce(buckets_[expert_begin_ + b]); });
  // The fused weight gradients of bf16 parameters accumulate in their places in the flat buffers.
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& p = params_[i].param;
    if (p.scalar_type() != torch::kBFloat16) continue;
    const auto& b = buckets_[place_[i].bucket];
    kernels::attach_main_grad(p, b.main_grad.narrow(0, b.offsets[place_[i].member], p.numel()).view(p.sizes()),
                              [this, i] { grad_final(i); }, this);
  }
  if (!overlap_) return;
  for (size_t i = 0; i < params_.size(); ++i) {
    torch::autograd::impl::set_post_acc_grad_hooks(params_[i].param, std::make_unique<GradFinalHook>([this, i] { grad_final(i); }));
  }
}

DistributedAdamW::~DistributedAdamW() {
  for (const auto& p : params_) kernels::detach_main_grad(p.param, this);
  if (!overlap_) return;
  for (const auto& p : params_) torch::autograd::impl::set_post_acc_grad_hooks(p.param, nullptr);
}

void DistributedAdamW::begin_last_backward(const std::vector<size_t>& params) {
  if (overlap_) last_.arm(params);
}

void DistributedAdamW::grad_final(size_t i) {
  if (!last_.take(i)) return;
  accumulate_grad(i);
  (params_[i].expert_parallel ? expert_schedule_ : replicated_schedule_)->ready(place_[i].order);
}

std::shared_ptr<Work> DistributedAdamW::start_reduce(Bucket& b) {
  if (overlap_) return b.group->reduce_scatter_async(b.main_grad, b.grad_shard, ReduceOp::sum);
  b.grad_shard = b.group->reduce_scatter(b.main_grad, ReduceOp::sum);
  return completed_work();
}

torch::Tensor DistributedAdamW::flatten_params(const Bucket& b) const {
  auto flat = torch::zeros({b.padded}, params_[b.members[0]].param.options().dtype(torch::kFloat32));
  for (size_t j = 0; j < b.members.size(); ++j) {
    const auto& p = params_[b.members[j]].param;
    flat.narrow(0, b.offsets[j], p.numel()).copy_(p.detach().reshape({-1}));
  }
  return flat;
}

void DistributedAdamW::accumulate_grad(size_t i) {
  torch::NoGradGuard no_grad;
  auto& g = params_[i].param.mutable_grad();
  if (!g.defined()) return;
  Bucket& bucket = buckets_[place_[i].bucket];
  bucket.main_grad.narrow(0, bucket.offsets[place_[i].member], g.numel()).add_(g.reshape({-1}));  // cast as read: no fp32 temporary
  g = torch::Tensor();
}

void DistributedAdamW::accumulate_grads() {
  for (size_t i = 0; i < params_.size(); ++i) accumulate_grad(i);
}

void DistributedAdamW::reduce_grads() {
  torch::NoGradGuard no_grad;
  last_.reset();
  replicated_schedule_->finish();
  expert_schedule_->finish();
  // Replicated: sum over DP / DP = the mean. Experts: sum over EDP / DP (see DataParallelAdamW).
  const double dp = static_cast<double>(groups_.dp->size());
  for (auto& b : buckets_) b.grad_shard.div_(dp);
  // Sequence parallelism: each TP rank holds the gradient of its chunk of the sequence. TP peers
  // lay their buckets out alike (the same parameters, the same shapes), so their shards match.
  std::vector<torch::Tensor> partial;
  for (auto& b : buckets_) {
    for (const auto& [first, length] : b.sequence_parallel_runs) partial.push_back(b.grad_shard.narrow(0, first, length));
  }
  all_reduce_packed(partial, *groups_.tp);
}

double DistributedAdamW::grad_norm() {
  // Every element of the model lies in exactly one shard across the DP group: replicated buckets
  // are split over DP, expert buckets over EDP within each EP rank's distinct experts.
  // The squares summed in fp64 a chunk at a time (never an fp64 copy of a whole shard: 13 GB for
  // a 3.76B-parameter stage), on the device, read once.
  constexpr int64_t kChunk = int64_t{1} << 24;
  torch::Tensor sq_t;
  for (const auto& b : buckets_) {
    for (const auto& [first, length] : b.norm_runs) {
      for (int64_t at = 0; at < length; at += kChunk) {
        const auto part = b.grad_shard.narrow(0, first + at, std::min(kChunk, length - at)).to(torch::kFloat64).square().sum();
        sq_t = sq_t.defined() ? sq_t + part : part;
      }
    }
  }
  const double sq = sq_t.defined() ? to_host(sq_t).item<double>() : 0.0;
  // Then over the tensor-parallel ranks (their parts of split parameters) and the stages.
  return std::sqrt(all_reduce_sum(all_reduce_sum(all_reduce_sum(sq, *groups_.dp), *groups_.tp), *groups_.pp));
}

void DistributedAdamW::scale_grads(double factor) {
  for (auto& b : buckets_) b.grad_shard.mul_(factor);
}

std::shared_ptr<Work> DistributedAdamW::start_gather(Bucket& b) {
  // In bf16 the shard the update rounded to the model's dtype: half the bytes of the fp32 master.
  const auto& shard = b.model_shard.defined() ? b.model_shard : b.master;
  if (overlap_) return b.group->all_gather_async(shard, b.gathered);
  b.gathered = b.group->all_gather(shard);
  return completed_work();
}

void DistributedAdamW::copy_gathered(Bucket& b) {
  for (size_t j = 0; j < b.members.size(); ++j) {
    auto& p = params_[b.members[j]].param;
    p.detach().copy_(b.gathered.narrow(0, b.offsets[j], p.numel()).view(p.sizes()));
  }
  b.gathered = torch::Tensor();
}

void DistributedAdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  ++steps_;
  const auto hyper = kernels::AdamWHyper::of(hyper_, lr, steps_);
  // Bucket by bucket, each one's all-gather in flight while the next ones update.
  std::vector<std::shared_ptr<Work>> gathers;
  for (auto& b : buckets_) {
    std::vector<kernels::AdamWTensors> runs;
    for (const auto& [at, length, decay] : b.runs) {
      auto part = [&, at = at, length = length](const torch::Tensor& t) {
        return t.defined() ? t.narrow(0, at, length) : torch::Tensor();
      };
      runs.push_back({part(b.master), part(b.grad_shard), part(b.exp_avg), part(b.exp_avg_sq), part(b.model_shard), decay});
    }
    kernels::adamw_step(runs, hyper);
    gathers.push_back(start_gather(b));
  }
  for (size_t k = 0; k < buckets_.size(); ++k) {
    gathers[k]->wait();
    copy_gathered(buckets_[k]);
  }
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
  // Through the host, one shard at a time: each is read back and all-gathered in host memory
  // (the group's MPI path), so a save adds nothing to the device's memory. Gathered on the device,
  // every bucket's whole state stayed there until the save ended: more than a GPU holds for the
  // mission model.
  NamedTensors out;
  auto gathered = [](Bucket& b, const torch::Tensor& shard) { return b.group->all_gather(to_host(shard)); };
  for (auto& b : buckets_) {
    const auto exp_avg = gathered(b, b.exp_avg);
    const auto exp_avg_sq = gathered(b, b.exp_avg_sq);
    const auto master = mixed_ ? gathered(b, b.master) : torch::Tensor();
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
    start_gather(b)->wait();
    copy_gathered(b);
  }
  steps_ = steps;
}

std::unique_ptr<Optimizer> make_optimizer(std::vector<TrainableParameter> params, const TrainingConfig& training,
                                          const ProcessGroups& groups, const ParallelConfig& parallel) {
  if (parallel.use_distributed_optimizer) return std::make_unique<DistributedAdamW>(std::move(params), training, groups, parallel);
  return std::make_unique<DataParallelAdamW>(std::move(params), training, groups, parallel);
}

}  // namespace moeforge
