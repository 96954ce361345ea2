"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples."""

from __future__ import annotations

import ctypes
import ctypes.util
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor

from p3.config import EngineConfig, ModelConfig
from p3.engine.grammar import Grammars, allowed
from p3.engine.model import AttentionContext, Transformer
from p3.engine.scheduler import ScheduledBatch
from p3.engine.sequence import Sequence
from p3.engine.stages import PendingLogits, StepPlan, receive_plan, send_logits, send_plan
from p3.kernels import build
from p3.kernels.attention import CPU_KERNEL_DTYPES, cpu_decode_kernel_available
from p3.kernels.dispatch import log_kernels
from p3.kernels.sampling import Sampler, SampleResult, SampleRow


@dataclass
class PreparedBatch:
    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    ctx: AttentionContext
    logits_indices: Tensor  # [S] rows of the packed batch whose logits are sampled
    sampling_seqs: list[Sequence]  # the sequences those rows belong to, in order


@dataclass
class Launched:
    """A step under way: whose samples it will give, and its logits or their receive."""

    sampling_seqs: list[Sequence]
    logits: Tensor | None
    pending: PendingLogits | None
    prompt_rows: list[tuple[Sequence, int]]  # logits rows after the sampled ones: (seq, next id)
    masks: Future | None = None  # the constrained rows' grammar masks, computed meanwhile
    hidden: Tensor | None = None  # the sampled rows' final hidden states, when one embeds


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
        self.shard = model.shard
        self.device = cfg.torch_device
        self.block_size = cfg.block_size
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self.grammars: Grammars | None = None  # the engine's (it knows the model's files)
        if self.device.type == "cpu":
            keep_freed_memory()
            build.warm()  # compile the C++ kernels now (once per machine), not in the first step
            log_kernels(str(self.device))
        self.invariant_attention = (  # see AttentionContext.token_block_tables
            self.device.type == "cpu"
            and cfg.torch_dtype in CPU_KERNEL_DTYPES
            and cpu_decode_kernel_available()
        )
        cache_dtype = cfg.kv_cache_torch_dtype
        for layer in model.layers:  # never read before written: no need to zero
            shape = (num_blocks, cfg.block_size, layer.attn.num_kv_heads, model_cfg.head_dim)
            layer.attn.k_cache = torch.empty(shape, dtype=cache_dtype, device=self.device)
            layer.attn.v_cache = torch.empty(shape, dtype=cache_dtype, device=self.device)
            if cache_dtype == torch.int8:  # one scale per (token, kv head)
                scales = shape[:3]
                layer.attn.k_scale = torch.empty(scales, dtype=torch.float32, device=self.device)
                layer.attn.v_scale = torch.empty(scales, dtype=torch.float32, device=self.device)

    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], SampleResult | None]:
        """Run one step; returns the sequences that sampled a token and what they sampled."""
        return self.finish(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> Launched:
        """Start a step: the plan goes to the other ranks and this rank runs its part. With
        a single stage the logits are ready on return; with several, `finish` waits for the
        last stage's, so the leader may launch another micro-batch in between."""
        plan, sampling_seqs, prompt_rows = self.plan(batch)
        matchers = [seq.matcher for seq in sampling_seqs if seq.matcher is not None]
        masks = self.grammars.start(matchers) if matchers else None  # while the model runs
        pending = None
        if self.shard.world_size > 1:
            if plan.logits_indices and not self.shard.is_last_stage:
                vocab = self.model.cfg.vocab_size
                pending = PendingLogits(len(plan.logits_indices), vocab, self.device, self.shard)
            send_plan(plan, self.shard)
        embeds = any(seq.embed for seq in sampling_seqs)
        logits, hidden = self.forward(plan, keep_hidden=embeds)
        return Launched(sampling_seqs, logits, pending, prompt_rows, masks, hidden)

    @torch.inference_mode()
    def finish(self, launched: Launched) -> tuple[list[Sequence], SampleResult | None]:
        """The launched step's samples (waiting for its logits if they are still coming);
        a sequence that embeds gets its pooled embedding instead (and is not among them)."""
        if not launched.sampling_seqs and not launched.prompt_rows:
            return [], None
        logits = launched.logits if launched.pending is None else launched.pending.wait()
        num_sampled = len(launched.sampling_seqs)
        if launched.prompt_rows:
            _add_prompt_logprobs(logits[num_sampled:], launched.prompt_rows)
        seqs, logits = launched.sampling_seqs, logits[:num_sampled]
        if launched.hidden is not None:
            seqs, logits = self._pool(launched.hidden, seqs, logits)
        if not seqs:
            return [], None
        rows = [self._sample_row(seq) for seq in seqs]
        constrained = None
        if launched.masks is not None:
            where = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
            constrained = where, allowed(launched.masks.result(), logits.shape[-1], logits.device)
        return seqs, self.sampler(logits, rows, constrained)

    def _pool(
        self, hidden: Tensor, seqs: list[Sequence], logits: Tensor
    ) -> tuple[list[Sequence], Tensor]:
        """Embedding sequences take their last token's final hidden state, L2-normalized (the
        last-token pooling vLLM's embed task gives a decoder model); the rest go on to be
        sampled, with their logits."""
        generating = [i for i, seq in enumerate(seqs) if not seq.embed]
        embedding = [i for i, seq in enumerate(seqs) if seq.embed]
        pooled = torch.nn.functional.normalize(hidden[embedding].float(), dim=-1).tolist()
        for i, vector in zip(embedding, pooled, strict=True):
            seqs[i].embedding = vector
        return [seqs[i] for i in generating], logits[generating]

    @torch.inference_mode()
    def forward(
        self, plan: StepPlan, keep_hidden: bool = False
    ) -> tuple[Tensor | None, Tensor | None]:
        """This rank's part of the model over one plan: the sampled rows' logits [S, V] when
        this rank is the leader of a single-stage replica, else None (a last stage that is not
        the leader sends them to the leader); with keep_hidden, also those rows' final hidden
        states [S, D] (an embedding request's)."""
        prepared = self.tensors(plan)
        if self.model.lora_step is not None:
            self.model.lora_step.groups = self._lora_groups(plan)
        try:
            hidden = self.model(prepared.input_ids, prepared.positions, prepared.ctx)
        finally:
            if self.model.lora_step is not None:
                self.model.lora_step.groups = []
        if hidden is None or not plan.logits_indices:
            return None, None
        rows = hidden[prepared.logits_indices]
        logits = self.model.compute_logits(rows)
        if logits is not None and not self.shard.is_leader:
            send_logits(logits)
            return None, None
        return logits, rows if keep_hidden else None

    def follow(self) -> int:
        """A follower's life: run the leader's plans until it sends stop; the steps run."""
        num_steps = 0
        while not (plan := receive_plan()).stop:
            self.forward(plan)
            num_steps += 1
        return num_steps

    def stop_followers(self) -> None:
        if self.shard.world_size > 1 and self.shard.is_leader:
            send_plan(StepPlan(stop=True), self.shard)

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        plan, sampling_seqs, _ = self.plan(batch)
        prepared = self.tensors(plan)
        prepared.sampling_seqs = sampling_seqs
        return prepared

    def plan(
        self, batch: ScheduledBatch
    ) -> tuple[StepPlan, list[Sequence], list[tuple[Sequence, int]]]:
        """The packed batch as plain lists (decode tokens first, then prefill chunks), the
        sequences whose last row is sampled, and the prompt rows whose logprobs are wanted
        (their logits follow the sampled rows')."""
        pairs = list(zip(batch.seqs, batch.num_new_tokens, strict=True))
        decode = [(s, n) for s, n in pairs if n == 1]
        prefill = [(s, n) for s, n in pairs if n > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sampling_seqs: list[Sequence] = []
        prompt_rows: list[tuple[Sequence, int]] = []
        prompt_indices: list[int] = []
        cu_seqlens = [0]
        lora_segments: list[list[int]] = []
        for seq, num_new in decode + prefill:
            start = seq.num_computed_tokens
            if seq.prompt_logprobs is not None:  # rows predicting the next prompt token
                for pos in range(start, min(start + num_new, seq.num_prompt_tokens - 1)):
                    prompt_indices.append(len(input_ids) + pos - start)
                    prompt_rows.append((seq, seq.token_ids[pos + 1]))
            input_ids += seq.token_ids[start : start + num_new]
            positions += range(start, start + num_new)
            slots += self._slots(seq, start, start + num_new)
            if start + num_new == len(seq):  # the chunk reaches the end: sample
                logits_indices.append(len(input_ids) - 1)
                sampling_seqs.append(seq)
            if num_new > 1:
                cu_seqlens.append(cu_seqlens[-1] + num_new)
            if seq.lora_key is not None:
                lora_segments.append([seq.lora_key, len(input_ids) - num_new, num_new])
        plan = StepPlan(
            input_ids=input_ids,
            positions=positions,
            slots=slots,
            num_decode=len(decode),
            decode_block_tables=[s.block_table for s, _ in decode],
            decode_context_lens=[s.num_computed_tokens + 1 for s, _ in decode],
            prefill_cu_seqlens=cu_seqlens,
            prefill_cached_lens=[s.num_computed_tokens for s, _ in prefill],
            prefill_block_tables=[s.block_table for s, _ in prefill],
            logits_indices=logits_indices + prompt_indices,
            lora_segments=lora_segments,
        )
        return plan, sampling_seqs, prompt_rows

    def _lora_groups(self, plan: StepPlan) -> list[tuple[int, Tensor | None]]:
        """The step's tokens by adapter: rows of each (None when one adapter has them all)."""
        rows: dict[int, list[int]] = {}
        for key, start, count in plan.lora_segments:
            rows.setdefault(key, []).extend(range(start, start + count))
        total = len(plan.input_ids)
        return [
            (key, None if len(r) == total else self._tensor(r, torch.int64))
            for key, r in rows.items()
        ]

    def tensors(self, plan: StepPlan) -> PreparedBatch:
        token_tables, token_lens = self._token_tables(plan)
        ctx = AttentionContext(
            slot_mapping=self._tensor(plan.slots, torch.int64),
            num_decode=plan.num_decode,
            decode_block_tables=self._block_tables(plan.decode_block_tables),
            decode_context_lens=self._tensor(plan.decode_context_lens, torch.int32),
            prefill_cu_seqlens=plan.prefill_cu_seqlens,
            prefill_cached_lens=plan.prefill_cached_lens,
            prefill_block_tables=self._block_tables(plan.prefill_block_tables),
            token_block_tables=token_tables,
            token_context_lens=token_lens,
        )
        return PreparedBatch(
            input_ids=self._tensor(plan.input_ids, torch.int64),
            positions=self._tensor(plan.positions, torch.int64),
            ctx=ctx,
            logits_indices=self._tensor(plan.logits_indices, torch.int64),
            sampling_seqs=[],
        )

    def _token_tables(self, plan: StepPlan) -> tuple[Tensor | None, Tensor | None]:
        """Every token's block table and context length, for batch-invariant attention
        (a step with prefill tokens, on the CPU with the paged kernel); else (None, None)."""
        if not self.invariant_attention or len(plan.input_ids) == plan.num_decode:
            return None, None
        tables = plan.decode_block_tables + [
            table
            for table, start, end in zip(
                plan.prefill_block_tables,
                plan.prefill_cu_seqlens,
                plan.prefill_cu_seqlens[1:],
                strict=False,
            )
            for _ in range(end - start)
        ]
        lens = [p + 1 for p in plan.positions]
        return self._block_tables(tables), self._tensor(lens, torch.int32)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _block_tables(self, tables: list[list[int]]) -> Tensor | None:
        if not tables:
            return None
        width = max(len(t) for t in tables)
        return self._tensor([t + [0] * (width - len(t)) for t in tables], torch.int32)

    def _tensor(self, data: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    def _sample_row(self, seq: Sequence) -> SampleRow:
        params = seq.params
        history = params.needs_history or params.min_tokens > 0
        return SampleRow(
            params=params,
            seed=seq.seed,
            position=seq.num_tokens,  # in the whole stream, not its window's view
            prompt_token_ids=seq.prompt_token_ids if params.needs_history else (),
            output_token_ids=seq.output_token_ids if history else (),
            eos_token_ids=self.eos_token_ids,
        )


def _add_prompt_logprobs(logits: Tensor, rows: list[tuple[Sequence, int]]) -> None:
    """Each row's logprob of the prompt token that follows it, and the top k, onto its seq."""
    logprobs = logits.float().log_softmax(dim=-1)
    next_ids = torch.tensor([token for _, token in rows], device=logits.device)
    chosen = logprobs.gather(1, next_ids[:, None]).squeeze(1).tolist()
    k = min(max(seq.params.prompt_logprobs for seq, _ in rows), logprobs.shape[-1])
    top_values, top_ids = (t.tolist() for t in logprobs.topk(k, dim=-1)) if k else ([], [])
    for i, (seq, token) in enumerate(rows):
        n = seq.params.prompt_logprobs
        top = list(zip(top_ids[i][:n], top_values[i][:n], strict=True)) if k else []
        seq.prompt_logprobs.append((token, chosen[i], top))
