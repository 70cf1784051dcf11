"""DSM NUTS path: a short chain runs and gives masks of the asked sparsity; skipped without numpyro."""

from __future__ import annotations

import numpy as np
import pytest

from tilefx.passes.priors.dsm import DSMSettings
from tilefx.passes.priors.dsm_nuts import per_draw_masks, sample_mlp_posterior

pytest.importorskip("numpyro")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["student_t"])  # horseshoe differs only in lambda
def test_short_nuts_chain_and_masks(kind: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6))
    y = x[:, 0] - x[:, 1] + 0.1 * rng.normal(size=60)
    post = sample_mlp_posterior(x, y, hidden=4, prior=DSMSettings(kind=kind), warmup=30, samples=20)  # type: ignore[arg-type]
    assert post.w1.shape == (20, 4, 6)
    mask = post.global_mask(0.5)
    assert int(mask.sum()) == 12
    local = per_draw_masks(post, 0.5)
    assert local.shape == (20, 4, 6) and (local.sum((1, 2)) == 12).all()
    pred = post.predict(x, mask.numpy()).mean(0)
    assert np.isfinite(pred).all()
