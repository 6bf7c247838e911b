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

Usage (after `python train.py tiny_configs/shapes_cpu.toml`):
    python generate.py out/shapes_cpu "a red circle" "three blue squares" "a square the colour of grass"
    python generate.py out/shapes_cpu "two triangles" --n 8 --seed 1 --cfg_scale 1 --out out/two.png
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
from model import GPT, VQ, GPTConfig, KVCache, VQConfig, load_lora, merge_lora


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
