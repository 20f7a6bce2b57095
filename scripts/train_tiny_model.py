"""Train the tiny test fixtures (a Llama, a Qwen3-MoE; model + byte-level BPE tokenizer) offline, on CPU.

The training text is the Python standard library that ships with the interpreter
(``sysconfig.get_paths()["stdlib"]``, top-level ``*.py`` files), so every machine has it without a
network. The files are split deterministically, by file, into three disjoint sets:

* evaluation text (~150 KB) -> ``<text-output>/evaluation.txt``, held out from tokenizer and model training;
* calibration text (~300 KB) -> ``<text-output>/calibration.txt``, also held out from training;
* everything else is the training text.

Run it from the repository root (about 10 minutes on 2 otherwise idle CPU cores)::

    .venv/bin/python scripts/train_tiny_model.py
    .venv/bin/python scripts/train_tiny_model.py --steps 1600 --seed 0 \\
        --output tests/fixtures/tiny-llama --text-output tests/fixtures/text

The mixture of experts (``--architecture qwen3_moe``: 8 experts, 2 per token, trained with the router's
load-balancing loss) shares the Llama's tokenizer, text split and training schedule::

    .venv/bin/python scripts/train_tiny_model.py --architecture qwen3_moe \\
        --output tests/fixtures/tiny-qwen3-moe --text-output tests/fixtures/text

It writes the model (float16 safetensors, config.json, generation_config.json), the Hugging Face fast
tokenizer (tokenizer.json, tokenizer_config.json) and a README.md that records how the fixture was made,
its architecture, sizes, and the held-out perplexity measured in float32 PyTorch with the GPTQ-paper
convention (evaluation text tokenized once, non-overlapping windows of 256 tokens, remainder dropped,
ppl = exp(mean NLL of the predicted tokens)).

The result depends on the Python version whose standard library is used; the README records it.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import random
import shlex
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
)

VOCAB_SIZE = 2048
SEQ_LEN = 256
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]  # ids 0, 1, 2, 3
EVAL_BYTES = 150_000
CALIB_BYTES = 300_000
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TextSplit:
    """The standard-library text, split by file."""

    stdlib_dir: Path
    train_files: list[str]
    calib_files: list[str]
    eval_files: list[str]
    train_texts: list[str]
    calibration: str
    evaluation: str


def read_source(path: Path) -> str:
    """Read one source file as UTF-8 text with normalized newlines."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def truncate_at_line(text: str, max_bytes: int) -> str:
    """Cut ``text`` to at most ``max_bytes`` UTF-8 bytes, ending at a line break."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    cut = raw[:max_bytes]
    nl = cut.rfind(b"\n")
    if nl > 0:
        cut = cut[: nl + 1]
    return cut.decode("utf-8", errors="ignore")


def split_stdlib(subpackages: bool = False) -> TextSplit:
    """Collect the stdlib's top-level ``*.py`` files and split them deterministically by file.

    Files are ordered by the SHA-256 of their name (a fixed pseudo-random order that does not depend
    on the file contents); the first ones go to evaluation until it holds ``EVAL_BYTES``, the next
    ones to calibration until ``CALIB_BYTES``; the rest is training text. With ``subpackages``, the
    packages' ``*.py`` files (asyncio, email, json, ...; their test suites left out, since tests quote
    the modules they test) are training text too: about three times the text, for models too large to
    train on the top-level files alone. Evaluation and calibration text are the same either way.
    """
    stdlib_dir = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib_dir.glob("*.py") if p.is_file())
    if not files:
        raise SystemExit(f"no *.py files found in {stdlib_dir}")
    order = sorted(files, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    eval_files: list[Path] = []
    calib_files: list[Path] = []
    train_files: list[Path] = []
    eval_size = calib_size = 0
    for path in order:
        size = len(read_source(path).encode("utf-8"))
        if eval_size < EVAL_BYTES:
            eval_files.append(path)
            eval_size += size
        elif calib_size < CALIB_BYTES:
            calib_files.append(path)
            calib_size += size
        else:
            train_files.append(path)
    eval_files.sort()
    calib_files.sort()
    train_files.sort()
    if subpackages:
        excluded = {"site-packages", "test", "tests", "idle_test"}
        train_files += sorted(p for p in stdlib_dir.rglob("*.py")
                              if p.parent != stdlib_dir and not excluded & set(p.relative_to(stdlib_dir).parts))
    evaluation = truncate_at_line("\n\n".join(read_source(p) for p in eval_files), EVAL_BYTES)
    calibration = truncate_at_line("\n\n".join(read_source(p) for p in calib_files), CALIB_BYTES)
    return TextSplit(
        stdlib_dir=stdlib_dir,
        train_files=[str(p.relative_to(stdlib_dir)) for p in train_files],
        calib_files=[p.name for p in calib_files],
        eval_files=[p.name for p in eval_files],
        train_texts=[read_source(p) for p in train_files],
        calibration=calibration,
        evaluation=evaluation,
    )


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) that prepends ``<s>`` like Llama's."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    if [fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] != [0, 1, 2, 3]:
        raise RuntimeError("unexpected special token ids")
    if len(fast) > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(fast)} tokens, more than {VOCAB_SIZE}")
    return fast


ARCHITECTURES = ("llama", "qwen3_moe")


def make_config(tokenizer: PreTrainedTokenizerFast, architecture: str = "llama", layers: int = 4,
                hidden: int = 128) -> PretrainedConfig:
    """The fixture's architecture: every Linear's in/out size is a multiple of 32. The Qwen3-MoE has the
    Llama's attention sizes and, per token, two of 8 experts of 128 (a multiple of 128, so every group size applies).
    Larger models (the quality benchmark's) keep the proportions: heads of 32, half as many KV heads, an
    MLP three times the hidden size."""
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 64,
        head_dim=32,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if architecture == "qwen3_moe":
        return Qwen3MoeConfig(
            **common, intermediate_size=256, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.01,
        )
    return LlamaConfig(**common, intermediate_size=3 * hidden)


def encode_training_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """Concatenate ``<s> file </s>`` for every training file into one token stream."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=True)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(
    model: torch.nn.Module,
    stream: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    bf16_autocast: bool = False,
) -> None:
    """Train on random 256-token windows of the stream with AdamW (float32 weights and optimizer state;
    with bf16_autocast the matmuls run in bfloat16, which CPUs with AMX or AVX-512 BF16 do several times
    faster: what makes a model of tens of millions of parameters trainable on two cores)."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    warmup = max(1, steps // 20)
    model.train()
    n_windows = stream.numel() - SEQ_LEN
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        starts = torch.randint(0, n_windows, (batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - t0
            print(
                f"step {step:5d}/{steps}  loss {loss.item():.4f}  lr {lr_at(step, steps, lr, warmup):.2e}  {elapsed:7.1f}s",
                flush=True,
            )
    model.eval()


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, text: str) -> tuple[float, int]:
    """GPTQ-paper perplexity: tokenize once, non-overlapping 256-token windows, exp(mean NLL).

    Returns the perplexity and the number of windows.
    """
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n = ids.numel() // SEQ_LEN
    nlls: list[torch.Tensor] = []
    for i in range(n):
        window = ids[i * SEQ_LEN : (i + 1) * SEQ_LEN].unsqueeze(0)
        logits = model(input_ids=window).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="mean")
        nlls.append(nll)
    return math.exp(torch.stack(nlls).mean().item()), n


def _shown(path: Path) -> str:
    """A path as the README shows it: relative to the repository when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


def human_size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "tests/fixtures/tiny-llama")
    parser.add_argument("--text-output", type=Path, default=REPO_ROOT / "tests/fixtures/text")
    parser.add_argument("--steps", type=int, default=1600, help="optimizer steps (default 1600)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows of 256 tokens per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="llama")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size, a multiple of 64 (default 128)")
    parser.add_argument("--subpackages", action="store_true",
                        help="train on the standard library's packages too (same held-out text; larger models)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--bf16-autocast", action="store_true",
                        help="run the training matmuls in bfloat16 (float32 weights); the fixtures train without it")
    args = parser.parse_args(argv)
    # Before any work or output: the sizes make_config can build.
    if args.hidden < 64 or args.hidden % 64:
        parser.error(f"--hidden {args.hidden}: use a multiple of 64 (heads of 32, two query heads per KV head)")
    if args.layers < 1:
        parser.error(f"--layers {args.layers}: use 1 or more")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: use 1 or more")

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    split = split_stdlib(args.subpackages)
    args.text_output.mkdir(parents=True, exist_ok=True)
    (args.text_output / "evaluation.txt").write_text(split.evaluation, encoding="utf-8")
    (args.text_output / "calibration.txt").write_text(split.calibration, encoding="utf-8")
    train_bytes = sum(len(t.encode("utf-8")) for t in split.train_texts)
    print(
        f"stdlib {split.stdlib_dir}: {len(split.train_files)} training files ({human_size(train_bytes)}), "
        f"{len(split.calib_files)} calibration files, {len(split.eval_files)} evaluation files"
    )

    tokenizer = train_tokenizer(split.train_texts)
    stream = encode_training_stream(tokenizer, split.train_texts)
    print(
        f"tokenizer: {len(tokenizer)} tokens; training stream {stream.numel()} tokens "
        f"({train_bytes / stream.numel():.2f} bytes/token)"
    )

    config = make_config(tokenizer, args.architecture, args.layers, args.hidden)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters")

    t_train = time.perf_counter()
    train(model, stream, args.steps, args.batch_size, args.lr, args.seed, args.bf16_autocast)
    train_s = time.perf_counter() - t_train
    tokens_seen = args.steps * args.batch_size * SEQ_LEN
    print(f"training: {train_s:.0f} s, {tokens_seen} tokens ({tokens_seen / stream.numel():.2f} epochs)")

    ppl_fp32_weights, _ = perplexity(model, tokenizer, split.evaluation)

    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file():
            stale.unlink()
    model = model.to(torch.float16)
    model.config.dtype = torch.float16
    model.config.output_router_logits = False  # a training-time option; inference has no labels
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    # Measure what was saved: reload the float16 checkpoint, compute in float32.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reloaded.eval()
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    eval_ppl, n_windows = perplexity(reloaded, reloaded_tok, split.evaluation)
    calib_ppl, _ = perplexity(reloaded, reloaded_tok, split.calibration)
    n_eval_tokens = len(reloaded_tok(split.evaluation)["input_ids"])
    total_s = time.perf_counter() - t_start

    cmd = "python " + " ".join(
        shlex.quote(a)
        for a in [
            "scripts/train_tiny_model.py",
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            str(args.lr),
            "--seed",
            str(args.seed),
            *(["--layers", str(args.layers), "--hidden", str(args.hidden)] if (args.layers, args.hidden) != (4, 128) else []),
            *(["--subpackages"] if args.subpackages else []),
            *(["--threads", str(args.threads)] if args.threads != 2 else []),
            *(["--bf16-autocast"] if args.bf16_autocast else []),
            *(["--architecture", args.architecture, "--output", _shown(out), "--text-output", _shown(args.text_output)]
              if args.architecture != "llama" or (args.layers, args.hidden) != (4, 128) else []),
        ]
    )
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.name != "README.md"}
    text_files = {p.name: p.stat().st_size for p in sorted(args.text_output.iterdir()) if p.is_file()}
    linears = [
        f"| `{name}` | {mod.in_features} | {mod.out_features} |"
        for name, mod in reloaded.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.startswith(("model.layers.0.", "lm_head"))
    ]
    if args.architecture == "qwen3_moe":  # Transformers fuses the experts; the checkpoint has one Linear each
        size = config.moe_intermediate_size
        linears += [f"| `model.layers.0.mlp.experts.<0-{config.num_experts - 1}>.{name}` | {i} | {o} |"
                    for name, i, o in (("gate_proj", config.hidden_size, size), ("up_proj", config.hidden_size, size),
                                       ("down_proj", size, config.hidden_size))]
        linears.append(f"| `model.layers.0.mlp.gate` (router) | {config.hidden_size} | {config.num_experts} |")
    architecture = reloaded.config.architectures[0]
    where = "" if args.architecture != "llama" else \
        "; defaults write `tests/fixtures/tiny-llama` and\n  `tests/fixtures/text`"
    if args.architecture == "qwen3_moe":
        shape = (f"{config.num_experts} experts of intermediate {config.moe_intermediate_size}, "
                 f"{config.num_experts_per_tok} per token (router trained with the load-balancing loss, "
                 f"coefficient {config.router_aux_loss_coef}), q/k RMSNorm")
    else:
        shape = f"intermediate {config.intermediate_size}"
    precision = "float32 weights, bfloat16 autocast" if args.bf16_autocast else "float32 training"
    readme = f"""# {out.name} test fixture

A tiny {architecture.removesuffix("ForCausalLM")} ({n_params:,} parameters) with its own byte-level BPE tokenizer, trained from scratch on
CPU on the Python {platform.python_version()} standard library source (top-level `*.py` files of
`sysconfig.get_paths()["stdlib"]`). It exists so that the GPTQ quantizer and vLLM can be tested offline.
Do not edit by hand: regenerate it with `scripts/train_tiny_model.py`.

## How it was made

- Command: `{cmd}` (from the repository root{where})
- Seed {args.seed}, {args.steps} AdamW steps (peak lr {args.lr}, warmup + cosine decay, weight decay 0.1,
  grad clip 1.0), batch {args.batch_size} random windows x {SEQ_LEN} tokens, {tokens_seen:,} tokens seen
  ({tokens_seen / stream.numel():.2f} epochs), `torch.set_num_threads({args.threads})`, {precision}
- Training wall time {train_s:.0f} s, whole script {total_s:.0f} s ({platform.machine()}, torch {torch.__version__},
  Python {platform.python_version()})
- Text, split by file (files ordered by SHA-256 of their name): {len(split.eval_files)} files -> evaluation,
  {len(split.calib_files)} files -> calibration, {len(split.train_files)} files ({human_size(train_bytes)}, {stream.numel():,} tokens)
  -> tokenizer and model training. Evaluation and calibration text are both held out from training.
  - `tests/fixtures/text/evaluation.txt`: {", ".join(split.eval_files)}
  - `tests/fixtures/text/calibration.txt`: {", ".join(split.calib_files)}

## Architecture

`{architecture}`: vocab {config.vocab_size}, hidden {config.hidden_size}, {shape},
{config.num_hidden_layers} layers, {config.num_attention_heads} attention heads, {config.num_key_value_heads} KV heads,
head_dim {config.head_dim}, max positions {config.max_position_embeddings}, RMSNorm eps {config.rms_norm_eps},
untied embeddings, saved as float16 safetensors. Every Linear's in/out size is a multiple of 32
(vLLM's CPU 4-bit kernel needs this). Linears of one layer and the head:

| module | in | out |
|---|---|---|
{chr(10).join(linears)}

Tokenizer: byte-level BPE (GPT-2 pre-tokenizer), {len(tokenizer)} tokens; `<unk>`=0, `<s>`=1 (bos, prepended
by the tokenizer), `</s>`=2 (eos), `<pad>`=3.

## Held-out perplexity (float32 PyTorch, float16 weights as saved)

GPTQ-paper convention: the whole text tokenized once (one `<s>` at the start), non-overlapping windows
of {SEQ_LEN} tokens, remainder dropped, ppl = exp(mean NLL of the predicted tokens).

| text | tokens | windows | perplexity |
|---|---|---|---|
| evaluation.txt | {n_eval_tokens:,} | {n_windows} | {eval_ppl:.4f} |
| calibration.txt | {len(reloaded_tok(split.calibration)["input_ids"]):,} | {len(reloaded_tok(split.calibration)["input_ids"]) // SEQ_LEN} | {calib_ppl:.4f} |

(evaluation.txt with the float32 weights before the cast to float16: {ppl_fp32_weights:.4f})

## Files

| file | size |
|---|---|
{chr(10).join(f"| `{name}` | {size:,} B |" for name, size in files.items())}
{chr(10).join(f"| `../text/{name}` | {size:,} B |" for name, size in text_files.items())}
"""
    (out / "README.md").write_text(readme, encoding="utf-8")
    print(readme)
    print(f"python {sys.version.split()[0]}, total {total_s:.0f} s; wrote {out} and {args.text_output}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
