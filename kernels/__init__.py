"""Compute kernels: CPU matmuls on packed GGML blocks (and, later, Triton GPU kernels)."""
