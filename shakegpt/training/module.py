"""LitGPT: the LightningModule around GPT — loss, metrics, optimizer and learning-rate schedule.

Its hyperparameters are plain data (the model config dict, the optimizer dict and the vocabulary
string), so `LitGPT.load_from_checkpoint(path)` works without Hydra or the dataset.
"""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch
from torchmetrics import Metric

from shakegpt.errors import ConfigError, DivergedError
from shakegpt.generate import stream_text
from shakegpt.model import GPT, GPTConfig
from shakegpt.optim import COMMON, build_optimizer, check_optim, group_settings, own_settings
from shakegpt.sampling import TEMPERATURE, TOP_K, TOP_P
from shakegpt.tokenizer import CharTokenizer
from shakegpt.training.val_pass import loss_and_accuracy

LN2 = math.log(2.0)
log = logging.getLogger(__name__)
_DIVERGED = (
    "training stopped; the checkpoints written before stay as they were. "
    "Lower optim.lr, keep trainer.gradient_clip_val, or use fp32"
)


class WeightedMean(Metric):
    """The mean of values, each with a weight (a batch's mean loss and its token count), summed as
    (value x weight, weight) and reduced across DDP ranks by sum, so the result is the exact mean over
    every token whatever the batch sizes. It never reads its input on the host (a GPU round-trip per
    step); a NaN training loss is caught by LitGPT's own check. (torchmetrics' MeanMetric drops the
    weights when its NaN check is off, so a partial last batch would count as a full one.)"""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        self.total += value.detach().float() * weight
        self.weight += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


def _plain(v):
    """Lists and tuples compare equal as the same numbers (the config gives lists, torch tuples)."""
    return list(v) if isinstance(v, (list, tuple)) else v


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step`: linear warmup over `warmup` steps, then
    cosine decay to `min_ratio` at `total` (or constant). Defined for every step >= 0, including
    runs shorter than the warmup and steps past `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LitGPT(L.LightningModule):
    def __init__(
        self,
        model: dict,
        vocab: str,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        schedule: str = "cosine",
        name: str = "adamw",
        **optimizer_settings,
    ):
        """`optimizer_settings`: the optimizer's own settings (`shakegpt.optim.OPTIMIZERS[name].settings`),
        e.g. muon_momentum for Muon; any it does not have is refused."""
        super().__init__()
        # checkpoints written before optimizers had settings of their own carry Muon's momentum
        # whatever the optimizer was
        if name != "muon":
            optimizer_settings.pop("muon_momentum", None)
        check_optim(
            {
                "lr": lr,
                "weight_decay": weight_decay,
                "betas": betas,
                "warmup_steps": warmup_steps,
                "min_lr_ratio": min_lr_ratio,
                "schedule": schedule,
                "name": name,
                **optimizer_settings,
            }
        )
        self.tokenizer = CharTokenizer(vocab)
        self.config = GPTConfig.from_dict(model, vocab_size=self.tokenizer.vocab_size)
        model = {**model, "vocab_size": self.config.vocab_size}  # saved below: a checkpoint has its size
        self.save_hyperparameters()
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.config.vocab_size} is smaller than the corpus vocabulary "
                f"({self.tokenizer.vocab_size} = {len(vocab)} characters + <unk>); set model.vocab_size >= {self.tokenizer.vocab_size}"
            )
        self.model = GPT(self.config)
        # means over the whole val pass and over the training steps since the previous validation;
        # each reduces (sum, weight) across DDP ranks, so it is exact over all ranks
        self.val_loss, self.val_acc = WeightedMean(), WeightedMean()
        self.train_loss_avg, self.train_acc_avg = WeightedMean(), WeightedMean()
        self.best_val_loss = math.inf
        self._resume_rng: dict | None = None  # set by on_load_checkpoint, applied at train start
        self._tick: tuple[float, int] | None = None  # (time, step) of the last throughput reading
        # the training forward (torch.compile'd by use_step_choices) and how often the host looks at
        # the loss's finiteness: every step by default; on a GPU every N steps, from a flag kept there
        self._train_forward = [self.model]  # a list: not a submodule, so not in the state dict twice
        self.finite_check_every = 1
        self._nonfinite: torch.Tensor | None = None  # any non-finite loss since the last look
        self._checked_step = 0  # the step of the last look
        self._align_log_step = False  # set at fit start: Lightning's logging step, checked at the first batch

    def use_step_choices(self, compile: bool, finite_check_every: int, backend: str = "inductor") -> None:
        """Apply `shakegpt.hardware.step_choices`: compile the training and validation forward (the
        sampling callbacks and generation use the plain model: they run other shapes), and check
        the loss's finiteness on the host every `finite_check_every` steps."""
        self._train_forward = [torch.compile(self.model, backend=backend) if compile else self.model]
        self.finite_check_every = max(1, int(finite_check_every))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss_acc(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return loss_and_accuracy(self._train_forward[0](x), y)

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop on a non-finite training loss. Checked every step (the default, and on a CPU), it stops
        before the bad gradients reach the weights. Checked every N steps (on a GPU, where reading the
        loss on the host would wait for the step), a flag on the device collects the steps between, and
        the check also runs before every checkpoint is written, so no checkpoint holds the bad weights."""
        if self.finite_check_every == 1:
            if not torch.isfinite(loss):
                raise DivergedError(f"the training loss is {loss.item()} at step {self.global_step}: {_DIVERGED}")
            return
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        if (self.global_step + 1) % self.finite_check_every == 0:
            self.raise_if_diverged()

    def raise_if_diverged(self) -> None:
        """With the check deferred: raise if a loss since the last look was not finite."""
        flag, self._nonfinite = self._nonfinite, None
        since, self._checked_step = self._checked_step, self.global_step + 1
        if flag is not None and bool(flag):
            raise DivergedError(
                f"the training loss was not finite at a step between {since} and {self.global_step}: {_DIVERGED}"
            )

    def loss_was_finite(self) -> bool:
        """False if a training loss not yet looked at was not finite (its weights must not be kept)."""
        return self._nonfinite is None or not bool(self._nonfinite)

    def training_step(self, batch, batch_idx):
        loss, acc = self._loss_acc(batch)
        self._check_finite(loss)
        detached = loss.detach()
        self.log("train/loss", detached, sync_dist=True, prog_bar=True)
        self.log_dict({"train/acc": acc, "train/bpc": detached / LN2}, sync_dist=True)
        # the learning rate this step uses, once (every parameter group follows the same schedule)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], rank_zero_only=True)
        self.train_loss_avg.update(detached)
        self.train_acc_avg.update(acc)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        # Lightning numbers what is logged by its own count of batches that stepped, and restores that
        # count one too high from a checkpoint saved after a validation (interrupted.ckpt when a
        # signal came then: every later scalar sat a step late); the optimizer steps are exact
        # Only the first batch after fit starts can be off: set it once there, not at every step
        if self._align_log_step:
            self._align_log_step = False
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # tokens/s over the steps since the last reading, across all ranks, and the wall time a step takes
        now, step = time.perf_counter(), self.global_step
        if self._tick is not None and step > self._tick[1] and step % self.trainer.log_every_n_steps == 0:
            x, _ = batch
            tokens = x.numel() * self.trainer.accumulate_grad_batches * self.trainer.world_size * (step - self._tick[1])
            seconds = now - self._tick[0]
            self.log("wallclock/tokens_per_s", tokens / seconds, rank_zero_only=True)
            self.log("wallclock/step_ms", 1000 * seconds / (step - self._tick[1]), rank_zero_only=True)
            self._tick = (now, step)
        elif self._tick is None:
            self._tick = (now, step)

    def on_validation_start(self):
        self.raise_if_diverged()  # before this validation's checkpoints
        self._tick = None  # validation time is not training throughput

    def validation_step(self, batch, batch_idx):
        loss, acc = self._loss_acc(batch)
        n = batch[1].numel()
        self.val_loss.update(loss, n)
        self.val_acc.update(acc, n)

    def on_validation_epoch_end(self):
        # WeightedMean reduces (sum, weight) over ranks: the exact mean over every val token
        if self.trainer.sanity_checking:
            self.val_loss.reset()
            self.val_acc.reset()
            return
        loss = self.val_loss.compute()
        self.best_val_loss = min(self.best_val_loss, loss.item())
        metrics = {
            "val/loss": loss,
            "val/acc": self.val_acc.compute(),
            "val/bpc": loss / LN2,
            "val/loss_best": self.best_val_loss,
        }
        if self.train_loss_avg.update_count:  # the original runs' log line's "train loss" / "train acc"
            metrics |= {"train/loss_avg": self.train_loss_avg.compute(), "train/acc_avg": self.train_acc_avg.compute()}
        # already reduced over ranks by torchmetrics: sync_dist only averages identical values
        self.log("val/loss", metrics.pop("val/loss"), prog_bar=True, sync_dist=True)
        self.log_dict(metrics, sync_dist=True)
        for m in (self.val_loss, self.val_acc, self.train_loss_avg, self.train_acc_avg):
            m.reset()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer, in case a fp16
        # GradScaler left the gradients scaled. Without a scaler (fp32, bf16) they are not.
        if gradient_clip_val and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            if gradient_clip_algorithm not in (None, "norm"):
                raise ConfigError(
                    f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r} is not supported; use norm"
                )
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._nonfinite is not None:
            self.raise_if_diverged()  # never a checkpoint of weights a non-finite loss has touched
        checkpoint["best_val_loss"] = self.best_val_loss
        # the random state that dropout draws from, so a resumed run draws the masks it would have
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best_val_loss = checkpoint.get("best_val_loss", math.inf)
        self._resume_rng = checkpoint.get("rng_state")
        if self._trainer is not None and checkpoint.get("optimizer_states"):
            self._optimizer_settings_from_this_run(checkpoint)

    def _optimizer_settings_from_this_run(self, checkpoint: dict) -> None:
        """A resumed run takes the optimizer's moments, the step and the schedule's position from the
        checkpoint, and its settings (lr, betas, weight decay, warmup, schedule, min_lr_ratio) from
        this run's config. Lightning would restore the saved ones silently (the optimizer's param
        groups and the scheduler's base lr are in the checkpoint), while the run's config and HParams
        record the new ones: rewrite them here, before Lightning loads them."""
        hp, step = self.hparams, checkpoint["global_step"]
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else step
        lr_now = hp.lr * lr_factor(step, hp.warmup_steps, total, hp.min_lr_ratio, hp.schedule)
        ours = group_settings(self._build_optimizer(fused=True))
        for opt_state in checkpoint["optimizer_states"]:
            for group, settings in zip(opt_state["param_groups"], ours, strict=True):
                group.update(settings, lr=lr_now, initial_lr=hp.lr)
        for sched in checkpoint.get("lr_schedulers", []):
            sched["base_lrs"] = [hp.lr] * len(sched["base_lrs"])
            sched["_last_lr"] = [lr_now] * len(sched["base_lrs"])
        before = checkpoint.get("hyper_parameters", {})
        changed = [
            f"optim.{k} {before[k]!r} -> {hp[k]!r}"
            for k in [*COMMON, *self.optimizer_settings]
            if k in before and k in hp and _plain(before[k]) != _plain(hp[k])
        ]
        changed += [
            f"model.{k} {before['model'][k]!r} -> {hp.model[k]!r}"
            for k in ("dropout", "attn_dropout")
            if k in before.get("model", {}) and before["model"][k] != hp.model.get(k)
        ]
        datamodule = self.trainer.datamodule  # (restored after this hook: its saved settings are read here)
        if datamodule is not None and hasattr(datamodule, "changed_since"):
            changed += datamodule.changed_since(checkpoint.get(type(datamodule).__qualname__))
        log.info(
            "resuming at step %d; settings from this run's config: %s",
            step,
            "; ".join(changed) if changed else "the same as the checkpoint's",
        )

    def on_train_start(self) -> None:
        self._align_log_step = True  # Lightning's loop reset, which miscounts, comes after this hook
        self._checked_step = self.global_step  # a resumed run's first look covers its own steps only
        # restored here, after Lightning's own setup has drawn from the generator
        rng, self._resume_rng = self._resume_rng, None
        if rng:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def generate_text(
        self,
        prompt: str = "\n",
        num_chars: int = 300,
        *,
        temperature: float = TEMPERATURE,
        top_k: int | None = TOP_K,
        top_p: float | None = TOP_P,
        seed: int = 0,
    ) -> str:
        """Sample `num_chars` characters after `prompt`; the same seed gives the same text."""
        return "".join(
            stream_text(
                self.model,
                self.tokenizer,
                prompt,
                num_chars,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
            )
        )

    @property
    def optimizer_settings(self) -> dict:
        """The optimizer's own settings (defaults filled in), as this run's hyperparameters give them."""
        hp = self.hparams
        return own_settings({"name": hp.name, **{k: v for k, v in hp.items() if k not in (*COMMON, "model", "vocab")}})

    def _build_optimizer(self, fused: bool) -> torch.optim.Optimizer:
        hp = self.hparams
        return build_optimizer(
            self.model, hp.name, hp.lr, hp.weight_decay, hp.betas, fused=fused, **self.optimizer_settings
        )

    def configure_optimizers(self):
        hp = self.hparams
        # fused AdamW is one kernel for all tensors instead of a Python loop over them; fp16 with a
        # GradScaler keeps the unfused one so that gradient clipping sees unscaled gradients
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        opt = self._build_optimizer(fused=not scaled)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, hp.warmup_steps, int(total), hp.min_lr_ratio, hp.schedule)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
