"""Bayesian priors that sparsify while training: the Dirichlet scale mixture (MAP hook and NUTS)."""
