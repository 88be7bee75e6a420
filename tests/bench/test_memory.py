"""The memory audit at GPT-2 124M training shapes (fake tensors: nothing is allocated)."""

import pytest
import torch

from bench.memory import audit, saved_for_backward


@pytest.fixture(scope="module")
def rows():
    return {(r["part"], r["path"].split()[0]): r for r in audit(batch=8, context=1024, dtype=torch.float32)}


def test_fused_block_saves_no_txt_tensor_and_less_than_eager(rows):
    eager, fused = rows[("block", "eager")], rows[("block", "fused")]
    assert eager["TxT_tensors"] > 0  # the detector sees the materialised probabilities
    assert fused["TxT_tensors"] == 0
    assert fused["saved_MiB"] < eager["saved_MiB"] / 1.5


def test_fused_loss_never_saves_the_logits(rows):
    eager, fused = rows[("head + loss", "eager")], rows[("head + loss", "fused")]
    logits_mib = 8 * 1024 * 50257 * 4 / 2**20
    assert eager["saved_MiB"] >= logits_mib
    assert fused["saved_MiB"] < logits_mib / 4


def test_saved_for_backward_dedupes_storages_and_skips_parameters():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(3, 4, requires_grad=True)
    saved = saved_for_backward(lambda: (x @ weight).sum() + (x[1:] * 2).sum() + (x * x).sum(), [weight])
    assert saved == [(3 * 4 * 4, (3, 4), torch.float32)]
