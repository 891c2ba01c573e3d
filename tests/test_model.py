import pytest
import torch

from shakegpt.model import GPT, GPTConfig, original_formula_params
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
    from shakegpt.train import train

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
