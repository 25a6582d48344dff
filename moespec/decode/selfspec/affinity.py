"""Affinity tables: D[e, m] says how badly draft expert m stands in for routed expert e.

"weights": the L2 distance between the experts' flattened weights, from the host store.
"outputs": how far each expert's outputs are from the routed expert's on router inputs the prompts
sent to it. "router" has no table: drafts re-route among the draft experts (`DraftExperts.restrict`).
"""

from __future__ import annotations

import torch

from ...experts.store import ExpertStore
from ...model.moe import make_expert_fn

SAMPLES_PER_LAYER = 512  # router inputs kept per layer for the "outputs" affinity


def expert_distances(store: ExpertStore, chunk_bytes: int = 64 << 20) -> dict[int, torch.Tensor]:
    """Pairwise L2 distances [E, E] between the flattened weights of each MoE layer's experts.

    Accumulated as a Gram matrix over row blocks, so at most `chunk_bytes` of stacked weights exist
    at a time (stacking Mixtral-8x7B's experts of one layer whole would take 2.8 GB in bf16).
    """
    E = store.spec.num_experts
    out = {}
    for layer in store.spec.moe_layer_ids:
        experts = [store[(layer, e)] for e in range(E)]
        gram = torch.zeros(E, E, dtype=torch.float64)
        for mats in ([w.gate_up for w in experts], [w.down for w in experts]):
            rows = mats[0].shape[0]
            step = max(1, chunk_bytes // (E * mats[0][0].numel() * 4))
            for r in range(0, rows, step):
                x = torch.stack([m[r:r + step].reshape(-1) for m in mats]).float()
                gram += (x @ x.T).double()
        sq = gram.diagonal()
        out[layer] = (sq[:, None] + sq[None] - 2 * gram).clamp(min=0).sqrt().float()
    return out



def output_distances(store: ExpertStore, samples: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
                     device: torch.device) -> dict[int, torch.Tensor]:
    """Affinity from traces: D[e, m] = mean ||f_e(x) − f_m(x)||² over sampled router inputs x that
    were routed to e (all samples if none were), i.e. the error of running m where e was chosen.

    Experts trained from scratch have no aligned neurons, so weight distance can say little about
    what they compute; this measures it directly. Each layer's experts are copied to the device
    once, outside the expert cache (on CPU: no copy).
    """
    out = {}
    for layer, parts in samples.items():
        x = torch.cat([p[0] for p in parts]).to(device)
        ids = torch.cat([p[1] for p in parts]).to(device)
        E = store.spec.num_experts
        expert_fn = make_expert_fn(store.spec)
        y = torch.stack([expert_fn(x, store[(layer, e)].to(device)).float() for e in range(E)])  # [E, N, H]
        routed = (ids[:, :, None] == torch.arange(E, device=device)).any(dim=1)  # [N, E]
        table = torch.empty(E, E)
        for e in range(E):
            rows = routed[:, e] if bool(routed[:, e].any()) else torch.ones_like(routed[:, e])
            table[e] = ((y[:, rows] - y[e, rows]) ** 2).sum(-1).mean(-1).cpu()
        out[layer] = table
    return out
