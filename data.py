"""
Data for the GPT: image folders of your own, the text tokenizer, the token-sequence format, per-token
tags and training batches. The shapes world itself is world.py.

    python data.py --show 16          # writes out/world_samples.png: random examples with prompt and plan
    python data.py --show 8 --image-size 64 --seed 1
    python data.py --make-folder out/my_images --n 2000   # a demo folder of your own images (PNG + metadata.jsonl)
"""
import argparse
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import world
from world import BACKGROUND, CELLS, COLOURS, LATTICE, SHAPES, SIZES

# -----------------------------------------------------------------------------
# Your own images: a folder of images with captions

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Folder:
    images: np.ndarray  # (N, S, S, 3) uint8, every image converted to RGB at the configured size
    captions: list  # N strings
    names: list  # N file names, relative to the folder
    skipped: list  # (file name, reason) of every file that could not be used


def _folder_entries(folder):
    """(file name, caption) pairs: from metadata.jsonl (Hugging Face imagefolder convention) if there is
    one, else from a .txt file beside each image. Images without a caption come back with caption None."""
    meta = os.path.join(folder, "metadata.jsonl")
    if os.path.exists(meta):
        entries = []
        with open(meta) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    entries.append((str(row["file_name"]), row.get("text")))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{meta} line {n}: expected a JSON object with \"file_name\" and \"text\", "
                                     f"got {line.strip()[:80]!r}") from None
        return entries
    entries = []
    for name in sorted(os.listdir(folder)):
        if name.lower().endswith(IMAGE_EXTENSIONS):
            txt = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
            entries.append((name, open(txt).read() if os.path.exists(txt) else None))
    return entries


def load_image(path, image_size):
    """Any image Pillow reads -> uint8 (S, S, 3): transparency composited on white (RGBA, LA, palette with a
    transparent colour), grey and palette images made RGB, the centre square cropped (no distortion), then
    resized. Raises OSError (or ValueError) for unreadable or truncated files."""
    with Image.open(path) as im:
        im.load()  # decodes now, so a truncated file fails here and not later
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = Image.alpha_composite(Image.new("RGBA", im.size, BACKGROUND + (255,)), im.convert("RGBA"))
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        return np.asarray(im.resize((image_size, image_size), Image.BICUBIC), dtype=np.uint8)


def load_folder(folder, image_size):
    """A folder of captioned images -> Folder. Unreadable files and images without a caption are skipped
    (and listed); a folder with nothing usable is an error that says what a usable folder looks like."""
    if not os.path.isdir(folder):
        raise ValueError(f"image folder {folder!r} does not exist "
                         f"(make a demo one with `python data.py --make-folder {folder}`)")
    images, captions, names, skipped = [], [], [], []
    for name, text in _folder_entries(folder):
        if not isinstance(text, str) or not text.strip():
            skipped.append((name, "no caption"))
            continue
        try:
            images.append(load_image(os.path.join(folder, name), image_size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            skipped.append((name, f"unreadable: {str(e)[:60]}"))
            continue
        captions.append(" ".join(text.split()))
        names.append(name)
    if not images:
        why = f"; {len(skipped)} skipped, e.g. " + ", ".join(f"{n} ({r})" for n, r in skipped[:3]) if skipped else ""
        raise ValueError(f"no usable images in {folder}{why}. A folder needs images with captions: a metadata.jsonl "
                         f"with lines {{\"file_name\": \"a.png\", \"text\": \"a caption\"}}, or a.txt beside a.png")
    return Folder(np.stack(images), captions, names, skipped)


def folder_dev(names):
    """Indices of the held-out tenth of a folder (at least one image), chosen by a stable hash of the file
    name, so adding images to a folder does not reshuffle which old ones are held out."""
    order = sorted(range(len(names)), key=lambda i: hashlib.sha256(names[i].encode()).digest())
    return sorted(order[:max(1, len(names) // 10)])


def make_folder(out, n, image_size=32, seed=0):
    """A demo folder in the imagefolder convention: n rendered scenes as PNG, captions in metadata.jsonl.
    Each line also holds the scene ("scene": [[shape, colour, size, row, col], ...]): read only by the
    verifier that judges a folder run afterwards (folder_scenes); training never reads it."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(os.path.join(out, "metadata.jsonl"), "w") as f:
        for i in range(n):
            scene = world.random_scene(rng)
            Image.fromarray(world.render(scene, image_size)).save(os.path.join(out, f"{i:05d}.png"))
            f.write(json.dumps({"file_name": f"{i:05d}.png", "text": world.caption_text(scene, rng),
                                "scene": [[o.shape, o.colour, o.size, o.row, o.col] for o in scene.objects]}) + "\n")
    print(f"wrote {n} images and {os.path.join(out, 'metadata.jsonl')}")


def folder_scenes(folder):
    """{file name: world.Scene} of a demo folder (make_folder), or None for any other folder (a line without
    a "scene"). For the verifier's judgement after training only: the scene is what the caption describes."""
    meta = os.path.join(folder, "metadata.jsonl")
    if not os.path.exists(meta):
        return None
    rows = [json.loads(line) for line in open(meta) if line.strip()]
    if not rows or any("scene" not in r for r in rows):
        return None
    return {r["file_name"]: world.Scene(tuple(world.Obj(*o) for o in r["scene"])) for r in rows}


# -----------------------------------------------------------------------------
# Text tokenizer: word level, trained on the world's own text

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<think>", "<boi>", "<eoi>", "<null>"]  # ids 0..7


def train_tokenizer(path=None, n=500, seed=0, corpus=None):
    """A word-level tokenizer over the world's text, or over `corpus` (lines, e.g. a folder's captions)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # words (hyphenated ones whole: a plan's "top-left" is one token) and runs of punctuation (",", ";")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+(?:-\w+)*|[^\w\s]+"), behavior="removed", invert=True)
    lines = world.world_corpus(n, seed) if corpus is None else corpus
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tok.save(path)
    return tok


def load_tokenizer(path):
    from tokenizers import Tokenizer
    if not os.path.exists(path):
        raise FileNotFoundError(f"no text tokenizer at {path}: make one with data.train_tokenizer('{path}')")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises its own error types for a damaged file
        raise ValueError(f"{path} is damaged ({e}): delete it and run `python train.py` with this run's config "
                         "again; it is trained anew (the same words, the same ids) "
                         "and the finished stages are reused") from None


PLAN_VERSION = 3  # config.json's "plan_version": 1 "red circle large top left", 2 the cell first, 3 the count first


def check_world_run(tokenizer, config=None):
    """Refuse a run made by an older nanoloom, whose GPT writes plans this version cannot read or was built
    otherwise: plans that named a cell in two words ("top left": the tokenizer lacks the cell words), put the
    cell last ("red circle large top-left": its GPT config has neither cell_emb nor n_tags), a model that held
    the layout cells itself (cell_emb, no n_tags: this version's tags come from data.Tagger), or plans that
    did not begin with the count (no plan_version in its config). config: the run's config.json as a dict."""
    missing = [w for w in CELLS if tokenizer.token_to_id(w) is None]
    if missing:
        raise ValueError(f"the tokenizer does not know the plan's cell words ({', '.join(missing[:3])}, ...): "
                         f"it was made by an older nanoloom, whose plans named a cell in two words")
    if config is not None and "n_tags" not in config["gpt"]:
        if "cell_emb" in config["gpt"]:
            raise ValueError("its GPT was trained by an older nanoloom, whose model held the layout cells itself "
                             "(gpt.cell_emb); this version's GPT is given them as tags (gpt.n_tags)")
        raise ValueError("its GPT was trained by an older nanoloom, whose plans named the cell after the object "
                         "and had no cell embedding")
    if config is not None and config.get("plan_version", 0) > PLAN_VERSION:
        raise ValueError(f"it was made by a newer nanoloom (plan_version {config['plan_version']}, this version reads "
                         f"{PLAN_VERSION}): update nanoloom")
    if config is not None and config.get("plan_version") != PLAN_VERSION:
        raise ValueError(f"its GPT was trained by an older nanoloom, whose plans did not begin with the number of "
                         f"objects (plan_version {config.get('plan_version', 2)}, this version reads {PLAN_VERSION})")


def encode_text(tokenizer, text):
    """Text -> ids, no special tokens added. Unknown words are an error, never a silent <unk>."""
    if not text.strip():
        raise ValueError("empty text: a prompt needs at least one word")
    enc = tokenizer.encode(text)
    unk = tokenizer.token_to_id("<unk>")
    missing = [text[a:b] for (a, b), i in zip(enc.offsets, enc.ids) if i == unk]
    if missing:
        known = sorted(w for w in tokenizer.get_vocab() if w not in SPECIAL_TOKENS)[:12]
        raise ValueError(f"words not in the vocabulary: {', '.join(map(repr, missing))}; "
                         f"the tokenizer knows only the words of its training text, e.g. {' '.join(known)} ...")
    return enc.ids


def decode_text(tokenizer, ids):
    """Ids -> text, special tokens dropped, with ',' and '.' glued back to the word before them."""
    return re.sub(r" ([,.])", r"\1", tokenizer.decode(list(ids), skip_special_tokens=True))


# -----------------------------------------------------------------------------
# The token sequence: one vocabulary, text ids first, then the image codebook

PAD, UNK, BOS, EOS, THINK, BOI, EOI, NULL = range(len(SPECIAL_TOKENS))  # ids fixed by SPECIAL_TOKENS' order
TEXT, IMAGE = 0, 1  # the modality of a position
FORMATS = ("plan", "direct", "caption")  # text->image with a reasoning plan, text->image direct, image->text


KEEP = -1  # Tagger role of an attribute word: it keeps the region named before it open


class Tagger:
    """Per-token tags for the GPT (model.GPT's `tags`): the layout region of the plan object a token belongs
    to, 1 + its index in world.CELLS, 0 for none. A cell word ("top-left") opens its region, the attribute
    words after it (colour, shape, size) keep it open, any other token closes it; an image token is tagged
    with the region its patch's centre lies in (patch_regions), a margin patch with none. So the words of a
    plan object and the image tokens that draw it share a tag, and through it a learned vector: an image
    token finds its object's colour and shape by matching a vector it already holds.
    Two implementations, tested against each other: `tags` walks one whole sequence in Python (training
    batches, the reference sampler), `step` carries a batch of open regions through the next tokens with
    lookup tensors (the KV-cache sampler, one token at a time)."""

    def __init__(self, text_size, cell_ids, keep_ids, patch_tags):
        self.text_size = text_size  # ids from here on are image codes
        self.cell_tags = {int(t): 1 + i for i, t in enumerate(cell_ids)}  # cell word -> the tag of its region
        self.keep_ids = frozenset(int(t) for t in keep_ids)  # attribute words
        self.patch_tags = tuple(patch_tags)  # the tag of each patch of an image, in patch order
        self.n_tags = 1 + len(self.cell_tags)  # the GPT's tag rows: untagged, then one per region
        self.role = torch.zeros(text_size + 1, dtype=torch.long)  # (text_size + 1,) by id,
        #                                                           the last entry for every code: 0 closes
        self.role[list(self.keep_ids)] = KEEP
        self.role[list(self.cell_tags)] = torch.tensor(list(self.cell_tags.values()), dtype=torch.long)
        self.patch_tag = torch.tensor((0,) + self.patch_tags)  # (n_codes + 1,) by patch_positions' value

    def tags(self, ids):
        """The tag of every token of one sequence (a list of ids)."""
        out, region = [], 0
        for t, p in zip(ids, patch_positions(ids, self.text_size)):
            if t in self.cell_tags:  # a cell word opens its region
                region = self.cell_tags[t]
            elif t not in self.keep_ids:  # anything but an attribute word closes it
                region = 0
            out.append(self.patch_tags[p - 1] if p else region)
        return out

    def step(self, region, ids, patch):
        """The tags of the next tokens of a batch of sequences, one position at a time: region (B,) left open by
        the tokens before; ids, patch (B, T) the next tokens and their patch_positions -> (tags (B, T), the
        region left open after them (B,))."""
        role = self.role.to(ids.device)[ids.clamp(max=self.text_size)]  # (B, T)
        patch_tag = self.patch_tag.to(ids.device)[patch]  # (B, T)
        tags = []
        for t in range(ids.shape[1]):
            region = torch.where(role[:, t] == KEEP, region, role[:, t])
            tags.append(torch.where(patch[:, t] > 0, patch_tag[:, t], region))
        return torch.stack(tags, 1), region


def region_tagger(tokenizer, n_codes):
    """The shapes world's Tagger for a run's tokenizer and its images of n_codes codes."""
    ids = lambda words: [tokenizer.token_to_id(w) for w in words]
    return Tagger(tokenizer.get_vocab_size(), ids(CELLS), ids((*COLOURS, *SHAPES, *SIZES)), patch_regions(n_codes))


@dataclass(frozen=True)
class Vocab:
    """Where each kind of token lives in the one vocabulary shared by text and images."""
    text_size: int  # the text tokenizer's vocabulary, special tokens included
    codebook_size: int  # the VQ codebook; code c has id text_size + c
    tagger: Tagger = None  # the tags the GPT is given (region_tagger);
    #                        None: no tags (a folder run, train.region_tags off)

    @property
    def image_offset(self):
        return self.text_size

    @property
    def size(self):
        return self.text_size + self.codebook_size


def build_sequence(fmt, vocab, prompt=(), plan=(), codes=(), caption=(), null=False):
    """One training sequence. Returns (ids, modality, target) lists of equal length, where target[i] says
    whether ids[i] is predicted (from ids[:i]) in the loss. Formats:
        plan:    <bos> prompt <think> plan <boi> codes <eoi> <eos>
        direct:  <bos> prompt <boi> codes <eoi> <eos>
        caption: <bos> <boi> codes <eoi> caption <eos>
    null=True (plan/direct) replaces everything between <bos> and <boi> by <null>, keeping the length:
    the unconditional branch of classifier-free guidance. The plan goes too: it alone fixes the image,
    so a branch that still saw it would give guidance nothing to push against."""
    img = [BOI] + [vocab.image_offset + int(c) for c in codes] + [EOI]
    img_mod = [TEXT] + [IMAGE] * len(codes) + [TEXT]
    if fmt == "caption":
        ids = [BOS] + img + list(caption) + [EOS]
        modality = [TEXT] + img_mod + [TEXT] * (len(caption) + 1)
        target = [0] * (1 + len(img)) + [1] * (len(caption) + 1)
        return ids, modality, target
    cond = list(prompt) + ([THINK] + list(plan) if fmt == "plan" else [])
    n_prompt = len(prompt)
    if null:
        cond, n_prompt = [NULL] * len(cond), len(cond) + 1  # nothing to learn before the image: skip <boi> too
    ids = [BOS] + cond + img + [EOS]
    modality = [TEXT] * (1 + len(cond)) + img_mod + [TEXT]
    # learn what comes after the prompt (<think>, the plan, <boi>) and the image; the prompt itself is given
    target = [0] * (1 + n_prompt) + [1] * (len(ids) - 1 - n_prompt)
    return ids, modality, target


def patch_regions(n_codes):
    """The layout region (1 + index into CELLS) each patch of a sqrt(n_codes)-wide image lies in, by the
    lattice position of the patch's centre; 0 for patches in the margin."""
    g = math.isqrt(n_codes)
    units = [(i + 0.5) * LATTICE / g for i in range(g)]  # each patch row's (or column's) centre, in lattice units
    band = [int(u - 1) // 2 if 1 <= u < LATTICE - 1 else -1 for u in units]  # its cell row (column), -1 in the margin
    return tuple(1 + 3 * band[r] + band[c] if min(band[r], band[c]) >= 0 else 0 for r in range(g) for c in range(g))


def patch_positions(ids, image_offset):
    """The patch of each image code in its image, counted from 1 after the last <boi> (1, 2, ...); 0 for
    every other token. The GPT adds an embedding of the patch to image tokens."""
    out, n = [], 0
    for t in ids:
        if t == BOI:
            n = 0
        if t >= image_offset:
            n += 1
            out.append(n)
        else:
            out.append(0)
    return out


# -----------------------------------------------------------------------------
# Training batches


@dataclass
class Batch:
    """Right-padded sequences as the GPT learns them: inputs, and the next token of each as its target."""
    x: torch.Tensor  # (B, T-1) input ids
    y: torch.Tensor  # (B, T-1) target ids: the sequences shifted by one
    weight: torch.Tensor  # (B, T-1) float, 1 where y is learned (build_sequence's target), 0 elsewhere and on padding
    patch: torch.Tensor  # (B, T-1) patch of each input (patch_positions), 0 for text and padding
    tags: torch.Tensor  # (B, T-1) tag of each input (vocab.tagger), all 0 without a tagger
    modality: torch.Tensor  # (B, T-1) TEXT or IMAGE of each target
    context: object = None  # episodes: a model.ImageContext of the inputs (episodes.make_batch); None for pairs


def collate(seqs, vocab, device):
    """build_sequence outputs -> a Batch on device: the pretraining batches, post-training's samples, the
    "self" reward's captions."""
    B, T = len(seqs), max(len(s[0]) for s in seqs)
    ids = torch.full((B, T), PAD, dtype=torch.long)
    weight = torch.zeros(B, T)
    patch, tags, mod = (torch.zeros(B, T, dtype=torch.long) for _ in range(3))
    for r, (s, m, t) in enumerate(seqs):
        ids[r, :len(s)], mod[r, :len(s)], weight[r, :len(s)] = (torch.tensor(s), torch.tensor(m),
                                                                torch.tensor(t, dtype=torch.float))
        patch[r, :len(s)] = torch.tensor(patch_positions(s, vocab.image_offset))
        if vocab.tagger is not None:
            tags[r, :len(s)] = torch.tensor(vocab.tagger.tags(s))
    return Batch(*(t.to(device) for t in (ids[:, :-1], ids[:, 1:], weight[:, 1:],
                                          patch[:, :-1], tags[:, :-1], mod[:, 1:])))


class LMData:
    """Pretraining examples held as token ids: prompt, plan, caption, image codes (lists, one per example)."""

    def __init__(self, prompt, plan, caption, codes):
        self.prompt, self.plan, self.caption, self.codes = prompt, plan, caption, codes

    def __len__(self):
        return len(self.codes)


def to_float(images):
    """uint8 images (N, H, W, 3), an array or a list of arrays -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images))).permute(0, 3, 1, 2).float() / 255


def to_u8(x):
    """float images (N, 3, H, W) in [0, 1] -> uint8 numpy (N, H, W, 3)."""
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def vq_codes(vq, images, device, batch=512):
    """uint8 images (N, H, W, 3) -> their codes under the VQ encoder vq, (N, h*w) on the CPU, in chunks."""
    return torch.cat([vq.encode(to_float(images[i:i + batch]).to(device)).cpu() for i in range(0, len(images), batch)])


def folder_data(folder, idx, tokenizer, vq, device):
    """LMData of a folder's images idx: each caption is both its text->image prompt and its image->text caption."""
    caps = [encode_text(tokenizer, folder.captions[i]) for i in idx]
    return LMData(caps, [[] for _ in idx], caps, vq_codes(vq, folder.images[idx], device).tolist())


def world_data(n, seed, split, tokenizer, vq, device, tail_keep=1.0):
    """n examples of the shapes world: prompt, plan, a random caption and the scene's codes under the VQ vq;
    a scene showing a long-tail composition is kept with probability tail_keep (world.sample_example)."""
    rng = np.random.default_rng(seed)
    examples = [world.sample_example(rng, split=split, tail_keep=tail_keep)
                for _ in tqdm(range(n), desc=f"{split} examples", mininterval=2)]
    enc = lambda s: encode_text(tokenizer, s)
    prompt = [enc(e.prompt) for e in examples]
    plan = [enc(world.plan_text(e.scene, e.spec)) for e in examples]
    caption = [enc(world.caption_text(e.scene, rng)) for e in examples]
    codes = [c for i in range(0, n, 512)  # rendered in chunks: all of them at once can be gigabytes at 64 x 64
             for c in vq_codes(vq, np.stack([world.render(e.scene, vq.cfg.image_size) for e in examples[i:i + 512]]),
                               device).tolist()]
    return LMData(prompt, plan, caption, codes)


def epoch_batches(ds, rng, tc, batch=None):
    """One epoch as batches of (example, format, null) items. Each example draws its format from the
    mix (tc: train.TrainConfig's p_plan, p_direct, null_prob); batches are made of examples of similar
    length (sorted within windows of 16 batches, then shuffled), so little compute goes to padding.
    batch defaults to tc.lm_batch."""
    batch = batch or tc.lm_batch
    p_caption = 1.0 - tc.p_plan - tc.p_direct
    fmts = rng.choice(len(FORMATS), size=len(ds), p=[tc.p_plan, tc.p_direct, p_caption])
    nulls = rng.random(len(ds)) < tc.null_prob
    items = [(int(i), FORMATS[fmts[i]], bool(nulls[i]) and FORMATS[fmts[i]] != "caption")
             for i in rng.permutation(len(ds))]
    length = lambda it: (len(ds.caption[it[0]]) if it[1] == "caption"
                         else len(ds.prompt[it[0]]) + len(ds.plan[it[0]]) * (it[1] == "plan"))
    window = 16 * batch
    batches = []
    for w in range(0, len(items) - batch + 1, window):
        chunk = sorted(items[w:w + window], key=length)
        batches += [chunk[b:b + batch] for b in range(0, len(chunk) - batch + 1, batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


def make_batch(ds, items, vocab, device):
    """(example, format, null) items of an LMData -> a Batch."""
    seqs = [build_sequence(fmt, vocab, ds.prompt[i], ds.plan[i], ds.codes[i], ds.caption[i], null=null)
            for i, fmt, null in items]
    return collate(seqs, vocab, device)


# -----------------------------------------------------------------------------


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--show", type=int, default=16, help="number of random examples in the grid")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/world_samples.png")
    ap.add_argument("--make-folder", metavar="DIR",
                    help="instead: write a demo image folder (PNG + metadata.jsonl) to DIR")
    ap.add_argument("--n", type=int, default=2000, help="images in the demo folder")
    args = ap.parse_args()
    if args.make_folder:
        make_folder(args.make_folder, args.n, args.image_size, args.seed)
    else:
        world.show(args.show, args.image_size, args.seed, args.out)
