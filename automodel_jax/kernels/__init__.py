"""Hand-written accelerator kernels (Pallas)."""
