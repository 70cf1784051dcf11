"""Starting orders for the TETRIS EM (extensions; the authors start from the identity).

:func:`initial_orders` gives every variable of a :class:`~.tetris_problem.Problem` its start:

- ``"identity"``: the authors' start;
- ``"norm"``: :func:`norm_order`, slices sorted by decreasing L1 norm (summed over the variable's
  uses). For magnitudes close to ``r_i · c_j`` (outlier rows/columns) this gathers the large weights
  in one corner;
- ``"profile"``: :func:`profile_order`, spectral seriation: slices sorted by the leading left
  singular vector of their centred, normalised block-magnitude profile, so slices whose large
  weights sit in the same blocks end up next to each other;
- ``"cluster"``: :func:`cluster_order`, balanced k-means of those profiles, one cluster per block
  (helps thin blocks such as (16, 1), where only the row grouping matters);
- ``"grow"``: greedy constructive co-clustering of both axes of a 2-d problem
  (:mod:`.tetris_grow`; helps square blocks); where it does not apply it falls back to "profile";
- ``"auto"``: "grow" where it applies, else "cluster".

Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from ..infra.errors import RecipeError
from .block_selection import block_sums
from .tetris_grow import grown_orders
from .tetris_problem import Problem

__all__ = ["Start", "cluster_order", "initial_orders", "norm_order", "profile_order", "warm_started"]

Start = Literal["identity", "norm", "profile", "cluster", "grow", "auto"]


def initial_orders(problem: Problem, start: Start, seed: int) -> dict[Hashable, np.ndarray]:
    """Every variable's starting order (see the module docstring for each ``start``)."""
    grown = grown_orders(problem) if start in ("grow", "auto") else None
    if grown is not None:
        return grown
    return {var: _variable_order(problem, var, start, seed) for var in problem.uses}


def warm_started(
    problem: Problem, orders: dict[Hashable, np.ndarray], given: Mapping[Hashable, torch.Tensor]
) -> dict[Hashable, np.ndarray]:
    """``orders`` with the caller's ``given`` orders in place of theirs (each must be a bijection)."""
    for var, order in given.items():
        array = np.asarray(torch.as_tensor(order).cpu(), dtype=np.int64)
        if var not in orders or sorted(array.tolist()) != list(range(problem.lengths[var])):
            raise RecipeError(f"initial order for {var!r} is not a bijection of a known variable")
        orders[var] = array
    return orders


def _variable_order(problem: Problem, var: Hashable, start: Start, seed: int) -> np.ndarray:
    n = problem.lengths[var]
    uses = problem.uses[var]
    if start == "identity":
        return np.arange(n)
    if start == "norm":
        return norm_order([(problem.segment(u, n), u.axis) for u in uses], n)
    profiles = [(problem.segment(u, n), u.axis, problem.sizes[u.operand]) for u in uses]
    if start in ("cluster", "auto"):
        return cluster_order(profiles, n, problem.sizes[uses[0].operand][uses[0].axis], seed)
    return profile_order(profiles, n)  # "profile", and "grow" where it does not apply


def norm_order(magnitudes: Sequence[tuple[np.ndarray, int]], n: int) -> np.ndarray:
    """Order of the first ``n`` slices by decreasing L1 norm summed over ``(magnitude, axis)`` uses."""
    norms = sum(np.moveaxis(m, axis, 0).reshape(m.shape[axis], -1).sum(axis=1)[:n] for m, axis in magnitudes)
    return np.argsort(-np.asarray(norms), kind="stable")


def profile_order(magnitudes: Sequence[tuple[np.ndarray, int, Sequence[int]]], n: int) -> np.ndarray:
    """Spectral order of the first ``n`` slices by their block-magnitude profiles over all uses."""
    profiles = np.concatenate([_profile(m, axis, sizes)[:n] for m, axis, sizes in magnitudes], axis=1)
    centred = profiles - profiles.mean(axis=0, keepdims=True)
    if not centred.any():
        return np.arange(n)
    u, _, _ = np.linalg.svd(centred, full_matrices=False)
    lead = u[:, 0] * np.sign(u[np.argmax(np.abs(u[:, 0])), 0])
    return np.argsort(lead, kind="stable")


def cluster_order(
    magnitudes: Sequence[tuple[np.ndarray, int, Sequence[int]]], n: int, block: int, seed: int
) -> np.ndarray:
    """Balanced k-means of the slices' block-magnitude profiles into ``n // block`` groups of ``block``.

    k-means (scikit-learn, ``n_init=2``, seeded) gives centroids; an exact balanced assignment
    (``linear_sum_assignment`` on squared distances, each centroid offered ``block`` times) makes
    every group exactly one block; groups are then laid out in order of decreasing profile mass.
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    groups = n // block
    if groups < 2 or n % block:
        return profile_order(magnitudes, n)
    profiles = np.concatenate([_profile(m, axis, sizes)[:n] for m, axis, sizes in magnitudes], axis=1)
    centres = KMeans(n_clusters=groups, n_init=2, random_state=seed).fit(profiles).cluster_centers_
    cost = ((profiles[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    rows, slots = linear_sum_assignment(np.repeat(cost, block, axis=1))
    group = np.empty(n, dtype=np.int64)
    group[rows] = slots // block
    return np.lexsort((np.arange(n), group)).astype(np.int64)


def _profile(magnitude: np.ndarray, axis: int, sizes: Sequence[int]) -> np.ndarray:
    others = [b if a != axis else 1 for a, b in enumerate(sizes)]
    reduced = block_sums(magnitude, others)
    rows = np.moveaxis(reduced, axis, 0).reshape(reduced.shape[axis], -1)
    return rows / np.maximum(rows.sum(axis=1, keepdims=True), 1e-300)
