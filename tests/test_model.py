import re

import pytest
import torch

from shakegpt.errors import ConfigError
from shakegpt.generate import generate, sample_next
from shakegpt.model import GPT, GPTConfig, KVCache, original_formula_params
from shakegpt.pos_encoding import POS_ENCODINGS, alibi_slopes


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=11, d_model=16, n_layer=2, n_head=4, d_ff=32, max_seq_len=24)
    return GPTConfig(**(base | kw))


@pytest.mark.parametrize("pos", list(POS_ENCODINGS))
@pytest.mark.parametrize("bias", [False, True])
def test_changing_a_future_token_never_changes_earlier_logits(pos, bias):
    torch.manual_seed(0)
    model = GPT(tiny(pos_encoding=pos, bias=bias)).eval()
    x = torch.randint(0, 11, (2, 20))
    base = model(x)
    for t in (0, 7, 19):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 11
        out = model(y)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6), f"{pos}: position < {t} saw token {t}"
        assert not torch.allclose(out[:, t], base[:, t]), f"{pos}: position {t} ignores its own token"


@pytest.mark.parametrize("pos", list(POS_ENCODINGS))
def test_order_of_earlier_tokens_matters_only_with_positions(pos):
    """In one layer, the last position attends to its prefix as a set unless positions are encoded:
    swapping two earlier tokens changes its logits for every encoding except `none`."""
    torch.manual_seed(0)
    model = GPT(tiny(pos_encoding=pos, n_layer=1)).eval()
    with torch.no_grad():  # larger weights than at init, so attention is far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    x = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    swapped = torch.tensor([[4, 2, 3, 1, 5, 6, 7]])
    changed = (model(x)[0, -1] - model(swapped)[0, -1]).abs().max().item() > 1e-3
    assert changed == (pos != "none")


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    six = alibi_slopes(6)  # 4 from the power of two below, then every other slope of 8
    assert torch.allclose(six, torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]))


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.5))
    x = torch.randint(0, 11, (2, 10))
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.allclose(model(x), model(x))


def test_ffn_width_and_tied_head():
    assert GPTConfig(d_model=32).d_ff == 128  # nanoGPT's 4 * d_model by default
    assert GPTConfig(d_model=32, d_ff=64).d_ff == 64  # the original runs' 2 * d_model
    tied = GPT(tiny(tie_weights=True))
    assert tied.head.weight is tied.tok_emb.weight
    assert tied.param_breakdown()["output_head"] == 0
    untied = GPT(tiny())
    assert untied.num_params() - tied.num_params() == 11 * 16


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(d_model=30, n_head=4), "model.d_model=30 is not divisible by model.n_head=4"),
        (dict(pos_encoding="rotary"), "model.pos_encoding='rotary' is unknown"),
        (dict(n_layer=0), "model.n_layer=0 is invalid"),
        (dict(d_model=-8), "model.d_model=-8 is invalid"),
        (dict(vocab_size=2.5), "model.vocab_size=2.5 is invalid"),
        (dict(dropout=1.0), "model.dropout=1.0 is invalid"),
        (dict(d_model=12, n_head=4, pos_encoding="rope"), "rope needs an even head size"),
    ],
)
def test_bad_config_values_are_named(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        tiny(**kw)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="n_heads"):
        GPTConfig.from_dict({"n_heads": 4})


def test_input_longer_than_positions_is_refused():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=24"):
        model(torch.zeros(1, 25, dtype=torch.long))


# the original runs' presets: (d_model, layers, heads, d_ff, seq, pos) -> exact breakdown and the original formula's count
ORIGINAL_ROWS = {
    "v1": ((32, 12, 8, 64, 200, "sinusoidal"), 422_528),
    "v2": ((384, 6, 6, 768, 256, "sinusoidal"), 9_684_480),
    "v3": ((384, 6, 6, 768, 256, "learned"), 9_782_784),
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_ROWS))
def test_original_parameter_counts(name):
    (d, n, h, ff, seq, pos), formula = ORIGINAL_ROWS[name]
    cfg = GPTConfig(vocab_size=66, d_model=d, n_layer=n, n_head=h, d_ff=ff, max_seq_len=seq, pos_encoding=pos)
    parts = GPT(cfg).param_breakdown()
    # the documented breakdown (README "Parameter counts"): no biases, per-position LayerNorm gains
    assert parts == {
        "token_embedding": 66 * d,
        "position_embedding": seq * d if pos == "learned" else 0,
        "attention": n * 4 * d * d,
        "feed_forward": n * 2 * d * ff,
        "layer_norm": (2 * n + 1) * d,
        "output_head": 66 * d,
    }
    assert original_formula_params(cfg, seq) == formula


def test_documented_exact_totals():
    totals = {}
    for name, ((d, n, h, ff, seq, pos), _) in ORIGINAL_ROWS.items():
        cfg = GPTConfig(vocab_size=66, d_model=d, n_layer=n, n_head=h, d_ff=ff, max_seq_len=seq, pos_encoding=pos)
        totals[name] = GPT(cfg).num_params()
    assert totals == {"v1": 103_328, "v2": 7_133_568, "v3": 7_231_872}


def test_overfitting_one_batch_drives_the_loss_down():
    torch.manual_seed(0)
    model = GPT(tiny(pos_encoding="rope"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 11, (4, 16))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_a_new_position_encoding_is_one_registered_class(request, make_cfg):
    """Registering a class is all the code a new encoding needs: the config, the model and training take it."""
    from shakegpt.pos_encoding import PositionEncoding, register
    from shakegpt.run.train import train

    request.addfinalizer(lambda: POS_ENCODINGS.pop("every_other", None))

    @register("every_other")
    class EveryOther(PositionEncoding):
        """A toy: a +1/-1 flag on the first channel for even and odd positions."""

        def embed(self, x, offset=0):
            sign = 1.0 - 2.0 * (torch.arange(offset, offset + x.size(1)) % 2)
            return x + torch.nn.functional.pad(sign[:, None], (0, x.size(-1) - 1))

    assert isinstance(GPT(GPTConfig(pos_encoding="every_other")).pos, EveryOther)
    metrics = train(make_cfg("model.pos_encoding=every_other", "trainer.max_steps=2", "trainer.val_check_interval=2"))
    assert metrics["val/loss"] > 0


# --- the recipe keys: model/norm, model/mlp, qk_norm, logit_softcap, zero_init_proj ---


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("mlp", ["gelu", "relu2", "swiglu"])
def test_every_causal_norm_and_mlp_keeps_the_model_causal(norm, mlp):
    torch.manual_seed(0)
    model = GPT(tiny(norm=norm, mlp=mlp, qk_norm=True, logit_softcap=10.0)).eval()
    x = torch.randint(0, 11, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 11
    assert torch.allclose(model(y)[:, :12], model(x)[:, :12], atol=1e-6)


def test_the_original_runs_norm_over_the_window_is_not_causal():
    """seq_layernorm: a later character changes every earlier position's logits."""
    torch.manual_seed(0)
    model = GPT(tiny(norm="seq_layernorm")).eval()
    assert not model.cfg.causal and GPT(tiny()).cfg.causal
    x = torch.randint(0, 11, (2, 20))
    y = x.clone()
    y[:, 19] = (y[:, 19] + 1) % 11
    assert (model(y)[:, :19] - model(x)[:, :19]).abs().amax() > 1e-4  # every earlier position moved
    with pytest.raises(Exception, match="seq_layernorm is not causal"):
        model(x[:, :1], 5, KVCache(2, 24))


def test_sampling_the_original_norm_runs_the_whole_window_each_character():
    """No cache, the window sliding by one once full: the same draws as a hand-written loop."""
    torch.manual_seed(0)
    model = GPT(tiny(norm="seq_layernorm", max_seq_len=8)).eval()
    prompt = torch.tensor([[1, 2, 3]])
    got = generate(model, prompt, 12, generator=torch.Generator().manual_seed(5))
    g, ctx = torch.Generator().manual_seed(5), prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = sample_next(model(ctx[:, -8:])[:, -1], generator=g)
            ctx = torch.cat((ctx, nxt), dim=1)
    assert torch.equal(got, ctx)


def test_mlps_share_shapes_but_not_functions():
    torch.manual_seed(0)
    gelu = GPT(tiny(mlp="gelu"))
    relu2 = GPT(tiny(mlp="relu2"))
    relu2.load_state_dict(gelu.state_dict())  # the same shapes...
    x = torch.randint(0, 11, (2, 12))
    assert not torch.allclose(gelu(x), relu2(x), atol=1e-4)  # ...another function
    swiglu = GPT(tiny(mlp="swiglu"))
    assert swiglu.param_breakdown()["feed_forward"] == 2 * 3 * 16 * 32  # three d_model x d_ff matrices a block
    h = torch.randn(3, 32)
    block = swiglu.blocks[0].ffn
    gate, value = (h[:, :16] @ block.up.weight.T).chunk(2, dim=-1)
    assert torch.allclose(block(h[:, :16]), (torch.nn.functional.silu(gate) * value) @ block.down.weight.T, atol=1e-6)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    torch.manual_seed(0)
    for qk_norm, blind in ((True, True), (False, False)):
        model = GPT(tiny(qk_norm=qk_norm, n_layer=1)).eval()
        x = torch.randint(0, 11, (2, 12))
        before = model(x)
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight[: 2 * 16] *= 7.0  # the query and key rows
        assert torch.allclose(model(x), before, atol=1e-5) == blind


def test_logit_softcap_squashes_the_logits_into_its_range():
    torch.manual_seed(0)
    capped, free = GPT(tiny(logit_softcap=2.0)), GPT(tiny())
    free.load_state_dict(capped.state_dict())
    with torch.no_grad():
        capped.head.weight.mul_(100.0)
        free.head.weight.mul_(100.0)
    x = torch.randint(0, 11, (2, 12))
    raw = free(x)
    assert raw.abs().max() > 2.0 and torch.allclose(capped(x), 2.0 * torch.tanh(raw / 2.0), atol=1e-5)


def test_zero_init_proj_starts_every_block_as_the_identity():
    torch.manual_seed(0)
    model = GPT(tiny(zero_init_proj=True)).eval()
    assert all((b.attn.proj.weight == 0).all() and (b.ffn.down.weight == 0).all() for b in model.blocks)
    x = torch.randint(0, 11, (2, 12))
    expected = model.ln_f(model.pos.embed(model.tok_emb(x), 0)) @ model.head.weight.T
    assert torch.allclose(model(x), expected, atol=1e-6)
    model(x).sum().backward()  # and they learn: gradients reach the zero matrices
    assert model.blocks[0].attn.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("norm", "batchnorm", "model.norm='batchnorm' is unknown; choose one of layernorm, rmsnorm, seq_layernorm"),
        ("mlp", "tanh", "model.mlp='tanh' is unknown; choose one of gelu, relu2, swiglu"),
        ("logit_softcap", 0.0, "model.logit_softcap=0.0 is invalid; it must be > 0, or null (off)"),
    ],
)
def test_a_bad_recipe_value_is_named(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny(**{key: value})


@pytest.mark.parametrize("norm", ["layernorm", "seq_layernorm"])
def test_the_val_pass_reports_the_last_positions_loss_alone(norm):
    """val/loss_last: the loss at each window's last position, where even seq_layernorm sees no later
    character (evaluate's `last pos` column; docs/results.md compares the two norms with it)."""
    import torch.nn.functional as F

    from shakegpt.training.val_pass import full_val_pass

    torch.manual_seed(0)
    model = GPT(tiny(norm=norm, max_seq_len=8)).eval()
    ids = torch.randint(0, 11, (8 * 5 + 3,))  # five windows of 8 and two characters left over
    metrics, _ = full_val_pass(model, ids, 8, batch_size=2)
    x, y = ids[:40].view(5, 8), ids[1:41].view(5, 8)
    with torch.no_grad():
        logits = model(x)
    assert metrics["val/loss"] == pytest.approx(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item(), rel=1e-5)
    assert metrics["val/loss_last"] == pytest.approx(F.cross_entropy(logits[:, -1], y[:, -1]).item(), rel=1e-5)
    assert metrics["val/loss_last"] != pytest.approx(metrics["val/loss"], rel=1e-3)  # not the mean of all
