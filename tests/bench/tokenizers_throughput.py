"""Benchmark companion: Hugging Face `tokenizers` throughput on the corpus bench_tokenizer wrote.

  tokenizers_throughput.py TOKENIZER_JSON CORPUS.jsonl REPEATS

CORPUS.jsonl holds one JSON string (a document) per line. Prints one JSON object: the total number
of tokens and the best wall time of REPEATS passes with one thread (encode per document) and with
all threads (encode_batch, which spreads documents over the Rayon pool).
"""
import json
import sys
import time

from tokenizers import Tokenizer


def best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    tokenizer_path, corpus_path, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tok = Tokenizer.from_file(tokenizer_path)
    with open(corpus_path, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    tokens = sum(len(e.ids) for e in tok.encode_batch(docs, add_special_tokens=False))
    one = best_time(lambda: [tok.encode(d, add_special_tokens=False) for d in docs], repeats)
    many = best_time(lambda: tok.encode_batch(docs, add_special_tokens=False), repeats)
    print(json.dumps({"tokens": tokens, "seconds_1_thread": one, "seconds_all_threads": many}))


if __name__ == "__main__":
    main()
