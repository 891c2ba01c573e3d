"""A shakegpt model as a Hugging Face `transformers` model, with its character tokenizer as a
`tokenizers` tokenizer, so that `AutoModelForCausalLM` and `AutoTokenizer` load it without shakegpt.

Each position encoding maps onto the `transformers` architecture that computes exactly what the
model computes, registered by name in `HF_ARCHITECTURES`:

- learned, sinusoidal and none: GPT-2, whose learned position table takes the learned table, the
  fixed sin/cos table or zeros;
- rope: GPT-NeoX with rotary embeddings on every channel of a head and the residual added after
  attention and again after the feed-forward (`use_parallel_residual=False`), as shakegpt's blocks
  do. NeoX rotates the two halves of a head where shakegpt rotates (even, odd) pairs, and stores
  q, k and v head by head: the weights' rows are reordered to match, which changes no result.

Both architectures have biases everywhere: a model trained without them gets zeros. What neither
has (ALiBi, RMSNorm, SwiGLU, per-head QK-norm, a logit soft-cap, the original runs' norm over the
whole window) is refused in one line naming the setting. `transformers` is imported only here, and
only when an export is asked for: it is the `hf` extra, not a dependency.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shakegpt.errors import ConfigError
from shakegpt.model import GPT, GPTConfig
from shakegpt.tokenizer import UNK, CharTokenizer

# what transformers calls the activations shakegpt's feed-forwards use (both exact: F.gelu, relu(x)^2)
HF_ACTIVATIONS = {"gelu": "gelu", "relu2": "relu2"}
LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, which shakegpt's norms use


@dataclass(frozen=True)
class HFArchitecture:
    name: str  # transformers' model type, as the model card names it
    build: Callable[[GPT], Any]  # GPT -> a transformers PreTrainedModel holding its weights


HF_ARCHITECTURES: dict[str, HFArchitecture] = {}


def register_hf(pos_encoding: str, name: str):
    """Decorator: export models with `model.pos_encoding=<pos_encoding>` through `build`."""

    def add(build: Callable[[GPT], Any]) -> Callable[[GPT], Any]:
        HF_ARCHITECTURES[pos_encoding] = HFArchitecture(name, build)
        return build

    return add


def check_exportable(cfg: GPTConfig) -> None:
    """Refuse, in one line naming the setting, a model that no `transformers` architecture computes exactly."""
    if cfg.pos_encoding not in HF_ARCHITECTURES:
        raise ConfigError(
            f"model.pos_encoding={cfg.pos_encoding} has no exact counterpart in transformers (exported: "
            f"{', '.join(HF_ARCHITECTURES)}); export it as a shakegpt bundle (--format bundle) instead"
        )
    arch = HF_ARCHITECTURES[cfg.pos_encoding].name
    differs = []
    if cfg.norm != "layernorm":
        differs.append(f"model.norm={cfg.norm}")
    if cfg.mlp not in HF_ACTIVATIONS:
        differs.append(f"model.mlp={cfg.mlp}")
    if cfg.qk_norm:
        differs.append("model.qk_norm=true")
    if cfg.logit_softcap is not None:
        differs.append(f"model.logit_softcap={cfg.logit_softcap}")
    if differs:
        raise ConfigError(
            f"{', '.join(differs)} has no exact counterpart in transformers' {arch} (which this model's "
            f"model.pos_encoding={cfg.pos_encoding} maps to); export it as a shakegpt bundle (--format bundle) instead"
        )


def _copy(dest: torch.Tensor, src: torch.Tensor | None) -> None:
    """Fill `dest` with `src`, or with zeros where shakegpt has no such parameter (bias=false)."""
    with torch.no_grad():
        if src is None:
            dest.zero_()
        else:
            dest.copy_(src.detach().reshape(dest.shape))


def _layernorm(dest, src: torch.nn.LayerNorm) -> None:
    _copy(dest.weight, src.weight)
    _copy(dest.bias, src.bias)


def _head(hf_model, model: GPT) -> None:
    if not model.cfg.tie_weights:  # a tied head is the embedding, which is already in place
        _copy(hf_model.get_output_embeddings().weight, model.head.weight)


@register_hf("learned", "gpt2")
@register_hf("sinusoidal", "gpt2")
@register_hf("none", "gpt2")
def to_gpt2(model: GPT) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.cfg
    config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.max_seq_len,
        n_embd=c.d_model,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.d_ff,
        activation_function=HF_ACTIVATIONS[c.mlp],
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.attn_dropout,
        layer_norm_epsilon=LAYERNORM_EPS,
        tie_word_embeddings=c.tie_weights,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf = GPT2LMHeadModel(config).eval()
    t = hf.transformer
    _copy(t.wte.weight, model.tok_emb.weight)
    positions = {"learned": lambda: model.pos.table.weight, "sinusoidal": lambda: model.pos.table, "none": lambda: None}
    _copy(t.wpe.weight, positions[c.pos_encoding]())
    for ours, theirs in zip(model.blocks, t.h, strict=True):
        _layernorm(theirs.ln_1, ours.ln1)
        _layernorm(theirs.ln_2, ours.ln2)
        # GPT-2's Conv1D keeps its weight as (in, out): nn.Linear's transposed
        _copy(theirs.attn.c_attn.weight, ours.attn.qkv.weight.T)
        _copy(theirs.attn.c_attn.bias, ours.attn.qkv.bias)
        _copy(theirs.attn.c_proj.weight, ours.attn.proj.weight.T)
        _copy(theirs.attn.c_proj.bias, ours.attn.proj.bias)
        _copy(theirs.mlp.c_fc.weight, ours.ffn.up.weight.T)
        _copy(theirs.mlp.c_fc.bias, ours.ffn.up.bias)
        _copy(theirs.mlp.c_proj.weight, ours.ffn.down.weight.T)
        _copy(theirs.mlp.c_proj.bias, ours.ffn.down.bias)
    _layernorm(t.ln_f, model.ln_f)
    _head(hf, model)
    return hf


def neox_qkv_rows(n_head: int, head_dim: int) -> torch.Tensor:
    """The row order that turns shakegpt's fused qkv projection into GPT-NeoX's: shakegpt's rows are
    (q, k, v) x head x channel with RoPE on (even, odd) channel pairs; NeoX's are head x (q, k, v) x
    channel with RoPE on (first half, second half) pairs, so q's and k's channels go evens first."""
    halves = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    plain = torch.arange(head_dim)
    rows = []
    for h in range(n_head):
        for part, channels in ((0, halves), (1, halves), (2, plain)):  # q, k rotated; v as it is
            rows.append(part * n_head * head_dim + h * head_dim + channels)
    return torch.cat(rows)


@register_hf("rope", "gpt_neox")
def to_gpt_neox(model: GPT) -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    c = model.cfg
    config = GPTNeoXConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        intermediate_size=c.d_ff,
        hidden_act=HF_ACTIVATIONS[c.mlp],
        rotary_pct=1.0,
        rotary_emb_base=c.rope_base,
        max_position_embeddings=c.max_seq_len,
        layer_norm_eps=LAYERNORM_EPS,
        use_parallel_residual=False,
        attention_bias=True,
        hidden_dropout=c.dropout,
        attention_dropout=c.attn_dropout,
        tie_word_embeddings=c.tie_weights,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf = GPTNeoXForCausalLM(config).eval()
    t = hf.gpt_neox
    rows = neox_qkv_rows(c.n_head, c.head_dim)
    _copy(t.embed_in.weight, model.tok_emb.weight)
    for ours, theirs in zip(model.blocks, t.layers, strict=True):
        _layernorm(theirs.input_layernorm, ours.ln1)
        _layernorm(theirs.post_attention_layernorm, ours.ln2)
        qkv = ours.attn.qkv
        _copy(theirs.attention.query_key_value.weight, qkv.weight[rows])
        _copy(theirs.attention.query_key_value.bias, None if qkv.bias is None else qkv.bias[rows])
        _copy(theirs.attention.dense.weight, ours.attn.proj.weight)
        _copy(theirs.attention.dense.bias, ours.attn.proj.bias)
        _copy(theirs.mlp.dense_h_to_4h.weight, ours.ffn.up.weight)
        _copy(theirs.mlp.dense_h_to_4h.bias, ours.ffn.up.bias)
        _copy(theirs.mlp.dense_4h_to_h.weight, ours.ffn.down.weight)
        _copy(theirs.mlp.dense_4h_to_h.bias, ours.ffn.down.bias)
    _layernorm(t.final_layer_norm, model.ln_f)
    _head(hf, model)
    return hf


def to_hf_model(model: GPT) -> Any:
    """The `transformers` model that computes what `model` computes (in eval mode)."""
    check_exportable(model.cfg)
    return HF_ARCHITECTURES[model.cfg.pos_encoding].build(model)


def to_hf_tokenizer(tokenizer: CharTokenizer) -> Any:
    """The character vocabulary as a `transformers` fast tokenizer: one token per character (the same
    ids), `<unk>` for a character outside it, and decoding that joins characters with nothing between."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(tokenizer.chars)} | {UNK: tokenizer.unk_id}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, \n too
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, clean_up_tokenization_spaces=False)


def model_card(cfg: GPTConfig, architecture: str, val_loss: float | None, step: int | None, command: str | None) -> str:
    """The README.md of an exported directory: what the model is, its config, how good it is, how it was made."""
    loss = f"{val_loss:.4f}" if val_loss is not None else "not recorded in the checkpoint"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [shakegpt, character-level, text-generation]",
        "---",
        "",
        "# A character-level GPT trained with shakegpt",
        "",
        f"A {cfg.n_layer}-layer, {cfg.d_model}-wide character-level model, exported as transformers' "
        f"`{architecture}` (it computes what shakegpt's model computes). One token per character.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this directory>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this directory>")',
        'ids = tokenizer("ROMEO:", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=200, do_sample=True)[0]))",
        "```",
        "",
        f"Context: at most {cfg.max_seq_len} characters.",
        "",
        "## Result",
        "",
        f"- val loss (nats per character): {loss}" + (f", at step {step}" if step is not None else ""),
    ]
    if command:
        lines += ["- trained with: `" + command + "`"]
    lines += ["", "## shakegpt config", "", "```json", json.dumps(cfg.to_dict(), indent=2), "```", ""]
    return "\n".join(lines)


HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md")


def save_hf(model: GPT, tokenizer: CharTokenizer, out_dir: str | Path, card: str) -> None:
    """Write the `transformers` model, its tokenizer and the model card into `out_dir`."""
    hf_model = to_hf_model(model)
    out = Path(out_dir)
    hf_model.save_pretrained(out)
    to_hf_tokenizer(tokenizer).save_pretrained(out)
    (out / "README.md").write_text(card, encoding="utf-8")
