"""Self-assisted speculative decoding for offloaded MoE models (SpecMoE, arXiv 2604.10152).

Each step the model drafts γ tokens per row with its MoE layers restricted to a few pinned draft
experts (`draft.py`: nothing crosses the link while drafting), then the full model scores
every row's pending token and drafts in one pass. That pass routes all B·(γ+1) tokens of a layer
together, so each expert any of them needs is fetched once for all of them: on an offloaded model
a step costs about one plain step's transfers but can emit up to γ+1 tokens per row. Rows keep
the accepted prefix plus one token from the target; the KV cache is cropped back past it.
With γ="auto" (`GammaChooser`) steps fall back to plain decoding, the draft set unpinned, while
measured acceptance and step times say drafting does not pay.

Acceptance keeps the output exactly the target's: greedy keeps drafts equal to the target's argmax
(so the tokens equal plain greedy decoding up to floating-point ties); sampling uses the
speculative-sampling rule (accept d with probability min(1, p(d)/q(d)), else sample the normalised
residual max(0, p − q)), whose output distribution is the target's p (Leviathan et al. 2023,
Chen et al. 2023). p and q are both `filtered_probs`: temperature, top-k and top-p included.

Layout: `acceptance.py` (the acceptance rule), `gamma.py` (choosing γ), `draft.py` (the draft set),
`affinity.py` (which draft expert stands in for a routed one), `decoder.py` (the step kind that
ties them together for `decode/engine.py`).
"""

from .decoder import SelfSpeculativeDecoder

__all__ = ["SelfSpeculativeDecoder"]
