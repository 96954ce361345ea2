"""The training: a frozen transformers base with peft's LoRA layers, p3's own loop.

- The base: AutoModelForCausalLM from the local directory in fp32 (a directory of p3 blocks,
  such as the default model's converted GGUF, is dequantized into it), on CUDA when there is
  one; with a quantization its LoRA'd projections become p3.finetune.qlora.QuantLinear.
- Batches: the training examples sorted by length and cut into batches of --batch-size, so a
  batch pads little; the batches' order is shuffled each epoch (seeded). Padding is on the
  right and needs no attention mask (causal attention never looks right); the logits are
  computed only at the positions some row of the batch predicts, and a batch whose logits
  would be large runs as several micro-batches whose gradients add up.
- The loss: cross-entropy per target token, averaged over the batch's target tokens.
- AdamW over the LoRA weights, the learning rate warmed up linearly then decayed linearly
  to 0, gradients clipped to --max-grad-norm. Deterministic under --seed (A's initial values,
  the split, the batch order).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import random
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from p3.finetune import LOG_FILE, PROJECTIONS, SUMMARY_FILE, check_arguments
from p3.finetune.data import Dataset, Example, load_dataset
from p3.kernels.quant import QuantWeight
from p3.lora import read_adapter_config
from p3.tokenizer import Tokenizer
from p3.weights.files import resolve_model

LOGIT_BUDGET = 1024  # rows x kept positions of logits per micro-batch (~200 MB at 49k vocab)


@dataclass
class Summary:
    model: str
    quantization: str
    device: str
    rank: int
    alpha: float
    target_modules: list[str]
    train_examples: int
    held_out_examples: int
    dropped_examples: int
    steps: int
    epochs: float
    tokens: int  # real (unpadded) tokens through the model in training
    target_tokens: int
    seconds: float
    tokens_per_s: float
    held_out_loss_before: float | None
    held_out_loss_after: float | None
    train_loss_first: float
    train_loss_last: float
    base_bytes: int  # the frozen base's parameters and buffers
    loaded_rss_bytes: int | None  # the process's RSS once the base was ready (Linux)
    training_peak_rss_bytes: int | None  # its peak from then on
    peak_rss_bytes: int  # the process's peak, loading included


def finetune_from_args(args: argparse.Namespace) -> int:
    check_arguments(args)
    summary = finetune(args)
    print(format_summary(summary, Path(args.out)))
    return 0


def finetune(args: argparse.Namespace) -> Summary:
    model_dir = resolve_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_dir(model_dir)
    data = load_dataset(args.data, tokenizer, args.max_len, args.eval_fraction, args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model, targets = load_peft_model(model_dir, args, device)
    loaded_rss = status_bytes("VmRSS")
    reset_peak_rss()
    before = held_out_loss(model, data.held_out, args.batch_size, tokenizer, device)
    if before is not None:
        print(f"held-out loss before training: {before:.4f} ({len(data.held_out)} examples)")
    start = time.perf_counter()
    run = train(model, data, args, tokenizer, device, out / LOG_FILE)
    seconds = time.perf_counter() - start
    after = held_out_loss(model, data.held_out, args.batch_size, tokenizer, device)
    if after is not None:
        print(f"held-out loss after training:  {after:.4f}")
    save_adapter(model, out, model_dir)
    summary = Summary(
        model=str(model_dir), quantization=args.quantization, device=str(device),
        rank=args.rank, alpha=lora_alpha(args), target_modules=targets,
        train_examples=len(data.train), held_out_examples=len(data.held_out),
        dropped_examples=data.num_dropped, steps=run.steps, epochs=run.epochs,
        tokens=run.tokens, target_tokens=run.target_tokens, seconds=round(seconds, 3),
        tokens_per_s=round(run.tokens / seconds, 1), held_out_loss_before=before,
        held_out_loss_after=after, train_loss_first=run.losses[0], train_loss_last=run.losses[-1],
        base_bytes=frozen_bytes(model), loaded_rss_bytes=loaded_rss,
        training_peak_rss_bytes=status_bytes("VmHWM"), peak_rss_bytes=peak_rss(),
    )  # fmt: skip
    (out / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def lora_alpha(args: argparse.Namespace) -> float:
    return float(args.alpha if args.alpha is not None else 2 * args.rank)


# -- the model --------------------------------------------------------------------------------


def load_base(model_dir: Path) -> tuple[nn.Module, dict[str, QuantWeight]]:
    """The fp32 transformers model of model_dir, and the blocks it stores (by weight name):
    a directory of p3 blocks (quantization.json) is dequantized into the model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from p3.weights.convert import read_quantization

    if not read_quantization(model_dir):
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, local_files_only=True
        )
        return model, {}
    from p3.weights.read import iter_state_dict

    stored: dict[str, QuantWeight] = {}
    state = {}
    for name, tensor in iter_state_dict(model_dir):
        if isinstance(tensor, QuantWeight):
            stored[name] = tensor
            tensor = tensor.dequantize()
        state[name] = tensor.float()
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32)
    model.name_or_path = str(model_dir)
    return model, stored


def default_targets(model: nn.Module) -> list[str]:
    """The attention and MLP projections the model has (PROJECTIONS), outside any experts."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".experts." not in name
    }
    found = [p for p in PROJECTIONS if p in names]
    if not found:
        raise ValueError(
            f"the model has none of the projections {', '.join(PROJECTIONS)}: give --target-modules"
        )
    return found


def load_peft_model(model_dir: Path, args, device: torch.device) -> tuple[nn.Module, list[str]]:
    from peft import LoraConfig, get_peft_model

    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    base, stored = load_base(model_dir)
    targets = (
        [t.strip() for t in args.target_modules.split(",") if t.strip()]
        if args.target_modules
        else default_targets(base)
    )
    base.config.use_cache = False
    base.to(device)
    config = LoraConfig(
        r=args.rank, lora_alpha=lora_alpha(args), lora_dropout=args.dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            model = get_peft_model(base, config)
    except ValueError as exc:  # a target the model does not have
        raise ValueError(f"--target-modules {','.join(targets)}: {exc}") from None
    if args.quantization != "none":
        from p3.finetune.qlora import quantize_lora_bases

        quantize_lora_bases(model, args.quantization, stored)
    del stored
    release_freed_memory()  # what loading left behind (and QLoRA's fp32 projections)
    model.train()
    return model, targets


def frozen_bytes(model: nn.Module) -> int:
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return frozen + buffers


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def release_freed_memory() -> None:
    """glibc keeps freed heap pages; give them back to the system (elsewhere: nothing)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> None:
    """Linux: VmHWM starts again from the current RSS (so it measures training, not loading,
    whose fp32 copy of the base is gone once a QLoRA base is quantized)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError):
        pass
    return None


def save_adapter(model: nn.Module, out: Path, model_dir: Path) -> None:
    """adapter_config.json + adapter_model.safetensors (peft's), checked as p3 reads them."""
    model.peft_config["default"].base_model_name_or_path = str(model_dir)
    model.save_pretrained(out)
    read_adapter_config(out)


# -- batches and the loss ---------------------------------------------------------------------


def batches(examples: list[Example], size: int) -> list[list[Example]]:
    ordered = sorted(examples, key=lambda e: (len(e.ids), e.line))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def pad(batch: list[Example], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """ids [B, T] padded on the right with pad_id, and targets [B, T] (False on padding)."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    targets = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, example in enumerate(batch):
        ids[row, : len(example.ids)] = torch.tensor(example.ids)
        targets[row, : len(example.ids)] = torch.tensor(example.targets)
    targets[:, 0] = False  # nothing predicts the first token
    return ids.to(device), targets.to(device)


def loss_sum(model: nn.Module, ids: Tensor, targets: Tensor) -> Tensor:
    """The summed cross-entropy of the target tokens; logits only where some row predicts."""
    keep = targets[:, 1:].any(0).nonzero().squeeze(1)  # positions whose next token is a target
    logits = model(input_ids=ids, logits_to_keep=keep).logits  # [B, len(keep), V]
    wanted = targets[:, keep + 1]
    return F.cross_entropy(logits[wanted].float(), ids[:, keep + 1][wanted], reduction="sum")


def micro_batches(ids: Tensor, targets: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Rows split so that each part's logits stay within LOGIT_BUDGET rows x positions."""
    width = max(int(targets[:, 1:].any(0).sum()), 1)
    rows = max(LOGIT_BUDGET // width, 1)
    parts = []
    for start in range(0, ids.shape[0], rows):
        part_ids, part_targets = ids[start : start + rows], targets[start : start + rows]
        used = int(part_targets.any(0).nonzero().max()) + 1  # drop columns of padding alone
        parts.append((part_ids[:, :used], part_targets[:, :used]))
    return parts


def pad_id(tokenizer: Tokenizer) -> int:
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return token
    return 0


@torch.no_grad()
def held_out_loss(
    model: nn.Module, examples: list[Example], size: int, tokenizer: Tokenizer, device
) -> float | None:
    """Mean cross-entropy per target token over the held-out examples (None: there are none)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches(examples, size):
        ids, targets = pad(batch, pad_id(tokenizer), device)
        for part_ids, part_targets in micro_batches(ids, targets):
            total += float(loss_sum(model, part_ids, part_targets))
            count += int(part_targets.sum())
    model.train(was_training)
    return round(total / count, 6)


# -- the loop ---------------------------------------------------------------------------------


@dataclass
class Run:
    steps: int
    epochs: float
    tokens: int
    target_tokens: int
    losses: list[float]


def learning_rate(step: int, steps: int, warmup: int, peak: float) -> float:
    """Step (0-based): linear warmup over `warmup` steps to peak, then linear decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (steps - step) / max(steps - warmup, 1)


def train(model, data: Dataset, args, tokenizer: Tokenizer, device, log_path: Path) -> Run:
    from tqdm import tqdm

    per_epoch = batches(data.train, args.batch_size)
    steps = args.max_steps or max(1, math.ceil(args.epochs * len(per_epoch)))
    warmup = args.warmup_steps if args.warmup_steps is not None else steps // 10
    warmup = min(warmup, steps - 1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    rng = random.Random(args.seed)
    order: list[list[Example]] = []
    run = Run(steps, round(steps / len(per_epoch), 3), 0, 0, [])
    bar = tqdm(total=steps, desc="finetune", unit="step", disable=args.quiet, file=sys.stderr)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        for step in range(steps):
            if not order:  # a new epoch: the batches in a new order
                order = per_epoch[:]
                rng.shuffle(order)
            batch = order.pop()
            lr = learning_rate(step, steps, warmup, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            began = time.perf_counter()
            ids, targets = pad(batch, pad_id(tokenizer), device)
            count = int(targets.sum())
            loss = 0.0
            for part_ids, part_targets in micro_batches(ids, targets):
                part = loss_sum(model, part_ids, part_targets) / count
                part.backward()
                loss += float(part.detach())
            norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens = sum(len(e.ids) for e in batch)
            run.tokens += tokens
            run.target_tokens += count
            run.losses.append(round(loss, 6))
            now = time.perf_counter()
            record = {
                "step": step + 1, "loss": round(loss, 6), "lr": lr,
                "tokens_per_s": round(tokens / (now - began), 1),
                "tokens": run.tokens, "grad_norm": round(float(norm), 4),
            }  # fmt: skip
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{run.tokens / (now - start):.0f}")
            bar.update()
    bar.close()
    return run


def format_summary(summary: Summary, out: Path) -> str:
    lines = [
        f"trained {summary.steps} steps ({summary.epochs} epochs) on {summary.tokens} tokens "
        f"({summary.target_tokens} targets) in {summary.seconds:.1f} s: "
        f"{summary.tokens_per_s:.1f} tokens/s ({summary.device}, base {summary.quantization}, "
        f"{summary.base_bytes / 2**20:.0f} MiB frozen)",
        f"training loss {summary.train_loss_first:.4f} -> {summary.train_loss_last:.4f}",
    ]
    if summary.held_out_loss_before is not None:
        lines.append(
            f"held-out loss {summary.held_out_loss_before:.4f} -> "
            f"{summary.held_out_loss_after:.4f} ({summary.held_out_examples} examples)"
        )
    lines.append(f"adapter: {out} (loss curve {out / LOG_FILE}, summary {out / SUMMARY_FILE})")
    return "\n".join(lines)
