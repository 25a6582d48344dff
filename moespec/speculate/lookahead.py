"""Router lookahead: guess the experts of the next MoE layers from the residual stream at layer L.

The residual stream changes slowly from layer to layer, so applying layer L+d's pre-MoE norm and
router to the residual at layer L (after attention) already names most of L+d's experts. Adding
an estimate of layer L's own MoE output first ("default vectors": the top-k weights times each
chosen expert's mean output) moves the guess closer to what layer L+1 will actually see.
With compile=True a decode step's guess at an MoE layer is one compiled call, ranked in the call
(`LookaheadPredictor.compile`, `ranked`).
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import SpeculationConfig
from ..errors import MoespecError
from ..experts.store import ExpertStore
from ..hooks import ForwardHooks
from ..model.compiled import cache_dir
from ..model.moe import make_expert_fn
from ..model.routing import most_probable
from ..model.transformer import Transformer
from ..validate import check_safetensors
from .compiled_guess import GuessLibraries, LayerGuess

DEFAULT_VECTORS_FILE = "default_vectors.safetensors"


def next_moe_layers(model: Transformer, layer: int, depth: int) -> list[int]:
    """The first `depth` MoE layers after `layer`."""
    return [i for i in model.spec.moe_layer_ids if i > layer][:depth]


class DefaultVectors:
    """Per MoE layer, a [num_experts, H] table of each expert's mean output over the tokens routed to it."""

    def __init__(self, vectors: dict[int, torch.Tensor]):
        self.vectors = vectors

    def add_estimate(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, H] + the MoE output estimate Σ_k weight_k · default_vector[ids_k] of routing [N, k]."""
        table = self.vectors[layer]
        # one token, eager (batch-1 decoding): one gather and one multiply-add; a compiled guess
        # is traced for any number of rows, so it must not branch on theirs
        if not torch.compiler.is_compiling() and len(ids) == 1:
            return torch.addmm(x, weights.to(table.dtype), table.index_select(0, ids[0]))  # x + [1, k] @ [k, H]
        return x + torch.bmm(weights[:, None].to(table.dtype), table[ids])[:, 0]  # [N, 1, k] @ [N, k, H]

    def save(self, path: str | Path) -> None:
        save_file({f"layer.{i}": v.contiguous() for i, v in self.vectors.items()}, str(path))

    @classmethod
    def load(cls, path: str | Path, model: Transformer, device: torch.device) -> "DefaultVectors":
        check_safetensors(Path(path))
        tensors = load_file(str(path))
        spec = model.spec
        expected = {f"layer.{i}" for i in spec.moe_layer_ids}
        shapes = {tuple(t.shape) for t in tensors.values()}
        if set(tensors) != expected or shapes != {(spec.num_experts, spec.hidden_size)}:
            raise MoespecError(f"{path} does not match this model (expected default vectors for layers "
                               f"{spec.moe_layer_ids}, shape [{spec.num_experts}, {spec.hidden_size}])")
        dtype = model.embed_tokens.weight.dtype
        return cls({int(k.split(".")[1]): v.to(device, dtype) for k, v in tensors.items()})


class DefaultVectorCollector(ForwardHooks):
    """Accumulates each expert's mean output (unweighted) while the model runs calibration text."""

    def __init__(self, model: Transformer, store: ExpertStore):
        spec = model.spec
        self.store, self.expert_fn = store, make_expert_fn(spec)
        self.sums = {i: torch.zeros(spec.num_experts, spec.hidden_size, dtype=torch.float64)
                     for i in spec.moe_layer_ids}
        self.counts = {i: torch.zeros(spec.num_experts, dtype=torch.float64) for i in spec.moe_layer_ids}

    def route(self, layer, x, weights, ids):
        for e in torch.unique(ids).tolist():
            tokens = (ids == e).any(dim=1)
            out = self.expert_fn(x[tokens], self.store[(layer, e)].to(x.device))
            self.sums[layer][e] += out.double().sum(dim=0).cpu()
            self.counts[layer][e] += int(tokens.sum())
        return weights, ids

    def result(self) -> DefaultVectors:
        return DefaultVectors({i: (self.sums[i] / self.counts[i].clamp(min=1)[:, None]).float() for i in self.sums})


class LookaheadPredictor:
    """Scores [N, E] for the experts of the next `depth` MoE layers, from the residual at layer L."""

    def __init__(self, model: Transformer, depth: int, default_vectors: DefaultVectors | None):
        self.model, self.depth, self.dv = model, depth, default_vectors
        self.folded = FoldedRouters(model)
        # looked up once: a guess runs at every layer of every step, where a few microseconds count
        self.targets = {layer: next_moe_layers(model, layer, depth) for layer in range(model.spec.num_layers)}
        self.routers = {t: model.layers[t].mlp.router for t in model.spec.moe_layer_ids}
        self.compiled = GuessLibraries()

    @classmethod
    def from_config(cls, model: Transformer, model_dir: Path, cfg: SpeculationConfig) -> LookaheadPredictor:
        """Lookahead `cfg.lookahead_depth` deep, with the model directory's default vectors when
        `default_vectors` is "on" (they must exist) or "auto" (if they exist)."""
        path = model_dir / DEFAULT_VECTORS_FILE
        if cfg.default_vectors == "on" and not path.is_file():
            raise MoespecError(f"{path} not found: compute default vectors with `moespec calibrate`")
        use = path.is_file() if cfg.default_vectors == "auto" else cfg.default_vectors == "on"
        device = model.embed_tokens.weight.device
        predictor = cls(model, cfg.lookahead_depth, DefaultVectors.load(path, model, device) if use else None)
        if model.compiled is not None:  # compile=True: ranked as the policy ranks its guesses (k + extra)
            predictor.compile(cache_dir(), min(model.spec.top_k + cfg.prefetch_extra, model.spec.num_experts))
        return predictor

    def forward_start(self, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """The lookahead keeps nothing across tokens."""

    def routed(self, layer: int, router_input: torch.Tensor) -> None:
        """The lookahead keeps nothing across tokens."""

    def predict(self, layer: int, x: torch.Tensor, router_input: torch.Tensor | None = None,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Guess logits [N, E] per target layer (its router's `guess_logits` of the router logits)
        from the residual x [N, H]. With default vectors,
        the running layer's own routing (weights, ids) adds its estimated MoE output first, and
        each target's guessed routing before the next target; without, one matmul serves all."""
        targets = self.targets[layer]
        if not targets:
            return {}
        if self.dv is None:
            logits = dict(zip(targets, self.folded.logits(targets, x)))
        else:
            guess = x if routing is None else self.dv.add_estimate(layer, x, *routing)
            logits = {}
            for target in targets:
                (logits[target],) = self.folded.logits([target], guess)
                if target != targets[-1]:
                    guess = self.dv.add_estimate(target, guess, *self.routers[target].select(logits[target]))
        return {t: self.routers[t].guess_logits(scores) for t, scores in logits.items()}

    def ranked(self, layer: int, x: torch.Tensor, router_input: torch.Tensor,
               routing: tuple[torch.Tensor, torch.Tensor], width: int
               ) -> dict[int, tuple[list[list[int]], list[list[float]]]] | None:
        """The guess from residuals x [N, H] at MoE layer `layer` with their routing, ranked by the
        layer's compiled library: per target layer, each row's `width` best experts, best first,
        and their probabilities (the softmax of `predict`'s scores); None where no library ranks
        it (not compiled, or for another width): the caller then ranks `predict`'s scores itself.
        The router input is not read: the folded routers apply each target's norm themselves."""
        return self.compiled.ranked(layer, width, self.targets[layer], [x, *routing])

    def tables(self, layer: int) -> dict[str, torch.Tensor]:
        """The tensors a guess at MoE layer `layer` reads, named relative to it (so that layers with
        as many targets share a compiled library): its default vectors "own", and for its j-th
        target the folded router "weight{j}", "bias{j}" and default vectors "table{j}"."""
        tables = {} if self.dv is None else {"own": self.dv.vectors[layer]}
        for j, target in enumerate(self.targets[layer]):
            tables[f"weight{j}"], tables[f"bias{j}"] = self.folded.weights[target], self.folded.biases[target]
            if self.dv is not None:
                tables[f"table{j}"] = self.dv.vectors[target]
        return tables

    def reading(self, layer: int, tables: dict[str, torch.Tensor]) -> LookaheadPredictor:
        """This predictor with its guesses at `layer` reading `tables` (named as `tables` names
        them) instead of its own: what a compiled guess traces, its tables being inputs."""
        view = copy.copy(self)
        targets = self.targets[layer]
        view.folded = self.folded.reading({t: tables[f"weight{j}"] for j, t in enumerate(targets)},
                                          {t: tables[f"bias{j}"] for j, t in enumerate(targets)})
        if self.dv is not None:
            view.dv = DefaultVectors({layer: tables["own"], **{t: tables[f"table{j}"] for j, t in enumerate(targets)}})
        view.compiled = GuessLibraries()
        return view

    def compile(self, directory: Path, width: int) -> None:
        """Each MoE layer's guess, ranked (each row's `width` best experts per target and their
        probabilities: `ranked`), as a compiled library (model/compiled.py; with compile=True),
        loaded from `directory` (compiled there first if missing). At batch 1 the guess is ~8 small
        ops: ~60 us eager against ~5 us as one call (tiny-mixtral, 1 thread). Ranking it in the
        call too spares the policy a softmax, a top-k and two reads per target, each dearer inside
        a decode step than alone (the step's matmuls push the interpreter out of the CPU caches):
        the guess's time per batch-1 step fell 5-20% (alternating runs, both shipped models).
        Layers with as many targets share a library. Not where a router reads a tensor of its
        own (DeepSeek-V3's correction bias): that would be traced in as one layer's constant."""
        model = self.model
        if any(model.layers[t].mlp.gate.e_score_correction_bias is not None for t in model.spec.moe_layer_ids):
            return
        weight = model.embed_tokens.weight
        x = torch.zeros(2, model.spec.hidden_size, dtype=weight.dtype, device=weight.device)  # rows: any number

        def example(layer: int) -> tuple[nn.Module, tuple]:
            with torch.inference_mode():
                weights, ids = model.layers[layer].mlp.route(x)
            return _Guess(self, layer, width), (x, weights, ids)

        self.compiled.build(model, directory, width, {
            layer: LayerGuess("guess", ("guess", len(self.targets[layer]), self.dv is not None), self.tables(layer),
                              partial(example, layer))
            for layer in model.spec.moe_layer_ids if self.targets[layer]})


class _Guess(nn.Module):
    """What is exported for a decode step's guesses at an MoE layer: `LookaheadPredictor.predict`
    with the layer's routing, its tables (`tables`) being inputs, then each row's `width` most
    probable experts per target: (probabilities, ids), each [targets, N, width]."""

    def __init__(self, predictor: LookaheadPredictor, layer: int, width: int):
        super().__init__()
        self._predictor, self.layer, self.width = [predictor], layer, width  # a list: nothing of it becomes the library's

    def forward(self, tables: dict[str, torch.Tensor], x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        predictor = self._predictor[0].reading(self.layer, tables)
        scores = torch.stack(list(predictor.predict(self.layer, x, routing=(weights, ids)).values()))  # [targets, N, E]
        best = most_probable(scores, self.width)
        return best.values, best.indices


class FoldedRouters:
    """Each MoE layer's pre-MoE RMSNorm folded into its router, so "layer t's norm and router
    applied to x" is one matmul and a scale: router(g ⊙ x / rms(x)) = (W · diag(g) · √H) · x / s,
    with s = √(|x|² + H·eps) = √H · rms(x). The scale is shared by every target, so all targets of
    one guess stack into one matmul. Computed in float32 (the router's input precision in the
    reference). The norm is taken with `vector_norm`, not `F.rms_norm`: on a one-token input the
    latter costs several times the matmul (11 against 3 µs on this project's CPU, torch 2.13), and
    the bias is added by `addcmul` (`torch.addmm` with a broadcast bias is pathologically slow on
    one-token inputs with two CPU threads in torch 2.13)."""

    def __init__(self, model: Transformer, layers: list[int] | None = None):
        """The routers of `layers` (default: every MoE layer)."""
        blocks = model.layers
        h = model.spec.hidden_size
        self.weights = {t: blocks[t].mlp.gate.weight.float() * blocks[t].post_attention_layernorm.weight.float()[None]
                        * h ** 0.5 for t in (model.spec.moe_layer_ids if layers is None else layers)}
        self.biases = {t: torch.zeros(len(w), device=w.device) if blocks[t].mlp.gate.bias is None
                       else blocks[t].mlp.gate.bias.float() for t, w in self.weights.items()}
        self.h_eps = h * model.spec.rms_norm_eps
        self._stacked: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, list[int]]] = {}

    def reading(self, weights: dict[int, torch.Tensor], biases: dict[int, torch.Tensor]) -> FoldedRouters:
        """These routers with the folded `weights` and `biases` of some layers in place of their own."""
        view = copy.copy(self)
        view.weights, view.biases, view._stacked = self.weights | weights, self.biases | biases, {}
        return view

    def logits(self, targets: list[int], x: torch.Tensor) -> list[torch.Tensor]:
        """Router logits [N, E] of each target layer for residual x [N, H]."""
        key = tuple(targets)
        if key not in self._stacked:
            self._stacked[key] = (torch.cat([self.weights[t] for t in targets]),
                                  torch.cat([self.biases[t] for t in targets]),
                                  [self.weights[t].shape[0] for t in targets])
        weight, bias, sizes = self._stacked[key]
        x = x.float()
        inv_s = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(self.h_eps).rsqrt_()  # [N, 1]
        logits = torch.addcmul(bias, F.linear(x, weight), inv_s)
        return [logits] if len(sizes) == 1 else logits.split(sizes, dim=-1)
