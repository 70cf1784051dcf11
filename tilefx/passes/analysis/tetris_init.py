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
  (helps thin blocks such as (16, 1), where only the row grouping matters); with ``sketch_dims``
  the k-means runs on a random projection of the profiles (:func:`sketched_centres`: faster, a
  different start);
- ``"grow"``: greedy constructive co-clustering of both axes of a 2-d problem
  (:mod:`.tetris_grow`; helps square blocks); where it does not apply it falls back to "profile";
- ``"auto"``: "grow" where it applies, else "cluster".

Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from tilefx.errors import RecipeError

from .balanced_assignment import balanced_groups
from .block_selection import block_sums
from .tetris_grow import grown_orders
from .tetris_problem import Problem

__all__ = [
    "Start",
    "cluster_order",
    "initial_orders",
    "kmeans_centres",
    "norm_order",
    "profile_order",
    "sketched_centres",
    "warm_started",
]

Start = Literal["identity", "norm", "profile", "cluster", "grow", "auto"]


def initial_orders(
    problem: Problem,
    start: Start,
    seed: int,
    done: Callable[[int], object] | None = None,
    sketch_dims: int = 0,
) -> dict[Hashable, np.ndarray]:
    """Every variable's starting order (see the module docstring for each ``start``).

    ``done(count)`` is told how many variables have their order, as they get it (a progress bar).
    ``sketch_dims``: see :func:`cluster_order`.
    """
    grown = grown_orders(problem) if start in ("grow", "auto") else None
    if grown is not None:
        if done is not None:
            done(len(problem.uses))
        return grown
    orders = {}
    for var in problem.uses:
        orders[var] = _variable_order(problem, var, start, seed, sketch_dims)
        if done is not None:
            done(1)
    return orders


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


def _variable_order(problem: Problem, var: Hashable, start: Start, seed: int, sketch_dims: int) -> np.ndarray:
    n = problem.lengths[var]
    uses = problem.uses[var]
    if start == "identity":
        return np.arange(n)
    if start == "norm":
        return norm_order([(problem.segment(u, n), u.axis) for u in uses], n)
    profiles = [(problem.segment(u, n), u.axis, problem.sizes[u.operand]) for u in uses]
    if start in ("cluster", "auto"):
        return cluster_order(profiles, n, problem.sizes[uses[0].operand][uses[0].axis], seed, sketch_dims)
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
    magnitudes: Sequence[tuple[np.ndarray, int, Sequence[int]]],
    n: int,
    block: int,
    seed: int,
    sketch_dims: int = 0,
) -> np.ndarray:
    """Balanced k-means of the slices' block-magnitude profiles into ``n // block`` groups of ``block``.

    k-means (:func:`kmeans_centres`, two seeded runs) gives centroids; an exact balanced assignment
    on squared distances (:func:`.balanced_assignment.balanced_groups`: what
    ``linear_sum_assignment`` gives with each centroid offered ``block`` times) makes every group
    exactly one block; groups are laid out in centroid order, each group's slices in their original
    order. With ``0 < sketch_dims <`` the profiles' length, the centroids come from
    :func:`sketched_centres` instead (approximate: other centroids, so another start).
    """
    groups = n // block
    if groups < 2 or n % block:
        return profile_order(magnitudes, n)
    profiles = np.concatenate([_profile(m, axis, sizes)[:n] for m, axis, sizes in magnitudes], axis=1)
    if 0 < sketch_dims < profiles.shape[1]:
        centres = sketched_centres(profiles, groups, seed, sketch_dims)
    else:
        centres = kmeans_centres(profiles, groups, seed)
    cost = _squared_distances(profiles, _norms(profiles), centres)
    group = balanced_groups(cost, block)
    return np.lexsort((np.arange(n), group)).astype(np.int64)


def kmeans_centres(
    points: np.ndarray, k: int, seed: int, *, runs: int = 2, max_iters: int = 300, tol: float = 1e-4
) -> np.ndarray:
    """``k`` centroids of ``points`` (rows): the lowest-inertia of ``runs`` seeded k-means runs.

    Each run seeds by greedy k-means++ and iterates Lloyd's algorithm until the centroids move less
    than ``tol`` × the points' mean variance (squared, summed), as scikit-learn's ``KMeans`` does;
    an emptied cluster restarts at the point farthest from its centroid. Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    threshold = tol * float(points.var(axis=0).mean())
    norms = _norms(points)
    fits = [
        _lloyd(points, norms, _plus_plus(points, norms, k, rng), max_iters, threshold) for _ in range(runs)
    ]
    return min(fits, key=lambda fit: fit[1])[0]


def sketched_centres(points: np.ndarray, k: int, seed: int, dims: int) -> np.ndarray:
    """``k`` centroids of ``points`` from :func:`kmeans_centres` on a ``dims``-wide sketch of them.

    The sketch is a seeded Gaussian random projection (it keeps squared distances to a relative
    error of about ``√(2/dims)``: Johnson–Lindenstrauss), so every k-means step reads ``dims``
    numbers per point instead of all of them; each centroid is then the mean of the points whose
    sketch is nearest its sketched centroid (an emptied one: the point nearest it).
    """
    rng = np.random.default_rng(seed)
    sketch = points @ (rng.standard_normal((points.shape[1], dims)) / np.sqrt(dims))
    centres = kmeans_centres(sketch, k, seed)
    distances = _squared_distances(sketch, _norms(sketch), centres)
    labels = distances.argmin(axis=1)
    members = np.zeros((k, len(points)))
    members[labels, np.arange(len(points))] = 1.0
    counts = members.sum(axis=1)
    full = members @ points / np.maximum(counts, 1.0)[:, None]
    empty = np.flatnonzero(counts == 0)
    full[empty] = points[distances[:, empty].argmin(axis=0)]
    return full


def _plus_plus(points: np.ndarray, norms: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++: each new centre is the best of a few distance²-weighted candidates."""
    trials = 2 + int(np.log(k))
    centres = np.empty((k, points.shape[1]))
    centres[0] = points[rng.integers(len(points))]
    closest = _squared_distances(points, norms, centres[:1])[:, 0]
    for c in range(1, k):
        drawn = np.searchsorted(np.cumsum(closest), rng.random(trials) * closest.sum())
        candidates = np.minimum(drawn, len(points) - 1)
        reach = np.minimum(closest, _squared_distances(points, norms, points[candidates]).T)
        pick = int(reach.sum(axis=1).argmin())
        centres[c], closest = points[candidates[pick]], reach[pick]
    return centres


def _lloyd(
    points: np.ndarray, norms: np.ndarray, centres: np.ndarray, max_iters: int, threshold: float
) -> tuple[np.ndarray, float]:
    """Lloyd iterations from ``centres``: the final centroids and their inertia."""
    k = len(centres)
    for _ in range(max_iters):
        distances = _squared_distances(points, norms, centres)
        labels = distances.argmin(axis=1)
        members = np.zeros((k, len(points)))
        members[labels, np.arange(len(points))] = 1.0
        counts = members.sum(axis=1)
        moved = members @ points / np.maximum(counts, 1.0)[:, None]
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            far = np.argsort(-distances[np.arange(len(points)), labels], kind="stable")[: len(empty)]
            moved[empty] = points[far]
        shift = float(((moved - centres) ** 2).sum())
        centres = moved
        if shift <= threshold:
            break
    return centres, float(_squared_distances(points, norms, centres).min(axis=1).sum())


def _squared_distances(points: np.ndarray, norms: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``‖points[i] − centres[j]‖²`` for every pair, from ``norms = ‖points[i]‖²`` (no n×k×d temporary)."""
    squared = norms[:, None] - 2 * (points @ centres.T) + _norms(centres)[None, :]
    return np.maximum(squared, 0.0)


def _norms(points: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", points, points)


def _profile(magnitude: np.ndarray, axis: int, sizes: Sequence[int]) -> np.ndarray:
    others = [b if a != axis else 1 for a, b in enumerate(sizes)]
    reduced = block_sums(magnitude, others)
    rows = np.moveaxis(reduced, axis, 0).reshape(reduced.shape[axis], -1)
    return rows / np.maximum(rows.sum(axis=1, keepdims=True), 1e-300)
