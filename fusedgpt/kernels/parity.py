"""Parity against a float64 oracle, forward and every gradient: the one measure by which the
tests judge a kernel and the benchmarks check every provider before timing it.

A result's error against the reference run in float64 must be no worse than twice the
error of the reference itself run in the result's dtype (what eager PyTorch would give),
plus ``atol + rtol * max|oracle|``. Half-precision tolerances therefore follow the dtype's
real rounding instead of a loose fixed number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


@dataclass(frozen=True)
class Comparison:
    """One output or input gradient of ``fn`` against the float64 oracle."""

    name: str                 # "output 0", "grad of x", ...
    problem: Optional[str]    # a missing / extra gradient, a shape or dtype mismatch, non-finite values
    error: float              # max |actual - oracle|
    allowed: float            # 2 * eager's error + atol + rtol * max|oracle|
    eager_error: float        # max |reference in the same dtype - oracle|

    @property
    def ok(self) -> bool:
        return self.problem is None and self.error <= self.allowed

    def __str__(self) -> str:
        if self.problem:
            return f"{self.name}: {self.problem}"
        return (f"{self.name}: max error {self.error:.3e} {'<=' if self.ok else '>'} allowed {self.allowed:.3e} "
                f"(eager error {self.eager_error:.3e})")


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


def _run(fn: Callable, leaves: dict, grad_outputs: Optional[list]) -> tuple[list, dict]:
    outputs = _as_tuple(fn(**leaves))
    if grad_outputs is None:
        return [o.detach() for o in outputs], {}
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    grads = {name: t.grad for name, t in leaves.items() if t.is_floating_point()}
    return [o.detach() for o in outputs], grads


def _compare(name: str, actual, oracle, eager, rtol: float, atol: float) -> Comparison:
    def problem(text: str) -> Comparison:
        return Comparison(name, text, float("nan"), float("nan"), float("nan"))

    if oracle is None:
        return problem("expected no gradient") if actual is not None else Comparison(name, None, 0.0, 0.0, 0.0)
    if actual is None:
        return problem("missing")
    if actual.shape != oracle.shape:
        return problem(f"shape {tuple(actual.shape)} != {tuple(oracle.shape)}")
    if actual.dtype != eager.dtype:
        return problem(f"dtype {actual.dtype} != {eager.dtype}")
    if not torch.isfinite(actual).all():
        return problem("non-finite values")
    if not oracle.numel():
        return Comparison(name, None, 0.0, 0.0, 0.0)
    error = (actual.double() - oracle).abs().max().item()
    eager_error = (eager.double() - oracle).abs().max().item()
    allowed = 2 * eager_error + atol + rtol * oracle.abs().max().item()
    return Comparison(name, None, error, allowed, eager_error)


def compare_to_reference(fn: Callable, reference: Callable, inputs: Mapping[str, torch.Tensor], seed: int = 0,
                         backward: bool = True) -> list[Comparison]:
    """Run ``fn`` and ``reference`` (same keyword arguments) forward — and backward, with the
    same random output gradients, unless ``backward`` is false — and compare every output
    and every input gradient of ``fn`` with the reference's in float64."""
    dtypes = {v.dtype for v in inputs.values() if v.is_floating_point()}
    rtol, atol = max(TOLERANCES[d] for d in dtypes)  # the least precise input sets the bar
    grad_outputs = None
    if backward:
        probe = _as_tuple(reference(**_leaves(inputs, torch.float64)))
        generator = torch.Generator().manual_seed(seed)
        grad_outputs = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device) for o in probe]

    actual_out, actual_grads = _run(fn, _leaves(inputs), grad_outputs)
    oracle_out, oracle_grads = _run(reference, _leaves(inputs, torch.float64), grad_outputs)
    eager_out, eager_grads = _run(reference, _leaves(inputs), grad_outputs)

    named = [(f"output {i}", a, o, e) for i, (a, o, e) in enumerate(zip(actual_out, oracle_out, eager_out))]
    named += [(f"grad of {k}", actual_grads[k], oracle_grads[k], eager_grads[k]) for k in oracle_grads]
    return [_compare(name, actual, oracle, eager, rtol, atol) for name, actual, oracle, eager in named]


def assert_parity(fn: Callable, reference: Callable, inputs: Mapping[str, torch.Tensor], seed: int = 0) -> None:
    """:func:`compare_to_reference`, forward and backward, raising on the first output or
    gradient out of bounds."""
    for comparison in compare_to_reference(fn, reference, inputs, seed):
        assert comparison.ok, str(comparison)
