"""Integrations of MGPP with other libraries, each in its own module so that importing
mgpp_kernels never needs them:

- :mod:`mgpp_kernels.integrations.transformers`: MGPP in the transformers ``Trainer``, and
  ``DistillationTrainer`` (a teacher's softened logits mixed into the loss).
- :mod:`mgpp_kernels.integrations.export`: pruned checkpoints as nonzero values plus a bitmask
  (safetensors), as a folder in the compressed-tensors sparse-bitmask format, and per-layer
  sparsity reports.

The SST-2 loader of the example lives beside it, in examples/glue.py.
"""
