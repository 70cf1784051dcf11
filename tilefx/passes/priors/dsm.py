"""Node-wise Dirichlet scale mixture (DSM) priors on a first-layer weight, and their MAP form.

The prior (Arnstad et al., 2026, read from their Stan models) puts on the weight ``w_ij`` from
input ``i`` to hidden node ``j`` a normal whose scale is shared out by a Dirichlet:

    w_ij ~ N(0, s0 · τ · λ̃_j · sqrt(φ_ij)),    φ_j ~ Dirichlet(α·1_P),
    λ_j ~ C⁺(0, 1) ("horseshoe") or t₃⁺(0, 1) ("student_t"),    c_j² ~ InvGamma(a, b),
    λ̃_j² = c_j² λ_j² / (c_j² + τ² λ_j²),    τ ~ C⁺(0, τ₀),    τ₀ = p₀ / (P − p₀) / sqrt(N).

``s0`` is ``1 / sqrt(H · P)`` for the horseshoe file and 1 for the Student-t file. The Dirichlet
with α < 1 concentrates a node's variance on a few inputs (implicit feature selection); the
heavy-tailed λ_j shrinks whole nodes; τ shrinks everything.

:class:`DSMPriorHook` is the scalable form: the latents (τ, λ, c², φ) become trainable
unconstrained parameters and ``-log p(W, latents)`` (with the log-Jacobians of the transforms)
divided by the number of training examples is added to the loss — a MAP fit of the same joint
density the NUTS sampler explores (in W's coordinates, or in the sampler's non-centred ones,
``form``). This departs from the paper, which samples the full posterior.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from tilefx.errors import RecipeError
from tilefx.options import option, options

from ..training.loop import LoopHook

__all__ = [
    "DSMLatents",
    "DSMPriorHook",
    "DSMSettings",
    "MapForm",
    "dsm_log_prior",
    "global_tau_scale",
    "magnitude_mask",
]

Kind = Literal["horseshoe", "student_t"]
MapForm = Literal["centred", "non_centred"]


@options
class DSMSettings:
    """Hyperparameters of the node-wise DSM prior (defaults: those of the paper's code).

    kind: "horseshoe" (λ ~ C⁺) or "student_t" (λ ~ t₃⁺). alpha: Dirichlet concentration.
    p0: expected number of relevant inputs (sets τ₀). slab_a, slab_b: InvGamma of c².
    """

    kind: Kind = "horseshoe"
    alpha: float = option(default=0.1, gt=0)
    p0: float = option(default=4.0, gt=0)
    slab_a: float = option(default=2.0, gt=0)
    slab_b: float = option(default=4.0, gt=0)
    student_df: float = option(default=3.0, gt=0)

    def base_scale(self, hidden: int, inputs: int) -> float:
        """s0: the horseshoe file scales z by 1/sqrt(H) and w by 1/sqrt(P); the Student-t file not."""
        return 1.0 / math.sqrt(hidden * inputs) if self.kind == "horseshoe" else 1.0


def global_tau_scale(p0: float, inputs: int, examples: int) -> float:
    """τ₀ = p₀ / (P − p₀) / sqrt(N); p₀ must be below the number of inputs P."""
    if not 0 < p0 < inputs or examples < 1:
        raise RecipeError(f"DSM prior needs 0 < p0 < inputs and examples >= 1 (p0={p0}, inputs={inputs})")
    return p0 / (inputs - p0) / math.sqrt(examples)


@dataclass(frozen=True)
class DSMLatents:
    """Constrained latents of one layer: tau (scalar), lam (H,), c2 (H,), phi (H, P), rows on the simplex."""

    tau: torch.Tensor
    lam: torch.Tensor
    c2: torch.Tensor
    phi: torch.Tensor

    def weight_scale(self, settings: DSMSettings) -> torch.Tensor:
        """The prior standard deviation of every w_ij, shape (H, P)."""
        hidden, inputs = self.phi.shape
        lam_tilde2 = self.c2 * self.lam**2 / (self.c2 + self.tau**2 * self.lam**2)
        node = settings.base_scale(hidden, inputs) * self.tau * lam_tilde2.sqrt()
        return node[:, None] * self.phi.sqrt()


def _half_cauchy(x: torch.Tensor, scale: float) -> torch.Tensor:
    return math.log(2 / (math.pi * scale)) - torch.log1p((x / scale) ** 2)


def _half_student_t(x: torch.Tensor, df: float) -> torch.Tensor:
    return math.log(2.0) + torch.distributions.StudentT(
        torch.tensor(df, dtype=x.dtype, device=x.device)
    ).log_prob(x)


def dsm_log_prior(
    weight: torch.Tensor, latents: DSMLatents, settings: DSMSettings, tau0: float
) -> torch.Tensor:
    """log p(W, τ, λ, c², φ) of the node-wise DSM prior; ``weight`` is (H, P) like ``nn.Linear``'s.

    The density is over the constrained latents (no Jacobian); :class:`DSMPriorHook` adds the
    Jacobians of its transforms.
    """
    if weight.shape != latents.phi.shape:
        raise RecipeError(f"DSM prior: weight {tuple(weight.shape)} != phi {tuple(latents.phi.shape)}")
    scale = latents.weight_scale(settings)
    total = torch.distributions.Normal(0.0, scale).log_prob(weight).sum()
    total = total + _half_cauchy(latents.tau, tau0).sum()
    if settings.kind == "horseshoe":
        total = total + _half_cauchy(latents.lam, 1.0).sum()
    else:
        total = total + _half_student_t(latents.lam, settings.student_df).sum()
    slab = latents.c2.new_tensor([settings.slab_a, settings.slab_b])  # float64 stays float64
    inv_gamma = torch.distributions.InverseGamma(slab[0], slab[1])
    total = total + inv_gamma.log_prob(latents.c2).sum()
    concentration = torch.full_like(latents.phi, settings.alpha)
    return total + torch.distributions.Dirichlet(concentration).log_prob(latents.phi).sum()


def magnitude_mask(importance: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the (1 − sparsity) largest entries of ``importance`` (e.g. E_post|w| or one draw's |w|)."""
    if not 0 <= sparsity < 1:
        raise RecipeError(f"sparsity must be in [0, 1), got {sparsity}")
    pruned = int(round(sparsity * importance.numel()))
    mask = torch.ones_like(importance, dtype=torch.bool)
    if pruned == 0:
        return mask
    order = importance.flatten().argsort(stable=True)[:pruned]
    mask.view(-1)[order] = False
    return mask


class DSMPriorHook(LoopHook):
    """The DSM prior as a MAP regulariser on one ``nn.Linear``'s weight inside the training loop.

    ``layer`` is the ``nn.Linear`` or its 2-D ``[out, in]`` weight itself (a captured graph holds
    parameters, not modules).

    Trainable latents (pass :meth:`parameters` to the loop alongside the model's): log τ,
    log λ_j, log c_j², and softmax logits of φ_j. The regulariser is
    ``-(log p(W, latents) + log|Jacobian|) / examples``: the prior of a posterior over ``examples``
    data points whose likelihood is the mean loss. The Dirichlet log-Jacobian of the softmax is
    ``Σ_i log φ_ij`` (over P − 1 free coordinates, up to a constant).

    form: "centred" takes the density of W itself. It is unbounded as a weight and its scale go
    to zero together (each weight adds ``-log σ_ij``), so from the prior's tiny initial scales the
    MAP fit collapses to W = 0 (the DSM-horseshoe did on breast cancer, benchmarks/dsm_prior.py).
    "non_centred" takes the density of ``z = W / σ`` — the coordinates the NUTS model samples in
    (``w = z·σ``): the centred density plus ``Σ log σ_ij``, bounded. Profiling φ out of it leaves
    a per-node ``(Σ_i |w_ij|)² / 2s_j²``, an L1 across each node's inputs, which is what prunes.
    init: "prior" starts the latents at the prior's scale (τ = τ₀, λ = 1, uniform φ); "weights"
    at the scales the current weights imply (σ_ij = |w_ij|: φ_j ∝ w_j², node scales = ‖w_j‖, τ
    from their median, c² raised where the slab would bind), for fitting from trained weights.
    """

    name = "dsm_prior"

    def __init__(
        self,
        layer: nn.Linear | nn.Parameter,
        settings: DSMSettings,
        examples: int,
        *,
        form: MapForm = "centred",
        init: Literal["prior", "weights"] = "prior",
    ) -> None:
        weight = layer.weight if isinstance(layer, nn.Linear) else layer
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise RecipeError(f"DSMPriorHook needs an nn.Linear or a 2-D weight, got {type(layer).__name__}")
        if form not in ("centred", "non_centred") or init not in ("prior", "weights"):
            raise RecipeError(
                f"DSMPriorHook: form 'centred'/'non_centred', init 'prior'/'weights'; got {form!r}, {init!r}"
            )
        self.form = form
        hidden, inputs = weight.shape
        self.weight, self.settings, self.examples = weight, settings, examples
        self.tau0 = global_tau_scale(settings.p0, inputs, examples)
        device = weight.device
        self.log_tau = nn.Parameter(torch.tensor(math.log(self.tau0), device=device))
        self.log_lam = nn.Parameter(torch.zeros(hidden, device=device))
        self.log_c2 = nn.Parameter(
            torch.full((hidden,), math.log(settings.slab_b / (settings.slab_a + 1)), device=device)
        )
        self.phi_logits = nn.Parameter(torch.zeros(hidden, inputs, device=device))
        if init == "weights":
            self._init_from_weights()

    def _init_from_weights(self) -> None:
        """Latents with ``weight_scale() ≈ |W|`` (entries of φ floored at 1e-6)."""
        w = self.weight.detach().double()
        node = w.pow(2).sum(1).sqrt().clamp_min(1e-8)  # ‖w_j‖ = s0 · τ · λ̃_j
        median = node.median().clamp_min(1e-8)
        tau = float(median) / self.settings.base_scale(*w.shape)
        lam_tilde = node / median
        floor = self.settings.slab_b / (self.settings.slab_a + 1)
        c2 = (4 * (tau * lam_tilde) ** 2).clamp_min(floor)  # the slab then bends λ̃ little
        lam2 = lam_tilde**2 * c2 / (c2 - tau**2 * lam_tilde**2)  # inverts λ̃² = c²λ²/(c² + τ²λ²)
        phi = (w.pow(2) / node[:, None] ** 2).clamp_min(1e-6)
        with torch.no_grad():
            self.log_tau.fill_(math.log(tau))
            self.log_lam.copy_(0.5 * lam2.log())
            self.log_c2.copy_(c2.log())
            self.phi_logits.copy_(phi.log() - phi.log().mean(1, keepdim=True))

    def parameters(self) -> list[nn.Parameter]:
        return [self.log_tau, self.log_lam, self.log_c2, self.phi_logits]

    def latents(self) -> DSMLatents:
        return DSMLatents(
            tau=self.log_tau.exp(),
            lam=self.log_lam.exp(),
            c2=self.log_c2.exp(),
            phi=torch.softmax(self.phi_logits, dim=1),
        )

    def log_density(self) -> torch.Tensor:
        """log p(W, latents) (or of ``z = W/σ``, non-centred) plus the log-Jacobian of the
        unconstrained parameterisation of the latents."""
        latents = self.latents()
        jacobian = self.log_tau + self.log_lam.sum() + self.log_c2.sum() + latents.phi.log().sum()
        if self.form == "non_centred":
            jacobian = jacobian + latents.weight_scale(self.settings).log().sum()
        return dsm_log_prior(self.weight, latents, self.settings, self.tau0) + jacobian

    def regularizer(self) -> torch.Tensor:
        return -self.log_density() / self.examples

    def progress(self) -> dict[str, float]:
        return {"tau": float(self.log_tau.detach().exp())}

    def state_dict(self) -> dict[str, Any]:
        return {name: p.detach().clone() for name, p in zip(_LATENT_NAMES, self.parameters(), strict=True)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for name, p in zip(_LATENT_NAMES, self.parameters(), strict=True):
                p.copy_(state[name])


_LATENT_NAMES = ("log_tau", "log_lam", "log_c2", "phi_logits")
