"""Turning guesses into prefetches, and (optionally) into speculative execution.

At every layer L, once its router has chosen (right after attention, for a dense layer), a
predictor scores the experts of the next `depth` MoE layers from the residual stream. In decode
steps the `k + extra` best per token, pooled over the batch and ranked by predicted mass, are
prefetched into the expert cache on the transfer stream while layer L's experts and layer L+1's
attention compute; layer L's own experts are never evicted for them. When layer L+1 routes,
what it really needed is compared with the guesses (recall per token, precision per batch), then:

- speculative_execution "off" (prefetch-and-verify, exact): the true experts run; wrong guesses
  cost only bytes.
- "on": the guessed top-k experts (depth-1 guess) run instead of the true ones. Their weights
  come from the true router's probabilities, renormalised like the router does, so a perfect
  guess changes nothing.
- "fallback": true experts already on the device run; each missing one is replaced by the best
  guessed expert already on the device (copy landed), keeping the true weight.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Protocol

import torch

from ..config import Execution
from ..experts.base import Prefetcher
from ..hooks import ForwardHooks
from ..model.compiled import cache_dir
from ..model.moe import MoE
from ..model.routing import most_probable
from ..model.transformer import Transformer
from ..odds import Odds
from .auto import PrefetchSwitch
from .next_token import NextTokenGuess


class Predictor(Protocol):
    """Guesses experts of later MoE layers. The Speculation passes it `forward_start` and each MoE
    layer's router input (`routed`), for predictors that keep context across tokens."""

    depth: int

    def forward_start(self, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None: ...

    def routed(self, layer: int, router_input: torch.Tensor) -> None: ...

    def predict(self, layer: int, x: torch.Tensor, router_input: torch.Tensor | None = None,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Scores [N, E] (logits: only their order and softmax matter) for the experts of each
        target MoE layer, from the residual x [N, H] at
        `layer`; at an MoE layer also its router input [N, H] and its routing (weights, ids)."""
        ...

    def ranked(self, layer: int, x: torch.Tensor, router_input: torch.Tensor,
               routing: tuple[torch.Tensor, torch.Tensor], width: int
               ) -> dict[int, tuple[list[list[int]], list[list[float]]]] | None:
        """A decode step's guess at MoE layer `layer` (residuals x [N, H], router inputs and
        routing), already ranked where the predictor can do that cheaper than `predict` then a
        ranking (a compiled library): per target, each row's `width` most probable experts, best
        first, and their probabilities (the softmax of `predict`'s scores); None where it cannot."""
        ...


@dataclass
class GuessStats:
    tokens: int = 0
    true_choices: int = 0  # tokens × k
    found_in_topk: int = 0  # true experts among the k best-scored
    found_in_prefetch: int = 0  # true experts among the k + extra best-scored
    prefetched: int = 0  # distinct experts asked to prefetch
    prefetched_used: int = 0  # of those, needed by the batch

    @property
    def recall_at_k(self) -> float | None:
        """None where nothing was guessed (no MoE layer that deep)."""
        return self.found_in_topk / self.true_choices if self.true_choices else None

    @property
    def recall_prefetch_set(self) -> float | None:
        return self.found_in_prefetch / self.true_choices if self.true_choices else None

    @property
    def precision(self) -> float | None:
        return self.prefetched_used / self.prefetched if self.prefetched else None

    def add(self, other: GuessStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float | None]:
        return {**asdict(self), "recall_at_k": self.recall_at_k, "recall_prefetch_set": self.recall_prefetch_set,
                "precision": self.precision}


@dataclass
class SpeculationStats:
    """Guess quality per depth (all target layers together) and per (target layer, depth)."""

    mode: Execution
    by_depth: dict[int, GuessStats]
    per_layer: dict[tuple[int, int], GuessStats]
    seconds: float  # spent guessing on the compute thread (predictor, scoring, issuing prefetches)
    switch: dict | None = None  # prefetch="auto": steps on and off, measured step times
    # per depth, the measured chance that a one-token guess with a score in each tenth was used
    # (what admission weighs it by), and that an expert outside the guesses was
    odds: dict[int, dict[str, float]] | None = None
    outside_guesses: dict[int, float] | None = None

    def as_dict(self) -> dict:
        out = {"total": {f"depth {d}": s.as_dict() for d, s in self.by_depth.items()},
               "per_layer": {f"layer {t} depth {d}": s.as_dict() for (t, d), s in self.per_layer.items()},
               "mode": self.mode, "guess_seconds": self.seconds,
               "guess_odds": {f"depth {d}": o for d, o in (self.odds or {}).items()},
               "outside_guesses_used": {f"depth {d}": p for d, p in (self.outside_guesses or {}).items()}}
        return out if self.switch is None else {**out, "auto": self.switch}


@dataclass
class OneGuess:
    """One token's guess for a layer: the `width` best experts, best first, and their scores."""

    ids: list[int]
    scores: list[float]


@dataclass
class RowsGuess:
    """Several tokens' guesses for a layer, ranked by the predictor: each row's `width` best experts."""

    ids: list[list[int]]


def ranked_ids(guess: torch.Tensor | OneGuess | RowsGuess, device: torch.device) -> torch.Tensor:
    """A layer's guess as ranked expert ids [N, width]."""
    if isinstance(guess, torch.Tensor):
        return guess
    return torch.tensor([guess.ids] if isinstance(guess, OneGuess) else guess.ids, device=device)


class Speculation(ForwardHooks):
    """The prefetch policy as forward hooks: guesses at every layer, copies in decode steps."""

    def __init__(self, model: Transformer, cache: Prefetcher, predictor: Predictor, extra: int, mode: Execution,
                 threshold: float = 0.0, switch: PrefetchSwitch | None = None, next_token: bool = False):
        """switch: turns guessing on and off per decode step by measured step time (prefetch="auto").
        next_token: in decode steps the last MoE layer also guesses the next token's first one
        (next_token.py; with the predictor's next-token head where it has one); its guesses count
        as one depth more than the predictor's deepest."""
        self.model, self.cache, self.predictor, self.threshold = model, cache, predictor, threshold
        self.switch, self.active = switch, True
        # the running decode step: (start, rows, compute's waits for copies and time guessing so far then)
        self._decode_started: tuple[float, int, float | None, float] | None = None
        self.depth = predictor.depth + int(next_token)  # depths scored: the predictor's, then the next token's
        depth = predictor.depth
        self.extra, self.mode = extra, mode
        spec = model.spec
        self.k, self.width = spec.top_k, min(spec.top_k + extra, spec.num_experts)
        learned = predictor if getattr(predictor, "guesses_next_token", False) else None  # estimators' head
        self.next_token = NextTokenGuess(model, learned) if next_token else None
        if self.next_token is not None and model.compiled is not None:
            self.next_token.compile(cache_dir(), self.width)
        # at most this many experts prefetched per target layer per step, so a long prefill cannot
        # push out the experts the running layer is about to use
        self.max_prefetch = max(self.width, cache.capacity // (depth + 1))
        # target layer -> depth -> ranked ids [N, width] (one token's: its `width` ids and their
        # scores; ranked by the predictor: each row's ids)
        self.guesses: dict[int, dict[int, torch.Tensor | OneGuess | RowsGuess]] = {}
        self.prefetched: dict[int, dict[int, list[int]]] = {}
        self.guess_stats = {(t, d): GuessStats() for t in spec.moe_layer_ids for d in range(1, depth + 1)}
        if self.next_token is not None:
            self.guess_stats[(self.next_token.first, self.depth)] = GuessStats()
        # (target, depth) -> [found_in_topk, found_in_prefetch, prefetched_used] of batched guesses,
        # summed as tensors and read only by `stats()`, so scoring them never waits on the device
        self._found: dict[tuple[int, int], torch.Tensor] = {}
        # what a one-token guess's score (k × its probability) is worth, per depth, measured on this
        # run; and how often an expert outside the guesses is used (see odds.py): admission then
        # weighs a guess by how often such guesses were right, not by the predictor's confidence
        self.odds = {d: Odds() for d in range(1, self.depth + 1)}
        self.tail_odds = {d: Odds() for d in range(1, self.depth + 1)}  # one bin (score 0)
        self.seconds = 0.0  # time inside these hooks
        self._moe_layers = set(spec.moe_layer_ids)
        # layers with an MoE layer after them: the others have nothing to guess
        self._guessing = {i for i in range(spec.num_layers) if any(t > i for t in spec.moe_layer_ids)}
        # an MoE layer's residual after attention (real tokens), kept from `after_attention` until
        # its router has chosen
        self._waiting: torch.Tensor | None = None
        # the running pass, read once in `forward_start` rather than at every layer (a tensor's
        # shape read inside a step costs microseconds): a decode step, and one whose rows are all real
        self._decoding = self._plain_decode = False

    def forward_start(self, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> bool:
        """Note the pass; while guessing is off (prefetch="auto" switched it off) sit out its layers."""
        t0 = time.perf_counter()
        self._decoding = positions.shape[1] == 1
        batch = rows.shape[0]  # not len(rows): a tensor's __len__ runs Python of torch's own
        self._plain_decode = self._decoding and (batch == 1 or bool(valid.all()))
        if self.switch is not None:
            self._switch(t0, batch, self._decoding)
        if self.active:
            self.predictor.forward_start(rows, positions, valid)
        if self.next_token is not None and not self.next_token.same_batch(rows, valid, self._decoding):
            self.guesses.get(self.next_token.first, {}).pop(self.depth, None)  # made for other tokens
            self.prefetched.get(self.next_token.first, {}).pop(self.depth, None)
        self.seconds += time.perf_counter() - t0
        return self.active

    def _switch(self, now: float, rows: int, decoding: bool) -> None:
        """Time the decode step that just ended (start to start) and choose for the next one."""
        stalled = self.cache.stalled_seconds()
        if self._decode_started is not None:
            start, previous_rows, stalled_before, guessed_before = self._decode_started
            self.switch.observe(previous_rows, now - start,
                                None if stalled is None or stalled_before is None else stalled - stalled_before,
                                self.seconds - guessed_before)
        self._decode_started = (now, rows, stalled, self.seconds) if decoding else None
        # a prefill guesses (statistics, speculative execution) only while guessing is on
        self.active = self.switch.choose(rows) if decoding else self.switch.on

    def after_attention(self, layer: int, x: torch.Tensor, valid: torch.Tensor) -> None:
        # An MoE layer guesses once its own router has chosen (in `route`): its experts are then
        # known, so prefetches can be kept from evicting them. A dense layer guesses now. (Called
        # only in passes whose `forward_start` found guessing on.)
        t0 = time.perf_counter()
        residual = x.squeeze(1) if self._plain_decode else x[valid]  # [B, 1, H] -> [B, H]: a view
        if layer in self._moe_layers:
            self._waiting = residual
        elif layer in self._guessing:
            self._guess(layer, self.predictor.predict(layer, residual), running=None, decoding=self._decoding)
        self.seconds += time.perf_counter() - t0

    def _guess(self, layer: int, predicted: dict[int, torch.Tensor | tuple[list[list[int]], list[list[float]]]],
               running: int | None, decoding: bool) -> None:
        """Score the next `depth` MoE layers from the residual at `layer`; prefetch in decode steps.

        A prefill step routes many tokens per row, whose guesses together name nearly every expert:
        prefetching them would only churn the cache. Guesses are still made (statistics,
        speculative execution); copies are started in decode steps only.
        """
        for depth, (target, scores) in enumerate(predicted.items(), start=1):
            self._guess_target(depth, target, scores, running, decoding)

    def _guess_target(self, depth: int, target: int, scores: torch.Tensor | tuple[list[list[int]], list[list[float]]],
                      running: int | None, decoding: bool) -> None:
        """Rank the guess scores [N, E] for MoE layer `target`, `depth` MoE layers ahead (or take
        a decode step's guess ranked by the predictor: each row's `width` best ids and their
        probabilities); keep them for scoring when it routes; prefetch in decode steps."""
        if isinstance(scores, tuple):
            ids, probs = scores
            ranked, order, use = self._one_guess(ids[0], probs[0], depth) if len(ids) == 1 else self._pool(ids, probs)
        elif len(scores) == 1 and decoding:
            ranked, order, use = self._rank_one(scores[0], depth)
        else:
            ranked, order, use = self._rank_pooled(scores, decoding)
        self.guesses.setdefault(target, {})[depth] = ranked
        self.prefetched.setdefault(target, {})[depth] = order
        if decoding:  # guesses ranked best first, so the threshold cuts a tail
            ids = [e for e in order if use[e] >= self.threshold]
            self.cache.prefetch(target, ids, running, [use[e] for e in ids], use, depth)

    def _rank_one(self, scores: torch.Tensor, depth: int) -> tuple[OneGuess, list[int], list[float]]:
        """One token's guess scores [E] (batch-1 decoding) -> `_one_guess` of its `width` best
        experts (ranked and prefetched alike) and their probabilities, read once."""
        best = most_probable(scores, self.width)
        return self._one_guess(best.indices.tolist(), best.values.tolist(), depth)

    def _one_guess(self, ranked: list[int], probs: list[float], depth: int) -> tuple[OneGuess, list[int], list[float]]:
        """One token's guess in plain Python from its ranked experts and their probabilities:
        their scores, k times their probability (a top-k router picks k of the experts), at most
        1; and every expert's expected use: the measured odds of its score for the guessed ones,
        the measured share of the rest. At batch 1 a few tensor ops more per layer would cost more
        than the guess can hide."""
        score = [min(self.k * p, 1.0) for p in probs]
        use = [self.tail_odds[depth](0.0)] * self.model.spec.num_experts
        for e, s in zip(ranked, score):
            use[e] = self.odds[depth](s)
        return OneGuess(ranked, score), ranked, use

    def _pool(self, ids: list[list[int]], probs: list[list[float]]) -> tuple[RowsGuess, list[int], list[float]]:
        """`_rank_pooled` of a guess the predictor ranked (each row's best experts and their
        probabilities), in plain Python: a batch's few rows times `width` entries cost less so
        than as tensor ops."""
        mass: dict[int, float] = {}
        for row_ids, row_probs in zip(ids, probs):
            for e, p in zip(row_ids, row_probs):
                mass[e] = mass.get(e, 0.0) + p
        use = [0.0] * self.model.spec.num_experts
        for e, m in mass.items():
            use[e] = min(m * self.k, 1.0)
        order = sorted((e for e, m in mass.items() if m > 0), key=mass.__getitem__, reverse=True)
        return RowsGuess(ids), order[: self.max_prefetch], use

    def _rank_pooled(self, scores: torch.Tensor, decoding: bool) -> tuple[torch.Tensor, list[int], list[float]]:
        """Several tokens' guesses [N, width], and the batch's experts ranked by the probability
        mass guessed for them, with each expert's expected use (in decode steps)."""
        ranked = scores.topk(self.width, dim=-1).indices
        probs = torch.softmax(scores.float(), dim=-1)
        mass = torch.zeros(scores.shape[1], device=scores.device).index_add_(
            0, ranked.flatten(), probs.gather(1, ranked).flatten())
        order = mass.argsort(descending=True)[: min(self.max_prefetch, int((mass > 0).sum()))].tolist()
        return ranked, order, (mass * self.k).clamp(max=1.0).tolist() if decoding else []

    def route(self, layer, x, weights, ids):
        t0 = time.perf_counter()
        guesses, prefetched = self.guesses.pop(layer, {}), self.prefetched.pop(layer, {})
        if guesses:
            self._score(layer, ids, guesses, prefetched)
        true_routing = weights, ids
        if self.mode != "off" and 1 in guesses:
            guess = ranked_ids(guesses[1], ids.device)
            ids = guess[:, : self.k] if self.mode == "on" else self._substitute(layer, ids, guess)
            weights = self._weights_for(layer, x, ids)
        self.predictor.routed(layer, x)
        residual, decoding = self._waiting, self._decoding
        self._waiting = None
        if layer in self._guessing:
            ranked = self.predictor.ranked(layer, residual, x, true_routing, self.width) if decoding else None
            self._guess(layer, self.predictor.predict(layer, residual, x, true_routing) if ranked is None else ranked,
                        running=layer, decoding=decoding)
        if decoding and self.next_token is not None and layer == self.next_token.last:
            guess = self.next_token.ranked(residual, x, self.width)
            self._guess_target(self.depth, self.next_token.first,
                               self.next_token.predict(residual, x) if guess is None else guess, layer, decoding)
        self.seconds += time.perf_counter() - t0
        return weights, ids

    def _score(self, layer: int, ids: torch.Tensor, guesses: dict[int, torch.Tensor | OneGuess | RowsGuess],
               prefetched: dict[int, list[int]]) -> None:
        """Compare the guesses for `layer` with its true routing ids [N, k] (and, for one token's
        guess, count how its scores fared: the odds admission uses)."""
        rows: list[list[int]] | None = None  # the routing, read once where a guess is scored in Python
        tokens, choices = ids.shape[0], ids.numel()
        for depth, ranked in guesses.items():
            key = (layer, depth)
            s = self.guess_stats[key]
            s.tokens += tokens
            s.true_choices += choices
            s.prefetched += len(prefetched[depth])
            if isinstance(ranked, (OneGuess, RowsGuess)) and rows is None:
                rows = ids.tolist()
            if isinstance(ranked, OneGuess):  # one token's guess: its ranked experts are the prefetched set
                true = set(rows[0])
                s.found_in_topk += len(true.intersection(ranked.ids[: self.k]))
                found = len(true.intersection(ranked.ids))
                s.found_in_prefetch += found
                s.prefetched_used += found
                for e, score in zip(ranked.ids, ranked.scores):
                    self.odds[depth].observe(score, e in true)
                self.tail_odds[depth].observe(0.0, len(true) - found, self.model.spec.num_experts - len(ranked.ids))
                continue
            if isinstance(ranked, RowsGuess):  # several tokens' guesses, in plain Python as `_pool`
                for row, guess in zip(rows, ranked.ids):
                    true = set(row)
                    s.found_in_topk += len(true.intersection(guess[: self.k]))
                    s.found_in_prefetch += len(true.intersection(guess))
                s.prefetched_used += len({e for row in rows for e in row}.intersection(prefetched[depth]))
                continue
            needed = torch.zeros(self.model.spec.num_experts, dtype=torch.bool, device=ids.device)
            needed[ids.flatten()] = True
            hit = ranked[:, :, None] == ids[:, None, :]  # [N, width, k]
            found = torch.stack([hit[:, : self.k].any(dim=1).sum(), hit.any(dim=1).sum(),
                                 needed[prefetched[depth]].sum()])
            self._found[key] = found if key not in self._found else self._found[key] + found

    def _substitute(self, layer: int, ids: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
        resident = self.cache.ready(layer)
        out = ids.clone()
        for n, row in enumerate(ids.tolist()):
            spare = [e for e in guess[n].tolist() if e in resident and e not in row]
            for j, e in enumerate(row):
                if e not in resident and spare:
                    out[n, j] = spare.pop(0)
        return out

    def _weights_for(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        moe: MoE = self.model.layers[layer].mlp
        return moe.router.weights_for(moe.gate(x), ids)

    def stats(self) -> SpeculationStats:
        for key, found in self._found.items():  # fold the tensor counts in: one read of each
            s = self.guess_stats[key]
            s.found_in_topk, s.found_in_prefetch, s.prefetched_used = (
                a + b for a, b in zip((s.found_in_topk, s.found_in_prefetch, s.prefetched_used), found.tolist()))
        self._found.clear()
        by_depth = {d: GuessStats() for d in range(1, self.depth + 1)}
        for (_, d), s in self.guess_stats.items():
            by_depth[d].add(s)
        return SpeculationStats(self.mode, by_depth, {k: s for k, s in self.guess_stats.items() if s.tokens},
                                self.seconds, self.switch.as_dict() if self.switch is not None else None,
                                {d: o.as_dict() for d, o in self.odds.items()},
                                {d: o(0.0) for d, o in self.tail_odds.items()})

