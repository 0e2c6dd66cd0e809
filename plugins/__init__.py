"""Thin server adapters (installed as ``tkernels.plugins``): no kernels live here."""
