"""Decode steps' dense work compiled ahead of time: each layer's attention, feed-forward norm, router
and shared expert as one AOTInductor kernel library, the routed experts still fetched and run eager.

At batch-1 decode on a CPU a layer's dense part is ~25 small ops, and their Python dispatch costs more
than their arithmetic: the layer takes ~100 us eager, ~45 us as one compiled call (tiny-mixtral, 1
thread). `torch.compile` does not pay here: its guards run on every call, and the KV length and the
layer index change every call (measured slower than eager). So the layer is exported once with
`torch.export` and compiled by AOTInductor into a shared library that runs without guards:

    Transformer.forward, a decode step (one token per row, no padding)
      for each layer:
        state = compiled layer(layer's tensors, x, its rows' KV slabs, positions, key positions, rope)
                ^ Block.forward traced: (x after attention, h, routing, shared expert output)
        hooks after_attention(state.x)             (eager, as always)
        x = Block.feed_forward(state, ...)          (eager: hooks.route, expert fetch, routed experts)

One library serves every layer of the same kind (rotary or not, window, chunk, MoE or dense): the
layer's weights are inputs, not constants, and so are the batch size, the KV cache's length and the
number of keys read. Rows apart in the cache run one call per run of consecutive rows. Libraries
are cached on disk by everything that shapes them, so a model is compiled once per machine (~10 s
per kind on a 2-core CPU). Prefill and speculative decoding's multi-token passes run eager.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from functools import cache, partial
from pathlib import Path
from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..errors import MoespecError
from .kv_cache import LayerKV, StepPositions
from .transformer import BeforeExperts, Block, Transformer
from .moe import MoE

MAX_ROWS = 1024  # the largest batch a compiled layer accepts (a larger one runs eager)


def cache_dir() -> Path:
    """Where compiled layers are kept: $MOESPEC_CACHE/compiled, else ~/.cache/moespec/compiled."""
    root = os.environ.get("MOESPEC_CACHE") or Path.home() / ".cache" / "moespec"
    return Path(root) / "compiled"


def graph_step(positions: torch.Tensor, key_pos: torch.Tensor) -> StepPositions:
    """The StepPositions of a decode step as the compiled layer sees it: rows 0..B-1 of the KV slabs
    it is given, one token per row at `positions` [B, 1], keys at key_pos = [0, upto) read. Every size
    comes from a tensor, so none is fixed when the layer is traced."""
    B = positions.shape[0]
    rows = torch.arange(B, device=positions.device)
    causal = (key_pos <= positions[:, :, None])[:, None]  # [B, 1, 1, upto]
    return StepPositions(rows=rows, positions=positions, valid=torch.ones_like(positions, dtype=torch.bool),
                         all_valid=True, upto=key_pos.shape[0], row_index=slice(None), write_rows=rows,
                         write_positions=positions.flatten(), write_span=None, causal=causal, square=False)


def layer_tensors(block: Block) -> dict[str, torch.Tensor]:
    """Every tensor Block.forward may read of a layer, by name: its parameters and the plain tensors
    its modules hold (the stacked projections, model/stacked.py), but not the parameters that are
    views of a stacked tensor (never read by the forward)."""
    stacked = {f"{prefix}.{attr}".lstrip("."): value for prefix, module in block.named_modules()
               for attr, value in vars(module).items() if isinstance(value, torch.Tensor)}
    storages = {t.untyped_storage().data_ptr() for t in stacked.values()}
    tensors = {name: p for name, p in block.named_parameters() if p.untyped_storage().data_ptr() not in storages}
    return tensors | stacked


def layer_kind(model: Transformer, i: int) -> tuple:
    """What makes layers trace differently: layers of one kind share a compiled library."""
    spec, block = model.spec, model.layers[i]
    return (isinstance(block.mlp, MoE), i in spec.nope_layers, spec.window(i), i in spec.chunked_layers)


class _Layer(nn.Module):
    """What is exported: Block.forward of a decode step, with the layer's tensors as inputs."""

    def __init__(self, block: Block):
        super().__init__()
        self._block = [block]  # not a submodule: its weights must not become the library's constants

    def forward(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor, key_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        step = graph_step(positions, key_pos)
        out = torch.func.functional_call(self._block[0], tensors, (x, LayerKV(keys, values), step, (cos, sin)))
        return tuple(t for t in out if t is not None)  # a dense layer or no shared expert: fewer outputs


def _example(model: Transformer, i: int) -> tuple:
    """Inputs to trace layer i with: 2 rows of different lengths in a 4-long cache (sizes of 0 or 1
    would be fixed by the trace), on the model's device and dtype."""
    weight = model.embed_tokens.weight
    cache = model.new_cache(2, 4)
    positions = torch.tensor([[2], [1]], device=weight.device)
    cos, sin = model.rotary(positions, weight.dtype)
    x = torch.randn(2, 1, model.spec.hidden_size, dtype=weight.dtype, device=weight.device)
    kv = cache.layers[i]
    return (layer_tensors(model.layers[i]), x, kv.k, kv.v, positions, torch.arange(3, device=weight.device), cos, sin)


@cache
def source_digest() -> str:
    """A digest of the code a layer is traced from (this package's modules and spec.py): a library
    compiled by another version of moespec computes that version's layer, so it is never loaded."""
    package = Path(__file__).resolve().parent
    files = [*sorted(package.glob("*.py")), package.parent / "spec.py"]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def _library_name(model: Transformer, i: int) -> str:
    """A file name that changes with everything the library depends on: the model code, the layer's
    kind and tensors, the machine and the thread count (the generated loops are written for the
    threads torch had when they were compiled)."""
    weight = model.embed_tokens.weight
    shapes = sorted((name, tuple(t.shape), str(t.dtype)) for name, t in layer_tensors(model.layers[i]).items())
    machine = torch.backends.cpu.get_cpu_capability() if weight.device.type == "cpu" else \
        torch.cuda.get_device_name(weight.device)  # the kernels are built for this CPU's vector ISA / this GPU
    key = repr((source_digest(), model.spec, layer_kind(model, i), shapes, weight.device.type, machine,
                torch.get_num_threads(), torch.__version__))
    return f"layer-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt2"


def compile_layer(model: Transformer, i: int, directory: Path
                  ) -> tuple[torch._C._aoti.AOTIModelPackageLoader, list[str]]:
    """The compiled library of layer i's kind, loaded from `directory` (compiled there first if
    missing), and the names of the layer tensors it takes first, in order."""
    path = directory / _library_name(model, i)
    with warnings.catch_warnings():  # torch's own deprecation notices about its export and package formats
        warnings.simplefilter("ignore", FutureWarning)
        if not path.is_file():
            batch, cache_len, keys = (torch.export.Dim(n, min=lo, max=hi) for n, lo, hi in
                                      (("rows", 1, MAX_ROWS), ("cache_len", 2, None), ("keys", 1, None)))
            args = _example(model, i)
            rows = {0: batch}
            dims = ({name: None for name in args[0]}, rows, {0: batch, 1: cache_len}, {0: batch, 1: cache_len},
                    rows, {0: keys}, rows, rows)
            with torch.inference_mode(False), torch.no_grad():
                program = torch.export.export(_Layer(model.layers[i]), args, dynamic_shapes=dims)
            if program.constants or program.state_dict:  # would be layer i's, baked into every layer of its kind
                raise RuntimeError(f"the compiled layer holds tensors of layer {i} that are not inputs: "
                                   f"{sorted([*program.constants, *program.state_dict])}")
            directory.mkdir(parents=True, exist_ok=True)
            unfinished = path.with_suffix(f".{os.getpid()}.tmp.pt2")
            torch._inductor.aoti_compile_and_package(program, package_path=str(unfinished))
            unfinished.replace(path)  # never a half-written library under the final name
        library = torch._inductor.aoti_load_package(str(path)).loader
        # called with its inputs flat, in the order the export flattened them (the tensors by name
        # first): the package's own __call__ re-parses its input and output specs on every call
        names = pytree.treespec_loads(library.get_call_spec()[0]).children_specs[0].children_specs[0].context
    return library, names


class CompiledLayers:
    """Each layer's Block.forward as a compiled library (one per kind of layer), for decode steps."""

    def __init__(self, model: Transformer, directory: Path | None = None, progress: bool = False):
        """progress: say on stderr when a kind of layer is compiled (seconds), not loaded."""
        directory = directory or cache_dir()
        libraries: dict[tuple, tuple[torch._C._aoti.AOTIModelPackageLoader, list[str]]] = {}
        self.layers: list[tuple[torch._C._aoti.AOTIModelPackageLoader, list[torch.Tensor]]] = []
        for i, block in enumerate(model.layers):
            kind = layer_kind(model, i)
            if kind not in libraries:
                if progress and not (directory / _library_name(model, i)).is_file():
                    kinds = len({layer_kind(model, j) for j in range(len(model.layers))})
                    print(f"compiling decode layers, kind {len(libraries) + 1} of {kinds} (like layer {i}); "
                          f"once per machine, kept in {directory}", file=sys.stderr, flush=True)
                libraries[kind] = compile_layer(model, i, directory)
            library, names = libraries[kind]
            tensors = layer_tensors(block)
            self.layers.append((library, [tensors[name] for name in names]))

    def step(self, tokens: torch.Tensor, step: StepPositions) -> Callable[..., BeforeExperts] | None:
        """For a forward pass the libraries run, `layer(i, x, kv, rope)` (Block.forward of layer i);
        else None (run it eager). They run decode steps: one token per row, no padding, at most
        MAX_ROWS rows. Each run of rows consecutive in the cache is one call, given views of
        its rows' KV slabs (so nothing of the cache is copied); one call where all are consecutive."""
        if tokens.shape[1] != 1 or not step.all_valid or tokens.shape[0] > MAX_ROWS:
            return None
        runs = None if isinstance(step.row_index, slice) else row_runs(step.rows.tolist())
        return partial(self._layer, step, runs, torch.arange(step.upto, device=tokens.device))

    def _layer(self, step: StepPositions, runs: list[tuple[slice, slice]] | None, key_pos: torch.Tensor, i: int,
               x: torch.Tensor, kv: LayerKV, rope: tuple[torch.Tensor, torch.Tensor]) -> BeforeExperts:
        library, weights = self.layers[i]
        if runs is None:
            out = library.run([*weights, x, kv.k[step.row_index], kv.v[step.row_index], step.positions, key_pos, *rope])
            return BeforeExperts(*out)  # (x, h), plus (weights, ids) in an MoE layer, plus its shared expert's output
        cos, sin = rope
        parts = [library.run([*weights, x[b], kv.k[c], kv.v[c], step.positions[b], key_pos, cos[b], sin[b]])
                 for b, c in runs]
        return BeforeExperts(*map(torch.cat, zip(*parts)))  # every output has one row per token: batch order


def row_runs(rows: list[int]) -> list[tuple[slice, slice]]:
    """The batch's rows split where they stop being consecutive in the cache: (the run's rows in the
    batch, its rows in the cache) for each. [4, 5, 1] -> [(0:2, 4:6), (2:3, 1:2)]."""
    runs, start = [], 0
    for b in range(1, len(rows) + 1):
        if b == len(rows) or rows[b] != rows[b - 1] + 1:
            runs.append((slice(start, b), slice(rows[start], rows[b - 1] + 1)))
            start = b
    return runs


def compile_layers(model: Transformer, directory: Path | None = None, progress: bool = False) -> CompiledLayers:
    """`CompiledLayers(model)`, with a failure (a layer torch.export cannot trace, no C++ compiler)
    as one line naming the cause."""
    try:
        return CompiledLayers(model, directory, progress)
    except Exception as e:  # torch's compile errors span pages: keep their first line
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise MoespecError(f"compile=True: compiling the model's layers failed ({type(e).__name__}: "
                           f"{first[:300]}); compile=False runs eager") from None
