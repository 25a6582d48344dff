"""Compiled decode-step guesses, ranked in the call: what the lookahead, the estimators and the
next-token guess share.

With compile=True each predictor exports its guess at an MoE layer (its scores for the next
layers, then each target's `width` most probable experts, per row) as a library of
model/compiled.py, for any number of rows (a decode step's batch). The tensors a guess reads are
inputs named relative to the layer, so layers with as many targets share a library. A predictor
describes each layer's guess (`LayerGuess`); `GuessLibraries` compiles or loads them and runs one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..model.compiled import MAX_ROWS, Library, compile_program, library_name
from ..model.transformer import Transformer


@dataclass
class LayerGuess:
    """One MoE layer's guess as a predictor exports it: `what` it is (for messages), the `key`
    naming its kind of library, the `tables` it reads, and `export()`, giving the module to
    export and its example inputs after the tables, each of two rows (called only where the
    library is missing). The module returns (probabilities, ids), each [targets, rows, width]."""

    what: str
    key: tuple
    tables: dict[str, torch.Tensor]
    export: Callable[[], tuple[nn.Module, tuple]]


def _exported(guess: LayerGuess) -> tuple[nn.Module, tuple, tuple]:
    """What compiling `guess` exports: its module, its tables then example inputs, and their
    dynamic dims (any number of rows)."""
    module, inputs = guess.export()
    rows = torch.export.Dim("rows", min=1, max=MAX_ROWS)
    dims = (pytree.tree_map(lambda _: None, guess.tables), *pytree.tree_map(lambda _: {0: rows}, inputs))
    return module, (guess.tables, *inputs), dims


class GuessLibraries:
    """Per MoE layer, its compiled guess and the tables it takes first; `width`: how many experts per
    target the guesses rank (0: none compiled)."""

    def __init__(self) -> None:
        self.layers: dict[int, Library] = {}
        self.width = 0

    def build(self, model: Transformer, directory: Path, width: int, guesses: dict[int, LayerGuess]) -> None:
        """Each layer's guess in `guesses`, ranking `width` experts per target, loaded from
        `directory` (compiled there first if missing)."""
        for layer, guess in guesses.items():
            path = directory / library_name(model, (*guess.key, width), guess.tables)
            library, names = compile_program(path, f"{guess.what} (of layer {layer})", partial(_exported, guess), 1)
            self.layers[layer] = (library, [guess.tables[name] for name in names])
        self.width = width

    def ranked(self, layer: int, width: int, targets: list[int], inputs: list[torch.Tensor]
               ) -> dict[int, tuple[list[list[int]], list[list[float]]]] | None:
        """The layer's guess from `inputs` (after its tables; rows first): per target, each row's
        `width` best experts, best first, and their probabilities, read once; None where no
        library ranks `width`."""
        if width != self.width or layer not in self.layers or inputs[0].shape[0] > MAX_ROWS:
            return None
        library, tables = self.layers[layer]
        probs, ids = library.run([*tables, *inputs])  # [targets, rows, width] each
        return dict(zip(targets, zip(ids.tolist(), probs.tolist())))
