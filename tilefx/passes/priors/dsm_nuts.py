"""Full-batch NUTS for a one-hidden-layer tanh MLP under the node-wise DSM (or a Gaussian) prior.

NumPyro and JAX are an optional extra (``pip install tilefx[bayes]``), imported only when
:func:`sample_mlp_posterior` runs. The model follows the paper's Stan files: non-centred first
layer ``W1 = z · s0 · τ · λ̃_j · sqrt(φ_ij)``, other weights and biases ``N(0, 1/sqrt(H))``
(horseshoe) or ``N(0, 1)`` (Student-t and Gaussian), Gaussian likelihood for regression with
``σ ~ LogNormal(0, 0.5)`` (``InvGamma(3, 2)`` for Student-t), Bernoulli-logit for binary classification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from tilefx.errors import RecipeError

from .dsm import DSMSettings, global_tau_scale, magnitude_mask

__all__ = ["MLPPosterior", "per_draw_masks", "sample_mlp_posterior"]


@dataclass(frozen=True)
class MLPPosterior:
    """Posterior draws, stacked on axis 0: w1 (S, H, P), b1 (S, H), w2 (S, H), b2 (S,)."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def global_mask(self, sparsity: float) -> torch.Tensor:
        """One mask on W1 for all draws: keep the largest E_post|w|."""
        return magnitude_mask(torch.from_numpy(np.abs(self.w1).mean(0)), sparsity)

    def predict(self, x: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """Per-draw outputs (S, N); ``masks`` (S, H, P) or (H, P) zero W1 entries first."""
        w1 = self.w1 if masks is None else self.w1 * masks
        hidden = np.tanh(np.einsum("np,shp->snh", x, w1) + self.b1[:, None, :])
        return np.einsum("snh,sh->sn", hidden, self.w2) + self.b2[:, None]


def per_draw_masks(posterior: MLPPosterior, sparsity: float) -> np.ndarray:
    """Each draw prunes its own smallest |w| in W1 (the paper's local pruning)."""
    return np.stack([magnitude_mask(torch.from_numpy(np.abs(w)), sparsity).numpy() for w in posterior.w1])


def sample_mlp_posterior(
    x: np.ndarray,
    y: np.ndarray,
    hidden: int,
    prior: DSMSettings | None,
    task: Literal["regression", "classification"] = "regression",
    warmup: int = 500,
    samples: int = 500,
    chains: int = 1,
    seed: int = 0,
    target_accept: float = 0.9,
) -> MLPPosterior:
    """NUTS on the full batch; ``prior=None`` is the Gaussian baseline (all weights N(0, 1))."""
    try:
        import jax
        import numpyro
        from numpyro.infer import MCMC, NUTS
    except ImportError as error:  # optional extra
        raise RecipeError(
            "the DSM NUTS sampler needs numpyro and jax: pip install 'tilefx[bayes]'"
        ) from error
    model = _model(numpyro, x.shape[1], hidden, len(x), prior, task)
    kernel = NUTS(model, target_accept_prob=target_accept)
    mcmc = MCMC(kernel, num_warmup=warmup, num_samples=samples, num_chains=chains, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(seed), x=x.astype(np.float32), y=y.astype(np.float32))
    draws: dict[str, Any] = {k: np.asarray(v) for k, v in mcmc.get_samples().items()}
    return MLPPosterior(w1=draws["w1"], b1=draws["b1"], w2=draws["w2"], b2=draws["b2"])


def _model(
    numpyro: Any, inputs: int, hidden: int, examples: int, prior: DSMSettings | None, task: str
) -> Any:
    import jax.numpy as jnp
    import numpyro.distributions as dist

    other = 1.0 / math.sqrt(hidden) if prior is not None and prior.kind == "horseshoe" else 1.0

    def first_layer() -> Any:
        if prior is None:
            return numpyro.sample("w1", dist.Normal(0.0, 1.0).expand([hidden, inputs]).to_event(2))
        tau0 = global_tau_scale(prior.p0, inputs, examples)
        tau = numpyro.sample("tau", dist.HalfCauchy(tau0))
        lam_dist = dist.HalfCauchy(1.0) if prior.kind == "horseshoe" else dist.StudentT(prior.student_df)
        lam = jnp.abs(numpyro.sample("lam", lam_dist.expand([hidden]).to_event(1)))
        c2 = numpyro.sample("c2", dist.InverseGamma(prior.slab_a, prior.slab_b).expand([hidden]).to_event(1))
        phi = numpyro.sample(
            "phi", dist.Dirichlet(jnp.full(inputs, prior.alpha)).expand([hidden]).to_event(1)
        )
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([hidden, inputs]).to_event(2))
        lam_tilde = jnp.sqrt(c2 * lam**2 / (c2 + tau**2 * lam**2))
        scale = prior.base_scale(hidden, inputs) * tau * lam_tilde[:, None] * jnp.sqrt(phi)
        return numpyro.deterministic("w1", z * scale)

    def model(x: Any, y: Any) -> None:
        w1 = first_layer()
        b1 = numpyro.sample("b1", dist.Normal(0.0, other).expand([hidden]).to_event(1))
        w2 = numpyro.sample("w2", dist.Normal(0.0, other).expand([hidden]).to_event(1))
        b2 = numpyro.sample("b2", dist.Normal(0.0, other))
        f = jnp.tanh(x @ w1.T + b1) @ w2 + b2
        if task == "classification":
            numpyro.sample("y", dist.Bernoulli(logits=f), obs=y)
            return
        student = prior is not None and prior.kind == "student_t"
        noise = dist.InverseGamma(3.0, 2.0) if student else dist.LogNormal(0.0, 0.5)
        sigma = numpyro.sample("sigma", noise)
        numpyro.sample("y", dist.Normal(f, sigma), obs=y)

    return model
