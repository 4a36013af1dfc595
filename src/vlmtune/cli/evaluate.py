"""`vlmtune infer` (answer images) and `vlmtune eval` (metrics with confidence intervals)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vlmtune.cli.model import add_loader, add_trust_remote_code
from vlmtune.errors import VlmtuneError

log = logging.getLogger(__name__)

INFER_EXAMPLES = """examples:
  vlmtune infer --model runs/tiny-model --image photo.jpg --prompt "Count the vehicles."
  vlmtune infer --model Qwen/Qwen2-VL-2B-Instruct --adapter runs/dpo --data test.jsonl --out answers.jsonl
  vlmtune infer --model M --data test.jsonl --out samples.jsonl --temperature 1.0 --num-samples 4
"""

EVAL_EXAMPLES = """examples:
  vlmtune eval --model M --adapter runs/dpo --data test.jsonl --out eval/dpo
  vlmtune eval --model M --mme MME_Benchmark_release_version --out eval/mme
  vlmtune eval --model M --llava-bench llava-bench-in-the-wild --out eval/llava \\
      --judge-url https://api.openai.com/v1 --judge-model gpt-4o --judge-key-env OPENAI_API_KEY

Writes OUT/metrics.json (metric -> value, 95% bootstrap CI, n) and OUT/samples.jsonl.
"""


def add_commands(commands: argparse._SubParsersAction) -> None:
    infer = commands.add_parser(
        "infer", help="answer an image (or every record of a data file) with a model",
        description="Batched generation with a base model, a training run's adapter or a merged export.",
        epilog=INFER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_options(infer)
    infer.add_argument("--image", action="append", default=[], help="an image path (repeat for several)")
    infer.add_argument("--prompt", help="the question about --image")
    infer.add_argument("--data", help="answer every record of this file (any format `vlmtune data` reads)")
    infer.add_argument("--format", dest="fmt", help="format of --data (default: detected)")
    infer.add_argument("--out", help="with --data: the JSONL file of answers (default: stdout)")
    infer.add_argument("--skip-bad", action="store_true", help="skip bad records (and say which) instead of stopping")
    infer.add_argument("--temperature", type=float, default=0.0,
                       help="0 = greedy (default); > 0 samples with GRPO's sampler")
    infer.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    infer.add_argument("--num-samples", type=int, default=1,
                       help="answers per prompt, drawn by GRPO's sampler (needs --temperature > 0)")
    infer.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _generation_options(infer, max_new_tokens=64)
    infer.set_defaults(func=run_infer)

    ev = commands.add_parser(
        "eval", help="metrics with 95%% bootstrap CIs on preference data, MME or LLaVA-Bench",
        description=(
            "Evaluate a model. --data: each record scored by its task (accuracy per family, hop count "
            "and OOD axis, format rate, answer length, truncation, think/answer consistency, grounding "
            "IoU) beside a majority-answer and (--blank-baseline) a blank-image baseline; counting "
            "metrics (exact match, per-class accuracy and MAE, total count, parse failures), preference metrics (log-prob accuracy; implicit reward "
            "accuracy and margin against the reference) and BLEU / ROUGE-L against the chosen "
            "answers. --mme: MME acc, acc+ and scores. --llava-bench: LLaVA-Bench relative scores "
            "from a judge."
        ),
        epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_options(ev)
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="preference records, any mix of task families (metadata.task) and counting "
                           "records (metadata.counts); any format `vlmtune data` reads")
    what.add_argument("--mme", metavar="DIR", help="an MME folder (one folder per subtask)")
    what.add_argument("--llava-bench", metavar="DIR", help="a LLaVA-Bench folder (questions.jsonl, images/, answers)")
    ev.add_argument("--out", required=True, help="output folder for metrics.json and samples.jsonl")
    ev.add_argument("--format", dest="fmt", help="format of --data (default: detected)")
    ev.add_argument("--skip-bad", action="store_true", help="skip bad records (and say which) instead of stopping")
    ev.add_argument("--train-data", metavar="FILE",
                    help="with --data: the training file the majority-answer baseline is computed from "
                         "(default: the evaluated data itself, which is optimistic)")
    ev.add_argument("--blank-baseline", action="store_true",
                    help="with --data: also answer every prompt with grey images of the same size "
                         "(a task the model solves blind is not visual)")
    ev.add_argument("--reference", metavar="M", help="reference model for implicit rewards (default: the adapter switched off)")
    ev.add_argument("--beta", type=float, default=0.1, help="beta of the implicit reward beta*(log pi - log ref) (default 0.1)")
    ev.add_argument("--max-length", type=int, default=1024, help="longest prompt+answer for the log-prob pass (default 1024)")
    ev.add_argument("--judge-url", help="OpenAI-compatible API base of the judge, e.g. http://127.0.0.1:8000/v1")
    ev.add_argument("--judge-model", default="gpt-4o", help="model name sent to the judge endpoint (default gpt-4o)")
    ev.add_argument("--judge-key-env", metavar="VAR", help="environment variable that holds the judge's API key")
    ev.add_argument("--judge-model-path", help="a local model as the judge instead of --judge-url")
    ev.add_argument("--judge-max-new-tokens", type=int, default=256,
                    help="reply length limit of a --judge-model-path judge (default 256)")
    ev.add_argument("--reference-answers", help="LLaVA-Bench reference answers jsonl (default: found in DIR)")
    _generation_options(ev, max_new_tokens=None)
    ev.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    ev.set_defaults(func=run_eval)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model or merged export: a folder or hub id (default: the adapter's base)")
    p.add_argument("--adapter", metavar="RUN", help="a training run folder (its final/ adapter) or an adapter folder")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--min-pixels", type=int, help="smallest image area after resizing (processor setting)")
    p.add_argument("--max-pixels", type=int, help="largest image area after resizing: fewer image tokens, less memory")
    add_loader(p)
    add_trust_remote_code(p)


def _generation_options(p: argparse.ArgumentParser, max_new_tokens: int | None) -> None:
    default = f"default {max_new_tokens}" if max_new_tokens else "default 64; MME 16; LLaVA-Bench 512"
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"answer length limit ({default})")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")


def _load(args: argparse.Namespace):
    from vlmtune.eval.run import load_for_eval

    if not args.model and not args.adapter:
        raise VlmtuneError("give --model (a base model or merged export) and/or --adapter (a training run)")
    return load_for_eval(args.model, adapter=args.adapter, dtype=args.dtype,
                         min_pixels=args.min_pixels, max_pixels=args.max_pixels, loader=args.loader,
                         trust_remote_code=args.trust_remote_code)


def run_infer(args: argparse.Namespace) -> int:
    from vlmtune.data.records import user_prompt
    from vlmtune.eval.answers import answer_line, answer_rows, write_answers
    from vlmtune.generate import generate

    if bool(args.data) == bool(args.prompt):
        raise VlmtuneError("give either --prompt (with --image) or --data")
    if args.out and not args.data:
        raise VlmtuneError("--out goes with --data; a single --prompt prints its answer")
    if args.num_samples < 1 or args.batch_size < 1:
        raise VlmtuneError(f"--num-samples and --batch-size must be at least 1 (got {args.num_samples}, {args.batch_size})")
    if args.num_samples > 1 and not args.temperature > 0:
        raise VlmtuneError(f"--num-samples {args.num_samples} needs sampling: give --temperature > 0 (e.g. 1.0)")
    records = _read(args) if args.data else None
    model, processor = _load(args)
    if records is None:
        items = [(args.image, user_prompt(args.prompt, n_images=len(args.image)))]
    else:
        items = [(r.images, r.prompt) for r in records]
    progress = "infer" if records else None
    if args.temperature > 0:
        from vlmtune.sampling.sampler import sample_answers

        answers = sample_answers(model, processor, items, args.num_samples, args.max_new_tokens, args.temperature,
                                 args.top_p, seed=args.seed, batch_size=args.batch_size, progress=progress)
    else:
        answers = generate(model, processor, items, args.max_new_tokens, args.batch_size, progress=progress)
    if records is None:
        for answer in answers:
            print(answer)
        return 0
    rows = answer_rows(records, answers, args.num_samples)
    if args.out:
        n = write_answers(rows, args.out)
        log.info("wrote %d answers to %s", n, args.out)
    else:
        sys.stdout.writelines(answer_line(row) for row in rows)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    if args.llava_bench and not (args.judge_url or args.judge_model_path):
        raise VlmtuneError("--llava-bench needs a judge: --judge-url URL (OpenAI-compatible) or --judge-model-path")
    if (args.train_data or args.blank_baseline) and not args.data:
        raise VlmtuneError("--train-data and --blank-baseline go with --data (task records)")
    records = _read(args) if args.data else None
    if records is not None and not records:
        raise VlmtuneError(f"{args.data}: no records to evaluate")
    train_records = _read_train(args) if args.train_data else None
    if records is not None:
        from vlmtune.eval.tasks import check_task_records

        check_task_records(records, args.data)
        check_task_records(train_records or [], args.train_data)
    model, processor = _load(args)
    if args.mme:
        from vlmtune.eval.suite_run import evaluate_mme

        metrics = evaluate_mme(model, processor, args.mme, args.out, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens or 16, seed=args.seed,
                               skip_bad=args.skip_bad)
    elif args.llava_bench:
        from vlmtune.eval.suite_run import evaluate_llava_bench

        metrics = evaluate_llava_bench(model, processor, args.llava_bench, args.out, _judge(args),
                                       reference_answers=args.reference_answers, batch_size=args.batch_size,
                                       max_new_tokens=args.max_new_tokens or 512, seed=args.seed,
                                       skip_bad=args.skip_bad)
    else:
        from vlmtune.eval.run import evaluate

        reference = None
        if args.reference:
            from vlmtune.eval.run import load_for_eval

            reference, _ = load_for_eval(args.reference, dtype=args.dtype,
                                         min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                         loader=args.loader, trust_remote_code=args.trust_remote_code)
        metrics = evaluate(model, processor, records, args.out, reference=reference,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens or 64,
                           max_length=args.max_length, beta=args.beta, seed=args.seed,
                           train_records=train_records, blank_baseline=args.blank_baseline)
    print(metrics_table(metrics))
    if records is not None:
        _print_breakdown(metrics, majority_source=args.train_data)
    log.info("wrote %s and %s", Path(args.out) / "metrics.json", Path(args.out) / "samples.jsonl")
    return 0


def _read(args: argparse.Namespace):
    from vlmtune.data.load import load_records

    return load_records(args.data, fmt=args.fmt, skip_bad=args.skip_bad)


def _read_train(args: argparse.Namespace):
    from vlmtune.data.load import load_records

    records = load_records(args.train_data, skip_bad=args.skip_bad, check_images=False)  # answers only
    if not records:
        raise VlmtuneError(f"--train-data {args.train_data}: no records; the majority baseline needs the training answers")
    return records


def _print_breakdown(metrics: dict[str, dict], majority_source: str | None) -> None:
    from vlmtune.eval.breakdown import breakdown_tables

    tables = breakdown_tables([("model", metrics)])
    if not tables:
        return
    print()
    print(tables)
    source = f"from {majority_source}" if majority_source else (
        "from the evaluated data itself: optimistic; give --train-data for the honest baseline")
    print(f"majority answer per question type {source}")


def _judge(args: argparse.Namespace):
    from vlmtune.eval.judge import HttpJudge, LocalJudge, api_key_from_env

    if args.judge_model_path:
        from vlmtune.eval.run import load_for_eval

        model, processor = load_for_eval(args.judge_model_path, dtype=args.dtype, loader=args.loader,
                                         trust_remote_code=args.trust_remote_code)
        return LocalJudge(model, processor, max_new_tokens=args.judge_max_new_tokens, batch_size=args.batch_size)
    return HttpJudge(args.judge_url, args.judge_model, api_key=api_key_from_env(args.judge_key_env))


def metrics_table(metrics: dict[str, dict]) -> str:
    """Plain text: one metric a line with its value, 95% CI and n."""
    width = max((len(k) for k in metrics), default=6)
    lines = [f"{'metric':<{width}}  {'value':>10}  {'95% CI':>23}  {'n':>6}"]
    for name, m in metrics.items():
        ci = "" if m.get("ci_low") is None else f"[{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"
        lines.append(f"{name:<{width}}  {_fmt(m['value']):>10}  {ci:>23}  {m.get('n', ''):>6}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "nan" if x is None or x != x else f"{x:.4g}"
