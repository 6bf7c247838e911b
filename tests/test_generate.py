"""The fast sampler against the slow reference, guidance, grammar."""
import functools

import pytest
import torch

from data import BOI, EOI, EOS, NULL, THINK, Vocab, build_sequence, grid_positions
from generate import SampleConfig, allowed_tokens, generate, generate_reference, sample_next
from model import GPT, GPTConfig

VOCAB = Vocab(text_size=30, codebook_size=16)
N_IMG = 9


@functools.lru_cache(maxsize=None)
def grammar_model(seed=0, steps=150):
    """A tiny GPT trained for a moment on sequences of the real grammar (plan = the prompt reversed,
    so plans differ in length, then an image of random codes), so that greedy samples reach the image
    phase after plans of several lengths. float64, so that padding and batching cannot flip an argmax."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=VOCAB.size, image_offset=VOCAB.image_offset, n_image_tokens=N_IMG, block_size=64,
                    n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64,
                    cell_token_ids=(9, 10, 11), attr_token_ids=(12, 13), code_cells=(0, 0, 1, 0, 0, 1, 2, 2, -1))  # the cell path too
    model = GPT(cfg)
    assert model.cell_embed is not None
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        seqs = []
        for _ in range(16):
            prompt = torch.randint(9, 30, (int(torch.randint(1, 6, ())),)).tolist()
            codes = torch.randint(0, VOCAB.codebook_size, (N_IMG,)).tolist()
            seqs.append(build_sequence("plan", VOCAB, prompt, prompt[::-1], codes)[0])
        T = max(map(len, seqs))
        x = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
        grid = torch.tensor([grid_positions(s, VOCAB) + [-1] * (T - len(s)) for s in seqs])
        logits = model(x[:, :-1], grid=grid[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double().eval()


PROMPTS = [[9, 10, 11], [12], [13, 14, 15, 16, 17], [18, 19]]


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_fast_equals_reference_greedy(cfg_scale):
    model = grammar_model()
    cfg = SampleConfig(temperature=0.0, text_temperature=0.0, cfg_scale=cfg_scale, max_plan_tokens=8)
    fast = generate(model, VOCAB, PROMPTS, cfg)
    ref = [generate_reference(model, VOCAB, p, cfg) for p in PROMPTS]
    assert [f["tokens"][:len(r["tokens"])] for f, r in zip(fast, ref)] == [r["tokens"] for r in ref]
    assert any(r["codes"] is not None for r in ref), "the test must exercise the image phase"
    assert len({len(r["plan"]) for r in ref}) > 1, "plans of different lengths exercise the padding"


def test_guidance_changes_images_and_scale_one_equals_unguided():
    model = grammar_model()
    base = dict(temperature=0.9, text_temperature=0.9, max_plan_tokens=8)
    for p in PROMPTS:  # one prompt: same random stream, so even sampled tokens must agree
        # fast path at scale 1 skips the null rows; the reference always mixes them in with guide()
        fast = generate(model, VOCAB, [p], SampleConfig(cfg_scale=1.0, **base), seed=3)[0]
        ref = generate_reference(model, VOCAB, p, SampleConfig(cfg_scale=1.0, **base), seed=3)
        assert fast["tokens"][:len(ref["tokens"])] == ref["tokens"]
    greedy = dict(temperature=0.0, text_temperature=0.0, max_plan_tokens=8)
    plain = generate(model, VOCAB, PROMPTS, SampleConfig(cfg_scale=1.0, **greedy))
    guided = generate(model, VOCAB, PROMPTS, SampleConfig(cfg_scale=4.0, **greedy))
    assert [s["plan"] for s in plain] == [s["plan"] for s in guided], "guidance must not touch the plan"
    assert [s["codes"] for s in plain] != [s["codes"] for s in guided]


def test_grammar_exact_image_length_and_no_codes_outside():
    model = grammar_model(1)
    cfg = SampleConfig(temperature=1.0, text_temperature=1.0, max_plan_tokens=6, top_k=0)
    for s in generate(model, VOCAB, PROMPTS * 4, cfg, seed=1):
        toks = s["tokens"]
        if s["emitted_boi"]:
            b = toks.index(BOI)
            assert all(t < VOCAB.image_offset for t in toks[:b])
            assert all(t >= VOCAB.image_offset for t in toks[b + 1:b + 1 + N_IMG])
            assert toks[b + 1 + N_IMG] == EOI and len(s["codes"]) == N_IMG
        else:
            assert s["codes"] is None and all(t < VOCAB.image_offset for t in toks)


def test_allowed_tokens_masks():
    phase = torch.tensor([0, 1, 1])
    n_codes = torch.tensor([0, 3, N_IMG])
    m = allowed_tokens(VOCAB, phase, n_codes, N_IMG, "cpu")
    assert m[0, BOI] and m[0, EOS] and m[0, THINK] and not m[0, NULL] and not m[0, VOCAB.image_offset:].any()
    assert m[1, VOCAB.image_offset:].all() and m[1, :VOCAB.image_offset].sum() == 0
    assert m[2].sum() == 1 and m[2, EOI]


def test_top_k_and_top_p_restrict_support():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(500, 1)
    ok = torch.ones_like(logits, dtype=torch.bool)
    t = torch.ones(500)
    assert set(sample_next(logits, ok, t, 2, 1.0, g).tolist()) == {0, 1}
    # softmax: 0.636, 0.234, ...: top_p 0.7 keeps the first two tokens only
    assert set(sample_next(logits, ok, t, 0, 0.7, g).tolist()) == {0, 1}
    assert set(sample_next(logits, ok, torch.zeros(500), 0, 1.0, g).tolist()) == {0}


def test_prompt_too_long_is_a_clear_error():
    model = grammar_model()
    with pytest.raises(ValueError, match="block_size"):
        generate(model, VOCAB, [[9] * 60], SampleConfig())
