"""The bytes-moved audit of a training step (fake tensors: nothing is computed), on the tiny
preset so that it takes a second or two."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.step_bytes import (
    TrafficRecorder, attention_kernel_bytes, audit, by_category, cuda_autocast_policy, is_free, layer_norm_path,
    totals,
)


@pytest.fixture(scope="module")
def result():
    return audit(batch=2, context=64, preset="tiny")


def record_ops(run) -> list[dict]:
    recorder = TrafficRecorder()
    with FakeTensorMode(), recorder:
        run()
    return recorder.records


def test_each_op_reads_its_inputs_once_and_writes_its_outputs():
    def run():
        a, b = torch.empty(3, 4), torch.empty(4, 5, dtype=torch.float64)
        torch.mm(a, a.t())                       # a read once although passed twice
        a.add_(torch.empty(4).expand(3, 4))     # in place: read and write a; the broadcast row once
        a.copy_(torch.empty(3, 4))              # copy_: the target is written, not read
        b.to(torch.float32)                     # a cast reads fp64 and writes fp32
        a.view(12), a.t(), a.expand(2, 3, 4), a[1:], a.reshape(4, 3), a.detach()  # views: free

    records = record_ops(run)
    traffic = [(r["op"], r["read"], r["written"]) for r in records if not r["op"].startswith("aten.empty")]
    assert traffic == [
        ("aten.mm", 3 * 4 * 4, 3 * 3 * 4),
        ("aten.add_", 3 * 4 * 4 + 4 * 4, 3 * 4 * 4),
        ("aten.copy_", 3 * 4 * 4, 3 * 4 * 4),
        ("aten._to_copy", 4 * 5 * 8, 4 * 5 * 4),
    ]


def test_views_and_allocations_are_free_and_casts_are_not():
    aten = torch.ops.aten
    for op in (aten.view.default, aten.t.default, aten.transpose.int, aten.expand.default, aten.slice.Tensor,
               aten.split.Tensor, aten.as_strided.default, aten._unsafe_view.default, aten.empty.memory_format):
        assert is_free(op), op
    for op in (aten._to_copy.default, aten.clone.default, aten.add_.Tensor, aten.mm.default):
        assert not is_free(op), op


def test_the_step_records_no_free_op(result):
    for path in ("eager", "fused"):
        ops = {r["op"] for r in result["records"][path]}
        assert not ops & {"aten.view", "aten.t", "aten.transpose", "aten.expand", "aten._unsafe_view", "aten.empty"}
        assert {"aten._fused_adamw_", "aten.embedding"} <= ops


def test_fused_step_moves_fewer_bytes_than_eager_in_every_pass(result):
    eager, fused = totals(result["records"]["eager"]), totals(result["records"]["fused"])
    assert fused["forward"] < eager["forward"] and fused["backward"] < eager["backward"]
    assert fused["optimizer"] == eager["optimizer"]  # the same parameters, the same AdamW
    eager_cat, fused_cat = by_category(result["records"]["eager"]), by_category(result["records"]["fused"])
    # The eager attention's T x T traffic (scores, probabilities, their casts to fp32 and
    # back as CUDA's autocast makes them) dominates its attention.
    assert eager_cat["attention", "step"] > 3 * fused_cat["attention", "step"]
    eager_softmax = [r for r in result["records"]["eager"] if r["op"] == "aten._softmax"]
    assert eager_softmax and all(r["inputs"][0][1] == "float32" for r in eager_softmax)


def test_layer_norm_path_bytes_per_element_are_the_dtypes_least(result):
    norm = layer_norm_path(result["records"]["fused"])
    # bf16 branch + fp32 stream in, fp32 sum + bf16 normed out.
    assert norm["forward"]["per_element"] == norm["forward"]["least"] == 2 + 4 + 4 + 2
    # dy bf16, saved fp32 sum, fp32 stream gradient in; fp32 and bf16 gradients out.
    assert norm["backward"]["per_element"] == norm["backward"]["least"] == 2 + 4 + 4 + 4 + 2
    layers = result["config"]["n_layer"]
    assert norm["forward"]["calls"] == 2 * layers  # every norm but the first has a pending branch


def test_modelled_attention_rereads_keys_only_past_one_query_block():
    def record(t):
        q = [[1, 2, t, 64], "bfloat16", 1 * 2 * t * 64 * 2]
        return dict(op="fusedgpt.flash_attention_fwd", inputs=[q, q, q])

    one_block = 2 * (4 * 64 * 64 * 2 + 64 * 4)  # Q, K, V read once; O and fp32 L written once
    assert attention_kernel_bytes(record(64)) == one_block
    long = 2 * (4 * 1024 * 64 * 2 + 1024 * 4)
    assert attention_kernel_bytes(record(1024)) > 2 * long


def test_modelled_fused_loss_is_above_its_compulsory_bytes(result):
    loss = [r for r in result["records"]["fused"] if r["op"] == "fusedgpt.linear_cross_entropy_fwd"]
    assert len(loss) == 1 and loss[0]["modelled"] > loss[0]["bytes"]


def test_cuda_fp32_rule_is_undone_after_the_audit():
    with cuda_autocast_policy(torch.bfloat16):
        assert torch.ones(2, 2).bfloat16().softmax(-1).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.ones(2, 2).bfloat16().softmax(-1).dtype == torch.bfloat16
