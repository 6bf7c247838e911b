"""
VQAScore (Lin et al. 2024): P(yes | image, "does this show {prompt}?") from a small, generic vision-language
model, trained on (image, prompt, yes/no) pairs. The default post-training reward (rewards.py).

    python train.py tiny_configs/shapes_cpu.toml --stages=rewards   # trains it beside the other heads
    python rewards.py out/shapes_cpu                                 # its ranking against the exact verifier

The image side is the run's frozen VQ encoder: one unit vector per 4x4 patch (B, 64, 16), the features the
codes are picked from, projected up and given a learned row and column embedding. (A pixel transformer
trained from scratch for 120 s never learned which colour goes with which shape: AUC 0.55.) The text side
embeds the prompt's word ids with a position each. As BLIP's image-text matching encoder, [cls, text tokens]
attend to themselves and then to the image tokens in each layer; the cls output is the yes/no logit. (One
joint transformer over [cls, text, 64 image tokens] cost 2-3x the time a step.) Nothing in the model knows
the world: no cells, attributes, relations or counts (this file imports no world rules); it learns them from
its pairs, which heads.vqascore_pairs draws from the whole world with hard negatives. The VQ encoder is
continuous, so the reward passes gradients to the pixels.

Training adds to the pairs' cross-entropy a ranking loss over pairs that share a prompt: on held-out dev
prompts, the true scene above a failing edit 0.67 of the time without it, 0.82 with it (1,500 steps).
"""

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import PAD
from model import VQ, cosine_lr


class VQAScore(nn.Module):
    """images (B, 3, H, W) in [0, 1], prompt ids (B, L) padded with PAD -> logit of P(yes) (B,)."""

    def __init__(self, dim, layers, vocab_size, max_text, vq_cfg):
        super().__init__()
        self.encoder = VQ(vq_cfg).encoder.requires_grad_(False)  # a copy of the run's VQ encoder, frozen
        g = vq_cfg.grid
        self.image_in = nn.Linear(vq_cfg.code_dim, dim)
        self.row, self.col = nn.Parameter(torch.zeros(1, g, 1, dim)), nn.Parameter(torch.zeros(1, 1, g, dim))
        self.tok, self.text_pos = nn.Embedding(vocab_size, dim), nn.Parameter(torch.zeros(1, max_text, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        # BLIP's image-text matching encoder: the text (with cls) attends to itself, then to the image tokens
        layer = nn.TransformerDecoderLayer(dim, nhead=4, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerDecoder(layer, layers)
        self.image_norm, self.norm, self.out = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.Linear(dim, 1)
        for p in (self.row, self.col, self.text_pos, self.cls):
            nn.init.normal_(p, std=0.02)

    def features(self, images):
        """(B, 3, H, W) -> (B, g*g, code_dim): the unit vectors the VQ picks its codes from, row by row."""
        return F.normalize(self.encoder(images * 2 - 1), dim=1).flatten(2).transpose(1, 2)

    def forward(self, images, ids):
        return self.score(self.features(images), ids)

    def score(self, feats, ids):
        """feats (B, N, code_dim) from features, ids (B, L) -> logits (B,). Training calls this on cached
        features: the encoder is frozen, so they never change."""
        B, L = ids.shape
        img = self.image_norm(self.image_in(feats) + (self.row + self.col).flatten(1, 2))  # (B, N, D)
        x = torch.cat([self.cls.expand(B, -1, -1), self.tok(ids) + self.text_pos[:, :L]], 1)  # (B, 1+L, D)
        pad = F.pad(ids == PAD, (1, 0))  # (B, 1+L), True = padding
        return self.out(self.norm(self.body(x, img, tgt_key_padding_mask=pad)[:, 0])).squeeze(-1)


def ranking_loss(logits, labels, prompt):
    """Logistic loss of every (yes, no) pair of the batch that shares a prompt: the image that fits must score
    above the one that does not. Only the image differs, so the prompt's prior cannot lower this loss."""
    same = (prompt[:, None] == prompt[None, :]) & (labels[:, None] > labels[None, :])  # (B, B): row yes, column no
    if not same.any():
        return logits.sum() * 0
    return F.softplus(logits[None, :] - logits[:, None])[same].mean()


def train(net, cfg, vq, pairs, seed, device, log=lambda **kv: None):
    """Train a VQAScore net (heads.Heads' own) on pairs = (images uint8 (N, H, W, 3), ids (P, L), labels (P,),
    image index per pair (P,), prompt index per pair (P,)): pairs share images (one render, several prompts),
    so each image's features are computed once. A batch is a run of pairs in order of prompt length, a
    prompt's pairs together: few pads, and the pairs ranking_loss compares.
    cfg: heads.RewardsConfig. Returns figures."""
    imgs, ids, labels, which, prompt = pairs
    t0 = time.time()
    net.encoder.load_state_dict(vq.encoder.state_dict())
    with torch.no_grad():
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
        feats = torch.cat([net.features(x[k:k + 512].float().div(255).to(device)) for k in range(0, len(x), 512)])
    g = torch.Generator().manual_seed(seed)
    y, prompt = torch.as_tensor(labels, dtype=torch.float32), torch.as_tensor(prompt)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.vqascore_lr, weight_decay=0.01)
    steps, B, n = cfg.vqascore_steps, cfg.batch, int(prompt.max()) + 1
    shuffled = torch.randperm(n, generator=g)[prompt]  # prompts of one length in a random order
    order = torch.sort((ids != PAD).sum(1) * n + shuffled, stable=True).indices
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.vqascore_lr, steps // 20, steps, 0.1 * cfg.vqascore_lr)
        i = order[int(torch.randint(0, len(which) - B + 1, (1,), generator=g)):][:B]
        t = ids[i][:, :int((ids[i] != PAD).sum(1).max())]  # (B, L): the batch's longest prompt, no more padding
        z = net.score(feats[which[i]], t.to(device))  # (B,)
        loss = F.binary_cross_entropy_with_logits(z, y[i].to(device)) + ranking_loss(z, y[i].to(device),
                                                                                      prompt[i].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(head="vqascore", step=step, loss=round(loss.item(), 5))
    return {"vqascore_train_loss": round(loss.item(), 5), "vqascore_seconds": round(time.time() - t0, 1),
            "vqascore_pairs": len(which), "vqascore_yes": round(float(np.mean(labels)), 3)}
