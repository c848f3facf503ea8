#include "parallel/comm/communicator.h"

#include "core/base/errors.h"

#include <algorithm>

namespace moeforge {

torch::Tensor LocalCommunicator::all_to_all(const torch::Tensor& tensor, const std::vector<int64_t>& send_rows,
                                            const std::vector<int64_t>& recv_rows) {
  if (send_rows.size() != 1 || recv_rows.size() != 1 || send_rows[0] != recv_rows[0] || send_rows[0] != tensor.size(0)) {
    throw std::invalid_argument("LocalCommunicator::all_to_all: a group of one sends all its rows to itself");
  }
  return tensor.clone();
}

void LocalCommunicator::broadcast(torch::Tensor&, int root) {
  if (root != 0) throw std::invalid_argument("LocalCommunicator::broadcast: root must be 0");
}

namespace {

// The sends of an exchange: complete when each of them is.
class WorkList : public Work {
 public:
  explicit WorkList(std::vector<std::shared_ptr<Work>> all) : all_(std::move(all)) {}
  void wait() override {
    for (auto& w : all_) w->wait();
  }
  bool is_completed() override {
    return std::all_of(all_.begin(), all_.end(), [](const auto& w) { return w->is_completed(); });
  }

 private:
  std::vector<std::shared_ptr<Work>> all_;
};

}  // namespace

std::shared_ptr<Work> Communicator::exchange(std::vector<PeerMessage>& messages, Transport transport) {
  std::vector<std::shared_ptr<Work>> sends;
  for (const auto& m : messages) {
    if (m.send) sends.push_back(send_async(m.tensor, m.peer, m.tag, transport));
  }
  for (auto& m : messages) {
    if (!m.send) recv(m.tensor, m.peer, m.tag, transport);
  }
  return std::make_shared<WorkList>(std::move(sends));
}

Transport transport_for(const torch::Device& device) { return device.is_cpu() ? Transport::host : Transport::device; }

void check_transport(const torch::Tensor& tensor, Transport transport, const char* operation, const std::string& group) {
  if (!tensor.defined() || tensor.device().is_cpu() == (transport == Transport::host)) return;
  throw std::invalid_argument(fmt::format(
      "{} on group {}: the call moves {} memory but the tensor is on {}; both ends of a message must use the same "
      "transport (see Note [Transport] in parallel/comm/communicator.h)",
      operation, group, transport == Transport::host ? "host" : "device", tensor.device().str()));
}

void LocalCommunicator::send(const torch::Tensor&, int peer, int, Transport) {
  throw std::invalid_argument(fmt::format("LocalCommunicator::send to {}: a group of one has no peer", peer));
}

void LocalCommunicator::recv(torch::Tensor&, int peer, int, Transport) {
  throw std::invalid_argument(fmt::format("LocalCommunicator::recv from {}: a group of one has no peer", peer));
}

}  // namespace moeforge
