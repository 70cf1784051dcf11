"""Recipes: what the user asks ``optimize`` to do, as frozen, validated dataclasses.

Every option is checked at construction; an unknown option, a value of the wrong type (a string
where a number belongs) or a value out of range raises :class:`RecipeError` (a ``ValueError``)
naming the field, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from tilefx.errors import RecipeError
from tilefx.passes.training.dcp import DCPOptions, SGDOptions
from tilefx.passes.training.dsm_prior import DSMSettings
from tilefx.passes.training.loop import LoopOptions
from tilefx.passes.training.vrpge import VRPGEOptions

__all__ = [
    "BlockPruning",
    "ChannelPruning",
    "ConnectionPruning",
    "DirichletScaleMixture",
    "Recipe",
    "Recovery",
]

T = TypeVar("T")

ChannelCriterion = Literal["l1", "l2", "bn_scale", "taylor", "dcp", "vrpge"]
ConnectionCriterion = Literal["synaptic_strength", "l1"]


def _check_options(owner: str, cls: type, keys: Any) -> None:
    """An unknown option is a RecipeError that suggests the closest known field."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(known)}"
            raise RecipeError(f"{owner}: unknown option {key!r}{hint}")


def _strict(cls: type[T]) -> type[T]:
    """Check keyword options of ``cls`` by :func:`_check_options` before its own init runs, and
    each field's type (:func:`_check_types`) before its ``__post_init__`` compares values."""
    init, post_init = cls.__init__, cls.__post_init__  # type: ignore[attr-defined]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        _check_options(cls.__name__, cls, kwargs)
        init(self, *args, **kwargs)

    @functools.wraps(post_init)
    def __post_init__(self: Any) -> None:
        _check_types(cls.__name__, cls, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        post_init(self)

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
    return cls


def _check_types(owner: str, cls: type, values: Mapping[str, Any]) -> None:
    """A field of ``cls`` whose value is not of its annotated type is a RecipeError naming it.

    Lists pass where tuples are declared and mappings where an options dataclass is (both are
    converted by ``__post_init__``); Literal fields are left to :func:`_choice`, which lists the
    choices.
    """
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not _conforms(value, hints[name]):
            raise RecipeError(
                f"{owner}.{name} must be {_describe(hints[name])}, got {type(value).__name__} {value!r}"
            )


def _conforms(value: object, hint: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal or hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint in (int, float) or hint is bool:
        return _is_number(value, hint)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(item, args[0]) for item in value)
        return len(value) == len(args) and all(map(_conforms, value, args))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, Mapping))
    return not isinstance(hint, type) or isinstance(value, hint)


def _is_number(value: object, hint: type) -> bool:
    """bool is its own kind here: ``ratio=True`` is a mistake, not the number 1."""
    if hint is bool or isinstance(value, bool):
        return hint is bool and isinstance(value, bool)
    return isinstance(value, int) if hint is int else isinstance(value, (int, float))


_NAMES = {int: "an integer", float: "a number", bool: "True or False", str: "a string", type(None): "None"}
_PLURALS = {int: "integers", float: "numbers", str: "strings"}


def _describe(hint: Any) -> str:
    """What a user should write for ``hint``, in words (``tuple[str, ...]``: "a tuple of strings")."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a tuple of {_PLURALS.get(args[0], getattr(args[0], '__name__', str(args[0])))}"
    if origin is tuple and len(set(args)) == 1:
        return f"a tuple of {len(args)} {_PLURALS.get(args[0], str(args[0]))}"
    if hint in _NAMES:
        return _NAMES[hint]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} (or a dict of its fields)"
    return f"a {getattr(hint, '__name__', str(hint))}"


def _dcp_options(data: Mapping[str, Any]) -> DCPOptions:
    """DCPOptions from plain data (a TOML table), its ``solver`` table included."""
    _check_options("ChannelPruning.dcp", DCPOptions, data)
    _check_types("ChannelPruning.dcp", DCPOptions, data)
    options = dict(data)
    if isinstance(options.get("solver"), Mapping):
        _check_options("ChannelPruning.dcp.solver", SGDOptions, options["solver"])
        _check_types("ChannelPruning.dcp.solver", SGDOptions, options["solver"])
        options["solver"] = SGDOptions(**options["solver"])
    return DCPOptions(**options)


def _fraction(owner: str, name: str, value: float, *, allow_zero: bool = True) -> None:
    number = _is_number(value, float)
    low_ok = number and (value >= 0 if allow_zero else value > 0)
    if not (low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise RecipeError(f"{owner}.{name} must be a number in {interval}, got {value!r}")


def _choice(owner: str, name: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices:
        raise RecipeError(f"{owner}.{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@_strict
@dataclass(frozen=True)
class ChannelPruning:
    """Remove whole channels (physically shrinking layers), coupled channels kept consistent.

    ratio: fraction of channels removed in each prunable group (or globally with ``scope="global"``).
    protect: parameter names or their prefixes never pruned (e.g. the stem or the classifier); an
    entry that matches no parameter of the model is a RecipeError (a typo would protect nothing).
    round_to: keep channel counts multiples of this (kernels like 8 or 16). With ``blocks`` in the
    same recipe the counts are also kept multiples of both block sides, so the block pruning that
    follows can tile every pruned layer (``tilefx.pipeline``).
    attention: in multi-head attention, remove the same head dims from every head ("head_dims")
    or whole heads ("heads").
    dcp: DCP's options for ``criterion="dcp"`` (a ``DCPOptions`` or a dict of its fields): paper or
    code variant, heads, λ, auxiliary fine-tune budget, and ``epsilon`` for DCP-Adapt, whose
    selection then decides how many channels each DCP-scored layer keeps. Its ``rate`` is
    always ``ratio``.
    vrpge: VR-PGE's options for ``criterion="vrpge"`` (a ``VRPGEOptions`` or a dict of its fields):
    search and fine-tune steps, estimator form, budget ("channels" or "flops"); the budget keeps
    ``1 - ratio`` of it globally, so ``scope`` does not apply. Needs calibration batches.
    """

    ratio: float = 0.3
    criterion: ChannelCriterion = "l1"
    scope: Literal["layer", "global"] = "layer"
    protect: tuple[str, ...] = ()
    round_to: int = 1
    attention: Literal["head_dims", "heads"] = "head_dims"
    dcp: DCPOptions | None = None
    vrpge: VRPGEOptions | None = None

    def __post_init__(self) -> None:
        _fraction("ChannelPruning", "ratio", self.ratio)
        object.__setattr__(self, "protect", tuple(self.protect))
        if isinstance(self.dcp, Mapping):
            object.__setattr__(self, "dcp", _dcp_options(self.dcp))
        if self.dcp is not None and not isinstance(self.dcp, DCPOptions):
            raise RecipeError(
                f"ChannelPruning.dcp must be a DCPOptions or a dict, got {type(self.dcp).__name__}"
            )
        if self.dcp is not None and self.criterion != "dcp":
            raise RecipeError(f'ChannelPruning.dcp is only read with criterion="dcp", not {self.criterion!r}')
        self._check_vrpge()
        _choice("ChannelPruning", "attention", self.attention, ("head_dims", "heads"))
        _choice(
            "ChannelPruning", "criterion", self.criterion, ("l1", "l2", "bn_scale", "taylor", "dcp", "vrpge")
        )
        _choice("ChannelPruning", "scope", self.scope, ("layer", "global"))
        if self.round_to < 1:
            raise RecipeError(f"ChannelPruning.round_to must be a positive integer, got {self.round_to!r}")

    def _check_vrpge(self) -> None:
        if isinstance(self.vrpge, Mapping):
            _check_options("ChannelPruning.vrpge", VRPGEOptions, self.vrpge)
            _check_types("ChannelPruning.vrpge", VRPGEOptions, self.vrpge)
            object.__setattr__(self, "vrpge", VRPGEOptions(**self.vrpge))
        if self.vrpge is not None and not isinstance(self.vrpge, VRPGEOptions):
            raise RecipeError(
                f"ChannelPruning.vrpge must be a VRPGEOptions or a dict, got {type(self.vrpge).__name__}"
            )
        if self.vrpge is not None and self.criterion != "vrpge":
            raise RecipeError(
                f'ChannelPruning.vrpge is only read with criterion="vrpge", not {self.criterion!r}'
            )


@_strict
@dataclass(frozen=True)
class ConnectionPruning:
    """Zero whole (out-channel, in-channel) kernels of convs and (out, in) entries of linears."""

    sparsity: float = 0.5
    criterion: ConnectionCriterion = "synaptic_strength"

    def __post_init__(self) -> None:
        _fraction("ConnectionPruning", "sparsity", self.sparsity)
        _choice("ConnectionPruning", "criterion", self.criterion, ("synaptic_strength", "l1"))


@_strict
@dataclass(frozen=True)
class BlockPruning:
    """Prune whole (rows, cols) blocks of weight matrices, after TETRIS reordering by default.

    tetris: the TETRIS preset — "faithful" (the authors' EM from identity orders), "fast"
    (clustered initial orders, one EM run) or "best" (several starts and restarts; slowest).
    """

    block: tuple[int, int] = (32, 1)
    sparsity: float = 0.8
    reorder: Literal["tetris", "none"] = "tetris"
    tetris: Literal["faithful", "fast", "best"] = "fast"

    def __post_init__(self) -> None:
        block = tuple(self.block)
        if min(block) < 1:
            raise RecipeError(
                f"BlockPruning.block must be two positive integers (rows, cols), got {self.block!r}"
            )
        object.__setattr__(self, "block", block)
        _fraction("BlockPruning", "sparsity", self.sparsity)
        _choice("BlockPruning", "reorder", self.reorder, ("tetris", "none"))
        _choice("BlockPruning", "tetris", self.tetris, ("faithful", "fast", "best"))


@_strict
@dataclass(frozen=True)
class Recovery:
    """Train while pruning, so the pruned model still works: needs ``optimize(..., calibration=...)``.

    Batches are ``(inputs, labels)`` shaped like the example inputs; ``labels=None`` means unlabeled:
    the model then learns from the dense model (distillation). steps: optimiser steps (each of
    ``accumulate`` batches). schedule: "gradual" raises sparsity along Zhu & Gupta's cubic curve
    over the first ``ramp`` of the steps, re-selecting masks from the current weights every
    ``every`` steps by ``score`` ("magnitude" or "movement"); "oneshot" prunes at step 0 and trains
    with the masks fixed. distill: "output", "hidden" (outputs plus the hidden
    taps below) or None (labels only); output_loss: "cosine" (relative MSE + cosine, for embeddings),
    "mse" or "kl" (for logits). lr warms up over ``warmup`` of the steps, then ``decay``s.
    checkpoint_dir: save every ``checkpoint_every`` steps; a rerun resumes there. progress: a
    tqdm bar with the live loss and sparsity, when stderr is a terminal.
    output_loss="pooled": relative MSE + cosine of the sequence-mean-pooled outputs (sentence
    encoders). hidden_taps: what distill="hidden" matches — the pruned layers' "inputs", their
    "outputs", or every normalisation's output ("norms", the default: a transformer's residual
    stream; the pruned layers' inputs when the model has no normalisation).
    token_mask: position of the attention-mask tensor among the flattened example inputs (1 for
    ``BertModel(input_ids, attention_mask)``); padding is then left out of the loss.
    reconstruct: with schedule="oneshot", choose the blocks and refit the kept weights layer by
    layer on this many calibration batches before training (Optimal Brain Surgeon saliency, least
    squares against the dense layer's output); 0: magnitude, no refit. Best with a pretrained
    model and little training time.
    """

    steps: int = 500
    lr: float = 1e-4
    schedule: Literal["gradual", "oneshot"] = "gradual"
    distill: Literal["output", "hidden"] | None = "hidden"
    output_loss: Literal["cosine", "mse", "kl", "pooled"] = "cosine"
    score: Literal["magnitude", "movement"] = "magnitude"
    trainable: Literal["all", "layers"] = "all"
    ramp: float = 0.6
    every: int = 10
    warmup: float = 0.05
    decay: Literal["constant", "linear", "cosine"] = "linear"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    accumulate: int = 1
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    progress: bool = True
    hidden_taps: Literal["inputs", "outputs", "norms"] = "norms"
    token_mask: int | None = None
    reconstruct: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "every", "accumulate", "checkpoint_every", "seed", "reconstruct"):
            value = getattr(self, name)
            low = 0 if name in ("steps", "seed", "reconstruct") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise RecipeError(f"Recovery.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise RecipeError(f"Recovery.lr must be positive, got {self.lr!r}")
        if not isinstance(self.ramp, (int, float)) or not 0 <= self.ramp <= 1:
            raise RecipeError(f"Recovery.ramp must be a fraction of the steps in [0, 1], got {self.ramp!r}")
        _fraction("Recovery", "warmup", self.warmup)
        _choice("Recovery", "schedule", self.schedule, ("gradual", "oneshot"))
        if self.reconstruct and self.schedule != "oneshot":
            raise RecipeError(
                f"Recovery.reconstruct={self.reconstruct} prunes every layer to its target before training, "
                f'which a gradual schedule contradicts: set schedule="oneshot" or reconstruct=0'
            )
        _choice("Recovery", "distill", self.distill, ("output", "hidden", None))
        _choice("Recovery", "output_loss", self.output_loss, ("cosine", "mse", "kl", "pooled"))
        _choice("Recovery", "hidden_taps", self.hidden_taps, ("inputs", "outputs", "norms"))
        if self.token_mask is not None and (
            not isinstance(self.token_mask, int) or isinstance(self.token_mask, bool) or self.token_mask < 0
        ):
            raise RecipeError(
                f"Recovery.token_mask must be an input position >= 0 or None, got {self.token_mask!r}"
            )
        _choice("Recovery", "score", self.score, ("magnitude", "movement"))
        _choice("Recovery", "trainable", self.trainable, ("all", "layers"))
        _choice("Recovery", "decay", self.decay, ("constant", "linear", "cosine"))
        _choice("Recovery", "optimizer", self.optimizer, ("adamw", "sgd"))
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise RecipeError(f"Recovery.weight_decay must be >= 0, got {self.weight_decay!r}")

    def loop_options(self) -> LoopOptions:
        """The training loop's options for this recovery."""
        return LoopOptions(
            steps=self.steps,
            lr=self.lr,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            warmup=self.warmup,
            decay=self.decay,
            accumulate=self.accumulate,
            seed=self.seed,
            checkpoint_dir=self.checkpoint_dir,
            checkpoint_every=self.checkpoint_every,
            progress=self.progress,
        )


@_strict
@dataclass(frozen=True)
class DirichletScaleMixture:
    """Train under a Dirichlet scale mixture prior, then prune the prior's layers by ``|w|``.

    The node-wise DSM prior of Arnstad et al. (2026) in its MAP form (docs/methods.md §4): the
    one training loop fits the model to the labelled calibration batches (their loss:
    cross-entropy, or a ``Calibration``'s own) plus ``-log p(W, latents) / N`` on each chosen
    linear weight, then each keeps its ``1 - sparsity`` largest ``|w|``; the zeros are recorded as
    (1, 1) blocks, which ``tilefx.compile`` lowers to block-sparse kernels. Needs calibration.
    kind: "horseshoe" (node scales λ ~ C⁺) or "student_t" (λ ~ t₃⁺). layers: parameter or module
    names of ``nn.Linear`` layers; empty means the first linear in graph order (the paper's
    first layer). alpha, p0, slab_a, slab_b, student_df: the prior's hyperparameters (the paper's
    code's by default: Dirichlet α, expected relevant inputs p₀, InvGamma(a, b) slab, t's degrees
    of freedom). examples: N in τ₀ = p₀/(P − p₀)/√N and in the prior's weight 1/N; None counts
    the calibration examples. steps, lr, optimizer, weight_decay, decay, seed, progress: the loop's.
    form: "non_centred" (default) maximises the prior density of ``W/σ``, the sampler's
    coordinates; "centred" that of W, which tends to collapse every weight to zero
    (``DSMPriorHook``).
    """

    kind: Literal["horseshoe", "student_t"] = "horseshoe"
    sparsity: float = 0.8
    steps: int = 500
    lr: float = 1e-2
    layers: tuple[str, ...] = ()
    alpha: float = 0.1
    p0: float = 4.0
    slab_a: float = 2.0
    slab_b: float = 4.0
    student_df: float = 3.0
    examples: int | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    decay: Literal["constant", "linear", "cosine"] = "constant"
    seed: int = 0
    progress: bool = True
    form: Literal["non_centred", "centred"] = "non_centred"

    def __post_init__(self) -> None:
        owner = "DirichletScaleMixture"
        _choice(owner, "form", self.form, ("non_centred", "centred"))
        _choice(owner, "kind", self.kind, ("horseshoe", "student_t"))
        _fraction(owner, "sparsity", self.sparsity)
        object.__setattr__(self, "layers", tuple(self.layers))
        for name in ("steps", "examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecipeError(f"{owner}.{name} must be an integer >= 1, got {value!r}")
        if self.seed < 0:
            raise RecipeError(f"{owner}.seed must be an integer >= 0, got {self.seed!r}")
        for name in ("lr", "alpha", "p0", "slab_a", "slab_b", "student_df"):
            if not getattr(self, name) > 0:
                raise RecipeError(f"{owner}.{name} must be positive, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise RecipeError(f"{owner}.weight_decay must be >= 0, got {self.weight_decay!r}")
        _choice(owner, "optimizer", self.optimizer, ("adamw", "sgd"))
        _choice(owner, "decay", self.decay, ("constant", "linear", "cosine"))

    def settings(self) -> DSMSettings:
        """The prior's hyperparameters."""
        return DSMSettings(self.kind, self.alpha, self.p0, self.slab_a, self.slab_b, self.student_df)

    def loop_options(self) -> LoopOptions:
        """The training loop's options for the MAP fit."""
        return LoopOptions(
            steps=self.steps,
            lr=self.lr,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            decay=self.decay,
            seed=self.seed,
            progress=self.progress,
        )


@_strict
@dataclass(frozen=True)
class Recipe:
    """The whole optimisation request. The default folds batch norms and cleans up (exact only).

    tolerance: allowed max abs error relative to the output scale in verification.
    recovery: train while pruning (see :class:`Recovery`); needs calibration batches.
    prior: train under a DSM prior and prune its layers (see :class:`DirichletScaleMixture`).
    """

    fold_batchnorm: bool = True
    channels: ChannelPruning | None = None
    connections: ConnectionPruning | None = None
    blocks: BlockPruning | None = None
    skip: tuple[str, ...] = ()
    verify: bool = True
    tolerance: float = 1e-5
    recovery: Recovery | None = None
    prior: DirichletScaleMixture | None = None

    def __post_init__(self) -> None:
        for name, kind in (
            ("channels", ChannelPruning),
            ("connections", ConnectionPruning),
            ("blocks", BlockPruning),
            ("recovery", Recovery),
            ("prior", DirichletScaleMixture),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise RecipeError(
                    f"Recipe.{name} must be a tilefx.{kind.__name__} or None, got {type(value).__name__}"
                )
        object.__setattr__(self, "skip", tuple(self.skip))
        if not 0 < self.tolerance < 1:
            raise RecipeError(f"Recipe.tolerance must be in (0, 1), got {self.tolerance!r}")
        if self.recovery is not None:
            self._check_recovery()
        if self.prior is not None:
            self._check_prior()

    def _check_recovery(self) -> None:
        """Recovery trains block (or connection) masks; the combinations it does not cover yet fail here."""
        if self.channels is not None:
            raise RecipeError(
                "Recipe.recovery does not train channel pruning yet: drop recovery, or prune blocks instead"
            )
        if self.connections is not None and self.blocks is not None:
            raise RecipeError(
                "Recipe.recovery trains one sparsity at a time: blocks or connections, not both"
            )
        if self.connections is not None and self.connections.criterion != "l1":
            raise RecipeError(
                'Recipe.recovery prunes connections gradually by magnitude: use ConnectionPruning(criterion="l1")'
            )

    def _check_prior(self) -> None:
        """The prior prunes the layers it trains; other sparsity on top of it is not composed yet."""
        others = [name for name in ("connections", "blocks", "recovery") if getattr(self, name) is not None]
        if others:
            raise RecipeError(
                f"Recipe.prior prunes the layers it trains and is not combined with {', '.join(others)} "
                "yet: drop one of them (channel pruning may run before the prior)"
            )

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Recipe:
        """Build from plain data (a parsed TOML file); sections become the option dataclasses."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a table of Recipe fields, got {type(data).__name__}")
        sections = {
            "channels": ChannelPruning,
            "connections": ConnectionPruning,
            "blocks": BlockPruning,
            "recovery": Recovery,
            "prior": DirichletScaleMixture,
        }
        fields: dict[str, Any] = {}
        for key, value in data.items():
            if key not in sections:
                fields[key] = value  # TOML arrays are lists: the field checks accept them as tuples
                continue
            if not isinstance(value, Mapping):
                raise RecipeError(f"Recipe.{key} must be a table of options, got {value!r}")
            fields[key] = sections[key](**value)
        return Recipe(**fields)
