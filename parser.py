"""
The shapes world's exact parser: any image (a render, a VQ reconstruction, a model's sample) read back into a
Scene by palette quantisation -> connected components -> the nearest prototype shape, measured on the
renderer's own output. The verifier and every benchmark stand on it.

    python -c "import parser, world; s = world.random_scene(__import__('numpy').random.default_rng(0)); \
print(s == parser.parse(world.render(s, 32)))"
"""
from functools import lru_cache

import numpy as np

from world import BACKGROUND, COLOURS, LATTICE, SHAPES, SIZES, Obj, Scene, render

_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)  # (K+1, 3), index 0 = background
_COLOUR_NAMES = tuple(COLOURS)
MIN_AREA_FRACTION = 0.4  # components smaller than this fraction of the smallest object are specks


def _quantise(x):
    """(N, H, W, 3) float 0..255 -> (N, H, W) index of the nearest palette colour, -1 = background.
    A blurred edge pixel goes to whichever of background and object colour it is nearer to, which puts
    the edge of a soft shape where the clean one had it."""
    flat = x.reshape(-1, 3)
    d = (flat**2).sum(1, keepdims=True) - 2 * flat @ _PALETTE.T + (_PALETTE**2).sum(1)  # (N*H*W, K+1)
    return d.argmin(1).reshape(x.shape[:3]) - 1


def _label(col):
    """4-connected components of equal colour (col >= 0), for a whole batch at once. Every pixel starts
    with its own flat index as label; labels flow to the minimum over same-colour neighbours, with
    pointer jumping (a label is a pixel of the same component) so it converges in ~log(diameter) steps."""
    fg = col >= 0
    big = col.size
    lab = np.where(fg, np.arange(big).reshape(col.shape), big)
    same_v = fg[:, 1:] & (col[:, 1:] == col[:, :-1])  # pixel and the one above: same object colour
    same_h = fg[:, :, 1:] & (col[:, :, 1:] == col[:, :, :-1])
    while True:
        new = lab.copy()
        new[:, 1:] = np.where(same_v, np.minimum(new[:, 1:], lab[:, :-1]), new[:, 1:])
        new[:, :-1] = np.where(same_v, np.minimum(new[:, :-1], lab[:, 1:]), new[:, :-1])
        new[:, :, 1:] = np.where(same_h, np.minimum(new[:, :, 1:], lab[:, :, :-1]), new[:, :, 1:])
        new[:, :, :-1] = np.where(same_h, np.minimum(new[:, :, :-1], lab[:, :, 1:]), new[:, :, :-1])
        new = np.append(new.ravel(), big)[new]  # pointer jump; the sentinel keeps background as is
        if np.array_equal(new, lab):
            return lab
        lab = new


def _components(x):
    """Per component: image index, colour, area, centroid and shape features, all vectorised.
    Components are connected regions of non-background pixels, whatever their colour: objects never
    touch (cells keep a gap), while a reconstruction may speckle one object with a neighbouring palette
    colour (yellow/orange), which must not split it. Its colour is the majority of its pixels'."""
    n, h, w, _ = x.shape
    col = _quantise(x)
    lab = _label(np.where(col >= 0, 0, -1))
    roots, comp = np.unique(lab, return_inverse=True)
    comp = comp.reshape(lab.shape)
    n_comp = len(roots) - (roots[-1] == lab.size)  # the sentinel label of the background is last
    img, ys, xs = np.nonzero(comp < n_comp)
    k = comp[img, ys, xs]
    votes = np.zeros((n_comp, len(COLOURS)))
    np.add.at(votes, (k, col[img, ys, xs]), 1)
    area = votes.sum(1)
    y0 = np.full(n_comp, h); y1 = np.zeros(n_comp, int)
    x0 = np.full(n_comp, w); x1 = np.zeros(n_comp, int)
    np.minimum.at(y0, k, ys); np.maximum.at(y1, k, ys)
    np.minimum.at(x0, k, xs); np.maximum.at(x1, k, xs)
    bh, bw = y1 - y0 + 1, x1 - x0 + 1
    v = (ys - y0[k] + 0.5) / bh[k]  # pixel centre relative to its component's bounding box, in [0, 1]
    u = (xs - x0[k] + 0.5) / bw[k]
    side = np.abs(u - 0.5) > 0.25
    frac = lambda m: np.bincount(k, weights=m.astype(np.float64), minlength=n_comp) / area
    # fill ratio (square 1, circle and triangle ~0.7), mass in the top half (triangle ~1/3, others 1/2),
    # mass in the top and in the bottom corners (square both, circle neither, triangle bottom only)
    feats = np.stack([area / (bh * bw), frac(v < 0.5), frac(side & (v < 0.3)), frac(side & (v > 0.7))], 1)
    cy = np.bincount(k, weights=ys + 0.5, minlength=n_comp) / area
    cx = np.bincount(k, weights=xs + 0.5, minlength=n_comp) / area
    return dict(img=roots[:n_comp] // (h * w), colour=votes.argmax(1), area=area, feats=feats, cy=cy, cx=cx)


@lru_cache(maxsize=None)
def _prototypes(image_size):
    """Features and area of every (shape, size) measured on the renderer's own clean output, so the
    parser is exact on clean renders by construction."""
    keys = [(s, z) for s in SHAPES for z in SIZES]
    imgs = np.stack([render(Scene((Obj(s, "red", z, 1, 1),)), image_size) for s, z in keys])
    c = _components(imgs.astype(np.float32))
    assert len(c["area"]) == len(keys), "every prototype render must be one component"
    return keys, c["feats"], c["area"]


def parse_batch(images, chunk=256):
    """Images (N, H, W, 3), uint8 or float in [0, 1] -> list of N Scenes. Works in chunks of images
    to bound the temporaries."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"expected square images (N, H, W, 3), got shape {x.shape}")
    if len(x) > chunk:
        return [s for i in range(0, len(x), chunk) for s in parse_batch(x[i: i + chunk], chunk)]
    x = x.astype(np.float32) * (255.0 if x.dtype.kind == "f" else 1.0)
    n, size = x.shape[0], x.shape[1]
    keys, proto_feats, proto_area = _prototypes(size)
    c = _components(x)
    keep = c["area"] >= MIN_AREA_FRACTION * proto_area.min()
    dist = ((c["feats"][:, None, :] - proto_feats[None]) ** 2).sum(-1)  # (C, shapes*sizes)
    shape_idx = dist.argmin(1) // len(SIZES)
    # size: the nearer (in log area) of the two prototypes of the recognised shape
    areas = proto_area.reshape(len(SHAPES), len(SIZES))[shape_idx]  # (C, 2)
    size_idx = np.abs(np.log(c["area"][:, None] / areas)).argmin(1)
    unit = size / LATTICE  # centroid -> cell on the layout lattice
    rows = np.clip(((c["cy"] / unit - 1) // 2).astype(int), 0, 2)
    cols = np.clip(((c["cx"] / unit - 1) // 2).astype(int), 0, 2)
    objs = [[] for _ in range(n)]
    for k in np.nonzero(keep)[0]:
        objs[c["img"][k]].append(Obj(SHAPES[shape_idx[k]], _COLOUR_NAMES[c["colour"][k]],
                                     SIZES[size_idx[k]], int(rows[k]), int(cols[k])))
    return [Scene(tuple(o)) for o in objs]


def palette_map(images):
    """Images (N, H, W, 3), uint8 or float in [0, 1] -> (N, H, W) nearest palette colour index into
    COLOURS' order, -1 = background: the parser's first step, public for pixel-level scores."""
    x = np.asarray(images)
    return _quantise(x.astype(np.float32) * (255.0 if x.dtype.kind == "f" else 1.0))


def parse(image):
    """One image (H, W, 3), uint8 or float in [0, 1] -> Scene."""
    return parse_batch(np.asarray(image)[None])[0]
