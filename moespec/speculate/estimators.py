"""Lightweight learned estimators: router input at layer L -> expert scores of the MoE layers after it.

One small head per (source layer, depth). Its input is the token's router input at layer L and,
as context, the previous token's router input at the target layer L+d (see `context.py`; zeros
where the predecessor is unknown). Optionally one more, the next-token head, from the last MoE
layer to the next token's first (next_token.py): its context is this token's own router input at
the first MoE layer, which is again the router input there of the token before the one guessed.
A head is linear, initialised to exactly what router lookahead computes (layer L+d's router applied to layer L's normed residual is linear in layer L's router
input: W_{L+d} · diag(g_{L+d} / g_L) where g are the RMSNorm weights; the context weights start at
zero), plus (by default) a 2-layer MLP whose output starts at zero. Training therefore starts from
the lookahead's answer and only learns the correction. Targets are the router's top-k weights as a
distribution (distillation of the true routing), so the loss is a cross-entropy over experts; Adam
with a cosine learning-rate decay.

The MLP correction is most of the gain over linear heads (held-out depth-1 recall@k on
tiny-mixtral: 0.877 linear, 0.935 with a 64-wide MLP, 0.950 with a 512-wide one); the
previous-token context adds about 3 points on tiny-qwen2moe. Layer L's own router probabilities
as extra inputs were tried and moved held-out recall by < 0.3 points, so they are not inputs.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import SpeculationConfig
from ..errors import MoespecError
from ..model.compiled import cache_dir
from ..model.routing import most_probable
from ..model.transformer import Transformer
from ..validate import check_safetensors
from .compiled_guess import GuessLibraries, LayerGuess
from .context import PreviousToken
from .lookahead import next_moe_layers
from .traces import RoutingTrace

ESTIMATOR_FILE = "estimators.safetensors"
#: What the heads take besides the token's router input (saved in the file, checked on load).
CONTEXT = "previous token's router input at the target layer"


class Head(nn.Module):
    """Expert logits [N, E] from a router input h [N, H] and the context c [N, H]."""

    def __init__(self, hidden: int, experts: int, mlp: int):
        super().__init__()
        self.linear = nn.Linear(2 * hidden, experts)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, mlp), nn.SiLU(), nn.Linear(mlp, experts)) if mlp else None
        if self.mlp is not None:
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = torch.cat([h, context], dim=-1)
        out = self.linear(x)
        return out + self.mlp(x) if self.mlp is not None else out

    @torch.no_grad()
    def fused(self) -> FusedHead:
        """The same function as plain tensors, for decoding (a head runs per layer per step)."""
        if self.mlp is None:
            return FusedHead(self.linear.weight.clone(), self.linear.bias.clone(), None, None)
        return FusedHead(torch.cat([self.linear.weight, self.mlp[0].weight]), torch.cat([self.linear.bias, self.mlp[0].bias]),
                         self.mlp[2].weight.clone(), self.mlp[2].bias.clone())


class FusedHead:
    """A Head in three matmul-sized ops: the linear part and the MLP's first layer share one
    matmul over [h, context]; then the MLP's output layer. No module calls on the hot path.
    Weights are [out, in] for `F.linear`: `torch.addmm` with a broadcast bias took 30x longer
    on a one-token input with two CPU threads (torch 2.13).

    `half()` is the same head with float16 weights, for compiled guesses: a head is
    read once per guess, from memory a decode step has pushed out of the CPU caches, so its time
    is its bytes. Estimator files hold float16 weights (`Estimators.save`), so a loaded head
    loses nothing. Such weights are widened inside a reduction, which a compiled library runs as
    one pass over them; `F.linear` would first write a float32 copy (a 1024-wide head of
    tiny-qwen2moe, compiled, caches cold: 99 us against 166 us in float32 and 274 us so)."""

    def __init__(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor | None, b2: torch.Tensor | None):
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2
        self.experts = w1.shape[0] if w2 is None else w2.shape[0]

    def half(self) -> FusedHead:
        return FusedHead(self.w1.half(), self.b1, None if self.w2 is None else self.w2.half(), self.b2)

    def __call__(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        y = _linear(torch.cat([h, context], dim=-1), self.w1, self.b1)
        if self.w2 is None:
            return y
        linear, hidden = y.split([self.experts, y.shape[1] - self.experts], dim=-1)
        return _linear(F.silu(hidden), self.w2, self.b2).add_(linear)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [N, in] times weight [out, in] (float32, or float16 widened in the sum: see FusedHead) plus bias."""
    if weight.dtype == torch.float32:
        return F.linear(x, weight, bias)
    return (weight.float() * x[:, None, :]).sum(dim=-1).add_(bias)  # [N, out, in] -> [N, out]


def next_token_pair(model: Transformer) -> tuple[int, int]:
    """(source, target) of the next-token head: this token's last MoE layer, the next one's first."""
    return model.spec.moe_layer_ids[-1], model.spec.moe_layer_ids[0]


class Estimators(nn.Module):
    """Heads keyed "src_target"; `predict(layer, x, context)` mirrors LookaheadPredictor."""

    def __init__(self, model: Transformer, depth: int, mlp: int = 0, next_token: bool = False):
        """next_token: also a head from the last MoE layer to the next token's first one."""
        super().__init__()
        self.model, self.depth, self.mlp_width = [model], depth, mlp  # list: not a submodule
        spec = model.spec
        pairs = [(src, t) for src in range(spec.num_layers) for t in next_moe_layers(model, src, depth)]
        self.next_token = next_token_pair(model) if next_token else None
        self.heads = nn.ModuleDict({
            f"{src}_{t}": Head(spec.hidden_size, spec.num_experts, mlp)
            for src, t in pairs + ([self.next_token] if self.next_token else [])
        })

    def pairs(self) -> dict[str, tuple[int, int]]:
        """Each head's key and its (source layer, target layer); a target not after its source is
        the next token's (the next-token head)."""
        return {key: tuple(map(int, key.split("_"))) for key in self.heads}

    def init_from_lookahead(self) -> None:
        model = self.model[0]
        with torch.no_grad():
            for key, (src, t) in self.pairs().items():
                head = self.heads[key]
                g_src = model.layers[src].post_attention_layernorm.weight.float()
                g_t = model.layers[t].post_attention_layernorm.weight.float()
                head.linear.weight.zero_()
                gate = model.layers[t].mlp.gate
                head.linear.weight[:, : g_src.numel()] = gate.weight.float() * (g_t / g_src)[None]
                head.linear.bias.zero_() if gate.bias is None else head.linear.bias.copy_(gate.bias.float())

    def router_input(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.model[0].layers[layer].post_attention_layernorm(x).float()

    def targets(self) -> set[int]:
        """The layers whose guesses take the previous token's router input there as context."""
        return {t for src, t in self.pairs().values() if t > src}

    @torch.no_grad()
    def predict(self, layer: int, x: torch.Tensor, context: dict[int, torch.Tensor],
                router_input: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Expert logits [N, E] of the next `depth` MoE layers from the residual x [N, H] at `layer` (or
        its router input, where the router already computed it) and, per target layer, the
        context [N, H] (the previous tokens' router inputs there, or zeros)."""
        h = self.router_input(layer, x) if router_input is None else router_input.float()
        return {t: self.heads[f"{layer}_{t}"](h, context[t])
                for t in next_moe_layers(self.model[0], layer, self.depth)}

    def metadata(self) -> dict[str, str]:
        s = self.model[0].spec
        return {"model_type": s.model_type, "hidden_size": str(s.hidden_size), "num_experts": str(s.num_experts),
                "num_layers": str(s.num_layers), "moe_layers": json.dumps(s.moe_layer_ids),
                "depth": str(self.depth), "mlp": str(self.mlp_width), "context": CONTEXT,
                "next_token": str(int(self.next_token is not None))}

    def save(self, path: str | Path) -> None:
        """Weights stored in float16 (half the file; loaded back as float32)."""
        save_file({k: v.half().contiguous() for k, v in self.heads.state_dict().items()}, str(path),
                  metadata=self.metadata())

    @classmethod
    def load(cls, path: str | Path, model: Transformer) -> "Estimators":
        path = Path(path)
        if not path.is_file():
            raise MoespecError(f"estimator file not found: {path} (train one with `moespec fit-estimator`)")
        check_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("context") != CONTEXT:
            raise MoespecError(f"estimator file {path} has no previous-token context inputs (made by an older "
                               "moespec): train it again with `moespec fit-estimator`")
        est = cls(model, int(meta.get("depth", 0)) or 1, int(meta.get("mlp", 0)), meta.get("next_token") == "1")
        mine = est.metadata()
        wrong = [k for k in ("model_type", "hidden_size", "num_experts", "num_layers", "moe_layers")
                 if meta.get(k) != mine[k]]
        if wrong:
            field = wrong[0]
            raise MoespecError(f"estimator file {path} was trained for another model "
                               f"({field}={meta.get(field)}, this model has {mine[field]})")
        est.heads.load_state_dict(tensors)
        return est.to(model.embed_tokens.weight.device).eval()


def load_kept(path: Path, model: Transformer) -> Estimators:
    """`Estimators.load`, kept in `model.kept` while the file keeps its modification time and
    size: switching policies (a benchmark switches before every run) then builds no heads again.
    Building them took 7-9 ms on the shipped models, and a run that starts that much later after
    the one before decodes ~2% slower (measured; its first steps pay, most likely for the model's
    weights having left the CPU's caches)."""
    try:
        stat = path.stat()
    except OSError:
        return Estimators.load(path, model)  # says what is wrong with the path
    name = ("estimators", str(path.resolve()))
    key = (*name, stat.st_mtime_ns, stat.st_size)
    if key not in model.kept:
        for old in [k for k in model.kept if k[:2] == name]:  # the same file as it was before
            del model.kept[old]
        model.kept[key] = Estimators.load(path, model)
    return model.kept[key]


def has_next_token_head(path: Path) -> bool:
    """Whether `path` is an estimator file with heads two MoE layers deep and a next-token head
    (read from its metadata, nothing loaded)."""
    if not path.is_file():
        return False
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return meta.get("next_token") == "1" and int(meta.get("depth", 0)) >= 2


class EstimatorPredictor:
    """Estimators at inference, with fused heads. It remembers, per KV-cache row, the last token's
    router input at every target layer, which is the context the next token's heads take. With
    compile=True a decode step's guess at an MoE layer is one compiled call that also ranks it
    (`compile`, `ranked`), as the lookahead's is."""

    def __init__(self, estimators: Estimators, depth: int | None = None):
        """depth: guess this many MoE layers ahead (default: as deep as the heads go)."""
        self.estimators, self.targets = estimators, estimators.targets()
        self.depth = estimators.depth if depth is None else depth
        self.heads = {key: head.fused() for key, head in estimators.heads.items()}
        self.context = PreviousToken()
        self.compiled = GuessLibraries()
        # each layer's target layers, looked up once: a guess runs at every layer of every step
        model = estimators.model[0]
        self._targets_of = {layer: next_moe_layers(model, layer, self.depth)
                            for layer in range(model.spec.num_layers)}
        # the next-token head, if trained: (last MoE layer, first MoE layer), its compiled guess,
        # and this token's router input at the first MoE layer (the head's context)
        self.next_pair = estimators.next_token
        self.compiled_next = GuessLibraries()
        self._own_first: torch.Tensor | None = None

    @classmethod
    def from_config(cls, model: Transformer, model_dir: Path, cfg: SpeculationConfig) -> EstimatorPredictor:
        """The estimators of `cfg.estimator` (default: the model directory's), cut to `lookahead_depth`."""
        est = load_kept(Path(cfg.estimator or model_dir / ESTIMATOR_FILE), model)
        if cfg.lookahead_depth > est.depth:
            raise MoespecError(f"lookahead_depth={cfg.lookahead_depth} but the estimators were trained for "
                               f"depth {est.depth}")
        predictor = cls(est, cfg.lookahead_depth)
        if model.compiled is not None:  # compile=True: ranked as the policy ranks its guesses (k + extra)
            predictor.compile(cache_dir(), min(model.spec.top_k + cfg.prefetch_extra, model.spec.num_experts))
        return predictor

    def forward_start(self, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        self.context.start(rows, positions, valid)

    @property
    def guesses_next_token(self) -> bool:
        """Whether the estimators have a next-token head (`next_token_scores`, `next_token_ranked`)."""
        return self.next_pair is not None

    def routed(self, layer: int, router_input: torch.Tensor) -> None:
        """Remember the router input of a target layer: the next token's context there (the
        guesses for this layer were made at earlier layers, so its context is already read);
        and at the first MoE layer this token's own, the next-token head's context."""
        if layer in self.targets:
            self.context.remember(layer, router_input.float())
        if self.next_pair is not None and layer == self.next_pair[1]:
            self._own_first = router_input.float()

    def next_token_scores(self, router_input: torch.Tensor) -> torch.Tensor:
        """Scores [N, E] for the next token's first MoE layer from router inputs [N, H] at the last."""
        last, first = self.next_pair
        return self.heads[f"{last}_{first}"](router_input.float(), self._own_first)

    def next_token_ranked(self, router_input: torch.Tensor, width: int
                          ) -> tuple[list[list[int]], list[list[float]]] | None:
        """`next_token_scores` ranked by its compiled library (each row's `width` best experts and
        their probabilities); None where no library ranks it."""
        last, first = self.next_pair
        guess = self.compiled_next.ranked(last, width, [first], [router_input.float(), self._own_first])
        return None if guess is None else guess[first]

    def predict(self, layer: int, x: torch.Tensor, router_input: torch.Tensor | None = None,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        h = self.estimators.router_input(layer, x) if router_input is None else router_input.float()
        return {t: self.heads[f"{layer}_{t}"](h, self.context.remembered(t, h, 0.0))
                for t in self._targets_of[layer]}

    def ranked(self, layer: int, x: torch.Tensor, router_input: torch.Tensor,
               routing: tuple[torch.Tensor, torch.Tensor], width: int
               ) -> dict[int, tuple[list[list[int]], list[list[float]]]] | None:
        """The guess at MoE layer `layer` from router inputs [N, H], ranked by the layer's compiled
        library (as `LookaheadPredictor.ranked`); None where no library ranks it."""
        if width != self.compiled.width:
            return None
        h = router_input.float()
        targets = self._targets_of[layer]
        return self.compiled.ranked(layer, width, targets, [h, *(self.context.remembered(t, h, 0.0) for t in targets)])

    def tables(self, layer: int, targets: list[int]) -> dict[str, torch.Tensor]:
        """The tensors of the fused heads from `layer` to `targets` that a compiled guess reads,
        weights in float16 (`FusedHead.half`), named by target order ("w1_0" is the first
        target's), so that layers with as many targets share a compiled library."""
        tables = {}
        for j, target in enumerate(targets):
            head = self.heads[f"{layer}_{target}"].half()
            tables |= {f"{name}_{j}": t for name, t in (("w1", head.w1), ("b1", head.b1), ("w2", head.w2),
                                                        ("b2", head.b2)) if t is not None}
        return tables

    def compile(self, directory: Path, width: int) -> None:
        """Each MoE layer's guess, its heads then the ranking of each row's `width` best experts
        per target, as a compiled library loaded from `directory` (compiled there first if
        missing; see `LookaheadPredictor.compile`). A 512-wide head at batch 1 is ~6 small ops:
        ~62 us eager against ~31 us as one call alone. Inside decode steps (tiny-mixtral, 1
        thread, 1 GB/s emulated, 25% cache) the guesses' time fell from 1.27-1.48 to 0.94 ms a
        step with float32 heads, and the ranked guess from 0.49-0.52 to 0.43 ms with float16
        ones; on tiny-qwen2moe (1024-wide heads) the guesses' time fell from 2.06 to 1.32 ms.
        Most of what is left is reading the heads, each as large as an expert of these models."""
        model = self.estimators.model[0]
        device = model.embed_tokens.weight.device
        h, context = (torch.zeros(2, model.spec.hidden_size, device=device) for _ in range(2))  # rows: any number

        def example(targets: int) -> tuple[nn.Module, tuple]:
            # distinct context tensors: the export reads one tensor passed twice as one input
            return _Estimate(width), (h, [context.clone() for _ in range(targets)])

        self.compiled.build(model, directory, width, {
            layer: LayerGuess("estimator guess", ("estimate", len(self._targets_of[layer])),
                              self.tables(layer, self._targets_of[layer]), partial(example, len(self._targets_of[layer])))
            for layer in model.spec.moe_layer_ids if self._targets_of[layer]})
        if self.next_pair is not None:  # a one-target guess: the library of a layer with one target
            last, first = self.next_pair
            self.compiled_next.build(model, directory, width, {last: LayerGuess(
                "estimator next-token guess", ("estimate", 1), self.tables(last, [first]), partial(example, 1))})


class _Estimate(nn.Module):
    """What is exported for a decode step's estimator guesses: each target's fused head
    (`FusedHead`, read from `tables`) on the router inputs h [N, H] and their contexts, then each
    row's `width` most probable experts: (probabilities, ids), each [targets, N, width]."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, tables: dict[str, torch.Tensor], h: torch.Tensor, contexts: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.stack([FusedHead(tables[f"w1_{j}"], tables[f"b1_{j}"], tables.get(f"w2_{j}"),
                                      tables.get(f"b2_{j}"))(h, context) for j, context in enumerate(contexts)])
        best = most_probable(scores, self.width)
        return best.values, best.indices


def recall_at_k(scores: torch.Tensor, true_ids: torch.Tensor, width: int) -> float:
    """Share of the true top-k experts found among the `width` best-scored ones."""
    guess = scores.topk(width, dim=-1).indices
    return (guess[:, :, None] == true_ids[:, None, :]).any(dim=1).float().mean().item()


# Defaults of `moespec fit-estimator` and `fit`: the shipped estimators' configuration (which also
# has the next-token head, `--next-token-head`). Their heads are 64 wide: a head is read from
# memory at every layer of every decode step, and 64-wide heads cut the guessing time of a step
# by 25-49% against 512-wide ones (1024 for tiny-qwen2moe) for 1-3 points of validation
# recall@k, which made the estimators faster at every point measured side by side (README).
TRAINING_TOKENS = 1048576  # training-split tokens traced (held-out recall still rose from 0.5M to 1M)
MLP_WIDTH = 64
STEPS = 3000
LR = 1e-2
BATCH = 2048
#: Share of training tokens shown with zero context, so heads also serve tokens whose predecessor
#: is unknown (a prefill's later tokens, the step after rolled-back drafts).
CONTEXT_DROPOUT = 0.05


def fit(model: Transformer, trace: RoutingTrace, depth: int = 1, mlp: int = MLP_WIDTH, steps: int = STEPS,
        lr: float = LR, batch: int = BATCH, val_share: float = 0.1, seed: int = 0,
        next_token: bool = False) -> tuple[Estimators, dict]:
    """Train estimators on a routing trace recorded with hidden states; return them and a report
    with the loss curve and, per head, the train / validation recall@k of lookahead and estimator
    (with context wherever the trace knows the predecessor). The learning rate decays from `lr` to
    5% of it along a cosine. next_token: also the next-token head, trained on the tokens whose
    successor the trace holds; its context is the token's own router input at the target layer
    (the router input of the token before the one guessed, as every head's)."""
    if trace.hidden is None or trace.previous is None:
        raise MoespecError("the trace has no hidden states or no predecessor indices: record it with this "
                           "moespec's `moespec trace --hidden`")
    spec = model.spec
    est = Estimators(model, depth, mlp, next_token)
    est.init_from_lookahead()
    gen = torch.Generator().manual_seed(seed)
    n = len(trace.ids)
    order = torch.randperm(n, generator=gen)
    n_val = int(n * val_share)
    splits = {"val": order[:n_val], "train": order[n_val:]}
    hidden = torch.from_numpy(trace.hidden)  # [tokens, layers, H] router inputs
    previous = torch.from_numpy(trace.previous.astype("int64"))  # [tokens] predecessor's index, -1 none
    following = torch.full_like(previous, -1)  # [tokens] successor's index, -1 none
    has_previous = (previous >= 0).nonzero().squeeze(1)
    following[previous[has_previous]] = has_previous
    ids = torch.from_numpy(trace.ids.astype("int64"))
    weights = torch.from_numpy(trace.weights)
    col = {layer: j for j, layer in enumerate(trace.moe_layers)}
    keys = est.pairs()

    def tokens(idx: torch.Tensor, src: int, t: int) -> torch.Tensor:
        """The tokens of `idx` a head learns from: all of them, or for the next-token head those
        with a successor."""
        return idx if t > src else idx[following[idx] >= 0]

    def guessed(idx: torch.Tensor, src: int, t: int) -> torch.Tensor:
        """The tokens whose routing at `t` a head guesses from tokens `idx`: the same ones, or
        for the next-token head their successors."""
        return idx if t > src else following[idx]

    def context_token(idx: torch.Tensor, src: int, t: int) -> torch.Tensor:
        """For tokens `idx`, the token before each guessed one (-1: none), whose router input at
        `t` is the head's context: the predecessor, or for the next-token head the token itself."""
        return previous[guessed(idx, src, t)]

    def inputs(idx: torch.Tensor, src: int, t: int, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = hidden[context_token(idx, src, t).clamp(min=0), t].float() * known[:, None]
        return hidden[idx, src].float(), context

    def target(idx: torch.Tensor, src: int, t: int) -> torch.Tensor:
        idx = guessed(idx, src, t)
        dist = torch.zeros(len(idx), spec.num_experts).scatter_(1, ids[idx, col[t]], weights[idx, col[t]])
        return dist / dist.sum(dim=1, keepdim=True)

    def known_context(idx: torch.Tensor, src: int, t: int) -> torch.Tensor:
        return context_token(idx, src, t) >= 0

    def evaluate() -> dict[str, dict[str, float]]:
        out = {}
        with torch.no_grad():
            for key, (src, t) in keys.items():
                out[key] = {}
                for name, split in splits.items():  # in parts: a million tokens' activations take gigabytes
                    parts = [tokens(idx, src, t) for idx in split.split(65536)]
                    found = 0.0
                    for idx in parts:
                        scores = est.heads[key](*inputs(idx, src, t, known_context(idx, src, t)))
                        found += len(idx) * recall_at_k(scores, ids[guessed(idx, src, t), col[t]], spec.top_k)
                    out[key][name] = found / sum(len(idx) for idx in parts)
        return out

    before = evaluate()
    opt = torch.optim.Adam(est.heads.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / steps)))
    curve = []
    train_idx = splits["train"]
    for step in range(steps):
        idx = train_idx[torch.randint(len(train_idx), (min(batch, len(train_idx)),), generator=gen)]
        kept = torch.rand(len(idx), generator=gen) >= CONTEXT_DROPOUT
        loss = 0.0
        for key, (src, t) in keys.items():
            mine = tokens(idx, src, t)
            known = known_context(mine, src, t) & (kept if mine is idx else kept[following[idx] >= 0])
            loss = loss + F.cross_entropy(est.heads[key](*inputs(mine, src, t, known)), target(mine, src, t))
        loss = loss / len(keys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        curve.append(loss.item())
    after = evaluate()
    report = {"loss_first": curve[0], "loss_last": sum(curve[-10:]) / min(10, len(curve)), "loss_curve": curve[::10],
              "heads": {k: {"lookahead": before[k], "estimator": after[k]} for k in est.heads},
              "tokens": n, "depth": depth, "mlp": mlp, "next_token": next_token, "steps": steps, "lr": lr,
              "batch": batch,
              "context_dropout": CONTEXT_DROPOUT}
    return est.eval(), report
