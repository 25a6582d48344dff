"""Guessing which experts later layers will need: router lookahead, default vectors, learned
estimators, and the policy that turns guesses into prefetches (or into speculative execution).

A prefetch policy is a Predictor class (`lookahead.py`, `estimators.py`) registered by name in
PREDICTORS; `make_speculation` wraps the configured one in the `Speculation` hooks (`policy.py`).
"""

from __future__ import annotations

from pathlib import Path

from ..config import Prefetch, SpeculationConfig, registry
from ..experts.base import Prefetcher
from ..model.transformer import Transformer
from .estimators import EstimatorPredictor
from .lookahead import LookaheadPredictor
from .policy import Speculation

PREDICTORS = registry(Prefetch, {  # name -> Predictor class ("none": on-demand loading, no guesses)
    "none": None,
    "lookahead": LookaheadPredictor,
    "estimator": EstimatorPredictor,
})


def make_speculation(model: Transformer, cache: Prefetcher, model_dir: Path,
                     cfg: SpeculationConfig) -> Speculation | None:
    """The prefetch policy `cfg` names, ready to append to the model's hooks (None for "none")."""
    predictor = PREDICTORS[cfg.prefetch]
    if predictor is None:
        return None
    return Speculation(model, cache, predictor.from_config(model, model_dir, cfg), cfg.prefetch_extra,
                       cfg.speculative_execution, cfg.prefetch_threshold)
