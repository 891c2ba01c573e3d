"""`python -m shakegpt sample ckpt_path=…` (or `shakegpt-sample`): stream text from a trained model.

Keys (conf/sample.yaml): ckpt_path, prompt / prompt_file, num_chars, num_samples, temperature, top_k,
top_p, seed, device, allow_unk. Same seed and checkpoint give the same text. The values are
checked before torch is imported, so a mistake is refused at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from shakegpt.errors import ConfigError, exit_on_user_error
from shakegpt.run.checks import check_path_exists, check_sample_section, is_int, require
from shakegpt.run.configs import CONF_DIR, hydra_errors_in_one_line

if TYPE_CHECKING:
    import torch

    from shakegpt.model import GPT
    from shakegpt.tokenizer import CharTokenizer


def load_any(path: str) -> tuple[GPT, CharTokenizer]:
    """An exported bundle directory, or a checkpoint file / run directory."""
    from shakegpt.training.checkpoint import load_bundle, model_from_checkpoint

    p = Path(path).expanduser()
    if (p / "model.safetensors").is_file():
        return load_bundle(p)
    model, tokenizer, _ = model_from_checkpoint(p)
    return model, tokenizer


def check_device(device: str) -> torch.device:
    """`device` as a torch device that this machine has, or one line saying why not."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but this machine has no usable GPU; use device=cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={device} but this machine has {torch.cuda.device_count()} GPU(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    if d.type not in ("cpu", "cuda", "mps") or (d.type == "mps" and not torch.backends.mps.is_available()):
        raise ConfigError(f"device={device} is not available here; use device=cpu")
    return d


def check_values(cfg: DictConfig) -> None:
    """Everything about the command's values that needs neither torch nor the checkpoint."""
    require(cfg, "ckpt_path", "a .ckpt file, a run directory or an exported bundle, e.g. ckpt_path=outputs/runs/<run>")
    check_sample_section(cfg, "")  # temperature, top_k, top_p, num_chars, prompt, seed: as for training's samples
    if not is_int(cfg.num_samples) or cfg.num_samples < 1:
        raise ConfigError(f"num_samples={cfg.num_samples!r} is invalid; it must be an integer >= 1")
    check_path_exists(cfg.ckpt_path)


def sample(cfg: DictConfig, out=None) -> list[str]:
    """Write `num_samples` samples to `out` (standard output by default) as they are generated; return them."""
    out = out or sys.stdout  # looked up at call time: the stream in use now, not the one at import
    check_values(cfg)
    import torch

    from shakegpt.generate import stream_text

    device = check_device(cfg.device)
    prompt = cfg.prompt
    if cfg.prompt_file:
        try:
            prompt = Path(cfg.prompt_file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"prompt_file={cfg.prompt_file} cannot be read as UTF-8 text: {e}") from None
    model, tokenizer = load_any(cfg.ckpt_path)
    unknown = tokenizer.unknown_chars(prompt)
    if unknown and not cfg.get("allow_unk", False):
        raise ConfigError(
            f"the prompt has characters outside the model's vocabulary: {unknown}; it knows "
            f"{''.join(tokenizer.chars)!r} (or pass allow_unk=true to read them as <unk>)"
        )
    model.to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    texts = []
    for i in range(cfg.num_samples):
        if cfg.num_samples > 1:
            out.write(f"\n--- sample {i + 1} ---\n")
        out.write(prompt)
        chars = []
        for ch in stream_text(
            model,
            tokenizer,
            prompt,
            cfg.num_chars,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            generator=generator,
        ):
            chars.append(ch)
            out.write(ch)
            out.flush()
        out.write("\n")
        texts.append("".join(chars))
    return texts


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
@exit_on_user_error
def run(cfg: DictConfig) -> None:
    try:
        sample(cfg)
    except KeyboardInterrupt:  # Ctrl-C: what was written stays, no traceback
        print(file=sys.stdout, flush=True)
        print("stopped: Ctrl-C (SIGINT)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def main() -> None:
    with hydra_errors_in_one_line():
        run()


if __name__ == "__main__":
    main()
