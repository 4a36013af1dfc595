"""The training loop of ``vlmtune train``: SFT, the DPO family, KTO, online DPO, RFT and GRPO on accelerate,
one process or many (iterative DPO runs rounds of it: ``train.iterative``).

    vlmtune train --algo dpo --config configs/demo-cpu.yaml                     # one process
    accelerate launch --config_file configs/accelerate/ddp.yaml -m vlmtune train --algo dpo --config FILE
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m vlmtune train ...  # CPU, gloo
    ACCELERATE_USE_CPU=1 accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 -m vlmtune train ... lora.enabled=false

What it does, in order: load the policy (LoRA adapter, or the weights for full fine-tuning) and
its reference (the same model with the adapter off, or a frozen copy); read and check the data;
then for each optimizer step accumulate ``grad_accum`` micro-batches, clip, step AdamW and the
warm-up + cosine/linear schedule; log metrics (see ``metrics_log``); evaluate held-out data;
write the training samples (``train.sample_every``, see ``samples``); checkpoint. Messages go to the ``vlmtune`` logger (the CLI shows the main process's).

Guarantees, each with a test:
- SFT and the DPO family give the same loss curve whether a global batch is one micro-batch,
  ``grad_accum`` micro-batches or split across processes (their losses are per-pair means; see
  ``steps``): ``test_train`` (batch 8 = batch 1 x 8 accumulation), ``test_multiprocess`` (DDP) and
  ``test_fsdp`` (FSDP 2). GRPO gives the same curve with ``grad_accum`` micro-batches as with one
  (``test_grpo_replay``: accumulation 2 = accumulation 1): each process samples its whole share of
  the global batch at once, seeded by run seed, step and process, and the loss is normalised by the
  global batch's token count, gathered across processes. Across processes the normalisation is
  the same, but the samples are not those of one process (each process draws its own). KTO is not
  claimed: its reference point is estimated per micro-batch, so its curve depends on the split;
- GRPO with ``grpo.num_iterations`` μ > 1 keeps each generation batch for μ optimizer steps (data
  is drawn only when a new one is sampled, so an epoch is μ times as many steps);
- a resumed run (``--resume``, also after ``kill -9``) continues the identical curve: weights,
  optimizer, schedule, fp16 scale, random states and the data position are all in the checkpoint,
  and mid-way through a GRPO generation batch's μ updates, that batch and its position too;
  a damaged checkpoint is named before anything is loaded, and ``train.resume=auto`` falls back to
  the newest intact one; resuming with another batch geometry (batch size, accumulation, number of
  processes, seed) is refused;
- Ctrl-C saves a checkpoint and exits; a non-finite loss or gradient stops the run, keeping the
  last checkpoint, which was written before it; a path that cannot be written is named and the last
  checkpoint kept;
- under fp16 a step whose gradients overflow is skipped by the loss scaler: the step counter and the
  data position advance and the row is logged (``grad_norm`` null), the weights, optimizer and lr
  schedule do not move, and training goes on.

Assumes: every process sees the same data files; batches have a fixed size (the last partial
batch of an epoch is dropped); a sharded (FSDP) model trains sft or dpo without ``data.eval``.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path

import torch

from vlmtune.config import Config, config_yaml
from vlmtune.errors import VlmtuneError
from vlmtune.model_card import write_model_card
from vlmtune.models.adapters import record_base
from vlmtune.train import checkpoint, sharding
from vlmtune.train.metrics_log import MetricsLog, accelerate_trackers
from vlmtune.train.order import batches_per_epoch, micro_batch_indices
from vlmtune.train.samples import SampleLog, fixed_items, sample_rows
from vlmtune.train.precision import Precision
from vlmtune.train.setup import build_model, build_optimizer, build_scheduler
from vlmtune.train.grpo import Generation, record_task, sampling_seed
from vlmtune.train.step_factory import make_step

log = logging.getLogger(__name__)

SAMPLING_ALGOS = ("grpo", "online_dpo", "rft")  # they train on their own samples; held out: scored by the task


class TrainingDiverged(VlmtuneError):
    """The loss or the gradient norm became NaN or infinite."""


class TrainingInterrupted(Exception):
    """Ctrl-C: a checkpoint was saved; carries its path."""


class Trainer:
    def __init__(self, config: Config, resume: bool = False, trust_remote_code: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config
        self.trust_remote_code = trust_remote_code  # only a command-line flag sets it, never the config
        self.out = Path(config.train.output_dir)
        # accelerate fixes its mixed precision once per process; the run keeps its own (see precision.py),
        # so runs of different precision can follow each other in one process.
        self.accelerator = Accelerator(gradient_accumulation_steps=config.train.grad_accum, mixed_precision="no",
                                       log_with=accelerate_trackers(config.train.report_to) or None)
        if self.accelerator.distributed_type == "DEEPSPEED" and config.train.mixed_precision == "fp16":
            raise VlmtuneError("train.mixed_precision=fp16 is not supported under DeepSpeed (its engine steps inside "
                             "backward, past the fp16 loss scaler): use bf16")
        self.precision = Precision(config.train.mixed_precision, self.accelerator.device)
        self.world = self.accelerator.num_processes
        set_seed(config.train.seed)
        self.resume_from = checkpoint.checkpoint_to_resume(self.out, self.accelerator, resume,
                                                           auto=config.train.resume == "auto")
        self._setup_data()
        self._setup_model()
        self.state = {"step": 0, "micro_batch": 0, "best_eval_loss": None, "evals_without_improvement": 0}
        self.generation: Generation | None = None  # GRPO: the batch of samples being replayed
        self.generation_indices: list[int] = []  # its records' positions in train_records
        if self.resume_from is not None:
            self.state = checkpoint.load_checkpoint(
                self.resume_from, self.accelerator, self.model, self.optimizer.optimizer, self.scheduler,
                self.precision,
            )
            self._check_geometry()
            self._restore_generation()
        self.interrupted = False

    # ----- setup, in the order it happens -----

    def _setup_data(self) -> None:
        from vlmtune.data.load import load_records

        data = self.config.data
        kto = self.config.train.algo == "kto"  # unpaired records accepted, pairs split in two
        self.train_records = load_records(data.train, data.format, skip_bad=data.skip_bad, kto=kto)
        self.eval_records = load_records(data.eval, data.format, skip_bad=data.skip_bad, kto=kto) if data.eval else []
        t = self.config.train
        per_epoch = batches_per_epoch(len(self.train_records), t.batch_size, self.world)
        steps_per_epoch = per_epoch // t.grad_accum
        if t.max_steps is None and steps_per_epoch == 0:
            raise VlmtuneError(
                f"{data.train}: {len(self.train_records)} records make {per_epoch} micro-batch(es) per epoch, "
                f"fewer than train.grad_accum={t.grad_accum}; set train.max_steps or lower grad_accum"
            )
        if t.algo == "grpo":  # each generation batch serves num_iterations optimizer steps
            steps_per_epoch *= self.config.grpo.num_iterations
        self.total_steps = t.max_steps or max(1, math.floor(t.epochs * steps_per_epoch))
        self.micro_batches_per_epoch = per_epoch
        # train.sample_every: the same held-out items answered at every sampling step (see samples.py)
        self.sample_items = fixed_items(self.eval_records, self.train_records, t.sample_count) if t.sample_every else []
        if t.algo == "grpo":
            self._check_tasks()

    def _check_tasks(self) -> None:
        """GRPO scores answers by each record's task: a record without one is named before training starts."""
        data = self.config.data
        for path, records in ((data.train, self.train_records), (data.eval, self.eval_records)):
            for record in records:
                try:
                    record_task(record)
                except VlmtuneError as e:
                    raise VlmtuneError(f"{path}: {e}") from e

    def _setup_model(self) -> None:
        t = self.config.train
        model, self.processor, reference = build_model(self.config, self.trust_remote_code)
        plugin = sharding.fsdp_plugin_on_cpu(self.accelerator)
        if plugin is not None:  # FSDP on CPU processes, which accelerate would run as DDP
            self.model = sharding.shard_like_accelerate(model, plugin)
            optimizer = build_optimizer(self.model, t.lr, t.weight_decay)
            self.optimizer = self.accelerator.prepare(optimizer)
        else:
            optimizer = build_optimizer(model, t.lr, t.weight_decay)
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if checkpoint.is_sharded(self.model) and (t.algo in SAMPLING_ALGOS or self.eval_records or t.sample_every):
            raise VlmtuneError("a sharded model (FSDP) trains with sft and dpo, without data.eval or train.sample_every: "
                             "GRPO's sampling, the held-out evaluation and the training samples run on whole models; "
                             "use DDP (configs/accelerate/ddp.yaml)")
        # The scheduler is stepped here, once per optimizer step: accelerate's prepared scheduler
        # would step once per process, which makes the schedule depend on the number of processes.
        self.scheduler = build_scheduler(optimizer, t.schedule, t.warmup_ratio, self.total_steps)
        if reference is not None:
            reference = reference.to(self.accelerator.device)
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.step_fn = make_step(self.config, self.model, self.processor, reference, unwrapped,
                                 train_records=self.train_records, accelerator=self.accelerator,
                                 caches=self.out.parent, trust_remote_code=self.trust_remote_code)

    def _check_geometry(self) -> None:
        t = self.config.train
        now = {"num_processes": self.world, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "seed": t.seed}
        differ = [k for k in now if self.state.get(k) != now[k]]
        if differ:
            saved = ", ".join(f"{k}={self.state.get(k)}" for k in differ)
            ours = ", ".join(f"{k}={now[k]}" for k in differ)
            raise VlmtuneError(
                f"{self.resume_from} was written with {saved}; this run has {ours}. The saved data position "
                "only means the same records with the same batch_size, grad_accum, number of processes and "
                "seed: resume with those, or start a new train.output_dir"
            )

    # ----- training -----

    def train(self) -> Path:
        """Run to the last step (or early stop / Ctrl-C); return the folder of the final model."""
        acc = self.accelerator
        if acc.is_main_process:
            with checkpoint.naming_unwritable(self.out, self.out):
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "config.yaml").write_text(config_yaml(self.config))
        t = self.config.train
        metrics_log = MetricsLog(self.out, acc.is_main_process, self.total_steps, self.state["step"], t.progress,
                                 tensorboard="tensorboard" in t.report_to, accelerator=acc,
                                 config=self.config.model_dump(mode="json"))
        self.sample_log = SampleLog(self.out, self.state["step"]) if self.sample_items and acc.is_main_process else None
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self._train_steps(metrics_log)
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            metrics_log.close()
        return self._save_final()

    def _train_steps(self, metrics_log: MetricsLog) -> None:
        t = self.config.train
        while self.state["step"] < self.total_steps:
            started = time.perf_counter()
            metrics, stepped = self._optimizer_step()
            self.state["step"] += 1
            step = self.state["step"]
            row = {"step": step, "epoch": self.state["micro_batch"] / self.micro_batches_per_epoch, **metrics}
            row["pairs_per_s"] = t.batch_size * t.grad_accum * self.world / (time.perf_counter() - started)
            self._stop_if_diverged(row, step_skipped=not stepped)
            metrics_log.advance(row)
            if step % t.log_every == 0 or step == self.total_steps:
                metrics_log.write(row)
            stop = False
            if self.eval_records and (t.eval_every and step % t.eval_every == 0 or step == self.total_steps):
                evaluation = self.evaluate()
                metrics_log.write({"step": step, **evaluation})
                stop = self._early_stop(evaluation["eval/loss"])
            if self.sample_items and (step % t.sample_every == 0 or step == self.total_steps or stop):
                self._write_samples(step, metrics_log)
            if self._interrupt_requested():
                path = self.save_checkpoint()
                raise TrainingInterrupted(path)
            if (t.save_every and step % t.save_every == 0) or step == self.total_steps or stop:
                self.save_checkpoint()
            if stop:
                log.info("early stopping at step %d: eval loss has not improved for %d evaluations (best %.4f)",
                         step, t.early_stopping_patience, self.state["best_eval_loss"])
                return

    def _optimizer_step(self) -> tuple[dict[str, float], bool]:
        """``grad_accum`` micro-batches, then one clipped AdamW step: the metrics averaged over all of them,
        and False when the fp16 scaler skipped the update (see precision.py)."""
        acc, t = self.accelerator, self.config.train
        self.model.train()
        totals: dict[str, float] = {}
        if t.algo == "grpo":
            micro_batches = self._grpo_micro_batches()
        else:
            micro_batches = (self.step_fn.encode(self._next_records(), acc.device) for _ in range(t.grad_accum))
        for batch in micro_batches:
            with acc.accumulate(self.model):  # DDP syncs gradients on the last micro-batch only
                with self.precision.autocast():
                    loss, metrics = self.step_fn.loss_and_metrics(batch)
                acc.backward(self.precision.scale(loss))  # divides by grad_accum
                if acc.sync_gradients:
                    self.precision.unscale_(self.optimizer)
                    limit = t.max_grad_norm if t.max_grad_norm is not None else math.inf
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), limit)
                    stepped = self.precision.step(self.optimizer)
                self.optimizer.zero_grad()
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value / t.grad_accum
        row = self._mean_over_processes(totals)
        row["grad_norm"] = float(grad_norm)
        row["lr"] = self.scheduler.get_last_lr()[0]
        if stepped:
            self.scheduler.step()
        return row, stepped

    def _next_records(self) -> list:
        return [self.train_records[i] for i in self._next_indices()]

    def _next_indices(self) -> list[int]:
        t = self.config.train
        k = self.state["micro_batch"]
        indices = micro_batch_indices(
            k, len(self.train_records), t.batch_size, t.seed, self.accelerator.process_index, self.world
        )
        self.state["micro_batch"] = k + 1
        return indices

    def _grpo_micro_batches(self) -> list:
        """This optimizer step's GRPO micro-batches: from the kept generation batch, or from a new one.

        A new one samples the ``grad_accum`` micro-batches' records of this process together, so the
        samples do not depend on the split. The loss of each micro-batch is divided by the global
        batch's units (tokens, by default) over ``grad_accum × processes``: the loop's mean over
        micro-batches and processes is then the global batch's normalised loss.
        """
        acc, t = self.accelerator, self.config.train
        if self.generation is None or self.generation.updates >= self.config.grpo.num_iterations:
            self.generation_indices = [i for _ in range(t.grad_accum) for i in self._next_indices()]
            seed = sampling_seed(t.seed, self.state["step"], acc.process_index, self.world)
            self.generation = self.step_fn.generate([self.train_records[i] for i in self.generation_indices], seed)
        units = torch.tensor(self.step_fn.loss_units(self.generation), dtype=torch.float64, device=acc.device)
        total = acc.reduce(units, reduction="sum").item()
        batches = self.step_fn.micro_batches(self.generation, t.grad_accum, total / (t.grad_accum * self.world),
                                             acc.device)
        self.generation.updates += 1
        return batches

    def _kept_generation(self) -> dict | None:
        """What a checkpoint must hold of the GRPO generation batch: None unless updates on it remain."""
        g = self.generation
        if g is None or g.updates >= self.config.grpo.num_iterations:
            return None
        return {"indices": self.generation_indices, **g.state_dict()}

    def _restore_generation(self) -> None:
        kept = checkpoint.load_process_state(self.resume_from, self.accelerator.process_index)
        if kept is not None:
            self.generation_indices = kept.pop("indices")
            self.generation = Generation.from_state(kept, [self.train_records[i] for i in self.generation_indices])

    def _mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        names = sorted(metrics)
        values = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(names, values.tolist()))

    def _stop_if_diverged(self, row: dict, step_skipped: bool) -> None:
        """Raise on a non-finite loss or gradient norm, except an fp16 overflow the scaler skipped."""
        if step_skipped:
            log.warning("step %d: fp16 gradients overflowed (grad_norm %s); the scaler skipped the update and "
                        "lowered its scale to %g", row["step"], row["grad_norm"], self.precision.scaler.get_scale())
        checked = ("loss",) if step_skipped else ("loss", "grad_norm")
        bad = [name for name in checked if not math.isfinite(row[name])]
        if bad:
            latest = checkpoint.latest_checkpoint(self.out)
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written before it"
            raise TrainingDiverged(
                f"{' and '.join(bad)} became {row[bad[0]]} at step {row['step']} (lr {row['lr']:.3g}); "
                f"training stopped and {kept}. Lower train.lr, or check the data (vlmtune data check)."
            )

    # ----- evaluation -----

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean held-out loss and preference accuracy; each process takes every ``world``-th record."""
        acc, t = self.accelerator, self.config.train
        model = acc.unwrap_model(self.model)  # no distributed wrapper: shards may differ in size
        model.eval()
        mine = self.eval_records[acc.process_index :: self.world]
        if t.algo in SAMPLING_ALGOS:
            return self._evaluate_task_accuracy(model, mine)
        sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # loss, accuracy, pairs
        for start in range(0, len(mine), t.batch_size):
            records = mine[start : start + t.batch_size]
            batch = self.step_fn.encode(records, acc.device)
            with self.precision.autocast():
                _, metrics = self.step_fn.loss_and_metrics(batch, model=model)
            n = len(records)
            sums += torch.tensor([metrics["loss"] * n, metrics.get("rewards/accuracies", 0.0) * n, n],
                                 dtype=torch.float64, device=acc.device)
        model.train()
        sums = acc.reduce(sums, reduction="sum")
        result = {"eval/loss": (sums[0] / sums[2]).item()}
        if t.algo == "dpo":
            result["eval/rewards/accuracies"] = (sums[1] / sums[2]).item()
        return result

    def _evaluate_task_accuracy(self, model, records) -> dict[str, float]:
        """The held-out check of the algorithms that sample (grpo, online_dpo, rft): greedy answers scored by
        each record's task.

        ``eval/accuracy`` is the mean task score (exact match for counts and numbers, IoU for a box),
        ``eval/exact_match`` the share of answers with full marks; ``eval/loss`` is
        ``1 - eval/accuracy`` so that early stopping reads it like a loss.
        """
        from vlmtune.tasks.core import task_meta

        acc = self.accelerator
        tasks = [record_task(r) for r in records]
        answers = self._greedy_answers(model, records)
        scores = [task.score(answer, task_meta(r.metadata)) for task, r, answer in zip(tasks, records, answers)]
        sums = torch.tensor([sum(scores), sum(s >= 1.0 for s in scores), len(records)], dtype=torch.float64,
                            device=acc.device)
        sums = acc.reduce(sums, reduction="sum")
        model.train()
        accuracy = (sums[0] / sums[2]).item()
        return {"eval/accuracy": accuracy, "eval/exact_match": (sums[1] / sums[2]).item(), "eval/loss": 1.0 - accuracy}

    def _greedy_answers(self, model, records) -> list[str]:
        from vlmtune.generate import generate

        return generate(model, self.processor, [(r.images, r.prompt) for r in records], self._answer_length(),
                        batch_size=max(8, self.config.train.batch_size))

    @torch.no_grad()
    def _write_samples(self, step: int, metrics_log: MetricsLog) -> None:
        """``train.sample_every``: the fixed items' greedy answers, scored, to samples.html and the trackers
        (main process only; the others go on to the next step and wait for it there)."""
        if self.sample_log is None:
            return
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        rows = sample_rows(step, self.sample_items, self._greedy_answers(model, self.sample_items))
        model.train()
        metrics_log.write_samples(step, rows, images=not self.sample_log.images_logged)
        self.sample_log.add(rows, title=f"{self.out.name}: samples while training")

    def _answer_length(self) -> int:
        """The longest greedy answer (held-out check, training samples): ``grpo.max_new_tokens`` under grpo,
        else ``online.max_new_tokens``."""
        c = self.config
        return c.grpo.max_new_tokens if c.train.algo == "grpo" else c.online.max_new_tokens

    def _early_stop(self, eval_loss: float) -> bool:
        best = self.state["best_eval_loss"]
        if best is None or eval_loss < best:
            self.state["best_eval_loss"] = eval_loss
            self.state["evals_without_improvement"] = 0
        else:
            self.state["evals_without_improvement"] += 1
        patience = self.config.train.early_stopping_patience
        return patience is not None and self.state["evals_without_improvement"] >= patience

    # ----- saving -----

    def save_checkpoint(self) -> Path:
        t = self.config.train
        state = {
            **self.state,
            "num_processes": self.world,
            "batch_size": t.batch_size,
            "grad_accum": t.grad_accum,
            "seed": t.seed,
        }
        return checkpoint.save_checkpoint(
            self.out, state, self.accelerator, self.model, self.optimizer.optimizer, self.scheduler,
            self.precision.state_dict(), t.keep_last, process_state=self._kept_generation(),
        )

    def _save_final(self) -> Path:
        """The adapter (or weights) and the processor in ``RUN/final``, loadable on their own.

        A sharded model (FSDP) is gathered first, so ``final`` is a plain transformers folder either way.
        """
        final = self.out / "final"
        acc = self.accelerator
        acc.wait_for_everyone()
        gathered = sharding.full_state_dict(self.model) if checkpoint.is_sharded(self.model) else None
        if acc.is_main_process:
            with checkpoint.naming_unwritable(final, self.out):
                acc.unwrap_model(self.model).save_pretrained(final, safe_serialization=True, state_dict=gathered)
                record_base(acc.unwrap_model(self.model), final)
                self.processor.save_pretrained(final)
                (self.out / "config.yaml").write_text(config_yaml(self.config))
                write_model_card(self.out, final)
        acc.wait_for_everyone()
        return final

    # ----- Ctrl-C -----

    def _on_sigint(self, signum, frame) -> None:
        self.interrupted = True

    def _interrupt_requested(self) -> bool:
        """True on every process when any one got Ctrl-C, so all save the same step together."""
        flag = torch.tensor([1.0 if self.interrupted else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)


def train(config: Config, resume: bool = False, trust_remote_code: bool = False) -> Path:
    """Train as ``config`` says; returns ``RUN/final`` (iterative DPO: the last round's). Raises
    TrainingInterrupted on Ctrl-C. ``trust_remote_code`` (the ``--trust-remote-code`` flag) lets the
    model folder's own code run."""
    if config.train.algo == "iterative_dpo":  # rounds of this loop, each on its own pairs (train/iterative.py)
        from vlmtune.train.iterative import train_rounds

        return train_rounds(config, resume=resume, trust_remote_code=trust_remote_code)
    return Trainer(config, resume=resume, trust_remote_code=trust_remote_code).train()

