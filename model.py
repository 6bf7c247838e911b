"""
The networks of nanoloom, in one file: the VQ image tokenizer, the unified GPT and its LoRA adapters.

- VQ: a small conv autoencoder whose bottleneck is a codebook. An image (3, H, W) becomes
  (H/p) * (W/p) integer codes, one per p x p patch; the decoder turns codes back into pixels.
- GPT: a Llama-style decoder-only transformer (RMSNorm, RoPE, SwiGLU, no biases, SDPA attention)
  over ONE vocabulary: text tokens first, then the image codebook at `image_offset`. A static KV
  cache (one tensor per layer, written by index) makes sampling cheap. Besides its id, a token may carry
  its patch (which part of its image an image token draws) and a tag (any per-token label the caller
  computes, e.g. data.Tagger's layout regions): each adds a learned vector to the token's embedding.
- Several images in one sequence (optional, off by default): a closed image may reach the rest of the sequence
  through a few resampler tokens only, and synchronizers may cross-attend to the images before each position
  (mmfs.py, MM-Interleaved); the caller says where the images are (ImageContext, episodes.context_inputs).
- LoRA: named low-rank adapters on chosen Linear layers (post-training), merged into the weights only by
  an explicit call.

This file knows tensors, not the shapes world: it imports nothing of the project but mmfs.py (tensors too).
Quick check that it builds:  python model.py
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfs import ImageFeatures, Resampler, Synchronizer, image_visibility

# -----------------------------------------------------------------------------
# VQ image tokenizer


@dataclass
class VQConfig:
    image_size: int = 32  # square RGB images, side in pixels
    patch: int = 4  # each code covers a patch x patch pixel block (down-sampling factor)
    codebook_size: int = 256  # number of codes K; the GPT vocabulary grows by this much
    code_dim: int = 16  # codebook vectors are l2-normalised in this many dimensions (LlamaGen uses 8)
    hidden: int = 96  # channels of the encoder/decoder convolutions
    beta: float = 0.25  # weight of the commitment term, which pulls the ENCODER towards its code

    @property
    def grid(self) -> int:  # codes per side
        return self.image_size // self.patch

    @property
    def n_codes(self) -> int:  # codes per image
        return self.grid**2


class VQ(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        assert cfg.image_size % cfg.patch == 0, "image_size must be a multiple of patch"
        self.cfg = cfg
        h, p = cfg.hidden, cfg.patch
        # encoder: patchify (one vector per p x p patch), then a 3x3 conv so a code sees its neighbours
        self.encoder = nn.Sequential(
            nn.Conv2d(3, h, p, stride=p), nn.GELU(),
            nn.Conv2d(h, h, 3, padding=1), nn.GELU(),
            nn.Conv2d(h, cfg.code_dim, 1),
        )
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        # decoder: each code (and its 3x3 neighbourhood) predicts its own p x p patch directly through a
        # pixel shuffle; a prototype found this sharper than a stack of up-sampling convolutions
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.code_dim, h, 1), nn.GELU(),
            nn.Conv2d(h, h, 3, padding=1), nn.GELU(),
            nn.Conv2d(h, 3 * p * p, 1),
            nn.PixelShuffle(p),
        )
        # how often each code was picked since the last dead-code restart (training bookkeeping only)
        self.register_buffer("usage", torch.zeros(cfg.codebook_size), persistent=False)

    def _codebook(self):
        return F.normalize(self.codebook.weight, dim=-1)  # (K, D)

    def quantize(self, z):
        """z (B, D, h, w) encoder output -> (z_q straight-through, codes (B, h*w), losses)."""
        B, D, h, w = z.shape
        z = F.normalize(z, dim=1)
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D)
        book = self._codebook()
        # both sides are unit vectors, so the nearest code by distance is the one of largest dot product
        codes = (flat @ book.t()).argmax(dim=1)  # (B*h*w,)
        # a one-hot product, not book[codes]: the indexing's backward adds rows in a thread-dependent order,
        # which made two runs of the same command train different codebooks
        zq = F.one_hot(codes, book.shape[0]).to(book.dtype) @ book  # (B*h*w, D)
        if self.training:
            self.usage += torch.bincount(codes, minlength=self.cfg.codebook_size).float()
        losses = {
            "commit": self.cfg.beta * F.mse_loss(flat, zq.detach()),  # moves the encoder
            "codebook": F.mse_loss(zq, flat.detach()),  # moves the codebook
        }
        zq = flat + (zq - flat).detach()  # straight-through: forward uses zq, backward copies grads to z
        zq = zq.view(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
        return zq, codes.view(B, h * w), losses

    def forward(self, images, quantize=True):
        """images (B, 3, H, W) in [0, 1] -> (reconstruction, losses, codes). quantize=False skips the
        codebook (a plain autoencoder on the unit sphere): used to warm up before the codebook exists."""
        if not quantize:
            z = F.normalize(self.encoder(images * 2 - 1), dim=1)
            recon = self.decode_latents(z)
            return recon, {"recon": F.mse_loss(recon, images)}, None
        zq, codes, losses = self.quantize(self.encoder(images * 2 - 1))
        recon = self.decode_latents(zq)
        losses["recon"] = F.mse_loss(recon, images)
        return recon, losses, codes

    def decode_latents(self, zq):
        # linear output, clamped to [0, 1] only when images are read: a sigmoid saturates on the white
        # background (most pixels) and its vanishing gradient stalls training at an all-white image
        return self.decoder(zq)  # (B, 3, H, W)

    @torch.no_grad()
    def encode(self, images):
        """images (B, 3, H, W) in [0, 1] -> codes (B, h*w) in [0, K)."""
        return self.quantize(self.encoder(images * 2 - 1))[1]

    def decode(self, codes):
        """codes (B, h*w) -> images (B, 3, H, W) in [0, 1]."""
        g = self.cfg.grid
        zq = self._codebook()[codes].view(codes.shape[0], g, g, -1).permute(0, 3, 1, 2)  # (B, D, g, g)
        return self.decode_latents(zq).clamp(0, 1)

    def decode_soft(self, probs):
        """probs (B, h*w, K), a distribution over the codebook at each patch -> images (B, 3, H, W) in [0, 1]:
        each patch decodes the probs-weighted mixture of the code vectors, differentiable in probs; one-hot
        probs give decode's image."""
        g = self.cfg.grid
        zq = (probs @ self._codebook()).view(probs.shape[0], g, g, -1).permute(0, 3, 1, 2)  # (B, D, g, g)
        return self.decode_latents(zq).clamp(0, 1)

    @torch.no_grad()
    def init_codebook(self, z_sample):
        """Farthest-point initialisation from l2-normalised encoder outputs z_sample (M, D), M >= K: each
        new code is the output worst fitted by the codes chosen so far, so rare patches (object edges)
        get codes as surely as the plain background does."""
        chosen = [0]
        fit = z_sample @ z_sample[0]  # (M,) cosine to the nearest chosen code
        for _ in range(self.cfg.codebook_size - 1):
            i = int(fit.argmin())
            chosen.append(i)
            fit = torch.maximum(fit, z_sample @ z_sample[i])
        self.codebook.weight.copy_(z_sample[chosen])

    @torch.no_grad()
    def restart_dead_codes(self, z_sample):
        """Codes never picked since the last call jump onto the recent encoder outputs that the codebook
        fits worst, so the whole codebook stays in use and goes where it is needed (a dead code gets no
        gradient and never recovers on its own; restarting onto random outputs would mostly pick the
        plain background, which already has its code). z_sample: (M, D) l2-normalised encoder outputs.
        Returns the number of codes restarted."""
        dead = (self.usage == 0).nonzero().squeeze(1)
        if len(dead) > 0:
            fit = (z_sample @ self._codebook().t()).max(dim=1).values  # (M,) cosine to the nearest code
            worst = fit.argsort()[:len(dead)]
            self.codebook.weight[dead[:len(worst)]] = z_sample[worst]
        self.usage.zero_()
        return len(dead)


# -----------------------------------------------------------------------------
# Unified GPT


@dataclass
class GPTConfig:
    vocab_size: int = 512  # text tokens + codebook; set by the caller from the tokenizer and the VQ
    image_offset: int = 256  # id of code 0: ids >= image_offset are image codes
    n_image_tokens: int = 64  # codes per image (patches); the patch table has one more row, for text tokens
    block_size: int = 192  # longest sequence (prompt + plan + image); sizes RoPE tables and the KV cache
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 4  # key/value heads (< n_head gives grouped-query attention)
    n_embd: int = 128  # width of the residual stream
    mlp_hidden: int = 352  # SwiGLU width: about 8/3 * n_embd, rounded to a multiple of 32
    rope_theta: float = 10000.0  # RoPE base: the longest wavelength, in positions
    patch_emb: bool = True  # add a learned embedding of each image token's patch (its row and column in the image)
    n_tags: int = 0  # rows of the tag embedding, row 0 (untagged) fixed at zero; 0 = no tags; set by the caller
    ctx_tokens: int = 0  # interleaved sequences: a closed image reaches later positions only through this many
    #                      resampler tokens (mmfs.Resampler); 0 = through its codes, which stay in context
    sync_every: int = 0  # MMFS: a synchronizer (mmfs.Synchronizer) after every this many blocks; 0 = none
    max_images: int = 4  # most images in one sequence: rows of the synchronizer's relative-image embedding

    @property
    def interleaved(self):  # the model has modules for several images per sequence
        return self.ctx_tokens > 0 or self.sync_every > 0


@dataclass
class ImageContext:
    """What the GPT needs to know of a sequence's images besides its tokens (episodes.context_inputs builds it).
    Columns count from the start of the sequence (of the cache, when there is one), padding included."""
    codes: torch.Tensor  # (B, I, n_image_tokens) each image's codes (0..K-1), in the order the images close
    closed: torch.Tensor  # (B, I) the column of each image's <eoi>; NEVER for an image that has not closed
    slot: torch.Tensor  # (B, T) 1 + i * ctx_tokens + j at image i's j-th resampler token, 0 elsewhere
    until: torch.Tensor  # (B, L) the last column whose query may see each key: a step's text (and, with
    #                      ctx_tokens, its image) is hidden from what follows it; NEVER = always visible


NEVER = 1 << 30  # ImageContext's column "not closed" / "never hidden"


class RMSNormFunction(torch.autograd.Function):
    """rms_norm with a hand-written backward: on a CPU, torch's rms_norm runs as ~10 elementwise kernels
    (forward and backward) and takes over twice this one's time."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        C = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(C).add_(eps).rsqrt_()  # (..., 1) 1/rms
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, weight = ctx.saved_tensors
        gx = grad * xhat
        mean = (gx @ weight).unsqueeze(-1) / xhat.shape[-1]  # (..., 1) mean of grad * weight * xhat
        dx = torch.addcmul(grad * weight, xhat, mean, value=-1).mul_(rstd)  # rstd (g - xhat mean(g xhat)),
        #                                                                     g = grad weight
        return dx, gx.flatten(0, -2).sum(0), None


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.device.type == "cpu" and torch.is_grad_enabled():  # sampling skips the autograd function's overhead
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # a fused kernel on GPUs


def rope_tables(head_dim, length, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (hd/2,)
    angles = torch.outer(torch.arange(length).float(), inv_freq)  # (L, hd/2)
    return angles.cos(), angles.sin()


class RoPE(torch.autograd.Function):
    """Rotary embedding: rotates the pairs (first half, second half) of x (B, nh, T, hd) by the angles
    whose cos/sin (T, hd/2) or (B, 1, T, hd/2) are given. Written into one output with fused multiply-adds
    and no graph of its own: its backward is the opposite rotation, so nothing but cos/sin is saved."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return RoPE.rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return RoPE.rotate(grad, cos, -sin).to(ctx.dtype), None, None

    @staticmethod
    def rotate(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype))  # bf16 q/k leave in float32,
        #                                                                            as x * cos would
        o1, o2 = out.chunk(2, dim=-1)
        torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
        torch.mul(x1, sin, out=o2).addcmul_(x2, cos)  # x1 sin + x2 cos
        return out


class KVCache:
    """Static cache: one (B, n_kv_head, max_len, head_dim) tensor per layer for keys and one for values,
    written in place at [length, length + T). All rows advance together (prompts are left-padded),
    so one integer position serves the whole batch and nothing is ever copied or concatenated."""

    def __init__(self, cfg: GPTConfig, batch, max_len, device, dtype):
        hd = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions written so far


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.hd = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        rope = RoPE.apply if torch.is_grad_enabled() else RoPE.rotate  # sampling skips the autograd function's overhead
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            start = cache.length
            cache.k[self.layer_idx, :, :, start:start + T] = k
            cache.v[self.layer_idx, :, :, start:start + T] = v
            k = cache.k[self.layer_idx, :, :, :start + T]  # (B, nkv, L, hd)
            v = cache.v[self.layer_idx, :, :, :start + T]
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):  # bf16 autocast (train.dtype): torch's CPU
            with torch.autocast("cpu", enabled=False):  # attention backward is 2x slower in bf16 than in float32
                y = self.attend(q.float(), k.float(), v.float(), mask)
        else:
            y = self.attend(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.o_proj(y)

    def attend(self, q, k, v, mask):
        gqa = self.n_kv_head != self.n_head
        if mask is None:  # plain causal attention over the whole sequence: the fused fast path
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    """Module names follow Hugging Face's Llama so weights can be compared with a reference."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # one learned vector per patch of the image: RoPE alone only knows the flattened order, this tells an
        # image token which row and column it draws. Index 0 (text tokens) is a fixed zero row, so a text token
        # adds nothing and no mask is needed
        self.patch_embed = nn.Embedding(cfg.n_image_tokens + 1, cfg.n_embd, padding_idx=0) if cfg.patch_emb else None
        # one learned vector per tag (row 0, untagged, fixed at zero): tokens the caller gives one tag share it.
        # With data.Tagger's layout regions, a plan object's words and the image tokens that draw it share a
        # vector, so an image token finds its object's colour and shape by matching a vector it already holds
        self.tag_embed = nn.Embedding(cfg.n_tags, cfg.n_embd, padding_idx=0) if cfg.n_tags else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        if cfg.interleaved:  # built only when asked, so a default GPT draws the same initial weights as ever
            self.image_features = ImageFeatures(cfg.n_embd, math.isqrt(cfg.n_image_tokens))
            self.resampler = Resampler(cfg.n_embd, cfg.n_head, cfg.ctx_tokens) if cfg.ctx_tokens else None
            self.syncs = nn.ModuleDict({str(i): Synchronizer(cfg.n_embd, cfg.n_head, cfg.max_images)
                                        for i in range(cfg.n_layer) if cfg.sync_every and (i + 1) % cfg.sync_every == 0})
        self.norm = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # residual projections scaled down with depth (GPT-2)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])  # padding_idx keeps it there: it gets no gradient

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, patch=None, tags=None, pos=None, key_valid=None, cache=None, context=None, embeds=None):
        """
        idx:       (B, T) token ids.
        patch:     (B, T) 1 + the index of each image token's patch in its image (1 .. n_image_tokens), 0 for
                   every other token (data.patch_positions); None = all 0.
        tags:      (B, T) tag of each token in [0, n_tags), 0 = untagged; None = all 0.
        pos:       (B, T) RoPE positions; default 0..T-1 after what the cache holds.
        key_valid: (B, L) False for left-padding keys, L = cache length after this call (or T without cache).
        cache:     a KVCache to read and extend, or None.
        context:   an ImageContext for a sequence of several images (an interleaved model), or None.
        embeds:    (B, T, n_embd) input vectors used instead of embed_tokens(idx), e.g. a soft token's mixture
                   of the codebook's embeddings (textcraftor.py); patch and tag vectors are still added.
        Returns logits (B, T, vocab_size).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        longest = start + T if pos is None else int(pos.max()) + 1  # explicit positions: left padding takes none
        assert longest <= self.cfg.block_size, f"sequence of {longest} > block_size {self.cfg.block_size}"
        x = self.embed_tokens(idx) if embeds is None else embeds  # (B, T, C)
        if self.patch_embed is not None and patch is not None:
            x = x + self.patch_embed(patch)
        if self.tag_embed is not None and tags is not None:
            x = x + self.tag_embed(tags)
        if pos is None:  # the same positions in every row: one (T, hd/2) table broadcasts over the batch
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        else:
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)  # (B, 1, T, hd/2)
        feats = None
        if context is not None and self.cfg.interleaved and context.codes.shape[1]:
            I = context.codes.shape[1]
            feats = self.image_features(self.embed_tokens(context.codes.flatten(0, 1) + self.cfg.image_offset))
            feats = feats.view(B, I, -1, feats.shape[-1])  # (B, I, P, C) each image's feature pyramid
            if self.resampler is not None:  # resampler tokens replace the placeholders at their slots
                ctx = self.resampler(feats.flatten(0, 1)).view(B, -1, x.shape[-1])  # (B, I * ctx_tokens, C)
                at = (context.slot - 1).clamp(min=0).unsqueeze(-1).expand_as(x)
                x = torch.where(context.slot.unsqueeze(-1) > 0, ctx.gather(1, at), x)
        mask = None
        if cache is not None or key_valid is not None or context is not None:
            # explicit mask: key j is visible to query i (absolute index start+i) if j <= start+i and j is valid
            L = start + T
            q_abs = torch.arange(start, L, device=idx.device).unsqueeze(1)  # (T, 1)
            mask = torch.arange(L, device=idx.device).unsqueeze(0) <= q_abs  # (T, L)
            mask = mask.unsqueeze(0).unsqueeze(0)  # (1, 1, T, L)
            if context is not None:  # a key hidden after its step closed
                mask = mask & (q_abs <= context.until[:, None, None, :L])  # (B, 1, T, L)
            if key_valid is not None:
                # a padding query still sees itself, so its softmax has a finite entry and no NaN leaks
                # into the values that later (valid) queries mask out anyway
                own = torch.arange(L, device=idx.device).unsqueeze(0) == q_abs  # (T, L)
                mask = (mask & key_valid[:, None, None, :L]) | own  # (B, 1, T, L)
        if feats is not None and self.syncs:
            visible, rel = image_visibility(torch.arange(start, start + T, device=idx.device).expand(B, T),
                                            context.closed)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache)
            if feats is not None and str(i) in self.syncs:
                x = x + self.syncs[str(i)](x, feats, visible, rel)
        if cache is not None:
            cache.length += T
        return self.lm_head(self.norm(x))  # (B, T, vocab)


def token_ce(logits, targets):
    """Cross-entropy of every position, in float32: logits (B, T, V), targets (B, T) -> (B, T). The callers
    weight it by their own masks (a target weight of 0 leaves a position out)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


def cosine_lr(step, peak, warmup, total, floor):
    """The learning rate of every stage: linear warm-up to `peak` over `warmup` steps, then a cosine decay to
    `floor` at step `total` (floor = peak: constant after the warm-up)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (1 + math.cos(math.pi * t)) * (peak - floor)


def cpu_has_bf16():
    """Native bf16 dot products (AVX512-BF16 or AMX): there bf16 matmuls take about half float32's time;
    on other CPUs they are emulated and slower. (torch.cpu's checks are private: absent ones count as no.)"""
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def use_bf16(dtype: str, device: str):
    """bf16 autocast for a run's train.dtype: bfloat16 on a bf16 GPU or any CPU; auto only where it is fast (a bf16
    GPU, a CPU with native bf16 dot products); float32 otherwise."""
    kind = device.split(":")[0]
    has = kind == "cpu" or kind == "cuda" and torch.cuda.is_bf16_supported()
    fast = kind == "cpu" and cpu_has_bf16() or kind == "cuda" and has
    return dtype == "bfloat16" and has or dtype == "auto" and fast


# -----------------------------------------------------------------------------
# LoRA: low-rank adapters on chosen Linear layers, several named ones at once


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus named low-rank adapters: y = base(x) + sum_a (alpha_a/r_a) * B_a A_a dropout(x).
    A starts kaiming-uniform (a=sqrt(5), like nn.Linear) and B at zero, so a new adapter changes nothing
    until it is trained. merge() folds the adapters into the base weight for inference and unmerge() takes
    them out again, both only when called: .eval() and .train() never merge."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)  # frozen explicitly: only adapters train
        self.lora_A = nn.ParameterDict()  # name -> (r, in_features)
        self.lora_B = nn.ParameterDict()  # name -> (out_features, r)
        self.scaling = {}  # name -> alpha / r
        self.dropout = nn.ModuleDict()  # name -> dropout on that adapter's input only
        self.merged = set()  # adapters folded into base.weight: skipped in forward
        self.gate = None  # optional module x (..., in) -> (..., n) weights over the unmerged adapters, in order

    def add(self, name, r, alpha, dropout=0.0):
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        if self.merged:
            raise RuntimeError("adapters are merged into the weights: unmerge_lora(model) before adding one")
        A = torch.empty(r, self.base.in_features, device=self.base.weight.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.base.out_features, r, device=self.base.weight.device))
        self.scaling[name] = alpha / r
        self.dropout[name] = nn.Dropout(dropout)

    def delta(self, name):
        """The adapter as a weight update (out_features, in_features)."""
        return self.scaling[name] * self.lora_B[name] @ self.lora_A[name]

    def forward(self, x):
        y = self.base(x)
        active = [name for name in self.lora_A if name not in self.merged]
        g = self.gate(x) if self.gate is not None and active else None  # (..., len(active)) mixture weights
        for i, name in enumerate(active):
            h = self.dropout[name](x) @ self.lora_A[name].t()  # (..., r)
            d = self.scaling[name] * (h @ self.lora_B[name].t())  # (..., out)
            if g is not None:
                d = d * g[..., i:i + 1]
            y = y + d
        return y

    @torch.no_grad()
    def merge(self):
        for name in self.lora_A:
            if name not in self.merged:
                self.base.weight += self.delta(name).to(self.base.weight.dtype)
                self.merged.add(name)

    @torch.no_grad()
    def unmerge(self):
        for name in self.merged:
            self.base.weight -= self.delta(name).to(self.base.weight.dtype)
        self.merged = set()


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_lora(model, name, targets, r=8, alpha=16.0, dropout=0.0):
    """Add adapter `name` to every Linear whose attribute name is in `targets` (e.g. ("q_proj", "v_proj")),
    wrapping it in a LoRALinear the first time. Freezes every parameter that is not an adapter's. Returns
    the new adapter's parameters."""
    hits = 0
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if attr in targets and isinstance(child, (nn.Linear, LoRALinear)):
                if isinstance(child, nn.Linear):
                    child = LoRALinear(child)
                    setattr(parent, attr, child)
                child.add(name, r, alpha, dropout)
                hits += 1
    if not hits:
        raise ValueError(f"no Linear layer named any of {list(targets)} in the model")
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_" in pname and pname.endswith("." + name))
    return [p for pname, p in model.named_parameters() if p.requires_grad]


def merge_lora(model):
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model):
    for _, layer in lora_layers(model):
        layer.unmerge()


def lora_state_dict(model, name):
    """Only adapter `name`'s tensors, keyed by module path: what an adapter file holds."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k and k.endswith("." + name)}


def load_lora(model, name, tensors, targets, r, alpha):
    """Add adapter `name` (same targets, r and alpha as when it was saved) and load its tensors."""
    add_lora(model, name, targets, r, alpha)
    expected = set(lora_state_dict(model, name))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise ValueError(f"adapter {name!r} does not fit this model: missing {missing}, unexpected {extra}")
    model.load_state_dict(tensors, strict=False)


if __name__ == "__main__":
    vq = VQ(VQConfig())
    x = torch.rand(2, 3, 32, 32)
    recon, losses, codes = vq(x)
    print("VQ", tuple(recon.shape), tuple(codes.shape), {k: round(v.item(), 4) for k, v in losses.items()})
    gpt = GPT(GPTConfig())
    print(f"GPT {gpt.num_params() / 1e6:.2f}M parameters, logits",
          tuple(gpt(torch.zeros(2, 10, dtype=torch.long)).shape))
