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
from ..experts.base import ExpertProvider, ExpertWeights
from .kv_cache import LayerKV, StepPositions
from .moe import MoE, StackedExperts
from .transformer import BeforeExperts, Block, Transformer

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


class _Decode(nn.Module):
    """A layer's decode step as a library computes it: Block.forward (the state before the experts
    are fetched) or, `whole`, the whole layer (Block.feed_forward too, with no hooks), its routed
    experts taken from `stack` (every expert of the layer, [E, ...]; None in a dense layer)."""

    def __init__(self, block: Block):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, kv: LayerKV, step: StepPositions, rope: tuple[torch.Tensor, torch.Tensor],
                whole: bool, stack: ExpertWeights | None) -> tuple[torch.Tensor, ...]:
        state = self.block(x, kv, step, rope)
        if not whole:
            return tuple(t for t in state if t is not None)  # a dense layer or no shared expert: fewer outputs
        experts = StackedExperts(stack) if stack is not None else None
        return (self.block.feed_forward(state, step, experts, []),)


class _Layer(nn.Module):
    """What is exported: `_Decode` with the layer's tensors and stacked experts as inputs."""

    def __init__(self, block: Block, whole: bool):
        super().__init__()
        self._decode = [_Decode(block)]  # not a submodule: its weights must not become the library's constants
        self.whole = whole

    def forward(self, tensors: dict[str, torch.Tensor], stack: dict[str, torch.Tensor], x: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, key_pos: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = (x, LayerKV(keys, values), graph_step(positions, key_pos), (cos, sin), self.whole,
                ExpertWeights(**stack) if stack else None)
        return torch.func.functional_call(self._decode[0], {f"block.{n}": t for n, t in tensors.items()}, args)


def _example(model: Transformer, i: int, rows: int) -> tuple:
    """Inputs to trace layer i with: `rows` rows (2: of different lengths) in a 4-long cache (sizes
    of 0 or 1 would be fixed by the trace), on the model's device and dtype."""
    weight = model.embed_tokens.weight
    cache = model.new_cache(rows, 4)
    positions = torch.tensor([[2], [1]][:rows], device=weight.device)
    cos, sin = model.rotary(positions, weight.dtype)
    x = torch.randn(rows, 1, model.spec.hidden_size, dtype=weight.dtype, device=weight.device)
    kv = cache.layers[i]
    return x, kv.k, kv.v, positions, torch.arange(3, device=weight.device), cos, sin


@cache
def source_digest() -> str:
    """A digest of the code a layer is traced from (this package's modules and spec.py): a library
    compiled by another version of moespec computes that version's layer, so it is never loaded."""
    package = Path(__file__).resolve().parent
    files = [*sorted(package.glob("*.py")), package.parent / "spec.py"]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def _library_name(model: Transformer, i: int, stack: dict[str, torch.Tensor] | None) -> str:
    """A file name that changes with everything the library depends on: the model code, the layer's
    kind and tensors (and the layout of its stacked experts in a whole layer), the machine and the
    thread count (the generated loops are written for the threads torch had when they were compiled)."""
    weight = model.embed_tokens.weight
    shapes = sorted((name, tuple(t.shape), str(t.dtype)) for name, t in layer_tensors(model.layers[i]).items())
    layout = None if stack is None else sorted((name, tuple(t.shape), t.stride(), str(t.dtype))
                                               for name, t in stack.items())
    machine = torch.backends.cpu.get_cpu_capability() if weight.device.type == "cpu" else \
        torch.cuda.get_device_name(weight.device)  # the kernels are built for this CPU's vector ISA / this GPU
    key = repr((source_digest(), model.spec, layer_kind(model, i), shapes, layout, weight.device.type, machine,
                torch.get_num_threads(), torch.__version__))
    return f"layer-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt2"


def compile_layer(model: Transformer, i: int, directory: Path, stack: dict[str, torch.Tensor] | None
                  ) -> tuple[torch._C._aoti.AOTIModelPackageLoader, list[str]]:
    """The compiled library of layer i's kind, loaded from `directory` (compiled there first if
    missing), and the names of the tensors it takes first, in order: the layer's, then (in a whole
    layer, `stack` given: {} for a dense layer) its stacked experts'. A whole layer runs one row."""
    path = directory / _library_name(model, i, stack)
    with warnings.catch_warnings():  # torch's own deprecation notices about its export and package formats
        warnings.simplefilter("ignore", FutureWarning)
        if not path.is_file():
            batch, cache_len, keys = (torch.export.Dim(n, min=lo, max=hi) for n, lo, hi in
                                      (("rows", 1, MAX_ROWS), ("cache_len", 2, None), ("keys", 1, None)))
            tensors = layer_tensors(model.layers[i])
            example = _example(model, i, 1 if stack is not None else 2)
            rows = {} if stack is not None else {0: batch}
            dims = ({name: None for name in tensors}, {name: None for name in stack or {}}, rows,
                    rows | {1: cache_len}, rows | {1: cache_len}, rows, {0: keys}, rows, rows)
            with torch.inference_mode(False), torch.no_grad():
                program = torch.export.export(_Layer(model.layers[i], whole=stack is not None),
                                              (tensors, stack or {}, *example), dynamic_shapes=dims)
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
        args = pytree.treespec_loads(library.get_call_spec()[0]).children_specs[0].children_specs
    return library, [*args[0].context, *args[1].context]


def whole_stacks(model: Transformer, experts: ExpertProvider | None) -> dict[int, dict[str, torch.Tensor]] | None:
    """Each layer's stacked experts ({} for a dense layer) where one-row decode steps run whole
    layers, experts included, as one compiled call each; else None. That takes every expert of
    every layer resident in one stack (`ResidentExperts` of dense experts) and a CPU: there a
    batch-1 layer's ~20 eager ops around its experts cost more than the experts' matmuls, and
    reading an expert id off the routing inside the call costs nothing (on a GPU it would be a
    device synchronisation per expert, against one per layer eager)."""
    stack = getattr(experts, "stack", None)
    if stack is None or model.embed_tokens.weight.device.type != "cpu":
        return None
    stacks = {}
    for i, block in enumerate(model.layers):
        layer_stack = stack(i) if isinstance(block.mlp, MoE) else None
        if isinstance(block.mlp, MoE) and layer_stack is None:  # packed or unaligned experts: fetched one by one
            return None
        stacks[i] = layer_stack.tensors() if layer_stack is not None else {}  # {}: a dense layer
    return stacks


class CompiledLayers:
    """Each layer's Block.forward as a compiled library (one per kind of layer), for decode steps;
    and, where `whole_stacks` allows, each whole layer for one-row decode steps."""

    def __init__(self, model: Transformer, directory: Path | None = None, progress: bool = False,
                 experts: ExpertProvider | None = None):
        """progress: say on stderr when a kind of layer is compiled (seconds), not loaded.
        experts: the provider the model will run with (the one whose stacks a whole layer reads)."""
        directory = directory or cache_dir()
        self.experts = experts
        stacks = whole_stacks(model, experts)
        variants = [None] if stacks is None else [None, stacks]
        kinds = {(layer_kind(model, i), whole) for i in range(len(model.layers)) for whole in range(len(variants))}
        libraries: dict[tuple, tuple[torch._C._aoti.AOTIModelPackageLoader, list[str]]] = {}
        self.layers: list[tuple[torch._C._aoti.AOTIModelPackageLoader, list[torch.Tensor]]] = []
        self.whole: list[tuple[torch._C._aoti.AOTIModelPackageLoader, list[torch.Tensor], int]] = []
        for whole, layer_stacks in enumerate(variants):
            for i, block in enumerate(model.layers):
                stack = None if layer_stacks is None else layer_stacks[i]
                kind = (layer_kind(model, i), whole)
                if kind not in libraries:
                    if progress and not (directory / _library_name(model, i, stack)).is_file():
                        what = ", one row, experts included" if whole else ""
                        print(f"compiling decode layers, kind {len(libraries) + 1} of {len(kinds)} (like layer {i}"
                              f"{what}); once per machine, kept in {directory}", file=sys.stderr, flush=True)
                    libraries[kind] = compile_layer(model, i, directory, stack)
                library, names = libraries[kind]
                tensors = layer_tensors(block) | (stack or {})
                inputs = [tensors[name] for name in names]
                if whole:
                    self.whole.append((library, inputs, block.mlp.router.k if stack else 0))
                else:
                    self.layers.append((library, inputs))

    def step(self, tokens: torch.Tensor, step: StepPositions, experts: ExpertProvider, hooks: bool
             ) -> Callable[..., BeforeExperts | torch.Tensor] | None:
        """For a forward pass the libraries run, `layer(i, x, kv, rope)`; else None (run it eager).
        They run decode steps: one token per row, no padding, at most MAX_ROWS rows.
        `layer` runs Block.forward of layer i; each run of rows consecutive in the cache is one call,
        given views of its rows' KV slabs (so nothing of the cache is copied), one call where all
        are consecutive. A one-row step with no `hooks` to see the routing and the experts the
        whole layers were compiled for runs whole layers instead: `layer` returns the residual after it."""
        if tokens.shape[1] != 1 or not step.all_valid or tokens.shape[0] > MAX_ROWS:
            return None
        key_pos = torch.arange(step.upto, device=tokens.device)
        if self.whole and tokens.shape[0] == 1 and not hooks and experts is self.experts:
            return partial(self._whole, step, key_pos)
        runs = None if isinstance(step.row_index, slice) else row_runs(step.rows.tolist())
        return partial(self._layer, step, runs, key_pos)

    def _whole(self, step: StepPositions, key_pos: torch.Tensor, i: int, x: torch.Tensor, kv: LayerKV,
               rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        library, inputs, k = self.whole[i]
        (out,) = library.run([*inputs, x, kv.k[step.row_index], kv.v[step.row_index], step.positions, key_pos,
                              *rope])
        if k:  # the k experts of its one token, counted as the fetch that did not happen
            self.experts.count(i, k, 1)
        return out

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


def compile_layers(model: Transformer, directory: Path | None = None, progress: bool = False,
                   experts: ExpertProvider | None = None) -> CompiledLayers:
    """`CompiledLayers(model, directory, progress, experts)`, with a failure (a layer torch.export cannot trace, no C++ compiler)
    as one line naming the cause."""
    try:
        return CompiledLayers(model, directory, progress, experts)
    except Exception as e:  # torch's compile errors span pages: keep their first line
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise MoespecError(f"compile=True: compiling the model's layers failed ({type(e).__name__}: "
                           f"{first[:300]}); compile=False runs eager") from None
