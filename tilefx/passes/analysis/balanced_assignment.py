"""Balanced assignment: ``n`` points into ``k`` groups of exactly ``n / k``, at least total cost.

:func:`balanced_groups` returns what ``scipy.optimize.linear_sum_assignment`` on the cost matrix
with every column repeated ``n / k`` times returns (as groups), in a fraction of its time: that
solver works on the ``n × n`` matrix, here the ``k`` groups are the nodes.

How. Successive shortest paths over groups: every point first goes to its cheapest group while
that has room (optimal for the points placed so far); each remaining point then enters along the
cheapest path of moves ``a → h`` (a member of group ``a`` moves to group ``h``, at the least
``cost[r, h] − cost[r, a]`` over ``a``'s members) that ends in a group with room, found by
Bellman–Ford on the ``k × k`` move costs (some are negative; no cycle is).

Why the result is the one scipy gives. Two balanced assignments differ by cycles of such moves, so
an assignment whose every cycle of moves costs more than ``margin`` is the unique optimum, and
by more than the rounding error of either solver: scipy's answer has the same groups. That is
checked (Floyd–Warshall over the ``k × k`` move costs) on every result; where it fails (a tie, as
with two identical points, or any doubt) the answer *is* scipy's, computed the slow way.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["balanced_groups"]


def balanced_groups(cost: np.ndarray, size: int) -> np.ndarray:
    """Group of every row of ``cost`` (n × k, n = k · size): scipy's balanced assignment, fast."""
    n, k = cost.shape
    if n != k * size or not np.isfinite(cost).all():
        raise ValueError(
            f"balanced_groups: {n} rows do not fill {k} groups of {size}, or costs are not finite"
        )
    group = _shortest_paths(cost, size)
    if group is not None and _cheapest_cycle(cost, group, size) > _margin(cost):
        return group
    return _scipy_groups(cost, size)


def _scipy_groups(cost: np.ndarray, size: int) -> np.ndarray:
    rows, slots = linear_sum_assignment(np.repeat(cost, size, axis=1))
    group = np.empty(len(cost), dtype=np.int64)
    group[rows] = slots // size
    return group


def _margin(cost: np.ndarray) -> float:
    """Far above the rounding error of either solver (about ``n² · ε`` of the largest cost)."""
    n = len(cost)
    return 16.0 * n * n * float(np.finfo(np.float64).eps) * max(float(np.abs(cost).max()), 1e-300)


def _shortest_paths(cost: np.ndarray, size: int) -> np.ndarray | None:
    """An optimal balanced assignment, or None if rounding confused the search (then scipy decides)."""
    n, k = cost.shape
    nearest = cost.argmin(axis=1)
    group = np.full(n, -1, dtype=np.int64)
    first = _rank_within(nearest) < size  # each group takes its first ``size`` nearest points
    group[first] = nearest[first]
    moves = _Moves(cost, group)
    room = size - np.bincount(group[first], minlength=k)
    for i in np.flatnonzero(~first):
        path = moves.cheapest_path(int(i), room > 0)
        if path is None:
            return None
        moves.apply(path)
        room[path[-1][2]] -= 1
    return group


class _Moves:
    """The cheapest move from each group to each other: ``into[h, a]`` costs moving ``who[h, a]`` from ``a`` to ``h``.

    Stored by destination so that a Bellman–Ford round reads contiguous rows.
    """

    def __init__(self, cost: np.ndarray, group: np.ndarray) -> None:
        self.cost, self.group = cost, group
        k = cost.shape[1]
        self.into = np.full((k, k), np.inf)
        self.who = np.zeros((k, k), dtype=np.int64)
        self._through = np.empty((k, k))
        for a in range(k):
            self._refresh(a)

    def cheapest_path(self, i: int, open_: np.ndarray) -> list[tuple[int, int, int]] | None:
        """Moves ``(row, from, to)`` that place row ``i`` at least cost, ending in an ``open_`` group."""
        k = len(open_)
        dist, via = self.cost[i].copy(), np.full(k, -1)
        every = np.arange(k)
        for _ in range(k):  # Bellman–Ford: the move costs may be negative
            through = np.add(self.into, dist, out=self._through)  # [h, a]: reach a, then move a -> h
            src = through.argmin(axis=1)
            best = through[every, src]
            shorter = np.flatnonzero(best < dist)
            if not len(shorter):
                break
            dist[shorter], via[shorter] = best[shorter], src[shorter]
        else:
            return None  # no fixed point in k rounds: a (rounding) negative cycle
        ends = np.flatnonzero(open_)
        h = int(ends[dist[ends].argmin()])
        path: list[tuple[int, int, int]] = []
        while via[h] != -1:
            a = int(via[h])
            path.append((int(self.who[h, a]), a, h))
            h = a
            if len(path) > k:
                return None
        path.append((i, -1, h))
        return path[::-1]

    def apply(self, path: list[tuple[int, int, int]]) -> None:
        for row, _, to in path:
            self.group[row] = to
        for a in {g for _, src, dst in path for g in (src, dst) if g >= 0}:
            self._refresh(a)

    def _refresh(self, a: int) -> None:
        rows = np.flatnonzero(self.group == a)
        if not len(rows):
            self.into[:, a] = np.inf
            return
        delta = self.cost[rows] - self.cost[rows, a][:, None]
        best = delta.argmin(axis=0)
        self.into[:, a] = delta[best, np.arange(len(best))]
        self.who[:, a] = rows[best]
        self.into[a, a] = np.inf


def _cheapest_cycle(cost: np.ndarray, group: np.ndarray, size: int) -> float:
    """The least cost of any cycle of moves from ``group`` (negative: not optimal); -inf if not balanced."""
    n, k = cost.shape
    if (np.bincount(group, minlength=k) != size).any():
        return -np.inf
    delta = cost - cost[np.arange(n), group][:, None]
    w = delta[np.argsort(group, kind="stable")].reshape(k, size, k).min(axis=1)
    np.fill_diagonal(w, np.inf)
    for m in range(k):
        np.minimum(w, w[:, m : m + 1] + w[m : m + 1, :], out=w)
    return float(np.diagonal(w).min())


def _rank_within(labels: np.ndarray) -> np.ndarray:
    """Each entry's rank among the entries with its label, in index order."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    rank_sorted = np.arange(len(labels)) - np.repeat(starts, np.diff(np.r_[starts, len(labels)]))
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = rank_sorted
    return rank
