#include "core/optim/optimizer.h"

#include "core/base/errors.h"
#include "core/device/host_sync.h"
#include "core/kernels/adamw.h"
#include "core/kernels/wgrad_accumulation.h"
#include "core/model/rule_updated.h"

#include <fmt/format.h>

#include <cmath>

namespace moeforge {

bool glob_match(std::string_view pattern, std::string_view text) {
  // Iterative wildcard matching with backtracking to the last `*`.
  size_t p = 0, t = 0, star = std::string_view::npos, mark = 0;
  while (t < text.size()) {
    if (p < pattern.size() && (pattern[p] == '?' || pattern[p] == text[t])) {
      ++p;
      ++t;
    } else if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = t;
    } else if (star != std::string_view::npos) {
      p = star + 1;
      t = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

std::string_view optimizer_state_parameter(std::string_view name) {
  for (std::string_view prefix : {"exp_avg_sq.", "exp_avg.", "master."}) {
    if (name.starts_with(prefix)) return name.substr(prefix.size());
  }
  return name;
}

std::vector<TrainableParameter> select_trainable(const std::vector<std::pair<std::string, torch::Tensor>>& named,
                                                 const TrainingConfig& t) {
  auto matches_any = [](const std::vector<std::string>& patterns, const std::string& name) {
    for (const auto& p : patterns) {
      if (glob_match(p, name)) return true;
    }
    return false;
  };
  auto check_used = [&](const std::vector<std::string>& patterns, const char* key) {
    for (const auto& p : patterns) {
      bool used = false;
      for (const auto& [name, param] : named) used = used || glob_match(p, name);
      if (!used) {
        fail_user("training.{}: pattern '{}' matches no parameter. Names look like '{}'; `*` matches any run of "
                  "characters (dots included), `?` one character.",
                  key, p, named.empty() ? std::string("?") : named.front().first);
      }
    }
  };
  check_used(t.trainable, "trainable");
  check_used(t.frozen, "frozen");
  std::vector<TrainableParameter> out;
  for (const auto& [name, param] : named) {
    if (is_rule_updated(name)) {  // updated by its rule, never by the optimizer
      param.set_requires_grad(false);
      continue;
    }
    const bool trains = (t.trainable.empty() || matches_any(t.trainable, name)) && !matches_any(t.frozen, name);
    param.set_requires_grad(trains);
    if (!trains) continue;
    const bool is_bias = name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    out.push_back({name, param, !(is_bias || param.dim() == 1)});
  }
  if (out.empty()) fail_user("training.trainable / training.frozen leave no parameter to train");
  return out;
}

int64_t Optimizer::num_trainable_elements() const {
  int64_t n = 0;
  for (const auto& p : params()) n += p.param.numel();
  return n;
}

void report_state_problems(const std::string& source, const std::vector<std::string>& problems) {
  if (problems.empty()) return;
  fail_user("{}: the optimizer state does not match the trainable parameters ({} problem{}):\n  - {}\nWas the "
            "checkpoint saved with other training.trainable / training.frozen settings or another model?",
            source, problems.size(), problems.size() > 1 ? "s" : "", fmt::join(problems, "\n  - "));
}

AdamW::AdamW(std::vector<TrainableParameter> params, const TrainingConfig& t) : params_(std::move(params)), hyper_(t) {
  torch::NoGradGuard no_grad;
  for (const auto& p : params_) {
    const auto fp32_options = p.param.options().dtype(torch::kFloat32);
    if (p.param.scalar_type() != torch::kFloat32) {
      master_.push_back(p.param.detach().to(torch::kFloat32).clone());
      main_grad_.push_back(torch::zeros(p.param.sizes(), fp32_options));
    } else {
      master_.emplace_back();
      main_grad_.emplace_back();
    }
    exp_avg_.push_back(torch::zeros(p.param.sizes(), fp32_options));
    exp_avg_sq_.push_back(torch::zeros(p.param.sizes(), fp32_options));
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    if (main_grad_[i].defined()) kernels::attach_main_grad(params_[i].param, main_grad_[i], [this, i] { grad_added(i); }, this);
  }
}

AdamW::~AdamW() {
  for (const auto& p : params_) kernels::detach_main_grad(p.param, this);
}

torch::Tensor& AdamW::grad(size_t i) {
  if (main_grad_[i].defined()) return main_grad_[i];
  auto& g = params_[i].param.mutable_grad();
  if (!g.defined()) g = torch::zeros_like(params_[i].param);  // a parameter the batch did not reach
  return g;
}

void AdamW::accumulate_grads() {
  for (size_t i = 0; i < params_.size(); ++i) accumulate_grad(i);
}

void AdamW::accumulate_grad(size_t i) {
  if (!main_grad_[i].defined()) return;  // fp32: .grad is the accumulator
  auto& g = params_[i].param.mutable_grad();
  if (!g.defined()) return;
  torch::NoGradGuard no_grad;
  main_grad_[i].add_(g);  // bf16 into fp32 as it is read: no fp32 temporary
  g = torch::Tensor();
}

GradSquares AdamW::grad_sq_norms() {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> norms[3];  // whole, split, expert (GradSquares' order)
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& p = params_[i];
    norms[p.expert_parallel ? 2 : p.tensor_parallel ? 1 : 0].push_back(grad(i).norm(2).to(torch::kFloat64));
  }
  const torch::Tensor* like = nullptr;
  for (const auto& kind : norms) {
    if (!kind.empty()) like = &kind.front();
  }
  if (!like) return {};
  std::vector<torch::Tensor> sums;
  for (const auto& kind : norms) sums.push_back(kind.empty() ? torch::zeros({}, like->options()) : torch::stack(kind).square().sum());
  const auto all = to_host(torch::stack(sums));  // one read for the three
  return {all[0].item<double>(), all[1].item<double>(), all[2].item<double>()};
}

double AdamW::grad_norm() {
  const GradSquares sq = grad_sq_norms();
  return std::sqrt(sq.whole + sq.split + sq.expert);
}

void Optimizer::clip_grads(double norm, double clip) {
  if (clip <= 0) return;
  const double coeff = clip / (norm + 1e-6);
  if (coeff < 1.0) scale_grads(coeff);
}

void AdamW::scale_grads(double factor) {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) grad(i).mul_(factor);
}

void AdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  ++steps_;
  // One pass per tensor: the fp32 master (or fp32 parameter) and, in bf16, the model's weight.
  std::vector<kernels::AdamWTensors> tensors;
  for (size_t i = 0; i < params_.size(); ++i) {
    const bool mixed = master_[i].defined();
    tensors.push_back({mixed ? master_[i] : params_[i].param.detach(), grad(i), exp_avg_[i], exp_avg_sq_[i],
                       mixed ? params_[i].param.detach() : torch::Tensor(), params_[i].weight_decay});
  }
  kernels::adamw_step(tensors, kernels::AdamWHyper::of(hyper_, lr, steps_));
  zero_grads();
}

void AdamW::zero_grads() {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (main_grad_[i].defined()) main_grad_[i].zero_();
    params_[i].param.mutable_grad() = torch::Tensor();
  }
}

NamedTensors AdamW::state() {
  NamedTensors out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out.emplace_back("exp_avg." + params_[i].name, exp_avg_[i]);
    out.emplace_back("exp_avg_sq." + params_[i].name, exp_avg_sq_[i]);
    if (master_[i].defined()) out.emplace_back("master." + params_[i].name, master_[i]);
  }
  return out;
}

void AdamW::load_state(const StateLookup& lookup, const std::string& source, int64_t steps) {
  torch::NoGradGuard no_grad;
  std::vector<std::string> problems;
  auto restore = [&](const std::string& name, torch::Tensor& into) {
    const auto t = lookup(name);
    if (!t) {
      problems.push_back(fmt::format("{} is missing", name));
    } else if (t->sizes() != into.sizes()) {
      problems.push_back(fmt::format("{} is [{}], the model needs [{}]", name, fmt::join(t->sizes(), ", "),
                                     fmt::join(into.sizes(), ", ")));
    } else {
      into.copy_(*t);
    }
  };
  for (size_t i = 0; i < params_.size(); ++i) {
    restore("exp_avg." + params_[i].name, exp_avg_[i]);
    restore("exp_avg_sq." + params_[i].name, exp_avg_sq_[i]);
    if (master_[i].defined()) {
      restore("master." + params_[i].name, master_[i]);
      params_[i].param.copy_(master_[i]);
    }
  }
  report_state_problems(source, problems);
  steps_ = steps;
}

}  // namespace moeforge
