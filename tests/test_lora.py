"""LoRA: a new adapter changes nothing, merge is exact and explicit, only adapters train and are saved,
two adapters add up exactly and each reloads alone."""
import math

import pytest
import torch

from model import (GPT, GPTConfig, LoRALinear, add_lora, load_lora, lora_layers, lora_state_dict, merge_lora,
                   unmerge_lora)

CFG = GPTConfig(vocab_size=64, image_offset=32, n_image_tokens=16, block_size=32, n_layer=2, n_head=2, n_kv_head=1,
                n_embd=32, mlp_hidden=64)
TARGETS = ("q_proj", "v_proj", "down_proj")


def model_and_input(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval(), torch.randint(0, CFG.vocab_size, (2, 12))


def randomise(model, name):
    """Give adapter `name` a non-zero B, as training would."""
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B[name], std=0.05)


def test_new_adapter_changes_nothing_and_is_initialised_as_documented():
    model, x = model_and_input()
    ref = model(x)
    add_lora(model, "a", TARGETS, r=4, alpha=8)
    assert torch.equal(model(x), ref), "B = 0 must leave the outputs unchanged"
    layers = lora_layers(model)
    assert len(layers) == 3 * CFG.n_layer and all(isinstance(m, LoRALinear) for _, m in layers)
    layer = layers[0][1]
    assert layer.scaling["a"] == 2.0 and torch.all(layer.lora_B["a"] == 0)
    bound = 1 / math.sqrt(layer.base.in_features)  # kaiming_uniform(a=sqrt(5)) bound, as nn.Linear's init
    assert layer.lora_A["a"].abs().max() <= bound and layer.lora_A["a"].abs().max() > bound / 2


def test_only_adapter_parameters_get_gradients_and_are_saved():
    model, x = model_and_input()
    params = add_lora(model, "a", TARGETS, r=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and n.endswith(".a") for n in trainable)
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if p.requires_grad}
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    sd = lora_state_dict(model, "a")
    assert set(sd) == set(trainable) and len(sd) == 2 * 3 * CFG.n_layer


def test_merge_equals_unmerged_and_eval_never_merges():
    model, x = model_and_input()
    add_lora(model, "a", TARGETS, r=4, alpha=8, dropout=0.5)
    randomise(model, "a")
    model.eval()  # dropout off; eval() must not merge
    assert not any(layer.merged for _, layer in lora_layers(model))
    base = {n: p.clone() for n, p in model.named_parameters() if "base" in n}
    unmerged = model(x)
    merge_lora(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    merge_lora(model)  # a second merge must not fold the adapter in twice
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.train()
    model.eval()
    unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], rtol=0, atol=1e-6)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        add_lora(model, "late", TARGETS)


def test_two_adapters_add_up_and_each_reloads_alone():
    model, x = model_and_input()
    add_lora(model, "a", TARGETS, r=4, alpha=8)
    randomise(model, "a")
    only_a = model(x)
    add_lora(model, "b", TARGETS, r=2, alpha=2)
    randomise(model, "b")
    # per layer the two adapters are exactly the sum of their weight updates
    layer = lora_layers(model)[0][1]
    h = torch.randn(3, layer.base.in_features)
    want = layer.base(h) + h @ (layer.delta("a") + layer.delta("b")).t()
    torch.testing.assert_close(layer(h), want, rtol=1e-5, atol=1e-6)
    # adapter "a" alone, saved and loaded into a fresh copy of the base model, gives its own outputs
    sd = lora_state_dict(model, "a")
    fresh, _ = model_and_input()
    load_lora(fresh, "a", sd, TARGETS, r=4, alpha=8)
    torch.testing.assert_close(fresh(x), only_a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        load_lora(model_and_input()[0], "a", sd, ("q_proj",), r=4, alpha=8)
    with pytest.raises(ValueError, match="already exists"):
        add_lora(model, "a", TARGETS)
    with pytest.raises(ValueError, match="no Linear layer"):
        add_lora(model, "d", ("qkv",))
