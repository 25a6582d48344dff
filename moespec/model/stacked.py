"""Several projections of one input as one matmul (q/k/v; a dense MLP's gate and up).

At batch 1 on a CPU each matmul costs microseconds of dispatch beside its arithmetic, so one
[sum(out), H] matmul beats a few small ones. The projections keep their own parameters, under
the checkpoint's names, as views of the stacked weight: nothing is held twice.
"""

from __future__ import annotations

import torch
from torch import nn


def stack_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the loaded `linears` (same input size; all with a bias or none) into (weight
    [sum(out), in], bias [sum(out)] or None) and turn each one's parameters into views of them.
    Call once the weights are loaded; `F.linear(x, *stacked)` then computes them all at once."""
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    start = 0
    for lin in linears:
        rows = slice(start, start + lin.out_features)
        lin.weight = nn.Parameter(weight[rows], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[rows], requires_grad=False)
        start += lin.out_features
    return weight, bias
