"""One tensor-parallel rank in its own process, for test_tensor_parallel.

    python -m tests.model.tp_worker RANK TP PP PORT|- MODEL_DIR... < prompts.json

Rank 0 hosts the rendezvous and prints `port N`; the others join it at PORT. Every rank then
builds one engine per model in turn on the same process group: rank 0 runs every prompt
greedily on each and prints `result JSON` ({model dir: {prompt index: token ids}}), the
others follow each and print `followed N` (steps, all models). One group for several models
saves the processes' start (2-3 s a rank on two cores) per model.
"""

from __future__ import annotations

import json
import sys

import torch

from p3.config import EngineConfig
from p3.engine.engine import Engine
from p3.engine.parallel import host_rendezvous, init_shard
from p3.engine.sequence import Request
from p3.engine.stages import close_shard
from p3.sampling_params import SamplingParams


def main() -> None:
    rank, tp, pp, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    model_dirs = sys.argv[5:]
    size = tp * pp
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if rank == 0:
        store = host_rendezvous("127.0.0.1", size)
        print("port", store.port, flush=True)
        shard = init_shard(0, tp, pp, device, store=store)
        job = json.loads(sys.stdin.readline())
    else:
        shard = init_shard(rank, tp, pp, device, address=("127.0.0.1", int(port)))
    config = EngineConfig(dtype="float32", kv_cache_bytes=8 << 20, num_threads=1)
    results, num_steps = {}, 0
    for model_dir in model_dirs:
        engine = Engine(model_dir, config, shard)
        if rank != 0:
            num_steps += engine.follow(leave_group=False)
            continue
        params = SamplingParams(max_tokens=job["num_new"], temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(job["prompts"]):
            engine.add(Request(str(i), prompt, params))
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        engine.close(leave_group=False)
        results[model_dir] = tokens
    close_shard(shard)
    if rank == 0:
        print("result", json.dumps(results), flush=True)
    else:
        print("followed", num_steps, flush=True)


if __name__ == "__main__":
    main()
