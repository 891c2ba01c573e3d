"""The optimizers a run can use: a registry, name -> `OptimizerSpec`, each one torch optimizer as
Lightning sees it, so the learning-rate schedule, gradient clipping and checkpoints work on all:

- `adamw`: AdamW, with weight decay on matrices (Linear weights, embeddings, the head), none on any
  norm's parameters (2-D ones included) or biases: each parameter's role comes from `GPT.parameter_roles`;
- `muon`: Muon (`torch.optim.Muon`) for the blocks' hidden matrices (attention and feed-forward
  weights), AdamW for the embeddings, the output head, gains and biases, as in modded-nanogpt.
  Muon's updates are scaled to AdamW's RMS (`adjust_lr_fn="match_rms_adamw"`), so both follow the
  same learning rate and weight decay (torch's documentation: the scaling lets Muon reuse AdamW's).
  Where bf16 is emulated its Newton-Schulz iteration runs in fp32 (`Muon`).

Every optimizer takes the settings every run has (`COMMON`: lr, weight decay, betas and the
schedule's); one with settings of its own registers them with their defaults, and its yaml in
`conf/optim/` sets them (`optim.<key>`). Adding one is `@register_optimizer` and a yaml.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shakegpt.errors import ConfigError, checked_once, is_number, is_sequence, non_negative_int
from shakegpt.hardware import cpu_has_fast_bf16

SCHEDULES = ("cosine", "constant")
# the settings of every run's optimizer, whichever it is (`optim.name` picks it)
COMMON = ("lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio", "schedule", "name")


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer a run can use.

    build(roles_and_params, *, lr, weight_decay, betas, fused, **settings) -> torch.optim.Optimizer,
      where roles_and_params is [(role, parameter)] (roles: `GPT.parameter_roles`; decay only
      `DECAYED` ones) and settings are its own, defaults filled in;
    settings: its own settings (keys of `optim` beyond `COMMON`) and their defaults;
    check(settings): raises ConfigError naming a bad value;
    requires(): raises ConfigError where this torch cannot run it.
    """

    build: Callable[..., torch.optim.Optimizer]
    settings: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Mapping[str, Any]], None] | None = None
    requires: Callable[[], None] | None = None


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(
    name: str,
    *,
    settings: Mapping[str, Any] | None = None,
    check: Callable[[Mapping[str, Any]], None] | None = None,
    requires: Callable[[], None] | None = None,
):
    """Decorator: `build` becomes the optimizer `optim.name=<name>` (see `OptimizerSpec`)."""

    def add(build: Callable[..., torch.optim.Optimizer]):
        OPTIMIZERS[name] = OptimizerSpec(build, dict(settings or {}), check, requires)
        return build

    return add


def has_muon() -> bool:
    return hasattr(torch.optim, "Muon")


def require_muon() -> None:
    if not has_muon():
        raise ConfigError(
            f"optim=muon needs torch.optim.Muon, which this torch ({torch.__version__}) does not have; "
            "upgrade torch, or use optim=adamw"
        )


def spec_of(name: Any) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={name!r} is unknown; choose one of {', '.join(OPTIMIZERS)} (optim=<name>)")
    return OPTIMIZERS[name]


def own_settings(optim: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of `optim` that belong to its optimizer alone, its defaults filled in; a key that
    is neither common nor the optimizer's is refused, naming the ones it has."""
    name = optim.get("name", "adamw")
    spec = spec_of(name)
    given = {k: v for k, v in optim.items() if k not in COMMON}
    unknown = sorted(set(given) - set(spec.settings))
    if unknown:
        keys = ", ".join(f"optim.{k}" for k in (*COMMON[:-1], *spec.settings))
        raise ConfigError(f"optim.{unknown[0]} is not a setting of optim={name}; its settings: {keys}")
    return {**spec.settings, **given}


@checked_once
def check_optim(optim: Mapping) -> None:
    lr = optim.get("lr")
    if not is_number(lr) or lr <= 0:
        raise ConfigError(f"optim.lr={lr!r} is invalid; it must be > 0")
    wd = optim.get("weight_decay")
    if not is_number(wd) or wd < 0:
        raise ConfigError(f"optim.weight_decay={wd!r} is invalid; it must be a number >= 0 (0 turns it off)")
    betas = optim.get("betas")
    if not is_sequence(betas) or len(betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in betas):
        shown = list(betas) if is_sequence(betas) else betas
        raise ConfigError(
            f"optim.betas={shown!r} is invalid; it must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.99]"
        )
    non_negative_int("optim.warmup_steps", optim.get("warmup_steps"))
    ratio = optim.get("min_lr_ratio")
    if not is_number(ratio) or not 0 <= ratio <= 1:
        raise ConfigError(
            f"optim.min_lr_ratio={ratio!r} is invalid; it must be in [0, 1] (the final lr as a share of optim.lr)"
        )
    schedule = optim.get("schedule")
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    spec = spec_of(optim.get("name", "adamw"))
    settings = own_settings(optim)
    if spec.check is not None:
        spec.check(settings)
    if spec.requires is not None:
        spec.requires()


def roles_of(model: nn.Module) -> dict[str, str]:
    """Each parameter's role (`GPT.parameter_roles`); a model without roles is read by rank: a 2-D
    weight inside `blocks.` is a matrix, other 2-D ones embeddings, the rest biases."""
    if hasattr(model, "parameter_roles"):
        return model.parameter_roles()
    return {
        n: ("matrix" if n.startswith("blocks.") else "embedding") if p.dim() >= 2 else "bias"
        for n, p in model.named_parameters()
    }


DECAYED = ("matrix", "embedding", "head")  # weight decay pulls these towards 0; never gains or biases


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas,
    fused: bool = True,
    **settings: Any,
) -> torch.optim.Optimizer:
    """The optimizer `name` over the model's trainable parameters; `settings` are its own (defaults
    for any not given)."""
    spec = spec_of(name)
    if spec.requires is not None:
        spec.requires()
    roles = roles_of(model)
    named = [(roles[n], p) for n, p in model.named_parameters() if p.requires_grad]
    fused = fused and all(p.device.type in ("cpu", "cuda") for _, p in named)
    own = own_settings({"name": name, **settings})
    return spec.build(named, lr=lr, weight_decay=weight_decay, betas=tuple(betas), fused=fused, **own)


def adamw_groups(with_roles: list[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """Two AdamW groups: the `DECAYED` roles with `weight_decay`, the rest without."""
    return [
        {"params": [p for role, p in with_roles if role in DECAYED], "weight_decay": weight_decay},
        {"params": [p for role, p in with_roles if role not in DECAYED], "weight_decay": 0.0},
    ]


@register_optimizer("adamw")
def _adamw(named, *, lr, weight_decay, betas, fused):
    return torch.optim.AdamW(adamw_groups(named, weight_decay), lr=lr, betas=betas, fused=fused)


def _check_muon(settings: Mapping[str, Any]) -> None:
    momentum = settings["muon_momentum"]
    if not is_number(momentum) or not 0 <= momentum < 1:
        raise ConfigError(f"optim.muon_momentum={momentum!r} is invalid; it must be in [0, 1)")


@register_optimizer("muon", settings={"muon_momentum": 0.95}, check=_check_muon, requires=require_muon)
def _muon(named, *, lr, weight_decay, betas, fused, muon_momentum):
    hidden = [p for role, p in named if role == "matrix"]
    rest = [(role, p) for role, p in named if role != "matrix"]
    return MuonWithAdamW(hidden, adamw_groups(rest, weight_decay), lr, weight_decay, betas, muon_momentum, fused)


# the settings of a param group that say how the optimizer runs, not what it does: a resumed run
# keeps the ones its own optimizer was built with
IMPLEMENTATION_KEYS = ("params", "fused", "foreach", "capturable", "differentiable")


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Per param group, in the optimizer's order, the settings a run's config decides (a resumed
    run writes these over the checkpoint's)."""
    return [{k: v for k, v in g.items() if k not in IMPLEMENTATION_KEYS} for g in optimizer.param_groups]


def rms_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's learning-rate factor for a matrix of `shape`, as torch.optim.Muon's `adjust_lr_fn` names it:
    "match_rms_adamw" scales the orthogonal update to AdamW's typical RMS (0.2 * sqrt(larger side));
    "original" (or None) by sqrt(rows / columns) where that exceeds 1."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    return 1.0


def orthogonalize(m: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """The quintic Newton-Schulz iteration Muon applies to a 2-D update, in fp32: it maps the
    matrix's singular values near 1 while keeping its singular vectors (Keller Jordan's Muon)."""
    a, b, c = coefficients
    x = m.float()
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # iterate on the Gram matrix of the shorter side
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


class Muon(torch.optim.Muon):
    """torch.optim.Muon, except where bf16 is emulated (a CPU with neither AMX nor AVX512-BF16):
    there the Newton-Schulz iteration, which torch runs in bf16, runs in fp32 (`orthogonalize`).
    torch's bf16 iteration is several times slower there (docs/performance.md). Its settings and
    its state (`momentum_buffer`) are torch's own: the two paths keep the same state."""

    def __init__(self, params, **settings):
        super().__init__(params, **settings)
        # decided once, where the parameters are when the optimizer is made (Lightning makes it
        # after moving the model to its device), not again at every step
        on_cpu = all(p.device.type == "cpu" for group in self.param_groups for p in group["params"])
        self.fp32_iteration = on_cpu and not cpu_has_fast_bf16()

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        if not self.fp32_iteration:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * rms_scale(group["adjust_lr_fn"], p.shape))
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for `hidden` (2-D matrices), AdamW for `adamw_groups`, stepped together. Its param
    groups are the two inner optimizers' own (Muon's first), so a scheduler or a clipping pass over
    `param_groups` reaches all of them, and its state is theirs."""

    def __init__(self, hidden, adamw_groups, lr, weight_decay, betas, momentum=0.95, fused=True):
        self.muon = Muon(hidden, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=tuple(betas), fused=fused)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this one's groups and state (after a load replaced them)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss
