"""
Rewards: the protocol, the registry, the lightweight reward heads, and their calibration.

A reward is any callable `reward(images, prompts) -> Tensor[B]`: images (B, 3, H, W) floats in [0, 1],
prompts a list of B strings. Rewards are registered by name in one dict, REWARDS, and chosen by a
spec string: one name, or a weighted sum such as "vqa + 0.5*aesthetic". `load_reward` turns a spec
into one callable; every term is checked on every call (a term that raises, returns the wrong shape
or NaN is named in the error, with what it returned).

    python train.py tiny_configs/shapes_cpu.toml --stages=rewards   # train the heads (minutes on a CPU)
    python rewards.py out/shapes_cpu                                 # calibration table (--json for report.json's)

    import rewards
    reward = rewards.load_reward("out/shapes_cpu", "vqa + 0.5*aesthetic")
    r = reward(images, ["a red circle", "two blue squares"])        # (2,)

The built-in rewards, and what each stands in for (heads are trained on rendered shapes-world scenes):
    vqa        VQAScore, P(yes | image, "does this show {prompt}?") from a VLM, here a neuro-symbolic one
               (NS-VQA): a learned image probe reads the 9 cells (shape, colour, size or empty), a learned
               prompt reader writes the prompt as a program (object slots, counts, total, relations), and a
               fixed soft executor scores the program on the cells. The probe learns from renders labelled
               cell by cell by the exact parser (half through the run's VQ), the reader from prompts and
               their Specs; neither sees the model's samples. The DEFAULT post-training reward. Measured on
               shapes_cpu (seed 0): AUC 0.993 vs the verifier on the model's own samples of dev prompts,
               0.869 on held-out renders, where long dense prompts are its weak spot (the reader, 600
               steps, still misreads 4-object layouts; there every slot must be read right).
    clip       CLIPScore: a dual encoder trained contrastively with hard-negative captions; the reward is
               the cosine of the image and text embeddings, in [-1, 1].
    aesthetic  the LAION aesthetic predictor: an MLP on the clip image embedding regressing `composition`
               (below), this world's stand-in for a human rating. In [0, 1].
    quality    a low-level quality model (e.g. a no-reference IQA net): P(clean) against noise, blur,
               blocking, colour bleeding and VQ code errors. In [0, 1].
    geometry   a shape well-formedness model: P(well formed) against objects stretched, skewed, cut in
               two or merged with a copy of themselves. In [0, 1].
    verifier   the oracle: the share of the prompt's Spec clauses that the scene the exact parser
               (world.parse) finds satisfies (world.clause_share): 1 exactly when the sample passes, graded
               below, so that it ranks dense samples, which almost never pass. Needs the Specs:
               load_reward(..., specs={prompt: Spec}). Not differentiable.
    self       the unified GPT's own belief: the per-token geometric mean of p(prompt | image), the image
               read through the VQ encoder (image-to-text format). In [0, 1]. Not differentiable (the VQ
               encoder picks codes by argmax).
The image encoders of vqa and clip are also trained to name each cell's shape, colour and size (a
probe on their cell tokens, as the exact parser reads them): free, dense labels that make the tokens
meaningful fast; vqa reads the cells through that probe.
The trained heads (vqa, clip, aesthetic, quality, geometry) pass gradients to the input pixels; their
weights are frozen (requires_grad False), so only the images get gradients.
"""

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open

import data
import world
from data import PAD
from generate import RunError, SampleConfig, decode_images, generate, load_run, load_weights
from model import token_ce

DEFAULT = "vqa"  # the post-training reward unless a config names another
HEADS_FILE = "rewards.safetensors"  # every trained head, one file, architecture config in its metadata

# -----------------------------------------------------------------------------
# protocol and registry

REWARDS = {}  # name -> reward(images, prompts) -> (B,), or a FromRun that builds one from a run directory


class RewardError(ValueError):
    """A reward spec that cannot be read, or a reward that misbehaved (raised, wrong shape, NaN)."""


@dataclass(frozen=True)
class FromRun:
    """A registry entry that needs a trained run: build(run_dir, device, specs) -> reward."""
    build: callable


def register(name, from_run=False):
    """Decorator: @register("mine") on reward(images, prompts); from_run=True on build(run_dir, device, specs)."""
    def deco(fn):
        REWARDS[name] = FromRun(fn) if from_run else fn
        return fn
    return deco


_TERM = re.compile(r"^(?:(\d+\.?\d*|\.\d+)\s*\*\s*)?([A-Za-z_]\w*)(?:\s*\*\s*(\d+\.?\d*|\.\d+))?$")


def parse_spec(spec):
    """'vqa + 0.5*aesthetic - 0.1*self' -> [(1.0, 'vqa'), (0.5, 'aesthetic'), (-0.1, 'self')]."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"empty reward spec {spec!r}; expected e.g. 'vqa' or 'vqa + 0.5*aesthetic'")
    parts = re.split(r"([+-])", spec)  # [term, sign, term, sign, term ...]
    pairs = [("+", parts[0])] + list(zip(parts[1::2], parts[2::2]))
    if not parts[0].strip() and len(parts) > 1:
        pairs = pairs[1:]  # a leading sign: "-0.1*self + vqa"
    terms = []
    for sign, term in pairs:
        m = _TERM.match(term.strip())
        if not m or (m.group(1) and m.group(3)):
            raise RewardError(f"bad reward spec {spec!r} at {term.strip() or sign!r}: "
                              f"terms look like NAME, WEIGHT*NAME or NAME*WEIGHT joined by + or -, e.g. 'vqa + 0.5*aesthetic'")
        weight = float(m.group(1) or m.group(3) or 1.0) * (-1 if sign == "-" else 1)
        if m.group(2) not in REWARDS:
            hint = difflib.get_close_matches(m.group(2), REWARDS, n=1)
            raise RewardError(f"unknown reward {m.group(2)!r} in {spec!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                              + f" Registered: {', '.join(sorted(REWARDS))}")
        terms.append((weight, m.group(2)))
    return terms


def _describe(x):
    if torch.is_tensor(x):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}: {x!r}"[:200]


def checked(name, fn):
    """Wrap a reward so that misuse and misbehaviour stop with a message that names it."""
    def reward(images, prompts):
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise RewardError(f"reward {name!r}: images must be a float tensor (B, 3, H, W) in [0, 1], got {_describe(images)}")
        if isinstance(prompts, str) or len(prompts) != len(images):
            raise RewardError(f"reward {name!r}: expected a list of {len(images)} prompts (one per image), got {_describe(prompts)}")
        try:
            out = fn(images, prompts)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
        if not torch.is_tensor(out) or out.shape != (len(images),):
            raise RewardError(f"reward {name!r} returned {_describe(out)}; a reward returns a tensor of shape ({len(images)},)")
        if torch.isnan(out).any():
            raise RewardError(f"reward {name!r} returned NaN at rows {torch.isnan(out).nonzero().flatten().tolist()}: {out.detach().tolist()}")
        return out.float()
    return reward


def load_reward(run_dir, spec=DEFAULT, device="cpu", specs=None):
    """A reward spec -> one checked callable reward(images, prompts) -> (B,), the weighted sum of its terms.
    Trained heads come from RUN_DIR/rewards.safetensors; specs ({prompt: world.Spec}) feeds the verifier."""
    terms = []
    for weight, name in parse_spec(spec):
        fn = REWARDS[name]
        if isinstance(fn, FromRun):
            try:
                fn = fn.build(run_dir, device, specs)
            except (RunError, FileNotFoundError) as e:
                raise RewardError(f"reward {name!r} needs a trained run: {e}") from None
        terms.append((weight, checked(name, fn)))

    def reward(images, prompts):
        return sum(w * fn(images, prompts) for w, fn in terms)
    reward.spec = spec
    return reward


# -----------------------------------------------------------------------------
# the world side: scene edits, image corruptions, the composition rating


def perturb(scene, rng):
    """A different scene: one edit (two, 30% of the time) of the kind a generator gets wrong: a colour, a
    shape, a size, one object more or fewer, an object moved, two objects' cells or colours swapped."""
    out = scene
    for _ in range(1 + (rng.random() < 0.3)):
        new = _edit(out, rng)
        while new == out:  # swapping two equal colours, say, changes nothing
            new = _edit(out, rng)
        out = new
    return out if out != scene else perturb(scene, rng)  # the second edit undid the first


def _edit(scene, rng):
    objs = list(scene.objects)
    free = [c for c in range(9) if c not in {3 * o.row + o.col for o in objs}]
    kinds = ["colour", "shape", "size"] if objs else []
    kinds += ["move"] * bool(objs and free) + ["add"] * bool(free and len(objs) < world.MAX_OBJECTS)
    kinds += ["remove", "swap_cells", "swap_colours"] * (len(objs) >= 2)
    kind = kinds[rng.integers(len(kinds))] if kinds else "add"
    i, j = (rng.permutation(len(objs))[:2].tolist() + [0, 0])[:2]
    other = lambda seq, cur: [v for v in seq if v != cur][rng.integers(len(seq) - 1)]
    if kind == "colour":
        objs[i] = dataclasses.replace(objs[i], colour=other(tuple(world.COLOURS), objs[i].colour))
    elif kind == "shape":
        objs[i] = dataclasses.replace(objs[i], shape=other(world.SHAPES, objs[i].shape))
    elif kind == "size":
        objs[i] = dataclasses.replace(objs[i], size=other(world.SIZES, objs[i].size))
    elif kind == "move":
        cell = free[rng.integers(len(free))]
        objs[i] = dataclasses.replace(objs[i], row=cell // 3, col=cell % 3)
    elif kind == "add":  # a copy of an object (a count one too high) or a random one
        cell = divmod(free[rng.integers(len(free))], 3)
        base = objs[i] if objs and rng.random() < 0.6 else world.random_scene(rng, 1).objects[0]
        objs.append(dataclasses.replace(base, row=cell[0], col=cell[1]))
    elif kind == "remove":
        objs.pop(i)
    elif kind == "swap_cells":
        objs[i], objs[j] = (dataclasses.replace(objs[i], row=objs[j].row, col=objs[j].col),
                            dataclasses.replace(objs[j], row=objs[i].row, col=objs[i].col))
    else:
        objs[i], objs[j] = dataclasses.replace(objs[i], colour=objs[j].colour), dataclasses.replace(objs[j], colour=objs[i].colour)
    return world.Scene(tuple(objs))


def render_malformed(scene, rng, image_size):
    """uint8 (H, W, 3): the scene with one object drawn wrong: stretched or squashed, skewed (a corner or
    the apex moved), cut in two by a background line, or merged with an overlapping copy of itself."""
    img = Image.fromarray(world.render(scene, image_size))
    draw = ImageDraw.Draw(img)
    o = scene.objects[rng.integers(len(scene.objects))]
    x0, y0, x1, y1 = world.object_box(o, image_size)
    e, fill = x1 - x0 + 1, world.COLOURS[o.colour]
    d = max(1, round(e * rng.uniform(0.35, 0.6)))  # every edit moves something by a third to a half of the object
    kind = ("stretch", "skew", "cut", "merge")[rng.integers(4)]
    if kind == "stretch":
        draw.rectangle([x0, y0, x1, y1], fill=world.BACKGROUND)
        box = [x0, y0, x1, y1]
        k = int(rng.integers(4))  # grow or shrink, horizontally or vertically
        box[k % 2] += (-d // 2 if k < 2 else d // 2)
        box[2 + k % 2] += (d - d // 2 if k < 2 else -(d - d // 2))
        world.draw_shape(draw, o.shape, box, fill)
    elif kind == "skew":
        draw.rectangle([x0, y0, x1, y1], fill=world.BACKGROUND)
        pts = {"square": [(x0, y0), (x1, y0), (x1, y1), (x0, y1)], "triangle": [(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)],
               "circle": [(x0 + e / 2, y0), (x1, y0 + e / 2), (x0 + e / 2, y1), (x0, y0 + e / 2)]}[o.shape]
        v = int(rng.integers(len(pts)))
        pts[v] = (pts[v][0] + d * rng.choice([-1, 1]), pts[v][1] + d * rng.choice([-1, 1]))
        draw.polygon(pts, fill=fill)
    elif kind == "cut":
        c = int(rng.integers(1, e - 1)) if e > 2 else 1
        draw.line([x0 + c, y0 - 1, x0 + c, y1 + 1] if rng.random() < 0.5 else [x0 - 1, y0 + c, x1 + 1, y0 + c], fill=world.BACKGROUND)
    else:
        dx, dy = d * rng.choice([-1, 1]), d * rng.choice([-1, 0, 1])
        world.draw_shape(draw, o.shape, [x0 + dx, y0 + dy, x1 + dx, y1 + dy], fill)
    return np.asarray(img)


CORRUPTIONS = ("noise", "blur", "blocking", "bleeding", "vq")


def corrupt(x, kind, vq, g):
    """Degrade images x (B, 3, H, W) in [0, 1], each at a random strength. Returns the same shape."""
    B = len(x)
    u = torch.rand(B, 1, 1, 1, generator=g)
    if kind == "noise":
        return (x + (0.05 + 0.2 * u) * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if kind == "blur":  # a 3x3 box blur, mixed with the original
        soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return (0.4 + 0.6 * u) * soft + (0.6 - 0.6 * u) * x
    if kind == "blocking":  # 2x2 or 4x4 blocks at a random offset, like a coarse codec
        k = 2 if torch.rand(1, generator=g).item() < 0.5 else 4
        s = int(torch.randint(0, k, (1,), generator=g))
        y = F.pad(x, (s, k - s, s, k - s), mode="replicate")
        y = F.interpolate(F.avg_pool2d(y, k), scale_factor=k, mode="nearest")
        return y[:, :, s:s + x.shape[2], s:s + x.shape[3]]
    if kind == "bleeding":  # one colour channel shifted by 1-2 pixels, the colours no longer aligned
        c, s = int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(1, 3, (1,), generator=g))
        y = x.clone()
        y[:, c] = torch.roll(x[:, c], shifts=(s, s), dims=(1, 2))
        return y
    codes = vq.encode(x.to(vq.codebook.weight.device)).cpu()  # "vq": a VQ round trip with 5-30% of the codes wrong
    wrong = torch.rand(codes.shape, generator=g) < 0.05 + 0.25 * u.view(B, 1)
    codes = torch.where(wrong, torch.randint(0, vq.cfg.codebook_size, codes.shape, generator=g), codes)
    with torch.no_grad():
        return vq.decode(codes.to(vq.codebook.weight.device)).clamp(0, 1).cpu()


WARM = ("red", "orange", "yellow")


def composition(scene):
    """This world's stand-in for a human aesthetic rating, in [0, 1]: the mean of
        balance  1 - distance of the objects' area-weighted centroid from the centre cell (0 at a corner)
        spacing  the fraction of object pairs that are not in touching cells (8-neighbourhood)
        margins  the fraction of objects away from the corner cells
        harmony  the fraction of objects in the majority colour family (warm: red, orange, yellow; cool)
    An empty image scores 0."""
    objs = scene.objects
    if not objs:
        return 0.0
    w = np.array([world.SIZE_UNITS[o.size] ** 2 for o in objs])
    cy, cx = (np.array([o.row for o in objs]) * w).sum() / w.sum(), (np.array([o.col for o in objs]) * w).sum() / w.sum()
    balance = 1 - math.hypot(cy - 1, cx - 1) / math.sqrt(2)
    pairs = [(a, b) for k, a in enumerate(objs) for b in objs[k + 1:]]
    spacing = np.mean([max(abs(a.row - b.row), abs(a.col - b.col)) > 1 for a, b in pairs]) if pairs else 1.0
    margins = np.mean([(o.row, o.col) not in ((0, 0), (0, 2), (2, 0), (2, 2)) for o in objs])
    warm = np.mean([o.colour in WARM for o in objs])
    return float(np.mean([balance, spacing, margins, max(warm, 1 - warm)]))


# -----------------------------------------------------------------------------
# the heads


@dataclass
class RewardsConfig:
    dim: int = 64  # width of every head's encoders
    layers: int = 2  # transformer layers of the vqa fusion and of the clip text tower
    max_text: int = 96  # longest prompt or caption in tokens (the world's longest prompts are ~70)
    batch: int = 64  # training batch of every head
    lr: float = 2e-3  # AdamW, cosine to a tenth
    examples: int = 6000  # rendered training examples of each data set (clip and the vqa probe share one; geometry)
    p_vq: float = 0.5  # share of training images shown after a round trip through the run's VQ, as samples are
    vqa_probe_steps: int = 300  # the vqa image encoder learning to read cells as the parser does
    vqa_steps: int = 2000  # the vqa prompt reader (at 600 it read sizes at chance: comparatives could not be judged)
    vqa_prompts: int = 20000  # prompts with their Specs for the vqa prompt reader (text only: cheap)
    clip_steps: int = 300
    aesthetic_steps: int = 300
    quality_steps: int = 150
    geometry_steps: int = 600  # from clip's image encoder
    geometry_lr: float = 4e-3  # after a warm-up over a tenth of its steps; at lr (2e-3) it ended at loss 0.16-0.47, here ~0.2
    calib_examples: int = 600  # held-out (dev split) renders for the calibration table
    calib_samples: int = 256  # the model's own samples of dev prompts for the calibration table


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
        # vqa fusion learned far slower from its one bit per pair
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
        return sum(F.cross_entropy(p.flatten(0, 1), targets[..., k].flatten()) for k, p in enumerate(self.cell_logits(tokens)))


CELL_TOKENS = [6, 7, 8, 11, 12, 13, 16, 17, 18]  # the 3x3 cells inside the 5x5 tokens
CELL_ATTRS = (len(world.SHAPES) + 1, len(world.COLOURS) + 1, len(world.SIZES) + 1)  # each attribute or "empty"


def cell_targets(scenes):
    """(N, 9, 3) long: per cell, the index of its object's shape, colour and size, plus one; 0 = empty."""
    t = np.zeros((len(scenes), 9, 3), np.int64)
    for n, s in enumerate(scenes):
        for o in s.objects:
            t[n, 3 * o.row + o.col] = (world.SHAPES.index(o.shape) + 1, tuple(world.COLOURS).index(o.colour) + 1, world.SIZES.index(o.size) + 1)
    return torch.from_numpy(t)


def one_hot_cells(targets):
    """(B, 9, 3) from cell_targets -> (B, 9, 14): the exact scene in the form of ImageEncoder.cell_probs."""
    return torch.cat([F.one_hot(targets[..., k], n).float() for k, n in enumerate(CELL_ATTRS)], -1)


class TextEmbed(nn.Module):
    """Token ids (B, L), padded with PAD -> (B, L, D)."""

    def __init__(self, vocab_size, dim, max_text):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_text, dim))

    def forward(self, ids):
        return self.tok(ids) + self.pos[:, :ids.shape[1]]


SLOT_ATTRS = (len(world.SHAPES) + 1, len(world.COLOURS) + 1, len(world.SIZES) + 1, 4, 4, world.MAX_OBJECTS + 1)  # 0 = any / unused
RELATE = torch.tensor([[[world.holds(world.Obj("circle", "red", "small", k // 3, k % 3), rel, world.Obj("circle", "red", "small", l // 3, l % 3))
                         for l in range(9)] for k in range(9)] for rel in world.RELATIONS]).float()  # (4, 9, 9): rel holds from cell k to l


class VQAHead(nn.Module):
    """P(yes | image, prompt) as a neuro-symbolic VQA model (NS-VQA, Yi et al. 2018): two learned readers
    and a fixed soft executor. The image encoder's probe reads each of the 9 cells as probabilities of a
    shape, colour and size (or empty). A text transformer reads the prompt into up to MAX_OBJECTS object
    slots, in order of mention (each: shape, colour, size, row, column, each possibly "any", and how many;
    0 = slot unused), the scene's total and the relations between slots. The executor then computes the
    probability that the cells satisfy the program, differentiably: per slot the probability that each
    cell matches, the count of matches as a Poisson-binomial, relations over the cells where each slot's
    single match may be. Both readers learn from dense labels, not from the one bit of a pair's label."""

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
        where = torch.stack([torch.arange(9, device=cells.device) // 3, torch.arange(9, device=cells.device) % 3])  # (2, 9)
        match = occupied[:, None]  # (B, S, 9): the probability that each cell holds an object the slot describes
        for k, p in enumerate((given(shape), given(colour), given(size))):
            match = match * (q[k][..., :1] + q[k][..., 1:] @ p.transpose(1, 2))
        for k in (0, 1):  # row, column
            match = match * (q[3 + k][..., :1] + q[3 + k][..., 1:][..., where[k]])
        count = q[5]  # (B, S, 5): slot unused, or how many objects it names
        ok = count[..., 0] + (count[..., 1:] * _counts(match)[..., 1:count.shape[-1]]).sum(-1)  # (B, S)
        ok_total = (total.softmax(-1) * _counts(occupied)[..., :total.shape[-1]]).sum(-1)  # (B,)
        # a relation needs exactly one match on each side: the probability that it is exactly at cell k
        alone = match * torch.exp(torch.log1p(-match.clamp(max=1 - 1e-6)).sum(-1, keepdim=True) - torch.log1p(-match.clamp(max=1 - 1e-6)))
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
    """data.Specs -> what VQAHead.read predicts: slots (B, S, 6) long (0 = any / unused), total (B,) long,
    relations (B, S, S, 4) float."""
    S = world.MAX_OBJECTS
    slots, rel = np.zeros((len(specs), S, 6), np.int64), np.zeros((len(specs), S, S, len(world.RELATIONS)), np.float32)
    index = lambda seq, v: 0 if v is None else seq.index(v) + 1
    for b, spec in enumerate(specs):
        for r, q in enumerate(spec.reqs):
            slots[b, r] = (index(world.SHAPES, q.shape), index(tuple(world.COLOURS), q.colour), index(world.SIZES, q.size),
                           0 if q.row is None else q.row + 1, 0 if q.col is None else q.col + 1, q.count)
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
        pad = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device) if pad is None else pad  # (B, T), True = padding
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


class Heads(nn.Module):
    """Every trained head; the aesthetic MLP reads the clip image embedding."""

    def __init__(self, cfg, vocab_size, image_size):
        super().__init__()
        self.cfg, self.vocab_size, self.image_size = cfg, vocab_size, image_size
        self.vqa, self.clip = VQAHead(cfg, vocab_size, image_size), CLIPHead(cfg, vocab_size, image_size)
        self.aesthetic = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, 1))
        self.quality, self.geometry = ImageClassifier(cfg, image_size), ImageClassifier(cfg, image_size)


def encode_prompts(tokenizer, prompts, max_text):
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


def to_float(u8):
    """uint8 (N, H, W, 3) numpy -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2).float() / 255


def to_u8(x):
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def vq_round_trip(vq, u8, mask):
    """uint8 images (N, H, W, 3); the ones where mask is True replaced by their VQ round trip."""
    out, dev = u8.copy(), vq.codebook.weight.device
    idx = np.nonzero(mask)[0]
    for i in range(0, len(idx), 512):
        x = to_float(u8[idx[i:i + 512]]).to(dev)
        out[idx[i:i + 512]] = to_u8(vq.decode(vq.encode(x)))
    return out


def vqa_pairs(n, rng, vq, split, p_vq):
    """n (image, example, label, scene drawn) for vqa: the example's own scene (40%) or an edit of it, rendered, shown
    through the VQ a p_vq share of the time, and labelled by the exact verifier on the image shown."""
    exs = [world.sample_example(rng, split=split) for _ in range(n)]
    scenes = [e.scene if rng.random() < 0.4 else perturb(e.scene, rng) for e in exs]
    imgs = vq_round_trip(vq, np.stack([world.render(s, vq.cfg.image_size) for s in scenes]), rng.random(n) < p_vq)
    labels = np.array([world.passes(s, e.spec) for s, e in zip(world.parse_batch(imgs), exs)])
    return imgs, exs, labels, scenes


def caption_pairs(n, rng, vq, split, p_vq):
    """n (image, scene, caption, hard-negative caption): the caption of an edit of the scene."""
    scenes = [world.sample_example(rng, split=split).scene for _ in range(n)]
    imgs = vq_round_trip(vq, np.stack([world.render(s, vq.cfg.image_size) for s in scenes]), rng.random(n) < p_vq)
    return imgs, scenes, [world.caption_text(s, rng) for s in scenes], [world.caption_text(perturb(s, rng), rng) for s in scenes]


def geometry_pairs(n, rng, vq, p_vq):
    """n clean renders of non-empty scenes, then n malformed renders of the same scenes; labels 1 then 0."""
    scenes = [world.random_scene(rng) for _ in range(n)]
    clean = np.stack([world.render(s, vq.cfg.image_size) for s in scenes])
    bad = np.stack([render_malformed(s, rng, vq.cfg.image_size) for s in scenes])
    imgs = vq_round_trip(vq, np.concatenate([clean, bad]), rng.random(2 * n) < p_vq)
    return imgs, np.r_[np.ones(n), np.zeros(n)]


def quality_batch(clean_u8, vq, g, device):
    """Half clean, half degraded (each by one random corruption): (images, labels 1 = clean)."""
    x = to_float(clean_u8)
    half = len(x) // 2
    kinds = torch.randint(0, len(CORRUPTIONS), (len(x) - half,), generator=g)
    bad = x[half:].clone()
    for k in kinds.unique().tolist():
        bad[kinds == k] = corrupt(x[half:][kinds == k], CORRUPTIONS[k], vq, g)
    return torch.cat([x[:half], bad]).to(device), torch.cat([torch.ones(half), torch.zeros(len(x) - half)]).to(device)


def _fit(name, params, loss_fn, steps, cfg, log, warmup=0):
    """AdamW with a linear warm-up over the first `warmup` steps, then a cosine decay to a tenth of cfg.lr;
    loss_fn(step) -> loss of one batch."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1, (step + 1) / (warmup + 1)) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(head=name, step=step, loss=round(loss.item(), 5))
    return loss.item()


def train_vqa(heads, cfg, tokenizer, x, parsed, rng, g, device, log):
    """The vqa head's two readers. The image probe: clip's image encoder, trained further on images x
    (N, 3, H, W) to read each cell as the exact parser reads it (parsed, from cell_targets). The prompt
    reader: prompts against their exact Specs (text only, so many are cheap)."""
    B, vqa = cfg.batch, heads.vqa
    vqa.image.load_state_dict(heads.clip.image.state_dict())
    vqa.text.load_state_dict(heads.clip.text.state_dict())

    def probe_loss(step):
        i = torch.randint(0, len(x), (B,), generator=g)
        return vqa.image.cell_loss(vqa.image(x[i].to(device)), parsed[i].to(device))
    figures = {"vqa_probe_loss": _fit("vqa_probe", vqa.image.parameters(), probe_loss, cfg.vqa_probe_steps, cfg, log)}

    exs = [world.sample_example(rng, split="train") for _ in range(cfg.vqa_prompts)]
    ids = encode_prompts(tokenizer, [e.prompt for e in exs], cfg.max_text)
    slots, total, rel = program_targets([e.spec for e in exs])
    order = torch.argsort((ids != PAD).sum(1))  # batches of neighbours in length: prompts run from 5 to ~70 tokens
    reader = [p for name, p in vqa.named_parameters() if not name.startswith("image.")]

    def reader_loss(step):
        i = order[int(torch.randint(0, len(ids) - B + 1, (1,), generator=g)):][:B]
        t = ids[i][:, :int((ids[i] != PAD).sum(1).max())]
        s, n, r = vqa.read(t.to(device))
        ce = sum(F.cross_entropy(p.flatten(0, 1), slots[i][..., k].flatten().to(device)) for k, p in enumerate(s.split(SLOT_ATTRS, -1)))
        return ce + F.cross_entropy(n, total[i].to(device)) + F.binary_cross_entropy_with_logits(r, rel[i].to(device)) * r[0].numel()
    figures["vqa_train_loss"] = _fit("vqa", reader, reader_loss, cfg.vqa_steps, cfg, log)
    return figures


def train_heads(cfg, tokenizer, vq, seed, device, log=lambda **kv: None):
    """Train every head on rendered data (train split prompts). Returns (Heads, figures)."""
    rng, g = np.random.default_rng([seed, 4]), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    S, B, n = vq.cfg.image_size, cfg.batch, cfg.examples
    heads = Heads(cfg, tokenizer.get_vocab_size(), S).to(device).train()
    pick = lambda size: torch.randint(0, size, (B,), generator=g).numpy()
    figures, t0 = {}, time.time()

    imgs, scenes, caps, negs = caption_pairs(n, rng, vq, "train", cfg.p_vq)
    xc, cells = to_float(imgs), cell_targets(world.parse_batch(imgs))  # each cell as the exact parser reads it
    cap_ids, neg_ids = encode_prompts(tokenizer, caps, cfg.max_text), encode_prompts(tokenizer, negs, cfg.max_text)

    def clip_loss(step):
        i = pick(n)
        tokens = heads.clip.image(xc[i].to(device))
        zi = heads.clip.pool(tokens)  # (B, D)
        zt = heads.clip.embed_texts(torch.cat([cap_ids[i], neg_ids[i]]).to(device))  # (2B, D): captions, then hard negatives
        logits = heads.clip.logit_scale.exp() * zi @ zt.t()  # (B, 2B)
        target = torch.arange(B, device=device)
        contrastive = F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :B].t(), target)
        return contrastive + heads.clip.image.cell_loss(tokens, cells[i].to(device))
    figures["clip_train_loss"] = _fit("clip", heads.clip.parameters(), clip_loss, cfg.clip_steps, cfg, log)

    with torch.no_grad():  # the aesthetic MLP reads the frozen clip embedding, as LAION's does
        heads.clip.eval()
        emb = torch.cat([heads.clip.embed_images(xc[k:k + 512].to(device)) for k in range(0, n, 512)])
    target = torch.tensor([composition(s) for s in scenes], device=device)

    def aesthetic_loss(step):
        i = pick(n)
        return F.mse_loss(torch.sigmoid(heads.aesthetic(emb[i]).squeeze(-1)), target[i])
    figures["aesthetic_train_loss"] = _fit("aesthetic", heads.aesthetic.parameters(), aesthetic_loss, cfg.aesthetic_steps, cfg, log)

    # vqa draws from its own stream so that its prompt count leaves the later heads' data unchanged
    figures.update(train_vqa(heads, cfg, tokenizer, xc, cells, np.random.default_rng([seed, 4, 1]), g, device, log))

    clean = np.stack([world.render(world.random_scene(rng), S) for _ in range(n)])

    def quality_loss(step):
        xq, yq = quality_batch(clean[pick(n)], vq, g, device)
        return F.binary_cross_entropy_with_logits(heads.quality(xq), yq)
    figures["quality_train_loss"] = _fit("quality", heads.quality.parameters(), quality_loss, cfg.quality_steps, cfg, log)

    imgs, yg = geometry_pairs(n // 2, rng, vq, cfg.p_vq)
    xg, yg = to_float(imgs), torch.from_numpy(yg).float()
    # from clip's image encoder, which already reads each cell's shape and size: from scratch, 400 steps
    # left the loss near chance in some runs (0.63-0.66, chance 0.69; held-out AUC 0.63-0.93 between seeds)
    heads.geometry.image.load_state_dict(heads.clip.image.state_dict())

    def geometry_loss(step):
        i = pick(len(xg))
        return F.binary_cross_entropy_with_logits(heads.geometry(xg[i].to(device)), yg[i].to(device))
    figures["geometry_train_loss"] = _fit("geometry", heads.geometry.parameters(), geometry_loss, cfg.geometry_steps,
                                          dataclasses.replace(cfg, lr=cfg.geometry_lr), log, warmup=cfg.geometry_steps // 10)
    figures["train_seconds"] = round(time.time() - t0, 1)
    return heads.eval(), figures


def heads_metadata(heads):
    """What load_heads needs to rebuild the networks, stored inside the safetensors file."""
    return {"config": json.dumps(asdict(heads.cfg)), "vocab_size": str(heads.vocab_size), "image_size": str(heads.image_size)}


def load_heads(run_dir, device="cpu"):
    """RUN_DIR/rewards.safetensors -> frozen Heads in eval mode."""
    path = os.path.join(run_dir, HEADS_FILE)
    if not os.path.exists(path):
        raise RunError(f"missing {path}: train the heads with `python train.py CONFIG --stages=rewards`")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise RunError(f"{path} has no head config in its metadata: retrain it with --stages=rewards")
    heads = Heads(RewardsConfig(**json.loads(meta["config"])), int(meta["vocab_size"]), int(meta["image_size"])).to(device)
    return load_weights(heads, path).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# the built-in rewards


def _head_reward(name):
    def build(run_dir, device, specs):
        heads = load_heads(run_dir, device)
        tok = data.load_tokenizer(os.path.join(run_dir, "tokenizer.json"))
        ids = lambda prompts, images: encode_prompts(tok, prompts, heads.cfg.max_text).to(images.device)
        return {
            "vqa": lambda images, prompts: torch.sigmoid(heads.vqa(images, ids(prompts, images))),
            "clip": lambda images, prompts: (heads.clip.embed_images(images) * heads.clip.embed_texts(ids(prompts, images))).sum(-1),
            "aesthetic": lambda images, prompts: torch.sigmoid(heads.aesthetic(heads.clip.embed_images(images)).squeeze(-1)),
            "quality": lambda images, prompts: torch.sigmoid(heads.quality(images)),
            "geometry": lambda images, prompts: torch.sigmoid(heads.geometry(images)),
        }[name]
    return build


for _name in ("vqa", "clip", "aesthetic", "quality", "geometry"):
    register(_name, from_run=True)(_head_reward(_name))


@register("verifier", from_run=True)
def verifier(run_dir, device, specs):
    """The share of the prompt's Spec clauses the parsed image satisfies (1.0: it passes). specs: {prompt: world.Spec}."""
    specs = specs or {}

    def reward(images, prompts):
        missing = [p for p in prompts if p not in specs]
        if missing:
            raise KeyError(f"no Spec for prompt {missing[0]!r}: pass load_reward(..., specs={{prompt: spec}}), "
                           f"e.g. {{ex.prompt: ex.spec for ex in examples}}")
        scenes = world.parse_batch(to_u8(images.detach()))
        return torch.tensor([world.clause_share(s, specs[p]) for s, p in zip(scenes, prompts)], device=images.device)
    return reward


@register("self", from_run=True)
def self_likelihood(run_dir, device, specs):
    """exp(mean log p(prompt tokens | <bos> <boi> image codes <eoi>)) under the run's GPT."""
    _, tok, vocab, vq, gpt = load_run(run_dir, device)

    @torch.no_grad()
    def reward(images, prompts):
        codes = vq.encode(images.to(device)).tolist()
        b = data.collate([data.build_sequence("caption", vocab, codes=c, caption=data.encode_text(tok, p)) for c, p in zip(codes, prompts)],
                         vocab, device)
        logp = -token_ce(gpt(b.x, patch=b.patch, tags=b.tags), b.y)  # (B, T)
        w = b.weight * (b.y != data.EOS)  # the prompt's words only: a prompt is not a whole caption, so no <eos> term
        return ((logp * w).sum(1) / w.sum(1)).exp().to(images.device)
    return reward


# -----------------------------------------------------------------------------
# calibration


def auc(scores, labels):
    """Area under the ROC curve (ties count half); None when only one class is present."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        return None
    _, group, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[group]  # 1-based ranks, tied scores share their mean rank
    return float((ranks[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum()))


def _corr(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return None if a.std() == 0 or b.std() == 0 else float(np.corrcoef(a, b)[0, 1])


def _score(fn, u8, prompts, device, batch=256):
    with torch.no_grad():
        return np.concatenate([fn(to_float(u8[i:i + batch]).to(device), prompts[i:i + batch]).cpu().numpy()
                               for i in range(0, len(u8), batch)])


def calibrate(run_dir, device="cpu", n_examples=600, n_samples=256, seed=0):
    """Each reward against the verifier or its target property, on held-out (dev split) renders and on the
    run's own samples of dev prompts. Returns {"held_out": {...}, "samples": {...}} of plain floats."""
    cfg, tok, vocab, vq, gpt = load_run(run_dir, device)
    rng, g = np.random.default_rng([seed, 5]), torch.Generator().manual_seed(seed + 5)
    imgs, exs, labels, _ = vqa_pairs(n_examples, rng, vq, "dev", 0.5)
    cap_imgs, scenes, caps, negs = caption_pairs(n_examples, rng, vq, "dev", 0.5)
    geo_imgs, geo_labels = geometry_pairs(n_examples // 2, rng, vq, 0.5)
    clean = np.stack([world.render(world.random_scene(rng), vq.cfg.image_size) for _ in range(n_examples)])
    q_imgs, q_labels = zip(*[quality_batch(clean[i:i + 64], vq, g, device) for i in range(0, n_examples, 64)])
    q_imgs, q_labels = to_u8(torch.cat(q_imgs)), torch.cat(q_labels).cpu().numpy()

    # the model's own samples of dev prompts, judged by the verifier
    sample_exs = [world.sample_example(rng, split="dev") for _ in range(n_samples)]
    sample_cfg = SampleConfig(**cfg.get("sample", {}))
    samples = []
    for i in range(0, n_samples, 128):
        chunk = sample_exs[i:i + 128]
        samples += generate(gpt, vocab, [data.encode_text(tok, e.prompt) for e in chunk], sample_cfg, seed=seed + i)
    s_imgs = np.stack(decode_images(vq, samples, vocab))
    s_prompts = [e.prompt for e in sample_exs]
    s_scenes = world.parse_batch(s_imgs)
    s_pass = np.array([world.passes(s, e.spec) for s, e in zip(s_scenes, sample_exs)])

    specs = {e.prompt: e.spec for e in exs + sample_exs}
    R = {name: load_reward(run_dir, name, device, specs) for name in ("vqa", "clip", "aesthetic", "quality", "geometry", "verifier", "self")}
    prompts = [e.prompt for e in exs]
    held = {}
    for name in ("vqa", "clip", "verifier", "self"):
        held[name] = {"auc_vs_verifier": auc(_score(R[name], imgs, prompts, device), labels)}
    n = len(caps)
    pos, neg = _score(R["clip"], np.concatenate([cap_imgs, cap_imgs]), caps + negs, device).reshape(2, n)
    held["clip"]["caption_vs_hard_negative"] = float((pos > neg).mean())
    aest = _score(R["aesthetic"], cap_imgs, caps, device)
    held["aesthetic"] = {"corr_with_composition": _corr(aest, [composition(s) for s in scenes])}
    held["quality"] = {"auc_clean_vs_degraded": auc(_score(R["quality"], q_imgs, [""] * len(q_imgs), device), q_labels)}
    held["geometry"] = {"auc_clean_vs_malformed": auc(_score(R["geometry"], geo_imgs, [""] * len(geo_imgs), device), geo_labels)}

    on_samples = {"n": n_samples, "verifier_pass_rate": float(s_pass.mean())}
    for name, fn in R.items():
        scores = _score(fn, s_imgs, s_prompts, device)
        on_samples[name] = {"auc_vs_verifier": auc(scores, s_pass), "mean": float(scores.mean())}
        if name == "aesthetic":  # its own target, on the scene the parser reads from each sample
            on_samples[name]["corr_with_composition"] = _corr(scores, [composition(s) for s in s_scenes])
    return {"held_out": held, "samples": on_samples}


def table(cal):
    """The calibration dict as a text table."""
    fmt = lambda v: "  -  " if v is None else f"{v:.3f}"
    s = cal["samples"]
    lines = [f"{'reward':<10}{'held-out renders (dev prompts)':<42}model samples (n={s['n']}, verifier pass {s['verifier_pass_rate']:.3f})",
             f"{'':<10}{'metric':<34}{'value':>8}{'AUC vs verifier':>18}{'mean':>8}   other"]
    for name, figs in cal["held_out"].items():
        for k, (metric, v) in enumerate(figs.items()):
            sam = s[name] if k == 0 else {}
            other = "; ".join(f"{m} {fmt(x)}" for m, x in sam.items() if m not in ("auc_vs_verifier", "mean"))
            lines.append(f"{name if k == 0 else '':<10}{metric:<34}{fmt(v):>8}"
                         + (f"{fmt(sam['auc_vs_verifier']):>18}{fmt(sam['mean']):>8}   {other}" if sam else ""))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Calibration of a run's rewards: held-out renders and the model's own samples.")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the calibration as JSON (report.json's stages.rewards.calibration)")
    p.add_argument("--examples", type=int, default=None, help="held-out renders (default: the run's rewards.calib_examples)")
    p.add_argument("--samples", type=int, default=None, help="model samples (default: the run's rewards.calib_samples)")
    p.add_argument("--seed", type=int, default=None, help="default: the run's train.seed")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        with open(os.path.join(args.run_dir, "config.json")) as f:
            cfg = json.load(f)
        rc = RewardsConfig(**cfg.get("rewards", {}))
        cal = calibrate(args.run_dir, args.device, args.examples or rc.calib_examples, args.samples or rc.calib_samples,
                        cfg["train"]["seed"] if args.seed is None else args.seed)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {args.run_dir} is not a run directory ({e.filename} missing)")
    except (RunError, RewardError) as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps(cal, indent=2) if args.json else table(cal))


if __name__ == "__main__":
    main()
