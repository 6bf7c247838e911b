"""Episodes of the shapes world, their token layout, the interleaved GPT (mmfs.py) and sampling across images."""
import dataclasses
import functools
import json
import os

import numpy as np
import pytest
import torch

import episodes
import parser
import world
from data import BOI, BOS, EOI, EOS, PAD, THINK, Tagger, Vocab, train_tokenizer
from episodes import Edit, EpisodeError
from generate import SampleConfig, generate_interleaved, generate_interleaved_reference, load_run, save_atomic
from model import GPT, VQ, GPTConfig, VQConfig, token_ce

N_IMG = 16  # a 4x4 image: a two-level pyramid (4x4, 2x2)
VOCAB = Vocab(text_size=30, codebook_size=16,
              tagger=Tagger(30, cell_ids=(9, 10, 11), keep_ids=(12, 13), patch_tags=(1, 1, 2, 2) * 2 + (3, 3, 0, 0) * 2))


@functools.lru_cache(maxsize=None)
def tokenizer():
    return train_tokenizer(n=5)


def test_episodes_render_parse_and_apply_exactly():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(60):
        ep = episodes.random_episode(rng, 4)
        for prev, step in zip(ep.steps, ep.steps[1:]):
            assert episodes.apply_edit(prev.scene, step.edit) == step.scene
            kinds.add(step.edit.kind)
            kept = set(prev.scene.objects) - {step.edit.target}
            assert kept <= set(step.scene.objects), "objects the edit does not name persist unchanged"
        for step in ep.steps:
            assert parser.parse(world.render(step.scene)) == step.scene
            assert world.parse_plan(world.plan_text(step.scene)) == step.scene
        q = ep.question
        assert q.answer in {o.colour for o in ep.steps[q.image].scene.objects} | {o.shape for o in ep.steps[q.image].scene.objects}
    assert kinds == set(episodes.EDITS)


def test_instructions_use_only_the_worlds_words():
    """Any world run's tokenizer reads episodes (encode_text raises on an unknown word)."""
    tok = tokenizer()
    vocab = Vocab(tok.get_vocab_size(), 16)
    for ep in episodes.sample_episodes(40, 1, "train"):
        codes = [[0] * N_IMG] * len(ep.steps)
        ids, mod, tgt = episodes.episode_sequence(ep, tok, vocab, codes, 2, 10_000)
        assert len(ids) == len(mod) == len(tgt) and ids[0] == BOS and ids[-1] == EOS
        assert ids.count(BOI) == ids.count(EOI) == len(ep.steps) and ids.count(PAD) == 2 * len(ep.steps)


def test_episodes_keep_the_long_tail_as_the_pairs_do():
    """With train.tail_keep = 0 no episode shows a long-tail composition in any of its images (it would teach the
    GPT what its pairs hide); with 1 many do."""
    shows = lambda eps: sum(any(world.shows_tail(s.scene) for s in ep.steps) for ep in eps)
    assert shows(episodes.sample_episodes(200, 0, "train", tail_keep=0.0)) == 0
    assert shows(episodes.sample_episodes(200, 0, "train")) > 50


def test_bad_input_is_a_clear_error():
    scene = world.Scene((world.Obj("circle", "red", "small", 0, 0),))
    ghost = world.Obj("square", "blue", "large", 1, 1)
    for edit in (Edit("recolour", ghost, dataclasses.replace(ghost, colour="red")), Edit("remove", ghost),
                 Edit("move", ghost, dataclasses.replace(ghost, row=2))):
        with pytest.raises(EpisodeError, match="blue square in the center that the scene lacks"):
            episodes.apply_edit(scene, edit)
        with pytest.raises(EpisodeError, match="lacks"):
            episodes.instruction(scene, edit)
    with pytest.raises(EpisodeError, match="already has one"):
        episodes.apply_edit(scene, Edit("add", obj=world.Obj("square", "blue", "large", 0, 0)))
    ep = episodes.sample_episodes(1, 0, "train", n_images=4)[0]
    tok = tokenizer()
    with pytest.raises(EpisodeError, match=r"4 images is \d+ tokens, more than gpt.block_size=100"):
        episodes.episode_sequence(ep, tok, Vocab(tok.get_vocab_size(), 16), [[0] * N_IMG] * 4, 0, 100)


def toy_episode(rng, k, n_images=3, words=2):
    """A synthetic interleaved sequence in VOCAB: (words <think> word <boi> codes <eoi> [k slots]) x n_images, no
    <eos>: a tiny model trained for a moment cannot count images, and must not learn to stop after one."""
    ids = [BOS]
    for _ in range(n_images):
        ids += rng.integers(14, 30, words).tolist() + [THINK, int(rng.integers(9, 14)), BOI]
        ids += (VOCAB.image_offset + rng.integers(0, 16, N_IMG)).tolist() + [EOI] + [PAD] * k
    return ids


def toy_batch(rng, k, n=12):
    seqs = []
    for _ in range(n):
        ids = toy_episode(rng, k)
        seqs.append((ids, [0] * len(ids), [0] + [int(t != PAD) for t in ids[1:]]))
    return episodes.make_batch(seqs, VOCAB, N_IMG, k, "cpu")


def toy_cfg(**kw):
    return GPTConfig(vocab_size=VOCAB.size, image_offset=VOCAB.image_offset, n_image_tokens=N_IMG, block_size=160,
                     n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64, n_tags=VOCAB.tagger.n_tags, **kw)


@functools.lru_cache(maxsize=None)
def toy_model(k, sync_every, steps=100):
    """A tiny GPT trained for a moment on toy episodes, so that greedy samples open three images by themselves;
    its synchronizers open (gate 1) from the start, so that they learn to matter and a wrong visibility changes
    what it samples. float64."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = GPT(toy_cfg(ctx_tokens=k, sync_every=sync_every))
    with torch.no_grad():
        for s in getattr(model, "syncs", {}).values():
            s.gate.fill_(1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        b = toy_batch(rng, k)
        loss = (token_ce(model(b.x, patch=b.patch, tags=b.tags, context=b.context), b.y) * b.weight).sum() / b.weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double().eval()


@pytest.mark.parametrize("k,sync_every", [(0, 0), (2, 1)])
def test_interleaved_fast_equals_reference_on_three_images(k, sync_every):
    model = toy_model(k, sync_every)
    cfg = SampleConfig(temperature=0.0, text_temperature=0.0, cfg_scale=1.0, max_plan_tokens=6)
    rng = np.random.default_rng(5)
    one = toy_episode(rng, k, n_images=1)  # a prefix that already holds a closed image
    prefixes = [[BOS, 20, 21, THINK], [BOS, 25, THINK], one + [22, 23, 24, THINK]]
    fast = generate_interleaved(model, VOCAB, prefixes, cfg, max_images=3)
    ref = [generate_interleaved_reference(model, VOCAB, p, cfg, max_images=3) for p in prefixes]
    assert [f[:len(r)] for f, r in zip(fast, ref)] == ref
    assert ref[0].count(EOI) == 3, f"the test must sample a 3-image episode: {ref[0]}"
    plain = [one[:one.index(EOI) + 1], [BOS, 26, THINK]]  # pair sequences, no layout: e.g. an image to caption
    fast = generate_interleaved(model, VOCAB, plain, cfg, max_images=1, plain=True)
    ref = [generate_interleaved_reference(model, VOCAB, p, cfg, max_images=1, plain=True) for p in plain]
    assert [f[:len(r)] for f, r in zip(fast, ref)] == ref


def test_no_position_sees_a_later_image():
    """Changing image i's codes (the features the resampler and the synchronizers read, not the ids) changes
    nothing at or before image i's <eoi>, and something after it."""
    model = toy_model(2, 1)
    b = toy_batch(np.random.default_rng(1), 2, n=2)
    ctx = b.context
    base = model(b.x, patch=b.patch, tags=b.tags, context=ctx)
    for i in range(ctx.codes.shape[1]):
        changed = dataclasses.replace(ctx, codes=ctx.codes.clone())
        changed.codes[:, i] = (changed.codes[:, i] + 1) % VOCAB.codebook_size
        out = model(b.x, patch=b.patch, tags=b.tags, context=changed)
        for r in range(2):
            eoi = int(ctx.closed[r, i])
            assert torch.equal(out[r, :eoi + 1], base[r, :eoi + 1]), f"a position before image {i} closed saw it"
            assert not torch.allclose(out[r, eoi + 1:], base[r, eoi + 1:]), "the test must be able to fail"


def test_closed_step_is_hidden():
    """With ctx_tokens, a position after a step's <eoi> sees neither that step's text nor its codes: changing them
    in the ids (not the codes the resampler reads) changes nothing after the <eoi>."""
    model = toy_model(2, 1)
    b = toy_batch(np.random.default_rng(2), 2, n=1)
    eoi = int(b.context.closed[0, 0])
    x = b.x.clone()
    x[0, 1:eoi] = torch.where(x[0, 1:eoi] >= VOCAB.image_offset, VOCAB.image_offset + 3, 20)
    base = model(b.x, patch=b.patch, tags=b.tags, context=b.context)
    out = model(x, patch=b.patch, tags=b.tags, context=b.context)
    assert torch.equal(out[0, eoi + 1:], base[0, eoi + 1:])
    assert not torch.allclose(out[0, :eoi + 1], base[0, :eoi + 1])


def test_gate_zero_equals_the_plain_model():
    torch.manual_seed(0)
    plain = GPT(toy_cfg()).double().eval()
    synced = GPT(toy_cfg(sync_every=1)).double().eval()
    missing, unexpected = synced.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(m.startswith(("image_features.", "syncs.")) for m in missing)
    b = toy_batch(np.random.default_rng(3), 0, n=3)
    args = dict(patch=b.patch, tags=b.tags, context=b.context)
    assert torch.equal(synced(b.x, **args), plain(b.x, **args))
    with torch.no_grad():
        synced.syncs["0"].gate.fill_(0.5)
    assert not torch.allclose(synced(b.x, **args), plain(b.x, **args)), "the test must be able to fail"


def test_an_old_run_without_the_new_config_keys_loads(tmp_path):
    """A run directory whose config.json predates ctx_tokens/sync_every/max_images loads as a plain GPT."""
    tok = tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    vc = VQConfig(codebook_size=16, hidden=8)
    save_atomic(VQ(vc).state_dict(), str(tmp_path / "vq.safetensors"))
    gc = GPTConfig(vocab_size=tok.get_vocab_size() + 16, image_offset=tok.get_vocab_size(), n_layer=1, n_embd=32,
                   n_head=2, n_kv_head=2, mlp_hidden=64, n_tags=10)
    gpt = GPT(gc)
    save_atomic(gpt.state_dict(), str(tmp_path / "gpt.safetensors"))
    old = {k: v for k, v in dataclasses.asdict(gc).items() if k not in ("ctx_tokens", "sync_every", "max_images")}
    json.dump({"train": {"data_dir": ""}, "vq": dataclasses.asdict(vc), "gpt": old, "plan_version": 3},
              open(tmp_path / "config.json", "w"))
    _, _, _, _, loaded = load_run(str(tmp_path))
    assert not loaded.cfg.interleaved and not hasattr(loaded, "syncs")
    x = torch.randint(0, gc.vocab_size, (1, 12))
    assert torch.equal(loaded(x), gpt.eval()(x))


def test_world_episode_batch_trains():
    """Real episodes through the tokenizer, the layout and an interleaved GPT: a finite loss, and the layout
    hides each closed step from exactly the positions after its <eoi>."""
    tok = tokenizer()
    vocab = Vocab(tok.get_vocab_size(), 16)
    eps = episodes.sample_episodes(4, 2, "train", n_images=3)
    codes = [[np.random.default_rng(i).integers(0, 16, 64).tolist() for _ in ep.steps] for i, ep in enumerate(eps)]
    seqs = [episodes.episode_sequence(ep, tok, vocab, c, 3, 1000) for ep, c in zip(eps, codes)]
    b = episodes.make_batch(seqs, vocab, 64, 3, "cpu")
    ids = seqs[0][0]
    until, slot, got_codes, closed = episodes.context_layout(ids, vocab.image_offset, 64, 3)
    assert got_codes == codes[0] and [ids[c] for c in closed] == [EOI] * 3
    assert until[1] == closed[0] and until[closed[0]] == closed[0] and slot[closed[0] + 1:closed[0] + 4] == [1, 2, 3]
    model = GPT(GPTConfig(vocab_size=vocab.size, image_offset=vocab.image_offset, block_size=512, n_layer=2,
                          n_embd=32, n_head=2, n_kv_head=2, mlp_hidden=64, ctx_tokens=3, sync_every=2))
    loss = (token_ce(model(b.x, patch=b.patch, context=b.context), b.y) * b.weight).sum() / b.weight.sum()
    loss.backward()
    assert torch.isfinite(loss) and model.syncs["1"].gate.grad is not None


def test_the_interleaved_scorers():
    """The caption parser reads every caption of the world back; score_step credits exactly what an edit asks."""
    from interleaved import parse_caption, score_step
    rng = np.random.default_rng(4)
    for _ in range(100):
        scene = world.random_scene(rng)
        assert parse_caption(world.caption_text(scene, rng)) == scene
    ep = episodes.sample_episodes(1, 3, "bench", n_images=2)[0]
    prev, step = ep.steps
    assert score_step(ep, 1, step.scene) == {"exact": 1.0, "persist": 1.0, "edit": 1.0}
    unchanged = score_step(ep, 1, prev.scene)
    assert unchanged["exact"] == 0.0 and unchanged["edit"] == 0.0 and unchanged["persist"] == 1.0
    nothing = score_step(ep, 1, None)
    assert nothing["exact"] == nothing["edit"] == 0.0


def test_split_interleaved():
    from generate import split_interleaved
    off = VOCAB.image_offset
    toks = [20, THINK, 9, BOI, off + 1, off + 2, EOI, PAD, PAD, 21, BOI, off + 3, EOI, 22, EOS]
    assert split_interleaved(toks, off) == [([20, 9], [1, 2]), ([21], [3]), ([22], None)]


def test_the_interleaved_config_loads_and_is_checked():
    import train
    from config import ConfigError
    path = os.path.join(os.path.dirname(__file__), "..", "tiny_configs", "interleaved.toml")
    cfgs = train.load_config(path)
    assert cfgs["gpt"].interleaved and cfgs["train"].episode_share > 0 and cfgs["train"].lm_init
    with pytest.raises(ConfigError, match="train.episode_images=5 must lie in 1..gpt.max_images=4"):
        train.load_config(path, ["train.episode_images=5"])
