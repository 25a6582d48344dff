"""Building a model's dense part from a checkpoint, for either model family."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..spec import ModelSpec
from ..validate import check_shapes
from .attention import Attention
from .moe import MLP
from .switch import SwitchTransformer
from .transformer import Transformer


class DenseSource(Protocol):
    """What loading needs of a checkpoint (moespec.checkpoint.Checkpoint, or a synthetic one)."""

    spec: ModelSpec

    def dense_state(self, dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]: ...


def build_model(source: DenseSource, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """The dense part of the model on `device`, without allocating random weights first:
    a decoder-only Transformer, or Switch's encoder-decoder when the spec has encoder layers."""
    cls = SwitchTransformer if source.spec.num_encoder_layers else Transformer
    with torch.device("meta"):
        model = cls(source.spec)
    state = source.dense_state(dtype, device)
    check_shapes(model.state_dict(), state)  # a one-line error naming the tensor, not load_state_dict's
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():
        if isinstance(module, (Attention, MLP)):
            module.fuse_projections()  # stacked projections: one matmul where there were two or three
    return model.eval()
