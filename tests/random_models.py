"""Random small models for property tests: specs hypothesis draws and shrinks, built into modules.

A spec is plain frozen data whose ``repr`` is the Python that rebuilds it, so a failing example
shrinks to something a regression test can quote verbatim. Every spec builds: a layer that does
not fit the shape it meets is adapted (a stride on a 1×1 map becomes 1, a group count that does
not divide becomes 1), never rejected, so shrinking never leaves the space of valid models.

Layers are stage-agnostic: the same ``Linear`` is a linear map on tokens and a channels-last
linear (permute, linear, permute back) on images, so one strategy covers every stage. The
op families are those the channel handlers cover: linear; conv (grouped, depthwise, dilated,
strided); batch and layer norm; residual add; concatenation along channels or another dim;
split and chunk; reshape, flatten and permute; attention through
``scaled_dot_product_attention``; element-wise activations and per-channel affine parameters;
pooling; token mixing (a linear over the token dim).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

__all__ = [
    "ACTIVATIONS",
    "LOWERABLE",
    "Act",
    "Affine",
    "Attention",
    "BatchNorm",
    "Concat",
    "Conv",
    "GeneratedModel",
    "Layer",
    "LayerNorm",
    "Linear",
    "ModelSpec",
    "Pool",
    "Residual",
    "Split",
    "TokenMix",
    "build",
    "layers",
    "model_specs",
]

ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "leaky_relu", "elu")
Stage = Literal["image", "tokens", "vector"]


@dataclass(frozen=True)
class Conv:
    """A 2-D conv on images (``groups=0``: depthwise, ``out`` then counts per input channel);
    a linear map on tokens and vectors."""

    out: int = 8
    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    same: bool = True  # "same" padding; else none (the map shrinks)
    bias: bool = True


@dataclass(frozen=True)
class Linear:
    out: int = 8
    bias: bool = True


@dataclass(frozen=True)
class BatchNorm:
    pass


@dataclass(frozen=True)
class LayerNorm:
    pass


@dataclass(frozen=True)
class Act:
    kind: str = "relu"


@dataclass(frozen=True)
class Affine:
    """``x · γ + β`` with per-channel parameters (layer scale): a parameter broadcast over channels."""

    bias: bool = True


@dataclass(frozen=True)
class Pool:
    kind: Literal["max", "avg"] = "max"
    halve: bool = True  # kernel 2 stride 2; else kernel 3 stride 1 padding 1


@dataclass(frozen=True)
class Attention:
    """Multi-head self-attention via ``F.scaled_dot_product_attention``; on images over H·W positions."""

    heads: int = 2
    head_dim: int = 4
    fused: bool = False  # one qkv linear chunked in three, else three linears
    causal: bool = False
    project: bool = True  # output projection back to the input width


@dataclass(frozen=True)
class TokenMix:
    """A linear over the token dim (transpose, linear, transpose back), MLP-Mixer style."""


@dataclass(frozen=True)
class Residual:
    """``body(x) + shortcut(x)``; with ``project`` the body may change the channel count and the
    shortcut is a 1×1 conv / linear projection."""

    body: tuple[Layer, ...] = ()
    project: bool = False


@dataclass(frozen=True)
class Concat:
    """Branches of the same input concatenated along channels, or along the spatial/token dim."""

    branches: tuple[tuple[Layer, ...], ...] = ((), ())
    along_channels: bool = True


@dataclass(frozen=True)
class Split:
    """The channels split into parts, each through its body, concatenated again. ``how``:
    ``"chunk"`` into ``len(bodies)`` parts, ``"sizes"`` (``split`` with the first part one channel
    wide), ``"slices"`` (``x[:, :k]`` and ``x[:, k:]``, the first part one channel wide)."""

    bodies: tuple[tuple[Layer, ...], ...] = ((), ())
    how: Literal["chunk", "sizes", "slices"] = "chunk"


Layer = (
    Conv
    | Linear
    | BatchNorm
    | LayerNorm
    | Act
    | Affine
    | Pool
    | Attention
    | TokenMix
    | Residual
    | Concat
    | Split
)


@dataclass(frozen=True)
class ModelSpec:
    """Input ``[batch, channels, size, size]`` (``image``) or ``[batch, size, channels]`` (tokens);
    ``first`` layers; a reshape (``"tokens"``: images become H·W tokens, ``"mean"``/``"pool"``/
    ``"flatten"``: a vector); ``second`` layers; a linear head with ``outputs`` features."""

    image: bool = True
    channels: int = 4
    size: int = 6
    first: tuple[Layer, ...] = ()
    reshape: Literal["tokens", "mean", "pool", "flatten"] = "mean"
    second: tuple[Layer, ...] = ()
    outputs: int = 3
    batch: int = 2
    seed: int = 0


@dataclass(frozen=True)
class Shape:
    stage: Stage
    channels: int
    size: int  # H = W for images, tokens for tokens, 0 for vectors


@dataclass(frozen=True)
class Keep:
    """What a layer must preserve (inside a residual body, a split part, or a concat along a dim)."""

    channels: bool = False
    size: bool = False


# ----------------------------------------------------------------------------------------------
# Modules the builder assembles (each one forward, shapes fixed at construction)


class ChannelsLast(nn.Module):
    """Apply a last-dim module to the channels of an image: permute, apply, permute back."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Transposed(nn.Module):
    """Apply a channels-first module to tokens ``[N, T, C]`` through a transpose."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.transpose(1, 2)).transpose(1, 2)


class Activation(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn: Callable[[torch.Tensor], torch.Tensor] = getattr(F, self.kind)
        return fn(x)


class AffineOp(nn.Module):
    def __init__(self, channels: int, stage: Stage, bias: bool) -> None:
        super().__init__()
        shape = (channels, 1, 1) if stage == "image" else (channels,)
        self.scale = nn.Parameter(torch.ones(shape))
        self.shift = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.scale
        return y + self.shift if self.shift is not None else y


class SelfAttention(nn.Module):
    def __init__(self, width: int, spec: Attention, out: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.causal = spec.heads, spec.head_dim, spec.causal
        inner = spec.heads * spec.head_dim
        self.qkv = nn.Linear(width, 3 * inner) if spec.fused else None
        self.q, self.k, self.v = (
            (None, None, None) if spec.fused else (nn.Linear(width, inner) for _ in "qkv")
        )
        self.proj = nn.Linear(inner, out) if spec.project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        if self.qkv is not None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            assert self.q is not None and self.k is not None and self.v is not None
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (a.reshape(n, t, self.heads, self.head_dim).transpose(1, 2) for a in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        y = y.transpose(1, 2).reshape(n, t, self.heads * self.head_dim)
        return self.proj(y) if self.proj is not None else y


class OverPositions(nn.Module):
    """Run a token module over an image's H·W positions: flatten, transpose, apply, reshape back."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        y = self.inner(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(n, -1, h, w)


class ResidualOp(nn.Module):
    def __init__(self, body: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ConcatOp(nn.Module):
    def __init__(self, branches: Sequence[nn.Module], dim: int) -> None:
        super().__init__()
        self.branches, self.dim = nn.ModuleList(branches), dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=self.dim)


class SplitOp(nn.Module):
    """Parts of ``x`` along ``dim`` (see :class:`Split`), each through its body, concatenated."""

    def __init__(
        self, bodies: Sequence[nn.Module], how: str, sizes: Sequence[int], chunks: int, dim: int
    ) -> None:
        super().__init__()
        self.bodies, self.how, self.sizes, self.chunks, self.dim = (
            nn.ModuleList(bodies),
            how,
            list(sizes),
            chunks,
            dim,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "chunk":
            parts = x.chunk(self.chunks, self.dim)
        elif self.how == "sizes":
            parts = x.split(self.sizes, self.dim)
        else:
            parts = tuple(x.narrow(self.dim, sum(self.sizes[:i]), n) for i, n in enumerate(self.sizes))
        return torch.cat([body(part) for body, part in zip(self.bodies, parts, strict=True)], dim=self.dim)


class Reshape(nn.Module):
    def __init__(self, kind: str, stage: Stage) -> None:
        super().__init__()
        self.kind, self.stage = kind, stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stage == "image":
            if self.kind == "tokens":
                return x.flatten(2).transpose(1, 2)
            if self.kind == "pool":
                return F.adaptive_avg_pool2d(x, 1).flatten(1)
            return x.mean((2, 3)) if self.kind == "mean" else x.flatten(1)
        if self.kind == "pool":
            return F.adaptive_avg_pool1d(x.transpose(1, 2), 1).flatten(1)
        return x.mean(1) if self.kind == "mean" else x.flatten(1)


class GeneratedModel(nn.Module):
    def __init__(self, first: nn.Module, reshape: nn.Module, second: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.first, self.reshape, self.second, self.head = first, reshape, second, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.reshape(self.first(x))))


# ----------------------------------------------------------------------------------------------
# Builder: spec + shape -> module + shape


def build(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model of ``spec`` in eval mode with seeded weights and statistics, and its example input."""
    shape = Shape("image" if spec.image else "tokens", spec.channels, spec.size)
    first, shape = _sequence(spec.first, shape, Keep())
    reshape, shape = _reshape(spec.reshape, shape)
    second, shape = _sequence(spec.second, shape, Keep())
    model = GeneratedModel(first, reshape, second, nn.Linear(shape.channels, spec.outputs)).eval()
    generator = torch.Generator().manual_seed(spec.seed)
    _initialise(model, generator)
    size = (spec.channels, spec.size, spec.size) if spec.image else (spec.size, spec.channels)
    x = torch.randn((spec.batch, *size), generator=generator)
    return model.to(dtype), (x.to(dtype),)


def _sequence(specs: Sequence[Layer], shape: Shape, keep: Keep) -> tuple[nn.Sequential, Shape]:
    modules = []
    for spec in specs:
        module, shape = _layer(spec, shape, keep)
        if module is not None:
            modules.append(module)
    return nn.Sequential(*modules), shape


def _layer(spec: Layer, shape: Shape, keep: Keep) -> tuple[nn.Module | None, Shape]:
    if isinstance(spec, Conv):
        return _conv(spec, shape, keep)
    if isinstance(spec, Linear):
        out = shape.channels if keep.channels else spec.out
        linear = nn.Linear(shape.channels, out, bias=spec.bias)
        return (ChannelsLast(linear) if shape.stage == "image" else linear), replace(shape, channels=out)
    if isinstance(spec, BatchNorm):
        return _batch_norm(shape), shape
    if isinstance(spec, LayerNorm):
        norm = nn.LayerNorm(shape.channels)
        return (ChannelsLast(norm) if shape.stage == "image" else norm), shape
    if isinstance(spec, Act):
        return Activation(spec.kind), shape
    if isinstance(spec, Affine):
        return AffineOp(shape.channels, shape.stage, spec.bias), shape
    if isinstance(spec, Pool):
        return _pool(spec, shape, keep)
    if isinstance(spec, Attention):
        return _attention(spec, shape, keep)
    if isinstance(spec, TokenMix):
        if shape.stage != "tokens":
            return None, shape
        return Transposed(nn.Linear(shape.size, shape.size)), shape
    if isinstance(spec, Residual):
        return _residual(spec, shape, keep)
    if isinstance(spec, Concat):
        return _concat(spec, shape, keep)
    return _split(spec, shape, keep)


def _conv(spec: Conv, shape: Shape, keep: Keep) -> tuple[nn.Module, Shape]:
    if shape.stage != "image":
        return _layer(Linear(spec.out, spec.bias), shape, keep)
    cin = shape.channels
    depthwise = spec.groups == 0
    out = cin * (1 if keep.channels else max(1, min(spec.out, 2))) if depthwise else spec.out
    out = cin if keep.channels else out
    groups = cin if depthwise else spec.groups if cin % spec.groups == 0 and out % spec.groups == 0 else 1
    kernel, dilation = spec.kernel | 1, spec.dilation  # odd kernels: "same" padding is symmetric
    reach = dilation * (kernel - 1)
    same = spec.same or keep.size or reach >= shape.size
    stride = 1 if keep.size or shape.size < 4 else spec.stride
    padding = reach // 2 if same else 0
    conv = nn.Conv2d(cin, out, kernel, stride, padding, dilation, groups, bias=spec.bias)
    size = (shape.size + 2 * padding - reach - 1) // stride + 1
    return conv, Shape("image", out, size)


def _batch_norm(shape: Shape) -> nn.Module:
    if shape.stage == "image":
        return nn.BatchNorm2d(shape.channels)
    norm = nn.BatchNorm1d(shape.channels)
    return Transposed(norm) if shape.stage == "tokens" else norm


def _pool(spec: Pool, shape: Shape, keep: Keep) -> tuple[nn.Module | None, Shape]:
    if shape.stage == "vector":
        return None, shape
    halve = spec.halve and not keep.size and shape.size >= 2
    kernel, stride, padding = (2, 2, 0) if halve else (3, 1, 1)
    image = shape.stage == "image"
    pool: nn.Module
    if spec.kind == "max":
        pool = nn.MaxPool2d(kernel, stride, padding) if image else nn.MaxPool1d(kernel, stride, padding)
    else:
        pool = nn.AvgPool2d(kernel, stride, padding) if image else nn.AvgPool1d(kernel, stride, padding)
    size = shape.size // 2 if halve else shape.size
    return (pool if image else Transposed(pool)), replace(shape, size=size)


def _attention(spec: Attention, shape: Shape, keep: Keep) -> tuple[nn.Module | None, Shape]:
    if shape.stage == "vector":
        return None, shape
    project = spec.project or keep.channels
    out = shape.channels if project else spec.heads * spec.head_dim
    attention = SelfAttention(shape.channels, replace(spec, project=project), out)
    return (OverPositions(attention) if shape.stage == "image" else attention), replace(shape, channels=out)


def _projection(shape: Shape, out: int) -> nn.Module:
    if shape.stage == "image":
        return nn.Conv2d(shape.channels, out, 1)
    return nn.Linear(shape.channels, out)


def _residual(spec: Residual, shape: Shape, keep: Keep) -> tuple[nn.Module, Shape]:
    project = spec.project and not keep.channels
    body, out = _sequence(spec.body, shape, Keep(channels=not project, size=True))
    shortcut = _projection(shape, out.channels) if out.channels != shape.channels else nn.Identity()
    return ResidualOp(body, shortcut), out


def _concat(spec: Concat, shape: Shape, keep: Keep) -> tuple[nn.Module, Shape]:
    # Along tokens only: images stay square, vectors have no other dim.
    along_channels = spec.along_channels or keep.size or shape.stage != "tokens"
    inner = Keep(channels=not along_channels, size=along_channels)
    built = [_sequence(branch, shape, inner) for branch in spec.branches or ((),)]
    shapes = [s for _, s in built]
    if along_channels:
        out = replace(shape, channels=sum(s.channels for s in shapes))
    else:
        out = replace(shape, size=sum(s.size for s in shapes))
    dim = 2 if shape.stage == "tokens" and along_channels else 1
    module: nn.Module = ConcatOp([m for m, _ in built], dim)
    if keep.channels and out.channels != shape.channels:
        module = nn.Sequential(module, _projection(out, shape.channels))
        out = replace(out, channels=shape.channels)
    return module, out


def _split(spec: Split, shape: Shape, keep: Keep) -> tuple[nn.Module, Shape]:
    parts = max(1, min(len(spec.bodies), shape.channels))
    if spec.how == "chunk":  # torch's rule: parts of ceil(C / parts), fewer parts if they run out
        step = math.ceil(shape.channels / parts)
        sizes = [min(step, shape.channels - i * step) for i in range(math.ceil(shape.channels / step))]
    else:  # uneven on purpose: the first part takes one channel
        sizes = [1, shape.channels - 1] if shape.channels > 1 and parts > 1 else [shape.channels]
    bodies = list(spec.bodies)[: len(sizes)]
    inner = Keep(channels=keep.channels, size=True)
    built = [
        _sequence(body, replace(shape, channels=c), inner) for body, c in zip(bodies, sizes, strict=True)
    ]
    out = replace(shape, channels=sum(s.channels for _, s in built))
    dim = 1 if shape.stage in ("image", "vector") else 2
    return SplitOp([m for m, _ in built], spec.how, sizes, parts, dim), out


def _reshape(kind: str, shape: Shape) -> tuple[nn.Module, Shape]:
    if kind == "tokens":
        if shape.stage == "image":
            return Reshape(kind, "image"), Shape("tokens", shape.channels, shape.size * shape.size)
        return nn.Identity(), shape
    if shape.stage == "vector":
        return nn.Identity(), shape
    if kind == "flatten":
        positions = shape.size * shape.size if shape.stage == "image" else shape.size
        return Reshape(kind, shape.stage), Shape("vector", shape.channels * positions, 0)
    return Reshape(kind, shape.stage), Shape("vector", shape.channels, 0)


def _initialise(model: nn.Module, generator: torch.Generator) -> None:
    """Unit-variance weights (so activations keep their scale), non-trivial norms and statistics."""

    def uniform(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                bound = math.sqrt(3.0 / p[0].numel())
                uniform(p, -bound, bound)
            elif name.endswith(("bias", "shift")):
                uniform(p, -0.5, 0.5)
            else:
                uniform(p, 0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                uniform(b, -0.5, 0.5)
            elif name.endswith("running_var"):
                uniform(b, 0.5, 2.0)


#: Lowering compiles a TVM kernel per distinct layer shape and block count (seconds each), so
#: lowering tests draw from this fixed catalogue, with widths blocks of 4 and 8 divide.
_TOKENS16 = ModelSpec(image=False, channels=16, size=4, outputs=8)
_IMAGE8 = ModelSpec(image=True, channels=8, size=8, outputs=8)
LOWERABLE: dict[str, ModelSpec] = {
    "ffn": replace(_TOKENS16, first=(Linear(32), Act("gelu"), Linear(16)), reshape="tokens"),
    "encoder": replace(
        _TOKENS16,
        first=(
            Residual((LayerNorm(), Attention(heads=2, head_dim=8))),
            Residual((LayerNorm(), Linear(32), Act("relu"), Linear(16))),
        ),
    ),
    "convnet": replace(
        _IMAGE8,
        first=(
            Conv(16, kernel=3, stride=2),
            BatchNorm(),
            Act("relu"),
            Residual((Conv(16, kernel=3, dilation=2), BatchNorm(), Act("relu"))),
            Conv(8, kernel=1, bias=False),
            Pool("max"),
        ),
        reshape="flatten",
    ),
    "separable": replace(
        _IMAGE8,
        first=(
            Conv(1, kernel=3, groups=0),
            Conv(16, kernel=1),
            Act("relu"),
            Split(((Conv(8, kernel=3),), ())),
        ),
        reshape="pool",
    ),
}

# ----------------------------------------------------------------------------------------------
# Strategies

_WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16)


def _leaf(image: bool) -> st.SearchStrategy[Layer]:
    """One layer; on an image stage convs are drawn as often as everything else together."""
    width = st.sampled_from(_WIDTHS)
    conv = st.builds(
        Conv,
        width,
        st.sampled_from((1, 3)),
        st.sampled_from((1, 2)),
        st.sampled_from((1, 2)),
        st.sampled_from((1, 2, 4, 0)),
        st.booleans(),
        st.booleans(),
    )
    others = st.one_of(
        st.builds(Act, st.sampled_from(ACTIVATIONS)),
        st.builds(Linear, width, st.booleans()),
        st.just(BatchNorm()),
        st.just(LayerNorm()),
        st.builds(Affine, st.booleans()),
        st.builds(Pool, st.sampled_from(("max", "avg")), st.booleans()),
        st.builds(
            Attention,
            st.sampled_from((1, 2, 4)),
            st.sampled_from((2, 4, 8)),
            st.booleans(),
            st.booleans(),
            st.booleans(),
        ),
        st.just(TokenMix()),
    )
    if not image:
        return others
    return st.booleans().flatmap(lambda pick_conv: conv if pick_conv else others)  # one_of would flatten


def layers(depth: int = 2, max_size: int = 4, image: bool = True) -> st.SearchStrategy[tuple[Layer, ...]]:
    """Sequences of layers; residual, concat and split nest up to ``depth`` levels."""
    if depth == 0:
        return st.lists(_leaf(image), max_size=max_size).map(tuple)
    inner = layers(depth - 1, max(1, max_size - 1), image)
    branches = st.lists(inner, min_size=1, max_size=3).map(tuple)
    nested = st.one_of(
        _leaf(image),
        st.builds(Residual, inner, st.booleans()),
        st.builds(Concat, branches, st.booleans()),
        st.builds(Split, branches, st.sampled_from(("chunk", "sizes", "slices"))),
    )
    return st.lists(nested, max_size=max_size).map(tuple)


def model_specs(
    widths: Sequence[int] = (3, 4, 8, 12, 16),
    sizes: Sequence[int] = (3, 4, 6, 8),
    depth: int = 2,
) -> st.SearchStrategy[ModelSpec]:
    return st.booleans().flatmap(
        lambda image: st.builds(
            ModelSpec,
            image=st.just(image),
            channels=st.sampled_from(tuple(widths)),
            size=st.sampled_from(tuple(sizes)),
            first=layers(depth, image=image),
            reshape=st.sampled_from(("mean", "tokens", "pool", "flatten")),
            second=layers(depth - 1, image=False),
            outputs=st.sampled_from((1, 3, 4)),
            batch=st.sampled_from((2, 1, 3)),
            seed=st.integers(0, 2**16),
        )
    )
