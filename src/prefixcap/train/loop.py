"""The training loop: epochs of micro-batches, optimizer steps, progress, periodic validation and saves."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefixcap.interrupts import check as check_interrupt
from prefixcap.train.config import TrainResult
from prefixcap.train.publish import announce, prune_epoch_checkpoints, push, save
from prefixcap.train.validation import Validator

if TYPE_CHECKING:
    from prefixcap.train.setup import BuiltRun


def _group_seed(seed: int, rank: int, step: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class _EpochMeter:
    """Running loss and throughput of the epoch in progress (the progress bar's and the result's numbers)."""

    loss_sum: Any  # a 0-d tensor on the device: summed without a device sync per step
    started: float
    loss_n: int = 0
    epoch_sum: float = 0.0
    epoch_n: int = 0
    samples: int = 0


class TrainingLoop:
    """Trains a built run from its resume point to the end (run()), saving and validating on the way."""

    def __init__(self, built: BuiltRun):
        self.built = built
        self.cfg, self.accelerator, self.state = built.cfg, built.accelerator, built.state
        self.model, self.optimizer, self.scheduler = built.model, built.optimizer, built.scheduler
        self.sampler, self.loader = built.loaders.sampler, built.loaders.loader
        self.micro_per_epoch = built.schedule.micro_per_epoch
        self.rank, self.world, self.device = built.rank, built.world, built.device
        self.validator = Validator(built)
        self.result = TrainResult(device=str(self.device), num_processes=self.world,
                                  resumed_from=str(built.resume_from.path) if built.resume_from else None)

    def run(self) -> TrainResult:
        cfg, acc, state = self.cfg, self.accelerator, self.state
        self.refresh = math.gcd(10, cfg.log_every_steps)  # progress-bar / tracker update period, in steps
        if cfg.log_with:
            acc.init_trackers(cfg.output_filename_prefix, config={
                k: v for k, v in self.built.run_config.items() if isinstance(v, (int, float, str, bool))})
        announce(self.built, self.result)
        done = bool((cfg.max_steps and state.global_step >= cfg.max_steps) or state.epoch >= cfg.epochs)
        if done:
            acc.print(f"prefixcap train: {self.result.resumed_from} is already at the end of training "
                      f"(epoch {state.epoch}, step {state.global_step}); nothing to do")
        self.model.train()
        started = time.perf_counter()
        self.samples_this_run = 0
        stop = done
        check_interrupt()  # a Ctrl-C during the setup
        while not stop and state.epoch < cfg.epochs:
            stop = self._run_epoch()
        self._finish(time.perf_counter() - started, done)
        return self.result

    def _tracker_log(self, values: dict[str, float]) -> None:
        if self.cfg.log_with:
            self.accelerator.log(values, step=self.state.global_step)

    def _run_epoch(self) -> bool:
        """Train from the resume point of the current epoch to its end; True when the run stops here."""
        import torch
        from tqdm.auto import tqdm

        cfg, state = self.cfg, self.state
        epoch, start = state.epoch, state.batch_in_epoch
        self.sampler.set_epoch(epoch, start)
        bar = tqdm(total=self.micro_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", dynamic_ncols=True, disable=not self.accelerator.is_local_main_process)
        meter = _EpochMeter(loss_sum=torch.zeros((), device=self.device), started=time.perf_counter())
        stop = False
        for i, batch in enumerate(self.loader, start=start):
            boundary = self._train_micro_batch(i, batch, meter)
            bar.update(1)
            if boundary:
                stop = self._after_optimizer_step(i, meter, bar)
            if stop:
                break
            check_interrupt()  # Ctrl-C: stop here, after the step (and its save) is done
        bar.close()
        return self._end_epoch(epoch, meter, stop)

    def _train_micro_batch(self, i: int, batch, meter: _EpochMeter) -> bool:
        """Forward and backward of micro-batch i of the epoch (and the optimizer step at a group's end).

        Returns whether it ended a gradient-accumulation group (an optimizer step was taken).
        """
        import torch

        cfg, acc, state = self.cfg, self.accelerator, self.state
        gas = cfg.gradient_accumulation_steps
        group_start = i - (i % gas)
        group_size = min(gas, self.micro_per_epoch - group_start)
        if i == group_start:
            # Dropout randomness is a function of (seed, rank, step): a resumed run
            # draws exactly what the uninterrupted run drew, on every process.
            torch.manual_seed(_group_seed(cfg.seed, self.rank, state.global_step))
        boundary = i + 1 == group_start + group_size
        acc.sync_gradients = boundary
        emb, tokens, mask, *prompt_mask = self.built.to_device(batch)  # prompt_mask: with --datastore
        # DeepSpeed keeps partitioned gradients itself (no_sync is incompatible with ZeRO-2).
        quiet = not boundary and not self.built.is_deepspeed
        ctx = acc.no_sync(self.model) if quiet else contextlib.nullcontext()
        with ctx:
            loss = self.model(emb, tokens, mask, *prompt_mask)
            # accelerate divides by gas; a short last group of the epoch is rescaled.
            acc.backward(loss * (gas / group_size))
        if boundary:
            self._optimizer_step()
        n = emb.shape[0] * self.world
        state.samples_seen += n
        self.samples_this_run += n
        meter.samples += n
        state.batch_in_epoch = i + 1
        meter.loss_sum += loss.detach()
        meter.loss_n += 1
        return boundary

    def _optimizer_step(self) -> None:
        if self.cfg.max_grad_norm and not self.built.is_deepspeed:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1

    def _after_optimizer_step(self, i: int, meter: _EpochMeter, bar) -> bool:
        """Progress, periodic saves and validation after an optimizer step; True when --max_steps is reached."""
        cfg, step = self.cfg, self.state.global_step
        if step % self.refresh == 0 or i + 1 == self.micro_per_epoch:
            self._show_progress(meter, bar)
        if cfg.save_every_steps and step % cfg.save_every_steps == 0:
            self._save("latest")
        if cfg.eval_every_steps and step % cfg.eval_every_steps == 0:
            self._evaluate()
        return bool(cfg.max_steps and step >= cfg.max_steps)

    def _show_progress(self, meter: _EpochMeter, bar) -> None:
        mean = float(meter.loss_sum) / meter.loss_n  # one device sync per few steps, not per step
        meter.epoch_sum, meter.epoch_n = meter.epoch_sum + mean * meter.loss_n, meter.epoch_n + meter.loss_n
        lr = self.scheduler.get_last_lr()[0]
        rate = meter.samples / max(time.perf_counter() - meter.started, 1e-9)
        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}", refresh=False)
        if self.state.global_step % self.cfg.log_every_steps == 0:
            self._tracker_log({"train/loss": mean, "train/lr": lr, "train/samples_per_s": rate})
        meter.loss_sum.zero_()
        meter.loss_n = 0

    def _evaluate(self) -> None:
        """Validation loss and CIDEr now: recorded in the result, logged and printed."""
        val = self.validator.validate()
        if val is not None:
            self.result.val_losses.append({"step": self.state.global_step, "loss": val})
            self._tracker_log({"val/loss": val})
            self.accelerator.print(f"prefixcap train: step {self.state.global_step}: validation loss {val:.4f}")
        cider = self.validator.cider()
        if cider is not None:
            self.result.cider.append({"step": self.state.global_step, "cider": cider})
            self._tracker_log({"val/cider": cider})
            self.accelerator.print(f"prefixcap train: step {self.state.global_step}: CIDEr {cider:.3f}")

    def _end_epoch(self, epoch: int, meter: _EpochMeter, stop: bool) -> bool:
        """The epoch's mean loss, then (unless stopped mid-epoch) validation and saves; True when the run stops."""
        cfg, state = self.cfg, self.state
        if meter.loss_n:
            meter.epoch_sum, meter.epoch_n = meter.epoch_sum + float(meter.loss_sum), meter.epoch_n + meter.loss_n
        if meter.epoch_n:
            self.result.epoch_train_losses.append(meter.epoch_sum / meter.epoch_n)
        if stop and state.batch_in_epoch < self.micro_per_epoch:
            self._save("latest")
            return True
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        self._evaluate()
        self._save("latest")
        if cfg.save_every_epochs and state.epoch % cfg.save_every_epochs == 0:
            self._save(epoch)  # named 0-based as the seed does: demo_model_0.ckpt after the first epoch
            prune_epoch_checkpoints(self.built, self.result)
        return bool(cfg.max_steps and state.global_step >= cfg.max_steps)

    def _save(self, tag: str | int) -> None:
        save(self.built, self.result, tag)

    def _finish(self, elapsed: float, done: bool) -> None:
        """The final model, the result and {prefix}_summary.json; then --push_to_hub."""
        cfg, acc, state, r = self.cfg, self.accelerator, self.state, self.result
        if not done:
            self._save("final")
        r.epochs_completed, r.global_step, r.samples_seen = state.epoch, state.global_step, state.samples_seen
        r.train_seconds = elapsed
        r.samples_per_second = self.samples_this_run / elapsed if elapsed > 0 else 0.0
        if cfg.log_with:
            acc.end_training()
        if acc.is_main_process:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            summary = Path(cfg.output_dir) / f"{cfg.output_filename_prefix}_summary.json"
            summary.write_text(json.dumps(asdict(r), indent=2) + "\n")
        acc.wait_for_everyone()
        if cfg.push_to_hub and acc.is_main_process:
            push(cfg, acc)
