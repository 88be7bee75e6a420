"""Parity against a float64 oracle, forward and every gradient.

The kernel's error against the float64 reference must be no worse than twice the error
of the reference itself run in the test dtype (which is what eager PyTorch would give),
plus ``atol + rtol * max|oracle|``. Half-precision tolerances therefore follow the
dtype's real rounding instead of a loose fixed number.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


def _as_tuple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _leaves(inputs: Mapping[str, torch.Tensor], cast=None) -> dict:
    leaves = {}
    for name, value in inputs.items():
        value = value.detach()
        if value.is_floating_point():
            value = (value.to(cast) if cast else value.clone()).requires_grad_(True)
        leaves[name] = value
    return leaves


def _run(fn: Callable, leaves: dict, grad_outputs: list) -> tuple[list, dict]:
    outputs = _as_tuple(fn(**leaves))
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    grads = {name: t.grad for name, t in leaves.items() if t.is_floating_point()}
    return [o.detach() for o in outputs], grads


def assert_parity(fn: Callable, reference: Callable, inputs: Mapping[str, torch.Tensor], seed: int = 0) -> None:
    """Run ``fn`` and ``reference`` (same keyword arguments) forward and backward, with the
    same random output gradients, and compare every output and every input gradient."""
    dtypes = {v.dtype for v in inputs.values() if v.is_floating_point()}
    rtol, atol = max(TOLERANCES[d] for d in dtypes)  # the least precise input sets the bar
    probe = _as_tuple(reference(**_leaves(inputs, torch.float64)))
    generator = torch.Generator().manual_seed(seed)
    grad_outputs = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device) for o in probe]

    actual_out, actual_grads = _run(fn, _leaves(inputs), grad_outputs)
    oracle_out, oracle_grads = _run(reference, _leaves(inputs, torch.float64), grad_outputs)
    baseline_out, baseline_grads = _run(reference, _leaves(inputs), grad_outputs)

    named = [(f"output {i}", a, o, b) for i, (a, o, b) in enumerate(zip(actual_out, oracle_out, baseline_out))]
    named += [(f"grad of {k}", actual_grads[k], oracle_grads[k], baseline_grads[k]) for k in oracle_grads]
    for name, actual, oracle, baseline in named:
        if oracle is None:
            assert actual is None, f"{name}: expected no gradient"
            continue
        assert actual is not None, f"{name}: missing"
        assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
        assert actual.dtype == baseline.dtype, f"{name}: dtype {actual.dtype} != {baseline.dtype}"
        assert torch.isfinite(actual).all(), f"{name}: non-finite values"
        error = (actual.double() - oracle).abs().max().item() if oracle.numel() else 0.0
        baseline_error = (baseline.double() - oracle).abs().max().item() if oracle.numel() else 0.0
        scale = oracle.abs().max().item() if oracle.numel() else 0.0
        allowed = 2 * baseline_error + atol + rtol * scale
        assert error <= allowed, f"{name}: max error {error:.3e} > allowed {allowed:.3e} (eager error {baseline_error:.3e})"
