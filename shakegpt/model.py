"""GPTConfig and GPT: a decoder-only character transformer in plain PyTorch.

Knows nothing of Lightning or Hydra: build it from a `GPTConfig` (or a plain dict) anywhere.

Where dropout is applied (rate `dropout`): on the embedding sum, on the attention output
projection before it joins the residual stream, and on the feed-forward output before it joins the
residual stream. Attention probabilities get their own rate `attn_dropout` (0 by default: any
non-zero rate pushes `scaled_dot_product_attention` off its fused CPU kernel).

The CPU speed devices it uses (byte-mask dropout, the one-row matmul split of generation) live in
`shakegpt.fast_cpu`; `fast_dropout=False` restores torch's dropout. Training and cached generation
run the same forward: a new norm or feed-forward is written once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from shakegpt.errors import ConfigError
from shakegpt.fast_cpu import ByteDropout, linear
from shakegpt.mlps import MLPS
from shakegpt.norms import NORMS
from shakegpt.pos_encoding import POS_ENCODINGS, PositionEncoding, build_pos_encoding


@dataclass
class GPTConfig:
    vocab_size: int = 66
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_ff: int | None = None  # FFN hidden size; None means 4 * d_model (nanoGPT); the original runs use 2 * d_model
    dropout: float = 0.0
    attn_dropout: float = 0.0
    fast_dropout: bool = True  # ByteDropout on the CPU (rate rounded to 1/256); False: nn.Dropout
    bias: bool = False  # biases in every Linear and LayerNorm
    tie_weights: bool = False  # output head shares the token embedding matrix
    max_seq_len: int = 256
    pos_encoding: str = "learned"
    rope_base: float = 10000.0
    norm: str = "layernorm"  # a name in shakegpt.norms.NORMS; seq_layernorm (the original runs') is not causal
    mlp: str = "gelu"  # a name in shakegpt.mlps.MLPS; swiglu is a gated unit (3 matrices of d_ff)
    qk_norm: bool = False  # RMS-normalize each head's queries and keys before attention
    logit_softcap: float | None = None  # squash the logits into (-cap, cap) with cap * tanh(logits / cap)
    zero_init_proj: bool = False  # start each block's two output projections at zero (an identity block)

    # the fields a checkpoint's weights are laid out by: resuming must keep them (dropout may change)
    ARCHITECTURE: ClassVar[tuple[str, ...]] = (
        "vocab_size",
        "d_model",
        "n_layer",
        "n_head",
        "d_ff",
        "bias",
        "tie_weights",
        "pos_encoding",
        "max_seq_len",
        # the same shapes, another function: a checkpoint of one cannot continue as the other
        "norm",
        "mlp",
        "qk_norm",
        "logit_softcap",
    )

    def __post_init__(self):
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name}={value!r} is invalid; it must be a positive integer")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name}={value!r} is invalid; it must be in [0, 1)")
        if self.d_model % self.n_head:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                f"pick n_head among the divisors of {self.d_model}"
            )
        if self.pos_encoding not in POS_ENCODINGS:
            raise ConfigError(
                f"model.pos_encoding={self.pos_encoding!r} is unknown; choose one of {', '.join(POS_ENCODINGS)}"
            )
        POS_ENCODINGS[self.pos_encoding].check(self)
        if self.rope_base <= 1.0:
            raise ConfigError(f"model.rope_base={self.rope_base!r} is invalid; it must be > 1")
        for name, known in (("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in known:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is unknown; choose one of {', '.join(known)}")
        if self.logit_softcap is not None and (isinstance(self.logit_softcap, bool) or not self.logit_softcap > 0):
            raise ConfigError(f"model.logit_softcap={self.logit_softcap!r} is invalid; it must be > 0, or null (off)")

    @property
    def causal(self) -> bool:
        """Whether a position's output depends on earlier positions only. The original runs' norm
        over the (seq, d_model) plane mixes every position's statistics into every other's."""
        return NORMS[self.norm].causal

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_dict(cls, d: Mapping, vocab_size: int | None = None) -> GPTConfig:
        """The config of `d`; where `d` leaves `vocab_size` null (the presets do: it follows the corpus),
        the given `vocab_size` (a corpus's characters + <unk>)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        d = dict(d)
        if d.get("vocab_size", 0) is None:
            if vocab_size is None:
                raise ConfigError("model.vocab_size is null (the corpus's characters + <unk>) and no corpus was read")
            d["vocab_size"] = vocab_size
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qk_norm = cfg.qk_norm
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = ByteDropout(cfg.dropout, cfg.fast_dropout)

    def forward(
        self,
        x: torch.Tensor,
        pos: PositionEncoding,
        bias: torch.Tensor | None,
        offset: int,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, H, T, hd): few ops, since in generation each op's overhead counts
        q, k, v = (
            linear(x, self.qkv.weight, self.qkv.bias)
            .view(B, T, 3, self.n_head, C // self.n_head)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        if self.qk_norm:  # unit RMS per head: attention scores stay in range whatever the weights grow to
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        q, k = pos.rotate(q, k, offset)
        if cache is not None:  # prepend the keys and values of the tokens before this chunk
            k, v = cache.extend(layer, k, v)
        p = self.attn_dropout if self.training else 0.0
        if bias is not None:  # the bias carries the causal mask itself
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p)
        elif k.size(2) == T:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif T == 1:  # one new token sees every cached one
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # a chunk after a cached prefix: query i sees keys up to offset + i
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(k.size(2) - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = linear(y.transpose(1, 2).reshape(B, T, C), self.proj.weight, self.proj.bias)
        return self.resid_dropout(y) if self.training else y  # (dropout is a no-op in eval: skip its call)


class KVCache:
    """The keys and values of every layer for the tokens processed so far, so that generation runs
    the model on one new token per step instead of the whole context. Buffers of `capacity`
    positions are filled in place: no copy of the whole cache per step."""

    def __init__(self, n_layer: int, capacity: int):
        self.capacity = capacity
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.lengths = [0] * n_layer

    def __len__(self) -> int:
        return self.lengths[0]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, H, T, hd) to `layer`'s cache; return all of its keys and values so far."""
        start, end = self.lengths[layer], self.lengths[layer] + k.size(2)
        if end > self.capacity:
            raise ConfigError(f"KV cache of {self.capacity} positions cannot take {end}; start a new cache")
        if self.k[layer] is None:
            B, H, _, hd = k.shape
            self.k[layer] = k.new_empty(B, H, self.capacity, hd)
            self.v[layer] = v.new_empty(B, H, self.capacity, hd)
        self.k[layer].narrow(2, start, end - start).copy_(k)
        self.v[layer].narrow(2, start, end - start).copy_(v)
        self.lengths[layer] = end
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)


class FeedForward(nn.Module):
    """d_model -> d_ff -> d_model with the activation `model.mlp` names (`shakegpt.mlps`); a gated one
    (SwiGLU) gets an `up` projection as many d_ff wide as its halves."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        spec = MLPS[cfg.mlp]
        self.activation = spec.activation
        self.up = nn.Linear(cfg.d_model, spec.halves * cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = ByteDropout(cfg.dropout, cfg.fast_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(linear(x, self.up.weight, self.up.bias))
        y = linear(h, self.down.weight, self.down.bias)
        return self.dropout(y) if self.training else y


def make_norm(cfg: GPTConfig) -> nn.Module:
    return NORMS[cfg.norm].build(cfg)


class Block(nn.Module):
    """Pre-norm transformer block. LayerNorm and RMSNorm act on each position's d_model vector alone,
    so no information flows from later to earlier positions (`seq_layernorm`, the original runs'
    norm over the (seq, d_model) plane, leaks)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = make_norm(cfg)
        self.ffn = FeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        pos: PositionEncoding,
        bias: torch.Tensor | None,
        offset: int,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        # generation's one-token step skips nn.Module's call overhead (hooks on these two do not run then)
        decoding = cache is not None and x.size(1) == 1 and not self.training
        attn, ffn = (self.attn.forward, self.ffn.forward) if decoding else (self.attn, self.ffn)
        x = x + attn(self.ln1(x), pos, bias, offset, cache, layer)
        return x + ffn(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig | dict):
        super().__init__()
        if isinstance(cfg, dict):
            cfg = GPTConfig.from_dict(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = build_pos_encoding(cfg)
        self.drop = ByteDropout(cfg.dropout, cfg.fast_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two projections to the residual stream
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                if cfg.zero_init_proj:  # modded-nanogpt: every block starts as the identity
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, offset: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) token ids at positions offset..offset+T-1 -> logits (B, T, vocab_size). With a
        `cache` holding the first `offset` tokens, attention also sees those, and the cache grows."""
        T = idx.size(1)
        if not self.cfg.causal and (offset or cache is not None):
            raise ConfigError(
                "model.norm=seq_layernorm is not causal: every position depends on the whole window, so it "
                "cannot continue from cached keys and values; run the whole window (generation does)"
            )
        if offset + T > self.cfg.max_seq_len:
            raise ConfigError(
                f"sequence of {offset + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                "shorten the input or raise model.max_seq_len"
            )
        x = self.pos.embed(self.tok_emb(idx), offset)  # (B, T, C)
        if self.training:
            x = self.drop(x)
        bias = self.pos.attn_bias(T, offset, x.dtype, x.device)  # (H, T, offset + T) or None
        # one new token with a cache (generation's inner loop): call the blocks' forward directly,
        # since at this size the per-call overhead of nn.Module is a tenth of a step
        decoding = T == 1 and cache is not None and not self.training
        for i, block in enumerate(self.blocks):
            x = (block.forward if decoding else block)(x, self.pos, bias, offset, cache, i)
        logits = linear(self.ln_f(x), self.head.weight)  # (B, T, vocab)
        if self.cfg.logit_softcap is not None:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def param_breakdown(self) -> dict[str, int]:
        """Exact trainable parameter count per component; the values sum to the model's total
        (a tied head shares the embedding matrix and so counts 0)."""
        parts = dict.fromkeys(
            ("token_embedding", "position_embedding", "attention", "feed_forward", "layer_norm", "output_head"), 0
        )
        for name, p in self.named_parameters():  # named_parameters() yields a tied matrix once
            if name.startswith("tok_emb"):
                key = "token_embedding"
            elif name.startswith("pos."):
                key = "position_embedding"
            elif ".attn." in name:
                key = "attention"
            elif ".ffn." in name:
                key = "feed_forward"
            elif ".ln" in name or name.startswith("ln_f"):
                key = "layer_norm"
            elif name.startswith("head"):
                key = "output_head"
            else:  # a new parameter must be given a component, or the breakdown would silently drift
                raise AssertionError(f"parameter {name} belongs to no component")
            parts[key] += p.numel()
        return parts

    def parameter_roles(self) -> dict[str, str]:
        """Each trainable parameter's role, by the module it belongs to, not by its shape: "matrix" (a
        block's attention or feed-forward weight), "embedding" (token and position tables), "head",
        "norm" (any norm's gains and biases, even 2-D ones) or "bias" (a Linear's bias)."""
        # the norm modules as they are now (a deep copy of the model has its own)
        norms = {id(self.ln_f)} | {id(m) for b in self.blocks for m in (b.ln1, b.ln2)}
        roles = {}
        for name, p in self.named_parameters():
            owner, _, leaf = name.rpartition(".")
            if id(self.get_submodule(owner)) in norms:
                roles[name] = "norm"
            elif name.startswith(("tok_emb", "pos.")):
                roles[name] = "embedding"
            elif name.startswith("head"):
                roles[name] = "head"
            elif leaf == "bias" or p.dim() < 2:
                roles[name] = "bias"
            else:
                roles[name] = "matrix"
        return roles

    def num_params(self, non_embedding: bool = False) -> int:
        parts = self.param_breakdown()
        total = sum(parts.values())
        if non_embedding:
            total -= parts["token_embedding"] + parts["position_embedding"]
        return total


def original_formula_params(cfg: GPTConfig, seq_len: int) -> int:
    """The original shakeGPT runs' own count: d_m·d_in + 2·d_m·seq + N·(4·d_m² + 4·d_m·seq + 2·d_m·d_h) + d_m·d_in,
    plus seq·d_m for a learned position table. Its LayerNorms have affine shape (seq, d_model),
    hence the d_m·seq terms; it counts no Linear biases and an untied head."""
    d, n, v, h = cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.d_ff
    count = d * v + 2 * d * seq_len + n * (4 * d * d + 4 * d * seq_len + 2 * d * h) + d * v
    if cfg.pos_encoding == "learned":
        count += seq_len * d
    return count
