"""Decode steps and prefills compiled ahead of time with AOTInductor: each layer's attention,
feed-forward norm, router and shared expert as one kernel library, the routed experts still
fetched and run eager; and, where every expert is resident on a CPU, a whole one-row decode step
as one library.

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
per kind on a 2-core CPU).

A fresh prefill (rows that start empty, consecutive in the cache, no padding) runs each layer's
Block.forward the same way through a second library per kind, traced for T tokens per row with
the causal attention of a square prefill: a 256-token layer of tiny-mixtral takes ~1.2 ms
compiled, ~1.9 ms eager (its norms, rotary and routing fused). Prefills into rows that already
hold tokens (speculative decoding's multi-token passes) and padded ones run eager.

Once the fetch is not needed (every expert resident in one stack per layer, `ResidentExperts`)
and no hook watches the layers, what is left between two layers is Python: a batch-1 step still
spent ~40% of its time outside the libraries. So a one-row step is one call of its own library:

    Transformer.forward, one row, no hooks -> CompiledLayers.run_one_row
        hidden = compiled step(model's tensors, experts' stacks, token, the row's KV slabs, position, rope)
                 ^ _OneRow traced: embedding; per layer Block.forward, then Block.feed_forward with
                   StackedExperts (each chosen expert a view of its layer's stack); final norm

It is built for one model (~20 s for tiny-mixtral's 6 layers), on the CPU only (reading an expert's
id inside the call would stop a GPU stream once per expert).
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
from .kv_cache import KVCache, LayerKV, StepPositions
from .moe import MoE, StackedExperts
from .transformer import BeforeExperts, Block, Transformer

MAX_ROWS = 1024  # the largest batch a compiled layer accepts (a larger one runs eager)


def cache_dir() -> Path:
    """Where compiled layers are kept: $MOESPEC_CACHE/compiled, else ~/.cache/moespec/compiled."""
    root = os.environ.get("MOESPEC_CACHE") or Path.home() / ".cache" / "moespec"
    return Path(root) / "compiled"


def graph_step(positions: torch.Tensor, key_pos: torch.Tensor, prefill: bool = False) -> StepPositions:
    """The StepPositions of a decode step as the compiled layer sees it: rows 0..B-1 of the KV slabs
    it is given, one token per row at `positions` [B, 1], keys at key_pos = [0, upto) read; or, for
    a `prefill`, T tokens per row at positions [B, T] = 0..T-1 of rows that start empty, key_pos =
    [0, T). Every size comes from a tensor, so none is fixed when the layer is traced."""
    B, T = positions.shape
    rows = torch.arange(B, device=positions.device)
    causal = (key_pos <= positions[:, :, None])[:, None]  # [B, 1, T, upto]
    return StepPositions(rows=rows, positions=positions, valid=torch.ones_like(positions, dtype=torch.bool),
                         all_valid=True, upto=key_pos.shape[0], row_index=slice(None),
                         write_rows=rows[:, None].expand(B, T).flatten(), write_positions=positions.flatten(),
                         write_span=slice(0, T) if prefill else None, causal=causal, square=prefill)


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
    """What is exported per kind of layer: Block.forward of a decode step (or of a fresh `prefill`),
    with the layer's tensors as inputs."""

    def __init__(self, block: Block, prefill: bool):
        super().__init__()
        self._block = [block]  # not a submodule: its weights must not become the library's constants
        self.prefill = prefill

    def forward(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor, key_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        step = graph_step(positions, key_pos, self.prefill)
        out = torch.func.functional_call(self._block[0], tensors, (x, LayerKV(keys, values), step, (cos, sin)))
        return tuple(t for t in out if t is not None)  # a dense layer or no shared expert: fewer outputs


class _OneRow(nn.Module):
    """A one-row decode step, every layer whole: the token's embedding, each layer's Block.forward
    and Block.feed_forward (no hooks), its routed experts read from the layer's stack
    (`StackedExperts`; None in a dense layer), then the final norm."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                positions: torch.Tensor, key_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                stacks: list[ExpertWeights | None]) -> torch.Tensor:
        model, step = self.model, graph_step(positions, key_pos)
        x = model.embed_tokens(token)
        for i, block in enumerate(model.layers):
            state = block(x, LayerKV(keys[i], values[i]), step, (cos, sin))
            x = block.feed_forward(state, step, None if stacks[i] is None else StackedExperts(stacks[i]), [])
        return model.norm(x)


class _Step(nn.Module):
    """What is exported for `_OneRow`: the model's tensors (`step_tensors`) and its layers' stacked
    experts (named "{layer}.{field}") as inputs."""

    def __init__(self, model: Transformer):
        super().__init__()
        self._one_row = [_OneRow(model)]  # not a submodule, as in _Layer
        self.layers = len(model.layers)

    def forward(self, tensors: dict[str, torch.Tensor], stacks: dict[str, torch.Tensor], token: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor, key_pos: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        fields: list[dict[str, torch.Tensor]] = [{} for _ in range(self.layers)]
        for name, t in stacks.items():
            layer, field = name.split(".", 1)
            fields[int(layer)][field] = t
        args = (token, keys, values, positions, key_pos, cos, sin, [ExpertWeights(**f) if f else None for f in fields])
        return torch.func.functional_call(self._one_row[0], {f"model.{n}": t for n, t in tensors.items()}, args)


def step_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Every tensor `_OneRow` reads of the model but its experts, by name: the embedding, each
    layer's `layer_tensors`, the final norm."""
    tensors = {"embed_tokens.weight": model.embed_tokens.weight, "norm.weight": model.norm.weight}
    for i, block in enumerate(model.layers):
        tensors |= {f"layers.{i}.{name}": t for name, t in layer_tensors(block).items()}
    return tensors


def one_row_stacks(model: Transformer, experts: ExpertProvider | None) -> dict[str, torch.Tensor] | None:
    """Every MoE layer's experts stacked [E, ...], named "{layer}.{field}", where one-row decode steps
    run as one compiled call; else None. That takes every expert resident in one stack per layer
    (`ResidentExperts` of dense experts) and a CPU: there the ~20 eager ops around a batch-1 layer's
    experts cost more than the experts' matmuls, and reading an expert id off the routing inside
    the call costs nothing (on a GPU it would be a device synchronisation per expert)."""
    stack = getattr(experts, "stack", None)
    if stack is None or model.embed_tokens.weight.device.type != "cpu":
        return None
    stacks = {}
    for i, block in enumerate(model.layers):
        if not isinstance(block.mlp, MoE):  # a dense layer: no experts
            continue
        layer_stack = stack(i)
        if layer_stack is None:  # packed or unaligned experts: fetched one by one
            return None
        stacks |= {f"{i}.{field}": t for field, t in layer_stack.tensors().items()}
    return stacks


def _example(model: Transformer, rows: int, prefill: bool = False) -> tuple[torch.Tensor, ...]:
    """A decode step to trace with: `rows` rows (2: of different lengths) in a 4-long cache (sizes
    of 0 or 1 would be fixed by the trace); or a `prefill` of 3 tokens per row from position 0 (a
    prefill has >= 2: one token is a decode step). On the model's device and dtype: (the cache,
    positions, key positions, cos, sin)."""
    weight = model.embed_tokens.weight
    key_pos = torch.arange(3, device=weight.device)
    positions = key_pos.expand(rows, 3).contiguous() if prefill else \
        torch.tensor([[2], [1]][:rows], device=weight.device)
    cos, sin = model.rotary(positions, weight.dtype)
    return model.new_cache(rows, 4), positions, key_pos, cos, sin


@cache
def source_digest() -> str:
    """A digest of the code a library is traced from (this package's modules, spec.py and the
    lookahead's, estimators' and next token's guesses): a library compiled by another version of moespec
    computes that version's layer, so it is never loaded."""
    package = Path(__file__).resolve().parent
    speculate = package.parent / "speculate"
    files = [*sorted(package.glob("*.py")), package.parent / "spec.py",
             *(speculate / f"{name}.py" for name in ("lookahead", "estimators", "next_token"))]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def library_name(model: Transformer, what: tuple, tensors: dict[str, torch.Tensor]) -> str:
    """A file name that changes with everything a library depends on: the model code, `what` it
    computes (a kind of layer, the one-row step), the shapes and layouts of its `tensors`, the
    machine and the thread count (the generated loops are written for the threads torch had when
    they were compiled)."""
    weight = model.embed_tokens.weight
    layouts = sorted((name, tuple(t.shape), t.stride(), str(t.dtype)) for name, t in tensors.items())
    machine = torch.backends.cpu.get_cpu_capability() if weight.device.type == "cpu" else \
        torch.cuda.get_device_name(weight.device)  # the kernels are built for this CPU's vector ISA / this GPU
    key = repr((source_digest(), model.spec, what, layouts, weight.device.type, machine, torch.get_num_threads(),
                torch.__version__))
    return f"{what[0]}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt2"


def layer_library(model: Transformer, i: int, prefill: bool = False) -> str:
    """The file name of layer i's kind's library (for decode steps, or for fresh prefills)."""
    return library_name(model, ("prefill" if prefill else "layer", layer_kind(model, i)), layer_tensors(model.layers[i]))


def step_library(model: Transformer, stacks: dict[str, torch.Tensor]) -> str:
    """The file name of the one-row step's library."""
    return library_name(model, ("step",), step_tensors(model) | stacks)


# every library this process loaded, by path: loaded once. A load maps a fresh copy of the
# library's code (tiny-mixtral's guesses: 36 mappings and ~2 MB a `set_policy`, none freed), and a
# library takes its tensors as inputs, so one loaded copy serves every model and predictor
_loaded: dict[Path, tuple[torch._C._aoti.AOTIModelPackageLoader, list[str]]] = {}


Export = Callable[[], tuple[nn.Module, tuple, tuple | None]]  # what to compile: (module, example args, dynamic dims)


def compile_program(path: Path, what: str, export: Export, named: int
                    ) -> tuple[torch._C._aoti.AOTIModelPackageLoader, list[str]]:
    """The library at `path` (the module `export()` gives, exported with its example args and
    dynamic dims, then compiled by AOTInductor, first if missing; loaded once per process) and the
    names of the tensors it takes first, in order: the keys of its first `named` arguments (dicts
    of tensors). `export` is called only to compile: a library already loaded or on disk needs no
    example built."""
    if path not in _loaded:
        _loaded[path] = _compile_and_load(path, what, export, named)
    return _loaded[path]


def _compile_and_load(path: Path, what: str, export: Export, named: int
                      ) -> tuple[torch._C._aoti.AOTIModelPackageLoader, list[str]]:
    with warnings.catch_warnings():  # torch's own deprecation notices about its export and package formats
        warnings.simplefilter("ignore", FutureWarning)
        if not path.is_file():
            module, args, dims = export()
            with torch.inference_mode(False), torch.no_grad():
                program = torch.export.export(module, args, dynamic_shapes=dims)
            if program.constants or program.state_dict:  # would be one layer's, baked into every call
                raise RuntimeError(f"the compiled {what} holds tensors that are not inputs: "
                                   f"{sorted([*program.constants, *program.state_dict])}")
            path.parent.mkdir(parents=True, exist_ok=True)
            unfinished = path.with_suffix(f".{os.getpid()}.tmp.pt2")
            torch._inductor.aoti_compile_and_package(program, package_path=str(unfinished))
            unfinished.replace(path)  # never a half-written library under the final name
        library = torch._inductor.aoti_load_package(str(path)).loader
        # called with its inputs flat, in the order the export flattened them (the tensors by name
        # first): the package's own __call__ re-parses its input and output specs on every call
        specs = pytree.treespec_loads(library.get_call_spec()[0]).children_specs[0].children_specs
    return library, [name for spec in specs[:named] for name in spec.context]


def compile_layer(model: Transformer, i: int, directory: Path, prefill: bool = False
                  ) -> tuple[torch._C._aoti.AOTIModelPackageLoader, list[str]]:
    """The compiled library of layer i's kind, for decode steps or fresh prefills, loaded from
    `directory` (compiled there first if missing), and the names of the layer tensors it takes
    first, in order."""

    def export() -> tuple[nn.Module, tuple, tuple]:
        batch, cache_len, keys = (torch.export.Dim(n, min=lo, max=hi) for n, lo, hi in
                                  (("rows", 1, MAX_ROWS), ("cache_len", 2, None),
                                   ("tokens", 2, None) if prefill else ("keys", 1, None)))
        tensors = layer_tensors(model.layers[i])
        cache, positions, key_pos, cos, sin = _example(model, 2, prefill)
        x = torch.randn(*positions.shape, model.spec.hidden_size, dtype=cos.dtype, device=cos.device)
        args = (tensors, x, cache.layers[i].k, cache.layers[i].v, positions, key_pos, cos, sin)
        rows = {0: batch, 1: keys} if prefill else {0: batch}  # each row's tokens are the keys it reads
        dims = ({name: None for name in tensors}, rows, {0: batch, 1: cache_len}, {0: batch, 1: cache_len},
                rows, {0: keys}, rows, rows)
        return _Layer(model.layers[i], prefill), args, dims

    return compile_program(directory / layer_library(model, i, prefill),
                           f"{'prefill ' if prefill else ''}layer (of layer {i})", export, 1)


def compile_step(model: Transformer, stacks: dict[str, torch.Tensor], directory: Path
                 ) -> tuple[torch._C._aoti.AOTIModelPackageLoader, list[str]]:
    """The compiled library of the one-row step (`_OneRow`), loaded from `directory` (compiled there
    first if missing), and the names of the model tensors, then stacked experts, it takes first."""

    def export() -> tuple[nn.Module, tuple, tuple]:
        cache_len, keys = torch.export.Dim("cache_len", min=2), torch.export.Dim("keys", min=1)
        tensors = step_tensors(model)
        cache, positions, key_pos, cos, sin = _example(model, 1)
        token = torch.zeros(1, 1, dtype=torch.long, device=cos.device)
        slabs = [{1: cache_len}] * len(model.layers)
        args = (tensors, stacks, token, [kv.k for kv in cache.layers], [kv.v for kv in cache.layers], positions,
                key_pos, cos, sin)
        dims = ({name: None for name in tensors}, {name: None for name in stacks}, None, slabs, slabs, None,
                {0: keys}, None, None)
        return _Step(model), args, dims

    return compile_program(directory / step_library(model, stacks), "one-row step", export, 2)


Library = tuple[torch._C._aoti.AOTIModelPackageLoader, list[torch.Tensor]]  # a library and its first inputs


def compile_blocks(model: Transformer, directory: Path, progress: bool, prefill: bool) -> list[Library]:
    """Each layer's library (`compile_layer`, for decode steps or fresh prefills) and its tensors,
    in the order the library takes them."""
    libraries: dict[tuple, tuple[torch._C._aoti.AOTIModelPackageLoader, list[str]]] = {}
    layers = []
    for i, block in enumerate(model.layers):
        kind = layer_kind(model, i)
        if kind not in libraries:
            if progress and not (directory / layer_library(model, i, prefill)).is_file():
                kinds = len({layer_kind(model, j) for j in range(len(model.layers))})
                print(f"compiling {'prefill' if prefill else 'decode'} layers, kind {len(libraries) + 1} of {kinds} "
                      f"(like layer {i}); once per machine, kept in {directory}", file=sys.stderr, flush=True)
            libraries[kind] = compile_layer(model, i, directory, prefill)
        library, names = libraries[kind]
        tensors = layer_tensors(block)
        layers.append((library, [tensors[name] for name in names]))
    return layers


class CompiledLayers:
    """Each layer's Block.forward as a compiled library (one per kind of layer), for decode steps
    and for fresh prefills; and, where `one_row_stacks` allows, the whole one-row decode step as
    one library."""

    def __init__(self, model: Transformer, directory: Path | None = None, progress: bool = False,
                 experts: ExpertProvider | None = None):
        """progress: say on stderr when a library is compiled (seconds), not loaded. experts: the
        provider the model runs with (whose stacks the one-row step reads)."""
        directory = directory or cache_dir()
        self.layers = compile_blocks(model, directory, progress, prefill=False)
        self.prefill = compile_blocks(model, directory, progress, prefill=True)
        self.experts, self.rotary, self.dtype = experts, model.rotary, model.embed_tokens.weight.dtype
        self.one_row: Library | None = None
        self.routed: list[tuple[int, int]] = []  # (MoE layer, experts per token): what a one-row step counts
        stacks = one_row_stacks(model, experts)
        if stacks is not None:
            if progress and not (directory / step_library(model, stacks)).is_file():
                print(f"compiling the one-row decode step (every layer, experts included); once per machine, "
                      f"kept in {directory}", file=sys.stderr, flush=True)
            library, names = compile_step(model, stacks, directory)
            tensors = step_tensors(model) | stacks
            self.one_row = (library, [tensors[name] for name in names])
            self.routed = [(i, block.mlp.router.k) for i, block in enumerate(model.layers)
                           if isinstance(block.mlp, MoE)]

    def run_one_row(self, tokens: torch.Tensor, cache: KVCache, experts: ExpertProvider, rows: torch.Tensor | None,
                    valid: torch.Tensor | None) -> torch.Tensor | None:
        """Transformer.forward of a one-row decode step (no hooks: the caller checks) as one call of
        the one-row library: the final hidden state [1, 1, H]; None where that library does not
        serve the step (run it as the split layers do)."""
        if self.one_row is None or tokens.shape != (1, 1) or experts is not self.experts \
                or (valid is not None and not bool(valid.all())):
            return None
        row = 0 if rows is None else int(rows[0])
        positions = cache.lengths[row:row + 1, None]
        upto = int(positions) + 1
        if upto > cache.max_len:
            return None  # the split path says what is wrong
        library, inputs = self.one_row
        cos, sin = self.rotary(positions, self.dtype)
        slab = slice(row, row + 1)  # each layer's slab of the row: a contiguous view, as the library was built for
        (hidden,) = library.run([*inputs, tokens, *[kv.k[slab] for kv in cache.layers],
                                 *[kv.v[slab] for kv in cache.layers], positions,
                                 torch.arange(upto, device=tokens.device), cos, sin])
        cache.lengths[row] += 1
        for layer, k in self.routed:  # each layer's k experts of the token, counted as the fetch that did not happen
            self.experts.count(layer, k, 1)
        return hidden

    def step(self, tokens: torch.Tensor, step: StepPositions) -> Callable[..., BeforeExperts] | None:
        """For a forward pass the libraries run, `layer(i, x, kv, rope)` (Block.forward of layer i);
        else None (run it eager). They run decode steps (one token per row) and fresh prefills
        (`step.square`: every row starts empty, consecutive in the cache), with no padding and at
        most MAX_ROWS rows. Each run of rows consecutive in the cache is one call, given views of
        its rows' KV slabs (so nothing of the cache is copied); one call where all are consecutive."""
        if not step.all_valid or tokens.shape[0] > MAX_ROWS:
            return None
        prefill = tokens.shape[1] > 1
        if prefill and not (step.square and isinstance(step.row_index, slice)):
            return None
        runs = None if isinstance(step.row_index, slice) else row_runs(step.rows.tolist())
        return partial(self._layer, self.prefill if prefill else self.layers, step, runs,
                       torch.arange(step.upto, device=tokens.device))

    def _layer(self, libraries: list[Library], step: StepPositions, runs: list[tuple[slice, slice]] | None,
               key_pos: torch.Tensor, i: int, x: torch.Tensor, kv: LayerKV, rope: tuple[torch.Tensor, torch.Tensor]
               ) -> BeforeExperts:
        library, weights = libraries[i]
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
    """`CompiledLayers(model, directory, progress, experts)`, with a failure (a layer torch.export
    cannot trace, no C++ compiler) as one line naming the cause."""
    try:
        return CompiledLayers(model, directory, progress, experts)
    except Exception as e:  # torch's compile errors span pages: keep their first line
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise MoespecError(f"compile=True: compiling the model's layers failed ({type(e).__name__}: "
                           f"{first[:300]}); compile=False runs eager") from None
