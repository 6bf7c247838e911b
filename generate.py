"""
Sampling from the unified GPT: the model reads a prompt, writes its reasoning plan, emits <boi> by
itself, and draws exactly one image of N codes, which the VQ decoder turns into pixels.

Two samplers that must agree token for token at temperature 0 (tests/test_generate.py checks it):
- `generate_reference`: one prompt at a time, the whole sequence re-run every step, no cache.
  Slow and obviously correct.
- `generate`: a batch of prompts at once, left-padded, a static KV cache, and classifier-free guidance
  as ONE forward over [cond; null] rows that are fed the same sampled image token.
Both give the GPT each token's patch and tag as training does (data.patch_positions, data.Tagger): the
reference computes them from the whole sequence, the fast sampler carries them along one token at a time.

Grammar: outside an image only text tokens (and <boi>, <eos>); inside, only codes, exactly N of them,
then <eoi>. Nothing ever inserts <boi>: if the model never emits it, the sample has no image.

Several images in one sequence (episodes.py): `generate_interleaved` goes on after an <eoi>, writes text, opens
the next image by itself, ..., up to max_images new images, <eos> or block_size, in one KV cache; a closed image's
text (and, with gpt.ctx_tokens, its codes) is hidden from what follows by the cache's per-key visibility, and its
resampler placeholders are fed as the next positions. `generate_interleaved_reference` recomputes the whole
sequence and its episodes.context_layout every step; tests/test_episodes.py checks they agree token for token.

Usage (after `python train.py tiny_configs/shapes_cpu.toml`):
    python generate.py out/shapes_cpu "a red circle" "three blue squares" "a square the colour of grass"
    python generate.py out/shapes_cpu "two triangles" --n 8 --seed 1 --cfg_scale 1 --out out/two.png
    python generate.py out/interleaved "a big red circle at the top left" --images 3   # text, an image, text, ...
"""

import argparse
import json
import os
import textwrap
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data import (BOI, BOS, EOI, EOS, NULL, PAD, THINK, Vocab, check_world_run, decode_text, encode_text,
                  load_tokenizer, patch_positions, region_tagger, to_u8, vq_codes)
from episodes import context_inputs, context_layout
from model import GPT, NEVER, VQ, GPTConfig, ImageContext, KVCache, VQConfig, load_lora, merge_lora


@dataclass
class SampleConfig:
    temperature: float = 0.7  # image tokens; 0 = greedy
    text_temperature: float = 0.3  # plan tokens: lower, since a wrong word in the plan dooms the image; not 0,
    #                                which would give every sample of a prompt the same layout
    top_k: int = 20  # keep the k most likely tokens (0 = all), applied after guidance
    top_p: float = 1.0  # nucleus sampling on what top_k kept (1.0 = off)
    cfg_scale: float = 1.5  # classifier-free guidance on image tokens; 1.0 = off and no doubled batch
    think: bool = True  # append <think> to the prompt so the model writes a plan before drawing
    max_plan_tokens: int = 48  # a plan longer than this without <boi> ends the sample without an image


# -----------------------------------------------------------------------------
# pieces shared by both samplers


def allowed_tokens(vocab, phase, n_codes, n_image_tokens, device):
    """Grammar mask (B, V): phase 0 = text (plan), 1 = inside an image. n_codes = codes written so far."""
    V = vocab.size
    ids = torch.arange(V, device=device)
    text_ok = (ids > NULL) & (ids < vocab.image_offset)  # ordinary words
    text_ok = text_ok | (ids == THINK) | (ids == BOI) | (ids == EOS)
    code_ok = ids >= vocab.image_offset
    eoi_ok = ids == EOI
    in_image = (phase == 1).unsqueeze(1)
    full = (n_codes >= n_image_tokens).unsqueeze(1)
    return torch.where(in_image, torch.where(full, eoi_ok, code_ok), text_ok)  # (B, V)


def sample_next(logits, allowed, temperature, top_k, top_p, generator):
    """logits (B, V); allowed (B, V) bool; temperature (B,) per row. Returns (B,) token ids."""
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    greedy = logits.argmax(dim=-1)
    t = temperature.clamp(min=1e-6).unsqueeze(1)
    logits = logits / t
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # drop a token once the ones before it reach p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    drawn = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
    return torch.where(temperature > 0, drawn, greedy)


def guide(cond, uncond, scale):
    """Classifier-free guidance: push the conditional logits away from the unconditional ones."""
    return uncond + scale * (cond - uncond)


def split_sample(tokens, vocab):
    """Generated ids (after the prompt) -> dict(plan ids, codes or None, emitted_boi)."""
    plan, codes, boi = [], None, False
    for t in tokens:
        if t == BOI:
            boi, codes = True, []
        elif boi:
            if t == EOI:
                break
            codes.append(t - vocab.image_offset)
        elif t not in (THINK, EOS, PAD):
            plan.append(t)
    if codes is not None and len(codes) == 0:
        codes = None
    return {"plan": plan, "codes": codes, "emitted_boi": boi, "tokens": tokens}


# -----------------------------------------------------------------------------
# the slow reference sampler


@torch.no_grad()
def generate_reference(model, vocab, prompt_ids, cfg: SampleConfig, seed=0):
    """One prompt, no cache, no batching, no padding: every step re-runs the whole sequence."""
    dev = next(model.parameters()).device
    n_img = model.cfg.n_image_tokens
    gen = torch.Generator(device=dev).manual_seed(seed)
    seq = [BOS] + list(prompt_ids) + ([THINK] if cfg.think else [])
    null_seq = [BOS] + [NULL] * (len(seq) - 1)
    phase, n_codes, n_text, out = 0, 0, 0, []

    def last_logits(s):  # patches and tags from the whole sequence, as training's batches have them
        idx = torch.tensor([s], device=dev)
        patch = torch.tensor([patch_positions(s, vocab.image_offset)], device=dev)
        tags = torch.tensor([vocab.tagger.tags(s)], device=dev) if vocab.tagger is not None else None
        return model(idx, patch=patch, tags=tags)[:, -1]  # (1, V)

    while True:
        logits = last_logits(seq)
        if phase == 1:  # no shortcut at scale 1 here: the fast sampler's shortcut is tested against this
            logits = guide(logits, last_logits(null_seq), cfg.cfg_scale)
        allowed = allowed_tokens(vocab, torch.tensor([phase], device=dev),
                                 torch.tensor([n_codes], device=dev), n_img, dev)
        temp = torch.tensor([cfg.temperature if phase == 1 else cfg.text_temperature], device=dev)
        tok = sample_next(logits, allowed, temp, cfg.top_k, cfg.top_p, gen).item()
        out.append(tok)
        seq.append(tok)
        null_seq.append(tok if (phase == 1 or tok == BOI) else NULL)
        if phase == 0:
            n_text += 1
            if tok == BOI:
                phase = 1
            elif tok == EOS or n_text >= cfg.max_plan_tokens:
                break
        else:
            if tok == EOI:
                break
            n_codes += 1
    return split_sample(out, vocab)


# -----------------------------------------------------------------------------
# the fast sampler


@torch.no_grad()
def generate(model, vocab, prompts_ids, cfg: SampleConfig, seed=0):
    """A batch of prompts (lists of ids, any lengths) -> one sample dict per prompt (see split_sample)."""
    dev = next(model.parameters()).device
    B, n_img = len(prompts_ids), model.cfg.n_image_tokens
    gen = torch.Generator(device=dev).manual_seed(seed)
    guided = cfg.cfg_scale != 1.0
    conds = [[BOS] + list(p) + ([THINK] if cfg.think else []) for p in prompts_ids]
    lens = torch.tensor([len(c) for c in conds], device=dev)
    P = int(lens.max())
    max_new = cfg.max_plan_tokens + n_img + 1  # plan (incl. <boi>) + codes + <eoi>
    L = P + max_new
    if L - 1 > model.cfg.block_size:  # the last sampled token is never fed back
        raise ValueError(f"a prompt of {P - 1 - cfg.think} tokens leaves no room for a plan and an image "
                         f"within block_size {model.cfg.block_size}; shorten the prompt "
                         "or lower sample.max_plan_tokens")
    rows = conds + ([[BOS] + [NULL] * (len(c) - 1) for c in conds] if guided else [])
    R = len(rows)
    idx = torch.full((R, P), PAD, dtype=torch.long, device=dev)
    valid = torch.ones(R, L, dtype=torch.bool, device=dev)
    for r, s in enumerate(rows):  # left padding keeps the last prompt token of every row at column P-1
        idx[r, P - len(s):] = torch.tensor(s, device=dev)
        valid[r, :P - len(s)] = False
    pos = (valid[:, :P].long().cumsum(1) - 1).clamp(min=0)  # RoPE positions start at each row's <bos>
    cache = KVCache(model.cfg, R, L, dev, next(model.parameters()).dtype)
    tags = region = None  # region: the layout region each row's tokens so far leave open (data.Tagger.step)
    if vocab.tagger is not None:  # left padding closes regions, so it changes no row's tags
        tags, region = vocab.tagger.step(torch.zeros(R, dtype=torch.long, device=dev), idx, torch.zeros_like(idx))
    logits = model(idx, tags=tags, pos=pos, key_valid=valid[:, :P], cache=cache)[:, -1]
    next_pos = lens.repeat(2) if guided else lens  # (R,)

    phase = torch.zeros(B, dtype=torch.long, device=dev)
    n_codes = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = []
    for step in range(max_new):
        mixed = logits[:B]
        if guided:  # guidance only inside images; the plan is written from the conditional logits
            mixed = torch.where((phase == 1).unsqueeze(1), guide(logits[:B], logits[B:], cfg.cfg_scale), mixed)
        allowed = allowed_tokens(vocab, phase, n_codes, n_img, dev)
        temp = torch.where(phase == 1, cfg.temperature, cfg.text_temperature).float()
        tok = sample_next(mixed, allowed, temp, cfg.top_k, cfg.top_p, gen)
        tok = torch.where(done, PAD, tok)
        out.append(tok)
        is_code = (phase == 1) & (tok >= vocab.image_offset)
        patch = torch.where(is_code, n_codes + 1, 0)
        done = done | (tok == EOS) | (tok == EOI) | ((phase == 0) & (tok != BOI) & (step + 1 >= cfg.max_plan_tokens))
        n_codes = n_codes + is_code.long()
        phase = torch.where(tok == BOI, 1, phase)
        if bool(done.all()):
            break
        feed = tok
        if guided:  # the null rows copy <boi>, codes and <eoi>; plan words stay hidden from them
            feed = torch.cat([tok, torch.where(phase == 1, tok, NULL)])
            patch = patch.repeat(2)
        feed, patch = feed.unsqueeze(1), patch.unsqueeze(1)  # (R, 1)
        if vocab.tagger is not None:  # every row tags what it is fed, so the null rows' tags are
            #                           a null training sequence's
            tags, region = vocab.tagger.step(region, feed, patch)
        logits = model(feed, patch=patch, tags=tags, pos=next_pos.unsqueeze(1),
                       key_valid=valid[:, :cache.length + 1], cache=cache)[:, -1]
        next_pos = next_pos + 1
    tokens = torch.stack(out, 1).tolist() if out else [[] for _ in range(B)]
    return [split_sample(t, vocab) for t in tokens]


# -----------------------------------------------------------------------------
# several images in one sequence


def check_interleaved(model, cfg):
    if cfg.cfg_scale != 1.0:
        raise ValueError(f"interleaved sampling has no classifier-free guidance (what would the null branch of an "
                         f"episode be?): set cfg_scale = 1, not {cfg.cfg_scale}")
    return model.cfg.ctx_tokens


@torch.no_grad()
def generate_interleaved_reference(model, vocab, prefix, cfg: SampleConfig, max_images=1, seed=0, plain=False):
    """One prefix (ids that end in text, resampler placeholders after each closed image, as
    episodes.episode_sequence writes them) -> the tokens that follow it: text, images, the placeholders after
    each image that closes, until <eos>, the end of the max_images-th new image, max_plan_tokens text tokens in a
    row, or block_size. A <boi> beyond max_images ends it. No cache: every step re-runs the whole sequence with
    its episodes.context_layout. plain=True: no layout at all (a pair sequence, e.g. an image to caption)."""
    k = 0 if plain else check_interleaved(model, cfg)
    dev = next(model.parameters()).device
    n_img = model.cfg.n_image_tokens
    gen = torch.Generator(device=dev).manual_seed(seed)
    seq, out = list(prefix), []
    phase, n_codes, n_text, images = 0, 0, 0, 0
    while len(seq) < model.cfg.block_size:
        idx = torch.tensor([seq], device=dev)
        patch = torch.tensor([patch_positions(seq, vocab.image_offset)], device=dev)
        tags = torch.tensor([vocab.tagger.tags(seq)], device=dev) if vocab.tagger is not None else None
        ctx = None if plain else context_inputs([context_layout(seq, vocab.image_offset, n_img, k)], n_img, dev)
        logits = model(idx, patch=patch, tags=tags, context=ctx)[:, -1]
        allowed = allowed_tokens(vocab, torch.tensor([phase], device=dev), torch.tensor([n_codes], device=dev), n_img, dev)
        temp = torch.tensor([cfg.temperature if phase == 1 else cfg.text_temperature], device=dev)
        tok = sample_next(logits, allowed, temp, cfg.top_k, cfg.top_p, gen).item()
        out.append(tok)
        seq.append(tok)
        if phase == 0:
            n_text += 1
            if tok == EOS or (tok == BOI and images >= max_images) or (tok != BOI and n_text >= cfg.max_plan_tokens):
                break
            if tok == BOI:
                phase, n_codes = 1, 0
        elif tok == EOI:
            images += 1
            if images >= max_images or len(seq) + k > model.cfg.block_size:
                break
            phase, n_text = 0, 0
            seq += [PAD] * k
            out += [PAD] * k
        else:
            n_codes += 1
    return out


def split_interleaved(tokens, image_offset):
    """The tokens of an interleaved sample -> [(text ids before an image, its codes)], then (the text after the
    last image, None); placeholders dropped."""
    pieces, text, codes = [], [], None
    for t in tokens:
        if t == BOI:
            codes = []
        elif t == EOI and codes is not None:
            pieces.append((text, codes))
            text, codes = [], None
        elif codes is not None:
            codes.append(t - image_offset)
        elif t not in (PAD, THINK, EOS):
            text.append(t)
    return pieces + [(text, None)]


@torch.no_grad()
def generate_interleaved(model, vocab, prefixes, cfg: SampleConfig, max_images=1, seed=0, plain=False):
    """A batch of prefixes -> the tokens that follow each, as generate_interleaved_reference, in one KV cache:
    left-padded prefixes, then one token per row per step. A closed image's placeholders are forced, one per step,
    while the other rows sample on."""
    k = 0 if plain else check_interleaved(model, cfg)
    dev = next(model.parameters()).device
    B, n_img, bs = len(prefixes), model.cfg.n_image_tokens, model.cfg.block_size
    gen = torch.Generator(device=dev).manual_seed(seed)
    lens = [len(p) for p in prefixes]
    if max(lens) >= bs:
        raise ValueError(f"a prefix of {max(lens)} tokens leaves no room within block_size {bs}")
    P = max(lens)
    L = P + bs - min(lens)  # the cache's columns: padding, then up to block_size positions per row
    layouts = [context_layout(p, vocab.image_offset, n_img, k) for p in prefixes]
    shift = [P - n for n in lens]  # left padding: a row's column = its position + shift
    n_imgs = [len(lay[2]) for lay in layouts]
    I = max(1, max(n_imgs) + max_images)
    if model.cfg.sync_every and I > model.cfg.max_images:
        raise ValueError(f"{max(n_imgs)} images in a prefix + {max_images} new ones > gpt.max_images="
                         f"{model.cfg.max_images}: the synchronizer has no relative embedding for more")
    codes = torch.zeros(B, I, n_img, dtype=torch.long, device=dev)
    closed = torch.full((B, I), NEVER, dtype=torch.long, device=dev)
    until = torch.full((B, L), NEVER, dtype=torch.long, device=dev)
    slot = torch.zeros(B, P, dtype=torch.long, device=dev)
    idx = torch.full((B, P), PAD, dtype=torch.long, device=dev)
    patch = torch.zeros(B, P, dtype=torch.long, device=dev)
    valid = torch.ones(B, L, dtype=torch.bool, device=dev)
    for b, (p, (u, s, c, cl)) in enumerate(zip(prefixes, layouts)):
        o = shift[b]
        idx[b, o:] = torch.tensor(p, device=dev)
        patch[b, o:] = torch.tensor(patch_positions(p, vocab.image_offset), device=dev)
        until[b, o:P] = torch.tensor([x + o if x != NEVER else NEVER for x in u], device=dev)
        slot[b, o:] = torch.tensor(s, device=dev)
        valid[b, :o] = False
        if c:
            codes[b, :len(c)] = torch.tensor(c, device=dev)
            closed[b, :len(c)] = torch.tensor(cl, device=dev) + o
    pos = (valid[:, :P].long().cumsum(1) - 1).clamp(min=0)
    cache = KVCache(model.cfg, B, L, dev, next(model.parameters()).dtype)
    tags = region = None
    if vocab.tagger is not None:
        tags, region = vocab.tagger.step(torch.zeros(B, dtype=torch.long, device=dev), idx, patch)
    ctx = None if plain else ImageContext(codes, closed, slot, until)
    logits = model(idx, patch=patch, tags=tags, pos=pos, key_valid=valid[:, :P], cache=cache, context=ctx)[:, -1]
    next_pos = torch.tensor(lens, device=dev)
    # per row: phase (0 text, 1 image), codes and text tokens so far, new images, placeholders still to feed,
    # the column where its current step began and of its last <boi>, and the codes of the image it draws
    phase, n_codes, n_text = [0] * B, [0] * B, [0] * B
    images, pending = [0] * B, [0] * B
    start = [(s + lay[3][-1] + 1 + k) if lay[3] else s + 1 for s, lay in zip(shift, layouts)]
    boi_col, drawing = [0] * B, [[] for _ in range(B)]
    done = [False] * B
    out = [[] for _ in range(B)]
    while not all(done):
        col = cache.length  # the column the tokens of this step take
        allowed = allowed_tokens(vocab, torch.tensor(phase, device=dev), torch.tensor(n_codes, device=dev), n_img, dev)
        temp = torch.tensor([cfg.temperature if ph == 1 else cfg.text_temperature for ph in phase], device=dev)
        drawn = sample_next(logits, allowed, temp, cfg.top_k, cfg.top_p, gen).tolist()
        feed, feed_patch, feed_slot = [PAD] * B, [0] * B, [0] * B
        for b in range(B):
            if done[b]:
                continue
            if pending[b]:  # a closed image's placeholder: forced, not sampled
                j = k - pending[b]
                pending[b] -= 1
                out[b].append(PAD)
                feed_slot[b] = 1 + (n_imgs[b] - 1) * k + j
            else:
                tok = drawn[b]
                out[b].append(tok)
                feed[b] = tok
                if phase[b] == 0:
                    n_text[b] += 1
                    if tok == EOS or (tok == BOI and images[b] >= max_images) or \
                            (tok != BOI and n_text[b] >= cfg.max_plan_tokens):
                        done[b] = True
                    elif tok == BOI:
                        phase[b], n_codes[b], boi_col[b], drawing[b] = 1, 0, col, []
                elif tok == EOI:  # the image closes: hide its step from what follows, then feed its placeholders
                    codes[b, n_imgs[b]] = torch.tensor(drawing[b], device=dev)
                    closed[b, n_imgs[b]] = col
                    until[b, start[b]:col + 1 if k else boi_col[b]] = col
                    n_imgs[b] += 1
                    images[b] += 1
                    row_len = col - shift[b] + 1
                    if images[b] >= max_images or row_len + k > bs:
                        done[b] = True
                    phase[b], n_text[b], pending[b], start[b] = 0, 0, k, col + 1 + k
                else:
                    drawing[b].append(tok - vocab.image_offset)
                    feed_patch[b] = n_codes[b] + 1
                    n_codes[b] += 1
            if not done[b] and col - shift[b] + 1 >= bs:  # the row is full: nothing more can be fed
                done[b] = True
        if all(done):
            break
        feed_t = torch.tensor(feed, device=dev).unsqueeze(1)  # (B, 1)
        patch_t = torch.tensor(feed_patch, device=dev).unsqueeze(1)
        if vocab.tagger is not None:
            tags, region = vocab.tagger.step(region, feed_t, patch_t)
        if not plain:
            ctx = ImageContext(codes, closed, torch.tensor(feed_slot, device=dev).unsqueeze(1), until)
        logits = model(feed_t, patch=patch_t, tags=tags, pos=next_pos.unsqueeze(1), key_valid=valid[:, :col + 1],
                       cache=cache, context=ctx)[:, -1]
        next_pos = next_pos + 1
    return out


# -----------------------------------------------------------------------------
# runs on disk, images out


class RunError(Exception):
    """A run directory that is missing, half-written, or from another config."""


def save_atomic(tensors, path, metadata=None):
    """safetensors write via a temporary file and a rename: a kill mid-write never leaves a corrupt file
    (os.replace is atomic; a kill before it leaves the old file and a stray .tmp)."""
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_tensors(path, device="cpu"):
    """A safetensors file of a run -> (tensors, metadata), with a message that names it when it is missing or
    damaged (truncated by a full disk or an interrupted copy, or not safetensors at all)."""
    if not os.path.exists(path):
        raise RunError(f"missing {path}: run `python train.py` for this run first (or check the path)")
    try:
        with safe_open(path, "pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except SafetensorError as e:
        raise RunError(f"{path} is damaged ({e}): delete it and run `python train.py` with this run's config "
                       f"again; the stage that writes it runs again and the finished ones are reused") from None


def load_weights(module, path):
    """Load a safetensors file into a module, with a message instead of a deep torch traceback."""
    tensors, _ = read_tensors(path, str(next(module.parameters()).device))
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        first = str(e).splitlines()[1:3]
        raise RunError(f"{path} does not fit this model's config (was it trained with another config?): "
                       + " ".join(s.strip() for s in first)) from None
    return module


def read_json(path):
    """A JSON file of a run, with a message that names it when it is damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunError(f"missing {path} (check the path)") from None
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is damaged (not valid JSON: {e}): delete it and run `python train.py` with this "
                       f"run's config again; it is written anew and the finished stages are reused") from None


def load_run(run_dir, device="cpu"):
    """A trained run -> (config dict, tokenizer, vocab, vq, gpt), all in eval mode."""
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise RunError(f"{run_dir} is not a run directory (no config.json): train one with "
                       f"`python train.py tiny_configs/shapes_cpu.toml`")
    cfg = read_json(cfg_path)
    tok_path = os.path.join(run_dir, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise RunError(f"missing {tok_path}: run `python train.py` for this run first (or check the path)")
    try:
        tokenizer = load_tokenizer(tok_path)
    except ValueError as e:
        raise RunError(str(e)) from None
    if not cfg["train"]["data_dir"]:
        try:
            check_world_run(tokenizer, cfg)
        except ValueError as e:
            raise RunError(f"{run_dir}: {e}. Train a new run: `python train.py tiny_configs/shapes_cpu.toml "
                           f"--train.out_dir=<a new directory>`") from None
    vq = load_weights(VQ(VQConfig(**cfg["vq"])).to(device), os.path.join(run_dir, "vq.safetensors")).eval()
    unknown = sorted(set(cfg["gpt"]) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise RunError(f"{run_dir}: its GPT config has keys this nanoloom does not know ({', '.join(unknown)}): it was "
                       f"made by another version. Train a new run: `python train.py tiny_configs/shapes_cpu.toml "
                       f"--train.out_dir=<a new directory>`")
    gpt_cfg = GPTConfig(**cfg["gpt"])
    vocab = Vocab(gpt_cfg.image_offset, vq.cfg.codebook_size,
                  region_tagger(tokenizer, vq.cfg.n_codes) if gpt_cfg.n_tags else None)
    gpt = load_weights(GPT(gpt_cfg).to(device), os.path.join(run_dir, "gpt.safetensors")).eval()
    return cfg, tokenizer, vocab, vq, gpt


def load_adapter(gpt, run_dir, name="post"):
    """Add RUN_DIR/lora_<name>.safetensors (written by the post stage, its config beside it as JSON) to
    the run's GPT and merge it in for sampling."""
    path = os.path.join(run_dir, f"lora_{name}.safetensors")
    if not os.path.exists(path):
        raise RunError(f"no adapter {path}: run the post stage first (python train.py CONFIG --stages=post)")
    config = os.path.join(run_dir, f"lora_{name}.json")
    if not os.path.exists(config):
        raise RunError(f"missing {config} beside {path}: run the post stage again (delete {path} first)")
    pc = read_json(config)
    try:
        load_lora(gpt, name, read_tensors(path)[0],
                  tuple(pc["lora_targets"].split(",")), pc["lora_r"], pc["lora_alpha"])
    except ValueError as e:
        raise RunError(f"{path}: {e}") from None
    merge_lora(gpt)
    return gpt


def sample_config(cfg):
    """The sampling settings a run was trained and scored with (its config.json's [sample])."""
    return SampleConfig(**cfg.get("sample", {}))


@torch.no_grad()
def decode_images(vq, samples):
    """Samples -> uint8 images (H, W, 3) as numpy; a sample without an image becomes a grey square."""
    S = vq.cfg.image_size
    out = [np.full((S, S, 3), 128, np.uint8) for _ in samples]
    have = [i for i, s in enumerate(samples) if s["codes"] is not None and len(s["codes"]) == vq.cfg.n_codes]
    if have:
        dev = vq.codebook.weight.device
        codes = torch.tensor([samples[i]["codes"] for i in have], device=dev)
        imgs = to_u8(vq.decode(codes))
        for j, i in enumerate(have):
            out[i] = imgs[j]
    return out


@torch.no_grad()
def vq_round_trip(vq, images, batch=256):
    """uint8 images (N, H, W, 3) -> (their reconstructions through the codes, uint8 (N, H, W, 3);
    the codes (N, h*w))."""
    codes = vq_codes(vq, images, vq.codebook.weight.device, batch)
    return np.concatenate([to_u8(vq.decode(c.to(vq.codebook.weight.device))) for c in codes.split(batch)]), codes


def save_grid(images, captions, path, cols=8, scale=4, marks=None):
    """A PNG grid: each image enlarged `scale` times with its caption wrapped beneath it; marks (optional,
    True/False per image) draw a green or red frame for pass/fail."""
    S = images[0].shape[0] * scale
    lines = [textwrap.wrap(c, width=max(8, S // 6))[:6] for c in captions]
    text_h = 11 * max(1, max(len(x) for x in lines)) + 4
    rows = (len(images) + cols - 1) // cols
    cols = min(cols, len(images))
    sheet = Image.new("RGB", (cols * (S + 8), rows * (S + 8 + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, ls) in enumerate(zip(images, lines)):
        x, y = (i % cols) * (S + 8) + 4, (i // cols) * (S + 8 + text_h) + 4
        sheet.paste(Image.fromarray(img).resize((S, S), Image.NEAREST), (x, y))
        if marks is not None:
            draw.rectangle([x - 3, y - 3, x + S + 2, y + S + 2],
                           outline=(0, 170, 0) if marks[i] else (220, 0, 0), width=2)
        for j, line in enumerate(ls):
            draw.text((x, y + S + 2 + 11 * j), line, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)


def save_interleaved(vq, tokenizer, vocab, outs, n_images, path):
    """Interleaved samples -> a grid, one row each: every image with the text written before it."""
    images, captions = [], []
    for tokens in outs:
        pieces = [p for p in split_interleaved(tokens, vocab.image_offset)
                  if p[1] is not None][:n_images]
        print(" | ".join(decode_text(tokenizer, text) + " [image]" for text, _ in pieces) or "[no image]")
        pieces += [([], None)] * (n_images - len(pieces))
        images += decode_images(vq, [{"codes": c} for _, c in pieces])
        captions += [decode_text(tokenizer, text) for text, _ in pieces]
    save_grid(images, captions, path, cols=n_images)
    print(f"wrote {path}")


def strict_bool(s):
    if s.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("true", "1")


def main(argv=None):
    p = argparse.ArgumentParser(description="Prompts in, a PNG grid out (plans printed beside each image).")
    p.add_argument("run_dir")
    p.add_argument("prompts", nargs="+")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/generate.png)")
    p.add_argument("--images", type=int, default=1, help="images per sample: above 1 the model goes on after each "
                   "<eoi> (generate_interleaved; one row per sample; no guidance, so cfg_scale is 1)")
    p.add_argument("--adapter", default=None,
                   help="sample with a post-training adapter, e.g. post (RUN_DIR/lora_post.safetensors)")
    for f in fields(SampleConfig):  # every sampling setting can be overridden; defaults come from the run
        p.add_argument(f"--{f.name}", type=strict_bool if f.type is bool else type(f.default), default=None)
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    try:
        cfg, tokenizer, vocab, vq, gpt = load_run(args.run_dir)
        if args.adapter:
            load_adapter(gpt, args.run_dir, args.adapter)
        sample_cfg = sample_config(cfg)
        for f in fields(SampleConfig):
            if getattr(args, f.name) is not None:
                setattr(sample_cfg, f.name, getattr(args, f.name))
        prompt_ids = [encode_text(tokenizer, p) for p in args.prompts]
        batch = [ids for ids in prompt_ids for _ in range(args.n)]
        if args.images > 1:
            sample_cfg.cfg_scale = 1.0
            outs = generate_interleaved(gpt, vocab, [[BOS] + ids + [THINK] * sample_cfg.think for ids in batch],
                                        sample_cfg, args.images, args.seed)
            out = args.out or os.path.join(args.run_dir, "generate.png")
            return save_interleaved(vq, tokenizer, vocab, outs, args.images, out)
        samples = generate(gpt, vocab, batch, sample_cfg, seed=args.seed)
    except (RunError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    images = decode_images(vq, samples)
    captions = []
    for i, s in enumerate(samples):
        plan = decode_text(tokenizer, s["plan"])
        prompt = args.prompts[i // args.n]
        status = "" if s["emitted_boi"] else "  [no <boi>: no image]"
        print(f"[{prompt}] plan: {plan}{status}")
        captions.append(f"{prompt} | {plan}")
    out = args.out or os.path.join(args.run_dir, "generate.png")
    save_grid(images, captions, out, cols=args.n)
    print(f"wrote {out}  (sampling: {asdict(sample_cfg)})")


if __name__ == "__main__":
    main()
