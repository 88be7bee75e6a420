"""fusedgpt: a GPT-2 that trains on its own fused Triton kernels, with the tools to prove
those kernels right without a GPU."""

__version__ = "0.1.0"
