"""Test ELBO, importance-weighted log-likelihood, latent means, GMVAE clusters, ARI/AMI."""

from __future__ import annotations
