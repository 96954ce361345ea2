"""`p3 finetune`: a LoRA adapter trained on chat or text JSONL, saved in PEFT's format, which
p3 serves (`LLM(enable_lora=True)` with a LoRARequest) and peft loads.

The frozen base is a transformers model (fp32, on CUDA when there is one, else the CPU) with
peft's LoRA layers on its attention and MLP projections; with --quantization q8_0/q4_0/q4_1
(QLoRA) those projections' weights are held as p3's blocks instead (p3.finetune.qlora). The
training loop is p3's own (p3.finetune.train): AdamW, linear warmup and decay, gradient
clipping, batches of similar lengths. The data: p3.finetune.data.

This module is torch-free (p3.cli builds its parser from it).
"""

from __future__ import annotations

import argparse

# the projections p3's LoRA applies to (p3.engine.lora), fused checkpoint ones included: the
# default targets are those of them the model has
PROJECTIONS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj",
    "gate_proj", "up_proj", "down_proj", "gate_up_proj",
)  # fmt: skip
QUANTIZATIONS = ("none", "q8_0", "q4_0", "q4_1")
LOG_FILE = "training_log.jsonl"
SUMMARY_FILE = "training_summary.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="model directory, .gguf, or SmolLM2-135M-Instruct (default)"
    )
    parser.add_argument("--data", required=True, help="JSONL: {'messages': [...]} or {'text'}")
    parser.add_argument("--out", required=True, help="the adapter's directory (PEFT format)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 x r)")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    parser.add_argument(
        "--target-modules", default=None,
        help=f"comma-separated module names (default: those of {','.join(PROJECTIONS)} the "
        "model has: the attention and MLP projections)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    parser.add_argument("--max-steps", type=int, default=None, help="steps (overrides --epochs)")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="linear warmup (default 10%% of steps)"
    )
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--max-len", type=int, default=1024, help="tokens kept per example")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-fraction", type=float, default=0.1, help="share of examples held out"
    )
    parser.add_argument(
        "--quantization", choices=QUANTIZATIONS, default="none",
        help="the frozen base's projections as p3 blocks (QLoRA); none: fp32",
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if present)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def check_arguments(args: argparse.Namespace) -> None:
    """ValueError naming the first flag out of range."""
    checks = [
        (args.rank >= 1, f"--rank must be at least 1, got {args.rank}"),
        (args.alpha is None or args.alpha > 0, f"--alpha must be positive, got {args.alpha}"),
        (0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
        (args.epochs > 0, f"--epochs must be positive, got {args.epochs}"),
        (args.max_steps is None or args.max_steps >= 1, "--max-steps must be at least 1"),
        (args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.warmup_steps is None or args.warmup_steps >= 0, "--warmup-steps must be >= 0"),
        (args.max_grad_norm > 0, "--max-grad-norm must be positive"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.max_len >= 2, f"--max-len must be at least 2, got {args.max_len}"),
        (0 <= args.eval_fraction < 1, f"--eval-fraction must be in [0, 1): {args.eval_fraction}"),
    ]  # fmt: skip
    for ok, why in checks:
        if not ok:
            raise ValueError(why)
