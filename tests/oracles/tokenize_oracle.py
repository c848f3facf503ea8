"""Test oracle: Hugging Face `tokenizers` encoding and decoding, for tests/unit/test_tokenizer.cpp.

  tokenize_oracle.py TOKENIZER_JSON REQUESTS.jsonl OUT.json

Each line of REQUESTS.jsonl is {"encode": HEX} (text as hex bytes, possibly invalid UTF-8) or
{"decode": [ids]}. Text is decoded with errors="replace" (what moeforge does with invalid UTF-8),
encoded with add_special_tokens=False, and decoded back with skip_special_tokens=False. OUT.json
gets {"vocab_size", "endoftext_id", "post_processor_adds", "results": [...]}, one result per
request: {"ids": [...], "decoded": HEX, "valid_nfc": bool} or {"decoded": HEX}.

Used only by tests; the framework never runs Python.
"""
import json
import sys
import unicodedata

from tokenizers import Tokenizer


def main():
    tokenizer_path, requests_path, out_path = sys.argv[1:4]
    tok = Tokenizer.from_file(tokenizer_path)
    results = []
    with open(requests_path, encoding="utf-8") as requests:
        for line in requests:
            request = json.loads(line)
            if "encode" in request:
                raw = bytes.fromhex(request["encode"])
                text = raw.decode("utf-8", errors="replace")
                ids = tok.encode(text, add_special_tokens=False).ids
                decoded = tok.decode(ids, skip_special_tokens=False)
                # Valid NFC text must come back from decode(encode(text)) unchanged.
                nfc = text.encode("utf-8") == raw and unicodedata.is_normalized("NFC", text)
                results.append({"ids": ids, "decoded": decoded.encode("utf-8").hex(), "valid_nfc": nfc})
            else:
                decoded = tok.decode(request["decode"], skip_special_tokens=False)
                results.append({"decoded": decoded.encode("utf-8").hex()})
    # Whether the post-processor would add ids (BOS/EOS) with add_special_tokens=True: moeforge never
    # adds any, so the test checks that the files it uses add none either.
    probe = "Hello world"
    adds = tok.encode(probe, add_special_tokens=True).ids != tok.encode(probe, add_special_tokens=False).ids
    with open(out_path, "w", encoding="utf-8") as out:
        json.dump({
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "endoftext_id": tok.token_to_id("<|endoftext|>"),
            "post_processor_adds": adds,
            "results": results,
        }, out)


if __name__ == "__main__":
    main()
