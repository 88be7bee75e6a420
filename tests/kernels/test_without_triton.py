"""fusedgpt without Triton (macOS, Windows, CPU-only installs): the package imports, every op
runs on its reference under ``auto`` (even with ``TRITON_INTERPRET=1``), and
``backend="triton"`` or a direct kernel launch raises ``BackendUnavailableError`` saying
that Triton cannot be imported.

Triton is hidden in a fresh interpreter by a meta-path finder that refuses it, as if it
were not installed; this test process keeps its own Triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

HIDE_TRITON = """
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r} (hidden by the test)")
        return None

sys.meta_path.insert(0, NoTriton())
"""

CHECKS = """
import pytest
import torch
import fusedgpt.cli
from fusedgpt.kernels import (BackendUnavailableError, add_layer_norm, add_rms_norm, apply_rotary, cross_entropy,
                              flash_attention, layer_norm, linear_cross_entropy, reference, rms_norm, rotary_cache,
                              swiglu)
from fusedgpt.kernels import backend, layernorm
from fusedgpt.model import GPT, GPTConfig

assert "triton" not in sys.modules, "something imported Triton past the finder"
assert backend.TRITON_IMPORT_ERROR.startswith("Triton cannot be imported (ImportError")
assert backend.interpreter_on() is False
fusedgpt.cli.build_parser()   # every command's module imports

torch.manual_seed(0)
x, r, w, b = torch.randn(3, 10), torch.randn(3, 10), torch.rand(10), torch.randn(10)
logits, target = torch.randn(6, 11), torch.randint(0, 11, (6,))
hidden, head = torch.randn(6, 8), torch.randn(11, 8)
q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
cos, sin = rotary_cache(16, 8)
gate, up = torch.randn(4, 6), torch.randn(4, 6)
calls = {
    "layer_norm": (lambda **kw: layer_norm(x, w, b, **kw), reference.layer_norm(x, w, b)),
    "add_layer_norm": (lambda **kw: add_layer_norm(x, r, w, b, **kw)[0], reference.add_layer_norm(x, r, w, b)[0]),
    "cross_entropy": (lambda **kw: cross_entropy(logits, target, **kw), reference.cross_entropy(logits, target)),
    "linear_cross_entropy": (lambda **kw: linear_cross_entropy(hidden, head, target, **kw),
                             reference.cross_entropy(hidden @ head.T, target)),
    "flash_attention": (lambda **kw: flash_attention(q, k, v, **kw), reference.attention(q, k, v)),
    "rms_norm": (lambda **kw: rms_norm(x, w, **kw), reference.rms_norm(x, w)),
    "add_rms_norm": (lambda **kw: add_rms_norm(x, r, w, **kw)[0], reference.add_rms_norm(x, r, w)[0]),
    "apply_rotary": (lambda **kw: apply_rotary(q, k, cos, sin, **kw)[0], reference.apply_rotary(q, k, cos, sin)[0]),
    "swiglu": (lambda **kw: swiglu(gate, up, **kw), reference.swiglu(gate, up)),
}
for name, (call, expected) in calls.items():
    torch.testing.assert_close(call(), expected, msg=name)
    torch.testing.assert_close(call(backend="torch"), expected, msg=name)
    with pytest.raises(BackendUnavailableError, match="backend='triton' cannot run: Triton cannot be imported"):
        call(backend="triton")

# A launcher called directly (as the benchmarks do) refuses as clearly.
with pytest.raises(BackendUnavailableError, match="Triton cannot be imported"):
    layernorm._layer_norm_fwd_kernel[(1,)](x)

# The compile report says why it cannot run, as a CLI error (exit 2), not a traceback.
assert fusedgpt.cli.main(["kernels", "inspect", "--op", "layernorm"]) == 2

model = GPT(GPTConfig.from_preset("tiny"))
idx = torch.randint(0, 100, (2, 8))
model(idx, idx).backward()
assert model.transformer.wte.weight.grad is not None
print("without triton: ok")
"""


def run_without_triton(extra_env: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **extra_env}
    env.pop("FUSEDGPT_BACKEND", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    code = HIDE_TRITON + "\n" + textwrap.dedent(CHECKS)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_package_imports_and_runs_on_the_reference_without_triton():
    done = run_without_triton({"TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "without triton: ok" in done.stdout
