#include "core/optimizer.h"

#include "core/errors.h"

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
    const bool trains = (t.trainable.empty() || matches_any(t.trainable, name)) && !matches_any(t.frozen, name);
    param.set_requires_grad(trains);
    if (!trains) continue;
    const bool is_bias = name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    out.push_back({name, param, !(is_bias || param.dim() == 1)});
  }
  if (out.empty()) fail_user("training.trainable / training.frozen leave no parameter to train");
  return out;
}

AdamW::AdamW(std::vector<TrainableParameter> params, const TrainingConfig& t)
    : params_(std::move(params)),
      beta1_(t.adam_beta1),
      beta2_(t.adam_beta2),
      eps_(t.adam_eps),
      weight_decay_(t.weight_decay) {
  torch::NoGradGuard no_grad;
  for (const auto& p : params_) {
    const auto fp32 = p.param.options().dtype(torch::kFloat32);
    if (p.param.scalar_type() != torch::kFloat32) {
      master_.push_back(p.param.detach().to(torch::kFloat32).clone());
      main_grad_.push_back(torch::zeros(p.param.sizes(), fp32));
    } else {
      master_.emplace_back();
      main_grad_.emplace_back();
    }
    exp_avg_.push_back(torch::zeros(p.param.sizes(), fp32));
    exp_avg_sq_.push_back(torch::zeros(p.param.sizes(), fp32));
  }
}

torch::Tensor& AdamW::grad(size_t i) {
  if (main_grad_[i].defined()) return main_grad_[i];
  auto& g = params_[i].param.mutable_grad();
  if (!g.defined()) g = torch::zeros_like(params_[i].param);  // a parameter the batch did not reach
  return g;
}

void AdamW::accumulate_grads() {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!main_grad_[i].defined()) continue;
    auto& g = params_[i].param.mutable_grad();
    if (!g.defined()) continue;
    main_grad_[i].add_(g.to(torch::kFloat32));
    g = torch::Tensor();
  }
}

std::vector<torch::Tensor> AdamW::gradients() {
  std::vector<torch::Tensor> out;
  for (size_t i = 0; i < params_.size(); ++i) out.push_back(grad(i));
  return out;
}

double AdamW::grad_norm() const {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> norms;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& g = main_grad_[i].defined() ? main_grad_[i] : params_[i].param.grad();
    if (g.defined()) norms.push_back(g.norm(2).to(torch::kFloat32));
  }
  if (norms.empty()) return 0.0;
  return torch::stack(norms).norm(2).item<double>();
}

void AdamW::clip_grads(double norm, double clip) {
  if (clip <= 0) return;
  const double coeff = clip / (norm + 1e-6);
  if (coeff >= 1.0) return;
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) grad(i).mul_(coeff);
}

void AdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  ++steps_;
  const double bias1 = 1.0 - std::pow(beta1_, static_cast<double>(steps_));
  const double bias2_sqrt = std::sqrt(1.0 - std::pow(beta2_, static_cast<double>(steps_)));
  for (size_t i = 0; i < params_.size(); ++i) {
    auto& g = grad(i);
    auto& w = master_[i].defined() ? master_[i] : params_[i].param;
    // Same order of operations as torch.optim.AdamW (single-tensor path).
    if (params_[i].weight_decay && weight_decay_ > 0) w.mul_(1.0 - lr * weight_decay_);
    exp_avg_[i].lerp_(g, 1.0 - beta1_);
    exp_avg_sq_[i].mul_(beta2_).addcmul_(g, g, 1.0 - beta2_);
    const auto denom = (exp_avg_sq_[i].sqrt() / bias2_sqrt).add_(eps_);
    w.addcdiv_(exp_avg_[i], denom, -lr / bias1);
    if (master_[i].defined()) params_[i].param.copy_(w);
  }
  zero_grads();
}

void AdamW::zero_grads() {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (main_grad_[i].defined()) main_grad_[i].zero_();
    params_[i].param.mutable_grad() = torch::Tensor();
  }
}

int64_t AdamW::num_trainable_elements() const {
  int64_t n = 0;
  for (const auto& p : params_) n += p.param.numel();
  return n;
}

NamedTensors AdamW::state() const {
  NamedTensors out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out.emplace_back("exp_avg." + params_[i].name, exp_avg_[i]);
    out.emplace_back("exp_avg_sq." + params_[i].name, exp_avg_sq_[i]);
    if (master_[i].defined()) out.emplace_back("master." + params_[i].name, master_[i]);
  }
  return out;
}

void AdamW::load_state(const SafetensorsFile& file, int64_t steps) {
  torch::NoGradGuard no_grad;
  std::vector<std::string> problems;
  auto restore = [&](const std::string& name, torch::Tensor& into) {
    if (!file.contains(name)) {
      problems.push_back(fmt::format("{} is missing", name));
      return;
    }
    const auto& shape = file.info(name).shape;
    if (c10::IntArrayRef(shape) != into.sizes()) {
      problems.push_back(fmt::format("{} is [{}], the model needs [{}]", name, fmt::join(shape, ", "), fmt::join(into.sizes(), ", ")));
      return;
    }
    into.copy_(file.tensor(name, torch::kFloat32));
  };
  for (size_t i = 0; i < params_.size(); ++i) {
    restore("exp_avg." + params_[i].name, exp_avg_[i]);
    restore("exp_avg_sq." + params_[i].name, exp_avg_sq_[i]);
    if (master_[i].defined()) {
      restore("master." + params_[i].name, master_[i]);
      params_[i].param.copy_(master_[i]);
    }
  }
  if (!problems.empty()) {
    fail_user("{}: the optimizer state does not match the trainable parameters ({} problem{}):\n  - {}\nWas the "
              "checkpoint saved with other training.trainable / training.frozen settings or another model?",
              file.path(), problems.size(), problems.size() > 1 ? "s" : "", fmt::join(problems, "\n  - "));
  }
  steps_ = steps;
}

}  // namespace moeforge
