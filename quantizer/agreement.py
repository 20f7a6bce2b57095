"""How far the quantized model's predictions are from the unquantized model's, token by token.

Perplexity averages damage away: two models of equal perplexity can disagree on many tokens. These
compare the two models' next-token distributions on the same windows, both served by the same engine:
- KL(FP16 || quantized) per scored token, from each model's top-k log-probabilities (what an engine
  returns). The distributions are coarsened to the reference's top-k tokens plus one bucket for the
  rest of the vocabulary, whose mass is 1 minus the listed tokens' on each side. A token in the
  reference's top-k that the quantized model did not list is given the quantized model's k-th
  log-probability: it cannot be more likely than that. Coarsening can only lower a KL divergence
  (data-processing inequality); with k covering the vocabulary the figure is exact.
- Top-1 agreement: the share of scored tokens where both models' most likely next token is the same.
- Greedy generations from the same prompts: the share that match token for token, and the mean
  position of the first token that differs (the length when none does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

# Top log-probabilities per token: (token id, log-probability), most likely first.
TopLogprobs = Sequence[tuple[int, float]]
# Mass below this is taken as none: a bucket of 1e-12 is float rounding of a full top-k.
_NO_MASS = 1e-9


def token_kl(reference: TopLogprobs, quantized: TopLogprobs) -> float:
    """KL(reference || quantized) of one token's next-token distributions, coarsened as described."""
    if not reference or not quantized:
        raise ValueError("token_kl needs the top log-probabilities of both models")
    listed = dict(quantized)
    floor = min(listed.values())
    kl = p_mass = q_mass = 0.0
    for token, logp in reference:
        logq = listed.get(token, floor)
        p = math.exp(logp)
        kl += p * (logp - logq)
        p_mass += p
        q_mass += math.exp(logq)
    p_rest, q_rest = 1.0 - p_mass, 1.0 - q_mass
    if p_rest > _NO_MASS:
        kl += p_rest * (math.log(p_rest) - math.log(max(q_rest, _NO_MASS)))
    return max(kl, 0.0)


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class DistributionAgreement:
    tokens: int
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float


def distribution_agreement(reference: Sequence[TopLogprobs], quantized: Sequence[TopLogprobs]) -> DistributionAgreement:
    """Per-token KL and top-1 agreement over the scored tokens (the same tokens, in the same order)."""
    if len(reference) != len(quantized) or not reference:
        raise ValueError(f"the two models scored {len(reference)} and {len(quantized)} tokens; "
                         "they must score the same, non-empty windows")
    kls = [token_kl(p, q) for p, q in zip(reference, quantized, strict=True)]
    agree = sum(p[0][0] == q[0][0] for p, q in zip(reference, quantized, strict=True))
    return DistributionAgreement(tokens=len(kls), kl_mean=sum(kls) / len(kls), kl_p99=quantile(kls, 0.99),
                                 kl_max=max(kls), top1_agreement=agree / len(kls))


@dataclass(frozen=True)
class GenerationAgreement:
    prompts: int
    new_tokens: int
    exact_match: float  # share of prompts whose completions are equal token for token
    mean_first_difference: float  # position of the first differing token, the length when none differs

    def to_dict(self) -> dict:
        return asdict(self)


def generation_agreement(reference: Sequence[Sequence[int]], quantized: Sequence[Sequence[int]]) -> GenerationAgreement:
    if len(reference) != len(quantized) or not reference:
        raise ValueError(f"{len(reference)} and {len(quantized)} completions: one per prompt from each model")
    firsts = []
    for a, b in zip(reference, quantized, strict=True):
        length = min(len(a), len(b))
        firsts.append(next((i for i in range(length) if a[i] != b[i]), length))
    matches = sum(list(a) == list(b) for a, b in zip(reference, quantized, strict=True))
    return GenerationAgreement(prompts=len(reference), new_tokens=max(len(a) for a in reference),
                               exact_match=matches / len(reference), mean_first_difference=sum(firsts) / len(firsts))
