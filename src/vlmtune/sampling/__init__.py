"""Sampling completions from the policy: ``sample_groups`` (G per prompt, one prefill per prompt)."""

from vlmtune.sampling.sampler import GroupSamples, sample_groups

__all__ = ["GroupSamples", "sample_groups"]
