"""LoRA: parameter counts, merged == unmerged, only adapters (and a new head) train, and a
merged model exports as a GPT-2 directory that transformers reads."""

from __future__ import annotations

import pytest
import torch

from fusedgpt.model import GPT, GPTConfig, Llama, LlamaConfig
from fusedgpt.train import finetune
from fusedgpt.train.finetune_classify import GPTClassifier
from fusedgpt.train.lora import LoRAConfig, LoRALinear, apply_lora, has_lora, merge_lora, parameter_counts

N_LAYER, N_EMBD, VOCAB = 2, 32, 97


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=VOCAB, context_length=16, n_layer=N_LAYER, n_head=2, n_embd=N_EMBD, backend="torch")
    return GPT(config)


Q, KV, FF = 4 * 32, 2 * 32, 352  # llama-tiny: 4 query heads, 2 key/value heads of 32; MLP width


def tiny_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig.from_preset("llama-tiny", backend="torch", vocab_size=VOCAB, context_length=16))


def randomise_adapters(model: torch.nn.Module) -> None:
    """B starts at zero (a no-op adapter); give it values so that the adapters matter."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.2)


@pytest.mark.parametrize(
    "build, targets, in_out",
    [
        (tiny_gpt, ("attn", "mlp"), [(N_EMBD, 3 * N_EMBD), (N_EMBD, N_EMBD), (N_EMBD, 4 * N_EMBD), (4 * N_EMBD, N_EMBD)]),
        (tiny_gpt, ("attn",), [(N_EMBD, 3 * N_EMBD), (N_EMBD, N_EMBD)]),
        (tiny_gpt, ("mlp.c_fc",), [(N_EMBD, 4 * N_EMBD)]),
        (tiny_llama, ("attn", "mlp"), [(128, Q), (128, KV), (128, KV), (Q, 128), (128, FF), (128, FF), (FF, 128)]),
        (tiny_llama, ("q_proj", "v_proj"), [(128, Q), (128, KV)]),
        (tiny_llama, ("mlp",), [(128, FF), (128, FF), (FF, 128)]),
    ],
)
def test_only_the_adapters_train_and_their_count_is_rank_times_in_plus_out(build, targets, in_out):
    model = build()
    base_total = model.num_parameters()
    rank = 4
    adapted = apply_lora(model, LoRAConfig(rank, 8.0, targets))
    expected = N_LAYER * sum(rank * (i + o) for i, o in in_out)
    assert len(adapted) == N_LAYER * len(in_out)
    assert parameter_counts(model) == (expected, base_total + expected)
    assert all(("lora_" in name) == p.requires_grad for name, p in model.named_parameters())


@pytest.mark.parametrize("build, adapters_per_layer", [(tiny_gpt, 4), (tiny_llama, 7)])
def test_a_fresh_adapter_changes_nothing_and_merging_keeps_the_outputs(build, adapters_per_layer):
    model = build()
    idx = torch.randint(0, VOCAB, (3, 11))
    with torch.no_grad():
        base = model(idx)
        apply_lora(model, LoRAConfig(4, 16.0))
        assert torch.equal(model(idx), base)  # B = 0
        randomise_adapters(model)
        adapted = model(idx)
        assert not torch.allclose(adapted, base, atol=1e-3)
        assert merge_lora(model) == adapters_per_layer * N_LAYER
        merged = model(idx)
    assert not has_lora(model)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(build().state_dict())


def test_a_step_changes_only_the_adapters_and_the_new_head(tmp_path):
    gpt = tiny_gpt()
    apply_lora(gpt, LoRAConfig(2, 4.0, ("attn",)))
    model = GPTClassifier(gpt, 3)
    randomise_adapters(model)  # with B = 0, A's first gradient would be 0 too
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    idx, lengths, labels = torch.randint(0, VOCAB, (4, 9)), torch.tensor([9, 3, 5, 1]), torch.tensor([0, 1, 2, 1])

    def batch_loss(indices):
        loss = torch.nn.functional.cross_entropy(model(idx, lengths), labels)
        return loss, {}

    cfg = finetune.FinetuneConfig(epochs=1, batch_size=4, lr=1e-2, warmup_steps=0, weight_decay=0.1)
    steps, epochs = finetune.train(model, cfg, 4, batch_loss, lambda epoch, sums, log: {}, device=torch.device("cpu"),
                                   out=tmp_path, progress=False)
    assert steps == 1 and epochs == [{"step": 1, "epoch": 1}]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    expected = {n for n in before if "lora_" in n} | {"gpt.lm_head.weight", "gpt.lm_head.bias"}
    assert changed == expected


def test_a_merged_model_saves_as_a_gpt2_directory_that_transformers_reads(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(4, 8.0))
    randomise_adapters(model)
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        adapted = model(idx)
    merge_lora(model)
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "rank, alpha, targets, match",
    [(0, 1.0, ("attn",), "rank"), (2, 0.0, ("attn",), "alpha"), (2, 1.0, ("lm_head",), "unknown LoRA targets"),
     (2, 1.0, (), "at least one")],
)
def test_bad_lora_settings_are_refused(rank, alpha, targets, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(rank, alpha, targets)


def test_adapting_twice_is_refused():
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(2, 2.0, ("attn",)))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, LoRAConfig(2, 2.0, ("attn.c_attn",)))


# --------------------------------------------------------------------------- Llama family

def test_a_llama_step_changes_only_the_adapters(tmp_path):
    model = tiny_llama()
    apply_lora(model, LoRAConfig(2, 4.0, ("o_proj", "gate_proj")))
    randomise_adapters(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    idx = torch.randint(0, VOCAB, (2, 9))

    def batch_loss(indices):
        return model(idx[:, :-1], idx[:, 1:]), {}

    cfg = finetune.FinetuneConfig(epochs=1, batch_size=2, lr=1e-2, warmup_steps=0, weight_decay=0.1)
    finetune.train(model, cfg, 2, batch_loss, lambda epoch, sums, log: {}, device=torch.device("cpu"),
                   out=tmp_path, progress=False)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {n for n in before if "lora_" in n} and len(changed) == 2 * 2 * 2


def test_a_target_of_the_other_family_is_refused_before_anything_changes():
    llama, gpt = tiny_llama(), tiny_gpt()
    with pytest.raises(ValueError, match=r"\['attn.c_attn'\] are not layers of a Llama model"):
        apply_lora(llama, LoRAConfig(2, 2.0, ("attn.c_attn",)))
    with pytest.raises(ValueError, match=r"\['q_proj'\] are not layers of a GPT-2 model"):
        apply_lora(gpt, LoRAConfig(2, 2.0, ("q_proj",)))
    assert all(p.requires_grad for p in llama.parameters()) and all(p.requires_grad for p in gpt.parameters())
    with pytest.raises(TypeError, match="LoRA applies to a GPT"):
        apply_lora(torch.nn.Linear(2, 2), LoRAConfig(2, 2.0))
