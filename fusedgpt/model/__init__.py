"""The GPT-2 family on the fused kernels: configuration (``config``), model (``gpt``),
generation (``generate``), GPT-2 weights in Hugging Face's format (``hf``) and the tokenizer
(``tokenizer``).

``generate`` is imported from its module (``from fusedgpt.model.generate import generate``):
re-exporting the function here would hide the module of the same name.
"""

from fusedgpt.model.config import PRESETS, GPTConfig
from fusedgpt.model.gpt import GPT, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS"]
