// The pipeline schedules (parallel/layout/pipeline_schedule.h), every rank's action list replayed together:
// each slot runs forward then backward once, in micro-batch order per chunk; what a rank sends
// to a peer is, message by message, what the peer expects to receive from it (the order NCCL
// pairs them by); and with messages that complete only when both ends have posted them (the
// strictest transport), every step ends: no schedule can deadlock.
#include "parallel/layout/pipeline_schedule.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <map>
#include <set>
#include <string>
#include <vector>

using namespace moeforge;

namespace {

using Kind = PipelineMessage::Kind;
using Key = std::pair<int64_t, int64_t>;  // (chunk, micro-batch)

struct Replay {
  std::vector<std::string> errors;
  std::vector<int64_t> peak_in_flight;
};

// Replays every rank of (S stages, V chunks, M micro-batches) and lists what went wrong.
Replay replay(int64_t S, int64_t V, int64_t M, bool forward_only) {
  Replay out;
  auto fail = [&](std::string e) { out.errors.push_back(fmt::format("S={} V={} M={} fwd-only={}: {}", S, V, M, forward_only, e)); };
  std::vector<std::vector<PipelineAction>> ranks;
  for (int64_t r = 0; r < S; ++r) ranks.push_back(pipeline_schedule(S, r, V, M, forward_only));
  const auto next = [&](int64_t r) { return (r + 1) % S; };
  const auto prev = [&](int64_t r) { return (r + S - 1) % S; };
  // Where a message goes or comes from, and the slot it has on the other end.
  struct Message {
    int64_t action;
    Kind kind;
    Key slot;  // on the receiving rank
  };
  std::map<std::pair<int64_t, int64_t>, std::vector<Message>> sent, received;  // (from, to)
  for (int64_t r = 0; r < S; ++r) {
    for (size_t a = 0; a < ranks[r].size(); ++a) {
      for (const auto& m : ranks[r][a].messages) {
        const int64_t v = m.slot.chunk * S + r;  // the virtual stage on this rank
        const bool activation = m.kind == Kind::activation;
        if (m.send) {
          const int64_t to = activation ? next(r) : prev(r);
          const int64_t w = activation ? v + 1 : v - 1;
          if (w < 0 || w >= S * V) fail(fmt::format("rank {} sends past the model's ends", r));
          sent[{r, to}].push_back({static_cast<int64_t>(a), m.kind, {w / S, m.slot.micro_batch}});
        } else {
          const int64_t from = activation ? prev(r) : next(r);
          received[{from, r}].push_back({static_cast<int64_t>(a), m.kind, {m.slot.chunk, m.slot.micro_batch}});
        }
      }
    }
  }
  // Pairing by order: the k-th message from a to b is the k-th b receives from a.
  for (const auto& [pair, sends] : sent) {
    const auto& recvs = received[pair];
    if (sends.size() != recvs.size()) {
      fail(fmt::format("rank {} sends {} messages to rank {}, which receives {}", pair.first, sends.size(), pair.second,
                       recvs.size()));
      continue;
    }
    for (size_t k = 0; k < sends.size(); ++k) {
      if (sends[k].kind != recvs[k].kind || sends[k].slot != recvs[k].slot) {
        fail(fmt::format("message {} from rank {} to {} does not match the receive", k, pair.first, pair.second));
      }
    }
  }
  for (const auto& [pair, recvs] : received) {
    if (!sent.contains(pair) && !recvs.empty()) fail(fmt::format("rank {} receives from {}, which sends nothing", pair.second, pair.first));
  }
  if (!out.errors.empty()) return out;
  // Each exchange waits for the exchanges of its peers that hold its messages' other ends.
  std::map<std::pair<int64_t, size_t>, std::vector<std::pair<int64_t, int64_t>>> needs;  // -> (peer, peer action)
  for (const auto& [pair, sends] : sent) {
    const auto& recvs = received[pair];
    for (size_t k = 0; k < sends.size(); ++k) {
      needs[{pair.first, static_cast<size_t>(sends[k].action)}].push_back({pair.second, recvs[k].action});
      needs[{pair.second, static_cast<size_t>(recvs[k].action)}].push_back({pair.first, sends[k].action});
    }
  }
  std::vector<size_t> at(static_cast<size_t>(S), 0);
  std::vector<std::set<Key>> activations(static_cast<size_t>(S)), gradients(static_cast<size_t>(S)), forwarded(static_cast<size_t>(S)),
      backwarded(static_cast<size_t>(S));
  std::vector<std::vector<int64_t>> next_forward(static_cast<size_t>(S), std::vector<int64_t>(static_cast<size_t>(V), 0)),
      next_backward = next_forward;
  std::vector<int64_t> in_flight(static_cast<size_t>(S), 0);
  out.peak_in_flight.assign(static_cast<size_t>(S), 0);
  for (bool progress = true; progress;) {
    progress = false;
    for (int64_t r = 0; r < S; ++r) {
      const auto ur = static_cast<size_t>(r);
      while (at[ur] < ranks[ur].size()) {
        const auto& a = ranks[ur][at[ur]];
        const Key key{a.slot.chunk, a.slot.micro_batch};
        const int64_t v = a.slot.chunk * S + r;
        if (a.kind == PipelineAction::Kind::forward) {
          if (v > 0 && !activations[ur].erase(key)) fail(fmt::format("rank {} forward {}/{} before its input arrived", r, key.first, key.second));
          if (!forwarded[ur].insert(key).second) fail("a forward runs twice");
          if (key.second != next_forward[ur][static_cast<size_t>(key.first)]++) fail("forwards out of micro-batch order");
          out.peak_in_flight[ur] = std::max(out.peak_in_flight[ur], ++in_flight[ur]);
        } else if (a.kind == PipelineAction::Kind::backward) {
          if (!forwarded[ur].contains(key)) fail("a backward before its forward");
          if (v < S * V - 1 && !gradients[ur].erase(key)) fail(fmt::format("rank {} backward {}/{} before its gradient arrived", r, key.first, key.second));
          if (!backwarded[ur].insert(key).second) fail("a backward runs twice");
          if (key.second != next_backward[ur][static_cast<size_t>(key.first)]++) fail("backwards out of micro-batch order");
          --in_flight[ur];
        } else {
          bool ready = true;
          for (const auto& [peer, action] : needs[{r, at[ur]}]) ready = ready && static_cast<int64_t>(at[static_cast<size_t>(peer)]) >= action;
          if (!ready) break;
          for (const auto& m : a.messages) {
            if (!m.send) (m.kind == Kind::activation ? activations : gradients)[ur].insert({m.slot.chunk, m.slot.micro_batch});
          }
        }
        ++at[ur];
        progress = true;
        if (!out.errors.empty()) return out;
      }
    }
  }
  for (int64_t r = 0; r < S; ++r) {
    const auto ur = static_cast<size_t>(r);
    if (at[ur] < ranks[ur].size()) fail(fmt::format("deadlock: rank {} stuck at action {} of {}", r, at[ur], ranks[ur].size()));
    if (static_cast<int64_t>(forwarded[ur].size()) != V * M) fail(fmt::format("rank {} ran {} forwards", r, forwarded[ur].size()));
    if (!forward_only && static_cast<int64_t>(backwarded[ur].size()) != V * M) fail(fmt::format("rank {} ran {} backwards", r, backwarded[ur].size()));
    if (!activations[ur].empty() || !gradients[ur].empty()) fail(fmt::format("rank {} received tensors it never used", r));
  }
  return out;
}

}  // namespace

TEST_CASE("1F1B: every rank's list pairs with its neighbours', never deadlocks, and holds S - s in flight", "[pipeline]") {
  for (int64_t S = 1; S <= 5; ++S) {
    for (int64_t M = 1; M <= 2 * S + 1; ++M) {
      for (const bool forward_only : {false, true}) {
        const Replay r = replay(S, 1, M, forward_only);
        INFO(fmt::format("S={} M={}", S, M));
        CHECK(r.errors == std::vector<std::string>{});
        if (!forward_only && r.errors.empty()) {
          for (int64_t s = 0; s < S; ++s) CHECK(r.peak_in_flight[static_cast<size_t>(s)] == std::min(S - s, M));
        }
      }
    }
  }
}

TEST_CASE("interleaved 1F1B: pairs by order around the ring, never deadlocks, Megatron's warm-up in flight",
          "[pipeline]") {
  for (int64_t S = 2; S <= 5; ++S) {
    for (int64_t V = 2; V <= 4; ++V) {
      for (int64_t M = S; M <= 3 * S; M += S) {
        for (const bool forward_only : {false, true}) {
          const Replay r = replay(S, V, M, forward_only);
          INFO(fmt::format("S={} V={} M={}", S, V, M));
          CHECK(r.errors == std::vector<std::string>{});
          if (forward_only || !r.errors.empty()) continue;
          for (int64_t s = 0; s < S; ++s) {
            // Warm-up (S - s - 1) x 2 + (V - 1) x S forwards, then one more before the first backward;
            // all M x V when M = S.
            const int64_t warmup = M == S ? M * V : std::min((S - s - 1) * 2 + (V - 1) * S, M * V);
            CHECK(r.peak_in_flight[static_cast<size_t>(s)] == std::min(warmup + 1, M * V));
          }
        }
      }
    }
  }
}

TEST_CASE("peak_in_flight counts forwards whose backward is still to come", "[pipeline]") {
  CHECK(peak_in_flight(pipeline_schedule(4, 0, 1, 8, false)) == 4);
  CHECK(peak_in_flight(pipeline_schedule(4, 3, 1, 8, false)) == 1);
  CHECK(peak_in_flight(pipeline_schedule(1, 0, 1, 8, false)) == 1);
  CHECK_THROWS_AS(pipeline_schedule(2, 0, 2, 3, false), std::invalid_argument);  // 3 is not a multiple of 2
}
