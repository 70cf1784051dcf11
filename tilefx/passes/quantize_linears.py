"""QuantizeLinearsPass: run linear layers in int8 or bf16, as the kernels will, in a pure-torch graph.

For every selected ``aten.linear`` whose weight is a ``get_attr`` (``WeightLayers``), the pass

1. replaces the weight by its fake-quantized values — int8: ``s[n] · round(W / s[n])``, the
   exact grid the kernel packs (``passes.quant_ops``); bf16: bf16-rounded — keeping every zero,
   so block sparsity recorded earlier survives unchanged;
2. puts an activation fake-quant node in front of the linear (``tilefx::fake_quant_rows`` for
   dynamic int8, ``tilefx::fake_quant_tensor`` for static int8, ``tilefx::round_bf16``), so the
   optimized graph computes what the kernel computes, bit for bit in its codes;
3. records a :class:`~.metadata.Quantized` per weight, the only thing lowering reads.

It runs last in the default pipeline, on the final weights (after pruning and recovery).
``Quantization.keep`` leaves named parameters or modules fp32. The static scheme takes one
activation grid per weight from the calibration batches' range of its input (the fp32 model's,
before any layer is quantized; a shared weight's linears share one grid).

**Accuracy-aware fallback** (``tolerance``; Intel Neural Compressor's tuning loop, simplified):
each layer's *cost* is the model output's relative error ``‖y_q − y‖ / ‖y‖`` (Frobenius, over
all calibration batches, the first floating output) with only that layer quantized; then all
layers are quantized and, while the whole model's error exceeds ``tolerance``, the costliest
quantized layer goes back to fp32. Each layer's cost and fate is logged at INFO and kept in
``Metadata.quantization``.

numerics = "masked": the result must equal :meth:`masked_reference`, the input model rebuilt
from the records alone with the torch reference quantizers (not the custom ops). Idempotent:
a linear that already has its record and fake-quant node is left as it is.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
import torch.fx

from tilefx.errors import RecipeError
from tilefx.options import option, options

from . import quant_ops
from .analysis.weight_layers import WeightLayers
from .graph_utils import attr_tensor, check_state_names, matches_state_name
from .infra.analysis_manager import AnalysisManager
from .infra.pass_base import Numerics, PassBase, PassResult
from .infra.preconditions import require_aten_graph
from .metadata import QuantizationCost, Quantized, apply_masks, get_metadata, set_metadata
from .training.calibration import Calibration, first_tensor

__all__ = ["QuantizeLinearsPass", "Quantization", "quantized_input"]

log = logging.getLogger(__name__)

_LINEAR = torch.ops.aten.linear.default
Format = Literal["int8", "bf16"]
Scheme = Literal["dynamic", "static"]


@options
class Quantization:
    """Run linear layers in a narrower number format: ``Recipe(quantize=Quantization(...))``.

    format: "int8" (u8 activations × s8 weights, int32 accumulation; VNNI kernels) or "bf16"
    (bf16-rounded activations and weights, fp32 accumulation).
    scheme: int8 activations — "dynamic": one asymmetric uint8 grid per row (token) at run time;
    "static": one grid per layer from the calibration batches (needs calibration).
    per_channel: int8 weights get one symmetric scale per output channel (else one per tensor).
    keep: parameter or module names (or prefixes) left fp32; one matching nothing is an error.
    tolerance: accuracy-aware fallback — layers go back to fp32, costliest first, until the model
    output's relative error on the calibration batches is at most this (needs calibration).
    """

    format: Format = "int8"
    scheme: Scheme = "dynamic"
    per_channel: bool = True
    keep: tuple[str, ...] = ()
    tolerance: float | None = option(default=None, gt=0)

    def check(self) -> None:
        if self.format == "bf16" and self.scheme == "static":
            raise RecipeError(
                'Quantization.scheme="static" is for int8 activations; bf16 has no scale: drop scheme'
            )

    @property
    def needs_calibration(self) -> bool:
        return self.tolerance is not None or (self.format == "int8" and self.scheme == "static")

    @property
    def label(self) -> str:
        """``Quantization(scheme="static")``-style name for error messages."""
        parts = [f'format="{self.format}"']
        if self.format == "int8" and self.scheme == "static":
            parts.append('scheme="static"')
        if self.tolerance is not None:
            parts.append(f"tolerance={self.tolerance}")
        return f"Quantization({', '.join(parts)})"


@dataclass(frozen=True)
class _Layer:
    """One weight to quantize and the linear nodes (by name) that read it."""

    param: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class QuantizeLinearsPass(PassBase):
    """Fake-quantize linear layers' weights and inputs and record :class:`Quantized` per weight.

    Requires: an ATen-level graph (checked); calibration batches for ``scheme="static"`` and
    ``tolerance`` (checked at construction: :class:`RecipeError` naming the option).
    Preserves: nothing (weights and graph change).
    """

    quantization: Quantization = field(default_factory=Quantization)
    calibration: Calibration | None = field(default=None, compare=False, hash=False)

    numerics: ClassVar[Numerics] = "masked"

    def __post_init__(self) -> None:
        if self.quantization.needs_calibration and self.calibration is None:
            raise RecipeError(
                f"{self.quantization.label} needs calibration data: pass calibration=[(inputs, labels), "
                "...] to tilefx.optimize (labels may be None)"
            )

    def requires(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        require_aten_graph(self.name, gm)

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        check_state_names(gm, self.quantization.keep, "Quantization.keep")
        layers = self._layers(gm, am)
        if not layers:
            return PassResult(gm, False)
        ranges = self._input_ranges(gm, layers) if self._static else {}
        records = {layer.param: self._record(gm, layer, ranges.get(layer.param)) for layer in layers}
        costs: tuple[QuantizationCost, ...] = ()
        if self.quantization.tolerance is not None:
            records, costs = self._fallback(gm, layers, records)
        metadata = get_metadata(gm)
        for layer in layers:
            if layer.param in records:
                _quantize_layer(gm, layer.param, layer.nodes, records[layer.param])
                metadata = metadata.with_annotation(layer.param, records[layer.param])
        if costs:
            metadata = replace(metadata, quantization=costs)
        set_metadata(gm, metadata)
        gm.recompile()
        log.info(
            "QuantizeLinearsPass: %d of %d linear weights in %s",
            len(records),
            len(layers),
            self.quantization.format,
        )
        return PassResult(gm, bool(records) or bool(costs))

    def masked_reference(
        self, before: torch.fx.GraphModule, after: torch.fx.GraphModule, example_inputs: Sequence[Any]
    ) -> torch.fx.GraphModule:
        """``before`` (masks applied) with each new :class:`Quantized` record applied by the torch
        reference quantizers: weights from the record's scales, a reference fake-quant on the input
        of every linear reading them."""
        reference = apply_masks(before, after)
        earlier = get_metadata(before)
        for name, records in get_metadata(after).params.items():
            for record in records:
                if isinstance(record, Quantized) and not earlier.of(name, Quantized):
                    _reference_layer(reference, name, record)
        reference.recompile()
        return reference

    @property
    def _static(self) -> bool:
        return self.quantization.format == "int8" and self.quantization.scheme == "static"

    def _layers(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> list[_Layer]:
        """Selected float32 linear weights not yet quantized, each with the linears reading it."""
        metadata = get_metadata(gm)
        found = []
        for layer in am.get(WeightLayers()):
            if layer.kind != "linear" or layer.node.target != _LINEAR:
                continue
            if any(matches_state_name(layer.param, entry) for entry in self.quantization.keep):
                log.info("QuantizeLinearsPass: %s kept fp32 (Quantization.keep)", layer.param)
                continue
            if metadata.of(layer.param, Quantized) or attr_tensor(gm, layer.param).dtype != torch.float32:
                continue
            nodes = _linears_reading(gm, layer.param)
            if all(_reads_float32(node) for node in nodes):
                found.append(_Layer(layer.param, tuple(node.name for node in nodes)))
        return found

    def _record(self, gm: torch.fx.GraphModule, layer: _Layer, span: tuple[float, float] | None) -> Quantized:
        q = self.quantization
        if q.format == "bf16":
            return Quantized("bf16")
        scales = quant_ops.quantize_weight(attr_tensor(gm, layer.param), q.per_channel).scales
        if span is None:
            return Quantized("int8", "dynamic", scales, q.per_channel)
        scale, zero = quant_ops.static_params(*span)
        return Quantized("int8", "static", scales, q.per_channel, scale, zero)

    def _input_ranges(self, gm: torch.fx.GraphModule, layers: list[_Layer]) -> dict[str, tuple[float, float]]:
        """Per weight, the (min, max) of its linears' inputs over the calibration batches (fp32 model)."""
        owner = {node: layer.param for layer in layers for node in layer.nodes}
        ranges: dict[str, tuple[float, float]] = {}

        def observe(node: torch.fx.Node, x: torch.Tensor) -> None:
            param = owner.get(node.name)
            if param is None or not x.numel():
                return
            low, high = float(x.min()), float(x.max())
            old = ranges.get(param, (low, high))
            ranges[param] = (min(old[0], low), max(old[1], high))

        for inputs in self._batches():
            _ObservingInterpreter(gm, observe).run(*inputs)
        missing = [layer.param for layer in layers if layer.param not in ranges]
        if missing:
            raise RecipeError(f'Quantization(scheme="static"): the calibration batches never reach {missing}')
        return ranges

    def _batches(self) -> list[tuple[Any, ...]]:
        assert self.calibration is not None  # __post_init__
        batches = [inputs for inputs, _ in self.calibration]
        if not batches:
            raise RecipeError(f"{self.quantization.label} needs calibration batches, got none")
        return batches

    def _fallback(
        self, gm: torch.fx.GraphModule, layers: list[_Layer], records: dict[str, Quantized]
    ) -> tuple[dict[str, Quantized], tuple[QuantizationCost, ...]]:
        """Quantize all, then return the costliest layers to fp32 until the error is within tolerance."""
        tolerance = self.quantization.tolerance
        assert tolerance is not None
        batches = self._batches()
        reference = _outputs(gm, batches)
        by_param = {layer.param: layer for layer in layers}

        def error(params: Sequence[str]) -> float:
            trial = copy.deepcopy(gm)
            for param in params:
                _quantize_layer(trial, param, by_param[param].nodes, records[param])
            trial.recompile()
            return _relative_error(_outputs(trial, batches), reference)

        cost = {param: error([param]) for param in records}
        kept = sorted(records, key=lambda param: cost[param])  # cheapest first
        total = error(kept)
        while kept and total > tolerance:
            dropped = kept.pop()
            log.info(
                "QuantizeLinearsPass: model error %.3g > tolerance %.3g; %s (cost %.3g) back to fp32",
                total,
                tolerance,
                dropped,
                cost[dropped],
            )
            total = error(kept) if kept else 0.0
        for param in sorted(records, key=lambda p: -cost[p]):
            fate = "quantized" if param in kept else "fp32"
            log.info("QuantizeLinearsPass: %s cost %.3g -> %s", param, cost[param], fate)
        log.info(
            "QuantizeLinearsPass: model error %.3g with %d of %d quantized", total, len(kept), len(records)
        )
        report = tuple(
            QuantizationCost(param, cost[param], param in kept)
            for param in sorted(records, key=lambda p: -cost[p])
        )
        chosen = {param: replace(records[param], cost=cost[param]) for param in kept}
        return chosen, report


def _quantize_layer(gm: torch.fx.GraphModule, param: str, nodes: Sequence[str], record: Quantized) -> None:
    """Write ``record``'s weight grid into ``param`` and a fake-quant node before each linear in ``nodes``."""
    weight = attr_tensor(gm, param)
    with torch.no_grad():
        if record.format == "bf16":
            weight.copy_(quant_ops.round_bf16_ref(weight))
        else:
            assert record.weight_scales is not None
            weight.copy_(quant_ops.fake_quant_weight(weight, record.weight_scales))
    by_name = {node.name: node for node in gm.graph.nodes}
    target = quant_ops.FAKE_QUANT_OPS[(record.format, record.scheme)]
    for name in nodes:
        node = by_name[name]
        x = node.args[0]
        assert isinstance(x, torch.fx.Node)
        with gm.graph.inserting_before(node):
            fake = gm.graph.call_function(target, (x, *_grid_args(record)))
        fake.meta["val"] = x.meta.get("val")
        node.args = (fake, *node.args[1:])


def quantized_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The fake-quant node feeding linear ``node`` (its first argument), or None."""
    x = node.args[0] if node.args else None
    return x if isinstance(x, torch.fx.Node) and quant_ops.is_fake_quant(x) else None


def _reference_layer(gm: torch.fx.GraphModule, param: str, record: Quantized) -> None:
    """Apply ``record`` to ``param`` and its linears' inputs with the reference functions."""
    weight = attr_tensor(gm, param)
    fake: Callable[..., torch.Tensor]
    with torch.no_grad():
        if record.format == "bf16":
            weight.copy_(quant_ops.round_bf16_ref(weight))
            fake = quant_ops.round_bf16_ref
        else:
            assert record.weight_scales is not None
            weight.copy_(quant_ops.fake_quant_weight(weight, record.weight_scales))
            static = record.scheme == "static"
            fake = quant_ops.fake_quant_tensor_ref if static else quant_ops.fake_quant_rows_ref
    for node in _linears_reading(gm, param):
        x = node.args[0]
        with gm.graph.inserting_before(node):
            node.args = (gm.graph.call_function(fake, (x, *_grid_args(record))), *node.args[1:])


def _grid_args(record: Quantized) -> tuple[Any, ...]:
    """The activation fake-quant's arguments after X: the static grid, or nothing."""
    if record.format == "int8" and record.scheme == "static":
        return (record.act_scale, record.act_zero_point)
    return ()


def _linears_reading(gm: torch.fx.GraphModule, param: str) -> list[torch.fx.Node]:
    return [
        user
        for node in gm.graph.find_nodes(op="get_attr", target=param)
        for user in node.users
        if user.op == "call_function" and user.target == _LINEAR and user.args[1] is node
    ]


def _reads_float32(node: torch.fx.Node) -> bool:
    """The linear's input is a float32 tensor (by its shape metadata)."""
    value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32


class _ObservingInterpreter(torch.fx.Interpreter):
    """Runs the graph and shows ``observe`` each linear's input."""

    def __init__(
        self, gm: torch.fx.GraphModule, observe: Callable[[torch.fx.Node, torch.Tensor], None]
    ) -> None:
        super().__init__(gm)
        self.observe = observe

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "call_function" and n.target == _LINEAR:
            x = self.env[n.args[0]]  # type: ignore[index]
            if isinstance(x, torch.Tensor):
                self.observe(n, x.detach())
        return super().run_node(n)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return super().run(*args, **kwargs)


def _outputs(gm: torch.fx.GraphModule, batches: list[tuple[Any, ...]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [first_tensor(gm(*inputs)).detach().double() for inputs in batches]


def _relative_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """``‖y − y_ref‖ / ‖y_ref‖`` (Frobenius) over all batches together."""
    diff = sum(float((y - r).pow(2).sum()) for y, r in zip(outputs, reference, strict=True))
    norm = sum(float(r.pow(2).sum()) for r in reference)
    return (diff / norm) ** 0.5 if norm > 0 else diff**0.5
