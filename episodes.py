"""
Interleaved episodes of the shapes world: several steps, each an instruction and the image that results, then a
question about one of the images answered in text. The first instruction describes a scene; each later one edits
the scene before it: add an object, recolour one, remove one, move one. Scenes are world.Scene, drawn by
world.render and read back by parser.parse, so every image of an episode is checked exactly.

The token sequence of an episode (k = gpt.ctx_tokens resampler placeholders after each image, none when 0):

    <bos> instr <think> plan <boi> c1 .. cN <eoi> [k slots] instr <think> plan <boi> .. <eoi> [k slots] ..
          question <think> answer <eos>

Once a step's image closes, what follows it never sees that step's text (instruction and plan: a plan describes
its image in words and would make the image itself unnecessary) and, when k > 0, nor its image: a closed image
then reaches the rest of the sequence only through its k resampler tokens (and the synchronizer, mmfs.py).
`context_layout` says which key each position may see; the GPT gets it as a model.ImageContext.

Instructions use only words of the world's vocabulary (world.world_corpus), so any shapes-world run's tokenizer
reads them and a trained run can be continued on episodes.

    python interleaved.py --show 3     # out/episodes.png: random episodes, one row of images each
"""
from dataclasses import dataclass

import numpy as np
import torch

import world
from data import BOI, BOS, EOI, EOS, IMAGE, PAD, TEXT, THINK, Batch, collate, encode_text, vq_codes
from model import NEVER, ImageContext
from world import COLOURS, MAX_OBJECTS, NUMBER_WORDS, SHAPES, SIZES, Obj, Scene

EDITS = ("add", "recolour", "remove", "move")
QUESTIONS = ("colour", "shape")


class EpisodeError(ValueError):
    """An instruction or an episode that cannot be carried out (named, never skipped)."""


@dataclass(frozen=True)
class Edit:
    kind: str  # one of EDITS
    target: Obj = None  # the object the edit changes (recolour, remove, move); None for add
    obj: Obj = None  # the object after the edit (add, recolour, move); None for remove


@dataclass(frozen=True)
class Step:
    instruction: str
    scene: Scene  # the scene after the step: its image is world.render(scene)
    edit: Edit = None  # None for the first step, which draws its scene from nothing


@dataclass(frozen=True)
class Question:
    text: str
    answer: str  # one word
    image: int  # which image (0-based) it asks about


@dataclass(frozen=True)
class Episode:
    steps: tuple  # of Step
    question: Question  # about one of its images, asked after the last


# -----------------------------------------------------------------------------
# edits and instructions


def refer(scene, o, use_colour=True):
    """The shortest words that pick object o out of the scene: its shape, else its colour and shape, else its
    shape and region (cells hold one object each)."""
    same_shape = [p for p in scene.objects if p.shape == o.shape]
    if len(same_shape) == 1:
        return o.shape
    if use_colour and sum(p.colour == o.colour for p in same_shape) == 1:
        return f"{o.colour} {o.shape}"
    return f"{o.shape} {world.region(o.row, o.col)}"


def apply_edit(scene, edit):
    """The scene after the edit. An edit whose target the scene lacks, that puts an object in a taken cell or
    past MAX_OBJECTS, or that changes nothing is an EpisodeError that says which."""
    if edit.kind not in EDITS:
        raise EpisodeError(f"unknown edit {edit.kind!r}: expected one of {', '.join(EDITS)}")
    objs = list(scene.objects)
    if edit.kind != "add":
        if edit.target not in objs:
            have = "; ".join(f"{o.colour} {o.shape} {world.region(o.row, o.col)}" for o in objs) or "nothing"
            raise EpisodeError(f"the {edit.kind} edit names a {edit.target.colour} {edit.target.shape} "
                               f"{world.region(edit.target.row, edit.target.col)} that the scene lacks (it holds: {have})")
        objs.remove(edit.target)
    if edit.obj is not None:
        if edit.obj == edit.target:
            raise EpisodeError(f"the {edit.kind} edit changes nothing in {edit.target}")
        if any((o.row, o.col) == (edit.obj.row, edit.obj.col) for o in objs):
            raise EpisodeError(f"the {edit.kind} edit puts an object {world.region(edit.obj.row, edit.obj.col)}, "
                               "where the scene already has one")
        if len(objs) >= MAX_OBJECTS:
            raise EpisodeError(f"the add edit would make {len(objs) + 1} objects (at most {MAX_OBJECTS})")
        objs.append(edit.obj)
    return Scene(tuple(objs))


def instruction(scene, edit):
    """The words of an edit of `scene`: 'and a small blue square at the top left', 'make the triangle yellow',
    'there is no red circle', 'the square is in the center'."""
    if edit.kind == "add":
        o = edit.obj
        return f"and a {o.size} {o.colour} {o.shape} {world.region(o.row, o.col)}"
    if edit.target not in scene.objects:  # the same check as apply_edit, before any words are made
        apply_edit(scene, edit)
    ref = refer(scene, edit.target, use_colour=edit.kind != "recolour")
    if edit.kind == "recolour":
        return f"make the {ref} {edit.obj.colour}"
    if edit.kind == "remove":
        return f"there is no {ref}"
    return f"the {ref} is {world.region(edit.obj.row, edit.obj.col)}"


def random_edit(rng, scene):
    """One edit that applies to the scene, its kind uniform over those possible."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]
    free = [divmod(c, 3) for c in range(9) if all((o.row, o.col) != divmod(c, 3) for o in scene.objects)]
    kinds = [k for k in EDITS if (k == "add" and len(scene.objects) < MAX_OBJECTS)
             or (k == "remove" and len(scene.objects) > 1) or k in ("recolour", "move")]
    kind = pick(kinds)
    if kind == "add":
        return Edit("add", obj=Obj(pick(SHAPES), pick(tuple(COLOURS)), pick(SIZES), *pick(free)))
    o = pick(scene.objects)
    if kind == "remove":
        return Edit("remove", target=o)
    if kind == "recolour":
        return Edit("recolour", o, Obj(o.shape, pick([c for c in COLOURS if c != o.colour]), o.size, o.row, o.col))
    return Edit("move", o, Obj(o.shape, o.colour, o.size, *pick(free)))


def ask(rng, ep_scenes, image):
    """A question about image `image` (0-based) of scenes: the colour of an object named by its shape (and region
    when the shape is not unique), or the shape of the object in a region."""
    scene = ep_scenes[image]
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    where = f"in picture {NUMBER_WORDS[image + 1]}"
    if QUESTIONS[int(rng.integers(len(QUESTIONS)))] == "colour":
        return Question(f"the colour of the {refer(scene, o, use_colour=False)} {where}", o.colour, image)
    return Question(f"the shape {world.region(o.row, o.col)} {where}", o.shape, image)


def random_episode(rng, n_images):
    """n_images steps (a described scene, then random edits) and a question about a random image."""
    scene = world.random_scene(rng)
    steps = [Step(world.caption_text(scene, rng), scene)]
    for _ in range(n_images - 1):
        edit = random_edit(rng, scene)
        steps.append(Step(instruction(scene, edit), apply_edit(scene, edit), edit))
        scene = steps[-1].scene
    return Episode(tuple(steps), ask(rng, [s.scene for s in steps], int(rng.integers(n_images))))


def split_of(ep):
    """train / dev / bench by a hash of what the episode shows and asks (its scenes, edits and question), in the
    proportions of world.split_of: stable across runs and machines."""
    key = repr(([(s.scene, s.edit) for s in ep.steps], (ep.question.image, ep.question.text)))
    return world.split_by_key(key)


def sample_episodes(n, seed, split, max_images=MAX_OBJECTS, n_images=None, tail_keep=1.0):
    """n episodes of `split`, of n_images images each (default: uniform in 1..max_images). tail_keep < 1: an episode
    with a long-tail composition (world.TAIL) in any image is kept with that probability, as the generator's pairs
    are (train.tail_keep): episodes must not show the GPT what its pairs hide."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        ep = random_episode(rng, n_images or int(rng.integers(1, max_images + 1)))
        if tail_keep < 1 and any(world.shows_tail(s.scene) for s in ep.steps) and rng.random() >= tail_keep:
            continue
        if split_of(ep) == split:
            out.append(ep)
    return out


# -----------------------------------------------------------------------------
# token sequences


def episode_sequence(ep, tokenizer, vocab, codes, ctx_tokens, block_size, upto=None):
    """One episode -> (ids, modality, target) as data.build_sequence returns them. codes: each step's image codes.
    upto=s: only the first s steps, then step s+1's instruction and <think> (s = len(steps): then the question
    and <think>): a prompt for the model to continue. Every token is learned but the resampler placeholders.
    A sequence longer than block_size is an EpisodeError naming both sizes."""
    enc = lambda s: encode_text(tokenizer, s)
    ids, mod, tgt = [BOS], [TEXT], [0]

    def add(tokens, m, t):
        ids.extend(tokens), mod.extend([m] * len(tokens)), tgt.extend([t] * len(tokens))

    n = len(ep.steps) if upto is None else upto
    for step, c in zip(ep.steps[:n], codes):
        add(enc(step.instruction) + [THINK] + enc(world.plan_text(step.scene)) + [BOI], TEXT, 1)
        add([vocab.image_offset + int(x) for x in c], IMAGE, 1)
        add([EOI], TEXT, 1)
        add([PAD] * ctx_tokens, TEXT, 0)
    if upto is not None and upto < len(ep.steps):
        add(enc(ep.steps[upto].instruction) + [THINK], TEXT, 1)
    else:
        add(enc(ep.question.text) + [THINK] + (enc(ep.question.answer) + [EOS] if upto is None else []), TEXT, 1)
    if len(ids) > block_size:
        raise EpisodeError(f"an episode of {len(ep.steps)} images is {len(ids)} tokens, more than gpt.block_size="
                           f"{block_size}: raise gpt.block_size or lower train.episode_images")
    return ids, mod, tgt


def context_layout(ids, image_offset, n_codes, ctx_tokens):
    """What each position of one sequence may see, read from its ids: (until, slot, codes, closed) as
    model.ImageContext holds them (lists). A step runs from the token after the previous step's placeholders to
    its <eoi>; once it closes, its text (with ctx_tokens, also <boi>, the codes and <eoi>) is hidden from the
    positions after its <eoi>, and its ctx_tokens placeholders carry the resampled image instead. Text after
    the last image (a question) is never hidden."""
    until, slot, codes, closed = [NEVER] * len(ids), [0] * len(ids), [], []
    start, boi, i = 1, None, 0
    while i < len(ids):
        if ids[i] == BOI:
            boi = i
        elif ids[i] == EOI and boi is not None:
            if i - boi - 1 != n_codes:
                raise EpisodeError(f"an image of {i - boi - 1} codes at position {boi}: expected {n_codes}")
            for j in range(start, i + 1 if ctx_tokens else boi):
                until[j] = i
            for j in range(ctx_tokens):
                if i + 1 + j < len(ids):
                    slot[i + 1 + j] = 1 + len(codes) * ctx_tokens + j
            codes.append([t - image_offset for t in ids[boi + 1:i]])
            closed.append(i)
            start, boi, i = i + 1 + ctx_tokens, None, i + 1 + ctx_tokens
            continue
        i += 1
    return until, slot, codes, closed


def context_inputs(layouts, n_codes, device, length=None):
    """context_layout results of B sequences (each sequence's columns from 0) -> a model.ImageContext, every
    tensor right-padded (to `length` columns if given)."""
    B, T = len(layouts), length or max(len(u) for u, *_ in layouts)
    I = max(1, max(len(c) for _, _, c, _ in layouts))
    until = torch.full((B, T), NEVER, dtype=torch.long)
    slot = torch.zeros(B, T, dtype=torch.long)
    codes = torch.zeros(B, I, n_codes, dtype=torch.long)
    closed = torch.full((B, I), NEVER, dtype=torch.long)
    for b, (u, s, c, cl) in enumerate(layouts):
        until[b, :min(T, len(u))], slot[b, :min(T, len(s))] = torch.tensor(u[:T]), torch.tensor(s[:T])
        if c:
            codes[b, :len(c)], closed[b, :len(cl)] = torch.tensor(c), torch.tensor(cl)
    return ImageContext(codes.to(device), closed.to(device), slot.to(device), until.to(device))


def make_batch(seqs, vocab, n_codes, ctx_tokens, device):
    """Episode sequences -> a data.Batch whose context is the inputs' model.ImageContext."""
    b = collate(seqs, vocab, device)
    layouts = [context_layout(s[0], vocab.image_offset, n_codes, ctx_tokens) for s in seqs]
    return Batch(b.x, b.y, b.weight, b.patch, b.tags, b.modality,
                 context_inputs(layouts, n_codes, device, length=b.x.shape[1]))


def episode_codes(eps, vq, device):
    """Each episode's image codes under the VQ, rendered and encoded in one pass."""
    scenes = [s.scene for ep in eps for s in ep.steps]
    if not scenes:
        return [[] for _ in eps]
    flat = vq_codes(vq, np.stack([world.render(s, vq.cfg.image_size) for s in scenes]), device).tolist()
    out, i = [], 0
    for ep in eps:
        out.append(flat[i:i + len(ep.steps)])
        i += len(ep.steps)
    return out


def episode_data(n, seed, split, tokenizer, vocab, vq, device, ctx_tokens, block_size, max_images, tail_keep=1.0):
    """n episodes as training sequences (data.build_sequence's triples)."""
    eps = sample_episodes(n, seed, split, max_images, tail_keep=tail_keep)
    return [episode_sequence(ep, tokenizer, vocab, c, ctx_tokens, block_size)
            for ep, c in zip(eps, episode_codes(eps, vq, device))]
