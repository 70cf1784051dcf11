"""Greedy growth: a constructive co-clustering start for one 2-d TETRIS problem (extension).

:func:`grow_orders` builds row and column orders for ``keep`` kept blocks one block at a time:
each step adds the most valuable kept block among (a) the best ``br×bc`` submatrix of
still-unplaced rows and columns (alternating top-k row/column selection, as in the LAS bicluster
search of Shabalin et al. 2009), (b) an existing row-block with the best ``bc`` unplaced columns,
(c) an existing column-block with the best ``br`` unplaced rows, or (d) a not-yet-kept cell between
existing row- and column-blocks. Unplaced rows/columns fill the remaining blocks in their original
order. It helps square blocks, where rows and columns must be grouped together. :func:`grown_orders`
applies it to a problem with one operand and a variable on each of its two block axes
(:meth:`~.tetris_problem.Problem.plane`), up to :data:`GROW_LIMIT` kept blocks. Pure numpy,
deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np

from .tetris_problem import Problem

__all__ = ["GROW_LIMIT", "grow_orders", "grown_orders"]

GROW_LIMIT = 2048  # most kept blocks the greedy growth is tried for (its cost grows with them)


def grown_orders(problem: Problem) -> dict[Hashable, np.ndarray] | None:
    """:func:`grow_orders` for a 2-d problem with a variable on both axes; None where it does not apply."""
    plane = problem.plane()
    if plane is None or None in plane.variables or not 0 < plane.keep <= GROW_LIMIT:
        return None
    row_var, col_var = plane.variables
    rows, cols = grow_orders(plane.a, *plane.block, plane.keep)
    return {
        row_var: rows[rows < problem.lengths[row_var]],
        col_var: cols[cols < problem.lengths[col_var]],
    }


def grow_orders(a: np.ndarray, br: int, bc: int, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column orders of the 2-d magnitude ``a`` from greedy kept-block growth (see module doc)."""
    grower = _Grower(a, br, bc)
    for _ in range(keep):
        if not grower.step():
            break
    return grower.orders()


_Move = tuple[float, Callable[[], None]]  # (value of the kept block it adds, apply it)


class _Grower:
    def __init__(self, a: np.ndarray, br: int, bc: int) -> None:
        self.a, self.br, self.bc = a, br, bc
        self.gr, self.gc = a.shape[0] // br, a.shape[1] // bc
        self.free_r = np.ones(a.shape[0], dtype=bool)
        self.free_c = np.ones(a.shape[1], dtype=bool)
        self.rows: list[np.ndarray] = []  # row-blocks placed so far
        self.cols: list[np.ndarray] = []
        self.row_profile = np.zeros((0, a.shape[1]))  # per row-block: column sums over its rows
        self.col_profile = np.zeros((0, a.shape[0]))  # per column-block: row sums over its columns
        self.kept = np.zeros((self.gr, self.gc), dtype=bool)
        self.cells = np.full((self.gr, self.gc), -np.inf)  # block sums between placed row/column-blocks

    def step(self) -> bool:
        moves = [
            m for m in (self._new(), self._extend_rows(), self._extend_cols(), self._old()) if m is not None
        ]
        if not moves:
            return False
        max(moves, key=lambda m: m[0])[1]()
        return True

    def _new(self) -> _Move | None:
        if len(self.rows) >= self.gr or len(self.cols) >= self.gc:
            return None
        rows, cols = np.flatnonzero(self.free_r), np.flatnonzero(self.free_c)
        r = rows[_top(self.a[np.ix_(rows, cols)].sum(axis=1), self.br)]
        for _ in range(20):
            c = cols[_top(self.a[np.ix_(r, cols)].sum(axis=0), self.bc)]
            r_next = rows[_top(self.a[np.ix_(rows, c)].sum(axis=1), self.br)]
            if np.array_equal(np.sort(r_next), np.sort(r)):
                break
            r = r_next
        value = float(self.a[np.ix_(r, c)].sum())
        return value, lambda: self._place(r, c)

    def _extend_rows(self) -> _Move | None:
        """An existing row-block gets a new column-block of its best unplaced columns."""
        if not self.rows or len(self.cols) >= self.gc:
            return None
        value, ri, cols = _best_extension(self.row_profile, self.free_c, self.bc)
        return value, lambda: self._place_col(ri, cols)

    def _extend_cols(self) -> _Move | None:
        """An existing column-block gets a new row-block of its best unplaced rows."""
        if not self.cols or len(self.rows) >= self.gr:
            return None
        value, ci, rows = _best_extension(self.col_profile, self.free_r, self.br)
        return value, lambda: self._place_row(ci, rows)

    def _old(self) -> _Move | None:
        cells = np.where(self.kept, -np.inf, self.cells)
        ri, ci = np.unravel_index(int(cells.argmax()), cells.shape)
        if not np.isfinite(cells[ri, ci]):
            return None
        return float(cells[ri, ci]), lambda: self._keep(int(ri), int(ci))

    def _add_rows(self, r: np.ndarray) -> int:
        self.rows.append(r)
        self.free_r[r] = False
        self.row_profile = np.vstack([self.row_profile, self.a[r].sum(axis=0)])
        for ci, c in enumerate(self.cols):
            self.cells[len(self.rows) - 1, ci] = self.row_profile[-1, c].sum()
        return len(self.rows) - 1

    def _add_cols(self, c: np.ndarray) -> int:
        self.cols.append(c)
        self.free_c[c] = False
        self.col_profile = np.vstack([self.col_profile, self.a[:, c].sum(axis=1)])
        if self.rows:
            self.cells[: len(self.rows), len(self.cols) - 1] = self.row_profile[:, c].sum(axis=1)
        return len(self.cols) - 1

    def _keep(self, ri: int, ci: int) -> None:
        self.kept[ri, ci] = True

    def _place(self, r: np.ndarray, c: np.ndarray) -> None:
        self.kept[self._add_rows(r), self._add_cols(c)] = True

    def _place_col(self, ri: int, c: np.ndarray) -> None:
        self.kept[ri, self._add_cols(c)] = True

    def _place_row(self, ci: int, r: np.ndarray) -> None:
        self.kept[self._add_rows(r), ci] = True

    def orders(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.concatenate([*self.rows, np.flatnonzero(self.free_r)]).astype(np.int64)
        cols = np.concatenate([*self.cols, np.flatnonzero(self.free_c)]).astype(np.int64)
        return rows, cols


def _best_extension(profile: np.ndarray, free: np.ndarray, k: int) -> tuple[float, int, np.ndarray]:
    """The placed block whose best ``k`` free indices (by its profile) sum highest: value, block, indices."""
    candidates = np.flatnonzero(free)
    sums = profile[:, candidates]
    tops = np.argpartition(-sums, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(sums, tops, axis=1).sum(axis=1)
    best = int(values.argmax())
    return float(values[best]), best, candidates[tops[best]]


def _top(values: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-values, kind="stable")[:k]
