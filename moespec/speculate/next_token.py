"""Guessing the next token's first MoE layer at this token's last one (decode steps).

Within a token, every MoE layer but the first is guessed from an earlier layer's residual. The
first one of the next token has no earlier layer, so at batch 1 its misses used to stall in full
(on tiny-mixtral at 0.25 GB/s, about two thirds of the misses the estimators left). But the
residual at the last MoE layer, after its attention, already names the next token most of the
time (the "logit lens": the final norm and LM head applied to it; 86% agreement with the greedy
token on tiny-mixtral's held-out text), and a token's embedding through the first MoE layer's
norm and router (its attention skipped, as the lookahead skips attention) names most of that
layer's experts (68% of them at top-2). The copies then overlap the last layer's experts, the LM
head, sampling and the next token's embedding and first attention. The guess costs one extra LM
head per decode step, which the speed switch of prefetch="auto" weighs like any other guess; with
compile=True a decode step's guess is one compiled call, ranked in it (`compile`).

Estimators trained with a next-token head (`moespec fit-estimator --next-token-head`) guess
instead: the head reads the last MoE layer's router input and, as context, this token's router
input at the first MoE layer. It costs a small head, not an LM head, and decoding held-out text
it found more of those experts than the logit lens (tiny-mixtral 69% against 66%, tiny-qwen2moe
50% against 27%: the README, under `next_token`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import rms_norm
from ..model.moe import MoE
from ..model.routing import most_probable
from ..model.transformer import Transformer
from .compiled_guess import GuessLibraries, LayerGuess
from .lookahead import FoldedRouters

if TYPE_CHECKING:
    from .estimators import EstimatorPredictor


class NextTokenGuess:
    """Scores [N, E] for the first MoE layer of each row's next token, from the residual [N, H]
    after attention at the last MoE layer (the logit lens) or, where `learned` estimators have a
    next-token head, from its router input."""

    def __init__(self, model: Transformer, learned: EstimatorPredictor | None = None):
        self.model, self.learned = model, learned
        self.first, self.last = model.spec.moe_layer_ids[0], model.spec.moe_layer_ids[-1]
        self.router = FoldedRouters(model, [self.first])  # the first MoE layer's norm and router, folded
        self._batch: tuple[list, list] | None = None  # the decode step's rows and valid tokens
        self.compiled = GuessLibraries()

    def same_batch(self, rows: torch.Tensor, valid: torch.Tensor, decoding: bool) -> bool:
        """A forward pass begins: whether it decodes the same rows and valid tokens as the one
        before, so that a guess made there for "the next token" is for this pass's tokens (a
        prefill, a finished or joining row, or padding make it someone else's guess)."""
        batch = (rows.tolist(), valid.tolist()) if decoding else None
        same = batch is not None and batch == self._batch
        self._batch = batch
        return same

    def predict(self, residual: torch.Tensor, router_input: torch.Tensor) -> torch.Tensor:
        """The guess from the last MoE layer's residuals [N, H] and router inputs [N, H]."""
        if self.learned is not None:
            return self.learned.next_token_scores(router_input)
        return self._scores(self.tables(), residual, self.router)

    def ranked(self, residual: torch.Tensor, router_input: torch.Tensor, width: int
               ) -> tuple[list[list[int]], list[list[float]]] | None:
        """The guess ranked by the compiled library: each row's `width` best experts, best first,
        and their probabilities (the softmax of `predict`'s scores); None where no library ranks
        it (not compiled, another width)."""
        if self.learned is not None:
            return self.learned.next_token_ranked(router_input, width)
        guess = self.compiled.ranked(self.last, width, [self.first], [residual])
        return None if guess is None else guess[self.first]

    def tables(self) -> dict[str, torch.Tensor]:
        """The tensors a guess reads: the final norm, the LM head, the embeddings and the first MoE
        layer's folded router."""
        model = self.model
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        return {"norm": model.norm.weight, "head": head, "embed": model.embed_tokens.weight,
                "router": self.router.weights[self.first], "bias": self.router.biases[self.first]}

    def _scores(self, tables: dict[str, torch.Tensor], residual: torch.Tensor, router: FoldedRouters) -> torch.Tensor:
        """The guess scores [N, E] from `tables` (the model's own, or a compiled guess's inputs)
        and `router`, the first MoE layer's folded router reading the tables' "router" and "bias"."""
        model = self.model
        hidden = rms_norm(residual, tables["norm"], model.norm.eps)
        token = F.linear(hidden, tables["head"]).argmax(dim=-1)  # [N] the logit lens's next token
        (logits,) = router.logits([self.first], F.embedding(token, tables["embed"]))
        first: MoE = model.layers[self.first].mlp
        return first.router.guess_logits(logits)

    def compile(self, directory: Path, width: int) -> None:
        """The guess, ranked (each row's `width` best experts and their probabilities), as a
        compiled library loaded from `directory` (compiled there first if missing; see
        `LookaheadPredictor.compile`). Eager, it is ~9 small ops, 0.43-0.48 ms of a batch-1 step
        on tiny-mixtral (1 thread). Not where the first router reads a tensor of its own
        (DeepSeek-V3's correction bias)."""
        model = self.model
        if self.learned is not None or model.layers[self.first].mlp.gate.e_score_correction_bias is not None:
            return  # learned: the estimators compile their head
        weight = model.embed_tokens.weight
        residual = torch.zeros(2, model.spec.hidden_size, dtype=weight.dtype, device=weight.device)  # rows: any number
        self.compiled.build(model, directory, width, {self.last: LayerGuess(
            "next-token guess", ("next-token",), self.tables(), lambda: (_Ranked(self, width), (residual,)))})


class _Ranked(nn.Module):
    """What is exported: `NextTokenGuess`'s scores from its tables (inputs) and the residual,
    then each row's `width` most probable experts: (probabilities, ids), each [1, N, width]."""

    def __init__(self, guess: NextTokenGuess, width: int):
        super().__init__()
        self._guess, self.width = [guess], width  # a list: nothing of it becomes the library's

    def forward(self, tables: dict[str, torch.Tensor], residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        guess = self._guess[0]
        router = guess.router.reading({guess.first: tables["router"]}, {guess.first: tables["bias"]})
        best = most_probable(guess._scores(tables, residual, router)[None], self.width)
        return best.values, best.indices
