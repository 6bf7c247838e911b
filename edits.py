"""
What the reward heads (heads.py) learn to tell apart, made from the shapes world: a scene with one thing changed
(perturb), a render with one object malformed, an image degraded (noise, blur, blocking, colour bleeding, a VQ
round trip with wrong codes), and the composition rating the aesthetic head regresses.

    python -m pytest -q tests/test_rewards.py
"""
import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import world

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
        objs[i], objs[j] = (dataclasses.replace(objs[i], colour=objs[j].colour),
                            dataclasses.replace(objs[j], colour=objs[i].colour))
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
        pts = {"square": [(x0, y0), (x1, y0), (x1, y1), (x0, y1)],
               "triangle": [(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)],
               "circle": [(x0 + e / 2, y0), (x1, y0 + e / 2), (x0 + e / 2, y1), (x0, y0 + e / 2)]}[o.shape]
        v = int(rng.integers(len(pts)))
        pts[v] = (pts[v][0] + d * rng.choice([-1, 1]), pts[v][1] + d * rng.choice([-1, 1]))
        draw.polygon(pts, fill=fill)
    elif kind == "cut":
        c = int(rng.integers(1, e - 1)) if e > 2 else 1
        draw.line([x0 + c, y0 - 1, x0 + c, y1 + 1] if rng.random() < 0.5 else [x0 - 1, y0 + c, x1 + 1, y0 + c],
                  fill=world.BACKGROUND)
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
    cy, cx = ((np.array([o.row for o in objs]) * w).sum() / w.sum(),
              (np.array([o.col for o in objs]) * w).sum() / w.sum())
    balance = 1 - math.hypot(cy - 1, cx - 1) / math.sqrt(2)
    pairs = [(a, b) for k, a in enumerate(objs) for b in objs[k + 1:]]
    spacing = np.mean([max(abs(a.row - b.row), abs(a.col - b.col)) > 1 for a, b in pairs]) if pairs else 1.0
    margins = np.mean([(o.row, o.col) not in ((0, 0), (0, 2), (2, 0), (2, 2)) for o in objs])
    warm = np.mean([o.colour in WARM for o in objs])
    return float(np.mean([balance, spacing, margins, max(warm, 1 - warm)]))
