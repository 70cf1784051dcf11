"""Recipes: what the user asks ``optimize`` to do, as frozen option dataclasses checked at construction.

Every part is an ``@options`` class (:mod:`tilefx.options`): an unknown option, a value of the
wrong type or out of range raises :class:`RecipeError` (a ``ValueError``) naming the field, before
any work starts. The parts that a pass reads whole are defined beside that pass and re-exported
here — :class:`Recovery` (``passes.recover_sparsity``, which extends the training loop's
``LoopOptions``), :class:`DirichletScaleMixture` (``passes.train_dsm_prior``) and
:class:`Quantization` (``passes.quantize_linears``) — so each option
is written once; the pipeline hands them to their passes as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from tilefx.errors import RecipeError
from tilefx.options import nested, option, options
from tilefx.passes.analysis.tetris import TetrisPreset
from tilefx.passes.criteria import CriterionOptions, criteria, criterion
from tilefx.passes.prune_channels import Attention, Scope
from tilefx.passes.prune_connections import ConnectionCriterion
from tilefx.passes.quantize_linears import Quantization
from tilefx.passes.recover_sparsity import Recovery
from tilefx.passes.search.space import SpeedSearch
from tilefx.passes.train_dsm_prior import DirichletScaleMixture

__all__ = [
    "BlockPruning",
    "ChannelPruning",
    "ConnectionPruning",
    "DirichletScaleMixture",
    "Quantization",
    "Recipe",
    "Recovery",
]


@options
class ChannelPruning:
    """Remove whole channels (physically shrinking layers), coupled channels kept consistent.

    ratio: fraction of channels removed in each prunable group (or globally with ``scope="global"``).
    criterion: a name of the criteria catalogue (``tilefx.passes.criteria``): "l1", "l2",
    "bn_scale", "taylor" (needs calibration), "dcp" (discrimination-aware, needs calibration),
    "vrpge" (learned structure parameters, needs calibration).
    protect: parameter names or their prefixes never pruned (e.g. the stem or the classifier); an
    entry that matches no parameter of the model is a RecipeError (a typo would protect nothing).
    round_to: keep channel counts multiples of this (kernels like 8 or 16). With ``blocks`` in the
    same recipe the counts are also kept multiples of both block sides, so the block pruning that
    follows can tile every pruned layer (``tilefx.pipeline``).
    attention: in multi-head attention, remove the same head dims from every head ("head_dims")
    or whole heads ("heads").
    options: the criterion's own options, of the type its catalogue entry names (a dict of its
    fields is converted): ``DCPOptions`` for "dcp" (paper or code variant, heads, λ, fine-tune
    budget, ``epsilon`` for DCP-Adapt, whose selection then decides how many channels each
    DCP-scored layer keeps; its ``rate`` is always ``ratio``), ``VRPGEOptions`` for "vrpge"
    (search and fine-tune steps, estimator, budget "channels" or "flops", which keeps
    ``1 - ratio`` of it globally, so ``scope`` does not apply).
    refit: after the channels go, refit every layer that lost input channels by least squares to
    the unpruned model's output, on this many calibration batches (``RefitConsumersPass``; Kwon
    et al. 2022); 0: no refit. Needs calibration. ``Recipe(recovery=...)`` then trains the result
    back toward the unpruned model.
    """

    ratio: float = option(default=0.3, ge=0, lt=1)
    criterion: str = "l1"
    scope: Scope = "layer"
    protect: tuple[str, ...] = ()
    round_to: int = option(default=1, ge=1)
    attention: Attention = "head_dims"
    options: CriterionOptions | None = None
    refit: int = option(default=0, ge=0)

    def normalize(self) -> None:
        if self.criterion not in criteria(public=True):
            raise RecipeError(
                f"ChannelPruning.criterion must be one of {', '.join(map(repr, criteria(public=True)))}; "
                f"got {self.criterion!r}"
            )
        kind = criterion(self.criterion).options_type
        if self.options is not None and kind is None:
            raise RecipeError(f"ChannelPruning.options: criterion={self.criterion!r} takes no options")
        if isinstance(self.options, Mapping) and kind is not None:
            converted = nested("ChannelPruning.options", kind, self.options)
            object.__setattr__(self, "options", converted)

    def check(self) -> None:
        kind = criterion(self.criterion).options_type
        if self.options is not None and kind is not None and not isinstance(self.options, kind):
            raise RecipeError(
                f"ChannelPruning.options must be a {kind.__name__} (or a dict of its fields) for "
                f"criterion={self.criterion!r}, got {type(self.options).__name__}"
            )


@options
class ConnectionPruning:
    """Zero whole (out-channel, in-channel) kernels of convs and (out, in) entries of linears."""

    sparsity: float = option(default=0.5, ge=0, lt=1)
    criterion: ConnectionCriterion = "synaptic_strength"


@options
class BlockPruning:
    """Prune whole (rows, cols) blocks of weight matrices, after TETRIS reordering by default.

    tetris: the TETRIS preset — "faithful" (the authors' EM from identity orders), "fast"
    (clustered initial orders, one EM run), "best" (several starts and restarts; slowest) or
    "sketch" ("fast" with its k-means on a random projection: approximate, faster on wide layers).
    """

    block: tuple[int, int] = (32, 1)
    sparsity: float = option(default=0.8, ge=0, lt=1)
    reorder: Literal["tetris", "none"] = "tetris"
    tetris: TetrisPreset = "fast"

    def check(self) -> None:
        if min(self.block) < 1:
            raise RecipeError(
                f"BlockPruning.block must be two positive integers (rows, cols), got {self.block!r}"
            )


@options
class Recipe:
    """The whole optimisation request. The default folds batch norms and cleans up (exact only).

    tolerance: allowed max abs error relative to the output scale in verification.
    recovery: train while pruning (see :class:`Recovery`); needs calibration batches.
    prior: train under a DSM prior and prune its layers (see :class:`DirichletScaleMixture`).
    quantize: run linear layers in int8 or bf16 (see :class:`Quantization`), last, on the final
    weights; its static scheme and tolerance need calibration batches.
    speedup: instead of saying how to prune, say how fast: tilefx searches, per unit of the model,
    which channels to keep, which blocks to prune and which number format to run, for the
    least output damage whose *measured* compiled speed-up over dense torch is this
    (``tilefx.speed_target``; ``search`` sets the space). Needs calibration batches.
    quality: the dual — the fastest model whose estimated output similarity to the dense one,
    ``1 − Σ‖y − y_dense‖² / Σ‖y_dense‖²`` on held-out calibration batches, stays at least this.
    """

    fold_batchnorm: bool = True
    channels: ChannelPruning | None = None
    connections: ConnectionPruning | None = None
    blocks: BlockPruning | None = None
    skip: tuple[str, ...] = ()
    verify: bool = True
    tolerance: float = option(default=1e-5, gt=0, lt=1)
    recovery: Recovery | None = None
    prior: DirichletScaleMixture | None = None
    quantize: Quantization | None = None
    speedup: float | None = option(default=None, gt=1)
    quality: float | None = option(default=None, gt=0, lt=1)
    search: SpeedSearch | None = None

    def check(self) -> None:
        if self.speedup is not None or self.quality is not None:
            self._check_search()
        if self.recovery is not None:
            self._check_recovery()
        if self.prior is not None:
            self._check_prior()

    def _check_recovery(self) -> None:
        """Recovery trains block (or connection) masks, and what channel pruning left; the
        combinations it does not cover yet fail here."""
        if self.connections is not None and self.blocks is not None:
            raise RecipeError(
                "Recipe.recovery trains one sparsity at a time: blocks or connections, not both"
            )
        if self.connections is not None and self.connections.criterion != "l1":
            raise RecipeError(
                'Recipe.recovery prunes connections gradually by magnitude: use ConnectionPruning(criterion="l1")'
            )

    def _check_search(self) -> None:
        """The search decides channels, blocks and formats itself; recovery may train after it."""
        if self.speedup is not None and self.quality is not None:
            raise RecipeError("Recipe.speedup and Recipe.quality are two ways to ask the search: give one")
        stated = [
            name for name in ("channels", "connections", "blocks", "prior", "quantize") if getattr(self, name)
        ]
        if stated:
            raise RecipeError(
                f"Recipe.speedup/quality searches what {', '.join(stated)} would fix by hand: drop "
                "them (Recipe(search=SpeedSearch(...)) sets what the search may choose)"
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
        """Build from plain data (a parsed TOML file): each section's table becomes its options class."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a table of Recipe fields, got {type(data).__name__}")
        for key in _SECTIONS:
            if key in data and not isinstance(data[key], Mapping):
                raise RecipeError(f"Recipe.{key} must be a table of options, got {data[key]!r}")
        return Recipe(**data)


_SECTIONS = ("channels", "connections", "blocks", "recovery", "prior", "quantize", "search")
