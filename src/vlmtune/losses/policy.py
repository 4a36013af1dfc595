"""GRPO: group-relative advantages and the clipped policy-gradient objective, as pure functions.

What is implemented, and how it differs from the textbook GRPO (Shao et al. 2024, DeepSeekMath,
arXiv 2402.03300, Eq. 3 with the outcome-supervision advantages of Sec. 4.1.2):

- Advantages: each completion's reward minus its group's mean, divided by the group's standard
  deviation (Bessel-corrected, as ``torch.std`` and TRL do) plus ``eps``. ``scale="none"`` skips
  the division, as Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv
  2503.20783, Sec. 3.1) recommends, since dividing by the std over-weights groups that are
  nearly all right or all wrong.
- Objective: PPO's clipped ratio (Schulman et al. 2017, Eq. 7) per token, with one advantage per
  completion spread over its tokens. ``clip_eps_high`` allows DAPO's "clip-higher" (Yu et al.
  2025, arXiv 2503.14476, Sec. 3.1): a wider upper bound so unlikely tokens can still rise.
- Normalisation, the main departure: the textbook averages over each completion's tokens, then
  over completions (``normalize="sequence"``), which gives a short answer's tokens more weight
  than a long one's. The default here is ``"token"``: the sum over all tokens of the batch divided
  by their number (DAPO, Sec. 3.3). ``"constant"`` divides by ``B · max_tokens`` instead
  (Dr. GRPO), which removes the length bias altogether. "The batch" may be a whole global batch
  of which only a micro-batch is passed (``denominator``): micro-batches and processes then add up
  to the global batch's loss.
- KL: optional, to the reference policy with Schulman's k3 estimator per token,
  ``π_ref/πθ − log(π_ref/πθ) − 1`` (unbiased and always ≥ 0), weighted by ``beta``, added to the
  loss inside the normalisation as in GRPO's Eq. 3. ``beta = 0`` (DAPO, Dr. GRPO and TRL's
  default) needs no reference model.
- The function returns a loss to minimise: the negative of the paper's objective.
"""

from __future__ import annotations

import torch

from vlmtune.errors import VlmtuneError

Tensor = torch.Tensor


def group_advantages(rewards: Tensor, group_size: int, scale: str = "std", eps: float = 1e-4) -> Tensor:
    """Group-normalised advantages; ``rewards`` is ``(N*G,)`` (groups contiguous) or ``(N, G)``.

    ``Â_i = (r_i − mean(r_group)) / (std(r_group) + eps)`` (GRPO, DeepSeekMath Sec. 4.1.2), or
    without the division for ``scale="none"`` (Dr. GRPO). A group whose rewards are all equal
    gets zero advantages: it carries no signal about which answer is better. Returns the shape
    it was given.
    """
    if scale not in ("std", "none"):
        raise VlmtuneError(f"advantage scale must be 'std' or 'none', got {scale!r}")
    if group_size < 1 or rewards.numel() % group_size:
        raise VlmtuneError(
            f"{rewards.numel()} rewards do not split into groups of {group_size}: the number of "
            "completions per batch must be a multiple of the number of generations per prompt"
        )
    grouped = rewards.reshape(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "std" and group_size > 1:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(rewards.shape)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(πθ ‖ π_ref) (Schulman 2020, "Approximating KL divergence")."""
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1


def loss_units(mask: Tensor, normalize: str, max_tokens: int | None = None) -> float:
    """What ``normalize`` divides the summed loss by, counted on one batch.

    ``"token"``: its completion tokens; ``"sequence"``: its completions; ``"constant"``: its
    completions times ``max_tokens`` (default: ``T``). Summed over every micro-batch of an optimizer
    step and every process, it is the denominator of the global batch (see :func:`grpo_objective`).
    """
    if normalize == "token":
        return float(mask.sum())
    if normalize == "sequence":
        return float(mask.shape[0])
    if normalize == "constant":
        return float(mask.shape[0] * (max_tokens or mask.shape[1]))
    raise VlmtuneError(f"normalize must be 'token', 'sequence' or 'constant', got {normalize!r}")


def _normalise(per_token: Tensor, mask: Tensor, normalize: str, max_tokens: int | None,
               denominator: float | None) -> Tensor:
    if denominator is None:
        denominator = max(loss_units(mask, normalize, max_tokens), 1.0)
    if normalize == "sequence":  # each completion's token mean, then summed over completions
        total = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum()
    else:
        total = (per_token * mask).sum()
    return total / denominator if denominator > 0 else total  # no tokens at all: the sum is 0


def grpo_objective(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    normalize: str = "token",
    max_tokens: int | None = None,
    denominator: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The clipped GRPO loss (see the module docstring for the exact variant).

    Shapes: ``logps``, ``old_logps``, ``ref_logps``, ``mask``: ``(B, T)`` per completion token
    (``mask`` is 1 on completion tokens, 0 on padding); ``advantages``: ``(B,)``. ``old_logps``
    are those of the policy that sampled the completions; pass ``logps.detach()`` when there is
    one update per batch (the ratio is then 1 and only its gradient matters).

    ``max_tokens`` is the constant length of ``normalize="constant"`` (default: ``T``). The summed
    loss is divided by ``denominator``, by default this batch's own :func:`loss_units`. To normalise
    by a whole global batch split into ``k`` micro-batches over ``w`` processes whose gradients are
    averaged (DAPO, Sec. 3.3; TRL), pass the global batch's units divided by ``k · w``: the
    micro-batches' mean loss is then the global sum over the global units.

    Returns ``(loss, metrics)``; metrics (floats, means over this batch's tokens): ``kl`` (k3, when
    ``ref_logps`` is given), ``clip_fraction`` (share of tokens whose gradient the clip removed; TRL's
    ``clip_ratio/region_mean``), ``clip_ratio/low`` and ``clip_ratio/high`` (the ratio below
    ``1 − ε`` with a negative advantage, above ``1 + ε_high`` with a positive one; TRL's
    ``clip_ratio/low_mean`` and ``clip_ratio/high_mean``, logged under both names), ``ratio_mean``.
    """
    if beta > 0 and ref_logps is None:
        raise VlmtuneError("a KL penalty (beta > 0) needs reference log-probs: pass ref_logps or set beta=0")
    mask = mask.to(logps.dtype)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = advantages.unsqueeze(1)

    # PPO's pessimistic bound: min(ratio·A, clip(ratio)·A); the gradient stops once the ratio has
    # moved past 1 ± ε in the direction the advantage pushes it.
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = k3_kl(logps, ref_logps) if ref_logps is not None else None
    if beta > 0:
        per_token = per_token + beta * kl
    loss = _normalise(per_token, mask, normalize, max_tokens, denominator)

    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1.0)
        low_clipped = ((ratio < 1 - clip_eps) & (adv < 0)).to(mask.dtype)
        high_clipped = ((ratio > 1 + high) & (adv > 0)).to(mask.dtype)
        region = ((low_clipped + high_clipped) * mask).sum().div(n_tokens).item()
        low = (low_clipped * mask).sum().div(n_tokens).item()
        high_share = (high_clipped * mask).sum().div(n_tokens).item()
        metrics = {
            "clip_fraction": region,
            "clip_ratio/region_mean": region,
            "clip_ratio/low": low,
            "clip_ratio/low_mean": low,
            "clip_ratio/high": high_share,
            "clip_ratio/high_mean": high_share,
            "ratio_mean": (ratio * mask).sum().div(n_tokens).item(),
        }
        if kl is not None:
            metrics["kl"] = (kl * mask).sum().div(n_tokens).item()
    return loss, metrics
