"""Ahead-of-time compile report: the kernels a workload really launches, compiled for real
GPUs on a machine that has none, and read for health and for cost.

How an op registers its builds (the contract every op module follows)
----------------------------------------------------------------------
Each module in ``OP_MODULES`` defines::

    def aot_variants(dtype: torch.dtype, workload: Workload | None = None) -> list[KernelVariant]

(``None`` = ``WORKLOADS["gpt2"]``) returning one :class:`KernelVariant` per kernel launch
that workload makes in training: forward and backward, every autotune config the pruner
keeps, dropout off and on where the op has it. Nobody writes a signature by hand:

1. build the inputs on the ``meta`` device with the real shapes, dtypes and layout
   (:func:`meta_tensor`, :func:`attention_inputs`; views and strides as in the model);
2. call the op's own *launcher* inside ``with launches(module, "kernel_name", ...) as found:``
   — the kernels are looked up by name, so the launches are recorded (arguments by name,
   constexprs and ``num_warps``/``num_stages`` included) instead of run;
3. ``expand(launch)`` turns an autotuned launch into one per config its pruner keeps;
4. ``jit_variant(op, pass_, launch, work=Work(...), workload=workload, show=(...))``.

At compile time Triton's own binder specialises the recorded arguments exactly as the JIT
does at launch: pointers 16-byte aligned and integers divisible by 16 are marked
``tt.divisibility=16``, integers equal to 1 become constants, ``do_not_specialize``
parameters stay plain. The :class:`Work` gives the unit of work (``element``, ``logit``,
``1K pairs``), how many units one program does per iteration of its innermost loop (or in
all, for a kernel without a loop), the bytes the kernel must move per unit, and the matmul
flops per unit its pass needs. New ops (rms_norm, rotary, swiglu, ...) add their module to
``OP_MODULES`` and follow the same four steps (``layernorm.aot_variants`` is the shortest
example); peer kernels (``bench/static.py``) are described with the same calls on their
own launchers.

What is read from each build
----------------------------
Built with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, then read
with the tools the Triton wheel ships:

- health: registers and spills (``cuobjdump -res-usage``: LOCAL + STACK), shared memory
  against the per-block limit, occupancy; a build with a spill or over the limit is a
  problem (exit status 1);
- cost, from ``cuobjdump -sass``: loops are the bodies closed by a backward branch; the
  innermost ones are the main loops (a kernel may have an unmasked and a masked one; each is
  reported). Per unit of work: instructions, global memory instructions by width (LDG/STG
  128/64/32/16/8-bit, LDGSTS = cp.async, RED/REDG/ATOMG = atomics (REDG: sm_90, vector forms like F32x4 counted by their width), UTMALDG/UTMASTG = TMA), the
  bytes they move (all lanes counted; an atomic as a store of its width, though L2 applies
  it at a lower rate; TMA bytes are not visible in SASS and not counted), MUFU
  instructions (EX2, RCP, RSQ, LG2, ...) and whether the exponentials are flush-to-zero
  (no ``FSETP ... -126`` range fix-up around them), tensor-core instructions with their
  shapes (``HMMA.16816``, ``HGMMA.64x64x16``) and the MMA work relative to the matmuls the
  algorithm needs (1.00 = nothing computed twice);
- a modelled cost per unit, in SM cycles: the largest of tensor-core, MUFU, issue, HBM
  (compulsory bytes) and L2 (bytes the instructions move) time, with the per-architecture
  constants in ``MODEL`` (docs/verification.md).
  A model, not a measurement.

It cannot see speed, bank conflicts, cache behaviour or anything that depends on the data.
Run it as ``fusedgpt kernels inspect [--workload gpt2] [--arch sm_80,sm_90] [--op NAME] [--json]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from fusedgpt.kernels import backend as _backend

# Modules that register kernels in the report: each defines ``aot_variants(dtype, workload)``.
OP_MODULES: tuple[str, ...] = (
    "fusedgpt.kernels.layernorm", "fusedgpt.kernels.attention", "fusedgpt.kernels.cross_entropy",
    "fusedgpt.kernels.rms_norm", "fusedgpt.kernels.rotary", "fusedgpt.kernels.swiglu",
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Per-block shared-memory opt-in limit and per-SM budgets (CUDA programming guide, compute
# capability tables) that the occupancy estimate uses.
ARCHS = {
    "sm_80": dict(cc=80, shared_limit=166912, shared_per_sm=167936),
    "sm_90": dict(cc=90, shared_limit=232448, shared_per_sm=233472),
}
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32

# The cost model's per-SM, per-cycle rates (docs/verification.md, "Static cost"): A100 SXM
# 80 GB for sm_80 (108 SMs, 1.41 GHz, 2.04 TB/s HBM2e, 312 dense half TFLOP/s), H100 SXM for
# sm_90 (132 SMs, 1.83 GHz, 3.35 TB/s HBM3, 989 dense half TFLOP/s). Issue: one warp
# instruction per cycle per SM sub-partition; MUFU: 16 lanes per cycle per SM. L2: the
# A100's published 5120 B/cycle shared by 108 SMs, assumed per SM for the H100 as well.
MODEL = {
    "sm_80": dict(gpu="A100 SXM 80GB", mma_flops=2048, mufu_lanes=16, issue=4, hbm_bytes=13.4, l2_bytes=47.4),
    "sm_90": dict(gpu="H100 SXM", mma_flops=4096, mufu_lanes=16, issue=4, hbm_bytes=13.9, l2_bytes=47.4),
}


# --------------------------------------------------------------------------- workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    """The shapes a training step launches kernels with: batch x sequence tokens, attention
    heads of ``head_dim`` (queries; ``kv_heads`` key/value heads, 0 = as many as ``heads``),
    ``channels`` features, a ``vocab``-way head whose logits rows are ``logits_row_stride``
    apart. ``attention_features``: attention's window, soft-cap and packed-sequence builds a
    user can launch at these shapes are listed as well (the model itself runs none of them)."""

    name: str
    batch: int
    seq: int
    heads: int
    head_dim: int
    channels: int
    vocab: int
    logits_row_stride: int
    dropout_p: float = 0.1
    kv_heads: int = 0
    attention_features: bool = False

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def key_value_heads(self) -> int:
        return self.kv_heads or self.heads


# GPT-2 training (B=8, T=1024). The linear cross-entropy computes the logits of a chunk of
# tokens with ``hidden @ weight[:vocab].T`` into a contiguous buffer: rows 50257 apart.
WORKLOADS = {
    "gpt2": Workload("gpt2", 8, 1024, 12, 64, 768, 50257, 50257),
    "gpt2-xl": Workload("gpt2-xl", 8, 1024, 25, 64, 1600, 50257, 50257),
    "d128": Workload("d128", 8, 1024, 6, 128, 768, 50257, 50257),
    # Llama 3.2 1B fine-tuning (B=4, T=2048): 32 query heads share 8 key/value heads; its
    # MLP is 8192 = 4C wide, as the SwiGLU build assumes; logits rows 128256 apart.
    "llama3.2-1b": Workload("llama3.2-1b", 4, 2048, 32, 64, 2048, 128256, 128256, kv_heads=8,
                            attention_features=True),
}


def workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
    return WORKLOADS[name]


def meta_tensor(*shape: int, dtype: torch.dtype, strides: Optional[Sequence[int]] = None) -> torch.Tensor:
    """A tensor with the real shape, dtype and layout (contiguous unless ``strides``) and no
    storage: what a kernel description passes where the launcher would pass a CUDA tensor."""
    if strides is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty_strided(shape, tuple(strides), dtype=dtype, device="meta")


def attention_inputs(workload: Workload, dtype: torch.dtype, packed: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, T, D), k and v (B, H_kv, T, D) laid out as the model makes them: split from
    one (B, T, (H + 2 H_kv) D) projection and viewed per head (rows (H + 2 H_kv) D apart).
    ``packed``: the B sequences packed into one row, (1, H, B T, D) etc., as
    ``cu_seqlens`` launches take them."""
    b, t, h, h_kv, d = workload.batch, workload.seq, workload.heads, workload.key_value_heads, workload.head_dim
    if packed:
        b, t = 1, b * t
    qkv = meta_tensor(b, t, (h + 2 * h_kv) * d, dtype=dtype)
    q, k, v = qkv.split((h * d, h_kv * d, h_kv * d), dim=2)
    return tuple(x.view(b, t, x.shape[2] // d, d).transpose(1, 2) for x in (q, k, v))


# --------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Work:
    """What one program of a kernel does, for per-unit cost.

    ``per_iteration``: units of work per iteration of the innermost loop (per program), or
    per program for a kernel without a loop. ``loops``: "alternatives" when each unit goes
    through one of the loops (the shorter is the unmasked main loop, the longer the masked
    one), "sequence" when through all of them; or, for a kernel whose innermost loops work
    on different tiles, one role per loop in address order ("main" or "masked"), with
    ``per_iteration`` then one figure per loop.
    ``min_bytes``: bytes per unit this kernel must move at least (its compulsory reads and
    writes). ``mma_flops``: matmul flops per unit the whole pass's algorithm needs (0
    without matmuls), so that a kernel's MMA redundancy is its share of the pass's."""

    unit: str
    per_iteration: float | tuple
    min_bytes: float
    mma_flops: float = 0.0
    loops: str | tuple = "alternatives"


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    """One launch of a ``@triton.jit`` kernel: its arguments by name (tensors on ``meta``),
    its launch options, a display ``config`` (with the dtype) and its :class:`Work`."""

    op: str
    pass_: str
    kernel: Any
    args: dict
    num_warps: int
    num_stages: int
    config: dict
    work: Work
    impl: str = "fusedgpt"
    workload: str = "gpt2"
    options: dict = dataclasses.field(default_factory=dict)
    archs: tuple = ()  # the architectures this launch is made for (a per-architecture config); () = all


@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher made it: the kernel object it called (a JIT kernel,
    an autotuner or heuristics around one, or the interpreter's stand-in), every argument
    by name (constexprs included) and the launch options it passed."""

    kernel: Any
    args: dict
    options: dict


# Keyword arguments of a launch that are compile options, not kernel parameters.
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_pdl")


def python_function(kernel: Any) -> Any:
    """The Python function under a kernel and its wrappers (JIT, autotune, interpreter)."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


@contextlib.contextmanager
def launches(module: Any, *names: str) -> Iterator[list[Launch]]:
    """Record, instead of running, the launches of the kernels that ``module`` holds under
    ``names`` while the block runs: call the real launcher with meta tensors inside it, and
    the list it yields holds what the launcher passed. Works with the JIT and with the
    interpreter (kernels are looked up by name when a launcher runs)."""
    found: list[Launch] = []

    class Recorder:
        def __init__(self, kernel: Any):
            self.kernel = kernel

        def __getitem__(self, grid: Any) -> Callable:
            def launch(*args: Any, **kwargs: Any) -> None:
                options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
                bound = inspect.signature(python_function(self.kernel)).bind_partial(*args, **kwargs)
                found.append(Launch(self.kernel, dict(bound.arguments), options))
            return launch

    originals = {name: getattr(module, name) for name in names}
    try:
        for name, kernel in originals.items():
            setattr(module, name, Recorder(kernel))
        yield found
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)


def expand(launch: Launch) -> list[Launch]:
    """The launches a recorded one turns into on a GPU: one per autotune config that the
    autotuner's pruning keeps for these arguments, with heuristics applied (through other
    wrappers that hold the kernel as ``fn``)."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    kernel = launch.kernel
    if isinstance(kernel, Heuristics):
        args = dict(launch.args)
        for name, rule in kernel.values.items():
            args[name] = rule(args)
        return expand(Launch(kernel.fn, args, launch.options))
    if isinstance(kernel, Autotuner):
        configs = kernel.configs
        if kernel.early_config_prune:
            # Autotuner.run passes the positional arguments by name and the keywords again;
            # every argument in both keeps any pruner's lookups working.
            configs = kernel.early_config_prune(configs, dict(launch.args), **launch.args)
        found = []
        for config in configs:
            options = dict(launch.options, num_warps=config.num_warps, num_stages=config.num_stages)
            if config.maxnreg is not None:
                options["maxnreg"] = config.maxnreg
            found += expand(Launch(kernel.fn, {**launch.args, **config.kwargs}, options))
        return found
    if hasattr(kernel, "fn") and not inspect.isfunction(kernel.fn):
        return expand(Launch(kernel.fn, launch.args, launch.options))  # another library's wrapper
    return [launch]


def jit_variant(op: str, pass_: str, launch: Launch, *, work: Work, workload: Workload,
                show: Sequence[str] = (), impl: str = "fusedgpt") -> KernelVariant:
    """A :class:`KernelVariant` of one (expanded) launch. ``show`` names the arguments the
    report prints as the config; the dtype is the first tensor argument's."""
    args = launch.args
    dtype = next(a.dtype for a in args.values() if isinstance(a, torch.Tensor))
    config = dict(dtype=str(dtype).removeprefix("torch."), **{name: args[name] for name in show})
    options = dict(launch.options)
    num_warps, num_stages = options.pop("num_warps", 4), options.pop("num_stages", 3)
    return KernelVariant(op, pass_, launch.kernel, dict(args), num_warps, num_stages, config, work, impl,
                         workload.name, options)


class _DevicePointer:
    """What the JIT's binder reads of a tensor argument: its dtype and its address (the
    tensor's offset into a 256-byte aligned allocation, as from the CUDA caching allocator)."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._address = (1 << 20) + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


def _jit_function(kernel: Any) -> Any:
    """The JITFunction behind a kernel (through autotune/heuristics wrappers), refusing the
    interpreter's stand-in."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            "the compile report needs real JIT kernels: run it with TRITON_INTERPRET unset "
            "(the `fusedgpt kernels inspect` command does this itself)"
        )
    return kernel


def specialise(variant: KernelVariant, arch: str) -> tuple[Any, dict, dict, dict, Any]:
    """Triton's own launch-time specialisation of ``variant``: (fn, signature, constexprs,
    attrs, options), from the kernel's signature and the argument values."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(variant.kernel)
    backend = CUDABackend(GPUTarget("cuda", ARCHS[arch]["cc"], 32))
    binder = create_function_from_signature(fn.signature, fn.params, CUDABackend)
    args = {k: _DevicePointer(v) if isinstance(v, torch.Tensor) else v for k, v in variant.args.items()}
    options = dict(num_warps=variant.num_warps, num_stages=variant.num_stages, **variant.options)
    bound, specialization, kwargs = binder(**args, **options)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, kwargs)
    return fn, signature, constexprs, attrs, options


# --------------------------------------------------------------------------- tools


def _tool(name: str) -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    found = bundled if os.path.exists(bundled) else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: it ships with the Triton wheel under backends/nvidia/bin")
    return found


def _resource_usage(cubin_path: str) -> dict:
    text = subprocess.run(
        [_tool("cuobjdump"), "-res-usage", cubin_path], check=True, capture_output=True, text=True
    ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {key: int(value) for key, value in fields.items()}


def occupancy(registers: int, shared_bytes: int, num_warps: int, shared_per_sm: int) -> float:
    """Resident warps / max warps per SM, from registers, shared memory and block count
    (registers are allocated per warp in 256-register units)."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = REGISTERS_PER_SM // (regs_per_warp * num_warps)
    by_shared = shared_per_sm // shared_bytes if shared_bytes else MAX_BLOCKS_PER_SM
    by_warps = MAX_WARPS_PER_SM // num_warps
    blocks = min(by_registers, by_shared, by_warps, MAX_BLOCKS_PER_SM)
    return blocks * num_warps / MAX_WARPS_PER_SM


# --------------------------------------------------------------------------- SASS


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction of ``cuobjdump -sass`` output."""
    return [(int(m.group(1), 16), m.group(3), m.group(4).strip()) for m in _SASS_LINE.finditer(sass)]


def loops(instructions: Sequence[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """Innermost loops as (first, last) address: bodies closed by a branch back to an
    earlier address and containing no other such loop (the ``BRA`` to itself after
    ``EXIT`` is padding, not a loop)."""
    found = []
    for address, opcode, operands in instructions:
        match = re.search(r"0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if match and int(match.group(1), 16) < address:
            found.append((int(match.group(1), 16), address))
    return [(s, e) for s, e in found if not any((s, e) != (s2, e2) and s <= s2 and e2 <= e for s2, e2 in found)]


def _memory_width(opcode: str) -> int:
    """Bits per lane of a global load/store/cp.async/atomic opcode (sm_90's vector atomics
    name their width as lanes x elements: ``REDG.E.ADD.F32x4``)."""
    vector = re.search(r"\.F(\d+)x(\d+)\b", opcode)
    if vector:
        return int(vector.group(1)) * int(vector.group(2))
    parts = set(opcode.split("."))
    for bits, names in ((128, {"128"}), (64, {"64"}), (16, {"U16", "S16"}), (8, {"U8", "S8"})):
        if parts & names:
            return bits
    return 32


# Tensor-core time relative to 16-bit inputs: TF32 runs at half the rate.
MMA_SLOWDOWN = {"TF32": 2.0}


def _mma_flops_per_warp(opcode: str) -> float:
    """Multiply-add flops one warp's issue of a tensor-core instruction does: HMMA.MNK is per
    warp; HGMMA.MxNxK is per warpgroup of 4 warps."""
    hgmma = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", opcode)
    if hgmma:
        m, n, k = map(int, hgmma.groups())
        return 2 * m * n * k / 4
    hmma = re.match(r"HMMA\.(16)(8)(\d+)", opcode)
    if hmma:
        m, n, k = map(int, hmma.groups())
        return 2 * m * n * k
    return 0.0


def read_section(instructions: Sequence[tuple[int, str, str]]) -> dict:
    """Counts over a run of instructions, per warp: total, global memory by kind and width,
    MUFU by function, exponential fix-ups, tensor-core instructions by shape and flops."""
    memory: collections.Counter = collections.Counter()
    mufu: collections.Counter = collections.Counter()
    mma: collections.Counter = collections.Counter()
    memory_bits = mma_flops = mma_time = exp_fixups = 0
    for _, opcode, operands in instructions:
        head = opcode.split(".")[0]
        if head in ("LDG", "STG", "LDGSTS", "RED", "REDG", "ATOMG"):
            bits = _memory_width(opcode)
            memory[f"{head}.{bits}"] += 1
            memory_bits += bits
        elif head in ("UTMALDG", "UTMASTG", "UBLKCP"):
            memory[head] += 1
        elif head == "MUFU":
            mufu[opcode.split(".")[1]] += 1
        elif head in ("HMMA", "HGMMA"):
            mma[opcode] += 1
            mma_flops += _mma_flops_per_warp(opcode)
            slowdown = max([MMA_SLOWDOWN.get(part, 1.0) for part in opcode.split(".")])
            mma_time += _mma_flops_per_warp(opcode) * slowdown
        elif head == "FSETP" and re.search(r"(^|[ ,])-126(\b|$)", operands):
            exp_fixups += 1
    real = [i for i in instructions if i[1] != "NOP"]
    return dict(insts=len(real), memory=dict(memory), memory_bytes=memory_bits * 32 / 8, mufu=dict(mufu),
                mma=dict(mma), mma_flops=mma_flops, mma_time=mma_time, exp_fixups=exp_fixups)


def sass_cost(sass: str) -> dict:
    """The loops of a kernel (innermost, in address order) and the code outside them."""
    instructions = parse_sass(sass)
    if instructions and instructions[-1][1] == "BRA":  # the self-branch padding after EXIT
        instructions = instructions[:-1]
    bodies = loops(instructions)
    inside = [i for i in instructions if any(s <= i[0] <= e for s, e in bodies)]
    outside = [i for i in instructions if not any(s <= i[0] <= e for s, e in bodies)]
    return dict(
        loops=[read_section([i for i in instructions if s <= i[0] <= e]) for s, e in bodies],
        outside=read_section(outside), whole=read_section(instructions), looped=len(inside),
    )


def per_unit(section: dict, per_iteration: float, num_warps: int) -> dict:
    """A section's per-warp counts as per-unit figures for a program of ``num_warps`` that
    does ``per_iteration`` units per pass through it."""
    scale = num_warps / per_iteration
    return dict(
        insts=section["insts"] * scale,
        mufu=sum(section["mufu"].values()) * scale,
        bytes=section["memory_bytes"] * scale,
        mma_flops=section["mma_flops"] * scale,
        mma_time=section["mma_time"] * scale,
    )


def _sum_figures(figures: Sequence[dict]) -> dict:
    return {key: sum(f[key] for f in figures) for key in ("insts", "mufu", "bytes", "mma_flops", "mma_time")}


def _merge_counts(sections: Sequence[dict], key: str) -> dict:
    return dict(sum((collections.Counter(s[key]) for s in sections), collections.Counter()))


def loop_roles(loop_count: int, work: Work) -> list[tuple[str, float]]:
    """(role, units per iteration) of each innermost loop, in address order: "main" loops
    make the headline figures, "masked" ones the masked column, others are left out."""
    if isinstance(work.loops, tuple):
        if len(work.loops) != loop_count:
            raise ValueError(f"the kernel has {loop_count} innermost loops, its Work describes {len(work.loops)}")
        return list(zip(work.loops, work.per_iteration))
    if work.loops == "sequence" or loop_count <= 1:
        return [("main", work.per_iteration)] * loop_count
    return [("other", work.per_iteration)] * loop_count  # alternatives: sorted by size below


def model_cycles(figures: dict, min_bytes: float, arch: str) -> dict:
    """Modelled SM cycles per unit: each resource's time, and their maximum. Memory counts
    twice: the kernel's compulsory bytes at HBM bandwidth, and the bytes its instructions
    move (re-reads included, all lanes counted) at L2 bandwidth."""
    rates = MODEL[arch]
    terms = dict(
        tensor=figures["mma_time"] / rates["mma_flops"],
        mufu=figures["mufu"] * 32 / rates["mufu_lanes"],
        issue=figures["insts"] / rates["issue"],
        hbm=min_bytes / rates["hbm_bytes"],
        l2=figures["bytes"] / rates["l2_bytes"],
    )
    return dict(terms, bound=max(terms, key=terms.get), cycles=max(terms.values()))


def cost_columns(sass: str, work: Work, num_warps: int, arch: str) -> dict:
    """The cost columns of one build: the main loop(s) (or the whole kernel without one) per
    unit of work, the masked loop(s) where there are, the code outside the loops."""
    found = sass_cost(sass)
    if not found["loops"]:
        roles = [("main", work.per_iteration)]
        sections = [found["whole"]]
    else:
        sections = found["loops"]
        roles = loop_roles(len(sections), work)
        if roles[0][0] == "other":  # the unmasked loop is the shorter; the masked one pays for its compares
            by_size = sorted(range(len(sections)), key=lambda i: sections[i]["insts"])
            roles = [("main" if i == by_size[0] else "masked" if i == by_size[-1] else "other", work.per_iteration)
                     for i in range(len(sections))]
    main = [(s, per) for s, (role, per) in zip(sections, roles) if role == "main"]
    masked = [(s, per) for s, (role, per) in zip(sections, roles) if role == "masked"]
    figures = _sum_figures([per_unit(s, per, num_warps) for s, per in main])
    model = model_cycles(figures, work.min_bytes, arch)
    main_sections = [s for s, _ in main]
    ex2, fixups = sum(s["mufu"].get("EX2", 0) for s in main_sections), sum(s["exp_fixups"] for s in main_sections)
    return dict(
        unit=work.unit,
        loops=len(found["loops"]),
        insts_per_unit=round(figures["insts"], 3),
        masked_insts_per_unit=round(sum(per_unit(s, per, num_warps)["insts"] for s, per in masked), 3) if masked
        else None,
        outside_loop_insts=found["outside"]["insts"],
        mufu=_merge_counts(main_sections, "mufu"),
        mufu_per_unit=round(figures["mufu"], 4),
        exp_ftz=None if not ex2 else fixups == 0,
        load_widths=_merge_counts(main_sections, "memory"),
        tma=found["whole"]["memory"].get("UTMALDG", 0) + found["whole"]["memory"].get("UTMASTG", 0),
        bytes_per_unit=round(figures["bytes"], 3),
        min_bytes_per_unit=round(work.min_bytes, 3),
        mma=_merge_counts(main_sections, "mma"),
        mma_flops_per_unit=figures["mma_flops"],
        mma_redundancy=round(figures["mma_flops"] / work.mma_flops, 3) if work.mma_flops else None,
        model={k: (round(v, 2) if isinstance(v, float) else v) for k, v in model.items()},
        model_cycles_per_unit=round(model["cycles"], 2),
    )


# --------------------------------------------------------------------------- compile


def cubin_contents(cubin: bytes) -> tuple[dict, str]:
    """A compiled kernel's resource usage (``cuobjdump -res-usage``) and its SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, "kernel.cubin")
        with open(cubin_path, "wb") as handle:
            handle.write(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin_path], check=True, capture_output=True,
                              text=True).stdout
        return _resource_usage(cubin_path), sass


def compile_specialised(specialised: tuple, variant: KernelVariant, arch: str) -> Any:
    """Compile ``specialise(variant, arch)``'s result for ``arch`` with the variant's launch
    options: the compiled kernel (``.asm["cubin"]``, ``.metadata``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs, _ = specialised
    return triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", ARCHS[arch]["cc"], 32),
        options={"num_warps": variant.num_warps, "num_stages": variant.num_stages, **variant.options},
    )


def compile_variant(variant: KernelVariant, arch: str) -> dict:
    """Compile one variant for one architecture and describe the result."""
    limits = ARCHS[arch]
    row = {
        "op": variant.op,
        "pass": variant.pass_,
        "impl": variant.impl,
        "kernel": getattr(_jit_function(variant.kernel), "__name__", str(variant.kernel)),
        "dtype": variant.config.get("dtype"),
        "arch": arch,
        "workload": variant.workload,
        "config": {k: v for k, v in variant.config.items() if k != "dtype"},
        "num_warps": variant.num_warps,
        "num_stages": variant.num_stages,
        "shared_limit": limits["shared_limit"],
    }
    try:
        specialised = specialise(variant, arch)
        fn, signature, _, attrs, _ = specialised
        names = list(signature)
        row["divisible_16"] = [names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr]
        row["equal_to_1"] = [p.name for p in fn.params if not p.is_constexpr and signature[p.name] == "constexpr"]
        compiled = compile_specialised(specialised, variant, arch)
    except Exception as exc:  # an out-of-resources config is a finding, not a crash
        return {**row, "error": _error_line(exc)}
    usage, sass = cubin_contents(compiled.asm["cubin"])
    shared = int(compiled.metadata.shared)
    registers = usage.get("REG", 0)
    return {
        **row,
        "registers": registers,
        "spill_bytes": usage.get("LOCAL", 0) + usage.get("STACK", 0),
        "shared_bytes": shared,
        "occupancy": round(occupancy(registers, shared, variant.num_warps, limits["shared_per_sm"]), 3),
        "hmma": len(re.findall(r"\bHMMA\.", sass)),
        "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
        **_cost_or_error(sass, variant, arch),
    }


def _cost_or_error(sass: str, variant: KernelVariant, arch: str) -> dict:
    """The cost columns, or, where the SASS does not have the loops the Work describes, the
    reason as the row's error (listed as a problem, never dropped)."""
    try:
        return cost_columns(sass, variant.work, variant.num_warps, arch)
    except ValueError as exc:
        return {"error": f"cost: {exc}"}


def _error_line(exc: Exception) -> str:
    """One line for a failed build: the exception's first line and, for a compile-time
    assertion (whose message ends with the failed condition), its last; and the first line
    of the error that caused it (a compilation error's message is the source position)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and line.strip() != "^"]
    text = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    if exc.__cause__ is not None:
        text += f" (caused by {_error_line(exc.__cause__)})"
    return f"{type(exc).__name__}: {text}"[:400]


def variants(ops: Optional[Sequence[str]] = None, dtypes: Iterable[str] = DTYPES,
             workload_name: str = "gpt2") -> list[KernelVariant]:
    """Every registered kernel variant for the workload, optionally only for the ops named."""
    found = []
    for module_name in OP_MODULES:
        module = importlib.import_module(module_name)
        for dtype_name in dtypes:
            for variant in module.aot_variants(DTYPES[dtype_name], workload(workload_name)):
                if ops is None or variant.op in ops:
                    found.append(variant)
    return found


# A "source" names a function returning variants: "module:function", called with the
# keyword arguments given. Compile workers list the variants again and take theirs by index
# (kernels and meta tensors do not travel between processes).
SOURCE = "fusedgpt.kernels.compile_report:variants"


_LISTED: dict = {}


def _listed(source: str, kwargs: dict) -> list[KernelVariant]:
    """The variants of a source, listed once per process."""
    key = (source, json.dumps(kwargs, sort_keys=True))
    if key not in _LISTED:
        module_name, function = source.split(":")
        _LISTED[key] = getattr(importlib.import_module(module_name), function)(**kwargs)
    return _LISTED[key]


def _compile_job(job: tuple[str, dict, int, str]) -> dict:
    source, kwargs, index, arch = job
    return compile_variant(_listed(source, kwargs)[index], arch)


def report(
    archs: Sequence[str] = ("sm_80", "sm_90"),
    ops: Optional[Sequence[str]] = None,
    workers: Optional[int] = None,
    workload_name: str = "gpt2",
    dtypes: Iterable[str] = DTYPES,
    source: str = SOURCE,
    source_kwargs: Optional[dict] = None,
) -> list[dict]:
    """Compile everything in parallel processes and return one row per variant x arch.
    ``source``/``source_kwargs`` replace the fusedgpt listing (the peers use this)."""
    unknown = [arch for arch in archs if arch not in ARCHS]
    if unknown:
        raise ValueError(f"unknown architecture(s) {unknown}; known: {sorted(ARCHS)}")
    kwargs = source_kwargs if source_kwargs is not None else dict(
        ops=ops, dtypes=list(dtypes), workload_name=workload(workload_name).name)
    listed = _listed(source, kwargs)
    jobs = [(source, kwargs, index, arch) for index, variant in enumerate(listed) for arch in archs
            if not variant.archs or arch in variant.archs]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(_compile_job, jobs))


def problems(rows: Sequence[dict]) -> list[str]:
    """What makes a row unhealthy: a compile error, spills, or shared memory over the limit."""
    found = []
    for row in rows:
        where = f"{row['op']}/{row['kernel']} {row['dtype']} {row['arch']} {row['config']}"
        if "error" in row:
            cost = row["error"].startswith("cost:")
            found.append(f"{where}: {'its cost cannot be read' if cost else 'does not compile'}: {row['error']}")
            continue
        if row["spill_bytes"]:
            found.append(f"{where}: spills {row['spill_bytes']} bytes")
        if row["shared_bytes"] > row["shared_limit"]:
            found.append(f"{where}: needs {row['shared_bytes']} B shared memory, limit {row['shared_limit']}")
    return found


def _widths(counts: dict) -> str:
    return " ".join(f"{name}x{count}" for name, count in sorted(counts.items())) or "-"


def format_table(rows: Sequence[dict]) -> str:
    header = ["op", "pass", "kernel", "dtype", "arch", "config", "warps", "stages", "regs", "spill B",
              "smem B", "smem limit", "occupancy", "HMMA", "HGMMA", "unit", "insts/unit", "masked insts/unit",
              "global mem (loop)", "B/unit (min)", "MUFU/unit", "exp FTZ", "MMA redundancy", "model cyc/unit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        config = " ".join(f"{k}={v}" for k, v in row["config"].items())
        head = [row["op"], row["pass"], row["kernel"], row["dtype"], row["arch"], config, str(row["num_warps"]),
                str(row["num_stages"])]
        if "error" in row:
            cells = head + ["error: " + row["error"]] + [""] * (len(header) - len(head) - 1)
        else:
            masked = row["masked_insts_per_unit"]
            cells = head + [
                str(row["registers"]), str(row["spill_bytes"]), str(row["shared_bytes"]), str(row["shared_limit"]),
                f"{row['occupancy']:.2f}", str(row["hmma"]), str(row["hgmma"]), row["unit"],
                f"{row['insts_per_unit']:.3g}", "" if masked is None else f"{masked:.3g}", _widths(row["load_widths"]),
                f"{row['bytes_per_unit']:.3g} ({row['min_bytes_per_unit']:.3g})", f"{row['mufu_per_unit']:.3g}",
                {None: "-", True: "yes", False: "no"}[row["exp_ftz"]],
                "-" if row["mma_redundancy"] is None else f"{row['mma_redundancy']:.2f}",
                f"{row['model_cycles_per_unit']:.3g} ({row['model']['bound']})",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated: sm_80, sm_90")
    parser.add_argument("--op", default=None, help="comma-separated op names (default: all)")
    parser.add_argument("--workload", default="gpt2", help=f"one of {', '.join(WORKLOADS)}")
    parser.add_argument("--dtype", default=",".join(DTYPES), help="comma-separated: fp32, fp16, bf16")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")


def run(args: argparse.Namespace) -> int:
    """The `fusedgpt kernels inspect` command. Exit status 1 when a row is unhealthy."""
    from fusedgpt.kernels.triton_compat import TRITON_IMPORT_ERROR

    if TRITON_IMPORT_ERROR:
        raise _backend.BackendUnavailableError(f"the compile report needs Triton: {TRITON_IMPORT_ERROR}")
    if _backend.interpreter_on():
        # The interpreter replaces @triton.jit kernels with Python stand-ins that cannot be
        # compiled; the report runs in a child process without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = ["--arch", args.arch, "--workload", args.workload, "--dtype", args.dtype]
        argv += (["--op", args.op] if args.op else []) + (["--json"] if args.json else [])
        argv += ["--workers", str(args.workers)] if args.workers else []
        return subprocess.call([sys.executable, "-m", "fusedgpt.kernels.compile_report", *argv], env=env)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    ops = [o.strip() for o in args.op.split(",")] if args.op else None
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad_dtypes = [d for d in dtypes if d not in DTYPES]
    if bad_dtypes:
        raise SystemExit(f"--dtype: unknown {bad_dtypes}; known: {list(DTYPES)}")
    known_ops = sorted({variant.op for variant in variants(workload_name=workload(args.workload).name)})
    bad_ops = [op for op in ops or () if op not in known_ops]
    if bad_ops:  # else the report would have 0 builds and pass
        raise SystemExit(f"--op: unknown {bad_ops}; known: {known_ops}")
    rows = report(archs, ops, args.workers, workload(args.workload).name, dtypes)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
        bad = problems(rows)
        print(f"\n{len(rows)} kernel builds, {len(bad)} problem(s)")
        for line in bad:
            print("  " + line)
    return 1 if problems(rows) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedgpt kernels inspect", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
