"""Bytes-moved audit of one GPT-2 training step: the bytes every op reads and writes, fused
model vs the same model on eager PyTorch ops. A model of memory traffic, not a measurement.

    python -m bench.step_bytes [--batch 8 --context 1024 --out bench/results/step-bytes]

What runs: one whole training step as ``fusedgpt train`` takes it on a GPU (the forward
under bf16 autocast over fp32 weights, ``loss.backward()``, gradient-norm clipping, fused
AdamW, ``zero_grad(set_to_none=True)``) under ``FakeTensorMode``: shapes, dtypes and
strides propagate, nothing is computed or allocated, so GPT-2 124M at full size takes
seconds on a CPU. The fake tensors are CPU tensors (autograd cannot run on fake CUDA
tensors in a build without CUDA), so three things are set as on CUDA: the dispatcher picks
the Triton ops (each fused op's fake implementation gives its outputs; no kernel runs),
AdamW is the fused one, and CPU autocast follows CUDA's fp32 rule for the two ops where
the lists differ for these models (softmax, log_softmax: eager path only). A first step
runs unrecorded, so the recorded one is steady: AdamW's state exists, every gradient is
written fresh (``set_to_none``). Left out: ``GPT.forward``'s check of the token ids'
range and the trainer's ``.item()`` reads (fake tensors hold no values; a few bytes).

What is counted: a ``TorchDispatchMode`` sees every aten and ``fusedgpt::`` op at the
dispatcher, below autograd, and records its **compulsory traffic**: each distinct tensor
input read once, each output written once (bytes of the memory a tensor spans: a
broadcast (stride 0) dimension counts once). In-place ops read and write their target;
``copy_``, ``fill_``, ``zero_`` and ``out=`` arguments are written, not read. Free, never
counted: ops whose outputs are views of their inputs by their schema (view, reshape as a
view, t, transpose, expand, slice, split, as_strided, detach, ...), ``_unsafe_view`` (the
rename after a copying reshape, which itself is counted) and allocations (``empty``, whose
memory nobody writes yet). Casts (``_to_copy``) are never free: they read and write.

What that misses, and the model's two extra columns: a fused op is counted at its boundary,
but its kernels may read more. Flash attention reads K and V once per query block (the IO
paragraph of ``fusedgpt/kernels/attention.py``); the fused linear + cross-entropy runs a
few cuBLAS matmuls and a kernel per chunk of tokens, reading the head weight each time. The
``modelled`` column replaces those ops' compulsory bytes with their kernels' modelled reads
and writes (formulas below, no cache reuse assumed); every other op is taken as moving its
compulsory bytes, which eager PyTorch's elementwise kernels and cuBLAS roughly do.

The eager path is ``bench.plain_gpt.PlainGPT`` with textbook attention (the T x T scores and
probabilities materialised), ``F.layer_norm`` and a separate residual add, and
``F.cross_entropy`` on the full logits — the memory audit's baseline (``bench/memory.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import types
import warnings
from collections import defaultdict
from typing import Callable, Iterator, Optional
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench import common

# The GPU modelled (H100 SXM, H200): the loss is chunked for it (a chunk of tokens is a
# whole number of the cross-entropy kernel's waves over its 132 SMs).
MODELLED_SMS = 132

# Ops whose in-place targets are written without being read first.
WRITE_ONLY_IN_PLACE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_"}
# Free ops that the schema does not mark as views: the rename after a copying reshape, and
# the aliases autograd and fake tensors make.
FREE_OPS = {"_unsafe_view", "lift_fresh", "alias", "empty", "empty_strided", "empty_like", "new_empty",
            "new_empty_strided", "_reshape_alias", "detach", "resize_"}
# Arguments a schema marks as mutated that the op only reads: fused AdamW writes the
# gradients only when it unscales them (grad_scale given; the trainer never does).
READ_ONLY_ARGUMENTS = {"_fused_adamw_": {"grads"}, "_fused_adam_": {"grads"}}

FUSED_NORM_OPS = {"fusedgpt.layer_norm_fwd", "fusedgpt.layer_norm_bwd"}
ATTENTION_OPS = {"fusedgpt.flash_attention_fwd", "fusedgpt.flash_attention_bwd",
                 "fusedgpt.flash_attention_qkvpacked_bwd"}
LOSS_OPS = {"fusedgpt.linear_cross_entropy_fwd", "fusedgpt.linear_cross_entropy_bwd", "fusedgpt.checked_target",
            "aten._log_softmax", "aten._log_softmax_backward_data", "aten.nll_loss_forward",
            "aten.nll_loss_backward"}

CATEGORIES = ["matmul (linear)", "layernorm (+ residual add)", "attention", "activation (GELU)", "embedding",
              "head + loss", "casts", "optimizer (clip + AdamW)", "other"]
PHASES = ["forward", "backward", "optimizer"]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of memory the tensor spans: every element once, a broadcast (stride 0)
    dimension once."""
    count = 1
    for size, stride in zip(t.shape, t.stride()):
        count *= size if stride != 0 else min(size, 1)
    return count * t.element_size()


def _tensors(value) -> list[torch.Tensor]:
    return [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


def _key(t: torch.Tensor) -> tuple:
    """One tensor's memory: the same storage, from the same offset over as many bytes, is
    one read (``a`` and ``a.t()`` passed to one op are one)."""
    return (t.untyped_storage()._cdata, t.storage_offset(), tensor_bytes(t))


def _short_name(func) -> str:
    """``aten.mm`` / ``fusedgpt.layer_norm_fwd`` (namespace and op, no overload)."""
    return f"{func.namespace}.{func._schema.name.split('::')[-1]}"


def is_free(func) -> bool:
    """No bytes move: a view (every tensor output aliases an input, none written), an
    allocation, or a rename."""
    name = func._schema.name.split("::")[-1]
    if func.namespace in ("prim", "profiler") or name in FREE_OPS:  # metadata, profiler marks
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _partial_reads(name: str, bound: dict, out) -> dict[str, int]:
    """Bytes actually read of the inputs that an op only gathers from or looks at the shape
    of, by argument name."""
    if name == "embedding":
        return {"weight": sum(tensor_bytes(t) for t in _tensors(out))}  # the rows gathered
    if name == "nll_loss_forward":  # one logit per row
        return {"self": bound["target"].numel() * bound["self"].element_size()}
    if name == "nll_loss_backward":  # self's shape only
        return {"self": 0}
    return {}


def op_traffic(func, args: tuple, kwargs: dict, out) -> tuple[int, int]:
    """(bytes read, bytes written) of one op if it reads each distinct input once and
    writes each output once."""
    name = func._schema.name.split("::")[-1]
    reads: dict = {}
    writes: dict = {}
    bound = dict(zip((a.name for a in func._schema.arguments), args))
    bound.update(kwargs)
    read_only = READ_ONLY_ARGUMENTS.get(name, set())
    partial = _partial_reads(name, bound, out)
    for argument in func._schema.arguments:
        if argument.name not in bound:
            continue
        mutated = argument.alias_info is not None and argument.alias_info.is_write and argument.name not in read_only
        for t in _tensors(bound[argument.name]):
            if mutated:
                writes[_key(t)] = tensor_bytes(t)
                if name not in WRITE_ONLY_IN_PLACE and not argument.kwarg_only:
                    reads[_key(t)] = tensor_bytes(t)
            else:
                reads[_key(t)] = partial.get(argument.name, tensor_bytes(t))
    for t in _tensors(out):
        if _key(t) not in writes:
            writes[_key(t)] = tensor_bytes(t)
    return sum(reads.values()), sum(writes.values())


class TrafficRecorder(TorchDispatchMode):
    """Records every op that reaches the dispatcher: its phase, where in the model it ran
    (``scope``), and its compulsory bytes read and written. ``phase`` and ``scope`` are set
    from outside (the step and the module hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict] = []
        self.phase = "forward"
        self.scopes: list[str] = [""]
        self.node_scopes: dict = {}  # autograd node -> the scope that made it (for the backward)
        self.enabled = True

    def __torch_dispatch__(self, func, _types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.enabled and not is_free(func):
            read, written = op_traffic(func, args, kwargs, out)
            if read or written:
                self.records.append(dict(
                    phase=self.phase, op=_short_name(func), scope=self._scope(), read=read, written=written,
                    inputs=_describe(_tensors((args, kwargs))), outputs=_describe(_tensors(out)),
                ))
        return out

    def _scope(self) -> str:
        if self.phase != "backward":
            return self.scopes[-1]
        node = torch._C._current_autograd_node()
        return self.node_scopes.get(node, "") if node is not None else ""


def _describe(tensors: list[torch.Tensor]) -> list[list]:
    """[shape, dtype name, bytes] of each tensor."""
    return [[list(t.shape), str(t.dtype)[6:], tensor_bytes(t)] for t in tensors]


def _tag_graph(roots, scope: str, node_scopes: dict, since: int = 0) -> None:
    """Give this scope every autograd node reachable from ``roots`` that was made from
    sequence number ``since`` on (while the scope ran) and has no scope yet. Module hooks
    run innermost first, so a node belongs to the innermost module that made it."""
    stack = [r.grad_fn for r in roots if isinstance(r, torch.Tensor) and r.grad_fn is not None]
    visited = set()
    while stack:
        node = stack.pop()
        if node is None or node in visited or node._sequence_nr() < since:
            continue
        visited.add(node)
        node_scopes.setdefault(node, scope)
        stack.extend(next_node for next_node, _ in node.next_functions)


@contextlib.contextmanager
def module_scopes(model: torch.nn.Module, recorder: TrafficRecorder) -> Iterator[None]:
    """Keep ``recorder.scopes`` at the module running now, and tag the autograd nodes each
    module's forward made with its name."""
    handles, starts = [], []
    for name, module in model.named_modules():
        def pre(_module, _inputs, name=name):
            recorder.scopes.append(name)
            starts.append(torch._C._autograd._get_sequence_nr())

        def post(_module, _inputs, output, name=name):
            recorder.scopes.pop()
            _tag_graph(_tensors(output), name, recorder.node_scopes, since=starts.pop())

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# CUDA's autocast runs these in fp32 (its fp32 list); CPU autocast leaves them in their
# input's dtype. Only the eager path calls them (its attention and its loss).
CUDA_FP32_OPS = ("softmax.int", "log_softmax.int")


@contextlib.contextmanager
def cuda_autocast_policy(dtype: torch.dtype) -> Iterator[None]:
    """CPU autocast to ``dtype`` with CUDA's rules for the ops the two models call: the
    matmuls in ``dtype`` (both devices' lists agree) and ``CUDA_FP32_OPS`` in fp32, as on
    CUDA. The override is registered for the audit only."""
    library = torch.library.Library("aten", "IMPL")
    autocast_key = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def in_fp32(op):
        def kernel(x, dim, out_dtype=None):
            with torch._C._ExcludeDispatchKeyGuard(autocast_key):
                return op(x.float() if x.is_floating_point() else x, dim, out_dtype)
        return kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": on purpose
        for name in CUDA_FP32_OPS:
            base, overload = name.split(".")
            library.impl(name, in_fp32(getattr(getattr(torch.ops.aten, base), overload)), "AutocastCPU")
    try:
        with torch.autocast("cpu", dtype=dtype):
            yield
    finally:
        library._destroy()


def training_step(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor, optimizer, recorder,
                  dtype: torch.dtype) -> None:
    """The trainer's step (``Trainer.train_step`` with one micro-batch): forward under
    autocast, backward, clip, AdamW, zero_grad. The trainer's ``.item()`` reads of the loss
    and the norm are left out: fake tensors hold no values (and they move a few bytes)."""
    recorder.phase = "forward"
    with module_scopes(model, recorder), cuda_autocast_policy(dtype):
        loss = model(idx, targets)
    _tag_graph([loss], "", recorder.node_scopes)
    recorder.phase = "backward"
    loss.backward()
    recorder.phase = "optimizer"
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def record_step(path: str, config, batch: int, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """The ops of one steady training step of ``path`` ("fused": ``fusedgpt.model.GPT``;
    "eager": ``PlainGPT`` with math attention), each with its phase, scope and bytes."""
    from bench.plain_gpt import PlainGPT
    from fusedgpt.model.gpt import GPT
    from fusedgpt.train.optim import Optimization

    recorder = TrafficRecorder()
    # On a GPU the dispatcher picks the Triton kernels; for these fake bf16 CPU tensors it
    # would pick the reference. Nothing launches under fake tensors (each fused op's fake
    # implementation gives its outputs), so the choice is made as on CUDA.
    with FakeTensorMode(), mock.patch("fusedgpt.kernels.backend.why_triton_cannot_run", lambda tensors: None):
        model = GPT(config) if path == "fused" else PlainGPT(config, attention="math")
        if path == "fused":
            # GPT.forward checks the token ids' range by reading them: fake tensors hold no
            # values (the check reads B x T x 8 bytes twice).
            model._check_inputs = lambda *args: None
        idx = torch.randint(0, config.vocab_size, (batch, config.context_length))
        targets = torch.randint(0, config.vocab_size, (batch, config.context_length))
        # The trainer's optimizer as on CUDA: AdamW, fused.
        optimizer = Optimization(lr=1e-3, max_steps=10).optimizer(model, torch.device("cuda"))
        with recorder:
            recorder.enabled = False  # a first step creates AdamW's state
            training_step(model, idx, targets, optimizer, recorder, dtype)
            recorder.enabled = True
            recorder.node_scopes.clear()
            training_step(model, idx, targets, optimizer, recorder, dtype)
    for record in recorder.records:
        record["category"] = category(record)
    return recorder.records



def category(record: dict) -> str:
    """Which part of the model an op belongs to, from its name and the module that ran it."""
    op, scope = record["op"], record["scope"]
    leaf = scope.rsplit(".", 1)[-1]
    if record["phase"] == "optimizer":
        return "optimizer (clip + AdamW)"
    if op == "aten._to_copy":
        return "casts"
    if op in FUSED_NORM_OPS or op.startswith("aten.native_layer_norm") or leaf in ("ln_1", "ln_2", "ln_f"):
        return "layernorm (+ residual add)"
    if op in ATTENTION_OPS:
        return "attention"
    if op.startswith("aten.gelu") or leaf == "gelu":
        return "activation (GELU)"
    if op.startswith("aten.embedding") or leaf in ("wte", "wpe", "drop"):
        return "embedding"
    if op in LOSS_OPS or leaf == "lm_head":
        return "head + loss"
    if leaf in ("c_attn", "c_proj", "c_fc"):
        return "matmul (linear)"
    if leaf == "attn":
        return "attention"
    if scope.startswith("transformer.h.") and leaf.isdigit() and op.startswith("aten.add"):
        return "layernorm (+ residual add)"  # the eager block's residual adds
    if scope in ("", "transformer.drop"):
        # The model's own forward: the embeddings' sum (in the backward, its reduction to
        # the position embedding's gradient), then the loss's bookkeeping around the head.
        if op == "aten.arange" or (op in ("aten.add", "aten.sum") and len(record["outputs"][0][0]) == 3):
            return "embedding"
        if op != "aten.ones_like":  # the backward's seed
            return "head + loss"
    return "other"


# ------------------------------------------------------------------ the kernels' re-reads


def attention_kernel_bytes(record: dict) -> int:
    """Modelled bytes of one ``fusedgpt::flash_attention_fwd``/``_bwd`` call, from the IO
    paragraph of ``fusedgpt/kernels/attention.py``: per (batch, head), the forward reads Q
    once and K, V once per query block (the causally visible keys only) and writes O and
    the fp32 logsumexp L. The backward the launcher takes by default, the fused one: its
    delta kernel reads O and dO and writes delta; its dK/dV kernel reads K, V once and Q,
    dO, L, delta once per key block that sees them, writes dK, dV, adds into the fp32 dQ
    sums (T x the head-dim block) once per key block that sees them, and its last program
    reads the sums, zeroes them and writes dQ. Tiles: each kernel's long-sequence config
    (the last of its autotune list for this dtype and head dim, no dropout); no reuse
    through the L2 cache (so the additions and the last read are charged as if they went
    to HBM, where the static tool takes them to L2)."""
    from fusedgpt.kernels.attention import gpu_configs, head_dim_block

    q_shape, q_dtype, _ = record["inputs"][0] if record["op"].endswith("fwd") else record["inputs"][1]
    if "qkvpacked" in record["op"]:  # (B, T, 3, H, D)
        b, t, _, h, d = q_shape
    else:
        b, h, t, d = q_shape
    dtype = getattr(torch, q_dtype)
    row = d * torch.empty((), dtype=dtype).element_size()  # bytes of one token's head in Q, K, V, O
    sums_row = head_dim_block(d) * 4
    tiles = {kind: gpu_configs(kind, dtype, head_dim_block(d), dropout=False)[-1].kwargs for kind in ("fwd", "bwd")}

    def keys_seen(block_m: int, block_n: int) -> int:
        """Key rows loaded over all query blocks of one head (causal, whole key blocks)."""
        return sum(min(t, -(-min(t, start + block_m) // block_n) * block_n) for start in range(0, t, block_m))

    if record["op"].endswith("fwd"):
        per_head = t * row + 2 * keys_seen(tiles["fwd"]["BLOCK_M"], tiles["fwd"]["BLOCK_N"]) * row + t * (row + 4)
    else:
        delta = 2 * t * row + t * 4
        block_m, block_n = tiles["bwd"]["BLOCK_M"], tiles["bwd"]["BLOCK_N"]
        queries_seen = sum(t - start // block_m * block_m for start in range(0, t, block_n))
        dkdv = 2 * t * row + queries_seen * (2 * row + 8 + sums_row) + 2 * t * row
        dq = t * (2 * sums_row + row)
        per_head = delta + dkdv + dq
    return b * h * per_head


def linear_cross_entropy_kernel_bytes(record: dict, sms: int = MODELLED_SMS) -> int:
    """Modelled bytes of one ``fusedgpt::linear_cross_entropy_fwd`` call ("mean": logits,
    loss and all gradients in the forward), chunk by chunk as ``_chunked`` runs it on a GPU
    of ``sms`` SMs: per chunk of c tokens, the logits matmul (reads h_c and the whole head
    weight W, writes c x V), the cross-entropy kernel (reads each logit twice, writes the
    gradient over it), grad_h = dlogits @ W (reads dlogits and W again), dlogits^T @ h_c in
    W's dtype, added into the fp32 weight accumulator (read, add, write: V x H x 4 each
    way). Once: the accumulator's zeros, the targets, two fp32 floats per token."""
    from fusedgpt.kernels.cross_entropy import rows_per_wave
    from fusedgpt.kernels.linear_cross_entropy import default_chunk_size

    (n, hidden), dtype_name, _ = record["inputs"][0]
    vocab = record["inputs"][1][0][0]
    dtype = getattr(torch, dtype_name)
    size = torch.empty((), dtype=dtype).element_size()
    properties = types.SimpleNamespace(multi_processor_count=sms)
    with mock.patch("torch.cuda.get_device_properties", lambda device=None: properties):
        wave = rows_per_wave(torch.device("cuda"), vocab, dtype, 0.0)
    chunk = default_chunk_size(n, vocab, dtype, use_triton=True, wave=wave)
    weight, accumulator = vocab * hidden * size, vocab * hidden * 4
    total = accumulator + n * 8 + n * 8  # zeros, targets, loss and nll
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        logits, rows = c * vocab * size, c * hidden * size
        total += rows + weight + logits                 # logits = h_c @ W.T
        total += 3 * logits                              # the kernel: read twice, write once
        total += logits + weight + rows                  # grad_h = dlogits @ W
        total += logits + rows + weight                  # dlogits.T @ h_c, in W's dtype
        total += accumulator + weight + accumulator      # accumulator += that
    return total


MODELLED_OPS: dict[str, Callable[[dict], int]] = {
    "fusedgpt.flash_attention_fwd": attention_kernel_bytes,
    "fusedgpt.flash_attention_bwd": attention_kernel_bytes,
    "fusedgpt.flash_attention_qkvpacked_bwd": attention_kernel_bytes,
    "fusedgpt.linear_cross_entropy_fwd": linear_cross_entropy_kernel_bytes,
}


def modelled_bytes(record: dict) -> int:
    """The op's modelled bytes: its kernels' re-reads where the op is in MODELLED_OPS, its
    compulsory bytes otherwise."""
    model = MODELLED_OPS.get(record["op"])
    return model(record) if model else record["read"] + record["written"]


# ------------------------------------------------------------------ the audit and its tables


def audit(batch: int, context: int, preset: str = "gpt2") -> dict:
    """Both paths' records for one training step of ``preset`` (GPT-2 124M by default) at
    ``batch`` x ``context`` tokens, each record with its compulsory and modelled bytes."""
    from fusedgpt.model.config import GPTConfig

    config = GPTConfig.from_preset(preset, context_length=context, backend="triton")
    records = {}
    for path in ("eager", "fused"):
        records[path] = record_step(path, config, batch)
        for record in records[path]:
            record["bytes"] = record["read"] + record["written"]
            record["modelled"] = modelled_bytes(record) if path == "fused" else record["bytes"]
    return dict(config=config.to_dict(), batch=batch, records=records)


def totals(records: list[dict], key: str = "bytes") -> dict[str, int]:
    """Bytes per pass and in all."""
    sums = {phase: 0 for phase in PHASES}
    for record in records:
        sums[record["phase"]] += record[key]
    sums["step"] = sum(sums[phase] for phase in PHASES)
    return sums


def by_category(records: list[dict], key: str = "bytes") -> dict[tuple[str, str], int]:
    sums: dict = defaultdict(int)
    for record in records:
        sums[record["category"], record["phase"]] += record[key]
        sums[record["category"], "step"] += record[key]
    return sums


def _pattern(scope: str) -> str:
    """The scope with its layer number made a wildcard: one row for all twelve blocks."""
    parts = scope.split(".")
    return ".".join("*" if part.isdigit() else part for part in parts)


def _shapes(tensors: list[list]) -> str:
    """``[8192, 768]bfloat16 ...``; a long list (AdamW's) as its count and size."""
    if len(tensors) > 6:
        return f"{len(tensors)} tensors, {gigabytes(sum(size for _, _, size in tensors)):.3g} GB"
    return " ".join(f"{shape}{dtype}" for shape, dtype, _ in tensors)


def grouped_ops(records: list[dict]) -> list[dict]:
    """Records of the same op on the same tensors in the same place (any layer) summed, the
    largest first."""
    groups: dict = {}
    for record in records:
        shapes = f"{_shapes(record['inputs'])} -> {_shapes(record['outputs'])}"
        key = (record["phase"], record["op"], _pattern(record["scope"]), shapes)
        group = groups.setdefault(key, dict(phase=key[0], op=key[1], scope=key[2] or "(model)", tensors=shapes,
                                            category=record["category"], calls=0, bytes=0, modelled=0))
        group["calls"] += 1
        group["bytes"] += record["bytes"]
        group["modelled"] += record["modelled"]
    return sorted(groups.values(), key=lambda g: -g["bytes"])


def layer_norm_path(records: list[dict]) -> dict:
    """Bytes per element of the fused add + LayerNorm (the norms that take a pending branch
    and the fp32 stream), forward and backward, against the least its dtypes allow: forward
    reads the branch and the stream and writes the sum and the normed output; backward reads
    dy, the saved sum and the stream's gradient and writes the stream's and the branch's
    gradients. Per-row statistics and the weights are counted apart (``with_stats``)."""
    result = {}
    for op, phase in (("fusedgpt.layer_norm_fwd", "forward"), ("fusedgpt.layer_norm_bwd", "backward")):
        calls = [r for r in records if r["op"] == op]
        if phase == "forward":  # with a residual: x and residual both (M, N)
            calls = [r for r in calls if sum(len(shape) == 2 for shape, _, _ in r["inputs"]) == 2]
        else:  # with the stream's gradient: dy, x and dsummed (M, N)
            calls = [r for r in calls if sum(len(shape) == 2 for shape, _, _ in r["inputs"]) == 3]
        if not calls:
            continue
        m, n = calls[0]["inputs"][0][0]
        elements = m * n * len(calls)
        rows = sum(size for r in calls for shape, _, size in r["inputs"] + r["outputs"] if shape == [m, n])
        sizes = {dtype: torch.empty((), dtype=getattr(torch, dtype)).element_size()
                 for r in calls for _, dtype, _ in r["inputs"] + r["outputs"]}
        first = calls[0]
        if phase == "forward":  # x, residual in; y, summed out
            x, residual = first["inputs"][0][1], first["inputs"][1][1]
            least = sizes[x] + 2 * sizes[residual] + sizes[first["outputs"][0][1]]
        else:  # dy, x (the sum), dsummed in; dx, dbranch out
            dy, stream, branch = first["inputs"][0][1], first["inputs"][1][1], first["outputs"][1][1]
            least = sizes[dy] + 3 * sizes[stream] + sizes[branch]
        result[phase] = dict(calls=len(calls), elements=elements, per_element=rows / elements,
                             with_stats=sum(r["bytes"] for r in calls) / elements, least=least)
    return result


def gigabytes(value: float) -> float:
    return value / 1e9


def report(result: dict) -> tuple[str, dict]:
    """The markdown report and the JSON summary of an :func:`audit`."""
    eager, fused = result["records"]["eager"], result["records"]["fused"]
    config, batch = result["config"], result["batch"]
    label = (f"GPT-2 ({config['n_layer']} layers, {config['n_head']} heads, C={config['n_embd']}, "
             f"V={config['vocab_size']}), batch {batch}, T={config['context_length']}, bf16 autocast, fused AdamW")
    pass_rows, summary = [], dict(label=label, **common.versions(), model_not_measurement=True, totals={},
                                  categories={}, layer_norm_path={}, top_fused_ops=[])
    eager_totals, fused_totals, modelled_totals = totals(eager), totals(fused), totals(fused, "modelled")
    for phase in PHASES + ["step"]:
        pass_rows.append({"pass": phase, "eager GB": gigabytes(eager_totals[phase]),
                          "fused GB": gigabytes(fused_totals[phase]),
                          "eager/fused": eager_totals[phase] / max(fused_totals[phase], 1),
                          "fused modelled GB": gigabytes(modelled_totals[phase]),
                          "eager/fused modelled": eager_totals[phase] / max(modelled_totals[phase], 1)})
        summary["totals"][phase] = dict(eager=eager_totals[phase], fused=fused_totals[phase],
                                        fused_modelled=modelled_totals[phase])
    eager_cat, fused_cat, modelled_cat = by_category(eager), by_category(fused), by_category(fused, "modelled")
    category_rows = []
    for name in CATEGORIES:
        row = {"category": name}
        for phase in PHASES + ["step"]:
            short = {"forward": "fwd", "backward": "bwd", "optimizer": "opt", "step": "step"}[phase]
            row[f"eager {short}"] = gigabytes(eager_cat[name, phase])
            row[f"fused {short}"] = gigabytes(fused_cat[name, phase])
        row["fused modelled step"] = gigabytes(modelled_cat[name, "step"])
        row["eager/fused"] = eager_cat[name, "step"] / fused_cat[name, "step"] if fused_cat[name, "step"] else ""
        if eager_cat[name, "step"] or fused_cat[name, "step"]:
            category_rows.append(row)
            summary["categories"][name] = {
                phase: dict(eager=eager_cat[name, phase], fused=fused_cat[name, phase],
                            fused_modelled=modelled_cat[name, phase]) for phase in PHASES + ["step"]}
    top = sorted(grouped_ops(fused), key=lambda g: -g["modelled"])[:10]
    top_rows = [dict(g, **{"GB": gigabytes(g["bytes"]), "modelled GB": gigabytes(g["modelled"]),
                           "% of modelled step": 100 * g["modelled"] / modelled_totals["step"]}) for g in top]
    summary["top_fused_ops"] = [{k: g[k] for k in ("phase", "op", "scope", "tensors", "calls", "bytes", "modelled")}
                                for g in top]
    norm = layer_norm_path(fused)
    summary["layer_norm_path"] = norm
    norm_rows = [{"pass": phase, "calls": v["calls"], "B/element (rows)": v["per_element"],
                  "B/element (+ stats, weights)": v["with_stats"], "least the dtypes allow": v["least"],
                  "at the least": "yes" if abs(v["per_element"] - v["least"]) < 1e-9 else "no"}
                 for phase, v in norm.items()]
    width = config["n_embd"]
    casts = [g for g in grouped_ops(fused) if g["op"] == "aten._to_copy"]
    cast_rows = [dict(g, GB=gigabytes(g["bytes"])) for g in casts if g["bytes"] >= 1e-3 * fused_totals["step"]]
    # What the step does around the head: V x C tensors in the backward, outside the fused ops.
    vocab_rows = [dict(g, GB=gigabytes(g["bytes"])) for g in grouped_ops(fused)
                  if g["phase"] == "backward" and not g["op"].startswith("fusedgpt")
                  and f"[{config['vocab_size']}, {width}]" in g["tensors"]]
    summary["fused_casts"] = [{k: g[k] for k in ("phase", "op", "scope", "tensors", "calls", "bytes")} for g in cast_rows]
    summary["fused_head_weight_gradient_ops"] = [{k: g[k] for k in ("op", "scope", "tensors", "calls", "bytes")}
                                                 for g in vocab_rows]
    versions = common.versions()
    text = f"""# Bytes moved by one training step: fused vs eager

**A model, not a measurement.** {label}. Generated by `python -m bench.step_bytes`
(torch {versions['torch']}, triton {versions['triton']}, commit {versions['commit']}, {versions['date']}).

Counted: every aten and `fusedgpt::` op of one steady training step (forward under bf16
autocast, `loss.backward()`, gradient clipping, fused AdamW), recorded by a
`TorchDispatchMode` under `FakeTensorMode` on the CPU, each op's **compulsory traffic**:
every distinct input read once, every output written once (views, allocations and
metadata are free; casts are not). GB = 10^9 bytes. Eager: `bench.plain_gpt.PlainGPT`, math
attention (T x T scores and probabilities), `F.layer_norm` + separate residual add,
`F.cross_entropy` on full logits. Fused: `fusedgpt.model.GPT` on its Triton ops (chosen as on
CUDA; nothing runs). CPU autocast with CUDA's fp32 rule for softmax and log_softmax. The
tokens' range check (`.item()`) is left out. The **modelled** column replaces the
compulsory bytes of fused attention (re-reads of K, V per query block, Q, dO per key block)
and of the fused linear + cross-entropy (chunked: the head weight read by two matmuls and
the fp32 weight-gradient accumulator read and written per chunk of tokens, chunks sized
for a {MODELLED_SMS}-SM GPU) by their kernels' modelled reads and writes (see
`bench/step_bytes.py`); compulsory counts undercount those two ops. No cache reuse is modelled.

## Per pass

{common.markdown_table(pass_rows, list(pass_rows[0]))}

## Per category (GB)

{common.markdown_table(category_rows, list(category_rows[0]))}

## Top 10 ops of the fused step, by modelled bytes (all layers of a kind summed)

{common.markdown_table(top_rows, ["phase", "op", "scope", "tensors", "calls", "GB", "modelled GB", "% of modelled step"])}

## The add + LayerNorm path of the fused step

The norms that add a pending bf16 branch into the fp32 residual stream
(`fusedgpt::layer_norm_fwd` / `_bwd` with a residual): bytes per element of the (B*T, C)
tensors, and the least their dtypes allow (forward: read branch + stream, write sum + normed
output; backward: read dy, the saved sum and the stream's gradient, write the stream's and
the branch's gradients).

{common.markdown_table(norm_rows, list(norm_rows[0])) if norm_rows else "(none)"}

## Casts in the fused step (each above 0.1% of its bytes)

{common.markdown_table(cast_rows, ["phase", "scope", "tensors", "calls", "GB"])}

## Ops on the (V, C) head/embedding weight gradient in the fused backward

{common.markdown_table(vocab_rows, ["op", "scope", "tensors", "calls", "GB"])}
"""
    return text, summary


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step_bytes", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--preset", default="gpt2", help="a GPT-2 preset of fusedgpt.model.config")
    parser.add_argument("--out", default="bench/results/step-bytes", help="where step-bytes.md and .json go")
    args = parser.parse_args(argv)
    result = audit(args.batch, args.context, args.preset)
    text, summary = report(result)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "step-bytes.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(args.out, "step-bytes.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
