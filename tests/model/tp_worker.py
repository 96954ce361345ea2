"""One tensor-parallel rank in its own process, for test_tensor_parallel.

    python -m tests.model.tp_worker MODEL_DIR RANK TP PP [PORT] < prompts.json

Rank 0 hosts the rendezvous and prints `port N`, runs every prompt greedily and prints
`result JSON` ({prompt index: token ids}); the others follow and print `followed N` (steps).
"""

from __future__ import annotations

import json
import sys

import torch

from p3.config import EngineConfig
from p3.engine.engine import Engine
from p3.engine.parallel import host_rendezvous, init_shard
from p3.engine.sequence import Request
from p3.sampling_params import SamplingParams


def main() -> None:
    model_dir, rank, tp, pp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    size = tp * pp
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if rank == 0:
        store = host_rendezvous("127.0.0.1", size)
        print("port", store.port, flush=True)
        shard = init_shard(0, tp, pp, device, store=store)
    else:
        shard = init_shard(rank, tp, pp, device, address=("127.0.0.1", int(sys.argv[5])))
    config = EngineConfig(dtype="float32", kv_cache_bytes=8 << 20, num_threads=1)
    engine = Engine(model_dir, config, shard)
    if rank == 0:
        job = json.loads(sys.stdin.readline())
        params = SamplingParams(max_tokens=job["num_new"], temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(job["prompts"]):
            engine.add(Request(str(i), prompt, params))
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        engine.close()
        print("result", json.dumps(tokens), flush=True)
    else:
        print("followed", engine.follow(), flush=True)


if __name__ == "__main__":
    main()
