"""
The lightweight learned reward heads and how they are trained: small networks that stand in for the
papers' reward models (VQAScore, CLIPScore, an aesthetic predictor, a quality model, a shape-geometry
model), trained on rendered shapes-world scenes, their VQ round trips and edited or degraded copies;
never on the model's own samples. rewards.py turns them into rewards.

    python train.py tiny_configs/shapes_cpu.toml --stages=rewards   # train the heads (minutes on a CPU)

vqascore, the default reward, is a generic vision-language model (vqascore.py) trained here on pairs from
the whole world with hard negatives (vqascore_pairs). The image encoders of structured and clip are also
trained to name each layout cell's shape, colour and size (a probe on their cell tokens, as the exact parser
reads them): free, dense labels that make the tokens meaningful fast; structured reads the cells through
that probe. The heads pass gradients to the input pixels;
their weights are frozen (requires_grad False), so only the images get gradients.
"""

import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import edits
import parser
import vqascore
import world
from data import PAD
from generate import RunError, load_weights, read_tensors, vq_round_trip
from model import VQConfig, cosine_lr

HEADS_FILE = "rewards.safetensors"  # every trained head, one file, architecture config in its metadata

# -----------------------------------------------------------------------------
# the heads


@dataclass
class RewardsConfig:
    dim: int = 64  # width of every head's encoders
    layers: int = 2  # transformer layers of the structured prompt reader and of the clip text tower
    max_text: int = 96  # longest prompt or caption in tokens (the world's longest prompts are ~70)
    batch: int = 64  # training batch of every head
    lr: float = 2e-3  # AdamW, cosine to a tenth
    examples: int = 6000  # rendered training examples of each data set (clip and the structured probe share one)
    p_vq: float = 0.5  # share of training images shown after a round trip through the run's VQ, as samples are drawn
    structured_probe_steps: int = 300  # the structured image encoder learning to read cells as the parser does
    structured_steps: int = 2000  # the structured prompt reader: with far fewer it reads sizes at chance
    structured_prompts: int = 20000  # prompts with their Specs for the structured prompt reader (text only: cheap)
    vqascore_dim: int = 64  # width of the vqascore model
    vqascore_layers: int = 2  # its text-to-image transformer layers
    vqascore_examples: int = 6000  # world examples it trains on, each as 1 + vqascore_edits images and 2 + edits pairs
    vqascore_edits: int = 2  # hard negatives per example: the same prompt on an edited scene (edits.perturb); in a
    #                          folder run, word-swapped captions per image
    vqascore_steps: int = 1500  # AdamW steps of rewards.batch pairs
    vqascore_lr: float = 2e-3  # peak, after a warm-up over a twentieth of the steps, cosine to a tenth
    clip_steps: int = 300  # the clip dual encoder, contrastive with hard-negative captions
    aesthetic_steps: int = 300  # the aesthetic MLP on clip's image embedding
    quality_steps: int = 150  # the clean-vs-degraded classifier
    geometry_steps: int = 600  # from clip's image encoder
    geometry_lr: float = 4e-3  # after a warm-up over a tenth of its steps; at rewards.lr it ends far less settled
    calib_examples: int = 600  # held-out (dev split) renders for the calibration table; a folder run: held-out images
    calib_samples: int = 512  # the model's own samples of dev prompts for the calibration table, rewards.K per prompt


def config_rules(rc):
    """[rewards] values that type-check but cannot work: (holds, message) pairs, checked before any work."""
    return [
        (rc.dim % 4 == 0 and min(rc.dim, rc.layers, rc.batch) >= 2 and rc.examples >= rc.batch,
         "rewards.dim must be a multiple of 4 (attention heads), rewards.layers and rewards.batch >= 2, "
         "rewards.examples >= rewards.batch"),
        (min(rc.calib_examples, rc.calib_samples) >= 2,
         "rewards.calib_examples and rewards.calib_samples must be >= 2"),
        (0 <= rc.p_vq <= 1, "rewards.p_vq must lie in [0, 1]"),
    ]


def _transformer(dim, layers):
    layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class ImageEncoder(nn.Module):
    """(B, 3, S, S) in [0, 1] -> (B, 25, D): one feature per cell of the 3x3 layout and per margin piece
    around it, with a learned position each. Patchify by one lattice unit (S/8 pixels, as the VQ does: an
    object covers the same patches wherever it is), two 3x3 convs so a unit sees its neighbours, then
    2x2 units into one token, offset by the one-unit margin so that the middle 3x3 tokens are the cells.
    Few tokens keep the transformers cheap on a CPU; convs at full resolution cost ten times more."""

    def __init__(self, dim, image_size):
        super().__init__()
        unit = image_size // world.LATTICE
        self.units = nn.Sequential(
            nn.Conv2d(3, dim, unit, stride=unit), nn.GELU(),
            nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(),
            nn.Conv2d(dim, dim, 3, padding=1), nn.GELU())
        self.cells = nn.Conv2d(dim, dim, 2, stride=2)
        self.pos = nn.Parameter(torch.zeros(1, (world.LATTICE // 2 + 1) ** 2, dim))
        # training only: reads each cell's shape, colour and size (or empty) off its token. This dense,
        # free supervision makes the tokens mean something within a few hundred steps; without it the
        # structured head learned far slower from its one bit per pair
        self.probe = nn.Linear(dim, len(world.SHAPES) + len(world.COLOURS) + len(world.SIZES) + 3)

    def forward(self, x):
        f = self.units(x * 2 - 1)  # (B, D, 8, 8): one feature per lattice unit
        f = self.cells(F.pad(f, (1, 1, 1, 1)))  # (B, D, 5, 5): the 3x3 cells ringed by the margin
        return f.flatten(2).transpose(1, 2) + self.pos  # (B, 25, D)

    def cell_logits(self, tokens):
        """tokens (B, 25, D) -> the probe's logits per cell and attribute: (shape, colour, size), each (B, 9, k + 1)."""
        return self.probe(tokens[:, CELL_TOKENS]).split(CELL_ATTRS, -1)  # (B, 9, 14) in three parts

    def cell_probs(self, tokens):
        """tokens (B, 25, D) -> (B, 9, 14): per cell, the probabilities of its shape, colour and size (or empty)."""
        return torch.cat([p.softmax(-1) for p in self.cell_logits(tokens)], -1)

    def cell_loss(self, tokens, targets):
        """tokens (B, 25, D); targets (B, 9, 3) from cell_targets -> cross-entropy of the probe."""
        return sum(F.cross_entropy(p.flatten(0, 1), targets[..., k].flatten())
                   for k, p in enumerate(self.cell_logits(tokens)))


CELL_TOKENS = [6, 7, 8, 11, 12, 13, 16, 17, 18]  # the 3x3 cells inside the 5x5 tokens
CELL_ATTRS = (len(world.SHAPES) + 1, len(world.COLOURS) + 1, len(world.SIZES) + 1)  # each attribute or "empty"


def cell_targets(scenes):
    """(N, 9, 3) long: per cell, the index of its object's shape, colour and size, plus one; 0 = empty."""
    t = np.zeros((len(scenes), 9, 3), np.int64)
    for n, s in enumerate(scenes):
        for o in s.objects:
            t[n, 3 * o.row + o.col] = (world.SHAPES.index(o.shape) + 1, tuple(world.COLOURS).index(o.colour) + 1,
                                       world.SIZES.index(o.size) + 1)
    return torch.from_numpy(t)


class TextEmbed(nn.Module):
    """Token ids (B, L), padded with PAD -> (B, L, D)."""

    def __init__(self, vocab_size, dim, max_text):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_text, dim))

    def forward(self, ids):
        return self.tok(ids) + self.pos[:, :ids.shape[1]]


SLOT_ATTRS = (len(world.SHAPES) + 1, len(world.COLOURS) + 1, len(world.SIZES) + 1, 4, 4,
              world.MAX_OBJECTS + 1)  # 0 = any / unused
RELATE = torch.tensor([[[world.holds(world.Obj("circle", "red", "small", k // 3, k % 3),
                                     rel, world.Obj("circle", "red", "small", l // 3, l % 3))
                         for l in range(9)] for k in range(9)]
                       for rel in world.RELATIONS]).float()  # (4, 9, 9): rel holds from cell k to l


class StructuredHead(nn.Module):
    """P(yes | image, prompt) as a neuro-symbolic VQA model (NS-VQA, Yi et al. 2018): two learned readers
    and a fixed soft executor. The image encoder's probe reads each of the 9 cells as probabilities of a
    shape, colour and size (or empty). A text transformer reads the prompt into up to MAX_OBJECTS object
    slots, in order of mention (each: shape, colour, size, row, column, each possibly "any", and how many;
    0 = slot unused), the scene's total and the relations between slots. The executor then computes the
    probability that the cells satisfy the program, differentiably: per slot the probability that each
    cell matches, the count of matches as a Poisson-binomial, relations over the cells where each slot's
    single match may be. Both readers learn from dense labels, not from the one bit of a pair's label.
    A structured, near-oracle reward: its executor's rules (RELATE from world.holds, exact counts, the
    program's slots) are the verifier's own, so it agrees with the verifier almost exactly."""

    def __init__(self, cfg, vocab_size, image_size):
        super().__init__()
        self.image, self.text = ImageEncoder(cfg.dim, image_size), TextEmbed(vocab_size, cfg.dim, cfg.max_text)
        self.queries = nn.Parameter(0.02 * torch.randn(1, world.MAX_OBJECTS + 1, cfg.dim))  # the slots, then the scene
        self.reader, self.norm = _transformer(cfg.dim, cfg.layers), nn.LayerNorm(cfg.dim)
        self.slot_out = nn.Linear(cfg.dim, sum(SLOT_ATTRS))
        n_rel = world.MAX_OBJECTS ** 2 * len(world.RELATIONS)
        self.scene_out = nn.Linear(cfg.dim, world.MAX_OBJECTS + 1 + n_rel)  # the total, then each (i, j, rel) yes/no
        self.register_buffer("relate", RELATE, persistent=False)

    def forward(self, images, ids):
        """images (B, 3, H, W), ids (B, L) -> logit of P(yes) (B,)."""
        # squeezed into [1e-6, 1 - 1e-6] for a finite logit; not clamped, which would zero the pixels' gradient
        # exactly where the head is surest
        p = 1e-6 + (1 - 2e-6) * self.execute(self.image.cell_probs(self.image(images)), *self.read(ids))
        return p.log() - (1 - p).log()

    def read(self, ids):
        """ids (B, L) -> slot logits (B, S, 4+7+3+4+4+5), total logits (B, 5), relation logits (B, S, S, 4)."""
        B, S = len(ids), world.MAX_OBJECTS
        x = torch.cat([self.queries.expand(B, -1, -1), self.text(ids)], 1)  # (B, S + 1 + L, D)
        pad = torch.cat([torch.zeros(B, S + 1, dtype=torch.bool, device=ids.device), ids == PAD], 1)
        h = self.norm(self.reader(x, src_key_padding_mask=pad))
        scene = self.scene_out(h[:, S])
        return self.slot_out(h[:, :S]), scene[:, :S + 1], scene[:, S + 1:].view(B, S, S, len(world.RELATIONS))

    def execute(self, cells, slots, total, relations):
        """cells (B, 9, 14) from ImageEncoder.cell_probs; the outputs of read -> P(the program holds) (B,)."""
        shape, colour, size = cells.split(CELL_ATTRS, -1)  # (B, 9, k + 1), index 0 = empty
        occupied = 1 - shape[..., 0]  # (B, 9)
        given = lambda p: p[..., 1:] / p[..., 1:].sum(-1, keepdim=True).clamp_min(1e-6)  # attribute | occupied
        q = [p.softmax(-1) for p in slots.split(SLOT_ATTRS, -1)]  # (B, S, k + 1) each, index 0 = any
        where = torch.stack([torch.arange(9, device=cells.device) // 3,
                             torch.arange(9, device=cells.device) % 3])  # (2, 9)
        match = occupied[:, None]  # (B, S, 9): the probability that each cell holds an object the slot describes
        for k, p in enumerate((given(shape), given(colour), given(size))):
            match = match * (q[k][..., :1] + q[k][..., 1:] @ p.transpose(1, 2))
        for k in (0, 1):  # row, column
            match = match * (q[3 + k][..., :1] + q[3 + k][..., 1:][..., where[k]])
        count = q[5]  # (B, S, 5): slot unused, or how many objects it names
        ok = count[..., 0] + (count[..., 1:] * _counts(match)[..., 1:count.shape[-1]]).sum(-1)  # (B, S)
        ok_total = (total.softmax(-1) * _counts(occupied)[..., :total.shape[-1]]).sum(-1)  # (B,)
        # a relation needs exactly one match on each side: the probability that it is exactly at cell k
        alone = match * torch.exp(torch.log1p(-match.clamp(max=1 - 1e-6)).sum(-1, keepdim=True)
                                  - torch.log1p(-match.clamp(max=1 - 1e-6)))
        holds = torch.einsum("bik,rkl,bjl->bijr", alone, self.relate, alone)  # (B, S, S, 4)
        wanted = torch.sigmoid(relations)
        ok_rel = (1 - wanted * (1 - holds)).flatten(1).prod(-1)
        return ok.prod(-1) * ok_total * ok_rel


def _counts(p):
    """p (..., 9) independent probabilities -> (..., 10): the distribution of how many are true (Poisson-binomial)."""
    dist = F.one_hot(torch.zeros(p.shape[:-1], dtype=torch.long, device=p.device), 10).float()
    for k in range(p.shape[-1]):
        pk = p[..., k:k + 1]
        dist = dist * (1 - pk) + F.pad(dist[..., :-1], (1, 0)) * pk
    return dist


def program_targets(specs):
    """data.Specs -> what StructuredHead.read predicts: slots (B, S, 6) long (0 = any / unused), total (B,) long,
    relations (B, S, S, 4) float."""
    S = world.MAX_OBJECTS
    slots, rel = np.zeros((len(specs), S, 6), np.int64), np.zeros((len(specs), S, S, len(world.RELATIONS)), np.float32)
    index = lambda seq, v: 0 if v is None else seq.index(v) + 1
    for b, spec in enumerate(specs):
        for r, q in enumerate(spec.reqs):
            slots[b, r] = (index(world.SHAPES, q.shape), index(tuple(world.COLOURS), q.colour),
                           index(world.SIZES, q.size), 0 if q.row is None else q.row + 1,
                           0 if q.col is None else q.col + 1, q.count)
        for i, r, j in spec.relations:
            rel[b, i, j, world.RELATIONS.index(r)] = 1
    return torch.from_numpy(slots), torch.tensor([s.total for s in specs]), torch.from_numpy(rel)


class Tower(nn.Module):
    """The mean of a transformer's outputs over a sequence's real tokens: (B, T, D) -> (B, D). Pooling a
    [cls] token instead, the contrastive loss sat at chance for a random number of steps (captions differ
    by a word or two, so every [cls] started alike): caption above hard negative 0.63-0.83 over 3 seeds,
    0.89-0.91 with the mean."""

    def __init__(self, dim, layers):
        super().__init__()
        self.body, self.norm = _transformer(dim, layers), nn.LayerNorm(dim)

    def forward(self, x, pad=None):
        pad = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device) if pad is None else pad  # (B, T),
        #                                                                                            True = padding
        keep = (~pad).unsqueeze(-1).float()
        return self.norm((self.body(x, src_key_padding_mask=pad) * keep).sum(1) / keep.sum(1))


class CLIPHead(nn.Module):
    """Dual encoder: unit image and text embeddings whose cosine scores the match."""

    def __init__(self, cfg, vocab_size, image_size):
        super().__init__()
        self.image, self.image_tower = ImageEncoder(cfg.dim, image_size), Tower(cfg.dim, 1)
        self.text, self.text_tower = TextEmbed(vocab_size, cfg.dim, cfg.max_text), Tower(cfg.dim, cfg.layers)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # learned temperature of the contrastive loss

    def embed_images(self, images):
        return self.pool(self.image(images))

    def pool(self, tokens):
        return F.normalize(self.image_tower(tokens), dim=-1)  # (B, D)

    def embed_texts(self, ids):
        return F.normalize(self.text_tower(self.text(ids), ids == PAD), dim=-1)  # (B, D)


class ImageClassifier(nn.Module):
    """Logit of a per-image property: conv features, mean- and max-pooled (one bad object is a local max)."""

    def __init__(self, cfg, image_size):
        super().__init__()
        self.image, self.out = ImageEncoder(cfg.dim, image_size), nn.Linear(2 * cfg.dim, 1)

    def forward(self, images):
        f = self.image(images)  # (B, N, D)
        return self.out(torch.cat([f.mean(1), f.amax(1)], -1)).squeeze(-1)  # (B,)


NAMES = ("vqascore", "structured", "clip", "aesthetic", "quality", "geometry")  # every head, in Heads' order


class Heads(nn.Module):
    """The trained heads (`names`: all of NAMES, or some, as a folder run's vqascore and clip); the aesthetic
    MLP reads the clip image embedding, vqascore the run's VQ encoder (vq_cfg: its model.VQConfig)."""

    def __init__(self, cfg, vocab_size, vq_cfg, names=NAMES):
        super().__init__()
        self.cfg, self.vocab_size, self.vq_cfg, image_size = cfg, vocab_size, vq_cfg, vq_cfg.image_size
        self.names = tuple(n for n in NAMES if n in names)
        build = {"vqascore": lambda: vqascore.VQAScore(cfg.vqascore_dim, cfg.vqascore_layers, vocab_size,
                                                       cfg.max_text, vq_cfg),
                 "structured": lambda: StructuredHead(cfg, vocab_size, image_size),
                 "clip": lambda: CLIPHead(cfg, vocab_size, image_size),
                 "aesthetic": lambda: nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, 1)),
                 "quality": lambda: ImageClassifier(cfg, image_size),
                 "geometry": lambda: ImageClassifier(cfg, image_size)}
        for name in self.names:
            setattr(self, name, build[name]())

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in NAMES:  # a head this run did not train: say so, not a bare AttributeError
                raise RunError(f"this run trained only the {', '.join(self.names)} reward head(s), not {name}") from None
            raise


def padded_text_ids(tokenizer, prompts, max_text):
    """Strings -> (B, L) ids right-padded with PAD, L the longest. Unknown words and over-long texts raise."""
    ids = [data.encode_text(tokenizer, p) for p in prompts]
    long = [p for p, i in zip(prompts, ids) if len(i) > max_text]
    if long:
        raise ValueError(f"{len(long)} text(s) longer than rewards.max_text={max_text} tokens, e.g. {long[0]!r}")
    out = torch.full((len(ids), max(map(len, ids))), PAD, dtype=torch.long)
    for r, i in enumerate(ids):
        out[r, :len(i)] = torch.tensor(i)
    return out


# -----------------------------------------------------------------------------
# training data and training (called by train.py's rewards stage)


def vq_round_trip_some(vq, u8, mask):
    """uint8 images (N, H, W, 3); the ones where mask is True replaced by their VQ round trip."""
    out, idx = u8.copy(), np.nonzero(mask)[0]
    if len(idx):
        out[idx] = vq_round_trip(vq, u8[idx])[0]
    return out


def verified_pairs(n, rng, vq, split, p_vq):
    """n (image, example, label, scene drawn) for a prompt reward: the example's own scene (40%) or an edit of it,
    rendered, shown through the VQ a p_vq share of the time, and labelled by the exact verifier on the image
    shown."""
    exs = [world.sample_example(rng, split=split) for _ in range(n)]
    scenes = [e.scene if rng.random() < 0.4 else edits.perturb(e.scene, rng) for e in exs]
    imgs = vq_round_trip_some(vq, np.stack([world.render(s, vq.cfg.image_size) for s in scenes]), rng.random(n) < p_vq)
    labels = np.array([world.passes(s, e.spec) for s, e in zip(parser.parse_batch(imgs), exs)])
    return imgs, exs, labels, scenes


def vqascore_pairs(n, rng, vq, split, p_vq, n_edits=2):
    """vqascore's training pairs from n examples of the whole world: each example's own scene with its prompt,
    `n_edits` edited scenes (edits.perturb) with the same prompt, and the own scene with another example's
    prompt; every pair labelled by world.passes on the scene constructed. Images are shown through the VQ a
    p_vq share of the time. Returns (images uint8 (n * (1 + n_edits), H, W, 3), prompts, labels, image index
    per pair, prompt index (the example's) per pair), n * (2 + n_edits) pairs."""
    exs = [world.sample_example(rng, split=split) for _ in range(n)]
    scenes = [e.scene for e in exs] + [edits.perturb(e.scene, rng) for _ in range(n_edits) for e in exs]
    imgs = np.stack([world.render(s, vq.cfg.image_size) for s in scenes])
    imgs = vq_round_trip_some(vq, imgs, rng.random(len(imgs)) < p_vq)
    other = (np.arange(n) + rng.integers(1, n, n)) % n  # another example's prompt
    specs = [e.spec for e in exs] * (1 + n_edits) + [exs[j].spec for j in other]
    which = np.r_[np.arange(len(scenes)), np.arange(n)]
    labels = np.array([world.passes(scenes[i], sp) for i, sp in zip(which, specs)], dtype=np.float32)
    prompt = np.r_[np.tile(np.arange(n), 1 + n_edits), other]  # which example's prompt each pair asks
    return imgs, [exs[j].prompt for j in prompt], labels, which, prompt


def caption_pairs(n, rng, vq, split, p_vq):
    """n (image, scene, caption, hard-negative caption): the caption of an edit of the scene."""
    scenes = [world.sample_example(rng, split=split).scene for _ in range(n)]
    imgs = vq_round_trip_some(vq, np.stack([world.render(s, vq.cfg.image_size) for s in scenes]), rng.random(n) < p_vq)
    return (imgs, scenes, [world.caption_text(s, rng) for s in scenes],
            [world.caption_text(edits.perturb(s, rng), rng) for s in scenes])


def geometry_pairs(n, rng, vq, p_vq):
    """n clean renders of non-empty scenes, then n malformed renders of the same scenes; labels 1 then 0."""
    scenes = [world.random_scene(rng) for _ in range(n)]
    clean = np.stack([world.render(s, vq.cfg.image_size) for s in scenes])
    bad = np.stack([edits.render_malformed(s, rng, vq.cfg.image_size) for s in scenes])
    imgs = vq_round_trip_some(vq, np.concatenate([clean, bad]), rng.random(2 * n) < p_vq)
    return imgs, np.r_[np.ones(n), np.zeros(n)]


def quality_batch(clean_u8, vq, g, device):
    """Half clean, half degraded (each by one random corruption): (images, labels 1 = clean)."""
    x = data.to_float(clean_u8)
    half = len(x) // 2
    kinds = torch.randint(0, len(edits.CORRUPTIONS), (len(x) - half,), generator=g)
    bad = x[half:].clone()
    for k in kinds.unique().tolist():
        bad[kinds == k] = edits.corrupt(x[half:][kinds == k], edits.CORRUPTIONS[k], vq, g)
    return torch.cat([x[:half], bad]).to(device), torch.cat([torch.ones(half), torch.zeros(len(x) - half)]).to(device)


def _fit(name, params, loss_fn, steps, cfg, log, warmup=0):
    """AdamW with a linear warm-up over the first `warmup` steps, then a cosine decay to a tenth of the peak;
    loss_fn(step) -> loss of one batch."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.lr, warmup, steps, 0.1 * cfg.lr)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(head=name, step=step, loss=round(loss.item(), 5))
    return loss.item()


def train_structured(heads, cfg, tokenizer, x, parsed, rng, g, device, log):
    """The structured head's two readers. The image probe: clip's image encoder, trained further on images x
    (N, 3, H, W) to read each cell as the exact parser reads it (parsed, from cell_targets). The prompt
    reader: prompts against their exact Specs (text only, so many are cheap)."""
    B, st = cfg.batch, heads.structured
    st.image.load_state_dict(heads.clip.image.state_dict())
    st.text.load_state_dict(heads.clip.text.state_dict())

    def probe_loss(step):
        i = torch.randint(0, len(x), (B,), generator=g)
        return st.image.cell_loss(st.image(x[i].to(device)), parsed[i].to(device))
    figures = {"structured_probe_loss": _fit("structured_probe", st.image.parameters(), probe_loss,
                                             cfg.structured_probe_steps, cfg, log)}

    exs = [world.sample_example(rng, split="train") for _ in range(cfg.structured_prompts)]
    ids = padded_text_ids(tokenizer, [e.prompt for e in exs], cfg.max_text)
    slots, total, rel = program_targets([e.spec for e in exs])
    order = torch.argsort((ids != PAD).sum(1))  # batches of neighbours in length: prompts run from 5 to ~70 tokens
    reader = [p for name, p in st.named_parameters() if not name.startswith("image.")]

    def reader_loss(step):
        i = order[int(torch.randint(0, len(ids) - B + 1, (1,), generator=g)):][:B]
        t = ids[i][:, :int((ids[i] != PAD).sum(1).max())]
        s, n, r = st.read(t.to(device))
        ce = sum(F.cross_entropy(p.flatten(0, 1), slots[i][..., k].flatten().to(device))
                 for k, p in enumerate(s.split(SLOT_ATTRS, -1)))
        return (ce + F.cross_entropy(n, total[i].to(device))
                + F.binary_cross_entropy_with_logits(r, rel[i].to(device)) * r[0].numel())
    figures["structured_train_loss"] = _fit("structured", reader, reader_loss, cfg.structured_steps, cfg, log)
    return figures


def clip_contrastive(clip, x, cap_ids, neg_ids):
    """The clip dual encoder's loss on images x (B, 3, H, W), their captions and a hard-negative caption each
    (ids (B, L)): symmetric InfoNCE, each image against every caption and negative of the batch. Also returns
    the image tokens (train_heads adds the cell probe's loss on them)."""
    B = len(x)
    tokens = clip.image(x)
    zi = clip.pool(tokens)  # (B, D)
    zt = clip.embed_texts(torch.cat([cap_ids, neg_ids]))  # (2B, D): captions, then hard negatives
    logits = clip.logit_scale.exp() * zi @ zt.t()  # (B, 2B)
    target = torch.arange(B, device=x.device)
    return F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :B].t(), target), tokens


def train_heads(cfg, tokenizer, vq, seed, device, log=lambda **kv: None):
    """Train every head on rendered data (train split prompts). Returns (Heads, figures)."""
    rng, g = np.random.default_rng([seed, 4]), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    S, B, n = vq.cfg.image_size, cfg.batch, cfg.examples
    heads = Heads(cfg, tokenizer.get_vocab_size(), vq.cfg).to(device).train()
    pick = lambda size: torch.randint(0, size, (B,), generator=g).numpy()
    figures, t0 = {}, time.time()

    imgs, scenes, caps, negs = caption_pairs(n, rng, vq, "train", cfg.p_vq)
    xc, cells = data.to_float(imgs), cell_targets(parser.parse_batch(imgs))  # each cell as the exact parser reads it
    cap_ids, neg_ids = padded_text_ids(tokenizer, caps, cfg.max_text), padded_text_ids(tokenizer, negs, cfg.max_text)

    def clip_loss(step):
        i = pick(n)
        loss, tokens = clip_contrastive(heads.clip, xc[i].to(device), cap_ids[i].to(device), neg_ids[i].to(device))
        return loss + heads.clip.image.cell_loss(tokens, cells[i].to(device))
    figures["clip_train_loss"] = _fit("clip", heads.clip.parameters(), clip_loss, cfg.clip_steps, cfg, log)

    with torch.no_grad():  # the aesthetic MLP reads the frozen clip embedding, as LAION's does
        heads.clip.eval()
        emb = torch.cat([heads.clip.embed_images(xc[k:k + 512].to(device)) for k in range(0, n, 512)])
    target = torch.tensor([edits.composition(s) for s in scenes], device=device)

    def aesthetic_loss(step):
        i = pick(n)
        return F.mse_loss(torch.sigmoid(heads.aesthetic(emb[i]).squeeze(-1)), target[i])
    figures["aesthetic_train_loss"] = _fit("aesthetic", heads.aesthetic.parameters(), aesthetic_loss,
                                           cfg.aesthetic_steps, cfg, log)

    # structured draws from its own stream so that its prompt count leaves the later heads' data unchanged
    figures.update(train_structured(heads, cfg, tokenizer, xc, cells, np.random.default_rng([seed, 4, 1]), g, device,
                                    log))

    clean = np.stack([world.render(world.random_scene(rng), S) for _ in range(n)])

    def quality_loss(step):
        xq, yq = quality_batch(clean[pick(n)], vq, g, device)
        return F.binary_cross_entropy_with_logits(heads.quality(xq), yq)
    figures["quality_train_loss"] = _fit("quality", heads.quality.parameters(), quality_loss,
                                         cfg.quality_steps, cfg, log)

    imgs, yg = geometry_pairs(n // 2, rng, vq, cfg.p_vq)
    xg, yg = data.to_float(imgs), torch.from_numpy(yg).float()
    # from clip's image encoder, which already reads each cell's shape and size: from scratch it can stay
    # near chance
    heads.geometry.image.load_state_dict(heads.clip.image.state_dict())

    def geometry_loss(step):
        i = pick(len(xg))
        return F.binary_cross_entropy_with_logits(heads.geometry(xg[i].to(device)), yg[i].to(device))
    figures["geometry_train_loss"] = _fit("geometry", heads.geometry.parameters(), geometry_loss, cfg.geometry_steps,
                                          dataclasses.replace(cfg, lr=cfg.geometry_lr), log,
                                          warmup=cfg.geometry_steps // 10)

    # last, from its own stream: the other heads' data stay as they were before it existed
    pairs = vqascore_pairs(cfg.vqascore_examples, np.random.default_rng([seed, 4, 2]), vq, "train", cfg.p_vq,
                           cfg.vqascore_edits)
    ids = padded_text_ids(tokenizer, pairs[1], cfg.max_text)
    figures.update(vqascore.train(heads.vqascore, cfg, vq, (pairs[0], ids, *pairs[2:]), seed, device, log))
    figures["train_seconds"] = round(time.time() - t0, 1)
    return heads.eval(), figures


def heads_metadata(heads):
    """What load_heads needs to rebuild the networks, stored inside the safetensors file."""
    return {"config": json.dumps(asdict(heads.cfg)), "vocab_size": str(heads.vocab_size),
            "vq_config": json.dumps(asdict(heads.vq_cfg)), "heads": ",".join(heads.names)}


def load_heads(run_dir, device="cpu"):
    """RUN_DIR/rewards.safetensors -> frozen Heads in eval mode."""
    path = os.path.join(run_dir, HEADS_FILE)
    if not os.path.exists(path):
        raise RunError(f"missing {path}: train the heads with `python train.py CONFIG --stages=rewards`")
    meta = read_tensors(path)[1]
    if "config" not in meta or "vq_config" not in meta:  # heads of an older version: no vqascore
        raise RunError(f"{path} was written by an older version (no vqascore head): delete it and retrain the "
                       "heads with --stages=rewards")
    heads = Heads(RewardsConfig(**json.loads(meta["config"])), int(meta["vocab_size"]),
                  VQConfig(**json.loads(meta["vq_config"])), meta.get("heads", ",".join(NAMES)).split(",")).to(device)
    return load_weights(heads, path).eval().requires_grad_(False)
