"""Benchmark baseline: Megatron-Core's GPT index building (document, sample and shuffle indices,
saved as .npy) for an existing dataset, timed without imports. Prints seconds as JSON.

  megatron_index_build.py PREFIX SEQ_LENGTH NUM_SAMPLES CACHE_DIR
"""
import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402


class _Tokenizer:
    eod = 0
    vocab_size = None
    unique_identifiers = {"class": "BenchTokenizer"}


prefix, seq, samples, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = GPTDatasetConfig(random_seed=1234, sequence_length=seq, blend=([prefix], None), split="100,0,0",
                          path_to_cache=cache, reset_position_ids=False, reset_attention_mask=False,
                          eod_mask_loss=False, create_attention_mask=False, tokenizer=_Tokenizer())
start = time.perf_counter()
train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [samples, None, None], lambda: True, config).build()
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "samples": len(train)}))
