#include "parallel/comm/mpi_communicator.h"

#include "parallel/comm/flight_recorder.h"
#include "parallel/comm/watchdog.h"
#include "parallel/comm/work.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <thread>

#include <unistd.h>

namespace moeforge {

namespace {

void check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) {
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(rc, text, &length);
    throw std::runtime_error(fmt::format("{} failed: {}", what, std::string(text, static_cast<size_t>(length))));
  }
}

void require_cpu_contiguous(const torch::Tensor& t, const char* operation) {
  if (!t.device().is_cpu() || !t.is_contiguous()) {
    throw std::invalid_argument(fmt::format("MpiCommunicator::{}: needs a contiguous CPU tensor", operation));
  }
}

// The MPI type of a reduction over `t`, which is never bf16/fp16 here (those reduce in fp32).
MPI_Datatype reduce_type(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return MPI_FLOAT;
    case torch::kFloat64: return MPI_DOUBLE;
    case torch::kInt64: return MPI_INT64_T;
    case torch::kInt32: return MPI_INT32_T;
    default: throw std::invalid_argument(fmt::format("MpiCommunicator: no reduction for dtype {}", c10::toString(t.scalar_type())));
  }
}

MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::max ? MPI_MAX : MPI_SUM; }

bool is_half(const torch::Tensor& t) { return t.scalar_type() == torch::kBFloat16 || t.scalar_type() == torch::kHalf; }

// A datatype of one dim-0 row's bytes, so counts are in rows (freed on scope exit).
class RowType {
 public:
  explicit RowType(const torch::Tensor& t) {
    // From the sizes, not numel / rows: a tensor of zero rows still has the row size its peers use.
    int64_t bytes = static_cast<int64_t>(t.element_size());
    for (int64_t d = 1; d < t.dim(); ++d) bytes *= t.size(d);
    if (bytes > INT_MAX) throw std::invalid_argument("MpiCommunicator: one row exceeds 2 GiB");
    check(MPI_Type_contiguous(static_cast<int>(std::max<int64_t>(bytes, 1)), MPI_BYTE, &type_), "MPI_Type_contiguous");
    check(MPI_Type_commit(&type_), "MPI_Type_commit");
  }
  ~RowType() { MPI_Type_free(&type_); }
  RowType(const RowType&) = delete;
  RowType& operator=(const RowType&) = delete;
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_{};
};

// What a record calls the dtype: c10's static name, so recording copies no string.
const char* dtype_of(const torch::Tensor& t) { return c10::toString(t.scalar_type()); }

// The attribute of an MPI communicator that points to its flight recorder (for the error handler,
// which MPI gives only the communicator).
int recorder_keyval() {
  static const int keyval = [] {
    int k = MPI_KEYVAL_INVALID;
    check(MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, MPI_COMM_NULL_DELETE_FN, &k, nullptr), "MPI_Comm_create_keyval");
    return k;
  }();
  return keyval;
}

// An error MPI reports on a group (a mismatched collective whose message is truncated, a peer's
// link that failed): Open MPI's default handler would end the job at once, naming nothing. This
// one names the call this thread issued last on the group, dumps the flight recorders, then ends
// the job as the default did.
void on_mpi_error(MPI_Comm* comm, int* code, ...) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(*code, text, &length);
  void* value = nullptr;
  int found = 0;
  MPI_Comm_get_attr(*comm, recorder_keyval(), &value, &found);
  std::string call = "a call";
  if (found && value != nullptr) {
    const auto& identity = *static_cast<const FlightRecorder*>(value)->identity();
    call = fmt::format("a call on group {} (world ranks [{}])", identity.group, fmt::join(identity.world_ranks, ", "));
    if (const auto in_flight = current_op(identity.group)) {
      call = fmt::format("{} ({}seq {} of group {}, world ranks [{}])", in_flight->op.op, in_flight->op.p2p ? "point-to-point " : "",
                         in_flight->op.seq, identity.group, fmt::join(identity.world_ranks, ", "));
    }
  }
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  const std::string message = fmt::format(
      "error: rank {} (host {}, pid {}): MPI error in {}: {}. The ranks issued different calls (every rank must make the "
      "same calls in the same order with the same shapes), or the network failed. Ending the job.",
      world_rank, host, ::getpid(), call, std::string(text, static_cast<size_t>(length)));
  std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
  if (const auto file = dump_flight_recorders(message); !file.empty()) {
    std::fprintf(stderr, "flight recorder: wrote %s (compare the ranks with `moeforge check hang RUN_DIR`)\n", file.c_str());
    std::fflush(stderr);
  }
  MPI_Abort(MPI_COMM_WORLD, 1);
}

MPI_Errhandler error_handler() {
  static const MPI_Errhandler handler = [] {
    MPI_Errhandler h{};
    check(MPI_Comm_create_errhandler(on_mpi_error, &h), "MPI_Comm_create_errhandler");
    return h;
  }();
  return handler;
}

int as_int(int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX) throw std::invalid_argument(fmt::format("MpiCommunicator: {} {} does not fit MPI's int", what, v));
  return static_cast<int>(v);
}

}  // namespace

bool MpiRuntime::launched() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_ID"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

MpiRuntime::MpiRuntime() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    // Multiple: the communication threads (parallel/comm/work.h) call MPI beside the compute thread.
    check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided), "MPI_Init_thread");
    initialized_here_ = true;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size_);
  MPI_Comm node;
  check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank_, MPI_INFO_NULL, &node), "MPI_Comm_split_type");
  MPI_Comm_rank(node, &local_rank_);
  MPI_Comm_size(node, &local_size_);
  MPI_Comm_free(&node);
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!initialized_here_ || finalized) return;
  // Unwinding from an error that not every rank hit: the others may be inside a collective, where
  // MPI_Finalize would wait for them forever. The error handler (run_train) reports it and aborts
  // the whole job instead.
  if (std::uncaught_exceptions() > 0 && world_size_ > 1) return;
  MPI_Finalize();
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name, double timeout_seconds, bool owned, bool async)
    : comm_(comm), name_(std::move(name)), timeout_seconds_(timeout_seconds), owned_(owned), max_chunk_(INT_MAX) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  world_ranks_.resize(static_cast<size_t>(size_));
  check(MPI_Allgather(&world_rank, 1, MPI_INT, world_ranks_.data(), 1, MPI_INT, comm_), "MPI_Allgather");
  // Every call this object issues is recorded (parallel/comm/flight_recorder.h); MPI's error
  // handler finds the recorder through an attribute of the communicator.
  FlightRecorder& recorder = attach_flight_recorder(this, GroupIdentity{name_, async ? "main" : "async", world_ranks_, rank_});
  check(MPI_Comm_set_attr(comm_, recorder_keyval(), &recorder), "MPI_Comm_set_attr");
  check(MPI_Comm_set_errhandler(comm_, error_handler()), "MPI_Comm_set_errhandler");
  int level = MPI_THREAD_SINGLE;
  MPI_Query_thread(&level);
  if (async && size_ > 1 && level >= MPI_THREAD_MULTIPLE) {
    // The asynchronous calls' own communicator: their order on it is the submission order, which
    // every rank shares; blocking calls on comm_ can then never interleave with them.
    MPI_Comm dup;
    check(MPI_Comm_dup(comm_, &dup), "MPI_Comm_dup");
    async_peer_.reset(new MpiCommunicator(dup, name_, timeout_seconds_, true, false));
    comm_thread_ = std::make_unique<CommThread>();
  }
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::world(double timeout_seconds) {
  auto world = std::unique_ptr<MpiCommunicator>(new MpiCommunicator(MPI_COMM_WORLD, "world", timeout_seconds, false, true));
  // Every rank's host name, once, for the timeout messages and the hang dumps.
  constexpr int kHostChars = 256;
  char host[kHostChars] = {};
  ::gethostname(host, kHostChars - 1);
  std::vector<char> all(static_cast<size_t>(world->size_) * kHostChars);
  check(MPI_Allgather(host, kHostChars, MPI_CHAR, all.data(), kHostChars, MPI_CHAR, MPI_COMM_WORLD), "MPI_Allgather");
  std::vector<std::string> hosts;
  for (int r = 0; r < world->size_; ++r) hosts.emplace_back(all.data() + static_cast<size_t>(r) * kHostChars);
  set_world_hosts(std::move(hosts), world->world_ranks_[static_cast<size_t>(world->rank_)]);
  return world;
}

MpiCommunicator::~MpiCommunicator() {
  comm_thread_.reset();  // runs what was submitted, on async_peer_'s communicator
  async_peer_.reset();
  int finalized = 0;
  MPI_Finalized(&finalized);
  // MPI_COMM_WORLD outlives this object: its errors go back to MPI's default, its attribute away.
  if (!finalized && !owned_) {
    MPI_Comm_delete_attr(comm_, recorder_keyval());
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_ARE_FATAL);
  }
  if (owned_ && !finalized) MPI_Comm_free(&comm_);
  detach_flight_recorder(this);
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::split(int color, int key, const std::string& name) const {
  MPI_Comm sub;
  check(MPI_Comm_split(comm_, color, key, &sub), "MPI_Comm_split");
  return std::unique_ptr<MpiCommunicator>(new MpiCommunicator(sub, name, timeout_seconds_, true, true));
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::group_of(const std::vector<int64_t>& members, const std::string& name) const {
  const int me = world_ranks_[static_cast<size_t>(rank_)];
  int position = -1;
  for (size_t i = 0; i < members.size(); ++i) {
    if (members[i] == me) position = static_cast<int>(i);
  }
  if (position < 0) throw std::invalid_argument(fmt::format("group_of({}): world rank {} is not a member", name, me));
  // The smallest member names the group; its position orders it.
  int color = INT_MAX;
  for (auto m : members) color = std::min(color, static_cast<int>(m));
  return split(color, position, name);
}

void MpiCommunicator::wait(MPI_Request& request, const char* operation) const {
  std::vector<MPI_Request> one{request};
  wait_all(one, operation);
  request = one[0];
}

void MpiCommunicator::wait_all(std::vector<MPI_Request>& requests, const char* operation) const {
  const CommInFlight in_flight;
  const ExposedWait exposed;  // counted on the compute thread only
  const Watched watched(operation, name_, world_ranks_, timeout_seconds_);  // the watchdog ends a hung wait
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  while (true) {
    int done = 0;
    check(MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done, MPI_STATUSES_IGNORE), operation);
    if (done) return;
    // Non-blocking collectives advance only while they are polled (each round of a multi-round
    // algorithm waits for a test), so the compute thread, which has nothing else to do, polls
    // without sleeping, yielding the core to other ranks. A communication thread shares its core
    // with the compute it overlaps: it polls every 50 us, leaving that core to the compute thread
    // in between, unless the compute thread is waiting for communication too. A wait that has
    // lasted a second (a slow or hung peer) backs off to 1 ms polls.
    if (on_comm_thread() && !compute_waiting() && Clock::now() - start < std::chrono::seconds(1)) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    } else if (Clock::now() - start < std::chrono::seconds(1)) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
}

void MpiCommunicator::all_reduce(torch::Tensor& tensor, ReduceOp op) {
  require_cpu_contiguous(tensor, "all_reduce");
  if (is_half(tensor)) {
    auto fp32 = tensor.to(torch::kFloat32);
    all_reduce(fp32, op);
    tensor.copy_(fp32);
    return;
  }
  if (op == ReduceOp::avg && !tensor.is_floating_point()) throw std::invalid_argument("MpiCommunicator: avg of integers");
  const MPI_Datatype type = reduce_type(tensor);
  flight_recorder_of(this)->record("all_reduce", dtype_of(tensor), tensor.numel());
  auto* base = static_cast<char*>(tensor.data_ptr());
  const int64_t n = tensor.numel();
  for (int64_t at = 0; at < n; at += max_chunk_) {
    const int64_t count = std::min(max_chunk_, n - at);
    MPI_Request request;
    check(MPI_Iallreduce(MPI_IN_PLACE, base + at * tensor.element_size(), static_cast<int>(count), type, mpi_op(op), comm_,
                         &request),
          "MPI_Iallreduce");
    wait(request, "all_reduce");
  }
  if (op == ReduceOp::avg) tensor.div_(size_);
}

std::shared_ptr<Work> MpiCommunicator::all_reduce_async(torch::Tensor tensor, ReduceOp op) {
  if (!comm_thread_) return Communicator::all_reduce_async(std::move(tensor), op);
  require_cpu_contiguous(tensor, "all_reduce_async");  // here: a misuse fails in the caller's thread
  MpiCommunicator* peer = async_peer_.get();
  return comm_thread_->submit([peer, tensor, op]() mutable { peer->all_reduce(tensor, op); });
}

torch::Tensor MpiCommunicator::all_gather(const torch::Tensor& tensor) {
  require_cpu_contiguous(tensor, "all_gather");
  auto sizes = tensor.sizes().vec();
  if (sizes.empty()) sizes = {1};
  const int64_t rows = sizes[0];
  sizes[0] = rows * size_;
  auto out = torch::empty(sizes, tensor.options());
  const RowType row(tensor.dim() == 0 ? tensor.reshape({1}) : tensor);
  flight_recorder_of(this)->record("all_gather", dtype_of(tensor), tensor.numel());
  MPI_Request request;
  check(MPI_Iallgather(tensor.data_ptr(), as_int(rows, "rows"), row.get(), out.data_ptr(), as_int(rows, "rows"), row.get(),
                       comm_, &request),
        "MPI_Iallgather");
  wait(request, "all_gather");
  return out;
}

std::shared_ptr<Work> MpiCommunicator::all_gather_async(const torch::Tensor& tensor, torch::Tensor& out) {
  if (!comm_thread_) return Communicator::all_gather_async(tensor, out);
  require_cpu_contiguous(tensor, "all_gather_async");
  auto sizes = tensor.sizes().vec();
  if (sizes.empty()) sizes = {1};
  sizes[0] *= size_;
  out = torch::empty(sizes, tensor.options());
  MpiCommunicator* peer = async_peer_.get();
  // The communication thread's result copied into `out`: a copy of what the caller receives, cheap
  // beside the transfer, and the same code as the blocking call.
  return comm_thread_->submit([peer, tensor, out]() mutable { out.copy_(peer->all_gather(tensor)); });
}

std::shared_ptr<Work> MpiCommunicator::reduce_scatter_async(const torch::Tensor& tensor, torch::Tensor& out, ReduceOp op) {
  if (!comm_thread_) return Communicator::reduce_scatter_async(tensor, out, op);
  check_reduce_scatter(tensor);
  auto sizes = tensor.sizes().vec();
  sizes[0] /= size_;
  out = torch::empty(sizes, tensor.options());
  MpiCommunicator* peer = async_peer_.get();
  return comm_thread_->submit([peer, tensor, out, op]() mutable { out.copy_(peer->reduce_scatter(tensor, op)); });
}

void MpiCommunicator::check_reduce_scatter(const torch::Tensor& tensor) const {
  require_cpu_contiguous(tensor, "reduce_scatter");
  if (tensor.dim() == 0 || tensor.size(0) % size_ != 0) {
    throw std::invalid_argument(fmt::format("MpiCommunicator::reduce_scatter: dim 0 must divide by the group size {}", size_));
  }
}

torch::Tensor MpiCommunicator::reduce_scatter(const torch::Tensor& tensor, ReduceOp op) {
  check_reduce_scatter(tensor);
  if (is_half(tensor)) return reduce_scatter(tensor.to(torch::kFloat32), op).to(tensor.scalar_type());
  if (op == ReduceOp::avg && !tensor.is_floating_point()) throw std::invalid_argument("MpiCommunicator: avg of integers");
  const int64_t count = tensor.numel() / size_;
  auto sizes = tensor.sizes().vec();
  sizes[0] /= size_;
  if (count > max_chunk_) {
    // Beyond one message: a chunked reduction of everything, then this rank's part.
    auto full = tensor.clone();
    all_reduce(full, op);
    return full.chunk(size_, 0)[static_cast<size_t>(rank_)].clone();
  }
  auto out = torch::empty(sizes, tensor.options());
  flight_recorder_of(this)->record("reduce_scatter", dtype_of(tensor), tensor.numel());
  MPI_Request request;
  check(MPI_Ireduce_scatter_block(tensor.data_ptr(), out.data_ptr(), static_cast<int>(count), reduce_type(tensor), mpi_op(op),
                                  comm_, &request),
        "MPI_Ireduce_scatter_block");
  wait(request, "reduce_scatter");
  if (op == ReduceOp::avg) out.div_(size_);
  return out;
}

torch::Tensor MpiCommunicator::all_to_all_output(const torch::Tensor& tensor, const std::vector<int64_t>& send_rows,
                                                 const std::vector<int64_t>& recv_rows) const {
  require_cpu_contiguous(tensor, "all_to_all");
  if (send_rows.size() != static_cast<size_t>(size_) || recv_rows.size() != static_cast<size_t>(size_)) {
    throw std::invalid_argument("MpiCommunicator::all_to_all: one send and one receive count per rank");
  }
  int64_t send_total = 0, recv_total = 0;
  for (int p = 0; p < size_; ++p) {
    send_total += send_rows[static_cast<size_t>(p)];
    recv_total += recv_rows[static_cast<size_t>(p)];
  }
  if (send_total != tensor.size(0)) {
    throw std::invalid_argument(fmt::format("MpiCommunicator::all_to_all: send counts sum to {}, the tensor has {} rows",
                                            send_total, tensor.size(0)));
  }
  auto sizes = tensor.sizes().vec();
  sizes[0] = recv_total;
  return torch::empty(sizes, tensor.options());
}

void MpiCommunicator::all_to_all_into(const torch::Tensor& tensor, torch::Tensor& out, const std::vector<int64_t>& send_rows,
                                      const std::vector<int64_t>& recv_rows) {
  std::vector<int> send_counts, send_displs, recv_counts, recv_displs;
  int64_t send_total = 0, recv_total = 0;
  for (int p = 0; p < size_; ++p) {
    send_counts.push_back(as_int(send_rows[static_cast<size_t>(p)], "send rows"));
    send_displs.push_back(as_int(send_total, "send offset"));
    send_total += send_rows[static_cast<size_t>(p)];
    recv_counts.push_back(as_int(recv_rows[static_cast<size_t>(p)], "receive rows"));
    recv_displs.push_back(as_int(recv_total, "receive offset"));
    recv_total += recv_rows[static_cast<size_t>(p)];
  }
  const RowType row(tensor);
  flight_recorder_of(this)->record("all_to_all", dtype_of(tensor), tensor.numel());
  MPI_Request request;
  check(MPI_Ialltoallv(tensor.data_ptr(), send_counts.data(), send_displs.data(), row.get(), out.data_ptr(),
                       recv_counts.data(), recv_displs.data(), row.get(), comm_, &request),
        "MPI_Ialltoallv");
  wait(request, "all_to_all");
}

torch::Tensor MpiCommunicator::all_to_all(const torch::Tensor& tensor, const std::vector<int64_t>& send_rows,
                                          const std::vector<int64_t>& recv_rows) {
  auto out = all_to_all_output(tensor, send_rows, recv_rows);
  all_to_all_into(tensor, out, send_rows, recv_rows);
  return out;
}

std::shared_ptr<Work> MpiCommunicator::all_to_all_async(const torch::Tensor& tensor, torch::Tensor& out,
                                                        const std::vector<int64_t>& send_rows,
                                                        const std::vector<int64_t>& recv_rows) {
  if (!comm_thread_) return Communicator::all_to_all_async(tensor, out, send_rows, recv_rows);
  out = all_to_all_output(tensor, send_rows, recv_rows);
  MpiCommunicator* peer = async_peer_.get();
  return comm_thread_->submit(
      [peer, tensor, out, send_rows, recv_rows]() mutable { peer->all_to_all_into(tensor, out, send_rows, recv_rows); });
}

template <typename Post>
void MpiCommunicator::for_each_part(const torch::Tensor& tensor, Post&& post) const {
  auto* base = static_cast<char*>(tensor.data_ptr());
  const int64_t bytes = tensor.numel() * static_cast<int64_t>(tensor.element_size());
  const int64_t part = std::min<int64_t>(max_chunk_ * static_cast<int64_t>(tensor.element_size()), INT_MAX);
  for (int64_t at = 0; at < bytes; at += part) post(base + at, static_cast<int>(std::min(part, bytes - at)));
}

void MpiCommunicator::broadcast(torch::Tensor& tensor, int root) {
  require_cpu_contiguous(tensor, "broadcast");
  flight_recorder_of(this)->record("broadcast", dtype_of(tensor), tensor.numel(), root);
  for_each_part(tensor, [&](char* at, int bytes) {
    MPI_Request request;
    check(MPI_Ibcast(at, bytes, MPI_BYTE, root, comm_, &request), "MPI_Ibcast");
    wait(request, "broadcast");
  });
}

std::vector<MPI_Request> MpiCommunicator::post_send(const torch::Tensor& tensor, int peer, int tag, Transport transport,
                                                   const char* operation) {
  check_transport(tensor, transport, operation, name_);
  require_cpu_contiguous(tensor, operation);
  flight_recorder_of(this)->record(operation, dtype_of(tensor), tensor.numel(), peer, /*p2p=*/true);
  std::vector<MPI_Request> requests;
  for_each_part(tensor, [&](char* at, int bytes) {
    requests.emplace_back();
    check(MPI_Isend(at, bytes, MPI_BYTE, peer, tag, comm_, &requests.back()), "MPI_Isend");
  });
  return requests;
}

void MpiCommunicator::send(const torch::Tensor& tensor, int peer, int tag, Transport transport) {
  auto requests = post_send(tensor, peer, tag, transport, "send");
  wait_all(requests, "send");
}

class MpiCommunicator::RequestWork : public Work {
 public:
  // Watched from posting: a send nobody takes ends the job even before anyone waits for it.
  RequestWork(const MpiCommunicator& group, std::vector<MPI_Request> requests, torch::Tensor tensor)
      : group_(group),
        requests_(std::move(requests)),
        tensor_(std::move(tensor)),
        watched_(std::make_unique<Watched>("send", group.name_, group.world_ranks_, group.timeout_seconds_)) {}
  // MPI may still read the buffer: a handle dropped unwaited completes first.
  ~RequestWork() override {
    try {
      wait();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: an asynchronous send on group %s failed: %s\n", group_.name_.c_str(), e.what());
    }
  }
  void wait() override {
    if (requests_.empty()) return;
    group_.wait_all(requests_, "send");
    release();
  }
  bool is_completed() override {
    if (requests_.empty()) return true;
    int done = 0;
    check(MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &done, MPI_STATUSES_IGNORE), "send");
    if (done) release();
    return done != 0;
  }

 private:
  void release() {
    requests_.clear();
    tensor_ = torch::Tensor();
    watched_.reset();
  }
  const MpiCommunicator& group_;
  std::vector<MPI_Request> requests_;
  torch::Tensor tensor_;
  std::unique_ptr<Watched> watched_;
};

std::shared_ptr<Work> MpiCommunicator::send_async(const torch::Tensor& tensor, int peer, int tag, Transport transport) {
  return std::make_shared<RequestWork>(*this, post_send(tensor, peer, tag, transport, "send_async"), tensor);
}

void MpiCommunicator::recv(torch::Tensor& tensor, int peer, int tag, Transport transport) {
  check_transport(tensor, transport, "recv", name_);
  require_cpu_contiguous(tensor, "recv");
  flight_recorder_of(this)->record("recv", dtype_of(tensor), tensor.numel(), peer, /*p2p=*/true);
  std::vector<MPI_Request> requests;
  for_each_part(tensor, [&](char* at, int bytes) {
    requests.emplace_back();
    check(MPI_Irecv(at, bytes, MPI_BYTE, peer, tag, comm_, &requests.back()), "MPI_Irecv");
  });
  wait_all(requests, "recv");
}

void MpiCommunicator::send_recv(const torch::Tensor& send, int send_peer, torch::Tensor& recv, int recv_peer, int tag,
                                Transport transport) {
  check_transport(send, transport, "send_recv", name_);
  check_transport(recv, transport, "send_recv", name_);
  require_cpu_contiguous(send, "send_recv");
  require_cpu_contiguous(recv, "send_recv");
  flight_recorder_of(this)->record("send_recv", dtype_of(send), send.numel(), send_peer, /*p2p=*/true);
  std::vector<MPI_Request> requests;
  for_each_part(recv, [&](char* at, int bytes) {
    requests.emplace_back();
    check(MPI_Irecv(at, bytes, MPI_BYTE, recv_peer, tag, comm_, &requests.back()), "MPI_Irecv");
  });
  for_each_part(send, [&](char* at, int bytes) {
    requests.emplace_back();
    check(MPI_Isend(at, bytes, MPI_BYTE, send_peer, tag, comm_, &requests.back()), "MPI_Isend");
  });
  wait_all(requests, "send_recv");
}

void MpiCommunicator::barrier() {
  flight_recorder_of(this)->record("barrier", "none", 0);
  MPI_Request request;
  check(MPI_Ibarrier(comm_, &request), "MPI_Ibarrier");
  wait(request, "barrier");
}

void MpiCommunicator::slow_barrier(const SlowWait& bound) {
  flight_recorder_of(this)->record("barrier", "none", 0);
  MPI_Request request;
  check(MPI_Ibarrier(comm_, &request), "MPI_Ibarrier");
  const Watched watched(bound.what, name_, world_ranks_, bound.timeout_s, {}, bound.setting);
  // Minutes of waiting: polled every 10 ms, leaving the core to the ranks that write.
  while (true) {
    int done = 0;
    check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), bound.what);
    if (done) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace moeforge
