"""Fused Triton kernels (shipped as rali_edge.kernels)."""
