"""``tilefx.compress_gan``: self-supervised GAN compression, ending in a graph ``tilefx.compile`` takes.

The training (``passes.training.gan_compression``) gives a sparse copy of the generator. This
module captures it and hands its sparsity to the rest of the pipeline:

- element granularity: every pruned weight gets a ``BlockSparsity((1, 1), mask)`` record, so
  lowering runs it as a 1×1-block BSR kernel (its zeros stay exact);
- filter granularity: ``PruneChannelsPass`` with the criterion "zeroed_filters" physically removes
  every dropped output channel (and the matching inputs of its consumers), verified against the
  masked generator; the result is a smaller dense model with nothing block-sparse left to lower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from tilefx.gan_training import (
    GANCompressionOptions,
    GANCompressionResult,
    compress_generator,
)
from tilefx.passes.analysis.channel_groups import ChannelGroupsAnalysis
from tilefx.passes.analysis.importance import ChannelImportance
from tilefx.passes.infra.manager import PassManager
from tilefx.passes.metadata import get_metadata, set_metadata
from tilefx.passes.prune_channels import PruneChannelsPass

from .graph_capture import capture

__all__ = ["CompressedGAN", "compress_gan", "generator_graph"]


@dataclass(frozen=True)
class CompressedGAN:
    """graph_module: the compressed generator, captured, ready for ``tilefx.compile``.
    training: the trained copies (``G_C`` in torch, masked; the adapted discriminator) and masks."""

    graph_module: torch.fx.GraphModule
    training: GANCompressionResult


def compress_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    real: Iterable[torch.Tensor],
    latent: Callable[[int], torch.Tensor],
    options: GANCompressionOptions,
    example_inputs: Sequence[Any],
    *,
    tolerance: float = 1e-5,
) -> CompressedGAN:
    """Compress ``generator`` with SSGAC against ``discriminator``, then capture it for lowering.

    real: batches of real samples; latent: ``latent(n)`` draws ``n`` generator inputs;
    example_inputs: generator inputs to capture with. The caller's modules are never mutated.
    Raises ``RecipeError`` for bad options, ``CaptureError`` when the generator cannot be captured.
    """
    result = compress_generator(generator, discriminator, real, latent, options)
    return CompressedGAN(generator_graph(result, example_inputs, tolerance=tolerance), result)


def generator_graph(
    result: GANCompressionResult, example_inputs: Sequence[Any], *, tolerance: float = 1e-5
) -> torch.fx.GraphModule:
    """``result.generator`` captured, with its sparsity recorded (element) or removed (filter)."""
    gm = capture(result.generator, example_inputs)
    if result.granularity == "filter":
        shrink = PruneChannelsPass(
            ratio=0.0, scores=ChannelImportance(ChannelGroupsAnalysis(), criterion="zeroed_filters")
        )
        inputs = tuple(example_inputs) if not isinstance(example_inputs, torch.Tensor) else (example_inputs,)
        return PassManager([shrink], tolerance=tolerance).run(gm, inputs).graph_module
    metadata = get_metadata(gm)
    for name, record in result.masks.items():
        metadata = metadata.with_annotation(name, record)
    set_metadata(gm, metadata)
    return gm
