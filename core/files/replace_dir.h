// defines: replace_dir_durably, recover_replaced_dirs
//
// A directory put in place whole (a checkpoint's iter_N, an upcycled model): it is built complete
// under a temporary name beside its target, then moved in, so that at every moment the target is
// the old complete directory or the new one, never a mix. The one way moeforge does this.
#pragma once

#include <filesystem>
#include <string>

namespace moeforge {

// Moves the complete directory `tmp` to `target` (same file system). A missing target is a durable
// rename; an existing one is exchanged with it (renameat2 RENAME_EXCHANGE) and the old copy then
// removed. A file system without the exchange takes two renames, keeping the old copy meanwhile as
// `<target>.old.tmp-<pid>`, which recover_replaced_dirs() puts back after a kill between them.
void replace_dir_durably(const std::filesystem::path& tmp, const std::filesystem::path& target);

// What a kill between replace_dir_durably's two renames left in `parent`: each old copy of a
// target whose name starts with `prefix`, of a process that is gone, is renamed back to its target
// when that is missing (it was complete) and removed otherwise. remove_abandoned_temporaries
// (core/files/dir_lock.h) calls it first, so an old copy is never taken for garbage.
void recover_replaced_dirs(const std::filesystem::path& parent, const std::string& prefix);

}  // namespace moeforge
