"""The networks: VQ shapes and gradients, GPT cache and padding equivalences."""
import pytest
import torch
import torch.nn.functional as F

import model as model_module
from model import GPT, VQ, GPTConfig, KVCache, RMSNorm, RMSNormFunction, RoPE, VQConfig, rope_tables, token_ce, use_bf16


def tiny_gpt(**kw):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=60, image_offset=40, n_image_tokens=4, block_size=32, n_layer=2, n_head=4,
                    n_kv_head=2, n_embd=32, mlp_hidden=64, **kw)
    return GPT(cfg).double().eval()


def test_vq_shapes_and_range():
    vq = VQ(VQConfig(codebook_size=32, hidden=16))
    x = torch.rand(3, 3, 32, 32)
    recon, losses, codes = vq(x)
    assert recon.shape == x.shape and codes.shape == (3, 64)
    assert 0 <= codes.min() and codes.max() < 32
    assert set(losses) == {"recon", "commit", "codebook"}
    assert torch.equal(vq.encode(x), codes)
    img = vq.decode(codes)  # images as read: clamped to [0, 1]; the training output is not
    assert img.min() >= 0 and img.max() <= 1
    assert torch.allclose(img, recon.clamp(0, 1), atol=1e-6)


def test_vq_autoencoder_warmup_and_codebook_init():
    vq = VQ(VQConfig(codebook_size=32, hidden=16))
    recon, losses, codes = vq(torch.rand(2, 3, 32, 32), quantize=False)
    assert codes is None and set(losses) == {"recon"} and recon.shape == (2, 3, 32, 32)
    z = torch.nn.functional.normalize(torch.randn(200, 16), dim=-1)
    z[100:] = z[0]  # half the outputs identical (the background): the init must not spend codes on them
    vq.init_codebook(z)
    book = vq.codebook.weight
    assert torch.allclose(book.norm(dim=-1), torch.ones(32))
    assert len({tuple(r) for r in book.tolist()}) == 32, "farthest-point picks distinct outputs"


def test_vq_straight_through_gradient_reaches_encoder_and_codebook():
    vq = VQ(VQConfig(codebook_size=32, hidden=16))
    recon, losses, _ = vq(torch.rand(2, 3, 32, 32))
    losses["recon"].backward(retain_graph=True)
    # the reconstruction loss reaches the encoder only through the straight-through copy
    assert vq.encoder[0].weight.grad.abs().sum() > 0
    vq.zero_grad()
    losses["codebook"].backward(retain_graph=True)
    assert vq.codebook.weight.grad.abs().sum() > 0 and vq.encoder[0].weight.grad is None
    vq.zero_grad()
    losses["commit"].backward()  # the commitment term moves the encoder, never the codebook
    assert vq.encoder[0].weight.grad.abs().sum() > 0 and vq.codebook.weight.grad is None


def test_vq_codebook_gradient_is_the_same_on_every_run():
    """Thousands of positions on a few codes (as the plain background gives) on 2 threads: the codebook's gradient
    must not depend on the order the threads add it in, or two runs of one command train different VQs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vq = VQ(VQConfig(codebook_size=256))
        book = F.normalize(vq.codebook.weight.detach(), dim=-1)
        z = book[torch.randint(0, 4, (64 * 64,))] + 0.01 * torch.randn(64 * 64, book.shape[1])  # (N, D) near 4 codes
        z = z.T.reshape(1, -1, 64, 64)  # (1, D, h, w)
        grads = set()
        for _ in range(10):
            vq.zero_grad()
            _, _, losses = vq.quantize(z)
            (1000 * losses["codebook"]).backward()
            grads.add(vq.codebook.weight.grad.numpy().tobytes())
        assert len(grads) == 1, f"{len(grads)} different codebook gradients from 10 identical steps"
    finally:
        torch.set_num_threads(threads)


def test_vq_decode_reads_the_codes_it_encoded():
    vq = VQ(VQConfig(codebook_size=32, hidden=16)).eval()
    x = torch.rand(2, 3, 32, 32)
    recon, _, codes = vq(x)
    torch.testing.assert_close(vq.decode(vq.encode(x)), recon.clamp(0, 1))  # decode(encode(x)) is the forward's picture
    assert torch.equal(codes, vq.encode(x))


def test_dead_codes_restart_onto_encoder_outputs():
    vq = VQ(VQConfig(codebook_size=32, hidden=16)).train()
    vq(torch.rand(1, 3, 32, 32))  # 64 picks: some codes stay unused
    dead = (vq.usage == 0).nonzero().squeeze(1)
    alive = (vq.usage > 0).nonzero().squeeze(1)
    before = vq.codebook.weight.detach().clone()
    z = torch.nn.functional.normalize(torch.randn(100, 16), dim=-1)
    assert vq.restart_dead_codes(z) == len(dead) > 0
    after = vq.codebook.weight.detach()
    assert torch.equal(after[alive], before[alive]) and not torch.equal(after[dead], before[dead])
    assert (vq.usage == 0).all()  # counting starts again


TAGS = dict(n_tags=4)  # the tag path on


def inputs(idx, n_tags=4, seed=1):
    """patch (image tokens, ids >= 40, numbered 1..4 round the grid) and random tags for ids (B, T)."""
    T = idx.shape[1]
    patch = torch.where(idx >= 40, torch.arange(T) % 4 + 1, 0)
    return dict(patch=patch, tags=torch.randint(0, n_tags, idx.shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("tags", [{}, TAGS])
def test_kv_cache_equals_full_forward(tags):
    model = tiny_gpt(**tags)
    idx = torch.randint(0, 60, (2, 12))
    kw = inputs(idx)
    full = model(idx, **kw)
    cache = KVCache(model.cfg, 2, 12, "cpu", torch.float64)
    cut = lambda a, b: {k: v[:, a:b] for k, v in kw.items()}
    parts = [model(idx[:, :5], cache=cache, **cut(0, 5))]
    for t in range(5, 12):  # then one token at a time
        parts.append(model(idx[:, t:t + 1], cache=cache, **cut(t, t + 1)))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-10)
    assert cache.length == 12


@pytest.mark.parametrize("tags", [{}, TAGS])
def test_left_padding_with_mask_equals_unpadded(tags):
    model = tiny_gpt(**tags)
    seq = torch.randint(8, 40, (1, 7))
    t = torch.tensor([[0, 1, 1, 0, 2, 3, 3]])
    want = model(seq, tags=t)[:, -1]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    valid = torch.tensor([[False] * 3 + [True] * 7])
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    got = model(padded, tags=F.pad(t, (3, 0)), pos=pos, key_valid=valid)[:, -1]
    assert torch.allclose(got, want, atol=1e-10)
    assert not torch.isnan(model(padded, pos=pos, key_valid=valid)).any()


def test_cpu_bf16_autocast_keeps_attention_in_float32_and_tracks_float32(monkeypatch):
    """train.dtype=bfloat16 on a CPU: matmuls in bf16, attention in float32 (torch's CPU attention backward is
    2x slower in bf16); loss and gradients stay close to a float32 step's."""
    model = tiny_gpt(**TAGS).float().train()
    idx = torch.randint(0, 60, (4, 16))
    kw = inputs(idx)
    seen, sdpa = [], F.scaled_dot_product_attention  # autocast would cast attention's inputs below this call
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: (seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
                                               or sdpa(q, k, v, **kw)))

    def loss_and_grads(bf16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(idx, **kw)
        loss = token_ce(logits, idx.roll(-1, 1)).mean()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    loss32, grads32 = loss_and_grads(False)
    loss16, grads16 = loss_and_grads(True)
    assert seen == [(torch.float32, False)] * 4  # 2 layers, each step
    assert abs(loss16 - loss32) < 0.01 * loss32
    assert F.cosine_similarity(grads16, grads32, dim=0) > 0.99


def test_dtype_auto_takes_bf16_on_a_cpu_only_where_it_is_native(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(model_module, "cpu_has_bf16", lambda: native)
        assert use_bf16("auto", "cpu") == native
        assert use_bf16("bfloat16", "cpu")
        assert not use_bf16("float32", "cpu")


def test_patch_and_tag_embeddings_change_only_their_positions_and_row_zero_stays_zero():
    """Patch 0 (text) and tag 0 (untagged) add nothing: the same logits as no patch or tags at all; a patch
    or a tag changes its own position's logits (and, through attention, later ones) but none before it.
    Row 0 of each table is zero and gets no gradient, so it stays zero through training."""
    model = tiny_gpt(**TAGS)
    idx = torch.tensor([[2, 45, 9, 41, 50, 7]])
    none = model(idx)
    zero = torch.zeros_like(idx)
    assert torch.equal(model(idx, patch=zero, tags=zero), none)
    for kw in (dict(patch=torch.tensor([[0, 0, 0, 0, 1, 2]])), dict(tags=torch.tensor([[0, 0, 0, 0, 3, 1]]))):
        out = model(idx, **kw)
        assert torch.allclose(out[:, :4], none[:, :4]) and not torch.allclose(out[:, 4:], none[:, 4:])
    model.train()
    token_ce(model(idx, **inputs(idx)), idx).sum().backward()
    for table in (model.patch_embed, model.tag_embed):
        assert (table.weight[0].abs().sum() == 0 and table.weight.grad[0].abs().sum() == 0
                and table.weight.grad[1:].abs().sum() > 0)


def test_rope_and_rms_norm_functions_equal_their_textbook_forms():
    """The hand-written RoPE and RMSNorm autograd functions against the plain formulas (autograd's
    gradients of those), forward and backward, in float64."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in rope_tables(8, 5, 10000.0))
    for c, s in ((cos, sin),  # training's table,
                 (cos[None, None].expand(2, 1, 5, 4), sin[None, None].expand(2, 1, 5, 4))):  # the sampler's per row
        x1, x2 = x.chunk(2, dim=-1)
        want = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
        got = RoPE.apply(x, c, s)
        g = torch.randn_like(want)
        assert torch.allclose(got, want) and torch.allclose(torch.autograd.grad(got, x, g)[0],
                                                            torch.autograd.grad(want, x, g)[0])
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    got = RMSNormFunction.apply(x, w, 1e-6)
    g = torch.randn_like(want)
    assert torch.allclose(got, want)
    assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad(got, (x, w), g),
                                                    torch.autograd.grad(want, (x, w), g)))
    assert torch.allclose(RMSNorm(8).double()(x), F.rms_norm(x, (8,), torch.ones(8, dtype=torch.float64), 1e-6))


def test_token_ce_is_the_negative_log_probability_of_each_target():
    logits = torch.randn(2, 3, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 3))
    ce = token_ce(logits, targets)
    assert ce.shape == (2, 3) and ce.dtype == torch.float32
    assert torch.allclose(ce, -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0].float())
