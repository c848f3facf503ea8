#include "data/tokenizer/bpe_model.h"

#include "core/base/errors.h"
#include "data/tokenizer/unicode_text.h"

#include <algorithm>
#include <functional>
#include <mutex>
#include <optional>

namespace moeforge::data {
namespace {

// Code point -> byte for the byte-level alphabet, -1 for code points outside it.
const std::vector<int>& alphabet_bytes() {
  static const std::vector<int> bytes = [] {
    const auto& alphabet = unicode::byte_level_alphabet();
    std::vector<int> table(512, -1);  // the alphabet ends below U+0200
    for (int b = 0; b < 256; ++b) table[alphabet[static_cast<size_t>(b)]] = b;
    return table;
  }();
  return bytes;
}

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// The bytes a token of the byte-level alphabet stands for; nothing for a token with other characters.
std::optional<std::string> alphabet_to_bytes(std::string_view token) {
  const auto& bytes = alphabet_bytes();
  std::string out;
  out.reserve(token.size());
  for (size_t pos = 0; pos < token.size();) {
    const char32_t cp = unicode::next_code_point(token, pos);
    if (cp >= bytes.size() || bytes[cp] < 0) return std::nullopt;
    out += static_cast<char>(bytes[cp]);
  }
  return out;
}

}  // namespace

std::string byte_level_decode(std::string_view token) {
  return alphabet_to_bytes(token).value_or(std::string(token));
}

// Word -> ids for words up to kMaxWordBytes, in independently locked shards. A thread that finds
// its shard locked by another skips the cache rather than wait (the word is merged afresh), so
// many threads encoding at once never queue on it. A full shard is emptied and refilled: the
// frequent words come back at once, and the memory stays bounded.
class BpeModel::WordCache {
 public:
  static constexpr size_t kMaxWordBytes = 256;

  bool find(std::string_view word, size_t hash, std::vector<int32_t>& out) const {
    const Shard& shard = shards_[hash % kShards];
    const std::unique_lock lock(shard.mutex, std::try_to_lock);
    if (!lock.owns_lock()) return false;
    const auto it = shard.map.find(Key{word, hash});
    if (it == shard.map.end()) return false;
    out.insert(out.end(), it->second.begin(), it->second.end());
    return true;
  }

  void insert(std::string_view word, size_t hash, std::vector<int32_t> ids) {
    Shard& shard = shards_[hash % kShards];
    const std::unique_lock lock(shard.mutex, std::try_to_lock);
    if (!lock.owns_lock()) return;
    if (shard.map.size() >= kShardCapacity) shard.map.clear();
    shard.map.emplace(word, std::move(ids));
  }

 private:
  static constexpr size_t kShards = 64;
  static constexpr size_t kShardCapacity = 4096;
  // Lookups carry the hash already computed for choosing the shard, so it is computed once.
  struct Key {
    std::string_view text;
    size_t hash;
  };
  struct Hash {
    using is_transparent = void;
    size_t operator()(const std::string& s) const { return std::hash<std::string_view>{}(s); }
    size_t operator()(const Key& k) const { return k.hash; }
  };
  struct Equal {
    using is_transparent = void;
    bool operator()(const std::string& a, const std::string& b) const { return a == b; }
    bool operator()(const Key& a, const std::string& b) const { return a.text == b; }
    bool operator()(const std::string& a, const Key& b) const { return a == b.text; }
  };
  struct alignas(64) Shard {  // one cache line per lock: threads on different shards share none
    mutable std::mutex mutex;
    std::unordered_map<std::string, std::vector<int32_t>, Hash, Equal> map;
  };
  std::array<Shard, kShards> shards_;
};

BpeModel::BpeModel(const TokenizerSpec& spec)
    : fuse_unk_(spec.fuse_unk), ignore_merges_(spec.ignore_merges), cache_(std::make_unique<WordCache>()) {
  std::unordered_map<std::string, int32_t> vocab;
  vocab.reserve(spec.vocab.size());
  for (const auto& [token, id] : spec.vocab) vocab.emplace(token, id);

  byte_ids_.fill(-1);
  const auto& alphabet = unicode::byte_level_alphabet();
  for (size_t b = 0; b < 256; ++b) {
    std::string token;
    unicode::append_utf8(token, alphabet[b]);
    if (const auto it = vocab.find(token); it != vocab.end()) byte_ids_[b] = it->second;
  }
  if (spec.unk_token) {
    const auto it = vocab.find(*spec.unk_token);
    if (it == vocab.end()) {
      fail_user("{}: model.unk_token \"{}\" is not in the vocab; add it or set unk_token to null",
                spec.path, *spec.unk_token);
    }
    unk_id_ = it->second;
  }
  if (ignore_merges_) {
    byte_vocab_.reserve(vocab.size());
    // Only tokens of the alphabet: a word is looked up by its alphabet spelling, as in tokenizers.
    for (const auto& [token, id] : vocab) {
      if (auto bytes = alphabet_to_bytes(token)) byte_vocab_.emplace(std::move(*bytes), id);
    }
  }

  merges_.reserve(spec.merges.size());
  for (size_t rank = 0; rank < spec.merges.size(); ++rank) {
    const auto& [left, right] = spec.merges[rank];
    const auto id_of = [&](const std::string& token) {
      const auto it = vocab.find(token);
      if (it == vocab.end()) {
        fail_user("{}: merge \"{} {}\" needs token \"{}\", which is not in model.vocab; the file is "
                  "inconsistent",
                  spec.path, left, right, token);
      }
      return it->second;
    };
    // A repeated pair keeps its last rank, as tokenizers' merge map does.
    merges_[pair_key(id_of(left), id_of(right))] = Merge{static_cast<int32_t>(rank), id_of(left + right)};
  }
}

BpeModel::~BpeModel() = default;

const BpeModel::Merge* BpeModel::find_merge(int32_t left, int32_t right) const {
  const auto it = merges_.find(pair_key(left, right));
  return it == merges_.end() ? nullptr : &it->second;
}

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (ignore_merges_) {
    if (const auto it = byte_vocab_.find(std::string(word)); it != byte_vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  // One byte needs no merging, and such words are common (Qwen splits numbers into digits).
  if (word.size() == 1 && byte_ids_[static_cast<unsigned char>(word[0])] >= 0) {
    out.push_back(byte_ids_[static_cast<unsigned char>(word[0])]);
    return;
  }
  if (word.size() > WordCache::kMaxWordBytes) {
    merge_word(word, out);
    return;
  }
  const size_t hash = std::hash<std::string_view>{}(word);
  if (cache_->find(word, hash, out)) return;
  const size_t first = out.size();
  merge_word(word, out);
  cache_->insert(word, hash, std::vector<int32_t>(out.begin() + static_cast<ptrdiff_t>(first), out.end()));
}

void BpeModel::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  // Symbols form a doubly linked list over one array; a merge keeps the left symbol and kills
  // the right one. Candidates are ordered by (rank, position) so ties go to the leftmost pair.
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t result;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  thread_local std::vector<Symbol> symbols;
  thread_local std::vector<Candidate> queue;  // a min-heap through std::push_heap/pop_heap
  symbols.clear();
  queue.clear();
  for (const char c : word) {
    int32_t id = byte_ids_[static_cast<unsigned char>(c)];
    if (id < 0) {
      if (unk_id_ < 0) continue;  // tokenizers drops a character it cannot represent
      if (fuse_unk_ && !symbols.empty() && symbols.back().id == unk_id_) continue;
      id = unk_id_;
    }
    const auto n = static_cast<int32_t>(symbols.size());
    symbols.push_back(Symbol{id, n - 1, n + 1, true});
  }
  if (symbols.empty()) return;
  symbols.back().next = -1;

  const auto at = [&](int32_t pos) -> Symbol& { return symbols[static_cast<size_t>(pos)]; };
  const auto consider = [&](int32_t pos) {
    const int32_t next = at(pos).next;
    if (next < 0) return;
    if (const Merge* m = find_merge(at(pos).id, at(next).id)) {
      queue.push_back(Candidate{m->rank, pos, m->result});
      std::push_heap(queue.begin(), queue.end(), std::greater<>{});
    }
  };
  for (int32_t pos = 0; pos + 1 < static_cast<int32_t>(symbols.size()); ++pos) consider(pos);

  while (!queue.empty()) {
    std::pop_heap(queue.begin(), queue.end(), std::greater<>{});
    const Candidate top = queue.back();
    queue.pop_back();
    Symbol& left = at(top.pos);
    if (!left.alive || left.next < 0) continue;
    Symbol& right = at(left.next);
    // A candidate is stale when either side has changed since it was queued; the pair's merge
    // result then differs (a changed side only ever grows), so comparing results detects it.
    const Merge* current = find_merge(left.id, right.id);
    if (current == nullptr || current->result != top.result) continue;
    left.id = top.result;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) at(right.next).prev = top.pos;
    if (left.prev >= 0) consider(left.prev);
    consider(top.pos);
  }
  for (int32_t pos = 0; pos >= 0; pos = at(pos).next) out.push_back(at(pos).id);
}

}  // namespace moeforge::data
