"""Scaling-law fits: the over-training law (Gadre et al. 2024), Chinchilla
(Hoffmann et al. 2022), compute-optimal allocation, downstream error from
loss, bootstrap intervals; numpy/scipy, no models (docs/scaling.md)."""

from lightning_jax.scaling.bootstrap import bootstrap
from lightning_jax.scaling.bootstrap import Bootstrap
from lightning_jax.scaling.laws import as_chinchilla
from lightning_jax.scaling.laws import compute_optimal
from lightning_jax.scaling.laws import fit_error_law
from lightning_jax.scaling.laws import fit_loss_law
from lightning_jax.scaling.laws import form_of
from lightning_jax.scaling.laws import FORMS
from lightning_jax.scaling.laws import predict
from lightning_jax.scaling.laws import predict_error
