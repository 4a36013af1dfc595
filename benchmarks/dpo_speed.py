"""DPO step speed, side by side: TRL's DPOTrainer, our plain step, our fast step, the floor.

    python benchmarks/dpo_speed.py                     # every config, best of 3 (small-448 alone ~25 min)
    python benchmarks/dpo_speed.py --configs small-448 # one config
    python benchmarks/dpo_speed.py --quick             # 1 warm-up + 2 measured steps, 1 run: a smoke test
    python benchmarks/dpo_speed.py --precision bf16    # every path under bf16 autocast (TRL's default)
    python benchmarks/dpo_speed.py --device cuda --precision bf16 --configs 2b-448   # on a GPU (benchmarks/gpu.sh)

Configurations: "tiny" (112 px, 16 image tokens, 4 pairs per step) and "small" (224 px, 64 image
tokens, 2 pairs per step), where a step is bound by reading the weights more than by the tokens;
and "small-448", the token-bound regime real use is in: the "small" model given 448 px images
(32 x 32 patches, 256 image tokens per image: its image processor's pixel limit is raised to
448 x 448, which this script checks) and 8 pairs per step; "2b-448", the same on a random model of
Qwen2-VL-2B's real shapes (``vlmtune model tiny --size 2b``), for a GPU (a step there is seconds; on
CPU, minutes). The worker process, clock, precision and device are ``harness.py``'s.

Same weights, data, LoRA (rank 8 on the language model, seeded), batch and accumulation for every
path, and one precision for all of them (``--precision``: fp32 by default; ``bf16`` runs every
path's forward under bf16 autocast. TRL's configs default to bf16 autocast, so TRL is told the
precision explicitly: before this was done, the fp32 tables compared our fp32 with TRL's bf16),
fused AdamW (TRL's default), one torch thread per process (on a shared 2-core machine two threads
mostly wait for each other). Each path runs in its own process, so its peak memory is its own;
every path runs ``--repeats`` times, in turn, and the run with the least time is shown (load from
other work on a shared machine only ever adds time):

(a) TRL 1.16 ``DPOTrainer``, its fastest valid settings for vision data: a pre-wrapped PeftModel
    (reference = adapter off), gradient checkpointing off, no precomputed reference (TRL refuses it
    for images), padding-free off (disabled in 1.16), its default padding and fused AdamW;
(b) ``PreferenceStep``: the plain pair forward (chosen and rejected separately, reference live);
(c) ``FastPreferenceStep`` in steady state: reference log-probs precomputed (time shown apart) and
    vision outputs from the disk cache, measured on the second epoch; (c1) the same on the first
    epoch without caches (images once per step, shared by policy and reference; reference live);
(d) the floor: the bare LoRA model's forward + backward + AdamW over the rows (c) runs (prompt,
    the answers' common first tokens once, the rest of each answer) as one plain causal sequence,
    batches encoded beforehand, nothing around it.

Step time runs from the end of one optimizer step to the end of the next (data, forward, backward,
optimizer), warm-up steps excluded.

The first-step loss is log 2 on every path (LoRA's B starts at zero, so policy = reference; TRL
1.16 given a PeftModel even makes its reference a copy of the initial adapter, so a randomised
adapter would not compare). The first-step mean log-prob of the chosen answers checks that all
paths score the same tokens: TRL's is lower by one token's worth, the newline the chat template
writes after ``<|im_end|>``, which TRL scores and ``vlmtune.batch`` deliberately leaves out.

Where the time goes (torch.profiler and stage timers, "small"): before the last-layer cut the fast
step was ~0.33 s, language-model forward ~155 ms and backward ~155 ms; encoding, vision cache, loss
and AdamW together ~10 ms. By operator: matmuls ~58% (``aten::mm`` + ``addmm``), elementwise ~20%
(peft's LoRA scale and add, SwiGLU, RMSNorm, rope), attention ~8% (the 4D mask costs ~1% of it
against a plain causal one, bool or additive alike). No gradient reaches the embeddings or the
cached image features. The saving against TRL is bounded by the work per pair: TRL runs four vision
passes and ~4 x 127 tokens forward, 2 x 127 backward; the fast step ~138 tokens forward and
backward (prompt and the answers' common first tokens once, each answer's last token left out) and
no vision pass. Of those 138 only ~40 positions are read (they predict answer tokens), so the last
decoder layer runs its queries, attention output, MLP and norms only there and its keys and values
everywhere (``vlmtune.forward.last_layer``): the step went from ~0.33 s to ~0.29 s on "small" (1 of
8 layers, ~70% of its rows) and ~0.015 s to ~0.012 s on tiny (1 of 2 layers). Everything left is
work the floor does too: the big matmuls run at ~140 GFLOP/s on one core (near its peak) and the
rest is mostly peft's LoRA scale-and-add (an ``addmm``-fused LoRA forward measured 4-7% faster; it
is peft's code, shared by every path here, and was not adopted). Running the prompt's first
tokens (the chat template's system turn, 17 tokens, the same in every row) once per batch as a
cache was tried and made the step ~10% slower: a 17-row matmul costs a fifth of a 250-row one,
since reading the weights dominates at that size.

Load from other work on a shared machine moves every path's time between invocations, so each
round's own (c)/(a) and (c1)/(a) ratios are printed too (the paths of a round ran minutes apart).
Work per pair is counted by forward hooks on the vision tower (images encoded) and the
token embedding (image tokens = prompt passes through the language model).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import harness

CONFIGS = {  # name: (model size, image side, pairs per batch, warm-up steps, measured steps)
    "tiny": ("tiny", 112, 4, 2, 10),
    "small": ("small", 224, 2, 2, 16),
    "small-448": ("small", 448, 8, 2, 6),
    "2b-448": ("2b", 448, 8, 2, 6),
}
TARGETS = {"small-448": (3.0, 2.0)}  # (c)/(a) and (c1)/(a) speed-ups the issue asks for
QUICK = (1, 2)  # --quick: warm-up steps, measured steps (the cached path's warm-up is one epoch: 2 steps)
PATHS = ("trl", "plain", "fast1", "fast", "floor")
LORA = dict(rank=8, alpha=16)
LR = 1e-4
MAX_LENGTH = 1024


# --- worker: one path in its own process ------------------------------------------------------


def worker(args) -> dict:
    import torch

    from vlmtune.data.formats import read_records
    from vlmtune.models.load import add_lora, load_model

    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    model.to(args.device)
    torch.manual_seed(0)
    model = add_lora(model, **LORA)
    args.clock = harness.Clock(args.device)
    records = read_records(args.data)
    counter = WorkCounter(model, processor)
    batches = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    run = {"trl": run_trl, "plain": run_plain, "fast1": run_fast, "fast": run_fast, "floor": run_floor}[args.path]
    result = run(args, model, processor, batches, counter)
    n_pairs = args.batch * args.steps
    result.update(
        pairs_per_s=n_pairs / result["seconds"],
        step_s=result["seconds"] / args.steps,
        wall_step_s=result["wall_seconds"] / args.steps,
        peak_mib=harness.peak_mib(args.device),
        **counter.per_pair(),
    )
    return result


class WorkCounter:
    """Images through the vision tower and image tokens through the language model (forward hooks)."""

    def __init__(self, model, processor):
        from vlmtune.forward.inner import unwrap

        inner = unwrap(model).model
        self.image_token = unwrap(model).config.image_token_id
        self.images = self.image_tokens = self.tokens = 0
        self.pairs = 0
        self.pad = processor.tokenizer.pad_token_id
        inner.visual.register_forward_pre_hook(self._vision, with_kwargs=True)
        inner.language_model.embed_tokens.register_forward_hook(self._embed)
        self.tokens_per_image = None

    def _vision(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.images += len(grid)
        self.tokens_per_image = int(grid[0].prod()) // 4

    def _embed(self, module, args, output):
        ids = args[0]
        self.image_tokens += int((ids == self.image_token).sum())
        self.tokens += int((ids != self.pad).sum())

    def start(self, pairs: int):
        self.images = self.image_tokens = self.tokens = 0
        self.pairs = pairs

    def per_pair(self) -> dict:
        n = max(self.pairs, 1)
        per_image = self.tokens_per_image or 1
        return {
            "vision_per_pair": self.images / n,
            "prompt_passes_per_pair": self.image_tokens / per_image / n,
            "lm_tokens_per_pair": self.tokens / n,
            "tokens_per_image": self.tokens_per_image,
        }


def timed_loop(args, step_fn, batches, counter) -> dict:
    """Warm-up steps, then measured steps; each step's batch cycles through ``batches``."""
    first = None
    for i in range(args.warmup):
        out = step_fn(batches[i % len(batches)])
        first = first or out
    counter.start(args.batch * args.steps)
    start = args.clock.now()
    for i in range(args.steps):
        out = step_fn(batches[(args.warmup + i) % len(batches)])
        first = first or out
    return {**args.clock.since(start), "first_loss": first[0], "first_logps_chosen": first[1]}


def optimizer_step(model):
    import torch

    # Fused: the AdamW that TRL's Trainer picks by default on torch >= 2.8 (~3 ms a step less on "small").
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, fused=True)

    def step(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def run_plain(args, model, processor, batches, counter) -> dict:
    from vlmtune.config import LossConfig
    from vlmtune.train.steps import PreferenceStep

    step = PreferenceStep(model, processor, MAX_LENGTH, LossConfig(name="dpo"))
    update = optimizer_step(model)

    def one(records):
        with harness.autocast(args):
            loss, metrics = step.loss_and_metrics(step.encode(records, args.device))
        update(loss)
        return loss.item(), metrics["logps/chosen"]

    return timed_loop(args, one, batches, counter)


def run_fast(args, model, processor, batches, counter) -> dict:
    from vlmtune.config import LossConfig
    from vlmtune.forward.ref_cache import precompute_reference
    from vlmtune.train.fast_step import FastPreferenceStep

    cached = args.path == "fast"
    extra, ref_seconds = {}, None
    if cached:
        start = time.perf_counter()
        records = [r for batch in batches for r in batch]
        with harness.autocast(args):
            ref = precompute_reference(model, processor, records, MAX_LENGTH,
                                       cache_dir=Path(args.work) / "ref-cache", batch_size=args.batch)
        ref_seconds = time.perf_counter() - start
        extra = dict(reference_logps=ref, vision_cache_dir=Path(args.work) / "vision-cache")
    step = FastPreferenceStep(model, processor, MAX_LENGTH, LossConfig(name="dpo"), **extra)
    update = optimizer_step(model)

    def one(records):
        with harness.autocast(args):
            loss, metrics = step.loss_and_metrics(step.encode(records, args.device))
        update(loss)
        return loss.item(), metrics["logps/chosen"]

    if cached:  # steady state = a later epoch: the first epoch (images cached) is the warm-up
        args.warmup = max(args.warmup, len(batches))
    result = timed_loop(args, one, batches, counter)
    result["ref_precompute_s"] = ref_seconds
    return result


def run_floor(args, model, processor, batches, counter) -> dict:
    """The bare model over ``prompt|chosen|rejected`` as one causal sequence; answer-token CE loss."""
    import torch

    from vlmtune.batch import encode_pairs
    from vlmtune.forward.shared_prefix import CHOSEN, REJECTED, pack_pairs

    inputs = []
    for records in batches:
        pairs = encode_pairs(records, processor, MAX_LENGTH)
        packed = pack_pairs(pairs, processor.tokenizer.pad_token_id)
        answers = (packed.segments == CHOSEN) | (packed.segments == REJECTED)
        mm_types = torch.zeros_like(packed.input_ids)
        width = pairs.chosen["mm_token_type_ids"].shape[1]
        mm_types[:, : min(width, mm_types.shape[1])] = pairs.chosen["mm_token_type_ids"][:, : mm_types.shape[1]]
        inputs.append(
            {name: value.to(args.device) for name, value in dict(
                input_ids=packed.input_ids,
                attention_mask=(packed.segments != 0).long(),
                mm_token_type_ids=mm_types,
                pixel_values=pairs.chosen["pixel_values"],
                image_grid_thw=pairs.chosen["image_grid_thw"],
                labels=packed.input_ids.masked_fill(~answers, -100),
            ).items()}
        )
    update = optimizer_step(model)
    model.train()

    def one(batch):
        with harness.autocast(args):
            loss = model(**batch, use_cache=False).loss  # cross-entropy on the answers: not a DPO loss
        update(loss)
        return loss.item(), None

    return timed_loop(args, one, inputs, counter)


def run_trl(args, model, processor, batches, counter) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from vlmtune.batch import load_images

    records = [r for batch in batches for r in batch]
    rows = {
        "prompt": [r.prompt for r in records],
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": r.chosen}]}] for r in records],
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": r.rejected}]}] for r in records],
        "images": [load_images(r) for r in records],
    }
    dataset = Dataset.from_dict(rows)
    total = args.warmup + args.steps
    config = DPOConfig(
        output_dir=str(Path(args.work) / "trl"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=total,
        learning_rate=LR,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        use_cpu=args.device == "cpu",
        bf16=args.precision == "bf16",  # TRL's configs default to True; the fp32 table turns it off
        dataloader_num_workers=0,
        max_length=MAX_LENGTH,
        beta=0.1,
        loss_type=["sigmoid"],
        seed=0,
        disable_tqdm=True,
    )
    clock = _step_clock(args.clock, args.warmup, counter, args.batch * args.steps)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor,
                         callbacks=[clock])
    trainer.train()
    return {**clock.times, "first_loss": clock.first_loss, "first_logps_chosen": clock.first_logps}


def _step_clock(timer: harness.Clock, warmup: int, counter: WorkCounter, pairs: int):
    """A TrainerCallback timing optimizer steps after the warm-up, and keeping the first logged loss."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        start = None
        times = None
        first_loss = None
        first_logps = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                counter.start(pairs)
                self.start = timer.now()
            elif state.global_step > warmup:
                self.times = timer.since(self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.first_loss is None and logs and "loss" in logs:
                self.first_loss, self.first_logps = float(logs["loss"]), float(logs["logps/chosen"])

    return StepClock()


# --- driver: build models and data, run every path, print the table ---------------------------


def schedule(name: str, quick: bool) -> tuple[int, int, int]:
    """Pairs per step, warm-up steps and measured steps of a config."""
    _, _, batch, warmup, steps = CONFIGS[name]
    return (batch, *QUICK) if quick else (batch, warmup, steps)


def build(work: Path, name: str, n_pairs: int) -> tuple[Path, Path]:
    from vlmtune.data.synth import synth_pairs_file
    from vlmtune.models.tiny import build_tiny, image_side

    size, side = CONFIGS[name][:2]
    model = build_tiny("qwen2-vl", work / f"model-{name}", size=size, seed=0)
    if side > image_side("qwen2-vl", size):
        allow_image_side(model, side)
    data = synth_pairs_file(work / f"data-{name}", n_images=n_pairs, seed=0, image_size=side)
    return model, data


def allow_image_side(model_dir: Path, side: int) -> None:
    """Raise the saved image processor's pixel limit to ``side`` x ``side``, so such images keep their size."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    size = processor.image_processor.size
    processor.image_processor.size = {"shortest_edge": size["shortest_edge"], "longest_edge": side * side}
    processor.save_pretrained(model_dir)
    processor.image_processor.save_pretrained(model_dir)


def image_tokens(name: str) -> int:
    """Image tokens per image of a config: one per 2x2 block of 14 px patches."""
    return (CONFIGS[name][1] // 28) ** 2


def run_path(path: str, name: str, model: Path, data: Path, work: Path, args) -> dict:
    batch, warmup, steps = schedule(name, args.quick)
    options = ["--model", str(model), "--data", str(data), "--work", str(work / f"{name}-{path}"),
               "--batch", str(batch), "--warmup", str(warmup), "--steps", str(steps)]
    result = harness.run_worker(__file__, path, options, args)
    if "error" in result:
        return result
    seen = result["tokens_per_image"]  # None where no image was encoded (the cached path)
    if seen is not None and seen != image_tokens(name):
        raise AssertionError(f"{name} {path}: {seen} image tokens per image, expected {image_tokens(name)}")
    return result


def best_runs(name: str, model: Path, data: Path, work: Path, args) -> tuple[dict, list[float]]:
    """Every path ``args.repeats`` times, in turn (so load from other work falls on all paths alike); per
    path the run with the least CPU time per step: other load only ever adds time. Also each round's
    own (c)/(a) and (c1)/(a) ratios: the paths of a round ran minutes apart under the same load."""
    best, rounds = {}, []
    for repeat in range(args.repeats):
        this_round = {}
        for path in PATHS:  # a fresh work folder: no run reads the caches an earlier one wrote
            result = run_path(path, name, model, data, work / f"run-{repeat}", args)
            this_round[path] = result
            kept = best.get(path)
            if kept is None or "error" in kept or ("error" not in result and result["step_s"] < kept["step_s"]):
                best[path] = result
        if all("error" not in this_round[p] for p in ("trl", "fast", "fast1")):
            trl = this_round["trl"]["step_s"]
            rounds.append((trl / this_round["fast"]["step_s"], trl / this_round["fast1"]["step_s"]))
    return best, rounds


def print_table(name: str, results: dict, args, rounds: list[tuple[float, float]]) -> None:
    batch, warmup, steps = schedule(name, args.quick)
    repeats = args.repeats
    names = {"trl": "(a) TRL DPOTrainer", "plain": "(b) plain step", "fast1": "(c1) fast, epoch 1",
             "fast": "(c) fast, cached", "floor": "(d) floor"}
    print(f"\n{name}: {CONFIGS[name][0]} Qwen2-VL, {CONFIGS[name][1]} px ({image_tokens(name)} image tokens), "
          f"batch {batch} pairs, accumulation 1, {warmup} warm-up + {steps} measured steps, "
          f"best of {repeats} runs, {harness.describe(args)}")
    header = (
        f"{'path':<20} {'pairs/s':>8} {'step s':>8} {'wall s':>7} {'peak MiB':>8} {'1st loss':>9} "
        f"{'1st logp(c)':>11} {'vision/pair':>11} {'prompt passes/pair':>18} {'LM tokens/pair':>14}"
    )
    print(header)
    print("-" * len(header))
    for path in PATHS:
        r = results[path]
        if "error" in r:
            print(f"{names[path]:<20} {r['error']}")
            continue
        cells = [
            f"{names[path]:<20}",
            f"{r['pairs_per_s']:>8.2f}",
            f"{r['step_s']:>8.3f}",
            f"{r['wall_step_s']:>7.3f}",
            f"{r['peak_mib']:>8.0f}",
            f"{_num(r['first_loss'], path != 'floor'):>9}",
            f"{_num(r['first_logps_chosen']):>11}",
            f"{r['vision_per_pair']:>11.2f}",
            f"{r['prompt_passes_per_pair']:>18.2f}",
            f"{r['lm_tokens_per_pair']:>14.1f}",
        ]
        print(" ".join(cells))
    if all("error" not in results[p] for p in PATHS):
        fast, trl, plain, floor = (results[p] for p in ("fast", "trl", "plain", "floor"))
        targets = TARGETS.get(name)
        print(f"(c)/(a) speed {fast['pairs_per_s'] / trl['pairs_per_s']:.2f}x   "
              f"(c)/(b) speed {fast['pairs_per_s'] / plain['pairs_per_s']:.2f}x   "
              f"(c1)/(a) speed {results['fast1']['pairs_per_s'] / trl['pairs_per_s']:.2f}x   "
              f"step time (c)/(d) {fast['step_s'] / floor['step_s']:.2f}   "
              f"peak memory (c)/(a) {fast['peak_mib'] / trl['peak_mib']:.2f}")
        for label, index in (("(c)/(a)", 0), ("(c1)/(a)", 1)):
            ratios = [r[index] for r in rounds]
            if ratios:
                print(f"{label} within each round: {'  '.join(f'{r:.2f}x' for r in ratios)}   "
                      f"median {statistics.median(ratios):.2f}x")
        if targets:
            print(f"targets (issue 14): (c)/(a) >= {targets[0]}x steady state, (c1)/(a) >= {targets[1]}x first epoch")
        n = batch * steps
        print(f"reference precompute for (c): {fast['ref_precompute_s']:.2f} s for {n} pairs, once "
              "(reused across epochs and runs)")


def _num(value, show: bool = True) -> str:
    return f"{value:.4f}" if show and value is not None else "-"


def main(argv=None) -> None:
    parser = harness.build_parser(__doc__.splitlines()[0], list(CONFIGS), PATHS,
                                  "1 warm-up + 2 measured steps, 1 run: a smoke test", ("--batch", "--warmup", "--steps"))
    args = parser.parse_args(argv)
    if args.worker:
        args.path = args.worker
        print(json.dumps(worker(args)))
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dpo-speed-") as tmp:
        work = Path(tmp)
        if args.quick:
            args.repeats = 1
        for name in args.configs:
            batch, _, steps = schedule(name, args.quick)
            model, data = build(work, name, batch * steps)
            results, rounds = best_runs(name, model, data, work, args)
            print_table(name, results, args, rounds)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
