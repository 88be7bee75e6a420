"""Fused Triton kernels with plain-PyTorch references, chosen per call by ``backend.py``.

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU
tensors through Triton's interpreter.
"""

from fusedgpt.kernels.attention import flash_attention
from fusedgpt.kernels.backend import BackendUnavailableError
from fusedgpt.kernels.cross_entropy import cross_entropy
from fusedgpt.kernels.layernorm import add_layer_norm, layer_norm
from fusedgpt.kernels.linear_cross_entropy import linear_cross_entropy
from fusedgpt.kernels.rms_norm import add_rms_norm, rms_norm
from fusedgpt.kernels.rotary import apply_rotary, rotary_cache
from fusedgpt.kernels.swiglu import swiglu

__all__ = [
    "BackendUnavailableError", "add_layer_norm", "cross_entropy", "flash_attention", "layer_norm",
    "linear_cross_entropy", "add_rms_norm", "rms_norm", "apply_rotary", "rotary_cache",
    "swiglu",
]
