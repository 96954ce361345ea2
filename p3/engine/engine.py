"""The engine facade: add(request), cancel(request_id), step() -> outputs batched per step.

add and cancel may be called from any thread; step runs on one thread (the node's compute
thread, or the caller's in the offline API) and is the only place that touches sequences.

A pipeline-parallel leader keeps one micro-batch per stage in flight: each sequence rides in
one lane, a step launches the next free lane's batch and, once every lane is in flight,
finishes the oldest. A cancel for a sequence in flight waits until its batch is back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path

import torch

from p3.config import EngineConfig, ModelConfig
from p3.engine.block_manager import BlockManager
from p3.engine.grammar import Grammars
from p3.engine.model_loader import build_model, quantization_plan
from p3.engine.parallel import Shard
from p3.engine.runner import Launched, ModelRunner
from p3.engine.scheduler import ScheduledBatch, Scheduler
from p3.engine.sequence import Request, Sequence, StepOutput
from p3.engine.stages import close_shard
from p3.kernels.sampling import SampleResult
from p3.log import get_logger
from p3.lora import LoRARequest
from p3.outputs import FinishReason
from p3.weights.convert import read_quantization
from p3.weights.files import load_config, resolve_model
from p3.weights.read import iter_state_dict

log = get_logger(__name__)


# the context an engine under a streaming window takes: any length (its view is bounded)
STREAMING_CONTEXT = 1 << 30


class Engine:
    def __init__(
        self,
        model: str | Path | None = None,
        config: EngineConfig | None = None,
        shard: Shard | None = None,
    ):
        """shard: this process's tensor-parallel rank (p3.engine.parallel). Rank 0 is a whole engine
        whose steps drive the others; the others only call `follow()`."""
        self.config = cfg = config or EngineConfig()
        self.shard = shard or Shard()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        started = time.perf_counter()
        self.model_dir = resolve_model(model)
        hf = load_config(self.model_dir)
        self.model_config = mcfg = ModelConfig.from_hf(hf)
        self.eos_token_ids = _eos_ids(hf)
        self.num_kv_blocks = cfg.num_kv_blocks(mcfg)
        self.max_model_len = min(
            cfg.max_model_len or mcfg.max_position_embeddings,
            mcfg.max_position_embeddings,
            self.num_kv_blocks * cfg.block_size,
        )
        weights = iter_state_dict(self.model_dir)
        blocks = quantization_plan(
            mcfg, self.shard, read_quantization(self.model_dir), cfg.quantization, cfg.torch_device
        )
        model_ = build_model(
            mcfg,
            weights,
            cfg.torch_dtype,
            cfg.torch_device,
            self.max_model_len,
            self.shard,
            blocks,
        )
        self.runner = ModelRunner(model_, mcfg, cfg, self.num_kv_blocks, self.eos_token_ids)
        self.window = self._streaming_window(cfg)
        self.grammars = self.runner.grammars = Grammars(
            self.model_dir, mcfg.vocab_size, self.eos_token_ids
        )
        self.block_manager = BlockManager(
            self.num_kv_blocks, cfg.block_size, cfg.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.loras = None
        if cfg.enable_lora:
            from p3.engine.lora import LoRAManager

            self.loras = LoRAManager(model_, mcfg, cfg.max_loras, cfg.max_lora_rank)
        self.seqs: dict[str, Sequence] = {}
        # ("add", (request, matcher, lora key)) or ("cancel", request id)
        self._inbox: deque[tuple[str, tuple | str]] = deque()
        self._pending_ids: set[str] = set()
        self._lock = threading.Lock()
        self._arrivals = 0
        self.num_steps = 0
        self.num_tokens_processed = 0  # prompt (and recomputed) and output tokens run
        self.num_lanes = self.shard.num_stages  # micro-batches in flight at most
        self._next_lane = 0
        self._in_flight: deque[tuple[int, ScheduledBatch, Launched]] = deque()
        self._in_flight_ids: set[str] = set()
        self._deferred_cancels: set[str] = set()
        self.load_time_s = time.perf_counter() - started
        log.info(
            "engine.ready",
            model=str(self.model_dir),
            num_kv_blocks=self.num_kv_blocks,
            kv_cache_dtype=cfg.kv_cache_dtype,
            kv_block_bytes=cfg.kv_block_bytes(mcfg),
            dtype=str(cfg.torch_dtype).removeprefix("torch."),
            quantization=cfg.quantization,
            weights_in_blocks=len(blocks),
            max_model_len=self.max_model_len,
            load_time_s=round(self.load_time_s, 3),
        )

    # -- the three calls ------------------------------------------------------------------

    def holds(self, request_id: str) -> bool:
        """Whether request_id is queued or running (a cancelled one until its step ends)."""
        with self._lock:
            return request_id in self._pending_ids

    def add(self, request: Request) -> None:
        """Queue a request for the next step; ValueError if it can never run (a constrained
        one: its grammar does not compile for this vocabulary, or its outputs so far leave
        it; its matcher is made here, ~5 ms for a schema, so the refusal is the caller's)."""
        self.validate(request)
        matcher = None
        if (grammar := request.params.grammar) is not None:
            try:
                matcher = self.grammars.matcher(grammar, request.output_token_ids)
            except OSError as exc:  # no tokenizer.json: this model serves no grammar
                raise ValueError(f"this model cannot take a grammar: {exc}") from None
        with self._lock:
            if request.request_id in self._pending_ids:
                raise ValueError(f"request_id {request.request_id!r} is already in the engine")
            key = self.loras.acquire(request.lora) if request.lora is not None else None
            self._pending_ids.add(request.request_id)
            self._inbox.append(("add", (request, matcher, key)))

    def load_lora(self, lora: LoRARequest) -> None:
        """Load an adapter now (ValueError if it cannot run here): its first request then
        finds it loaded. It may still be evicted for others past max_loras, and reloaded."""
        if self.loras is None:
            raise ValueError("LoRA adapters are off: start the engine with enable_lora=True")
        with self._lock:
            self.loras.release(self.loras.acquire(lora))

    def retire_lora(self, lora_int_id: int) -> None:
        """Drop an adapter once its running requests are done."""
        if self.loras is not None:
            with self._lock:
                self.loras.retire(lora_int_id)

    def cancel(self, request_id: str) -> None:
        """Stop a request wherever it is and free its KV blocks (unknown ids are ignored)."""
        self._inbox.append(("cancel", request_id))

    def step(self) -> list[StepOutput]:
        aborted = self._drain_inbox()
        if self.num_lanes > 1:
            return aborted + self._step_pipelined()
        batch = self.scheduler.schedule()
        if not batch:
            return aborted
        seqs, result = self.runner.run(batch)
        self.num_steps += 1
        self.num_tokens_processed += batch.num_tokens
        return aborted + self._postprocess(batch, seqs, result)

    def _step_pipelined(self) -> list[StepOutput]:
        launched = len(self._in_flight) < self.num_lanes and self._launch_next_lane()
        if not self._in_flight or (launched and len(self._in_flight) < self.num_lanes):
            return []
        _, batch, under_way = self._in_flight.popleft()
        seqs, result = self.runner.finish(under_way)
        self._in_flight_ids.difference_update(s.request_id for s in batch.seqs)
        outputs = self._postprocess(batch, seqs, result)
        return self._apply_deferred_cancels(outputs)

    def _launch_next_lane(self) -> bool:
        busy = {lane for lane, _, _ in self._in_flight}
        for _ in range(self.num_lanes):
            lane, self._next_lane = self._next_lane, (self._next_lane + 1) % self.num_lanes
            if lane in busy:
                continue
            batch = self.scheduler.schedule(lane)
            if batch:
                self._in_flight.append((lane, batch, self.runner.launch(batch)))
                self._in_flight_ids.update(s.request_id for s in batch.seqs)
                self.num_steps += 1
                self.num_tokens_processed += batch.num_tokens
                return True
        return False

    def _apply_deferred_cancels(self, outputs: list[StepOutput]) -> list[StepOutput]:
        """Cancels that arrived while their sequence was in flight: abort it now."""
        done = {rid for rid in self._deferred_cancels if rid not in self._in_flight_ids}
        if not done:
            return outputs
        self._deferred_cancels -= done
        kept = [out for out in outputs if out.request_id not in done]
        for rid in done:
            if (seq := self.seqs.get(rid)) is not None:
                self._finish(seq, "abort")
                kept.append(_abort_output(seq))
        return kept

    def follow(self, leave_group: bool = True) -> int:
        """A tensor-parallel follower: run the leader's steps until it stops; returns how many.
        leave_group=False keeps the process group for another engine on the same shard."""
        if self.shard.is_leader:
            raise RuntimeError("the leader steps; only followers follow")
        num_steps = self.runner.follow()
        if leave_group:
            close_shard(self.shard)
        return num_steps

    def close(self, leave_group: bool = True) -> None:
        """The leader releases its followers (their follow() returns); all leave the group
        (unless leave_group=False). Micro-batches still in flight are received first (their
        outputs are dropped)."""
        while self._in_flight:
            self.runner.finish(self._in_flight.popleft()[2])
        self.runner.stop_followers()
        self.grammars.close()
        if leave_group:
            close_shard(self.shard)

    # -- state ----------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self._inbox or self._in_flight) or self.scheduler.has_unfinished()

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # -- inside a step --------------------------------------------------------------------

    def validate(self, request: Request) -> None:
        """ValueError naming what is wrong if this request can never run."""
        ids = request.prompt_token_ids
        if not ids:
            raise ValueError("prompt must contain at least one token")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; this model's context is {self.max_model_len}"
            )
        outputs = request.output_token_ids
        if len(ids) + len(outputs) >= self.max_model_len:
            raise ValueError(
                f"prompt and {len(outputs)} outputs so far exceed this model's context "
                f"of {self.max_model_len}"
            )
        if any(not 0 <= t < vocab for t in outputs):
            raise ValueError(f"output token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in request.params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if request.embed and (self.num_lanes > 1 or not self.shard.is_last_stage):
            raise ValueError("embeddings need a replica of one pipeline stage")
        if request.embed and request.output_token_ids:
            raise ValueError("an embedding request has no outputs to continue")
        windowed = self.window is not None and len(ids) >= sum(self.window)
        if windowed and request.params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs need the whole prompt in the sliding window")
        if request.lora is not None and self.loras is None:
            raise ValueError("LoRA adapters are off: start the engine with enable_lora=True")

    def _drain_inbox(self) -> list[StepOutput]:
        aborted: list[StepOutput] = []
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                self._admit(*item)
            elif item in self._in_flight_ids:
                self._deferred_cancels.add(item)  # its KV is being written: after its step
            elif (seq := self.seqs.get(item)) is not None:
                self._finish(seq, "abort")
                aborted.append(_abort_output(seq))
        return aborted

    def _streaming_window(self, cfg: EngineConfig) -> tuple[int, int] | None:
        """(sinks, window) under --sliding-window; the context is then unbounded: what the
        model sees stays within its own (the view, Sequence.stream_within)."""
        if cfg.sliding_window is None:
            return None
        sinks, window = cfg.attention_sinks, cfg.sliding_window
        if sinks + window > self.max_model_len:
            raise ValueError(
                f"attention_sinks + sliding_window ({sinks} + {window}) exceed this model's "
                f"context of {self.max_model_len}"
            )
        self.max_model_len = STREAMING_CONTEXT
        return sinks, window

    def _admit(self, request: Request, matcher, lora_key: int | None) -> None:
        seq = Sequence(request, self.config.block_size, self._arrivals)
        if self.window is not None:
            seq.stream_within(*self.window)
        seq.matcher, seq.lora_key = matcher, lora_key
        seq.lane = self._arrivals % self.num_lanes
        self._arrivals += 1
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        del self.seqs[seq.request_id]
        with self._lock:
            self._pending_ids.discard(seq.request_id)
            if seq.lora_key is not None:
                self.loras.release(seq.lora_key)

    def _postprocess(
        self, batch: ScheduledBatch, sampled: list[Sequence], result: SampleResult | None
    ) -> list[StepOutput]:
        outputs = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += num_new
            self.block_manager.register_full_blocks(seq)
            if seq.embedding is not None:  # pooled this step: done, nothing sampled
                out = StepOutput(seq.request_id, [], num_prompt_tokens=seq.num_prompt_tokens)
                out.embedding, out.finish_reason = seq.embedding, "stop"
                out.num_cached_tokens = seq.num_cached_tokens
                self._finish(seq, "stop")
                outputs.append(out)
        for i, seq in enumerate(sampled):
            token = result.token_ids[i]
            seq.append_token(token)
            if seq.matcher is not None and not seq.matcher.consume_token(token):
                log.warning("engine.grammar_left", request_id=seq.request_id, token=token)
            out = StepOutput(
                seq.request_id,
                [token],
                num_prompt_tokens=seq.num_prompt_tokens,
                num_cached_tokens=seq.num_cached_tokens,
            )
            if result.logprobs[i] is not None:
                out.logprobs, out.top_logprobs = [result.logprobs[i]], [result.top_logprobs[i]]
            if seq.prompt_logprobs is not None:  # complete with the prompt: out with token 1
                out.prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
            out.finish_reason = self._finish_reason(seq, token)
            if out.finish_reason:
                self._finish(seq, out.finish_reason)
            elif seq.needs_rewindow():
                self.scheduler.rewindow(seq)
            outputs.append(out)
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if token in p.stop_token_ids:
            return "stop"
        if seq.matcher is not None and (seq.matcher.is_stopped() or seq.matcher.is_error()):
            return "stop"  # the grammar is complete (or, never seen, left: no way on inside it)
        if (
            token in self.eos_token_ids
            and not p.ignore_eos
            and seq.num_output_tokens > p.min_tokens
        ):
            return "stop"
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return "length"
        if len(seq) >= self.max_model_len:
            return "length"
        return None


def _abort_output(seq: Sequence) -> StepOutput:
    return StepOutput(
        seq.request_id, [], finish_reason="abort", num_prompt_tokens=seq.num_prompt_tokens
    )


def _eos_ids(hf: dict) -> frozenset[int]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
