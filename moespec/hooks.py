"""Points where code outside the model watches or steers a forward pass.

Tracing, routing traces, speculative prefetching and speculative execution all hang off these
hooks, so none of them needs a private copy of the forward pass. The base class does nothing;
a subclass overrides what it needs and is appended to `Transformer.hooks`.
"""

from __future__ import annotations

import torch


class ForwardHooks:
    def forward_start(self, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> bool | None:
        """A decoder forward pass begins over cache rows [B] at positions [B, T]; valid [B, T]
        marks real tokens (a row's come first), in the order `x[valid]` gives them to later hooks.
        Return False to sit out this pass's layers (no other hook point is called in it): a hook
        with nothing to do in a pass then costs it nothing per layer."""

    def layer_start(self, layer: int) -> None:
        """Layer `layer` is about to run."""

    def after_attention(self, layer: int, x: torch.Tensor, valid: torch.Tensor) -> None:
        """The residual stream x [B, T, H] after layer `layer`'s attention, before its feed-forward."""

    def route(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The router of MoE layer `layer` chose (weights, ids) [N, k] for router inputs x [N, H];
        return the routing to execute (the same, unless speculative execution substitutes)."""
        return weights, ids

    def layer_end(self, layer: int) -> None:
        """Layer `layer` finished."""
