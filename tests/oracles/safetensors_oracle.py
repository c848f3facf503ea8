"""Test oracle: Python `safetensors` (and Hugging Face's checkpoint conventions), for
tests/unit/test_safetensors.cpp.

  safetensors_oracle.py write SPEC.json OUT.safetensors
      SPEC is {"metadata": {str: str} or null, "tensors": [{"name", "dtype", "shape", "values"}]}
      (dtype a safetensors string, values flat in C order); writes it with save_file.
  safetensors_oracle.py read FILE.safetensors OUT.json
      OUT.json gets {"metadata": {...} or null, "tensors": {name: {"dtype", "shape", "values"}}}.
  safetensors_oracle.py checkpoint DIR MAX_SHARD_BYTES NAMES.json OUT.json
      Loads DIR as transformers does (model.safetensors, or model.safetensors.index.json and the
      shards its weight_map names, each needing metadata {"format": "pt"}), and splits the loaded
      tensors, in the order NAMES.json lists them, with huggingface_hub's
      split_torch_state_dict_into_shards. OUT.json gets {"tensors": {...}, "format_ok": bool,
      "hf_weight_map": {name: file}, "hf_total_size": N, "hf_sharded": bool}.

Values are floats for floating dtypes (every value of those dtypes is exact as float64), ints for
integer dtypes and bools for BOOL. Used only by tests; the framework never runs Python.
"""
import json
import os
import sys
from collections import OrderedDict

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}


def make(entry):
    dtype = DTYPES[entry["dtype"]]
    source = torch.bool if dtype == torch.bool else torch.float64 if dtype.is_floating_point else torch.int64
    return torch.tensor(entry["values"], dtype=source).to(dtype).reshape(entry["shape"])


def describe(t):
    flat = t.reshape(-1)
    values = flat.to(torch.float64) if t.dtype.is_floating_point else flat if t.dtype == torch.bool else flat.to(torch.int64)
    return {"dtype": NAMES[t.dtype], "shape": list(t.shape), "values": values.tolist()}


def read(path):
    with safe_open(path, framework="pt") as f:
        return f.metadata(), {name: f.get_tensor(name) for name in f.keys()}


def main():
    command = sys.argv[1]
    if command == "write":
        spec_path, out_path = sys.argv[2:4]
        with open(spec_path, encoding="utf-8") as f:
            spec = json.load(f)
        save_file({e["name"]: make(e) for e in spec["tensors"]}, out_path, metadata=spec["metadata"])
        return
    if command == "read":
        path, out_path = sys.argv[2:4]
        metadata, tensors = read(path)
        result = {"metadata": metadata, "tensors": {n: describe(t) for n, t in tensors.items()}}
    elif command == "checkpoint":
        directory, max_shard_bytes, names_path, out_path = sys.argv[2:6]
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index_path):
            with open(index_path, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        tensors, format_ok = {}, True
        for file in files:
            metadata, shard = read(os.path.join(directory, file))
            # transformers' load_state_dict refuses safetensors metadata without a known format.
            format_ok = format_ok and metadata is not None and metadata.get("format") in ("pt", "tf", "flax", "mlx")
            tensors.update(shard)
        with open(names_path, encoding="utf-8") as f:
            names = json.load(f)
        # Clones: each tensor needs its own storage, or huggingface_hub would treat them as shared.
        split = split_torch_state_dict_into_shards(OrderedDict((n, tensors[n].clone()) for n in names),
                                                   max_shard_size=int(max_shard_bytes))
        result = {
            "tensors": {n: describe(t) for n, t in tensors.items()},
            "format_ok": format_ok,
            "hf_weight_map": split.tensor_to_filename,
            "hf_total_size": split.metadata["total_size"],
            "hf_sharded": split.is_sharded,
        }
    else:
        raise SystemExit(f"unknown command {command}")
    with open(out_path, "w", encoding="utf-8") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
