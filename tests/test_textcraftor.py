"""TextCraftor: the prompt side acts only at the prompt, the differentiable path samples what generate samples
(greedy) and decodes the hard tokens' image, gradients reach only the prompt side (none at k = 0), the
interpolation's ends are the two prompt sides, and bad input stops with a message."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

import rewards
import textcraftor as tc
import train
from data import BOI, BOS, NULL, PAD, THINK
from generate import SampleConfig, generate
from model import VQ, LoRALinear, VQConfig, add_lora, lora_layers
from test_generate import N_IMG, PROMPTS, VOCAB, grammar_model

VQ_CFG = VQConfig(image_size=12, patch=4, codebook_size=VOCAB.codebook_size, code_dim=4, hidden=8)  # 3 x 3 codes
GREEDY = SampleConfig(temperature=0.0, text_temperature=0.0, cfg_scale=2.0, max_plan_tokens=8)
MICRO = os.path.join(os.path.dirname(__file__), "..", "tiny_configs", "micro.toml")
OC = tc.TextCraftorConfig(lora_r=2, lora_alpha=4.0, lora_targets="q_proj,v_proj,down_proj", batch=3, steps=2)


def setup(names=("a",), side="lora"):
    """A fresh copy of the tiny trained grammar model with prompt sides `names`, each given a random (non-zero)
    update as training would, and a tiny VQ."""
    gpt = grammar_model()
    gpt = type(gpt)(gpt.cfg).double().eval()
    gpt.load_state_dict(grammar_model().state_dict())
    torch.manual_seed(1)
    vq = VQ(VQ_CFG).double().eval().requires_grad_(False)
    ps = tc.PromptSide(gpt, VOCAB)
    oc = dataclasses.replace(OC, side=side)
    for name in names:
        ps.add(name, oc)
        with torch.no_grad():
            if side == "embed":
                ps.offsets[name].normal_(std=0.5)
            for _, layer in lora_layers(gpt):
                layer.lora_B[name].normal_(std=0.3)
    return gpt.double(), vq, ps


def test_prompt_positions():
    idx = torch.tensor([[PAD, BOS, 20, 21, THINK, 13, BOI, 40], [BOS, NULL, NULL, NULL, NULL, BOI, 40, 41],
                        [BOS, 20, BOI, 40, 41, 42, 43, 44]])
    want = [[1, 1, 1, 1, 1, 0, 0, 0], [0] * 8, [1, 1, 0, 0, 0, 0, 0, 0]]
    assert tc.prompt_positions(idx).long().tolist() == want

    class Cached:
        length = 3
    assert not tc.prompt_positions(idx, Cached()).any(), "a cached call after the prompt reads no prompt position"


def masked_lora_forward(mask):
    """The obvious reference for the gate: every adapter's update times mask (B, T), written out layer by layer."""
    def forward(self, x):
        y = self.base(x)
        for name in self.lora_A:
            y = y + mask.unsqueeze(-1) * self.scaling[name] * (x @ self.lora_A[name].t() @ self.lora_B[name].t())
        return y
    return forward


def test_gate_equals_a_mask_on_the_prompt(monkeypatch):
    """The prompt side's gate gives what masking every adapter's update to the prompt's positions gives, and the
    adapter does change the outputs."""
    gpt, _, ps = setup()
    idx = torch.tensor([[BOS, 20, 21, THINK, 13, 12, BOI, 40, 41], [BOS, NULL, NULL, NULL, NULL, NULL, BOI, 40, 41]])
    with torch.no_grad():
        gated = gpt(idx)
        ps.set(a=0.0)
        frozen = gpt(idx)
        ps.set(a=1.0)
        monkeypatch.setattr(LoRALinear, "forward", masked_lora_forward(tc.prompt_positions(idx).double()))
        masked = gpt(idx)
    assert torch.allclose(gated, masked, atol=1e-12)
    assert not torch.allclose(gated[0], frozen[0]), "the adapter must act on the conditional row"
    assert torch.allclose(gated[1], frozen[1]), "the null row has no prompt: frozen weights there"


@pytest.mark.parametrize("k,think", [(1, True), (3, True), (3, False)])
def test_soft_path_greedy_draws_generate_s_tokens_and_image(k, think):
    """At temperature 0 the soft path (prompt and plan again, first rows without gradient, the last k rows soft,
    with its own cache) draws the codes generate draws, and its soft image is the hard tokens' image; without
    <think> too (the model still writes plans then: the prompt side must not act on them)."""
    gpt, vq, ps = setup()
    greedy = dataclasses.replace(GREEDY, think=think)
    ref = generate(gpt, VOCAB, PROMPTS, greedy)
    assert think or all(s["tokens"][0] == THINK for s in ref), "without <think> the model writes its own"
    images, keep, codes, kl = tc.differentiable_images(gpt, vq, VOCAB, PROMPTS, greedy, k, 1.0, 0, ps)
    assert torch.isfinite(kl) and kl.item() > 0
    assert keep == [i for i, s in enumerate(ref) if s["codes"] is not None] and len(keep) >= 3
    assert codes.tolist() == [ref[i]["codes"] for i in keep]
    assert torch.allclose(images, vq.decode(codes), atol=1e-12)
    assert images.requires_grad


def reference_images(gpt, vq, prompts, sample_cfg, tau, seed):
    """The differentiable path for k = all rows, slow and plain: no cache, no checkpoint; every step runs the
    whole sequence again, the soft tokens so far given as input vectors."""
    drawn = generate(gpt, VOCAB, prompts, sample_cfg, seed=seed)
    keep = [i for i, s in enumerate(drawn) if s["codes"] is not None]
    guided = sample_cfg.cfg_scale != 1.0
    idx, patch, tags, pos, valid, _ = tc._sequences(VOCAB, [prompts[i] for i in keep], [drawn[i] for i in keep],
                                                    guided, sample_cfg.think, N_IMG)
    P, off = idx.shape[1] - N_IMG - 1, VOCAB.image_offset
    x = gpt.embed_tokens(idx[:, :P + 1])  # (R, P + 1, C) the prompt, plan and <boi>
    gen, ys = torch.Generator().manual_seed(seed), []
    for t in range(N_IMG):
        e = P + 1 + t
        logits = gpt(idx[:, :e], patch=patch[:, :e], tags=tags[:, :e], pos=pos[:, :e], key_valid=valid[:, :e],
                     embeds=x)[:, -1]
        hard, y = tc.soft_token(logits[:, off:], sample_cfg, tau, gen)
        ys.append(y)
        idx[:, e] = off + hard.repeat(1 + guided)
        x = torch.cat([x, (y @ gpt.embed_tokens.weight[off:]).repeat(1 + guided, 1).unsqueeze(1)], 1)
    return vq.decode_soft(torch.stack(ys, 1))


def test_soft_path_equals_the_slow_reference_with_its_gradients():
    """All rows soft: the cached, checkpointed path gives the plain path's image and gradients."""
    gpt, vq, ps = setup()
    sample = dataclasses.replace(GREEDY, temperature=1.0, top_k=5)
    params = [layer.lora_B["a"] for _, layer in lora_layers(gpt)]
    grads = []
    for fn in (lambda: tc.differentiable_images(gpt, vq, VOCAB, PROMPTS, sample, 3, 0.5, 7)[0],
               lambda: reference_images(gpt, vq, PROMPTS, sample, 0.5, 7)):
        images = fn()
        grads.append(torch.autograd.grad(images.square().mean(), params))
        grads[-1] = (images.detach(), grads[-1])
    (fast, g_fast), (ref, g_ref) = grads
    assert torch.allclose(fast, ref, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g_fast, g_ref))
    assert any(a.abs().sum() > 0 for a in g_fast)


def test_soft_codes_at_low_temperature_decode_the_hard_image():
    torch.manual_seed(0)
    vq = VQ(VQ_CFG).eval()
    z = torch.randn(2, VQ_CFG.n_codes, VQ_CFG.codebook_size) * 3
    assert torch.allclose(vq.decode_soft((z / 1e-4).softmax(-1)), vq.decode(z.argmax(-1)), atol=1e-5)
    assert not torch.allclose(vq.decode_soft(z.softmax(-1)), vq.decode(z.argmax(-1)), atol=1e-3)


@pytest.mark.parametrize("side,think", [("lora", True), ("embed", True), ("embed", False)])
def test_gradients_reach_only_the_prompt_side(side, think):
    gpt, vq, ps = setup(side=side)
    sample = dataclasses.replace(GREEDY, temperature=1.0, top_k=0, think=think)
    images, _, _, _ = tc.differentiable_images(gpt, vq, VOCAB, PROMPTS, sample, 1, 1.0, 0)
    images.square().mean().backward()
    prompt_side = {id(p) for p in ps.offsets.values()} | {id(p) for n, p in gpt.named_parameters() if ".lora_" in n}
    for n, p in list(gpt.named_parameters()) + list(vq.named_parameters()):
        assert (p.grad is not None) == (id(p) in prompt_side), n
    if side == "lora":  # the last layer's q and down act on the prompt's own outputs only, which no later position
        #                 reads (it reads keys and values): the mask at work gives them exactly no gradient
        last = f"layers.{gpt.cfg.n_layer - 1}."
        for n, layer in lora_layers(gpt):
            dead = n.startswith(last) and not n.endswith("v_proj")
            assert (layer.lora_B["a"].grad.abs().sum() == 0) == dead, n
    if side == "embed":  # only the rows of words at the prompt's positions: not the <think> the model writes itself
        words = {w for p in PROMPTS for w in p} | {BOS} | ({THINK} if think else set())
        assert set(ps.offsets["a"].grad.abs().sum(1).nonzero().flatten().tolist()) <= words


def checked_rewards(value=None):
    """Reward callables as rewards.load_reward makes them: a differentiable stand-in for the heads."""
    fn = lambda images, prompts: images.mean((1, 2, 3)) * (1 if value is None else value)
    return {n: rewards.checked(n, fn) for n in ("aesthetic", "clip")}


class Ex:
    def __init__(self, words):
        self.prompt = " ".join(map(str, words))


class Tok:
    """encode_text's tokenizer for prompts that are their ids written out."""
    def encode(self, text):
        ids = [int(w) for w in text.split()]
        return type("E", (), {"ids": ids, "offsets": [(0, 0)] * len(ids)})()

    def token_to_id(self, w):
        return -1


@pytest.mark.parametrize("k", [0, 2])
def test_training_moves_the_prompt_side_only_when_k_rows_carry_gradients(k):
    gpt, vq, ps = setup(names=())
    before = {n: p.clone() for n, p in gpt.state_dict().items()}
    oc = dataclasses.replace(OC, k=k)
    sample = dataclasses.replace(GREEDY, temperature=1.0, top_k=0)
    fig = tc.train(gpt, vq, VOCAB, Tok(), ps, "a", "aesthetic + clip", checked_rewards(), oc, sample,
                   [Ex(p) for p in PROMPTS], 0, lambda **kv: None)
    changed = {n for n, p in gpt.state_dict().items() if n in before and not torch.equal(p, before[n])}
    added = set(gpt.state_dict()) - set(before)
    assert fig["steps"] == 2 and fig["last"] is not None
    if k == 0:
        assert not changed and all(torch.equal(p, torch.zeros_like(p)) for n, p in gpt.state_dict().items()
                                   if n.endswith("lora_B.a")), "k = 0: nothing trains"
    else:
        assert not changed, "the frozen weights stay as they were"
        assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in gpt.state_dict().items()
                   if n.endswith("lora_B.a") and n in added)


def test_prompt_side_gate_skips_merged_adapters():
    """LoRALinear reads its gate's columns over the unmerged adapters only: with a generator-side adapter merged,
    the prompt side still acts at the prompt alone (outputs as before the merge)."""
    gpt = grammar_model()
    gpt = type(gpt)(gpt.cfg).double().eval()
    gpt.load_state_dict(grammar_model().state_dict())
    add_lora(gpt, "gen", tuple(OC.lora_targets.split(",")), OC.lora_r, OC.lora_alpha)  # first: column 0 of the gate
    ps = tc.PromptSide(gpt, VOCAB)
    ps.add("a", OC)
    gpt.double()
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(gpt):
            for name in ("gen", "a"):
                layer.lora_B[name].normal_(std=0.3)
    idx = torch.tensor([[BOS, 20, 21, THINK, 13, 12, BOI, 40, 41]])
    with torch.no_grad():
        before = gpt(idx)
        for _, layer in lora_layers(gpt):  # merge "gen" alone (merge_lora folds in every adapter)
            layer.base.weight += layer.delta("gen")
            layer.merged.add("gen")
        after = gpt(idx)
    assert torch.allclose(before, after, atol=1e-10)


def test_interpolation_ends_are_the_two_prompt_sides():
    """Weight space (the adapters' weights) and output space (LogitBlend) at 0 and 1 sample what a model with
    prompt side a alone, or b alone, samples."""
    both, _, ps = setup(names=("a", "b"))
    alone = {}
    for name in ("a", "b"):
        gpt, _, side = setup(names=(name,))
        other = ".b" if name == "a" else ".a"
        gpt.load_state_dict({n: p for n, p in both.state_dict().items() if not n.endswith(other)})
        alone[name] = [s["tokens"] for s in generate(gpt, VOCAB, PROMPTS, GREEDY)]
    assert alone["a"] != alone["b"], "the two prompt sides must differ for the test to mean anything"
    for alpha, name in ((0.0, "a"), (1.0, "b")):
        ps.set(a=1 - alpha, b=alpha)
        assert [s["tokens"] for s in generate(both, VOCAB, PROMPTS, GREEDY)] == alone[name]
        blend = tc.LogitBlend(both, ps, alpha)
        assert [s["tokens"] for s in generate(blend, VOCAB, PROMPTS, GREEDY)] == alone[name]


def test_bad_input_is_refused_with_a_message():
    for spec in ("aesthetic + verifier", "self"):
        msgs = [m for ok, m in tc.config_rules(dataclasses.replace(OC, reward_b=spec), grid=8) if not ok]
        assert msgs and "textcraftor.reward_b" in msgs[0] and "passes no gradient" in msgs[0], msgs
    msgs = [m for ok, m in tc.config_rules(dataclasses.replace(OC, k=9), grid=8) if not ok]
    assert msgs and "only 8 rows" in msgs[0]
    gpt, vq, ps = setup(names=())
    with pytest.raises(ValueError, match="k must lie in"):
        tc.differentiable_images(gpt, vq, VOCAB, PROMPTS, GREEDY, 4, 1.0, 0)
    with pytest.raises(ValueError, match="sample.top_p=0.9"):
        tc.differentiable_images(gpt, vq, VOCAB, PROMPTS, dataclasses.replace(GREEDY, top_p=0.9), 1, 1.0, 0)
    with pytest.raises(rewards.RewardError, match="at step 0.*returned NaN"):
        tc.train(gpt, vq, VOCAB, Tok(), ps, "a", "aesthetic + clip", checked_rewards(float("nan")),
                 dataclasses.replace(OC, k=1), GREEDY, [Ex(p) for p in PROMPTS], 0, lambda **kv: None)


def test_plan_kl_is_zero_for_the_frozen_model_and_grows_with_the_prompt_side():
    sample = dataclasses.replace(GREEDY, temperature=1.0, top_k=0)
    gpt, vq, ps = setup(names=())
    ps.add("a", OC)  # B = 0: the tuned model is the frozen one
    assert abs(tc.differentiable_images(gpt.double(), vq, VOCAB, PROMPTS, sample, 1, 1.0, 0, ps)[3].item()) < 1e-12
    gpt, vq, ps = setup()
    kl = tc.differentiable_images(gpt, vq, VOCAB, PROMPTS, sample, 1, 1.0, 0, ps)[3]
    assert kl.item() > 1e-3 and kl.requires_grad


def test_textcraftor_stage_writes_its_arms_interpolation_and_table(micro_run, tmp_path):
    """The stage on the micro run, every part at its smallest: the prompt sides, the interpolation, the generator
    side and both, the table; the base run's own weights untouched."""
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    train.main([MICRO, f"--train.out_dir={run}", "--stages=textcraftor", "--textcraftor.steps=2",
                "--textcraftor.batch=2", "--textcraftor.dev_prompts=1", "--textcraftor.samples=1",
                "--textcraftor.bench_prompts=1", "--textcraftor.blend=2", "--textcraftor.post_prompts=4"])
    out = os.path.join(run, "textcraftor")
    res = json.load(open(os.path.join(out, "textcraftor.json")))
    assert set(res["arms"]) == {"frozen", "a", "b", "generator", "both"}
    assert {"aesthetic_gain", "vqascore_gain", "verifier_gain"} <= set(res["arms"]["a"]["dev"])
    assert [p["alpha"] for p in res["interpolation"]] == [0.0, 0.0, 1.0, 1.0]
    for f in ("prompt_a.safetensors", "prompt_b.safetensors", "interpolation.png", "textcraftor.md"):
        assert os.path.exists(os.path.join(out, f)), f
    assert open(os.path.join(run, "gpt.safetensors"), "rb").read() == open(os.path.join(micro_run, "gpt.safetensors"),
                                                                          "rb").read()
