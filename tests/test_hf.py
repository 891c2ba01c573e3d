"""The Hugging Face export (`shakegpt.hf`): for each position encoding it exports, the `transformers`
model gives shakegpt's logits, its tokenizer shakegpt's ids, and `generate` runs; what has no exact
counterpart is refused in one line."""

import pytest
import torch

from shakegpt import hf
from shakegpt.errors import ConfigError
from shakegpt.model import GPT, GPTConfig
from shakegpt.tokenizer import CharTokenizer

pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\tAll: Speak, speak! é"
TOKENIZER = CharTokenizer.from_text(TEXT)
# fp32 on a CPU: the same operations in another order (GPT-NeoX's rotation, GPT-2's Conv1D) differ
# by rounding only; measured at most 1e-6 on these models
ATOL = 1e-5


def perturbed_model(**settings) -> GPT:
    """A small model whose every parameter (norm gains and biases too) is moved off its initial
    value, so that a weight copied to the wrong place cannot go unseen."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=TOKENIZER.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=128, **settings)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


EXPORTED = [
    ("learned", {}),
    ("learned", {"bias": True, "tie_weights": True}),
    ("sinusoidal", {"mlp": "relu2"}),
    ("none", {}),
    ("rope", {}),
    ("rope", {"bias": True, "tie_weights": True, "mlp": "relu2", "rope_base": 500.0, "d_ff": 48}),
]


@pytest.mark.parametrize(("pos_encoding", "settings"), EXPORTED, ids=[f"{p}-{s}" for p, s in EXPORTED])
def test_the_exported_model_gives_shakegpts_logits_and_generates(pos_encoding, settings):
    model = perturbed_model(pos_encoding=pos_encoding, **settings)
    hf_model = hf.to_hf_model(model)
    assert hf_model.config.model_type == hf.HF_ARCHITECTURES[pos_encoding].name
    ids = TOKENIZER.encode(TEXT)[None]
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    # greedy generation with transformers' KV cache picks what shakegpt's logits pick, step by step
    out = hf_model.generate(ids[:, :10], max_new_tokens=8, do_sample=False, pad_token_id=TOKENIZER.unk_id)
    seq = ids[:, :10]
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_the_rows_reordered_for_gpt_neox_are_a_permutation():
    rows = hf.neox_qkv_rows(n_head=3, head_dim=4)
    assert sorted(rows.tolist()) == list(range(3 * 3 * 4))
    # head 0's q: shakegpt's channels 0, 2 (the first of each rotated pair), then 1, 3
    assert rows[:4].tolist() == [0, 2, 1, 3] and rows[8:12].tolist() == [24, 25, 26, 27]  # head 0's v unchanged


def test_the_tokenizer_gives_the_same_ids_and_text():
    tok = hf.to_hf_tokenizer(TOKENIZER)
    text = TEXT + "\n\nQ? 😀"  # the emoji is outside the vocabulary: <unk>
    assert tok(text).input_ids == TOKENIZER.encode(text).tolist()
    assert tok(text).input_ids[-1] == TOKENIZER.unk_id == tok.unk_token_id
    assert tok.decode(tok(TEXT).input_ids) == TEXT  # nothing added between characters, newlines and tabs kept


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"pos_encoding": "alibi"}, "model.pos_encoding=alibi has no exact counterpart in transformers"),
        (
            {"pos_encoding": "rope", "qk_norm": True},
            "model.qk_norm=true has no exact counterpart in transformers' gpt_neox",
        ),
        ({"norm": "rmsnorm"}, "model.norm=rmsnorm has no exact counterpart in transformers' gpt2"),
        ({"mlp": "swiglu"}, "model.mlp=swiglu has no exact counterpart"),
        ({"logit_softcap": 30.0}, "model.logit_softcap=30.0 has no exact counterpart"),
        ({"norm": "seq_layernorm"}, "model.norm=seq_layernorm has no exact counterpart"),
        ({"pos_encoding": "rope", "qk_norm": True, "mlp": "swiglu"}, "model.mlp=swiglu, model.qk_norm=true has no"),
    ],
)
def test_what_has_no_exact_counterpart_is_refused_in_one_line(settings, named):
    model = perturbed_model(**settings)
    with pytest.raises(ConfigError) as info:
        hf.to_hf_model(model)
    assert str(info.value).startswith(named) and "\n" not in str(info.value)
    assert "export it as a shakegpt bundle (--format bundle) instead" in str(info.value)


def test_the_model_card_names_the_config_the_loss_and_the_command():
    cfg = GPTConfig(vocab_size=66, d_model=32, n_layer=2, n_head=4)
    card = hf.model_card(cfg, "gpt2", 1.23456, 600, "python train.py model=v3")
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "val loss (nats per character): 1.2346, at step 600" in card
    assert "trained with: `python train.py model=v3`" in card and '"d_model": 32' in card
    assert "not recorded in the checkpoint" in hf.model_card(cfg, "gpt2", None, None, None)


@pytest.mark.parametrize(
    ("preset", "exportable"), [("v1", True), ("v2", True), ("v3", True), ("nanogpt", True), ("quickstart", False)]
)
def test_which_presets_export(tmp_path, preset, exportable):
    from .conftest import compose_cfg

    cfg = compose_cfg(tmp_path, f"model={preset}", shrink=False)
    model_cfg = GPTConfig.from_dict(dict(cfg.model), vocab_size=66)
    if exportable:
        hf.check_exportable(model_cfg)
    else:
        with pytest.raises(ConfigError, match="model.qk_norm=true has no exact counterpart"):
            hf.check_exportable(model_cfg)
