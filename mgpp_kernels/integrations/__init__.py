"""Integrations of MGPP with other libraries, each in its own module so that importing
mgpp_kernels never needs them:

- :mod:`mgpp_kernels.integrations.transformers`: MGPP in the transformers ``Trainer``.
- :mod:`mgpp_kernels.integrations.export`: pruned checkpoints as nonzero values plus a bitmask
  (safetensors), and per-layer sparsity reports.

The SST-2 loader of the example lives beside it, in examples/glue.py.
"""
