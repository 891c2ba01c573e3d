"""Sampling: the KV cache computes what the full forward does, for every position encoding."""

import pytest
import torch
import torch.nn.functional as F

from shakegpt.errors import ConfigError
from shakegpt.fast_cpu import linear
from shakegpt.generate import generate, sample_next, stream_text
from shakegpt.model import GPT, GPTConfig, KVCache
from shakegpt.pos_encoding import POS_ENCODINGS
from shakegpt.tokenizer import CharTokenizer


def tiny(pos: str, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=11, d_model=16, n_layer=2, n_head=4, d_ff=32, max_seq_len=16, pos_encoding=pos) | kw
    return GPT(GPTConfig(**cfg)).eval()


@pytest.fixture
def two_threads():
    """The one-row matmul path splits work among threads: make sure there are two of them."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_row_linear_equals_f_linear(two_threads):
    w, b = torch.randn(12, 8), torch.randn(12)
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        assert torch.allclose(linear(x, w, b), F.linear(x, w, b), atol=1e-6)
        assert torch.allclose(linear(x, w), F.linear(x, w), atol=1e-6)
        odd = torch.randn(11, 8)  # rows not divisible by the threads: the plain path
        assert torch.equal(linear(x, odd), F.linear(x, odd))
    y = linear(x, w.requires_grad_(), b)  # with gradients: the plain path, and they flow
    y.sum().backward()
    assert w.grad is not None and torch.allclose(y, F.linear(x, w, b))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("pos", list(POS_ENCODINGS))
@torch.no_grad()  # as generation runs: one-row matmuls take the split path
def test_cached_logits_equal_the_full_forward(pos, batch, two_threads):
    model = tiny(pos, bias=batch == 1, vocab_size=12)
    for p in model.parameters():  # no zero biases or unit LayerNorm gains that could hide a slip
        p.add_(0.1 * torch.randn_like(p))
    x = torch.randint(0, 11, (batch, 14))
    full = model(x)
    cache = KVCache(2, 16)
    parts = [model(x[:, :5], 0, cache)]  # a prefix, then a chunk, then one token at a time
    parts.append(model(x[:, 5:9], 5, cache))
    parts += [model(x[:, t : t + 1], t, cache) for t in range(9, 14)]
    assert len(cache) == 14
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    kv = torch.zeros(batch, 4, 2, 4)
    assert cache.extend(0, kv, kv)[0].shape == (batch, 4, 16, 4)  # full
    with pytest.raises(ConfigError, match="KV cache of 16 positions cannot take 17"):
        cache.extend(0, kv[:, :, :1], kv[:, :, :1])


@pytest.mark.parametrize("pos", list(POS_ENCODINGS))
def test_cache_and_no_cache_draw_the_same_tokens_past_the_context(pos):
    model = tiny(pos)
    prompt = torch.randint(0, 11, (2, 5))
    runs = [
        generate(model, prompt, 60, generator=torch.Generator().manual_seed(3), use_cache=use_cache, top_k=8)
        for use_cache in (True, False)
    ]
    assert runs[0].shape == (2, 65)  # 60 tokens: the 16-token context restarted several times
    assert torch.equal(runs[0], runs[1])


def test_sampling_is_seeded_and_skips_unk():
    model = tiny("learned")
    prompt = torch.zeros(1, 3, dtype=torch.long)
    a = generate(model, prompt, 40, generator=torch.Generator().manual_seed(1), num_allowed=10)
    b = generate(model, prompt, 40, generator=torch.Generator().manual_seed(1), num_allowed=10)
    assert torch.equal(a, b) and int(a.max()) < 10


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=1, generator=g).flatten().tolist()) == {1}
    assert set(sample_next(logits, top_k=2, generator=g).flatten().tolist()) == {1, 2}
    assert set(sample_next(logits, top_p=0.01, generator=g).flatten().tolist()) == {1}  # the top id alone
    assert set(sample_next(logits, top_p=0.6, generator=g).flatten().tolist()) == {1, 2}
    assert set(sample_next(logits, temperature=100.0, generator=g).flatten().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(temperature=0.0), "temperature=0.0 is invalid"),
        (dict(top_k=0), "top_k=0 is invalid"),
        (dict(top_p=1.5), "top_p=1.5 is invalid"),
        (dict(top_p=0.0), "top_p=0.0 is invalid"),
    ],
)
def test_bad_sampling_values_are_named(kw, message):
    with pytest.raises(ConfigError, match=message):
        generate(tiny("none"), torch.zeros(1, 2, dtype=torch.long), 1, **kw)


def test_prompt_longer_than_the_context_is_refused():
    tok = CharTokenizer("abc")
    with pytest.raises(ConfigError, match="the prompt has 20 characters, more than .* model.max_seq_len=16"):
        list(stream_text(tiny("rope", vocab_size=4), tok, "abc" * 6 + "ab", 5, seed=0))
    with pytest.raises(ConfigError, match="the prompt is empty"):
        list(stream_text(tiny("rope", vocab_size=4), tok, "", 5, seed=0))


def test_stream_text_yields_characters_of_the_vocabulary():
    tok = CharTokenizer("abc\n")
    model = tiny("alibi", vocab_size=5)
    chars = list(stream_text(model, tok, "a?b", 30, seed=2))  # '?' is outside the vocabulary: <unk>
    assert len(chars) == 30 and set("".join(chars)) <= set("abc\n")
    assert "".join(chars) == "".join(stream_text(model, tok, "a?b", 30, seed=2))


def test_one_set_of_sampling_defaults_everywhere(make_cfg):
    """The Python API, the sample command's config and training's text samples agree, and the
    sampling settings are keyword-only everywhere (so no call passes them in the wrong order)."""
    import inspect

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from shakegpt.generate import TEMPERATURE, TOP_K, TOP_P, stream
    from shakegpt.training.callbacks import TextSample
    from shakegpt.training.module import LitGPT

    from .conftest import CONF

    defaults = {"temperature": TEMPERATURE, "top_k": TOP_K, "top_p": TOP_P}
    assert OmegaConf.to_container(OmegaConf.load(CONF / "sampling" / "default.yaml")) == defaults
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        sample_cfg = compose("sample", overrides=["ckpt_path=x"])
    train_cfg = make_cfg(shrink=False)
    for name, value in defaults.items():
        assert sample_cfg[name] == value and train_cfg.sample[name] == value, name
        assert train_cfg.callbacks.text_sample[name] == value, name
    for fn in (sample_next, stream, stream_text, LitGPT.generate_text, TextSample.__init__):
        params = inspect.signature(fn).parameters
        for name, value in defaults.items():
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == value, (fn, name)
