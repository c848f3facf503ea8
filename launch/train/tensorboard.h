// defines: TensorBoardWriter, tensorboard_scalars, kTensorBoardTags, masked_crc32c, tfrecord_record
//
// TensorBoard event files (logging.tensorboard_dir, Megatron's --tensorboard-dir), written by rank 0
// into `<dir>/events.out.tfevents.<unix seconds>.<host>.<pid>`: TensorBoard's TFRecord framing of
// Event messages (launch/train/tensorboard_event.proto, encoded by protobuf):
//
//   uint64 length | uint32 masked CRC-32C of the length bytes | Event | uint32 masked CRC-32C of it
//
// (little-endian; CRC-32C with the Castagnoli polynomial by Boost.CRC, masked as TFRecord does).
// Each record is one write(2): a live TensorBoard sees a step as soon as it is logged, and a killed
// run leaves whole records only. Builds without protobuf or Boost have no writer: a config that
// sets logging.tensorboard_dir is then refused at start-up, saying what to install.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moeforge {

// TensorBoard tag -> metrics.jsonl key of every scalar of the step line, with Megatron's tag where
// it has one (docs/training.md lists them).
struct TensorBoardTag {
  const char* tag;
  const char* metric_key;
};
extern const std::vector<TensorBoardTag> kTensorBoardTags;

// The scalars of one metrics.jsonl line, by tag: kTensorBoardTags' keys present in it, plus one
// `moe/expert_load_max_over_mean_layer_<i>` per MoE layer.
std::vector<std::pair<std::string, double>> tensorboard_scalars(const nlohmann::json& line);

uint32_t masked_crc32c(std::string_view bytes);
std::string tfrecord_record(std::string_view payload);  // the framing above around `payload`

// UserError, saying what to install, when this build has no writer; `dir` is the config's value.
void check_tensorboard_build(const std::string& dir);

class TensorBoardWriter {
 public:
  // Creates `dir` and a new event file in it holding the file version and a session start at
  // `first_step`: TensorBoard then drops the steps >= first_step that an earlier, interrupted run
  // wrote into the directory (a resumed run logs them again). UserError naming the directory when
  // it cannot be made or written, or when this build has no writer.
  TensorBoardWriter(const std::string& dir, int64_t first_step);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // One event at `step` holding these scalars (as fp32: TensorBoard's simple_value). A failed write
  // is a warning naming the file, after which the file is left as it is: metrics.jsonl stays the
  // record and the run goes on.
  void add_scalars(int64_t step, const std::vector<std::pair<std::string, double>>& scalars);
  const std::string& path() const { return path_; }

 private:
  bool write(const std::string& event);
  std::string path_;
  int fd_ = -1;
  int64_t whole_bytes_ = 0;  // the file's length in whole records
};

}  // namespace moeforge
