"""GRPO step speed, side by side: TRL's GRPOTrainer, our GrpoStep, and a decode-only floor.

    python benchmarks/grpo_speed.py                          # tiny and small, G 8 and 16, best of 3 (~50 min)
    python benchmarks/grpo_speed.py --configs small-g16      # one config
    python benchmarks/grpo_speed.py --quick                  # 1 warm-up + 1 measured step, 1 run: a smoke test
    python benchmarks/grpo_speed.py --device cuda --precision bf16 --configs 2b-g16   # on a GPU (benchmarks/gpu.sh)

Every path gets the same random-weight Qwen2-VL (``vlmtune.models.tiny.build_tiny``, "tiny" 112 px or
"small" 224 px images; "2b", Qwen2-VL-2B's real shapes with 448 px images, for a GPU), the same synthetic counting prompts (``vlmtune.data.synth.synth_pairs_file``,
in file order, no shuffling), LoRA rank 8 / alpha 16 on the language model's linear layers
(seeded), 8 prompts x G completions per optimizer step in one micro-batch, at most 40 new tokens,
temperature 1, top-p 1, top-k off, beta 0.04, rewards ``count_exact`` + 0.1 x ``count_format``
(our defaults, passed to TRL as reward functions with ``reward_weights``), token-level loss
normalisation (TRL's "dapo", our "token"), group-std advantage scaling, one precision for every path
(``--precision``: fp32, or bf16 autocast around the update; sampling runs outside autocast on
every path, as in TRL and our training loop), fused AdamW, gradient
clipping at 1.0 (the Trainer's default, applied on our side too), one torch thread. Each path runs
in its own process, so its peak memory is its own; every path runs ``--repeats`` times, in turn,
and the run with the least time per step is shown (other load on the machine only ever adds time).
The worker process, clock (process CPU seconds on CPU, synchronized wall seconds on a GPU),
precision and device are ``harness.py``'s.
The run time above is estimated from a smoke run's CPU seconds: on "small" at G 16, TRL's step
takes ~90 s and its worker ~9 GB of memory.

What each side does per optimizer step:

(a) TRL 1.16 ``GRPOTrainer``, its fastest valid settings on CPU: transformers' ``generate`` (no
    vLLM, no continuous batching, which refuses multimodal models), ``use_cpu`` on CPU, bf16 as ``--precision``,
    gradient checkpointing off, logging and saving off, ``steps_per_generation`` = accumulation = 1
    and ``num_iterations`` 1 (so no "old" log-prob pass), LoRA through ``peft_config`` (reference =
    adapters disabled). Its sampler repeats every prompt G times in the batch, so ``generate``
    encodes each image and prefills each prompt G times; then one no-grad reference forward and one
    policy forward + backward over the N*G ``prompt | completion`` rows, each with its own copy of
    the image: **3 vision passes and 3 prompt passes per completion**.
(b) ours: ``vlmtune.train.grpo.GrpoStep`` built with its defaults (so whatever sampler it ships with:
    ``model.generate(num_return_sequences=G)``, which in transformers 5 encodes each image once
    before copying the inputs G ways but prefills each prompt G times; a group sampler that
    prefills once per prompt does both once) and driven as
    ``vlmtune.train.loop.Trainer`` drives it: ``encode`` (sample, score, lay out), then
    ``loss_and_metrics``, backward, clip, AdamW. The update encodes each image once per group and
    runs one ``prompt | c1 | ... | cG`` row per group, for the policy and (adapter off) the
    reference: **2/G vision passes and 2/G prompt passes per completion**, plus the sampler's share
    of each, 1/G (once per prompt) or 1 (once per completion); the script names which it measured.
(c) the floor for sampling: the same LoRA model decodes N*G rows, one sampled token per row per
    forward, ``max_new_tokens`` steps, from a KV cache filled beforehand (the prompts' prefill and
    the copy of the cache G ways are not timed), vision special tokens suppressed as the samplers
    do, no stop handling: what decoding that many tokens costs with this model and nothing else.
    Its row shows that decoding as its "sample s" and "step s".

Columns: "sample s" is the time inside generation per step (TRL: its ``_generate``, tokenising
the prompts and ``generate``; ours: ``encode``, which also scores the completions and lays out
the update's batch, a few milliseconds); "update s" the rest of the step (TRL: the images processed
again, rewards, reference and policy passes, optimizer; ours: reference and policy passes,
optimizer); "step s" from the end
of one optimizer step to the end of the next, warm-up excluded; "decode steps" the longest
completion of each step, averaged (the number of decoding forwards a step needed; the floor's is
``max_new_tokens``). Vision passes and prompt passes per completion are counted with forward
hooks on the vision tower (images encoded) and the token embedding (image tokens through the
language model / image tokens per image), split by phase, and asserted against the numbers above.

Targets (issue 14): step time at least 2.5x faster than TRL on small-g16; sampling within 1.3x of
the decode floor. The ratio lines print them beside the measured ratios.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import harness

CONFIGS = {  # name: (model size, image side, group size G, warm-up steps, measured steps)
    "tiny-g8": ("tiny", 112, 8, 1, 4),
    "tiny-g16": ("tiny", 112, 16, 1, 4),
    "small-g8": ("small", 224, 8, 1, 3),
    "small-g16": ("small", 224, 16, 1, 3),
    "2b-g8": ("2b", 448, 8, 1, 3),
    "2b-g16": ("2b", 448, 16, 1, 3),
}
PATHS = ("trl", "ours", "floor")
PROMPTS = 8  # prompts per optimizer step
MAX_NEW_TOKENS = 40
TEMPERATURE = 1.0
BETA = 0.04
REWARD_WEIGHTS = (1.0, 0.1)  # count_exact, count_format: GrpoConfig's default rewards
LORA = dict(rank=8, alpha=16)
LR = 1e-4
MAX_GRAD_NORM = 1.0
TARGET_STEP_RATIO = 2.5  # TRL's step time / ours, on small-g16
TARGET_SAMPLE_RATIO = 1.3  # our sampling time / the decode floor's


# --- worker: one path in its own process ------------------------------------------------------


def worker(args) -> dict:
    import torch

    from vlmtune.data.formats import read_records
    from vlmtune.models.load import load_model

    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    model.to(args.device)
    args.clock = harness.Clock(args.device)
    records = read_records(args.data)
    counter = WorkCounter(model)
    batches = [records[i : i + PROMPTS] for i in range(0, len(records), PROMPTS)]
    run = {"trl": run_trl, "ours": run_ours, "floor": run_floor}[args.path]
    result = run(args, model, processor, batches, counter)
    completions = PROMPTS * args.group * args.steps
    result.update(
        step_s=result["seconds"] / args.steps,
        sample_s=result["sample_seconds"] / args.steps,
        wall_step_s=result["wall_seconds"] / args.steps,
        completions_per_s=completions / result["seconds"],
        peak_mib=harness.peak_mib(args.device),
        **counter.per_completion(completions),
    )
    result["update_s"] = result["step_s"] - result["sample_s"]
    return result


class WorkCounter:
    """Images through the vision tower and prompt passes through the language model, per phase.

    A prompt pass is counted by the image tokens the token embedding sees (each prompt holds one
    image's tokens; decoding steps feed none): image tokens / tokens per image.
    """

    def __init__(self, model):
        inner = model.model
        self.image_token = model.config.image_token_id
        self.phase = "update"
        self.counts = {}
        self.tokens_per_image = None
        inner.visual.register_forward_pre_hook(self._vision, with_kwargs=True)
        inner.language_model.embed_tokens.register_forward_hook(self._embed)
        self.start()

    def _vision(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.counts[self.phase]["images"] += len(grid)
        self.tokens_per_image = int(grid[0].prod()) // 4  # the 2x2 patch merge

    def _embed(self, module, args, output):
        self.counts[self.phase]["image_tokens"] += int((args[0] == self.image_token).sum())

    def start(self):
        self.counts = {phase: {"images": 0, "image_tokens": 0} for phase in ("sample", "update")}

    def per_completion(self, completions: int) -> dict:
        per_image = self.tokens_per_image or 1
        result = {}
        for phase, c in self.counts.items():
            result[f"{phase}_vision"] = c["images"] / completions
            result[f"{phase}_prompts"] = c["image_tokens"] / per_image / completions
        return result


def run_ours(args, model, processor, batches, counter) -> dict:
    import torch

    from vlmtune.config import GrpoConfig
    from vlmtune.models.load import add_lora
    from vlmtune.train.grpo import GrpoStep

    torch.manual_seed(0)
    model = add_lora(model, **LORA)
    config = GrpoConfig(group_size=args.group, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, beta=BETA)
    step = GrpoStep(model, processor, config)  # the shipped defaults: sampler, shared prompt, reference = adapter off
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, fused=True)
    model.train()
    sample_seconds, decode_steps = 0.0, []

    def one(records, measured: bool):
        nonlocal sample_seconds
        counter.phase = "sample"
        start = args.clock.now()
        # Sampling outside autocast, as the training loop (and TRL's generation) does: autocast would
        # cast the frozen weights again at every decoding step.
        batch = step.encode(records, args.device)
        counter.phase = "update"
        if measured:
            sample_seconds += args.clock.since(start)["seconds"]
            decode_steps.append(batch.group.completion_ids.shape[1])
        with harness.autocast(args):
            loss, _ = step.loss_and_metrics(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()

    for i in range(args.warmup):
        one(batches[i % len(batches)], measured=False)
    counter.start()
    start = args.clock.now()
    for i in range(args.steps):
        one(batches[(args.warmup + i) % len(batches)], measured=True)
    return {**args.clock.since(start), "sample_seconds": sample_seconds, "decode_steps": statistics.mean(decode_steps)}


def run_floor(args, model, processor, batches, counter) -> dict:
    """Decode ``MAX_NEW_TOKENS`` sampled tokens for N*G rows from a ready KV cache; only the decoding is timed."""
    import torch

    from vlmtune.forward.shared_prefix import unwrap
    from vlmtune.generate import encode_prompts, vision_token_ids
    from vlmtune.models.load import add_lora

    torch.manual_seed(0)
    model = add_lora(model, **LORA)
    model.eval()
    processor.tokenizer.padding_side = "left"  # as every sampler pads prompts
    vision_ids = vision_token_ids(model, processor)
    decode_seconds = decode_wall = 0.0

    @torch.no_grad()
    def one(records, measured: bool):
        nonlocal decode_seconds, decode_wall
        prompts = encode_prompts([(r.images, r.prompt) for r in records], processor)
        prompts = {name: value.to(args.device) for name, value in prompts.items()}
        counter.phase = "sample"  # the prefill is set-up, not decoding: counted apart, never timed
        out = model(**prompts, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(args.group)
        mask = prompts["attention_mask"].repeat_interleave(args.group, dim=0)
        logits = out.logits[:, -1].float().repeat_interleave(args.group, dim=0)
        # M-RoPE positions as generate gives them: the text position counts real tokens, the three
        # rotary rows run ahead of it by the prompt's rope_deltas (set by the prefill).
        lengths = mask.sum(1, keepdim=True)
        deltas = unwrap(model).model.rope_deltas.repeat_interleave(args.group, dim=0)
        counter.phase = "update"
        start = args.clock.now()
        for t in range(MAX_NEW_TOKENS):
            logits[:, vision_ids] = float("-inf")  # as every sampler here suppresses the vision special tokens
            token = torch.multinomial(torch.softmax(logits / TEMPERATURE, dim=-1), 1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            text = lengths + t
            positions = torch.cat([text[None], (text + deltas)[None].expand(3, -1, -1)])
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
        if measured:
            spent = args.clock.since(start)
            decode_seconds += spent["seconds"]
            decode_wall += spent["wall_seconds"]

    for i in range(args.warmup):
        one(batches[i % len(batches)], measured=False)
    counter.start()
    for i in range(args.steps):
        one(batches[(args.warmup + i) % len(batches)], measured=True)
    # The floor is all sampling: its step is its decoding, and prefills are reported under "sample".
    return {"seconds": decode_seconds, "wall_seconds": decode_wall, "sample_seconds": decode_seconds,
            "decode_steps": MAX_NEW_TOKENS}


def run_trl(args, model, processor, batches, counter) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from vlmtune.batch import load_images
    from vlmtune.models.load import LANGUAGE_MODEL_LINEARS
    from vlmtune.rewards import count_exact_reward, count_format_reward

    records = [r for batch in batches for r in batch]
    dataset = Dataset.from_dict({
        "prompt": [r.prompt for r in records],
        "images": [load_images(r) for r in records],
        "counts": [r.metadata["counts"] for r in records],
    })
    config = GRPOConfig(
        output_dir=str(Path(args.work) / "trl"),
        per_device_train_batch_size=PROMPTS * args.group,  # completions: 8 prompts x G, one micro-batch
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        beta=BETA,
        num_iterations=1,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        reward_weights=list(REWARD_WEIGHTS),
        shuffle_dataset=False,
        max_steps=args.warmup + args.steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=MAX_GRAD_NORM,
        logging_strategy="no",
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        bf16=args.precision == "bf16",  # GRPOConfig defaults to True: told the precision explicitly
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                             target_modules=LANGUAGE_MODEL_LINEARS, task_type="CAUSAL_LM")
    clock = _step_clock(args.clock, args.warmup, counter)
    trainer = _timed_trainer_class(GRPOTrainer, clock, counter)(
        model=model, args=config, train_dataset=dataset, processing_class=processor,
        reward_funcs=[count_exact_reward, count_format_reward], peft_config=peft_config, callbacks=[clock],
    )
    trainer.train()
    return {**clock.times, "sample_seconds": clock.sample_seconds, "decode_steps": statistics.mean(clock.decode_steps)}


def _timed_trainer_class(base, clock, counter):
    """``base`` with its generation (``_generate``: tokenise the prompts, sample) timed and counted apart."""

    class TimedGeneration(base):
        def _generate(self, prompts):
            counter.phase = "sample"
            start = clock.timer.now()
            try:
                out = super()._generate(prompts)
            finally:
                counter.phase = "update"
            if clock.start is not None:
                clock.sample_seconds += clock.timer.since(start)["seconds"]
                clock.decode_steps.append(max(len(ids) for ids in out[1]))  # out[1]: the completions' ids
            return out

    return TimedGeneration


def _step_clock(timer: harness.Clock, warmup: int, counter: WorkCounter):
    """A TrainerCallback timing optimizer steps after the warm-up."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.start = self.times = None
            self.timer = timer
            self.sample_seconds = 0.0  # time inside generation, measured steps only
            self.decode_steps = []  # each measured step's longest completion

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                counter.start()
                self.start = timer.now()
            elif state.global_step > warmup:
                self.times = timer.since(self.start)

    return StepClock()


# --- the numbers every path must show, worked out by hand -----------------------------------------


def check_counts(path: str, result: dict, group: int) -> str:
    """Assert the vision and prompt passes per completion derived in the module docstring; name ours' sampler."""
    def close(a: float, b: float) -> bool:
        return abs(a - b) < 1e-9

    if path == "trl":
        expected = {"sample_vision": 1, "sample_prompts": 1, "update_vision": 2, "update_prompts": 2}
        note = "TRL: generate on G copies of each prompt"
    elif path == "floor":
        expected = {"sample_vision": 1 / group, "sample_prompts": 1 / group, "update_vision": 0, "update_prompts": 0}
        note = "floor: decoding only"
    else:  # each of the sampler's two shares is either once per prompt (1/G) or once per completion (1)
        vision = 1 / group if close(result["sample_vision"], 1 / group) else 1
        prompts = 1 / group if close(result["sample_prompts"], 1 / group) else 1
        expected = {"sample_vision": vision, "sample_prompts": prompts, "update_vision": 2 / group,
                    "update_prompts": 2 / group}
        note = (f"ours: sampling encodes each image {'once' if vision < 1 else 'G times'}, "
                f"prefills each prompt {'once' if prompts < 1 else 'G times'}")
    wrong = {k: (result[k], v) for k, v in expected.items() if not close(result[k], v)}
    if wrong:
        raise AssertionError(f"{path}: passes per completion (measured, expected): {wrong}")
    return note


# --- driver: build models and data, run every path, print the table ---------------------------


def build(work: Path, size: str, side: int, n_prompts: int) -> tuple[Path, Path]:
    from vlmtune.data.synth import synth_pairs_file
    from vlmtune.models.tiny import build_tiny

    model = work / f"model-{size}"
    if not model.exists():
        build_tiny("qwen2-vl", model, size=size, seed=0)
    data = synth_pairs_file(work / f"data-{size}-{n_prompts}", n_images=n_prompts, seed=0, image_size=side)
    return model, data


def run_path(path: str, name: str, model: Path, data: Path, work: Path, args) -> dict:
    _, _, group, warmup, steps = CONFIGS[name]
    options = ["--model", str(model), "--data", str(data), "--work", str(work / f"{name}-{path}"),
               "--group", str(group), "--warmup", str(args.warmup or warmup), "--steps", str(args.steps or steps)]
    result = harness.run_worker(__file__, path, options, args)
    if "error" in result:
        return result
    result["note"] = check_counts(path, result, group)
    return result


def best_runs(name: str, model: Path, data: Path, work: Path, args) -> tuple[dict, list[float]]:
    """Every path ``args.repeats`` times, in turn; per path the run with the least CPU time per step.
    Also each round's own TRL/ours step ratio: the two ran minutes apart under the same load."""
    best, rounds = {}, []
    for repeat in range(args.repeats):
        this_round = {}
        for path in PATHS:
            result = run_path(path, name, model, data, work / f"run-{repeat}", args)
            this_round[path] = result
            kept = best.get(path)
            if kept is None or "error" in kept or ("error" not in result and result["step_s"] < kept["step_s"]):
                best[path] = result
        if "error" not in this_round["trl"] and "error" not in this_round["ours"]:
            rounds.append(this_round["trl"]["step_s"] / this_round["ours"]["step_s"])
    return best, rounds


def print_table(name: str, results: dict, args, rounds: list[float]) -> None:
    size, side, group, warmup, steps = CONFIGS[name]
    warmup, steps = args.warmup or warmup, args.steps or steps
    names = {"trl": "(a) TRL GRPOTrainer", "ours": "(b) ours, GrpoStep", "floor": "(c) decode floor"}
    print(f"\n{name}: {size} Qwen2-VL, {side} px, {PROMPTS} prompts x G {group}, {MAX_NEW_TOKENS} new tokens, "
          f"beta {BETA}, {warmup} warm-up + {steps} measured steps, best of {args.repeats} runs, "
          f"{harness.describe(args)}, per step")
    header = (f"{'path':<20} {'sample s':>8} {'update s':>8} {'step s':>8} {'wall s':>7} {'compl/s':>8} "
              f"{'peak MiB':>8} {'decode steps':>12} {'vision/compl':>12} {'prefills/compl':>14}")
    print(header)
    print("-" * len(header))
    for path in PATHS:
        r = results[path]
        if "error" in r:
            print(f"{names[path]:<20} {r['error']}")
            continue
        vision = r["sample_vision"] + r["update_vision"]
        prefills = r["sample_prompts"] + r["update_prompts"]
        if path == "floor":  # its prefill is set-up, outside the timed decoding
            vision = prefills = 0.0
        print(f"{names[path]:<20} {r['sample_s']:>8.3f} {r['update_s']:>8.3f} {r['step_s']:>8.3f} "
              f"{r['wall_step_s']:>7.3f} {r['completions_per_s']:>8.1f} {r['peak_mib']:>8.0f} "
              f"{r['decode_steps']:>12.1f} {vision:>12.3f} {prefills:>14.3f}   {r['note']}")
    if all("error" not in results[p] for p in PATHS):
        trl, ours, floor = (results[p] for p in PATHS)
        print(f"step time TRL/ours {trl['step_s'] / ours['step_s']:.2f}x "
              f"(target >= {TARGET_STEP_RATIO}x on small-g16)   "
              f"sampling ours/floor {ours['sample_s'] / floor['sample_s']:.2f} (target <= {TARGET_SAMPLE_RATIO})   "
              f"sampling TRL/floor {trl['sample_s'] / floor['sample_s']:.2f}   "
              f"update TRL/ours {trl['update_s'] / ours['update_s']:.2f}x   "
              f"peak memory ours/TRL {ours['peak_mib'] / trl['peak_mib']:.2f}")
        if rounds:
            print(f"step time TRL/ours within each round: {'  '.join(f'{r:.2f}x' for r in rounds)}   "
                  f"median {statistics.median(rounds):.2f}x")


def main(argv=None) -> None:
    parser = harness.build_parser(__doc__.splitlines()[0], list(CONFIGS), PATHS,
                                  "1 warm-up + 1 measured step, 1 run: a smoke test", ("--group", "--warmup", "--steps"))
    args = parser.parse_args(argv)
    if args.worker:
        args.path = args.worker
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.warmup, args.steps, args.repeats = 1, 1, 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="grpo-speed-") as tmp:
        work = Path(tmp)
        for name in args.configs:
            size, side, _, warmup, steps = CONFIGS[name]
            n_prompts = PROMPTS * ((args.warmup or warmup) + (args.steps or steps))
            model, data = build(work, size, side, n_prompts)
            results, rounds = best_runs(name, model, data, work, args)
            print_table(name, results, args, rounds)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
