"""Optional vLLM sampling backend for GRPO (``grpo.backend: vllm``): faster sampling on a CUDA GPU.

vLLM is not a dependency of vlmrl: this module imports it only when a sampler is built and says
clearly when it (or CUDA) is missing. Only LoRA training is supported: before each sampling call
the current adapter is saved to a scratch folder and handed to vLLM as a new ``LoRARequest``, so
vLLM samples from the policy as it is now (the base weights never change). Full fine-tuning would
need the engine's weights replaced in place, which vLLM exposes only through internals.

The sampler returns token ids in the layout ``vlmrl.forward.group.build_group_batch`` takes: per
record, ``group_size`` completions, each cut after its stop token (kept). The vision special
tokens get a logit bias of -100 so they are not sampled; the group forward masks any that slip
through. vLLM encodes the prompts with its own copy of the model's processor: give it the same
``min_pixels``/``max_pixels`` as the training processor (``mm_processor_kwargs``), or the two
sides would see different numbers of image tokens.

    sampler = VllmSampler("Qwen/Qwen2-VL-2B-Instruct", config.grpo, policy, processor)
    step = GrpoStep(policy, processor, config.grpo, sampler=sampler)
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from vlmrl.errors import VlmrlError


def check_available() -> None:
    """Raise a VlmrlError naming what is missing for the vLLM backend (the package, a CUDA GPU)."""
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("the vllm package (pip install vllm)")
    import torch

    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if missing:
        raise VlmrlError(
            f"grpo.backend=vllm needs {' and '.join(missing)}; use grpo.backend=transformers instead"
        )


class VllmSampler:
    """Samples GRPO groups with vLLM from the base model plus the policy's current LoRA adapter."""

    def __init__(
        self,
        model_path: str,
        config,
        policy,
        processor,
        max_lora_rank: int = 64,
        gpu_memory_utilization: float = 0.3,
        mm_processor_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        check_available()
        from vllm import LLM, SamplingParams

        from vlmrl.generate import vision_token_ids
        from vlmrl.train.grpo import stop_token_ids

        self.policy = policy
        self.processor = processor
        self.stop_ids = stop_token_ids(policy, processor)
        self.end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.llm = LLM(
            model=str(model_path),
            enable_lora=True,
            max_lora_rank=max_lora_rank,
            gpu_memory_utilization=gpu_memory_utilization,
            mm_processor_kwargs=mm_processor_kwargs or {},
            seed=seed,
        )
        self.params = SamplingParams(
            n=config.group_size,
            temperature=config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_new_tokens,
            stop_token_ids=sorted(self.stop_ids),
            logit_bias={i: -100.0 for i in vision_token_ids(policy, processor)},
        )
        self._scratch = tempfile.TemporaryDirectory(prefix="vlmrl-vllm-")
        self._version = 0

    def __call__(self, records, prompts=None) -> list[list[int]]:
        """``group_size`` completions per record (a record's together), from the policy's adapter as it is now.

        ``prompts`` (the training processor's batch) is not used: vLLM encodes the prompts itself.
        """
        from vlmrl.batch import load_images, prompt_text

        request = self._adapter_request(self.policy)
        requests = [
            {"prompt": prompt_text(r, self.processor), "multi_modal_data": {"image": load_images(r)}} for r in records
        ]
        outputs = self.llm.generate(requests, self.params, lora_request=request, use_tqdm=False)
        completions = []
        for output in outputs:
            for sample in output.outputs:
                completions.append(self._through_stop(list(sample.token_ids), sample.finish_reason))
        return completions

    def _adapter_request(self, policy):
        from peft import PeftModel
        from vllm.lora.request import LoRARequest

        if not isinstance(policy, PeftModel):
            raise VlmrlError("grpo.backend=vllm supports LoRA training only; set lora.enabled=true")
        self._version += 1
        folder = Path(self._scratch.name) / f"adapter-{self._version}"
        policy.save_pretrained(folder, safe_serialization=True)
        return LoRARequest(f"policy-{self._version}", self._version, str(folder))

    def _through_stop(self, ids: list[int], finish_reason: str | None) -> list[int]:
        for i, token in enumerate(ids):
            if token in self.stop_ids:
                return ids[: i + 1]
        if finish_reason == "stop":
            # vLLM may leave the stop token out of the ids: the answer still ends with the end of turn.
            return ids + [self.end_id]
        return ids
