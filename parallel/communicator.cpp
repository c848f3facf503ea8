#include "parallel/communicator.h"

#include "core/errors.h"

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

void LocalCommunicator::send(const torch::Tensor&, int peer, int) {
  throw std::invalid_argument(fmt::format("LocalCommunicator::send to {}: a group of one has no peer", peer));
}

void LocalCommunicator::recv(torch::Tensor&, int peer, int) {
  throw std::invalid_argument(fmt::format("LocalCommunicator::recv from {}: a group of one has no peer", peer));
}

}  // namespace moeforge
