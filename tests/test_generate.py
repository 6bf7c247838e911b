"""The fast sampler against the slow reference, guidance, grammar, tags."""
import dataclasses
import functools

import pytest
import torch

from data import BOI, EOI, EOS, NULL, PAD, THINK, Tagger, Vocab, build_sequence, collate, patch_positions
from generate import SampleConfig, allowed_tokens, generate, generate_reference, sample_next
from model import GPT, GPTConfig, token_ce

N_IMG = 9
# words 9-11 name regions 1-3 and words 12-13 keep them open, as a plan's cell and attribute words do; the
# 3x3 image's patches lie in regions 1-3 but for its last one
VOCAB = Vocab(text_size=30, codebook_size=16,
              tagger=Tagger(30, cell_ids=(9, 10, 11), keep_ids=(12, 13), patch_tags=(1, 1, 2, 1, 1, 2, 3, 3, 0)))


@functools.lru_cache(maxsize=None)
def grammar_model(seed=0, steps=150):
    """A tiny GPT trained for a moment on sequences of the real grammar (plan = the prompt reversed,
    so plans differ in length, then an image of random codes; a tenth of them null), with the tags of
    VOCAB's tagger, so that greedy samples reach the image phase after plans of several lengths. Its tag
    embedding is then scaled up, so that a wrong tag changes what it samples. float64, so that padding
    and batching cannot flip an argmax."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=VOCAB.size, image_offset=VOCAB.image_offset, n_image_tokens=N_IMG, block_size=64,
                    n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64, n_tags=VOCAB.tagger.n_tags)
    model = GPT(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        seqs = []
        for i in range(16):
            prompt = torch.randint(9, 30, (int(torch.randint(1, 6, ())),)).tolist()
            codes = torch.randint(0, VOCAB.codebook_size, (N_IMG,)).tolist()
            seqs.append(build_sequence("plan", VOCAB, prompt, prompt[::-1], codes, null=i < 2))
        b = collate(seqs, VOCAB, "cpu")
        loss = (token_ce(model(b.x, patch=b.patch, tags=b.tags), b.y) * b.weight).sum() / b.weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.tag_embed.weight *= 20
    return model.double().eval()


PROMPTS = [[9, 10, 11], [12], [13, 14, 15, 16, 17], [18, 19],
           [13, 12, 10, 21]]  # the last one plans a region kept open by two words


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_fast_equals_reference_greedy(cfg_scale):
    model = grammar_model()
    cfg = SampleConfig(temperature=0.0, text_temperature=0.0, cfg_scale=cfg_scale, max_plan_tokens=8)
    fast = generate(model, VOCAB, PROMPTS, cfg)
    ref = [generate_reference(model, VOCAB, p, cfg) for p in PROMPTS]
    assert [f["tokens"][:len(r["tokens"])] for f, r in zip(fast, ref)] == [r["tokens"] for r in ref]
    assert any(r["codes"] is not None for r in ref), "the test must exercise the image phase"
    assert len({len(r["plan"]) for r in ref}) > 1, "plans of different lengths exercise the padding"


def test_tags_change_the_samples():
    """The agreement above can fail when the fast sampler carries tags wrong: without them it samples otherwise."""
    model = grammar_model()
    cfg = SampleConfig(temperature=0.0, text_temperature=0.0, cfg_scale=2.0, max_plan_tokens=8)
    untagged = dataclasses.replace(VOCAB, tagger=None)
    assert ([s["tokens"] for s in generate(model, untagged, PROMPTS, cfg)]
            != [s["tokens"] for s in generate(model, VOCAB, PROMPTS, cfg)])


class Scripted(torch.nn.Module):
    """A stand-in GPT that writes row r's plan plans[r % len(plans)], then <boi> and codes, whatever it is fed,
    and records the ids, patches and tags of every call."""

    def __init__(self, plans):
        super().__init__()
        self.cfg = GPTConfig(vocab_size=VOCAB.size, image_offset=VOCAB.image_offset, n_image_tokens=N_IMG,
                             block_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=4, n_tags=VOCAB.tagger.n_tags)
        self.weight = torch.nn.Parameter(torch.zeros(1))  # the sampler takes its device and dtype from a parameter
        self.plans, self.calls = plans, []

    def forward(self, idx, patch=None, tags=None, pos=None, key_valid=None, cache=None):
        step = len(self.calls)
        self.calls.append((idx, torch.zeros_like(idx) if patch is None else patch, tags))
        cache.length += idx.shape[1]
        logits = torch.zeros(idx.shape[0], idx.shape[1], VOCAB.size)
        for r in range(idx.shape[0]):
            script = self.plans[r % len(self.plans)] + [BOI]
            logits[r, -1, script[step] if step < len(script)
                   else VOCAB.image_offset + step % VOCAB.codebook_size] = 10.0
        return logits


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_fast_sampler_feeds_the_patches_and_tags_of_training(cfg_scale):
    """What the KV-cache sampler feeds, row by row (its left padding cut): the patches and tags of the whole
    sequence fed (patch_positions, Tagger.tags), and a prefix of the training sequence of the same prompt,
    plan and image: build_sequence's, or for the null rows its null=True one. The plans open regions that
    attribute words keep open, then close them, and have different lengths."""
    plans = [[9, 12, 13, 20, 10, 13], [11], [20, 11, 12, 12, 13, 21, 9]]
    prompts = [[12, 9], [21], [13, 14, 15, 16]]
    model = Scripted(plans)
    samples = generate(model, VOCAB, prompts, SampleConfig(temperature=0.0, text_temperature=0.0, cfg_scale=cfg_scale))
    ids, patch, tags = (torch.cat([c[k] for c in model.calls], 1).tolist() for k in range(3))
    width = len(ids[0]) - (len(model.calls) - 1)  # the prompt columns
    assert [s["plan"] for s in samples] == plans and all(s["codes"] is not None for s in samples)
    for r in range(len(ids)):
        s, prompt = samples[r % len(samples)], prompts[r % len(prompts)]
        seq = ids[r][width - (2 + len(prompt)):]  # <bos> prompt <think> and what followed
        assert (patch[r][-len(seq):] == patch_positions(seq, VOCAB.image_offset)
                and tags[r][-len(seq):] == VOCAB.tagger.tags(seq))
        train = build_sequence("plan", VOCAB, prompt, s["plan"], s["codes"], null=r >= len(samples))[0]
        fed = [t for t in seq if t != PAD]  # a row that is done is fed <pad> until every row is
        assert fed == train[:len(fed)] and len(fed) >= len(train) - 2  # <eoi> is fed only while other rows draw on
    assert tags[0][width - 3:width + 7] == [0, 1, 0, 1, 1, 1, 0, 2, 2, 0]  # prompt, <think>, plans[0] and <boi>:
    #                                                                        the regions
    assert tags[2][width:width + 8] == [0, 3, 3, 3, 3, 0, 1, 0]


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
