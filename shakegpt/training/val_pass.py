"""The deterministic full pass over the validation split, in plain PyTorch: every non-overlapping
window once, the mean loss and accuracy over every character. Training logs the same numbers as
val/* (through Lightning, shared across DDP ranks); `shakegpt.commands.evaluate` uses this pass directly."""

from __future__ import annotations

import contextlib
import copy
import math
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from shakegpt.corpus import ValWindows
from shakegpt.errors import ConfigError
from shakegpt.model import GPT

# Lightning's precision names and what each means for a forward pass on the CPU
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
CAST = {"32-true": torch.float32, "32": torch.float32, "bf16-true": torch.bfloat16, "64-true": torch.float64}


def loss_and_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy (in fp32) and the share of top-1 hits of logits (B, T, V) for targets (B, T):
    what training logs and what this pass sums."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return loss, (logits.argmax(-1) == targets).float().mean()


@torch.no_grad()
def full_val_pass(
    model: GPT, val_ids: torch.Tensor, seq_len: int, batch_size: int, precision: str = "32-true"
) -> tuple[dict[str, float], float]:
    """({"val/loss", "val/acc", "val/bpc", "val/loss_last"}, seconds) of `model` over every window of
    `val_ids`. `val/loss_last` is the loss at each window's last position alone: there no later
    character exists, so a model that is not causal (`model/norm=seq_layernorm`) cannot see one."""
    if precision not in AUTOCAST and precision not in CAST:
        raise ConfigError(f"precision={precision!r} is unknown; choose one of {', '.join([*CAST, *AUTOCAST])}")
    was_training = model.training
    if CAST.get(precision, torch.float32) != torch.float32:  # a copy: the caller's model keeps its dtype
        model = copy.deepcopy(model).to(CAST[precision])
    model.eval()
    batches = DataLoader(ValWindows(val_ids, seq_len), batch_size=batch_size, shuffle=False)  # as in training
    loss_sum = correct = count = last_sum = windows = 0.0
    start = time.perf_counter()
    for x, y in batches:
        ctx = torch.autocast("cpu", dtype=AUTOCAST[precision]) if precision in AUTOCAST else contextlib.nullcontext()
        with ctx:
            logits = model(x)  # (B, T, V)
        loss, acc = loss_and_accuracy(logits, y)
        last_sum += F.cross_entropy(logits[:, -1].float(), y[:, -1], reduction="sum").item()
        windows += y.size(0)
        n = y.numel()
        loss_sum, correct, count = loss_sum + loss.item() * n, correct + acc.item() * n, count + n
    model.train(was_training)
    loss = loss_sum / count
    metrics = {"val/loss": loss, "val/acc": correct / count, "val/bpc": loss / math.log(2)}
    metrics["val/loss_last"] = last_sum / windows
    return metrics, time.perf_counter() - start
