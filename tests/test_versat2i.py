"""VersaT2I: best-of-K keeps one sample a prompt at most, the Mixture of LoRA gate (weights sum to one, a one-hot
gate is that adapter, a uniform one the plain average, sampling through it equals the slow reference), the
balancing loss, bad input, and the stage end to end on the micro run."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train
import versat2i
from conftest import MICRO
from config import ConfigError
from generate import RunError, SampleConfig, generate, generate_reference, save_atomic
from model import GPT, GPTConfig, add_lora, lora_layers, lora_state_dict, merge_lora
from posttrain import PostConfig

CFG = GPTConfig(vocab_size=64, image_offset=32, n_image_tokens=16, block_size=32, n_layer=2, n_head=2, n_kv_head=1,
                n_embd=32, mlp_hidden=64)
PC = PostConfig(lora_r=4, lora_alpha=8.0, lora_targets="q_proj,v_proj,down_proj")
NAMES = ("a", "b", "c")


def trained_loras(base):
    """Three adapters with random (as if trained) weights, each as its own tensors."""
    loras = {}
    for k, name in enumerate(NAMES):
        model = copy.deepcopy(base)
        add_lora(model, name, *versat2i.lora_spec(PC))
        torch.manual_seed(10 + k)
        for _, layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B[name], std=0.1)
        loras[name] = lora_state_dict(model, name)
    return loras


def setup(seed=0):
    torch.manual_seed(seed)
    base = GPT(CFG).eval()
    return base, trained_loras(base), torch.randint(0, CFG.vocab_size, (2, 12))


def test_best_of_k_keeps_at_most_one_sample_per_prompt_and_only_above_the_quantile():
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(50), 4)
    r = rng.random(200)
    for q in (0.0, 0.5, 0.9):
        w = versat2i.select(r, group, q)
        per_prompt = np.bincount(group, weights=w)
        assert per_prompt.max() == 1 and set(np.unique(w)) <= {0.0, 1.0}
        kept = np.nonzero(w)[0]
        assert all(r[i] == r[group == group[i]].max() for i in kept), "only a prompt's best sample"
        assert r[kept].min() >= np.quantile(r, q) - 1e-12
    assert versat2i.select(r, group, 0.0).sum() == 50, "quantile 0: every prompt keeps its best"
    assert versat2i.select(r, group, 0.9).sum() < 50, "a high quantile leaves prompts without a sample"


def test_gate_weights_sum_to_one_and_start_uniform():
    gate = versat2i.MixtureGate(32, 3)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(gate(x), torch.full((2, 5, 3), 1 / 3))
    torch.nn.init.normal_(gate.proj.weight, std=1.0)
    g = gate(x)
    torch.testing.assert_close(g.sum(-1), torch.ones(2, 5))
    assert (g > 0).all() and g.std() > 0.05, "a trained gate weighs the adapters differently per token"


def test_one_hot_gate_is_that_adapter_and_uniform_gate_is_the_plain_average():
    base, loras, x = setup()
    mol = versat2i.with_adapters(base, loras, PC)
    gates = versat2i.attach_gates(mol)
    assert len(gates) == 3 * CFG.n_layer and all(g.proj.out_features == 3 for g in gates)
    average = versat2i.with_adapters(base, loras, PC, 1 / 3)
    merge_lora(average)
    torch.testing.assert_close(mol(x), average(x), rtol=1e-5, atol=1e-5)  # zero-initialised gates: 1/3 each
    for k, name in enumerate(NAMES):
        for g in gates:
            g.proj.bias.data = torch.full((3,), -200.0)
            g.proj.bias.data[k] = 200.0  # softmax: exactly one-hot in float32
        alone = versat2i.with_adapters(base, {name: loras[name]}, PC)
        torch.testing.assert_close(mol(x), alone(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone(x), base(x), atol=1e-3), "the adapters must change the output"
    trainable = [n for n, p in mol.named_parameters() if p.requires_grad]
    assert trainable and all(".gate." in n for n in trainable), "the adapters are frozen, only the gates train"


def test_balancing_loss_is_smallest_when_the_adapters_are_used_equally():
    n = 4
    uniform = torch.full((100, n), 1 / n)
    assert versat2i.balance_loss(uniform).item() == pytest.approx(1.0)
    one_takes_all = torch.zeros(100, n)
    one_takes_all[:, 2] = 1
    assert versat2i.balance_loss(one_takes_all).item() == pytest.approx(n)
    torch.manual_seed(0)
    for _ in range(20):
        g = torch.softmax(3 * torch.randn(100, n), -1)
        assert versat2i.balance_loss(g) > versat2i.balance_loss(uniform)
    per_token = torch.eye(n).repeat(25, 1)  # each token picks one adapter, all equally often: no penalty
    assert versat2i.balance_loss(per_token).item() == pytest.approx(1.0)


def test_sampling_through_the_gates_fast_equals_the_reference():
    from test_generate import PROMPTS, VOCAB, grammar_model
    model = copy.deepcopy(grammar_model()).float()
    for k, name in enumerate(NAMES):
        add_lora(model, name, ("q_proj", "v_proj", "down_proj"), 4, 8.0)
        torch.manual_seed(k)
        for _, layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B[name], std=0.3)
    gates = versat2i.attach_gates(model)
    for g in gates:
        torch.nn.init.normal_(g.proj.weight, std=1.0)
    model = model.double().eval()
    cfg = SampleConfig(temperature=0.0, text_temperature=0.0, cfg_scale=2.0, max_plan_tokens=8)
    fast = generate(model, VOCAB, PROMPTS, cfg)
    ref = [generate_reference(model, VOCAB, p, cfg) for p in PROMPTS]
    assert [f["tokens"][:len(r["tokens"])] for f, r in zip(fast, ref)] == [r["tokens"] for r in ref]
    assert any(r["codes"] is not None for r in ref), "the test must exercise the image phase"


def test_bad_input_stops_with_a_message_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="versat2i.aspects='alignment,colour'.*alignment,aesthetic"):
        train.load_config(MICRO, ["--versat2i.aspects=alignment,colour"])
    with pytest.raises(ValueError, match="zero adapters"):
        versat2i.MixtureGate(8, 0)
    with pytest.raises(ValueError, match="zero adapters.*load_lora"):
        versat2i.attach_gates(GPT(CFG))
    with pytest.raises(RunError, match="--stages=rewards"):
        versat2i.check_heads(str(tmp_path), ["alignment"])
    save_atomic({"vqascore.w": torch.zeros(1), "quality.w": torch.zeros(1)}, str(tmp_path / "rewards.safetensors"))
    versat2i.check_heads(str(tmp_path), ["alignment", "quality"])
    with pytest.raises(RunError, match="'geometry' head.*drop geometry from versat2i.aspects"):
        versat2i.check_heads(str(tmp_path), ["alignment", "geometry"])
    with pytest.raises(RunError, match="unknown aspect 'style'"):
        versat2i.check_heads(str(tmp_path), ["style"])


TINY = ["--versat2i.prompts=4", "--versat2i.samples=2", "--versat2i.steps=2", "--versat2i.gate_steps=2",
        "--versat2i.dev_prompts=1", "--versat2i.dev_samples=2", "--versat2i.bench_prompts=1", "--stages=versat2i"]


def test_versat2i_stage_writes_the_matrix_the_gates_and_the_grid(micro_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    train.main([MICRO, f"--train.out_dir={run}", *TINY])
    res = json.load(open(os.path.join(run, "versat2i", "versat2i.json")))
    variants = ["base", *versat2i.ASPECTS, "average", "union", "mol"]
    assert list(res["variants"]) == variants
    for rec in res["variants"].values():
        assert set(rec["dev"]) == {*versat2i.ASPECTS, "aspects", "verifier"}
        assert len(rec["dev"]["verifier"]["per_prompt"]) == 8 and set(rec["benchmarks"]) == set(evaluate.BENCHMARKS)
    assert all(res["selection"][a]["kept"] <= 4 for a in versat2i.ASPECTS), "at most one sample per prompt"
    gates = res["variants"]["mol"]["gates"]
    assert all(abs(sum(w) - 1) < 1e-4 for w in [*gates["categories"].values(), *gates["layers"].values()])
    md = open(os.path.join(run, "versat2i", "versat2i.md")).read()
    assert "## Aspect x variant (dev)" in md and "MoL beats the best single LoRA:" in md and "## Cost" in md
    assert "asked corners kept" in md and set(res["variants"]["base"]["placement"]) >= {"centre", "asked_corner_kept"}
    assert Image.open(os.path.join(run, "versat2i", "versat2i.png")).size[0] > 8 * 128
    for a in [*versat2i.ASPECTS, "union"]:
        assert os.path.exists(os.path.join(run, "versat2i", f"lora_{a}.safetensors"))
    os.remove(os.path.join(run, "rewards.safetensors"))
    with pytest.raises(SystemExit, match="--stages=rewards,versat2i"):
        train.main([MICRO, f"--train.out_dir={run}", *TINY])


def fake_run(a, b):
    """A run whose variants a and b have these per-prompt alignment figures (and nothing else)."""
    rec = lambda v: {"dev": {"alignment": {"mean": float(np.mean(v)), "per_prompt": list(v)}}}
    return {"variants": {"a": rec(a), "b": rec(b)}}


def test_two_seeds_that_agree_by_chance_keep_their_own_sampling_error():
    rng = np.random.default_rng(0)
    b, z = rng.random(40), rng.standard_normal(40)
    noise = 0.1 * (z - z.mean()) / z.std(ddof=1)  # paired differences of sample std 0.1: SE 0.1 / sqrt(40) = 0.016
    one = fake_run(b + 0.01 + noise, b)
    gap, se = versat2i.difference([one], "a", "b", "alignment")
    assert gap == pytest.approx(0.01) and se == pytest.approx(0.1 / np.sqrt(40))
    assert "not settled" in versat2i.verdict([one], "a", "b", "alignment"), "a gap within one SE"
    assert "**reproduces**" in versat2i.verdict([fake_run(b + 0.05 + noise, b)], "a", "b", "alignment")
    assert "does not reproduce" in versat2i.verdict([fake_run(b - 0.05 + noise, b)], "a", "b", "alignment")
    gap2, se2 = versat2i.difference([one, one], "a", "b", "alignment")  # the same difference twice: spread 0
    assert gap2 == pytest.approx(gap) and se2 == pytest.approx(se / np.sqrt(2)), "the floor: own error / sqrt(seeds)"


def test_placement_counts_centred_objects_and_the_corners_a_prompt_asks_for():
    from types import SimpleNamespace

    from world import Obj, Req, Scene, Spec
    ask = SimpleNamespace(spec=Spec(reqs=(Req(shape="circle", row=0, col=0), Req(shape="square", row=1, col=1)),
                                    total=2))
    obj = lambda r, c: Obj("circle", "red", "small", r, c)
    kept, moved = Scene((obj(0, 0), obj(1, 1))), Scene((obj(1, 1), obj(0, 1)))
    p = versat2i.placement([kept, moved], [ask], [0, 0])
    assert p == {"centre": 0.5, "corners": 0.25, "asked_corner_kept": 0.5, "asked_corners": 2}


def test_the_picture_marks_each_shown_sample_by_its_own_verifier():
    """A prompt half of whose samples pass: its first sample shown is marked by that sample's verifier, not by
    whether every sample of the prompt passed."""
    from types import SimpleNamespace
    exs = [SimpleNamespace(prompt="p0"), SimpleNamespace(prompt="p1")]
    s = {"example": [0, 0, 1, 1], "image": ["i0", "i1", "i2", "i3"], "verifier": np.array([1.0, 0.5, 0.5, 1.0])}
    assert versat2i.shown("base", s, exs, [0, 1]) == [("base: p0", "i0", True), ("base: p1", "i2", False)]
