"""The step object of each ``train.algo``: what the loop asks to ``encode`` records and to give ``loss_and_metrics``.

``make_step`` builds SFT's, KTO's, GRPO's, online DPO's and RFT's steps, and for the DPO family the
fast pair forward (with the reference precompute and the vision cache when the config asks for
them) or the plain one. Iterative DPO has no step of its own: it runs rounds of the DPO loop
(``vlmtune.train.iterative``).
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.config import Config
from vlmtune.errors import VlmtuneError
from vlmtune.forward.ref_cache import precompute_reference
from vlmtune.train.fast_step import FastPreferenceStep
from vlmtune.train.grpo import GrpoStep
from vlmtune.train.kto_step import KtoStep
from vlmtune.train.online import OnlineDpoStep, RftStep, build_judge
from vlmtune.train.steps import PreferenceStep, SftStep, needs_reference


def make_step(config: Config, model, processor, reference, unwrapped, *, train_records: list, accelerator,
              caches: Path, trust_remote_code: bool = False):
    """The step of ``config.train.algo`` on ``model`` (as prepared by accelerate; ``unwrapped`` is its bare
    module). ``reference`` is a separate frozen model, or None for the policy with its adapter off.
    ``caches`` is the folder of the reference and vision caches (the run folder's parent)."""
    c, t = config, config.train
    max_length = c.data.max_length
    if t.algo == "sft":
        return SftStep(model, processor, max_length)
    if t.algo == "kto":
        return KtoStep(model, processor, max_length, c.loss, reference, unwrapped)
    if t.algo == "grpo":
        return GrpoStep(model, processor, c.grpo, reference, unwrapped)
    if t.algo == "online_dpo":
        judge = build_judge(c.online, trust_remote_code)
        return OnlineDpoStep(model, processor, c.online, c.loss, judge, reference, unwrapped)
    if t.algo == "iterative_dpo":
        raise VlmtuneError("iterative_dpo trains in rounds, each a dpo run: start it with vlmtune.train.loop.train")
    if t.algo == "rft":
        return RftStep(model, processor, c.online, build_judge(c.online, trust_remote_code), unwrapped)
    if not t.fast_path and not c.data.cache_vision and not t.precompute_ref:
        return PreferenceStep(model, processor, max_length, c.loss, reference, unwrapped)
    reference_logps = None
    if t.precompute_ref and needs_reference(c):
        # The main process writes the cache first; the others then read it instead of recomputing.
        with accelerator.main_process_first():
            reference_logps = precompute_reference(
                unwrapped, processor, train_records, max_length, cache_dir=caches / "ref-cache",
                batch_size=t.batch_size, reference=reference,
            )
    return FastPreferenceStep(
        model, processor, max_length, c.loss, reference=reference, unwrapped=unwrapped,
        fast_path=t.fast_path, vision_cache_dir=caches / "vision-cache" if c.data.cache_vision else None,
        reference_logps=reference_logps,
    )
