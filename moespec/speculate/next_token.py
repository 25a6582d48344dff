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
head per decode step, which the speed switch of prefetch="auto" weighs like any other guess.
"""

from __future__ import annotations

import torch

from ..model.moe import MoE
from ..model.transformer import Transformer


class NextTokenGuess:
    """Scores [N, E] for the first MoE layer of each row's next token, from the residual [N, H]
    after attention at the last MoE layer."""

    def __init__(self, model: Transformer):
        self.model = model
        self.first, self.last = model.spec.moe_layer_ids[0], model.spec.moe_layer_ids[-1]
        self._batch: tuple[list, list] | None = None  # the decode step's rows and valid tokens

    def same_batch(self, rows: torch.Tensor, valid: torch.Tensor, decoding: bool) -> bool:
        """A forward pass begins: whether it decodes the same rows and valid tokens as the one
        before, so that a guess made there for "the next token" is for this pass's tokens (a
        prefill, a finished or joining row, or padding make it someone else's guess)."""
        batch = (rows.tolist(), valid.tolist()) if decoding else None
        same = batch is not None and batch == self._batch
        self._batch = batch
        return same

    def predict(self, residual: torch.Tensor) -> torch.Tensor:
        model = self.model
        token = model.logits(model.norm(residual)).argmax(dim=-1)  # [N] the logit lens's next token
        first: MoE = model.layers[self.first].mlp
        return first.router.guess_logits(model.layers[self.first].router_logits(model.embed_tokens(token)))
