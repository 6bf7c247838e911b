"""
MM-Interleaved's pieces for sequences of several images (arXiv 2401.10208), as tensors: the GPT (model.py) builds
them when its config asks, and knows when an image closes; this file knows nothing of the world or the tokens.

- ImageFeatures: an image's codes, embedded, become a small multi-scale feature pyramid (8x8, 4x4, 2x2 at the
  default grid), each level average-pooled from the one above and projected: the "encoder features" of the image.
- Resampler: a fixed number of learned queries cross-attend to those features: an image that has closed enters
  the rest of the sequence as that many context tokens only (the paper's few visual tokens), so detail is lost.
- Synchronizer (MMFS): every few layers, each position cross-attends to the feature pyramids of the images that
  closed BEFORE it (never the image it is in, never a later one), with a learned relative-image embedding (1 = the
  latest image), a learned attend-to-nothing slot (a position with no earlier image attends to it alone), and its
  output times tanh(gate) with the gate at zero, so a new synchronizer changes nothing until it is trained.
  Dense attention over the whole pyramid, not the paper's deformable sampling points: a pyramid is 84 vectors
  at the default grid, so attending to all of them costs about what the self-attention over 400 positions does,
  and there are no sampling offsets to learn or interpolate (docs/interleaved.md measures the cost).

    python mmfs.py      # shapes check
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rms(x, weight):
    return F.rms_norm(x, (x.shape[-1],), weight, 1e-6)


class ImageFeatures(nn.Module):
    """Embedded codes (N, g*g, C) -> the pyramid (N, P, C), P = g^2 + (g/2)^2 + ... + 2^2: the code embeddings plus
    a learned position, average-pooled 2x2 level by level, each level through its own projection and tagged with a
    learned scale vector. No convolutions: the codes of this world's VQ are already local features, and sampling
    recomputes the pyramid of every closed image at every step, so it has to be cheap."""

    def __init__(self, n_embd, grid):
        super().__init__()
        self.grid = grid
        self.pos = nn.Parameter(torch.zeros(grid * grid, n_embd))  # where each code lies in its image
        n_levels = 1
        while grid >> n_levels >= 2:
            n_levels += 1
        self.proj = nn.ModuleList(nn.Linear(n_embd, n_embd, bias=False) for _ in range(n_levels))
        self.scale = nn.Parameter(torch.zeros(n_levels, n_embd))

    def forward(self, emb):
        N, n, C = emb.shape
        m = (emb + self.pos).transpose(1, 2).reshape(N, C, self.grid, self.grid)  # (N, C, g, g)
        out = []
        for i, proj in enumerate(self.proj):
            if i:
                m = F.avg_pool2d(m, 2)  # (N, C, g / 2^i, g / 2^i)
            out.append(proj(m.flatten(2).transpose(1, 2)) + self.scale[i])  # (N, (g / 2^i)^2, C)
        return torch.cat(out, 1)  # (N, P, C)


class CrossAttention(nn.Module):
    """Queries (.., Tq, C) attend to keys/values made from (.., Tk, C); no biases, RMS-normed inputs."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.h, self.hd = n_head, n_embd // n_head
        self.norm_q = nn.Parameter(torch.ones(n_embd))
        self.norm_kv = nn.Parameter(torch.ones(n_embd))
        self.q = nn.Linear(n_embd, n_embd, bias=False)
        self.k = nn.Linear(n_embd, n_embd, bias=False)
        self.v = nn.Linear(n_embd, n_embd, bias=False)
        self.o = nn.Linear(n_embd, n_embd, bias=False)

    def heads(self, x):  # (B, T, C) -> (B, h, T, hd)
        return x.view(*x.shape[:-1], self.h, self.hd).transpose(-3, -2)


class Resampler(nn.Module):
    """An image's pyramid (N, P, C) -> (N, n_queries, C): learned queries, one cross-attention and an MLP."""

    def __init__(self, n_embd, n_head, n_queries):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, n_embd) * 0.02)
        self.attn = CrossAttention(n_embd, n_head)
        self.norm_mlp = nn.Parameter(torch.ones(n_embd))
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=False), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=False))

    def forward(self, feats):
        a = self.attn
        N = feats.shape[0]
        q = a.heads(a.q(rms(self.queries, a.norm_q))).expand(N, -1, -1, -1)  # (N, h, k, hd)
        kv = rms(feats, a.norm_kv)
        y = F.scaled_dot_product_attention(q, a.heads(a.k(kv)), a.heads(a.v(kv)))  # (N, h, k, hd)
        x = self.queries + a.o(y.transpose(1, 2).flatten(2))  # (N, k, C)
        return x + self.mlp(rms(x, self.norm_mlp))


class Synchronizer(nn.Module):
    """MMFS: x (B, T, C) attends to feats (B, I, P, C), the pyramids of the sequence's images in the order they
    closed. visible (B, T, I): image i closed before position t; rel (B, T, I): how many images back image i
    is from t (1 = the latest), 0 where it is not visible. Returns the update to add to x."""

    def __init__(self, n_embd, n_head, max_images):
        super().__init__()
        self.attn = CrossAttention(n_embd, n_head)
        self.rel = nn.Embedding(max_images + 1, n_embd)  # added to an image's features: k(f + e) = k(f) + k(e)
        self.null = nn.Parameter(torch.randn(1, n_embd) * 0.02)  # the attend-to-nothing slot's feature
        self.gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: the synchronizer starts switched off

    def forward(self, x, feats, visible, rel):
        a = self.attn
        B, T, C = x.shape
        I, P = feats.shape[1], feats.shape[2]
        scale = 1 / math.sqrt(a.hd)
        q = a.heads(a.q(rms(x, a.norm_q)))  # (B, h, T, hd)
        kv = rms(feats, a.norm_kv).flatten(1, 2)  # (B, I*P, C)
        k, v = a.heads(a.k(kv)), a.heads(a.v(kv))  # (B, h, I*P, hd)
        nk, nv = a.heads(a.k(self.null)), a.heads(a.v(self.null))  # (h, 1, hd)
        rk, rv = a.heads(a.k(self.rel.weight)), a.heads(a.v(self.rel.weight))  # (h, R, hd)
        s = (q @ k.transpose(-1, -2)).view(B, a.h, T, I, P)  # (B, h, T, I, P)
        s_rel = torch.einsum("bhtd,hrd->bhtr", q, rk)  # (B, h, T, R): each query against each relative index
        s = s + s_rel.gather(-1, rel.unsqueeze(1).expand(B, a.h, T, I)).unsqueeze(-1)
        s = s.masked_fill(~visible[:, None, :, :, None], float("-inf")).flatten(3)  # causal over images
        s = torch.cat([q @ nk.transpose(-1, -2), s], -1) * scale  # (B, h, T, 1 + I*P): the null slot first
        w = s.float().softmax(-1).to(q.dtype)
        y = w[..., :1] * nv + w[..., 1:] @ v  # (B, h, T, hd)
        mass = w[..., 1:].view(B, a.h, T, I, P).sum(-1)  # (B, h, T, I) attention each image received
        onehot = F.one_hot(rel, self.rel.num_embeddings).to(q.dtype)  # (B, T, I, R)
        y = y + torch.einsum("bhti,btir,hrd->bhtd", mass, onehot, rv)  # the relative embedding's values
        return torch.tanh(self.gate) * a.o(y.transpose(1, 2).reshape(B, T, C))


def image_visibility(q_col, closed):
    """q_col (B, T) columns of the queries, closed (B, I) the column of each image's <eoi> (a huge number for an
    image not yet closed) -> (visible (B, T, I): image i closed strictly before the query; rel (B, T, I): 1 for the
    latest visible image, 2 for the one before, ..., 0 where not visible). Images close in order."""
    visible = q_col.unsqueeze(2) > closed.unsqueeze(1)  # (B, T, I)
    n = visible.sum(-1, keepdim=True)  # (B, T, 1) images closed before each query
    rel = (n - torch.arange(closed.shape[1], device=closed.device)).clamp(min=0) * visible
    return visible, rel


if __name__ == "__main__":
    f = ImageFeatures(32, 8)
    feats = f(torch.randn(6, 64, 32)).view(2, 3, -1, 32)
    print("pyramid", tuple(feats.shape), "resampled", tuple(Resampler(32, 4, 2)(feats.flatten(0, 1)).shape))
    vis, rel = image_visibility(torch.arange(10).expand(2, 10), torch.tensor([[2, 5, 10**9], [3, 10**9, 10**9]]))
    print("sync", tuple(Synchronizer(32, 4, 4)(torch.randn(2, 10, 32), feats, vis, rel).shape))
