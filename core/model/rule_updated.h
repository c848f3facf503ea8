// defines: is_rule_updated
//
// Parameters no optimizer trains: state that a rule updates after every step (the router's
// `expert_bias`, moe/router.h). They take no gradient (select_trainable leaves them out), start at
// zero and stay in fp32 in every precision (materialize, the router's `to`, checkpoints): a bf16
// bias near 0.5 has a spacing of 4e-3 and would not move by 1e-3 steps.
#pragma once

#include <string_view>

namespace moeforge {

inline bool is_rule_updated(std::string_view name) { return name == "expert_bias" || name.ends_with(".expert_bias"); }

}  // namespace moeforge
