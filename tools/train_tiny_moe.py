"""Train one of the small MoE models shipped under ``models/`` on the Python standard library.

Why: tests, examples and benchmarks of an expert-offloading engine need a model whose routing
means something (experts specialise, some are hot, consecutive layers' choices correlate), which
random weights do not give, and which is small enough to ship in the repository and run on a CPU.

What it does, reproducibly (seeded; fixed step count, never a time budget):
1. trains a byte-level BPE tokenizer on the training split of ``moespec.data``;
2. trains a transformers MoE model (``MixtralForCausalLM`` or ``Qwen2MoeForCausalLM``) with
   next-token cross-entropy plus a per-layer Switch-style load-balancing loss;
3. saves it with ``save_pretrained`` in bfloat16 (per-expert safetensors keys) with the tokenizer;
4. reloads the saved files in float32 and measures held-out perplexity by the protocol of
   ``moespec.data``, per-layer expert usage on held-out text, and a greedy sample;
5. writes ``README.md`` (model card) and ``training_log.json`` next to the weights.

Usage::

    python tools/train_tiny_moe.py --arch mixtral --out models/tiny-mixtral
    python tools/train_tiny_moe.py --arch qwen2moe --out models/tiny-qwen2moe
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import tokenizers
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moespec import data  # noqa: E402  (the repo root is put on the path just above)

MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "mixtral": MixtralForCausalLM,
    "qwen2moe": Qwen2MoeForCausalLM,
}

SAMPLE_PROMPTS = ("def add(a, b):", "import os\n\n\nclass ")


@dataclass
class Args:
    """Command-line arguments (see ``parse_args`` for their meaning)."""

    arch: str
    out: Path
    steps: int
    batch_size: int
    context: int
    lr: float
    min_lr_ratio: float
    warmup: int
    weight_decay: float
    aux_coef: float
    vocab_size: int
    seed: int
    eval_every: int
    threads: int


def parse_args(argv: list[str] | None = None) -> Args:
    """Parse the command line; defaults are the settings the shipped models were trained with."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(MODEL_CLASSES), required=True)
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--steps", type=int, default=700, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=12, help="sequences per step")
    p.add_argument("--context", type=int, default=data.EVAL_CHUNK_LENGTH, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a share of the peak")
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices")
    p.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100, help="held-out eval interval (steps)")
    # One intra-op thread: on a small shared machine a second OpenMP thread that gets descheduled
    # stalls every parallel region (measured 5-10x slower per step under load, not 2x faster).
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ns = p.parse_args(argv)
    return Args(**vars(ns))


def model_config(arch: str, vocab_size: int, context: int, eos_id: int) -> PreTrainedConfig:
    """The architecture hyper-parameters of each shipped model.

    Sizes were picked to train in ~15-20 minutes on two CPU cores and to keep both bfloat16
    checkpoints together around 40 MB: hidden 192, 6 layers, 6 query heads of dim 32 sharing
    2 KV heads (GQA, as the real models do), and the same routed-expert parameter budget
    (8 x 256 = 64 x 32 intermediate units per layer) in both models. ``pad_token_id``
    stays unset because ``nn.Embedding(padding_idx=...)`` would freeze the end-of-text embedding.
    Embeddings are untied, as in real Mixtral / Qwen1.5-MoE checkpoints.
    """
    common = dict(
        vocab_size=vocab_size,
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    if arch == "mixtral":
        # Few large experts: 8 experts, top-2, renormalised softmax top-k.
        return MixtralConfig(
            **common, head_dim=32, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2
        )
    if arch == "qwen2moe":
        # Many small experts plus an always-on shared expert (Qwen1.5-MoE style): 64 experts,
        # top-4, routing weights not renormalised (norm_topk_prob=False, the Qwen default).
        return Qwen2MoeConfig(
            **common,
            intermediate_size=384,  # only used by dense layers, of which there are none
            moe_intermediate_size=32,
            shared_expert_intermediate_size=256,
            num_experts=64,
            num_experts_per_tok=4,
            norm_topk_prob=False,
        )
    raise ValueError(f"arch={arch!r}: expected one of {sorted(MODEL_CLASSES)}")


def moe_shape(config: PreTrainedConfig) -> tuple[int, int]:
    """(number of routed experts, experts per token) for either architecture."""
    n_experts = getattr(config, "num_local_experts", None) or config.num_experts
    return n_experts, config.num_experts_per_tok


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenizer, so runs of indentation become single tokens).

    The only special token is ``data.DOC_SEPARATOR`` (id 0), used as BOS, EOS and padding.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[data.DOC_SEPARATOR],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out: Path, context: int) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that AutoTokenizer understands."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=data.DOC_SEPARATOR,
        eos_token=data.DOC_SEPARATOR,
        pad_token=data.DOC_SEPARATOR,
        model_max_length=context,
    )
    fast.save_pretrained(out)


def token_stream(tok: Tokenizer, texts: list[str], eos_id: int) -> torch.Tensor:
    """All training files as one id stream, each file preceded by the end-of-text token."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.append(eos_id)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, context: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, context]`` batches of non-overlapping windows, reshuffled per epoch.

    Windows rather than files so that every sequence is full (no padding) and each epoch sees
    every token once.
    """
    windows = stream[: len(stream) // context * context].view(-1, context)
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(windows), generator=gen)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[start : start + batch_size]]


def losses(model: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token cross-entropy, mean per-layer load-balancing loss) of one batch.

    transformers' own ``aux_loss`` pools the expert counts of all layers before taking the
    Switch product, so it only balances expert *ids* across the stack and lets a single layer
    collapse. The same function applied one layer at a time balances every layer.
    """
    out = model(input_ids=ids, output_router_logits=True)
    logits = out.logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    n_experts, top_k = moe_shape(model.config)
    per_layer = [load_balancing_loss_func((r,), n_experts, top_k) for r in out.router_logits]
    return ce, torch.stack(per_layer).mean()


def param_groups(model: PreTrainedModel, weight_decay: float) -> list[dict]:
    """Decay matrices (incl. the 3-D expert tensors) only; never norms or biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, args: Args) -> float:
    """Linear warm-up, then cosine decay from 1 to ``min_lr_ratio`` at the last step."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_counts(model: PreTrainedModel) -> dict[str, int]:
    """Total and per-token-active parameter counts.

    Active = everything except routed experts, plus top_k/E of the routed experts' parameters
    (the shared expert, routers, attention and embeddings are always used).
    """
    n_experts, top_k = moe_shape(model.config)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embed = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    return {
        "total": total,
        "active_per_token": total - routed + routed * top_k // n_experts,
        "routed_experts": routed,
        "per_expert": routed // (n_experts * model.config.num_hidden_layers),
        "embeddings_incl_lm_head": embed,
    }


def heldout_ids(tok: Tokenizer) -> list[int]:
    """Step 1 of the evaluation protocol: the shipped held-out text, tokenized."""
    return tok.encode(data.heldout_text()).ids


@torch.no_grad()
def heldout_perplexity(model: PreTrainedModel, ids: list[int]) -> float:
    """Held-out perplexity by ``moespec.data``'s protocol (steps 2-4)."""
    model.eval()
    return data.heldout_perplexity(lambda batch: model(input_ids=batch).logits, ids)


@torch.no_grad()
def expert_usage(model: PreTrainedModel, ids: list[int]) -> list[dict]:
    """Per-layer routing statistics on the evaluation chunks.

    For each MoE layer: the share of tokens routed to each expert (sums to top_k), the entropy
    in bits of the normalised assignment distribution (max log2(E) when perfectly balanced),
    and how many experts receive at least 1% of tokens (the collapse check).
    """
    model.eval()
    n_experts, top_k = moe_shape(model.config)
    chunks = torch.tensor(data.heldout_chunks(ids, data.EVAL_CHUNK_LENGTH, data.EVAL_N_CHUNKS))
    counts = torch.zeros(model.config.num_hidden_layers, n_experts, dtype=torch.float64)
    for batch in chunks.split(8):
        router_logits = model(input_ids=batch, output_router_logits=True).router_logits
        for layer, logits in enumerate(router_logits):
            chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(chosen, minlength=n_experts).double()
    n_tokens = chunks.numel()
    stats = []
    for layer_counts in counts:
        p = layer_counts / layer_counts.sum()
        entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
        share = layer_counts / n_tokens
        stats.append(
            {
                "entropy_bits": entropy,
                "max_entropy_bits": math.log2(n_experts),
                "experts_ge_1pct": int((share >= 0.01).sum()),
                "min_share": float(share.min()),
                "max_share": float(share.max()),
                "token_share": [round(float(s), 5) for s in share],
            }
        )
    return stats


@torch.no_grad()
def greedy_samples(model: PreTrainedModel, tok: Tokenizer, max_new_tokens: int = 48) -> dict[str, str]:
    """Greedy continuations of ``SAMPLE_PROMPTS`` with transformers' ``generate``."""
    model.eval()
    samples = {}
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )
        samples[prompt] = tok.decode(out[0].tolist(), skip_special_tokens=False)
    return samples


def train(model: PreTrainedModel, stream: torch.Tensor, args: Args, eval_ids: list[int]) -> list[dict]:
    """The training loop; returns the log records (every 10 steps, plus held-out evals)."""
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args))
    log: list[dict] = []
    t0 = time.time()
    ce_acc, aux_acc, n_acc = 0.0, 0.0, 0
    for step, ids in enumerate(batches(stream, args.context, args.batch_size, args.seed), start=1):
        model.train()
        ce, aux = losses(model, ids)
        (ce + args.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ce_acc, aux_acc, n_acc = ce_acc + ce.item(), aux_acc + aux.item(), n_acc + 1
        if step % 10 == 0 or step == args.steps:
            elapsed = time.time() - t0
            record = {
                "step": step,
                "tokens": step * args.batch_size * args.context,
                "train_ce": ce_acc / n_acc,
                "aux_loss": aux_acc / n_acc,
                "lr": sched.get_last_lr()[0],
                "elapsed_s": round(elapsed, 1),
            }
            ce_acc, aux_acc, n_acc = 0.0, 0.0, 0
            if step % args.eval_every == 0 or step == args.steps:
                record["heldout_ppl"] = heldout_perplexity(model, eval_ids)
            log.append(record)
            print(json.dumps(record), flush=True)
        if step == args.steps:
            return log
    raise AssertionError("unreachable: batches() is endless")


def reproduce_command(args: Args) -> str:
    """The command line with every option spelled out, so later changes of defaults don't matter."""
    parts = ["python tools/train_tiny_moe.py"]
    for key, value in asdict(args).items():
        parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def fmt_int(n: int) -> str:
    """12345678 -> '12.35M'."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def model_card(name: str, args: Args, summary: dict, command: str) -> str:
    """The model card text (Markdown)."""
    cfg = summary["config"]
    counts = summary["params"]
    n_experts, top_k = summary["n_experts"], summary["top_k"]
    arch_line = {
        "mixtral": f"Mixtral (`MixtralForCausalLM`): {n_experts} routed experts per layer, top-{top_k}, "
        "softmax over all experts then top-k renormalised; SwiGLU experts; no shared expert",
        "qwen2moe": f"Qwen2-MoE / Qwen1.5-MoE (`Qwen2MoeForCausalLM`): {n_experts} routed experts per "
        f"layer, top-{top_k}, softmax then top-k *not* renormalised (`norm_topk_prob=false`); plus one "
        f"shared SwiGLU expert (intermediate {cfg.get('shared_expert_intermediate_size')}) gated by "
        "sigmoid(linear); q/k/v biases",
    }[args.arch]
    expert_inter = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    usage_rows = "\n".join(
        f"| {i} | {u['entropy_bits']:.3f} | {u['max_entropy_bits']:.3f} | {u['experts_ge_1pct']}/{n_experts} "
        f"| {100 * u['min_share']:.2f}% | {100 * u['max_share']:.2f}% |"
        for i, u in enumerate(summary["expert_usage"])
    )
    collapse = "PASS" if summary["collapse_check_passed"] else "FAIL"
    samples = "\n\n".join(
        f"Prompt `{json.dumps(p)}`:\n\n```python\n{text}\n```" for p, text in summary["samples"].items()
    )
    log = summary["log"]
    curve = "\n".join(
        f"| {r['step']} | {r['tokens']:,} | {r['train_ce']:.3f} | {r['aux_loss']:.4f} | "
        + (f"{r['heldout_ppl']:.2f}" if "heldout_ppl" in r else "")
        + " |"
        for r in log
        if "heldout_ppl" in r
    )
    return f"""# {name}

A small {args.arch} mixture-of-experts language model trained from scratch on the Python
standard library's source code, shipped with moespec for tests, examples and benchmarks of
expert offloading. It is a toy: it writes Python-looking text, not correct programs.

## Architecture
- {arch_line}.
- {cfg['num_hidden_layers']} layers, hidden size {cfg['hidden_size']}, expert intermediate size {expert_inter},
  {cfg['num_attention_heads']} query heads / {cfg['num_key_value_heads']} KV heads of dim {summary['head_dim']},
  RoPE theta {summary['rope_theta']:g}, RMSNorm, untied embeddings, vocabulary {cfg['vocab_size']},
  context {cfg['max_position_embeddings']} tokens.
- Parameters: **{fmt_int(counts['total'])} total, {fmt_int(counts['active_per_token'])} active per token**
  ({counts['total']:,} / {counts['active_per_token']:,}); routed experts {counts['routed_experts']:,}
  ({counts['per_expert']:,} per expert); embeddings + LM head {counts['embeddings_incl_lm_head']:,}.
- Weights: `model.safetensors` in bfloat16 ({summary['checkpoint_bytes']:,} bytes), one tensor per
  expert projection, as written by transformers {transformers.__version__} `save_pretrained`.
- Tokenizer: byte-level BPE (`tokenizer.json`, {cfg['vocab_size']} tokens) trained on the training
  split; `<|endoftext|>` (id {cfg['eos_token_id']}) is BOS, EOS and padding. Nothing is added around
  the text when encoding.

## Training
- Data (`moespec.data`): the `*.py` files of the CPython {summary['python_version']} standard
  library, without tests, idlelib, lib2to3, encodings, pydoc_data, site-packages and similar; split
  by file: a file is held out when the sha256 of its stdlib-relative path falls in 1 of 20 buckets.
  Training split: {summary['train_files']} files, {summary['train_tokens']:,} tokens; each file is
  preceded by `<|endoftext|>` and the stream is cut into non-overlapping {args.context}-token
  windows, shuffled each epoch.
- Objective: next-token cross-entropy + {args.aux_coef} x Switch load-balancing loss, computed per
  layer from the router logits and averaged over layers.
- Optimiser: AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak lr {args.lr},
  {args.warmup} warm-up steps, cosine decay to {args.min_lr_ratio} x peak, gradient clipping 1.0,
  float32.
- {args.steps} steps x {args.batch_size} sequences x {args.context} tokens =
  **{summary['trained_tokens']:,} tokens** ({summary['epochs']:.2f} epochs), seed {args.seed}.
- Wall clock: **{summary['train_seconds'] / 60:.1f} min** of training
  ({summary['tokens_per_second']:.0f} tokens/s) on {summary['hardware']}, torch {torch.__version__},
  {args.threads} intra-op thread(s). The machine was shared with other work, so timings vary; the
  weights do not depend on them.

| step | tokens | train CE (10-step mean) | aux loss (balanced = {top_k}) | held-out ppl (fp32, before bf16 rounding) |
|---:|---:|---:|---:|---:|
{curve}

The full curve is in `training_log.json`.

## Evaluation
Saved bfloat16 weights loaded in float32, transformers' reference (eager) forward.

**Held-out perplexity: {summary['heldout_ppl']:.3f}**

Protocol (`moespec.data`, reproduced by `moespec eval`): tokenize `heldout_text()` (the held-out
split shipped as `models/heldout.txt.gz`, files joined by `<|endoftext|>`;
{summary['heldout_tokens']:,} tokens), take the first {data.EVAL_N_CHUNKS} non-overlapping chunks of
{data.EVAL_CHUNK_LENGTH} tokens, score each chunk independently; perplexity = exp(mean next-token NLL
over all {data.EVAL_N_CHUNKS * (data.EVAL_CHUNK_LENGTH - 1):,} predicted positions).

### Expert usage on the same held-out chunks
Entropy (bits) of each layer's distribution of top-{top_k} assignments over its experts; the
maximum, log2({n_experts}) = {math.log2(n_experts):.3f}, means perfectly even use. Share = fraction
of tokens routed to an expert (the shares of a layer sum to {top_k}).

| layer | entropy (bits) | max | experts with >= 1% of tokens | min share | max share |
|---:|---:|---:|---:|---:|---:|
{usage_rows}

Collapse check (every layer routes >= 1% of tokens to at least half of its experts): **{collapse}**.
Per-expert shares are in `training_log.json`.

### Greedy samples (transformers `generate`, float32, 48 new tokens)
{samples}

## Reproduce
```
{command}
```
Deterministic for a given stdlib, torch build and thread count. Another Python version changes
the training files slightly; the held-out text is fixed by the shipped file.
"""


def main(argv: list[str] | None = None) -> None:
    """Train, save, evaluate and document one model."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

    texts = data.train_texts()
    tok = train_tokenizer(texts, args.vocab_size)
    eos_id = tok.token_to_id(data.DOC_SEPARATOR)
    stream = token_stream(tok, texts, eos_id)
    eval_ids = heldout_ids(tok)
    print(f"tokenizer: {tok.get_vocab_size()} tokens; train stream {len(stream):,} tokens; "
          f"held-out {len(eval_ids):,} tokens", flush=True)

    config = model_config(args.arch, tok.get_vocab_size(), args.context, eos_id)
    model = MODEL_CLASSES[args.arch](config)
    n_experts, top_k = moe_shape(config)
    counts = param_counts(model)
    print(f"{args.arch}: {counts}", flush=True)

    t_train = time.time()
    log = train(model, stream, args, eval_ids)
    train_seconds = time.time() - t_train

    model.to(torch.bfloat16).save_pretrained(args.out)
    save_tokenizer(tok, args.out, args.context)

    # Everything reported below is measured on the files as shipped, in the reference forward.
    saved = MODEL_CLASSES[args.arch].from_pretrained(
        args.out, dtype=torch.float32, experts_implementation="eager"
    )
    ppl = heldout_perplexity(saved, eval_ids)
    usage = expert_usage(saved, eval_ids)
    samples = greedy_samples(saved, tok)
    trained_tokens = args.steps * args.batch_size * args.context
    summary = {
        "config": saved.config.to_dict(),
        "n_experts": n_experts,
        "top_k": top_k,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "rope_theta": config.rope_parameters["rope_theta"],
        "params": counts,
        "checkpoint_bytes": (args.out / "model.safetensors").stat().st_size,
        "python_version": platform.python_version(),
        "hardware": f"a shared {os.cpu_count()}-core {platform.machine()} CPU",
        "train_files": len(texts),
        "train_tokens": len(stream),
        "heldout_tokens": len(eval_ids),
        "trained_tokens": trained_tokens,
        "epochs": trained_tokens / len(stream),
        "train_seconds": train_seconds,
        "total_seconds": time.time() - t_start,
        "tokens_per_second": trained_tokens / train_seconds,
        "heldout_ppl": ppl,
        "eval_protocol": {
            "chunk_length": data.EVAL_CHUNK_LENGTH,
            "n_chunks": data.EVAL_N_CHUNKS,
            "heldout_file": "models/heldout.txt.gz",
        },
        "expert_usage": usage,
        "collapse_check_passed": all(u["experts_ge_1pct"] * 2 >= n_experts for u in usage),
        "samples": samples,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        "log": log,
    }
    command = reproduce_command(args)
    summary["command"] = command
    (args.out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "README.md").write_text(model_card(args.out.name, args, summary, command))
    print(json.dumps({k: summary[k] for k in ("heldout_ppl", "collapse_check_passed", "train_seconds")}))
    for prompt, text in samples.items():
        print(f"--- {prompt!r}\n{text}")


if __name__ == "__main__":
    main()
