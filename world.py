"""
The shapes world, the embedded default: scenes, rendering, prompts in many phrasings,
reasoning plans and captions, and the train / dev / bench split of prompts. Imports nothing from the project.

    python data.py --show 16          # writes out/world_samples.png: random examples with prompt and plan

A scene is 1-4 objects (shape, colour, size) on a 3x3 grid of layout cells, at most one per cell. Prompts
are written from a scene ("scene first"), so the scene attached to an example satisfies its spec by
construction; parser.py reads any image back into a scene, which makes every benchmark exact.
"""
import hashlib
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# World constants: the one place that defines the world

SHAPES = ("circle", "square", "triangle")  # the triangle points up
COLOURS = {  # name -> RGB; dict order is the canonical colour order
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 30),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "purple": (150, 60, 190),
}
BACKGROUND = (255, 255, 255)
SIZES = ("small", "large")
# The layout lives on an 8 x 8 lattice of "units" (4 px at 32, 8 px at 64): a one-unit margin, then the
# 3 x 3 cells, two units each. Objects are centred in their cell: large 1.5 units wide, small 1 unit.
# Why a lattice: the default VQ codes one unit square per token, so an object always falls on the same
# 2 x 2 codes of its cell, whichever cell it is in. That keeps the image tokenizer nearly lossless and
# the drawing learnable on a CPU budget (free placement makes the VQ round trip lossy).
LATTICE = 8
SIZE_UNITS = {"small": 1.0, "large": 1.5}  # 4 and 6 px at 32: large neighbours keep a 2 px gap
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
CELLS = tuple(f"{r}-{c}" for r in ROWS for c in COLS)  # one plan word per cell, "top-left" .. "bottom-right"
RELATIONS = ("left of", "right of", "above", "below")
MAX_OBJECTS = 4

# -----------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    row: int  # 0..2, top to bottom
    col: int  # 0..2, left to right


@dataclass(frozen=True)
class Scene:
    objects: tuple  # of Obj, always in canonical order (row, col) so that equal scenes compare equal

    def __post_init__(self):
        key = lambda o: (o.row, o.col, o.shape, o.colour, o.size)  # ties only in parsed, ill-formed images
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=key)))


def object_extent(size, image_size):
    return round(image_size / LATTICE * SIZE_UNITS[size])


def _random_obj(rng, cell, shape=None, colour=None, size=None):
    pick = lambda seq: seq[rng.integers(len(seq))]
    return Obj(shape or pick(SHAPES), colour or pick(tuple(COLOURS)), size or pick(SIZES), *cell)


def _cells(rng, n):
    return [divmod(int(c), 3) for c in rng.choice(9, size=n, replace=False)]


def random_scene(rng, n=None):
    """n (default 1..4) objects with random attributes in distinct random cells."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n is None else n
    return Scene(tuple(_random_obj(rng, cell) for cell in _cells(rng, n)))


# -----------------------------------------------------------------------------
# Rendering


def object_box(o, image_size):
    """Pixel box (x0, y0, x1, y1), corners included, of an object centred in its cell. The top-left corner
    is an integer, so the mask does not depend on the cell."""
    e = object_extent(o.size, image_size)
    unit = image_size // LATTICE
    x0 = unit * (1 + 2 * o.col) + (2 * unit - e) // 2
    y0 = unit * (1 + 2 * o.row) + (2 * unit - e) // 2
    return x0, y0, x0 + e - 1, y0 + e - 1


def draw_shape(draw, shape, box, fill):
    """One shape filling the box (x0, y0, x1, y1) on a PIL ImageDraw."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        # apex one pixel wide for odd widths, two for even ones, so the triangle is symmetric
        w = x1 - x0 + 1
        draw.polygon([(x0, y1), (x1, y1), (x0 + w // 2, y0), (x0 + (w - 1) // 2, y0)], fill=fill)


def render(scene, image_size=32):
    """Scene -> uint8 (H, W, 3). Every object is centred in its cell; no anti-aliasing, so every pixel
    is a palette colour and the same (shape, size) always gives the same pixel mask."""
    if image_size % (2 * LATTICE):
        raise ValueError(f"image_size must be a multiple of {2 * LATTICE} (the layout lattice), got {image_size}")
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        draw_shape(draw, o.shape, object_box(o, image_size), COLOURS[o.colour])
    return np.asarray(img, dtype=np.uint8)


# -----------------------------------------------------------------------------
# Specs and the checker


@dataclass(frozen=True)
class Req:
    """Exactly `count` objects of the scene match every attribute that is not None."""
    shape: str = None
    colour: str = None
    size: str = None
    count: int = 1
    row: int = None
    col: int = None

    def describe(self):
        region = [] if self.row is None else [ROWS[self.row], COLS[self.col]]
        words = [self.size, self.colour, self.shape or "object"] + region
        return " ".join(w for w in words if w)


@dataclass(frozen=True)
class Spec:
    reqs: tuple  # of Req, with distinct descriptions (they name the clauses)
    relations: tuple = ()  # of (i, rel, j): the object of reqs[i] is `rel` the object of reqs[j]
    total: int = 1  # exact number of objects in the scene


def _matching(scene, req):
    attrs = ("shape", "colour", "size", "row", "col")
    return [o for o in scene.objects if all(getattr(req, a) in (None, getattr(o, a)) for a in attrs)]


def holds(a, rel, b):
    # judged on cells: cells are a third of the image apart, so this is GenEval's
    # "centres differ by more than a margin" rule in this world
    return {"left of": a.col < b.col, "right of": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[rel]


def check(scene, spec):
    """Named clauses of the spec -> whether the scene satisfies them. Counts are exact (N+1 fails)."""
    out = {f"count:{r.describe()}": len(_matching(scene, r)) == r.count for r in spec.reqs}
    for i, rel, j in spec.relations:
        a, b = _matching(scene, spec.reqs[i]), _matching(scene, spec.reqs[j])
        out[f"relation:{i} {rel} {j}"] = len(a) == 1 and len(b) == 1 and holds(a[0], rel, b[0])
    out["total"] = len(scene.objects) == spec.total
    return out


def passes(scene, spec):
    return all(check(scene, spec).values())


def clause_share(scene, spec):
    """The share of the spec's clauses the scene satisfies: 1.0 exactly when it passes, graded below (the
    exact verifier's score, so that it still ranks dense samples, which almost never pass outright)."""
    return float(np.mean(list(check(scene, spec).values())))


TAIL = (("red", "triangle"), ("blue", "circle"), ("green", "square"))  # compositions the generator's pairs rarely show


def compositions(spec):
    """The colour-shape pairs a spec names, as "red triangle" strings, sorted."""
    return tuple(sorted({f"{r.colour} {r.shape}" for r in spec.reqs if r.colour and r.shape}))


def is_tail(spec):
    return any(c in {f"{a} {b}" for a, b in TAIL} for c in compositions(spec))


# -----------------------------------------------------------------------------
# Words. Every word a generator can write lives in these constants (the tokenizer corpus lists them).

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
WRAPPERS = ("{x}", "a picture of {x}", "a drawing of {x}", "an image of {x}", "an image with {x}",
            "draw {x}", "please draw {x}", "show me {x}", "paint {x}", "render {x}", "generate {x}",
            "make a picture of {x}", "there is {x}", "i want {x}")
SUFFIXES = ("", " on a white background", " on a plain white background", " in the picture")
REL_WORDS = {"left of": ("to the left of", "on the left of", "left of"),
             "right of": ("to the right of", "on the right of", "right of"),
             "above": ("above", "over"), "below": ("below", "under", "beneath")}
COLOUR_TEMPLATES = ("a {s} that is {c}", "a {c} coloured {s}", "a {s} painted {c}", "a {s} in {c}",
                    "a {s} coloured {c}", "a {s} whose colour is {c}", "a {s} with the color {c}",
                    "a {c} colored {s}")
KNOWN_COLOURS = {"green": ("grass", "a leaf", "a frog"), "blue": ("the sky", "the ocean"),
                 "yellow": ("a banana", "a lemon", "the sun"), "red": ("a tomato", "a strawberry", "a cherry"),
                 "orange": ("a carrot", "a pumpkin"), "purple": ("a grape", "a plum", "an eggplant")}
KNOWN_COLOUR_TEMPLATES = ("a {s} the colour of {t}", "a {s} with the colour of {t}", "a {s} coloured like {t}")
KNOWN_SHAPES = {"circle": ("a {c} round shape", "a {c} shape with no corners"),
                "square": ("a {c} shape with four equal sides", "a {c} shape with four corners"),
                "triangle": ("a {c} shape with three corners", "a {c} shape with three sides")}
KNOWN_COUNTS = {2: ("one plus one {p}", "three minus one {p}", "four minus two {p}", "a pair of {p}"),
                3: ("one plus two {p}", "two plus one {p}", "four minus one {p}",
                    "as many {p} as a triangle has corners", "as many {p} as a triangle has sides"),
                4: ("two plus two {p}", "one plus three {p}", "three plus one {p}", "two times two {p}",
                    "two pairs of {p}", "as many {p} as a square has sides",
                    "as many {p} as a square has corners")}
COMPARATIVES = {"large": ("bigger than", "larger than"), "small": ("smaller than",)}
COMPARATIVE_TEMPLATES = ("a {a} {cmp} a {b}", "a {a} that is {cmp} a {b}")
RELATION_SENTENCE = "the {a} is {rel} the {b}"
SINGLE_SIZED = 0.4  # share of single-object prompts that name the size ("a small red circle")
EMPTY = "an empty white image"


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _an(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _np(o, size=False, rng=None):
    """'a red circle' / 'a big red circle'."""
    words = ([_pick(rng, SIZE_WORDS[o.size]) if rng else o.size] if size else []) + [o.colour, o.shape]
    return _an(" ".join(words))


def region(row, col):
    """A layout cell in words: "in the center", "at the top left"."""
    if (row, col) == (1, 1):
        return "in the center"
    return f"at the {ROWS[row]} {COLS[col]}"


def _wrap(rng, core):
    return _pick(rng, WRAPPERS).format(x=core) + _pick(rng, SUFFIXES) + _pick(rng, ("", "."))


@dataclass(frozen=True)
class Example:
    prompt: str
    category: str
    spec: Spec
    scene: Scene  # a scene satisfying spec; attributes the prompt leaves open are random
    kind: str = None  # sub-kind of a knowledge prompt: colour, number, shape or comparative (None otherwise)


def _scene(rng, n, distinct_shapes=False, shape=None, colour=None):
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))] if distinct_shapes else [shape] * n
    return Scene(tuple(_random_obj(rng, cell, shapes[i], colour) for i, cell in enumerate(_cells(rng, n))))


def _distinct_pairs(rng, n):
    """n objects in distinct cells with distinct (colour, shape), so 'the red circle' is unique."""
    while True:
        s = random_scene(rng, n)
        if len({(o.colour, o.shape) for o in s.objects}) == n:
            return s


def gen_single_object(rng, kind=None):
    """kind "sized" always names the size (PRETRAIN_MIX); None, as benchmark and dev prompts are drawn, names it
    SINGLE_SIZED of the time, drawing its random numbers as it always has (the benchmark's prompts stay the same)."""
    o = random_scene(rng, 1).objects[0]
    sized = kind == "sized" or rng.random() < SINGLE_SIZED
    spec = Spec((Req(o.shape, o.colour, o.size if sized else None),), total=1)
    return Example(_wrap(rng, _np(o, sized, rng)), "single_object", spec, Scene((o,)))


def gen_two_objects(rng):
    s = _scene(rng, 2, distinct_shapes=True)
    a, b = rng.permutation(len(s.objects))
    core = f"{_an(s.objects[a].shape)} and {_an(s.objects[b].shape)}"
    spec = Spec(tuple(Req(s.objects[i].shape) for i in (a, b)), total=2)
    return Example(_wrap(rng, core), "two_objects", spec, s)


def _counted(rng, n):
    shape = _pick(rng, SHAPES)
    colour = _pick(rng, tuple(COLOURS)) if rng.random() < 0.4 else None
    s = _scene(rng, n, shape=shape, colour=colour)
    plural = " ".join(w for w in (colour, shape + "s") if w)
    return s, plural, Spec((Req(shape, colour, count=n),), total=n)


def gen_counting(rng):
    n = int(rng.integers(2, MAX_OBJECTS + 1))
    s, plural, spec = _counted(rng, n)
    return Example(_wrap(rng, f"{NUMBER_WORDS[n]} {plural}"), "counting", spec, s)


def gen_colors(rng):
    o = random_scene(rng, 1).objects[0]
    core = _pick(rng, COLOUR_TEMPLATES).format(s=o.shape, c=o.colour)
    return Example(_wrap(rng, core), "colors", Spec((Req(o.shape, o.colour),), total=1), Scene((o,)))


def _relation(rng, a, b):
    return _pick(rng, [r for r in RELATIONS if holds(a, r, b)])


def gen_position(rng):
    s = _distinct_pairs(rng, 2)
    a, b = (s.objects[i] for i in rng.permutation(2))
    rel = _relation(rng, a, b)
    core = f"{_np(a)} {_pick(rng, REL_WORDS[rel])} {_np(b)}"
    spec = Spec((Req(a.shape, a.colour), Req(b.shape, b.colour)), ((0, rel, 1),), total=2)
    return Example(_wrap(rng, core), "position", spec, s)


def gen_color_attr(rng):
    while True:
        s = _scene(rng, 2, distinct_shapes=True)
        if s.objects[0].colour != s.objects[1].colour:
            break
    a, b = (s.objects[i] for i in rng.permutation(2))
    spec = Spec((Req(a.shape, a.colour), Req(b.shape, b.colour)), total=2)
    return Example(_wrap(rng, f"{_np(a)} and {_np(b)}"), "color_attr", spec, s)


def gen_dense(rng):
    s = _distinct_pairs(rng, int(rng.integers(3, MAX_OBJECTS + 1)))
    objs = [s.objects[i] for i in rng.permutation(len(s.objects))]
    parts = [f"{_np(o, True, rng)} {region(o.row, o.col)}" for o in objs]
    text = _wrap(rng, ", ".join(parts[:-1]) + " and " + parts[-1]).rstrip(".")
    relations, sentences = [], []
    for _ in range(int(rng.integers(1, 3))):
        i, j = (int(v) for v in rng.choice(len(objs), 2, replace=False))
        rel = _relation(rng, objs[i], objs[j])
        if (i, rel, j) not in relations:
            relations.append((i, rel, j))
            sentences.append(RELATION_SENTENCE.format(a=f"{objs[i].colour} {objs[i].shape}",
                                                      rel=_pick(rng, REL_WORDS[rel]),
                                                      b=f"{objs[j].colour} {objs[j].shape}"))
    spec = Spec(tuple(Req(o.shape, o.colour, o.size, 1, o.row, o.col) for o in objs), tuple(relations), len(objs))
    return Example(text + ". " + ". ".join(sentences) + ".", "dense", spec, s)


def gen_knowledge(rng, kind=None):
    kind = kind or _pick(rng, KNOWLEDGE_KINDS)
    if kind == "number":
        n = int(rng.integers(2, MAX_OBJECTS + 1))
        s, plural, spec = _counted(rng, n)
        core = _pick(rng, KNOWN_COUNTS[n]).format(p=plural)
    elif kind == "comparative":
        s = _scene(rng, 2, distinct_shapes=True)
        a, b = (s.objects[i] for i in rng.permutation(2))
        big = _pick(rng, SIZES)
        small = "small" if big == "large" else "large"
        s = Scene((Obj(a.shape, a.colour, big, a.row, a.col), Obj(b.shape, b.colour, small, b.row, b.col)))
        core = _pick(rng, COMPARATIVE_TEMPLATES).format(a=f"{a.colour} {a.shape}", b=f"{b.colour} {b.shape}",
                                                        cmp=_pick(rng, COMPARATIVES[big]))
        spec = Spec((Req(a.shape, a.colour, big), Req(b.shape, b.colour, small)), total=2)
    else:
        o = random_scene(rng, 1).objects[0]
        s, spec = Scene((o,)), Spec((Req(o.shape, o.colour),), total=1)
        if kind == "colour":
            core = _pick(rng, KNOWN_COLOUR_TEMPLATES).format(s=o.shape, t=_pick(rng, KNOWN_COLOURS[o.colour]))
        else:
            core = _pick(rng, KNOWN_SHAPES[o.shape]).format(c=o.colour)
    return Example(_wrap(rng, core), "knowledge", spec, s, kind)


GENERATORS = {"single_object": gen_single_object, "two_objects": gen_two_objects, "counting": gen_counting,
              "colors": gen_colors, "position": gen_position, "color_attr": gen_color_attr,
              "dense": gen_dense, "knowledge": gen_knowledge}
CATEGORIES = tuple(GENERATORS)
KNOWLEDGE_KINDS = ("colour", "number", "shape", "comparative")
# pretraining mix over (category, kind), weighted by what is hard to learn: one-object prompts are easy and
# have few distinct scenes; single objects that always name their size ("sized", pretraining only) teach the
# plan to copy a size the prompt names; comparatives get their sizes from "bigger than" and are learnt last;
# colour and shape knowledge are easy; dense layouts need the most steps to bind each object's region and size.
# Pretraining draws from this mix, and so do the reward heads' training prompts and `broad` post-training;
# benchmark and dev prompts are drawn per category with the kinds uniform (measurements: docs/results.md).
PRETRAIN_MIX = {("single_object", None): 1, ("single_object", "sized"): 1, ("two_objects", None): 1,
                ("counting", None): 2, ("colors", None): 1, ("position", None): 2, ("color_attr", None): 1.5,
                ("dense", None): 4,
                ("knowledge", "colour"): 0.125, ("knowledge", "shape"): 0.125,
                ("knowledge", "number"): 0.75, ("knowledge", "comparative"): 1.5}


# -----------------------------------------------------------------------------
# Splits by content: what a benchmark or dev prompt asks for never appears in training, in any wording.
# The long tail: compositions the generator's text-image pairs show rarely (train.tail_keep), while the VQ
# and the reward models learn from the whole world, as a real tokenizer and VQAScore model see broad data.


def spec_key(spec):
    """A canonical string of what a spec asks: the same for every wording and every order of its clauses
    ("a circle left of a square" and "a square to the right of a circle" give one key)."""
    flip = {"right of": "left of", "below": "above"}
    rels = [(j, flip[r], i) if r in flip else (i, r, j) for i, r, j in spec.relations]
    order = sorted(range(len(spec.reqs)), key=lambda i: repr(spec.reqs[i]))
    new = {old: k for k, old in enumerate(order)}
    reqs = [spec.reqs[i] for i in order]
    rels = sorted((new[i], r, new[j]) for i, r, j in rels)
    return f"{reqs!r} {rels!r} total={spec.total}"


SPLIT_SALT = "nanoloom-split-1082"  # the first salt giving every category seen and tail specs on dev and bench


def split_of(spec):
    """train / dev / bench by a hash of spec_key."""
    return split_by_key(spec_key(spec))


def split_by_key(key):
    """train / dev / bench by a hash of a string: stable across runs and machines (hashlib, not the salted
    hash()). A tenth of the keys are dev, 15% bench."""
    h = int.from_bytes(hashlib.sha256((SPLIT_SALT + key).encode()).digest()[:8], "big") % 100
    return "bench" if h < 15 else "dev" if h < 25 else "train"


def shows_tail(scene):
    """Whether a scene holds an object of a tail composition (the generator's pairs keep it rarely)."""
    return any((o.colour, o.shape) in TAIL for o in scene.objects)


def sample_example(rng, category=None, split="train", kind=None, tail_keep=1.0, composition=None):
    """A random Example whose spec falls in `split`; category None draws from PRETRAIN_MIX; kind picks
    one kind of knowledge prompt (KNOWLEDGE_KINDS), or "sized" single objects. tail_keep < 1: an example
    whose scene shows a tail composition is kept with that probability (the generator's text-image pairs);
    composition ("red triangle"): only examples whose spec names it."""
    assert split in ("train", "dev", "bench"), split
    mix = list(PRETRAIN_MIX)
    p = np.array([PRETRAIN_MIX[m] for m in mix], dtype=float)
    p /= p.sum()
    for attempt in range(20_000):
        if attempt % 500 == 0:  # a category of the mix, kept while it is rejected for the split (so the mix's
            #                     shares stay exact), drawn again if it cannot name `composition`
            cat, k = (category, kind) if category else mix[rng.choice(len(mix), p=p)]
        ex = GENERATORS[cat](rng, k) if k else GENERATORS[cat](rng)
        if composition is not None and composition not in compositions(ex.spec):
            continue
        if tail_keep < 1 and shows_tail(ex.scene) and rng.random() >= tail_keep:
            continue
        if split_of(ex.spec) == split:
            return ex
    raise RuntimeError(f"no {split} prompt found for category {category}"
                       + (f" naming {composition}" if composition else ""))


def distinct_examples(draw, n, tries, exclude=()):
    """Up to n Examples with distinct prompts, none in `exclude`, from at most `tries` calls of draw(found),
    where found is how many were kept so far (to cycle categories). Fewer than n when the world runs out of
    phrasings: each caller decides whether that is an error."""
    seen, out = set(exclude), []
    for _ in range(tries):
        ex = draw(len(out))
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
            if len(out) == n:
                break
    return out


# -----------------------------------------------------------------------------
# Reasoning plan and caption


def plan_order(scene, spec):
    """The scene's objects in the order the prompt mentions them (the matches of each requirement in
    cell order), then any others. Planning in the prompt's order makes the plan a restatement of the
    prompt with every open attribute resolved, which a small model learns far faster than a re-sort."""
    out = []
    for req in spec.reqs:
        out += [o for o in _matching(scene, req) if o not in out]
    return out + [o for o in scene.objects if o not in out]


def plan_text(scene, spec=None):
    """'two top-left red circle large ; middle-center blue square small': how many objects, then every object
    with every attribute, in the prompt's order when its spec is given, else in cell order. The count comes
    first so that a prompt like "as many circles as a triangle has corners" is resolved in one word, and the
    objects are then written against it as for "three circles". The cell is one word and comes first in its
    object: the words after it are tagged with that cell's region (data.Tagger), as are the image tokens
    drawn inside the cell, so an image token finds its colour and shape by matching its own region's tag."""
    if not scene.objects:
        return EMPTY
    objs = scene.objects if spec is None else plan_order(scene, spec)
    return f"{NUMBER_WORDS[len(objs)]} " + " ; ".join(f"{CELLS[3 * o.row + o.col]} {o.colour} {o.shape} {o.size}"
                                                      for o in objs)


def parse_plan(text):
    """Plan text -> Scene, or None if it is malformed (bad word, wrong length, a count that is not the number
    of objects, two objects in a cell)."""
    if text.strip() == EMPTY:
        return Scene(())
    count, _, text = text.strip().partition(" ")
    objs = []
    for part in text.split(";"):
        w = part.split()
        if len(w) != 4 or w[0] not in CELLS or w[1] not in COLOURS or w[2] not in SHAPES or w[3] not in SIZES:
            return None
        objs.append(Obj(w[2], w[1], w[3], *divmod(CELLS.index(w[0]), 3)))
    if len({(o.row, o.col) for o in objs}) != len(objs) or len(objs) > MAX_OBJECTS or count != NUMBER_WORDS[len(objs)]:
        return None
    return Scene(tuple(objs))


def caption_text(scene, rng=None):
    """A full description (every attribute of every object). Without rng: one fixed phrasing, in
    canonical order; with rng: random size synonyms, object order and opening."""
    if not scene.objects:
        return EMPTY
    objs = list(scene.objects)
    if rng is not None:
        objs = [objs[i] for i in rng.permutation(len(objs))]
    parts = [f"{_np(o, True, rng)} {region(o.row, o.col)}" for o in objs]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text if rng is None else _pick(rng, ("", "there is ", "an image of ", "a picture of ")) + text


def _vocab_lines():
    """Every constant that holds words, so a rare word is never missing from the vocabulary."""
    strip = lambda t: re.sub(r"\{\w+\}", " ", t)
    yield " ".join((*SHAPES, *(s + "s" for s in SHAPES), *COLOURS, *SIZES, *ROWS, *COLS, *CELLS, *NUMBER_WORDS))
    yield from (strip(t) for t in (*WRAPPERS, *SUFFIXES, *COLOUR_TEMPLATES, *KNOWN_COLOUR_TEMPLATES,
                                   *COMPARATIVE_TEMPLATES, RELATION_SENTENCE, EMPTY, "a an and , . ;"))
    for table in (SIZE_WORDS, REL_WORDS, KNOWN_COLOURS, KNOWN_SHAPES, KNOWN_COUNTS, COMPARATIVES):
        yield from (strip(t) for v in table.values() for t in v)
    yield " ".join(region(r, c) for r in range(3) for c in range(3))


def world_corpus(n=2000, seed=0):
    """Word lists, then n examples of every category: prompt, plan and caption."""
    rng = np.random.default_rng(seed)
    yield from _vocab_lines()
    for _ in range(n):
        for gen in GENERATORS.values():
            ex = gen(rng)
            yield ex.prompt
            yield plan_text(ex.scene)
            yield caption_text(ex.scene, rng)


def show(n, image_size, seed, out):
    """A grid of random examples: the image (upscaled) beside its prompt and plan."""
    from PIL import ImageFont
    import textwrap
    rng = np.random.default_rng(seed)
    scale, width, line = 96, 560, 11
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (width, n * (scale + 8)), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        ex = sample_example(rng, CATEGORIES[i % len(CATEGORIES)])
        img = Image.fromarray(render(ex.scene, image_size)).resize((scale, scale), Image.NEAREST)
        y = i * (scale + 8) + 4
        sheet.paste(img, (4, y))
        label = f"[{ex.category}{'/' + ex.kind if ex.kind else ''}] {ex.prompt}"
        lines = textwrap.wrap(label, 72) + textwrap.wrap("plan: " + plan_text(ex.scene, ex.spec), 72)
        for k, text in enumerate(lines[: scale // line]):
            draw.text((scale + 12, y + k * line), text, fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    sheet.save(out)
    print(f"wrote {n} examples to {out}")
