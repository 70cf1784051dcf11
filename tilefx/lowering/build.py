"""``compile_graph``: a pruned GraphModule in, a GraphModule running block-sparse kernels out.

Each layer of the plan (``lowering.plan``) is replaced by a ``call_module`` to a small runtime
module (``runtime.sparse_modules``) that calls its compiled kernel through DLPack, unless
``lowering.fallback`` finds the kernel no faster than dense torch for that layer's shape;
everything else stays the torch code it was. A lowered linear whose output only feeds other
lowered linears hands it over token-major (``runtime.sparse_modules``), where that is faster
(measured too): ``lowering.hand_over`` records that in the plan, and the modules are built from
it. The choices are logged and kept in the result's ``meta["lowering_choices"]``. The input
graph module is never modified.

Compiled kernels are cached in memory for the process and, with ``cache_dir``, as shared
libraries on disk. The key is the kernel spec (op geometry incl. input shape, output features,
block, stored-block count, epilogue, number format) plus the target. The sparsity pattern itself is not part of
the key on purpose: the kernels take ``indices``/``indptr`` as run-time arguments, so every
pattern with the same block count shares one kernel. Its hash is recorded for the log only.

Quantized layers (int8/bf16, ``lowering.narrow``) always run a kernel of their format, replacing
the linear and its fake-quant node; their measured choice is block-sparse against dense kernel
of that format. A target that cannot run them (CUDA, a CPU without AVX512-VNNI / BF16) is a
``LoweringError`` before anything compiles.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
import tvm

from tilefx.errors import LoweringError

from ..passes.analysis.weight_layers import layer_of
from ..passes.coverage import warn_coverage
from ..passes.graph_utils import unique_attr_name
from ..runtime.packing import BsrWeight, pack_bsr, pattern_hash
from ..runtime.sparse_modules import BsrConv2d, BsrLinear, Kernel, NarrowLinear
from . import compat, native_cache, openmp_launch
from .fallback import Fallback, LayerChoice, Timer, check_fallback, choose, interleaved_median_ms
from .hand_over import decide_hand_overs
from .kernels.spec import Conv2dGeometry, KernelSpec
from .narrow import check_narrow_target, narrow_options, narrow_spec, pack_narrow
from .plan import SparseLayer, plan_graph
from .schedules.cpu import cpu_kernel, takes_transposed
from .schedules.cuda import cuda_kernel

__all__ = ["KernelCache", "compile_graph", "kernel_func", "layer_spec", "lowering_choices"]

log = logging.getLogger(__name__)

#: Bumped whenever a template changes, so stale on-disk kernels (and latency ratios) are never used.
KERNEL_VERSION = "7"


def kernel_func(spec: KernelSpec, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    """The scheduled TensorIR for ``spec`` on ``target``."""
    if compat.is_cuda(target):
        return cuda_kernel(spec)
    return cpu_kernel(spec, target)


class KernelCache:
    """Compiled kernels by (spec, target): in memory always, on disk when given a directory.

    CPU kernels are loaded from a shared library whenever their parallel loops can run on
    torch's OpenMP threads (``openmp_launch``): without a ``cache_dir`` that library goes to a
    per-user temporary directory, keyed like the cache, so it is reused too. Handing out a CPU
    kernel that keeps TVM's pool instead is when that pool is told not to spin
    (``openmp_launch.keep_tvm_pool_asleep``).
    """

    _memory: dict[str, Kernel] = {}  # process-wide: recompiling an identical kernel is pure waste

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.compile_seconds = 0.0

    @staticmethod
    def key(spec: KernelSpec, target: tvm.target.Target) -> str:
        text = f"{KERNEL_VERSION}|{spec!r}|{spec.x_shape}|{spec.y_shape}|{target}"  # shapes: the pitch rule
        return hashlib.sha1(text.encode()).hexdigest()[:20]

    def kernel(self, spec: KernelSpec, target: tvm.target.Target) -> Kernel:
        key = self.key(spec, target)
        found = self._memory.get(key) or self._load(key, target)
        if found is None:
            started = time.perf_counter()
            executable = compat.build(kernel_func(spec, target), target)
            self.compile_seconds += time.perf_counter() - started
            found = self._store(key, executable, target) or self._unexported(executable, target)
        self._memory[key] = found
        return found

    def _path(self, key: str, target: tvm.target.Target) -> Path | None:
        # CUDA executables need nvcc to export; they are cheap to regenerate, so memory only.
        if compat.is_cuda(target):
            return None
        directory = self.cache_dir
        if directory is None and openmp_launch.launcher_address() is not None:
            directory = openmp_launch.cache_dir() / "kernels"
        if directory is None:
            return None
        return native_cache.private_dir(directory) / f"bsr_{key}.so"  # never a shared directory

    def _load(self, key: str, target: tvm.target.Target) -> Kernel | None:
        path = self._path(key, target)
        if path is None or not path.exists() or not native_cache.safe_to_load(path):
            return None
        try:
            kernel = self._open(path)
        except Exception as exc:  # a corrupted or truncated library: TVM raises its own types
            native_cache.warn_once(f"tilefx: cached kernel {path} cannot be loaded ({exc}); rebuilding it")
            return None
        log.debug("kernel %s loaded from %s", key, path)
        return kernel

    def _store(self, key: str, executable: Any, target: tvm.target.Target) -> Kernel | None:
        """Export ``executable`` (when it has a path) and return the kernel loaded from it.

        None (the caller keeps the in-memory kernel) when the library cannot be written."""
        path = self._path(key, target)
        if path is None:
            return None
        partial = path.with_suffix(f".{os.getpid()}.tmp.so")
        try:
            executable.export_library(str(partial))  # links with the system C compiler
            native_cache.publish(partial, path)
        except Exception as exc:  # no C compiler, a full or unwritable disk: TVM raises its own types
            native_cache.warn_once(f"tilefx: cannot write kernels to {path.parent} ({exc}); kept in memory")
            return None
        return self._open(path)

    @staticmethod
    def _open(path: Path) -> Kernel:
        kernel = tvm.runtime.load_module(str(path))["main"]
        if not openmp_launch.share_torch_threads(path):  # after loading: the runtime sets TVM's pool first
            openmp_launch.keep_tvm_pool_asleep()
        return kernel

    @staticmethod
    def _unexported(executable: Any, target: tvm.target.Target) -> Kernel:
        """The kernel of an executable kept in memory: CUDA, or CPU on TVM's own pool."""
        if not compat.is_cuda(target):
            openmp_launch.keep_tvm_pool_asleep()
        return executable["main"]


def layer_spec(layer: SparseLayer, nnzb: int, input_shape: tuple[int, ...]) -> KernelSpec:
    """The kernel spec of ``layer`` for one concrete input shape."""
    if layer.op == "linear":
        m, k = math.prod(input_shape[:-1]), input_shape[-1]
        geometry = Conv2dGeometry.dense(m, k)
    else:
        n, cin, h, w = input_shape
        geometry = Conv2dGeometry(n, cin, h, w, layer.kernel, layer.stride, layer.padding, layer.dilation)
    return KernelSpec(geometry, layer.out_features, layer.block, nnzb, activation=layer.activation)


def compile_graph(
    gm: torch.fx.GraphModule,
    target: str | dict[str, Any] | tvm.target.Target = "llvm",
    *,
    cache_dir: str | Path | None = None,
    fuse_activations: bool = True,
    fallback: str = "measure",
    timer: Timer = interleaved_median_ms,
    hand_over: bool = True,
) -> torch.fx.GraphModule:
    """A new GraphModule in which the block-sparse layers of ``gm`` run compiled kernels.

    ``fallback="measure"`` keeps a layer dense torch when its kernel, timed against dense on
    the layer's input shape (by ``timer``), is not faster; ``"never"`` lowers every layer.
    CUDA kernels are lowered unmeasured (timing them needs a GPU and device synchronisation).
    ``hand_over=False`` keeps every lowered linear's output row-major (``lowering.hand_over``
    decides otherwise; benchmarks compare the two).
    Requires: an ATen-level graph (``torch.export(...).module()``) with shapes in
    ``meta['val']`` and ``BlockSparsity`` metadata on the weights to lower.
    Raises ``LoweringError`` (naming the node) for an unknown target or fallback, a non-float32
    layer, a block that does not tile the weight, or mismatched shapes, before compiling anything.
    """
    tvm_target = compat.make_target(target)
    policy = check_fallback(fallback)
    if compat.is_cuda(tvm_target):
        policy = "never"
    plan = plan_graph(gm, fuse_activations=fuse_activations)
    check_narrow_target(plan.layers, compat.is_cuda(tvm_target), lambda: compat.cpu_features(tvm_target))
    layers = [layer for layer in plan.layers if layer.quantized is None and _runs_on(layer, tvm_target)]
    packed = {layer.node: _pack(gm, layer) for layer in layers}
    cache = KernelCache(cache_dir)
    device = _device_for(tvm_target)

    def build_module(layer: SparseLayer) -> BsrLinear | BsrConv2d:
        return _runtime_module(gm, layer, packed[layer.node], cache, tvm_target).to(device)

    choices = []
    lowered: dict[str, BsrLinear | BsrConv2d] = {}
    for layer in layers:
        module = build_module(layer)
        module.kernel(layer.input_shape)  # compile now: errors and compile time belong here
        choice = _choose(gm, layer, module, device, policy, timer)
        if choice.lowered:
            lowered[layer.node] = module
        choices.append(choice)
    decided, lowered = (
        decide_hand_overs(layers, lowered, build_module, policy, timer)
        if hand_over
        else (tuple(layers), lowered)
    )
    choices = [
        dataclasses.replace(choice, transposed_to=layer.consumers) if layer.transposed_output else choice
        for layer, choice in zip(decided, choices, strict=True)
    ]
    narrow = [layer for layer in plan.layers if layer.quantized is not None]
    narrow_modules, narrow_choices = _lower_narrow(gm, narrow, cache, tvm_target, policy, timer)
    modules: dict[str, torch.nn.Module] = {**lowered, **narrow_modules}
    order = {layer.node: index for index, layer in enumerate(plan.layers)}
    choices = sorted([*choices, *narrow_choices], key=lambda choice: order[choice.node])
    layers += narrow
    out = _calling_modules(gm, [*decided, *narrow], modules)
    out.meta["lowering_choices"] = tuple(choices)
    spin = None if compat.is_cuda(tvm_target) else openmp_launch.contention_warning(torch.get_num_threads())
    if spin and any(c.lowered for c in choices):
        log.warning(spin)
    log.info(
        "lowered %d of %d sparse layers for %s (%.2fs compiling)",
        sum(c.lowered for c in choices),
        len(layers),
        tvm_target.kind.name,
        cache.compile_seconds,
    )
    return out


def _lower_narrow(
    gm: torch.fx.GraphModule,
    layers: Sequence[SparseLayer],
    cache: KernelCache,
    target: tvm.target.Target,
    policy: Fallback,
    timer: Timer,
) -> tuple[dict[str, torch.nn.Module], list[LayerChoice]]:
    """Modules and choices for the quantized layers: block-sparse or dense kernel of their format."""
    modules: dict[str, torch.nn.Module] = {}
    choices: list[LayerChoice] = []
    torch_left: list[tuple[str, str]] = []
    dense_left: list[tuple[str, str]] = []
    for layer in layers:
        options = narrow_options(layer)
        if not options.dense:
            log.warning("node %s stays torch's fake-quant simulation: %s", layer.node, options.why_torch)
            torch_left.append((options.why_torch, layer.node))
            continue
        if options.why_dense:
            log.info("node %s runs the dense kernel (zeros computed): %s", layer.node, options.why_dense)
            dense_left.append((options.why_dense, layer.node))
        module, choice = _narrow_choice(gm, layer, options.sparse_block, cache, target, policy, timer)
        modules[layer.node] = module
        choices.append(choice)
    fmt = "quantized layers"
    warn_coverage(
        "tilefx.compile",
        len(layers),
        f"{fmt} left as torch's fake-quant simulation (correct but slow)",
        torch_left,
        "Pad or prune those layers to sizes the int8/bf16 kernels take, or leave them fp32 with Quantization.keep",
    )
    warn_coverage(
        "tilefx.compile",
        len(layers),
        f"block-sparse {fmt} run their format's dense kernel (zeros computed)",
        dense_left,
        "Prune int8 layers with blocks of (16, 4) or (r, 4) for r in 1, 2, 4, 8 (bf16: (r, 2)), or multiples of them",
    )
    return modules, choices


def _narrow_choice(
    gm: torch.fx.GraphModule,
    layer: SparseLayer,
    sparse_block: tuple[int, int] | None,
    cache: KernelCache,
    target: tvm.target.Target,
    policy: Fallback,
    timer: Timer,
) -> tuple[NarrowLinear, LayerChoice]:
    """The module one quantized layer runs and why: its block-sparse kernel where a template takes
    its blocks and (measured) it beats the format's dense kernel, else the dense kernel. Kernels
    are compiled here, so errors and compile time belong to ``compile``."""
    weight = _layer_weight(gm, layer)
    fmt = layer.quantized.format  # type: ignore[union-attr]
    shape = _rows(layer.input_shape)
    if sparse_block is None or policy == "measure":
        dense = _narrow_module(gm, layer, weight, None, cache, target)
        dense.kernel(shape)
        if sparse_block is None:
            return dense, LayerChoice(layer.node, lowered=True, number_format=fmt, sparse=False)
    sparse = _narrow_module(gm, layer, weight, sparse_block, cache, target)
    sparse.kernel(shape)
    if policy == "never":
        return sparse, LayerChoice(layer.node, lowered=True, number_format=fmt)
    x = torch.randn(layer.input_shape)
    choice = choose(layer.node, lambda: sparse(x), lambda: dense(x), policy, timer, number_format=fmt)
    return (sparse if choice.sparse else dense), choice


def _rows(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D shape a linear's kernel sees: leading dims flattened."""
    return math.prod(input_shape[:-1]), input_shape[-1]


def _narrow_module(
    gm: torch.fx.GraphModule,
    layer: SparseLayer,
    weight: torch.Tensor,
    block: tuple[int, int] | None,
    cache: KernelCache,
    target: tvm.target.Target,
) -> NarrowLinear:
    """The runtime module of quantized ``layer`` with its block-sparse (``block``) or dense kernel."""
    packed = pack_narrow(layer, weight, block)
    bias = _tensor(gm, layer.bias) if layer.bias is not None else None

    def kernel_for(shape: tuple[int, ...]) -> Kernel:
        return cache.kernel(narrow_spec(layer, shape, block, packed.nnzb), target)

    return NarrowLinear(packed, bias, kernel_for)


def lowering_choices(model: torch.nn.Module) -> tuple[LayerChoice, ...]:
    """The per-layer choices ``compile_graph`` recorded on its result (empty for other modules)."""
    meta = model.meta if isinstance(model, torch.fx.GraphModule) else {}
    return tuple(meta.get("lowering_choices", ()))


def _choose(
    gm: torch.fx.GraphModule,
    layer: SparseLayer,
    module: torch.nn.Module,
    device: torch.device,
    policy: Fallback,
    timer: Timer,
) -> LayerChoice:
    """Kernel or dense torch for ``layer``, timed on its own input shape (see ``lowering.fallback``)."""
    x = torch.randn(layer.input_shape, device=device)
    dense = _dense_call(gm, layer, device)
    return choose(layer.node, lambda: module(x), lambda: dense(x), policy, timer)


def _dense_call(
    gm: torch.fx.GraphModule, layer: SparseLayer, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer as the torch code it replaces (with its fused activation), for the fallback timing."""
    weight = _layer_weight(gm, layer).detach().to(device)
    bias = _tensor(gm, layer.bias).detach().to(device) if layer.bias is not None else None

    def call(x: torch.Tensor) -> torch.Tensor:
        if layer.op == "linear":
            y = F.linear(x, weight, bias)
        else:
            y = F.conv2d(x, weight, bias, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        if layer.activation == "relu":
            return torch.relu(y)
        return F.gelu(y) if layer.activation == "gelu" else y

    return call


def _tensor(gm: torch.fx.GraphModule, name: str) -> torch.Tensor:
    return gm.get_parameter(name) if _is_param(gm, name) else gm.get_buffer(name)


def _layer_weight(gm: torch.fx.GraphModule, layer: SparseLayer) -> torch.Tensor:
    """The layer's weight as the kernel reads it: ``[out, in...]`` (a stored ``[in, out]`` turned)."""
    weight = _tensor(gm, layer.weight)
    return weight.t().contiguous() if layer.weight_transposed else weight


def _device_for(target: tvm.target.Target) -> torch.device:
    """CUDA kernels read their weights from the GPU; without one they are built but cannot run."""
    if compat.is_cuda(target) and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _runs_on(layer: SparseLayer, target: tvm.target.Target) -> bool:
    if compat.is_cuda(target) and layer.op == "conv2d":
        log.warning("node %s: no CUDA conv kernel yet, it stays dense torch", layer.node)
        return False
    return True


def _pack(gm: torch.fx.GraphModule, layer: SparseLayer) -> BsrWeight:
    weight = _layer_weight(gm, layer)
    assert layer.sparsity is not None  # fp32 layers are planned for their blocks
    try:
        packed = pack_bsr(weight, layer.block, layer.sparsity.mask)
    except LoweringError as exc:
        raise LoweringError(f"node {layer.node!r} (weight {layer.weight!r}): {exc}") from exc
    log.debug("node %s: %d blocks, pattern %s", layer.node, packed.nnzb, pattern_hash(layer.sparsity.mask))
    return packed


def _is_param(gm: torch.fx.GraphModule, name: str) -> bool:
    return name in dict(gm.named_parameters())


def _runtime_module(
    gm: torch.fx.GraphModule,
    layer: SparseLayer,
    weight: BsrWeight,
    cache: KernelCache,
    target: tvm.target.Target,
) -> BsrLinear | BsrConv2d:
    bias = _tensor(gm, layer.bias) if layer.bias is not None else None

    def kernel_for(shape: tuple[int, ...]) -> Kernel:
        return cache.kernel(layer_spec(layer, weight.nnzb, shape), target)

    if layer.op == "linear":

        def transposed_for(rows: int, x_transposed: bool, y_transposed: bool) -> Kernel | None:
            plain = layer_spec(layer, weight.nnzb, (rows, layer.input_shape[-1]))
            spec = dataclasses.replace(plain, x_transposed=x_transposed, y_transposed=y_transposed)
            if compat.is_cuda(target) or not takes_transposed(spec, compat.vector_lanes(target)):
                return None
            return cache.kernel(spec, target)

        return BsrLinear(weight, bias, kernel_for, transposed_for, transposed_output=layer.transposed_output)

    def output_hw(h: int, w: int) -> tuple[int, int]:
        spec = layer_spec(layer, weight.nnzb, (1, layer.input_shape[1], h, w))
        return spec.geometry.out_hw

    return BsrConv2d(weight, bias, kernel_for, in_channels=layer.input_shape[1], output_hw=output_hw)


def _calling_modules(
    gm: torch.fx.GraphModule, layers: Sequence[SparseLayer], modules: Mapping[str, torch.nn.Module]
) -> torch.fx.GraphModule:
    """A copy of ``gm`` in which every layer that has a module calls it instead of its torch ops."""
    out = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name="CompiledGraphModule")
    out.meta.update(gm.meta)
    for layer in layers:
        if layer.node in modules:
            _swap_node(out, layer, modules[layer.node])
    out.graph.lint()
    out.recompile()
    return out


def _swap_node(out: torch.fx.GraphModule, layer: SparseLayer, module: torch.nn.Module) -> None:
    nodes = {node.name: node for node in out.graph.nodes}
    node = nodes[layer.node]
    prefix = layer.quantized.format if layer.quantized is not None else "bsr"
    name = unique_attr_name(out, f"{prefix}_{layer.node}")
    out.add_submodule(name, module)
    source = layer_of(out, node)
    assert source is not None  # the plan was made from this graph
    x = source.input
    if layer.quant_node is not None:  # the kernel quantizes X itself: it reads the fp32 input
        assert x.name == layer.quant_node and isinstance(x.args[0], torch.fx.Node)
        x = x.args[0]
    with out.graph.inserting_before(node):
        call = out.graph.call_module(name, (x,))
    call.meta.update(node.meta)
    replaced = nodes[layer.fused_node] if layer.fused_node is not None else node
    call.meta["val"] = replaced.meta.get("val")
    replaced.replace_all_uses_with(call)
    pending, erased = [replaced, node], set()
    while pending:  # the replaced ops, then what only they read (the weight, its transpose, the bias)
        dead = pending.pop(0)
        if dead in erased or dead.op not in ("call_function", "get_attr") or dead.users:
            continue
        pending += [arg for arg in dead.all_input_nodes if arg is not x]
        out.graph.erase_node(dead)
        erased.add(dead)
