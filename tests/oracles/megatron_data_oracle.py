"""Test oracle: Megatron-Core's own dataset code, driven from the C++ tests.

  write PREFIX DTYPE DOCS.json         write a dataset with Megatron's IndexedDatasetBuilder
                                       (DOCS: list of documents, each a list of sequences of ids)
  merge OUT PREFIX...                  merge datasets with IndexedDatasetBuilder.add_index
  preprocess JSONL TOKENIZER OUT KEY APPEND_EOD
                                       what Megatron's tools/preprocess_data.py writes: each line's
                                       text tokenized by `tokenizers`, EOD after non-empty documents,
                                       dtype by vocabulary size, IndexedDatasetBuilder.add_document
  samples SPECS.json OUT.json          for each spec in the list, build GPT datasets with
                                       BlendedMegatronDatasetBuilder and dump, per split, the length,
                                       the indices and the sample contents

Used only by tests; the framework never runs Python.
"""
import json
import os
import sys
import types
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy  # noqa: E402
import torch  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.blended_dataset import BlendedDataset  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402

DTYPES = {"uint8": numpy.uint8, "int8": numpy.int8, "int16": numpy.int16, "int32": numpy.int32,
          "int64": numpy.int64, "float64": numpy.float64, "float32": numpy.float32, "uint16": numpy.uint16}


def write(prefix, dtype, docs_path):
    docs = json.load(open(docs_path))
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DTYPES[dtype])
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.tensor(seq, dtype=torch.int64))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def merge(out, prefixes):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    first = IndexedDataset(prefixes[0])
    builder = IndexedDatasetBuilder(out + ".bin", dtype=first.index.dtype)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(out + ".idx")


def preprocess(jsonl, tokenizer_path, out, key, append_eod):
    from megatron.core.datasets.indexed_dataset import DType
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer_path)
    eod = tok.token_to_id("<|endoftext|>")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    builder = IndexedDatasetBuilder(f"{out}_{key}_document.bin", dtype=DType.optimal_dtype(vocab))
    for line in open(jsonl, encoding="utf-8"):
        ids = tok.encode(json.loads(line)[key], add_special_tokens=False).ids
        lens = [len(ids)] if ids else []
        if ids and append_eod == "1":
            ids.append(eod)
            lens[-1] += 1
        builder.add_document(ids, lens)
    builder.finalize(f"{out}_{key}_document.idx")


class _Tokenizer:
    """The two attributes GPTDataset reads (and no pad token, as for Qwen)."""

    def __init__(self, eod):
        self.eod = eod
        self.vocab_size = None
        self.unique_identifiers = {"class": "OracleTokenizer", "eod": eod}


def samples(specs_path, out_path):
    # BlendedDataset asks torch.distributed for the rank: a one-process group answers 0.
    if not torch.distributed.is_initialized():
        store = os.path.join(os.path.dirname(os.path.abspath(out_path)), "torch_dist_store")
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    json.dump([one_spec(spec) for spec in json.load(open(specs_path))], open(out_path, "w"))


def one_spec(spec):
    config = GPTDatasetConfig(
        random_seed=spec["seed"],
        sequence_length=spec["seq_length"],
        blend=(spec["prefixes"], spec.get("weights")),
        split=spec["split"],
        path_to_cache=spec["cache"],
        reset_position_ids=spec.get("reset_position_ids", False),
        reset_attention_mask=False,
        eod_mask_loss=spec.get("eod_mask_loss", False),
        create_attention_mask=False,
        tokenizer=_Tokenizer(spec.get("eod", -1)),
    )
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, spec["sizes"], lambda: True, config).build()
    first = spec.get("first")
    out = {}
    for name, ds in zip(["train", "valid", "test"], datasets):
        if ds is None:
            out[name] = None
            continue
        n = len(ds) if first is None else min(first, len(ds))
        entry = {"length": len(ds), "tokens": [], "labels": [], "loss_mask": [], "position_ids": []}
        for i in range(n):
            item = ds[i]
            entry["tokens"].append(item["tokens"].tolist())
            entry["labels"].append(item["labels"].tolist())
            entry["loss_mask"].append(item["loss_mask"].tolist())
            entry["position_ids"].append(item["position_ids"].tolist())
        if isinstance(ds, GPTDataset):
            entry["document_index"] = ds.document_index.tolist()
            entry["sample_index"] = ds.sample_index.reshape(-1).tolist()
            entry["shuffle_index"] = ds.shuffle_index.tolist()
        if isinstance(ds, BlendedDataset):
            entry["dataset_index"] = ds.dataset_index.tolist()
            entry["dataset_sample_index"] = ds.dataset_sample_index.tolist()
            entry["dataset_lengths"] = [len(d) for d in ds.datasets]
        out[name] = entry
    return out


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "write":
        write(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "merge":
        merge(sys.argv[2], sys.argv[3:])
    elif cmd == "preprocess":
        preprocess(*sys.argv[2:7])
    elif cmd == "samples":
        samples(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown command {cmd}")
