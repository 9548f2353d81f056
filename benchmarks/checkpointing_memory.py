"""Peak training memory with and without activation checkpointing: one forward+backward of a decoder (width 256,
8 layers, batch 8 x 512 tokens), measured as (a) the bytes of tensors autograd keeps for backward
(saved_tensors_hooks, unique storages) and (b) the process's peak RSS growth (ru_maxrss). One mode per process:

    for m in plain checkpointed adapter adapter-checkpointed; do
        MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 python benchmarks/checkpointing_memory.py $m; done

(the malloc threshold makes freed tensors leave the process, so the RSS peak follows the live tensors)."""
import json
import resource
import sys
import time

import torch

import formerkit
from formerkit import ModelConfig

mode = sys.argv[1]  # plain | checkpointed | adapter | adapter-checkpointed
torch.manual_seed(0)
config = ModelConfig(arch="decoder", width=256, num_layers=8, max_seq_len=512, attention={"num_heads": 4},
                     position={"kind": "rope"}, stem={"kind": "tokens", "vocab_size": 256}, head={"kind": "lm"})
model = formerkit.build_model(config).train()
if "checkpointed" in mode:
    model.set_activation_checkpointing(True)
if "adapter" in mode:
    formerkit.add_adapters(model, method="adapter", bottleneck=32)
ids = torch.randint(0, 256, (8, 512))
saved = {}


def pack(t):
    try:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        saved[key] = t.untyped_storage().nbytes()
    except Exception:
        pass
    return t


base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    start = time.perf_counter()
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
forward_saved = sum(saved.values())
loss.backward()
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mode": mode, "saved_for_backward_MB": round(forward_saved / 2**20, 1),
                  "peak_rss_growth_MB": round((peak - base_rss) / 1024, 1), "step_s": round(elapsed, 2)}))
