"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples."""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import torch
from torch import Tensor

from p3.config import EngineConfig, ModelConfig
from p3.engine.scheduler import ScheduledBatch
from p3.engine.sequence import Sequence
from p3.kernels import build
from p3.kernels.sampling import Sampler, SampleResult, SampleRow
from p3.model import AttentionContext, Transformer


@dataclass
class PreparedBatch:
    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    ctx: AttentionContext
    logits_indices: Tensor  # [S] rows of the packed batch whose logits are sampled
    sampling_seqs: list[Sequence]  # the sequences those rows belong to, in order


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """glibc hands each freed multi-MB activation back to the OS and faults it in again next
    step (measured: about half of a CPU step's wall time in this VM). Keep it in the heap."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's ceiling on 64-bit
        libc.mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024)


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        model_cfg: ModelConfig,
        cfg: EngineConfig,
        num_blocks: int,
        eos_token_ids: frozenset[int],
    ):
        self.model = model
        self.device = cfg.torch_device
        self.block_size = cfg.block_size
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        if self.device.type == "cpu":
            keep_freed_memory()
            build.warm()  # compile the C++ kernels now (once per machine), not in the first step
        shape = (num_blocks, cfg.block_size, model_cfg.num_kv_heads, model_cfg.head_dim)
        for layer in model.layers:  # never read before written: no need to zero
            layer.attn.k_cache = torch.empty(shape, dtype=cfg.torch_dtype, device=self.device)
            layer.attn.v_cache = torch.empty(shape, dtype=cfg.torch_dtype, device=self.device)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], SampleResult | None]:
        """Run one step; returns the sequences that sampled a token and what they sampled."""
        prepared = self.prepare(batch)
        hidden = self.model(prepared.input_ids, prepared.positions, prepared.ctx)
        if not prepared.sampling_seqs:
            return [], None
        logits = self.model.compute_logits(hidden[prepared.logits_indices])  # [S, V]
        rows = [self._sample_row(seq) for seq in prepared.sampling_seqs]
        return prepared.sampling_seqs, self.sampler(logits, rows)

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        pairs = list(zip(batch.seqs, batch.num_new_tokens, strict=True))
        decode = [(s, n) for s, n in pairs if n == 1]
        prefill = [(s, n) for s, n in pairs if n > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sampling_seqs: list[Sequence] = []
        cu_seqlens = [0]
        for seq, num_new in decode + prefill:
            start = seq.num_computed_tokens
            input_ids += seq.token_ids[start : start + num_new]
            positions += range(start, start + num_new)
            slots += self._slots(seq, start, start + num_new)
            if start + num_new == len(seq):  # the chunk reaches the end: sample
                logits_indices.append(len(input_ids) - 1)
                sampling_seqs.append(seq)
            if num_new > 1:
                cu_seqlens.append(cu_seqlens[-1] + num_new)
        ctx = AttentionContext(
            slot_mapping=self._tensor(slots, torch.int64),
            num_decode=len(decode),
            decode_block_tables=self._block_tables([s for s, _ in decode]),
            decode_context_lens=self._tensor(
                [s.num_computed_tokens + 1 for s, _ in decode], torch.int32
            ),
            prefill_cu_seqlens=cu_seqlens,
            prefill_cached_lens=[s.num_computed_tokens for s, _ in prefill],
            prefill_block_tables=self._block_tables([s for s, _ in prefill]),
        )
        return PreparedBatch(
            input_ids=self._tensor(input_ids, torch.int64),
            positions=self._tensor(positions, torch.int64),
            ctx=ctx,
            logits_indices=self._tensor(logits_indices, torch.int64),
            sampling_seqs=sampling_seqs,
        )

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _block_tables(self, seqs: list[Sequence]) -> Tensor | None:
        if not seqs:
            return None
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return self._tensor(rows, torch.int32)

    def _tensor(self, data: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    def _sample_row(self, seq: Sequence) -> SampleRow:
        params = seq.params
        history = params.needs_history or params.min_tokens > 0
        return SampleRow(
            params=params,
            seed=seq.seed,
            position=len(seq),
            prompt_token_ids=seq.prompt_token_ids if params.needs_history else (),
            output_token_ids=seq.output_token_ids if history else (),
            eos_token_ids=self.eos_token_ids,
        )
