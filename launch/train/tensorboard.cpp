#include "launch/train/tensorboard.h"

#include "core/files/durable_file.h"
#include "core/base/errors.h"
#include "launch/train/metrics.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cerrno>
#include <cstring>
#include <filesystem>

#if MOEFORGE_WITH_TENSORBOARD
#include "launch/train/tensorboard_event.pb.h"

#include <boost/crc.hpp>
#include <fcntl.h>
#include <unistd.h>
#endif

namespace moeforge {

const std::vector<TensorBoardTag> kTensorBoardTags = {
    {"lm loss", metric::kLmLoss},
    // Megatron's MoE tags, each present when the run logs it (metrics.h says when).
    {metric::kLoadBalancingLoss, metric::kLoadBalancingLoss},
    {metric::kSeqLoadBalancingLoss, metric::kSeqLoadBalancingLoss},
    {metric::kGlobalLoadBalancingLoss, metric::kGlobalLoadBalancingLoss},
    {"z_loss", metric::kZLoss},
    {"aux_loss", metric::kAuxLoss},  // moeforge's: the sum over MoE layers (metrics.h)
    {"total loss", metric::kLoss},
    {"learning-rate", metric::kLr},
    {"grad-norm", metric::kGradNorm},
    {"skipped-iterations", metric::kSkippedIterations},
    {"consumed-samples", metric::kConsumedSamples},
    {"iteration-time", metric::kStepTime},
    {"throughput", metric::kTflops},  // Megatron: TFLOP/s per GPU
    {"throughput-6n", metric::kTflops6N},
    {"tokens-per-second-per-device", metric::kTokensPerSecond},
    {"mfu", metric::kMfu},
    {"mfu-6n", metric::kMfu6N},
    {"host-syncs", metric::kHostSyncs},
    {"mem-max-allocated-bytes", metric::kPeakMemoryAllocated},
    {"mem-max-reserved-bytes", metric::kPeakMemoryReserved},
    {"host-max-resident-bytes", metric::kPeakMemory},
    {"expert-load-max-over-mean", metric::kExpertLoadMaxOverMean},
    {"ep-tokens-received-max-over-mean", metric::kEpTokensReceivedMaxOverMean},
    {"lm loss validation", metric::kValidLmLoss},
    {"lm loss validation ppl", metric::kValidPpl},
};

std::vector<std::pair<std::string, double>> tensorboard_scalars(const nlohmann::json& line) {
  std::vector<std::pair<std::string, double>> out;
  for (const auto& [tag, key] : kTensorBoardTags) {
    const auto it = line.find(key);
    if (it != line.end() && it->is_number()) out.emplace_back(tag, it->get<double>());
  }
  if (const auto it = line.find(metric::kExpertLoadPerLayer); it != line.end() && it->is_array()) {
    for (size_t l = 0; l < it->size(); ++l) {
      out.emplace_back(fmt::format("moe/expert_load_max_over_mean_layer_{}", l), (*it)[l].get<double>());
    }
  }
  return out;
}

#if MOEFORGE_WITH_TENSORBOARD

namespace {

double unix_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string little_endian(uint64_t value, int bytes) {
  std::string out(static_cast<size_t>(bytes), '\0');
  for (int i = 0; i < bytes; ++i) out[static_cast<size_t>(i)] = static_cast<char>((value >> (8 * i)) & 0xFF);
  return out;
}

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "localhost";
  return name;
}

}  // namespace

void check_tensorboard_build(const std::string&) {}

uint32_t masked_crc32c(std::string_view bytes) {
  // CRC-32C: polynomial 0x1EDC6F41 (Castagnoli), reflected, initial and final XOR all ones.
  boost::crc_optimal<32, 0x1EDC6F41, 0xFFFFFFFF, 0xFFFFFFFF, true, true> crc;
  crc.process_bytes(bytes.data(), bytes.size());
  const uint32_t c = crc.checksum();
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;  // TFRecord's mask
}

std::string tfrecord_record(std::string_view payload) {
  const std::string length = little_endian(payload.size(), 8);
  return length + little_endian(masked_crc32c(length), 4) + std::string(payload) +
         little_endian(masked_crc32c(payload), 4);
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir, int64_t first_step) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) fail_user("logging.tensorboard_dir {}: cannot create it: {}. Choose a writable directory.", dir, ec.message());
  path_ = (std::filesystem::path(dir) /
           fmt::format("events.out.tfevents.{}.{}.{}", static_cast<int64_t>(unix_seconds()), host_name(), ::getpid()))
              .string();
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_APPEND, 0644);
  if (fd_ < 0) fail_user("logging.tensorboard_dir: cannot create {}: {}. Choose a writable directory.", path_, std::strerror(errno));
  tensorboard::Event version;
  version.set_wall_time(unix_seconds());
  version.set_file_version("brain.Event:2");
  tensorboard::Event start;
  start.set_wall_time(unix_seconds());
  start.set_step(first_step);
  start.mutable_session_log()->set_status(tensorboard::SessionLog::START);
  if (!write(version.SerializeAsString()) || !write(start.SerializeAsString())) {
    fail_user("logging.tensorboard_dir: cannot write {}: {}. Free space there or choose another directory.", path_,
              errno != 0 ? std::strerror(errno) : "no bytes written");
  }
}

TensorBoardWriter::~TensorBoardWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void TensorBoardWriter::add_scalars(int64_t step, const std::vector<std::pair<std::string, double>>& scalars) {
  if (fd_ < 0) return;
  tensorboard::Event event;
  event.set_wall_time(unix_seconds());
  event.set_step(step);
  auto* summary = event.mutable_summary();
  for (const auto& [tag, value] : scalars) {
    auto* v = summary->add_value();
    v->set_tag(tag);
    v->set_simple_value(static_cast<float>(value));
  }
  if (write(event.SerializeAsString())) return;
  spdlog::warn("cannot write {}: {}; no further TensorBoard events this run (metrics.jsonl has every step)", path_,
               errno != 0 ? std::strerror(errno) : "no bytes written");
  ::close(fd_);
  fd_ = -1;
}

bool TensorBoardWriter::write(const std::string& event) {
  const std::string record = tfrecord_record(event);
  const size_t written = write_fully(fd_, record);
  if (written == record.size()) {
    whole_bytes_ += static_cast<int64_t>(record.size());
    return true;
  }
  // A cut record at the end (a full disk) reads as a damaged file: back to the last whole one.
  const int saved = errno;
  if (written > 0 && ::ftruncate(fd_, static_cast<off_t>(whole_bytes_)) != 0) {
    spdlog::warn("{}: cannot cut the partly written record off ({}); TensorBoard may warn about the file's end", path_,
                 std::strerror(errno));
  }
  errno = saved;
  return false;
}

#else  // built without protobuf or Boost

void check_tensorboard_build(const std::string& dir) {
  fail_user("logging.tensorboard_dir is {} but this build writes no TensorBoard files (protobuf or Boost was missing "
            "when it was configured; see the TensorBoard line of the CMake summary). Install libprotobuf-dev, "
            "protobuf-compiler and libboost-dev (launch/setup.sh does) and rebuild, or leave the key empty.",
            dir);
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir, int64_t) { check_tensorboard_build(dir); }

TensorBoardWriter::~TensorBoardWriter() = default;

void TensorBoardWriter::add_scalars(int64_t, const std::vector<std::pair<std::string, double>>&) {}

bool TensorBoardWriter::write(const std::string&) { return false; }

#endif

}  // namespace moeforge
