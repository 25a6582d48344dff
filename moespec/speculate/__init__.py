"""Guessing which experts later layers will need: router lookahead, default vectors, learned
estimators, and the policy that turns guesses into prefetches (or into speculative execution).

A prefetch policy is a Predictor class (`lookahead.py`, `estimators.py`) registered by name in
PREDICTORS; `make_speculation` wraps the configured one in the `Speculation` hooks (`policy.py`),
with the on/off switch of `auto.py` for prefetch="auto".
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..config import Prefetch, SpeculationConfig, registry
from ..experts.base import Prefetcher
from ..experts.store import ResidentExperts
from ..model.transformer import Transformer
from .auto import PrefetchSwitch
from .estimators import ESTIMATOR_FILE, EstimatorPredictor, has_next_token_head
from .lookahead import LookaheadPredictor
from .policy import Speculation

class AutoPredictor:
    """For prefetch="auto": the model's estimators where its directory has them, else lookahead."""

    @staticmethod
    def from_config(model: Transformer, model_dir: Path, cfg: SpeculationConfig):
        has_estimators = cfg.estimator is not None or (model_dir / ESTIMATOR_FILE).is_file()
        return (EstimatorPredictor if has_estimators else LookaheadPredictor).from_config(model, model_dir, cfg)


PREDICTORS = registry(Prefetch, {  # name -> Predictor class ("none": on-demand loading, no guesses)
    "none": None,
    "lookahead": LookaheadPredictor,
    "estimator": EstimatorPredictor,
    "auto": AutoPredictor,
})


def with_depth(cfg: SpeculationConfig, model_dir: Path) -> SpeculationConfig:
    """`cfg` with an unset `lookahead_depth` and `next_token` chosen: prefetch="auto" whose
    estimators have a next-token head guesses two MoE layers ahead and the next token's first
    layer (measured faster than one layer deep on both shipped models, README; where guessing that
    deep loses, auto's switch turns it off); any other policy, or auto without that head, one
    layer ahead and no next-token guess."""
    if cfg.lookahead_depth is not None and cfg.next_token is not None:
        return cfg  # chosen already: the estimator file is not read again
    deep = cfg.prefetch == "auto" and has_next_token_head(Path(cfg.estimator or model_dir / ESTIMATOR_FILE))
    return replace(cfg, lookahead_depth=cfg.lookahead_depth or (2 if deep else 1),
                   next_token=deep if cfg.next_token is None else cfg.next_token)


def make_speculation(model: Transformer, cache: Prefetcher, model_dir: Path,
                     cfg: SpeculationConfig) -> Speculation | None:
    """The prefetch policy `cfg` names, ready to append to the model's hooks (None for "none",
    and for "auto" where every expert is resident: nothing can be missed, so guessing can only
    cost, and any hook keeps a compiled model off its one-call decode step, ~2x slower at batch 1)."""
    cfg = with_depth(cfg, model_dir)
    predictor = PREDICTORS[cfg.prefetch]
    if predictor is None or (cfg.prefetch == "auto" and cfg.speculative_execution == "off"
                             and isinstance(cache, ResidentExperts)):
        return None
    switch = PrefetchSwitch() if cfg.prefetch == "auto" else None
    return Speculation(model, cache, predictor.from_config(model, model_dir, cfg), cfg.prefetch_extra,
                       cfg.speculative_execution, cfg.prefetch_threshold, switch, cfg.next_token)
