#!/usr/bin/env bash
# Makes a small real-text Megatron dataset offline: the license texts every Debian system ships
# (/usr/share/common-licenses, about 300 KB of English), one document per paragraph, tokenized
# with the byte-level tokenizer. Writes PREFIX.jsonl and PREFIX_text_document.{bin,idx}.
#   bash launch/corpus.sh PREFIX        (expects build/moeforge)
set -euo pipefail
prefix=${1:?usage: launch/corpus.sh PREFIX}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$(dirname "$prefix")"
# JSON lines written by perl (perl-base is part of every Debian system).
for f in /usr/share/common-licenses/*; do
  perl -0777 -ne 'for my $p (split /\n\s*\n/) {
      next unless $p =~ /\S/;
      $p =~ s/\\/\\\\/g; $p =~ s/"/\\"/g; $p =~ s/\t/\\t/g; $p =~ s/\n/\\n/g; $p =~ s/[\x00-\x1f]//g;
      print "{\"text\": \"$p\"}\n" }' "$f"
done > "$prefix.jsonl"
"$root/build/moeforge" data preprocess --input "$prefix.jsonl" --tokenizer byte --append-eod --output-prefix "$prefix"
