"""Fused Triton kernels with plain-PyTorch references, chosen per call by ``backend.py``.

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU
tensors through Triton's interpreter.
"""

from fusedgpt.kernels.backend import BackendUnavailableError
from fusedgpt.kernels.layernorm import add_layer_norm, layer_norm

__all__ = ["BackendUnavailableError", "add_layer_norm", "layer_norm"]
