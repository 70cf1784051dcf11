"""Small helpers for editing ATen-level graphs: resolving get_attr tensors and owning modules,
and the op sets several passes recognise."""

from __future__ import annotations

import difflib
import itertools

import torch
import torch.fx

from tilefx.errors import RecipeError

__all__ = [
    "BATCH_NORM",
    "BATCH_NORMS",
    "attr_tensor",
    "check_state_names",
    "matches_state_name",
    "get_attr_users",
    "param_node",
    "set_attr_tensor",
    "unique_attr_name",
]

aten = torch.ops.aten

BATCH_NORM = aten.batch_norm.default
"""The batch norm of captured graphs (``torch.export``'s ATen IR): the op that passes rewrite,
with arguments ``(x, γ, β, running_mean, running_var, training, momentum, eps, cudnn)``."""

BATCH_NORMS = frozenset(
    {
        BATCH_NORM,
        aten._native_batch_norm_legit_no_training.default,
        aten._native_batch_norm_legit.default,
        aten.native_batch_norm.default,
    }
)
"""Every ATen form of batch norm (decomposed graphs carry the others, as tuples): for analyses
that only read γ, which is argument 1 in each."""


def attr_tensor(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer a get_attr target names."""
    owner, _, name = target.rpartition(".")
    value = getattr(gm.get_submodule(owner) if owner else gm, name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"get_attr target {target!r} is not a tensor")
    return value


def set_attr_tensor(gm: torch.fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace (or create) the parameter/buffer ``target``, keeping its kind (parameter vs buffer)."""
    owner_name, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if name in owner._buffers:
        owner._buffers[name] = value.detach()
        return
    old = owner._parameters.get(name)
    requires_grad = old.requires_grad if old is not None else False
    if hasattr(owner, name) and old is None:
        delattr(owner, name)
    owner.register_parameter(name, torch.nn.Parameter(value.detach(), requires_grad=requires_grad))


def unique_attr_name(gm: torch.fx.GraphModule, wanted: str) -> str:
    """``wanted`` if free, else ``wanted_1``, ``wanted_2``, ..."""
    candidate, i = wanted, 0
    while _exists(gm, candidate):
        i += 1
        candidate = f"{wanted}_{i}"
    return candidate


def _exists(gm: torch.fx.GraphModule, target: str) -> bool:
    owner_name, _, name = target.rpartition(".")
    try:
        owner = gm.get_submodule(owner_name) if owner_name else gm
    except AttributeError:
        return False
    return hasattr(owner, name)


def param_node(arg: object) -> str | None:
    """The get_attr target feeding an argument, or None if the argument is computed or a constant."""
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        return str(arg.target)
    return None


def get_attr_users(gm: torch.fx.GraphModule, target: str) -> list[torch.fx.Node]:
    """Every node reading ``target`` through any get_attr node (weights may be read twice)."""
    return [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == target for u in n.users]


def matches_state_name(name: str, entry: str) -> bool:
    """Whether parameter or buffer ``name`` is ``entry`` or lies under the module path ``entry``."""
    return name == entry or name.startswith(entry.rstrip(".") + ".")


def check_state_names(gm: torch.nn.Module, entries: tuple[str, ...], option: str) -> None:
    """Raise ``RecipeError`` for an entry of ``option`` that names no parameter or buffer of ``gm``
    (nor a module holding one): a typo there would silently select nothing."""
    names = [name for name, _ in itertools.chain(gm.named_parameters(), gm.named_buffers())]
    for entry in entries:
        if any(matches_state_name(name, entry) for name in names):
            continue
        prefixes = {".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 2)}
        close = difflib.get_close_matches(entry, sorted(prefixes), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; it takes parameter names or their prefixes"
        raise RecipeError(f"{option}: {entry!r} matches no parameter of the model{hint}")
