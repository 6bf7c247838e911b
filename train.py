"""
Every training stage of nanoloom behind one command. Stages, in order:
    tokenizer  word-level text tokenizer trained on the shapes world's text  -> tokenizer.json
    vq         VQ image tokenizer trained on rendered scenes                  -> vq.safetensors
    lm         the unified GPT pretrained on the token-sequence mix           -> gpt.safetensors
    rewards    the reward heads (rewards.py) and their calibration            -> rewards.safetensors
    eval       benchmarks on held-out prompts, sample grid, report            -> report.json, report.md
A finished stage is reused (its output file exists): to redo one, delete its file and run again, or
name later stages alone with --stages once the earlier ones are done. The eval stage always runs.

    python train.py tiny_configs/shapes_cpu.toml                     # the CPU demo, ~10 minutes
    python train.py tiny_configs/micro.toml --train.out_dir=out/micro  # seconds; what the tests use
    python train.py tiny_configs/shapes_cpu.toml --stages=eval          # re-score a finished run
    python train.py tiny_configs/shapes_cpu.toml --train.lm_steps=300 --train.out_dir=out/short

Overrides are `--section.key=value` for any key of the config file's sections ([train], [vq], [gpt],
[sample], [rewards]); an unknown key or a value of the wrong type stops with a message naming it.
"""

import argparse
import dataclasses
import difflib
import json
import math
import os
import time
import tomllib
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

import data
import evaluate
import posttrain
import rewards
from data import FORMATS, Vocab, build_sequence, grid_positions
from generate import RunError, SampleConfig, load_run, load_weights, save_grid
from model import GPT, VQ, GPTConfig, VQConfig, add_lora, lora_state_dict, merge_lora, unmerge_lora
from posttrain import PostConfig

STAGES = ("tokenizer", "vq", "lm", "rewards", "eval", "post")  # the main job
EXTRA_STAGES = ("ablations",)  # run only when named: --stages=ablations


@dataclass
class TrainConfig:
    out_dir: str = "out/shapes_cpu"  # everything the run makes goes here
    seed: int = 0  # seeds data generation, initialisation and sampling
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "float32"  # float32 | bfloat16 (autocast, where the device supports it)
    compile: bool = False  # torch.compile the GPT for training (opt-in: slow to start, helps on GPU)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    tokenizer_corpus: int = 1000  # examples per category in the tokenizer's corpus (every word list is in it too)
    # VQ stage
    vq_images: int = 20000  # rendered training scenes
    vq_steps: int = 1500
    vq_batch: int = 64
    vq_lr: float = 3e-3
    vq_warmup: int = 200  # steps as a plain autoencoder; then the codebook starts from its encodings
    vq_restart_every: int = 25  # steps between dead-code restarts (0 = never)
    vq_eval_scenes: int = 500  # held-out scenes for the parser round-trip figure
    # LM stage
    lm_examples: int = 30000  # pretraining examples (prompt, plan, caption, image codes)
    lm_steps: int = 2500
    lm_batch: int = 32
    lm_lr: float = 3e-3
    lm_min_lr: float = 3e-4  # cosine schedule ends here
    lm_warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    p_plan: float = 0.8  # format mix: text->image with a plan ...
    p_direct: float = 0.1  # ... text->image without a plan; the rest is image->text captions
    null_prob: float = 0.1  # text->image sequences whose condition becomes <null> (for guidance)
    eval_every: int = 250  # steps between held-out loss measurements
    eval_examples: int = 256  # held-out (dev split) examples for that loss
    # eval stage
    bench_prompts: int = 50  # prompts per benchmark task
    bench_samples: int = 4  # samples per prompt
    eval_batch: int = 128  # prompts sampled together
    ablation_seeds: int = 3  # post-training seeds per variant in --stages=ablations
    focus_prompts: int = 150  # ablations: bench prompts of the weakest category, x 4 samples x 2 seeds


SECTIONS = {"train": TrainConfig, "vq": VQConfig, "gpt": GPTConfig, "sample": SampleConfig, "rewards": rewards.RewardsConfig,
            "post": PostConfig}
DERIVED = {("gpt", "vocab_size"), ("gpt", "image_offset"), ("gpt", "n_image_tokens")}  # set from tokenizer + VQ


# -----------------------------------------------------------------------------
# configuration: plain TOML files, command-line overrides, strict checking


class ConfigError(ValueError):
    pass


def _coerce(section, key, value, typ, from_cli):
    """Check (file) or parse (command line) a value against the dataclass field's type."""
    where = f"{section}.{key}"
    if from_cli:
        try:
            if typ is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return typ(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r}: expected a {typ.__name__}") from None
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True  # 1 is a fine float
    if not ok:
        raise ConfigError(f"{where} = {value!r} is a {type(value).__name__}, expected a {typ.__name__}")
    return value


def _set(cfgs, section, key, value, from_cli):
    if section not in SECTIONS:
        hint = difflib.get_close_matches(section, SECTIONS, n=1)
        raise ConfigError(f"unknown config section [{section}]" + (f"; did you mean [{hint[0]}]?" if hint else f"; sections: {', '.join(SECTIONS)}"))
    types = {f.name: f.type for f in dataclasses.fields(SECTIONS[section])}
    if key not in types:
        hint = difflib.get_close_matches(key, types, n=1)
        raise ConfigError(f"unknown config key {section}.{key}" + (f"; did you mean {section}.{hint[0]}?" if hint else ""))
    if (section, key) in DERIVED:
        raise ConfigError(f"{section}.{key} is derived from the tokenizer and the VQ; it cannot be set")
    setattr(cfgs[section], key, _coerce(section, key, value, types[key], from_cli))


def validate(cfgs):
    """Values that type-check but cannot work, refused before any work is done."""
    tc, vc, rc, pc = cfgs["train"], cfgs["vq"], cfgs["rewards"], cfgs["post"]
    rules = [
        (tc.device in ("auto", "cpu", "cuda", "mps"), f"train.device={tc.device!r}: expected auto, cpu, cuda or mps"),
        (tc.dtype in ("float32", "bfloat16"), f"train.dtype={tc.dtype!r}: expected float32 or bfloat16"),
        (min(tc.vq_steps, tc.lm_steps, tc.eval_every, tc.vq_batch, tc.lm_batch, tc.bench_prompts, tc.bench_samples) >= 1,
         "train.vq_steps, lm_steps, eval_every, vq_batch, lm_batch, bench_prompts and bench_samples must be >= 1"),
        (tc.lm_examples >= tc.lm_batch and tc.eval_examples >= tc.lm_batch, "train.lm_examples and train.eval_examples must be >= train.lm_batch"),
        (0 <= tc.p_plan and 0 <= tc.p_direct and tc.p_plan + tc.p_direct <= 1, "train.p_plan + train.p_direct must lie in [0, 1] (the rest are captions)"),
        (0 <= tc.null_prob <= 1, "train.null_prob must lie in [0, 1]"),
        (vc.image_size % vc.patch == 0 and vc.image_size % (2 * data.LATTICE) == 0,
         f"vq.image_size={vc.image_size} must be a multiple of vq.patch={vc.patch} and of {2 * data.LATTICE} (the world's layout lattice)"),
        (rc.dim % 4 == 0 and min(rc.dim, rc.layers, rc.batch) >= 2 and rc.examples >= rc.batch,
         "rewards.dim must be a multiple of 4 (attention heads), rewards.layers and rewards.batch >= 2, rewards.examples >= rewards.batch"),
        (min(rc.calib_examples, rc.calib_samples) >= 2, "rewards.calib_examples and rewards.calib_samples must be >= 2"),
        (0 <= rc.p_vq <= 1, "rewards.p_vq must lie in [0, 1]"),
        (pc.strategy in posttrain.STRATEGIES, f"post.strategy={pc.strategy!r}: expected one of {', '.join(posttrain.STRATEGIES)}"),
        (pc.weighting in posttrain.WEIGHTINGS, f"post.weighting={pc.weighting!r}: expected one of {', '.join(posttrain.WEIGHTINGS)}"),
        (0 <= pc.null_prob <= 1, "post.null_prob must lie in [0, 1]"),
        (min(tc.ablation_seeds, tc.focus_prompts) >= 1, "train.ablation_seeds and train.focus_prompts must be >= 1"),
        (min(pc.rounds, pc.prompts, pc.samples, pc.steps, pc.batch, pc.lora_r, pc.eval_samples) >= 1,
         "post.rounds, prompts, samples, steps, batch, lora_r and eval_samples must be >= 1"),
        (pc.beta > 0 and pc.lr > 0 and min(pc.alpha_text, pc.alpha_image, pc.pretrain_weight) >= 0 and pc.alpha_text + pc.alpha_image > 0,
         "post.beta and post.lr must be > 0; post.alpha_text, alpha_image, pretrain_weight >= 0, not both alphas 0"),
    ]
    try:
        rewards.parse_spec(pc.reward)
    except rewards.RewardError as e:
        raise ConfigError(f"post.reward: {e}") from None
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)


def load_config(path, overrides=()):
    """A TOML file plus `section.key=value` overrides -> {section: dataclass}."""
    cfgs = {name: cls() for name, cls in SECTIONS.items()}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} not found (the shipped ones are in tiny_configs/)")
        with open(path, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path} is not valid TOML: {e}") from None
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            for key, value in table.items():
                _set(cfgs, section, key, value, from_cli=False)
    for item in overrides:
        name, eq, value = item.lstrip("-").partition("=")
        section, dot, key = name.partition(".")
        if not eq or not dot:
            raise ConfigError(f"override {item!r} must look like --section.key=value, e.g. --train.lm_steps=300")
        _set(cfgs, section, key, value, from_cli=True)
    validate(cfgs)
    return cfgs


# -----------------------------------------------------------------------------
# small utilities


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return name


def autocast(cfg, device):
    """bf16 autocast only where the hardware has it; float32 otherwise."""
    if cfg.dtype == "bfloat16" and (device == "cuda" and torch.cuda.is_bf16_supported() or device == "cpu"):
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return torch.autocast(device_type=device, enabled=False)


def save_atomic(tensors, path, metadata=None):
    """safetensors write via a temporary file and a rename: a kill mid-write never leaves a corrupt file."""
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def cosine_lr(step, cfg):
    """Linear warm-up, then cosine decay from lm_lr to lm_min_lr."""
    if step < cfg.lm_warmup:
        return cfg.lm_lr * (step + 1) / cfg.lm_warmup
    t = min(1.0, (step - cfg.lm_warmup) / max(1, cfg.lm_steps - cfg.lm_warmup))
    return cfg.lm_min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (cfg.lm_lr - cfg.lm_min_lr)


class Metrics:
    """JSON lines in RUN_DIR/metrics.jsonl: one object per measurement."""

    def __init__(self, path):
        self.path = path

    def log(self, **kv):
        with open(self.path, "a") as f:
            f.write(json.dumps(kv) + "\n")


def to_tensor_images(images):
    """uint8 numpy (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0


# -----------------------------------------------------------------------------
# stage: tokenizer


def stage_tokenizer(cfgs, run_dir):
    path = os.path.join(run_dir, "tokenizer.json")
    tok = data.train_tokenizer(path + ".tmp", n=cfgs["train"].tokenizer_corpus, seed=cfgs["train"].seed)
    os.replace(path + ".tmp", path)  # atomic: a half-written tokenizer is never mistaken for a finished stage
    return {"vocab_size": tok.get_vocab_size()}


# -----------------------------------------------------------------------------
# stage: vq


def scene_images(n, seed, image_size, split):
    rng = np.random.default_rng(seed)
    return np.stack([data.render(data.sample_example(rng, split=split).scene, image_size) for _ in range(n)])


def parser_agreement(vq, images, device):
    """The VQ round trip (encode to codes, decode) judged by the parser: the fraction of scenes whose
    reconstruction parses to the same objects (shape and colour of each, so also how many) as the
    original, which is what the benchmarks need the VQ to keep; and the fraction that parses to exactly
    the same scene (sizes and cells too)."""
    recon, codes = [], []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            codes.append(vq.encode(to_tensor_images(images[i:i + 256]).to(device)))
            recon.append((vq.decode(codes[-1]) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    recon = np.concatenate(recon)
    objects = lambda scene: sorted((o.shape, o.colour) for o in scene.objects)
    pairs = list(zip(data.parse_batch(images), data.parse_batch(recon)))
    same_objects, same_scene = np.mean([objects(a) == objects(b) for a, b in pairs]), np.mean([a == b for a, b in pairs])
    return float(same_objects), float(same_scene), recon, torch.cat(codes)


def stage_vq(cfgs, run_dir, device, metrics):
    tc, vc = cfgs["train"], cfgs["vq"]
    torch.manual_seed(tc.seed)
    train_imgs = to_tensor_images(scene_images(tc.vq_images, tc.seed, vc.image_size, "train"))
    held_out = scene_images(tc.vq_eval_scenes, tc.seed + 1, vc.image_size, "dev")
    vq = VQ(vc).to(device)
    # the codebook learns 10x slower than the networks: Adam moves every parameter at about the learning
    # rate whatever its gradient, and codes that drift that fast keep swapping their patches
    book = [vq.codebook.weight]
    nets = [p for n, p in vq.named_parameters() if n != "codebook.weight"]
    opt = torch.optim.Adam([{"params": nets, "lr": tc.vq_lr}, {"params": book, "lr": 0.1 * tc.vq_lr}])
    g = torch.Generator().manual_seed(tc.seed)
    encodings = lambda x: F.normalize(vq.encoder(x * 2 - 1), dim=1).permute(0, 2, 3, 1).reshape(-1, vc.code_dim)
    vq.train()
    for step in (bar := tqdm(range(tc.vq_steps), desc="vq", mininterval=2)):
        x = train_imgs[torch.randint(0, len(train_imgs), (tc.vq_batch,), generator=g)].to(device)
        if step == tc.vq_warmup:
            # a codebook drawn at random, before the encoder means anything, collapses onto the white
            # background; one spread over a warmed-up encoder's outputs does not
            with torch.no_grad():
                sample = train_imgs[torch.randint(0, len(train_imgs), (512,), generator=g)].to(device)
                vq.init_codebook(encodings(sample))
            vq.usage.zero_()
        recon, losses, _ = vq(x, quantize=step >= tc.vq_warmup)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step > tc.vq_warmup and tc.vq_restart_every and (step + 1) % tc.vq_restart_every == 0 and step + 1 < tc.vq_steps * 0.8:
            with torch.no_grad():
                restarted = vq.restart_dead_codes(encodings(x))
            metrics.log(stage="vq", step=step + 1, restarted_codes=restarted)
        if step % 50 == 0 or step == tc.vq_steps - 1:
            bar.set_postfix(recon=f"{losses['recon'].item():.4f}")
            metrics.log(stage="vq", step=step, **{k: round(v.item(), 5) for k, v in losses.items()})
    vq.eval()
    agreement, exact, recon, codes = parser_agreement(vq, held_out, device)
    counts = torch.bincount(codes.flatten(), minlength=vc.codebook_size).float()
    p = counts / counts.sum()
    usage = {"codes_used": float((counts > 0).float().mean()), "perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))}
    save_atomic(vq.state_dict(), os.path.join(run_dir, "vq.safetensors"))
    n = 16
    save_grid(list(held_out[:n]) + list(recon[:n]), ["original"] * n + ["reconstruction"] * n, os.path.join(run_dir, "vq_recon.png"))
    recon_l1 = float(np.abs(held_out.astype(np.float32) - recon.astype(np.float32)).mean() / 255)
    return {"parser_agreement": agreement, "parser_exact_scene": exact, "held_out_scenes": len(held_out), "recon_l1": recon_l1, **usage}


# -----------------------------------------------------------------------------
# stage: lm


class LMData:
    """Pretraining examples held as token ids: prompt, plan, caption, image codes."""

    def __init__(self, n, seed, split, tokenizer, vq, device):
        rng = np.random.default_rng(seed)
        examples = [data.sample_example(rng, split=split) for _ in tqdm(range(n), desc=f"{split} examples", mininterval=2)]
        enc = lambda s: data.encode_text(tokenizer, s)
        self.prompt = [enc(e.prompt) for e in examples]
        self.plan = [enc(data.plan_text(e.scene, e.spec)) for e in examples]
        self.caption = [enc(data.caption_text(e.scene, rng)) for e in examples]
        codes = []
        with torch.no_grad():
            for i in range(0, n, 512):
                imgs = np.stack([data.render(e.scene, vq.cfg.image_size) for e in examples[i:i + 512]])
                codes.append(vq.encode(to_tensor_images(imgs).to(device)).cpu())
        self.codes = torch.cat(codes).tolist()

    def __len__(self):
        return len(self.codes)


def epoch_batches(ds, rng, tc):
    """One epoch as batches of (example, format, null) items. Each example draws its format from the
    mix; batches are made of examples of similar length (sorted within windows of 16 batches, then
    shuffled), so little compute goes to padding."""
    p_caption = 1.0 - tc.p_plan - tc.p_direct
    fmts = rng.choice(len(FORMATS), size=len(ds), p=[tc.p_plan, tc.p_direct, p_caption])
    nulls = rng.random(len(ds)) < tc.null_prob
    items = [(int(i), FORMATS[fmts[i]], bool(nulls[i]) and FORMATS[fmts[i]] != "caption") for i in rng.permutation(len(ds))]
    length = lambda it: len(ds.caption[it[0]]) if it[1] == "caption" else len(ds.prompt[it[0]]) + len(ds.plan[it[0]]) * (it[1] == "plan")
    window = 16 * tc.lm_batch
    batches = []
    for w in range(0, len(items) - tc.lm_batch + 1, window):
        chunk = sorted(items[w:w + window], key=length)
        batches += [chunk[b:b + tc.lm_batch] for b in range(0, len(chunk) - tc.lm_batch + 1, tc.lm_batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


def make_batch(ds, items, vocab, device):
    """(example, format, null) items -> right-padded tensors x, y, loss weight, grid, modality (B, T)."""
    seqs = [build_sequence(fmt, vocab, ds.prompt[i], ds.plan[i], ds.codes[i], ds.caption[i], null=null) for i, fmt, null in items]
    T = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), T), data.PAD, dtype=torch.long)
    tgt = torch.zeros(len(seqs), T)
    grid = torch.full((len(seqs), T), -1, dtype=torch.long)
    mod = torch.zeros(len(seqs), T, dtype=torch.long)
    for r, (s, m, t) in enumerate(seqs):
        ids[r, :len(s)], mod[r, :len(s)], tgt[r, :len(s)] = torch.tensor(s), torch.tensor(m), torch.tensor(t, dtype=torch.float)
        grid[r, :len(s)] = torch.tensor(grid_positions(s, vocab))
    out = ids[:, :-1], ids[:, 1:], tgt[:, 1:], grid[:, :-1], mod[:, 1:]
    return [t.to(device) for t in out]


def lm_loss(model, batch):
    """Mean cross-entropy over target tokens; also the text and image parts separately (for the log)."""
    x, y, w, grid, mod = batch
    logits = model(x, grid=grid)
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(w)  # (B, T)
    loss = (ce * w).sum() / w.sum()
    with torch.no_grad():
        parts = {name: ((ce * w * (mod == m)).sum() / (w * (mod == m)).sum().clamp(min=1)).item()
                 for name, m in (("text", data.TEXT), ("image", data.IMAGE))}
    return loss, parts


def stage_lm(cfgs, run_dir, device, metrics):
    tc, gc = cfgs["train"], cfgs["gpt"]
    tokenizer = data.load_tokenizer(os.path.join(run_dir, "tokenizer.json"))
    vq = load_weights(VQ(cfgs["vq"]).to(device), os.path.join(run_dir, "vq.safetensors")).eval()
    vocab = Vocab(tokenizer.get_vocab_size(), cfgs["vq"].codebook_size)
    torch.manual_seed(tc.seed)
    model = GPT(gc).to(device)
    print(f"GPT: {model.num_params() / 1e6:.2f}M parameters, vocabulary {vocab.size} ({vocab.text_size} text + {vocab.codebook_size} codes)")
    train_ds = LMData(tc.lm_examples, tc.seed, "train", tokenizer, vq, device)
    val_ds = LMData(tc.eval_examples, tc.seed + 1, "dev", tokenizer, vq, device)
    longest = max(len(p) + len(q) for p, q in zip(train_ds.prompt, train_ds.plan)) + vq.cfg.n_codes + 5  # + specials
    if longest > gc.block_size:
        raise ConfigError(f"the longest training sequence has {longest} tokens > gpt.block_size={gc.block_size}: raise gpt.block_size")
    val_batches = [make_batch(val_ds, b, vocab, device) for b in epoch_batches(val_ds, np.random.default_rng(tc.seed + 2), tc)]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.lm_lr, betas=(0.9, 0.95), fused=device == "cuda")
    step_fn = torch.compile(model) if tc.compile else model
    rng = np.random.default_rng(tc.seed)
    batches, tokens, t0 = [], 0, time.time()

    def evaluate_loss():
        model.eval()
        with torch.no_grad(), autocast(tc, device):
            res = [lm_loss(model, b) for b in val_batches]
        model.train()
        return {"val_loss": float(np.mean([r[0].item() for r in res])),
                "val_text": float(np.mean([r[1]["text"] for r in res])), "val_image": float(np.mean([r[1]["image"] for r in res]))}

    model.train()
    for step in (bar := tqdm(range(tc.lm_steps), desc="lm", mininterval=2)):
        if not batches:  # a new epoch: new formats, a new shuffle
            batches = epoch_batches(train_ds, rng, tc)
        batch = make_batch(train_ds, batches.pop(), vocab, device)
        lr = cosine_lr(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(tc, device):
            loss, parts = lm_loss(step_fn, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        tokens += int(batch[2].numel())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            metrics.log(stage="lm", step=step, lr=lr, loss=loss.item(), **parts)
        if (step + 1) % tc.eval_every == 0 or step == tc.lm_steps - 1:
            ev = evaluate_loss()
            metrics.log(stage="lm", step=step + 1, **ev)
            tqdm.write(f"step {step + 1}: train {loss.item():.3f}  held-out {ev['val_loss']:.3f} (text {ev['val_text']:.3f}, image {ev['val_image']:.3f})")
    seconds = time.time() - t0
    save_atomic(model.state_dict(), os.path.join(run_dir, "gpt.safetensors"))
    return {"params": model.num_params(), "train_loss": loss.item(), **ev, "tokens_per_s": tokens / seconds, "steps": tc.lm_steps}


# -----------------------------------------------------------------------------
# stage: rewards


def stage_rewards(cfgs, run_dir, device, metrics):
    tc, rc = cfgs["train"], cfgs["rewards"]
    tokenizer = data.load_tokenizer(os.path.join(run_dir, "tokenizer.json"))
    vq = load_weights(VQ(cfgs["vq"]).to(device), os.path.join(run_dir, "vq.safetensors")).eval()
    heads, figures = rewards.train_heads(rc, tokenizer, vq, tc.seed, device, log=lambda **kv: metrics.log(stage="rewards", **kv))
    save_atomic(heads.state_dict(), os.path.join(run_dir, rewards.HEADS_FILE), rewards.heads_metadata(heads))
    figures["calibration"] = cal = rewards.calibrate(run_dir, device, rc.calib_examples, rc.calib_samples, tc.seed)
    print(rewards.table(cal))
    return figures


# -----------------------------------------------------------------------------
# stage: eval


def stage_eval(cfgs, run_dir, device):
    tc = cfgs["train"]
    _, tokenizer, vocab, vq, gpt = load_run(run_dir, device)
    return evaluate.run_all(gpt, vq, vocab, tokenizer, cfgs["sample"], run_dir, n_prompts=tc.bench_prompts,
                            n_samples=tc.bench_samples, batch=tc.eval_batch, seed=tc.seed)


# -----------------------------------------------------------------------------
# stage: post (the algorithm is in posttrain.py)


def images_tensor(images, device):
    return to_tensor_images(np.stack(images)).to(device)


def save_round(samples, scores, path):
    """One round's self-generated samples and their scores, as safetensors (-1 pads the id lists;
    codes are all -1 where no image was drawn) plus a JSON of the prompts: cached for inspection and
    for re-weighting them under another reward without sampling again."""
    def pad(lists):
        width = max([len(x) for x in lists if x is not None] + [1])
        out = torch.full((len(lists), width), -1, dtype=torch.long)
        for i, x in enumerate(lists):
            if x:
                out[i, :len(x)] = torch.tensor(x)
        return out
    tensors = {"example": torch.tensor(samples["example"]), "prompt": pad(samples["prompt"]), "plan": pad(samples["plan"]),
               "codes": pad(samples["codes"]), "image": torch.from_numpy(np.stack(samples["image"])),
               **{k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in scores.items()}}
    save_atomic(tensors, path)


def post_train(cfgs, run_dir, device, metrics, pc, seed, adapter="post", log_prefix="post"):
    """Rounds of generate -> score -> weight -> fine-tune a fresh LoRA adapter on the run's GPT. Returns
    the run's (gpt with the adapter enabled, tokenizer, vocab, vq), the adapter's parameters and the
    per-round figures."""
    tc = cfgs["train"]
    _, tokenizer, vocab, vq, gpt = load_run(run_dir, device)
    wpath = os.path.join(run_dir, "weakness.json")
    weakness = json.load(open(wpath)) if os.path.exists(wpath) else None
    params = add_lora(gpt, adapter, tuple(pc.lora_targets.split(",")), pc.lora_r, pc.lora_alpha, pc.lora_dropout)
    rng = np.random.default_rng([seed, 1])
    torch.manual_seed(seed)
    drift_batch = None
    if pc.pretrain_weight > 0:  # a small pretraining set, for the anti-drift term
        ds = LMData(min(tc.lm_examples, 50 * pc.batch), seed, "train", tokenizer, vq, device)
        queue = []

        def drift_batch():
            if not queue:
                queue.extend(epoch_batches(ds, rng, dataclasses.replace(tc, lm_batch=pc.batch)))
            return make_batch(ds, queue.pop(), vocab, device)
    rounds = []
    for k in range(pc.rounds):
        t0 = time.time()
        examples = posttrain.draw_prompts(pc.strategy, pc.prompts, rng, weakness, pc.focus)
        reward_fn = rewards.load_reward(run_dir, pc.reward, device, specs={ex.prompt: ex.spec for ex in examples})
        merge_lora(gpt)  # sample with the adapter folded into the weights: same outputs, fewer matmuls
        samples = posttrain.self_generate(gpt, vq, vocab, tokenizer, examples, pc.samples, cfgs["sample"], seed * 1000 + k * 100_000, tc.eval_batch)
        unmerge_lora(gpt)
        prompts = [examples[i].prompt for i in samples["example"]]
        with torch.no_grad():
            r = torch.cat([reward_fn(images_tensor(samples["image"][i:i + 256], device), prompts[i:i + 256]).cpu()
                           for i in range(0, len(prompts), 256)]).numpy()
        v = posttrain.verifier_scores(samples["image"], examples, samples["example"])
        w = posttrain.sample_weights(r, samples["example"], pc.weighting, pc.beta, pc.threshold)
        os.makedirs(os.path.dirname(os.path.join(run_dir, log_prefix)), exist_ok=True)
        save_round(samples, {"reward": r, "verifier": v, "weight": w}, os.path.join(run_dir, f"{log_prefix}_round{k}.safetensors"))
        write_json([{"prompt": ex.prompt, "category": ex.category, "kind": ex.kind} for ex in examples],
                   os.path.join(run_dir, f"{log_prefix}_round{k}.json"))
        fit = posttrain.finetune(gpt, params, samples, w, pc, vocab, device, rng, drift_batch, lambda m, b: lm_loss(m, b)[0])
        figs = {"round": k, "reward": float(r.mean()), "verifier": float(v.mean()),
                "verifier_weighted": float((w * v).sum() / max(w.sum(), 1e-9)),  # what the fine-tune imitates
                "categories": {c: float(np.mean([v[j] for j, i in enumerate(samples["example"]) if examples[i].category == c]))
                               for c in sorted({ex.category for ex in examples})},
                **fit, "seconds": round(time.time() - t0, 1)}
        rounds.append(figs)
        metrics.log(stage=log_prefix, **{key: val for key, val in figs.items() if key != "categories"})
        tqdm.write(f"[{log_prefix}] round {k}: reward {figs['reward']:.3f}, verifier {figs['verifier']:.3f} "
                   f"(weighted {figs['verifier_weighted']:.3f}), loss {fit['loss']:.3f}, {figs['seconds']:.0f}s")
    return gpt, tokenizer, vocab, vq, params, rounds


def hacking(rounds):
    """A proxy reward that rises over the rounds while the exact verifier stays flat or falls."""
    if len(rounds) < 2:
        return False
    return rounds[-1]["reward"] > rounds[0]["reward"] and rounds[-1]["verifier"] <= rounds[0]["verifier"]


def stage_post(cfgs, run_dir, device, metrics, report):
    tc, pc = cfgs["train"], cfgs["post"]
    if not report.get("benchmarks"):
        raise ConfigError("the post stage compares against the eval stage's benchmarks: run --stages=eval first")
    gpt, tokenizer, vocab, vq, _, rounds = post_train(cfgs, run_dir, device, metrics, pc, tc.seed)
    save_atomic(lora_state_dict(gpt, "post"), os.path.join(run_dir, "lora_post.safetensors"))
    write_json(asdict(pc), os.path.join(run_dir, "lora_post.json"))
    merge_lora(gpt)
    after = evaluate.run_all(gpt, vq, vocab, tokenizer, cfgs["sample"], run_dir, n_prompts=tc.bench_prompts,
                             n_samples=pc.eval_samples, batch=tc.eval_batch, seed=tc.seed, prefix="post_")
    post = {"config": asdict(pc), "rounds": rounds, "reward_hacking": hacking(rounds),
            "before": report["benchmarks"], "after": after["benchmarks"],
            "weakness_before": report.get("weakness"), "weakness_after": after["weakness"]}
    return {"rounds": len(rounds), "final_reward": rounds[-1]["reward"], "final_verifier": rounds[-1]["verifier"]}, post


# -----------------------------------------------------------------------------
# extra stage: ablations (not part of the main job)

ABLATIONS = {  # variant -> [post] overrides of the run's config; each post-trains a fresh adapter from the base
    "both": {},  # the run's [post] config (default: targeted prompts, rwr, both modalities, vqa reward)
    "text_only": {"alpha_image": 0.0},
    "image_only": {"alpha_text": 0.0},
    "uniform": {"weighting": "uniform"},  # plain self-training on the same samples: the control
    "broad": {"strategy": "broad"},
    "aligned": {"strategy": "aligned"},
    "oracle": {"reward": "verifier"},  # the exact verifier as reward: the upper bound of a learned reward
}
ABLATION_TABLES = {"modality weighting": ["both", "text_only", "image_only", "uniform"],
                   "data strategy": ["broad", "aligned", "both"], "reward": ["both", "oracle", "uniform"]}


def stage_ablations(cfgs, run_dir, device, metrics, report):
    """Every variant of ABLATIONS x train.ablation_seeds post-training seeds, from the same pretrained
    base. Each is measured on the base's weakest dev category (focus_score: focus_prompts x 4 samples
    x 2 sampling seeds = 1,200 samples) and on the four benchmarks (bench_prompts x 1 sample, 2 for oneig):
    about 2 minutes a run on 2 CPU cores, 7 variants x 3 seeds."""
    tc = cfgs["train"]
    weak = report.get("weakness")
    if not weak:
        raise ConfigError("ablations need the eval stage's weakness report: run --stages=eval first")
    focus = weak["categories"][0]["name"].split("/")[0]  # knowledge kinds are measured as all of knowledge
    _, tokenizer, vocab, vq, base = load_run(run_dir, device)
    measure = lambda gpt: {
        "focus": evaluate.focus_score(gpt, vq, vocab, tokenizer, cfgs["sample"], focus, tc.focus_prompts, batch=tc.eval_batch),
        "benchmarks": evaluate.score_benchmarks(gpt, vq, vocab, tokenizer, cfgs["sample"], tc.bench_prompts, 1, tc.eval_batch, tc.seed)[0]}
    results = {"focus_category": focus, "base": measure(base), "runs": {}}
    for seed in range(tc.ablation_seeds):
        for name, overrides in ABLATIONS.items():
            t0 = time.time()
            pc = dataclasses.replace(cfgs["post"], **overrides)
            gpt, *_, rounds = post_train(cfgs, run_dir, device, metrics, pc, seed=1000 + seed, log_prefix=f"ablations/{name}_s{seed}")
            merge_lora(gpt)
            res = {**measure(gpt), "rounds": rounds, "seconds": round(time.time() - t0, 1)}
            results["runs"].setdefault(name, []).append(res)
            print(f"[ablations] {name} seed {seed}: {focus} {res['focus']['pass_rate']:.3f} "
                  f"(base {results['base']['focus']['pass_rate']:.3f}), {res['seconds']:.0f}s")
            write_json(results, os.path.join(run_dir, "ablations", "ablations.json"))  # after every run: an interrupted sweep keeps its results
    summary = evaluate.ablation_summary(results, ABLATION_TABLES)
    with open(os.path.join(run_dir, "ablations", "ablations.md"), "w") as f:
        f.write(summary + "\n")
    print(summary)
    return {"variants": len(ABLATIONS), "seeds": tc.ablation_seeds, "focus_category": focus}


# -----------------------------------------------------------------------------
# driver


def resolved_config(cfgs):
    return {name: asdict(c) for name, c in cfgs.items()}


def derive_sizes(cfgs, run_dir):
    """The GPT's vocabulary is the tokenizer's plus the codebook; its image length is the VQ grid."""
    path = os.path.join(run_dir, "tokenizer.json")
    if os.path.exists(path):
        cfgs["gpt"].image_offset = data.load_tokenizer(path).get_vocab_size()
    cfgs["gpt"].vocab_size = cfgs["gpt"].image_offset + cfgs["vq"].codebook_size
    cfgs["gpt"].n_image_tokens = cfgs["vq"].n_codes


def check_run_dir(run_dir, cfg_json):
    """Refuse to mix a run directory's finished stages with another config."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    keep = ("out_dir", "bench_prompts", "bench_samples", "eval_batch", "threads", "device", "eval_every",
            "calib_examples", "calib_samples")  # free to change
    # the reward heads come after the GPT: their settings matter only once they are trained
    sections = ("train", "vq", "gpt") + ("rewards",) * os.path.exists(os.path.join(run_dir, rewards.HEADS_FILE))
    diff = [f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {v!r}" for s in sections for k, v in cfg_json[s].items()
            if (s, k) not in DERIVED and k not in keep and old.get(s, {}).get(k) != v]
    if diff and all(d.startswith("rewards.") for d in diff):
        raise ConfigError(f"{run_dir} holds reward heads trained with another config ({'; '.join(diff[:5])}). "
                          f"Delete {os.path.join(run_dir, rewards.HEADS_FILE)} to retrain them, or use another --train.out_dir.")
    post_path = os.path.join(run_dir, "lora_post.json")
    if not diff and os.path.exists(post_path):
        old_post = json.load(open(post_path))
        diff = [f"post.{k}: {old_post.get(k)!r} -> {v!r}" for k, v in cfg_json["post"].items() if k != "eval_samples" and old_post.get(k) != v]
        if diff:
            raise ConfigError(f"{run_dir}/lora_post.safetensors was post-trained with another [post] config ({'; '.join(diff[:5])}). "
                              f"Delete {run_dir}/lora_post.safetensors (and .json) to post-train again, or use another --train.out_dir.")
    if diff:
        raise ConfigError(f"{run_dir} holds a run made with another config ({'; '.join(diff[:5])}). "
                          f"Use another --train.out_dir, or delete {run_dir} to start again.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a TOML file from tiny_configs/")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    args, overrides = p.parse_known_args(argv)
    try:
        cfgs = load_config(args.config, overrides)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        bad = [s for s in stages if s not in STAGES + EXTRA_STAGES]
        if bad:
            raise ConfigError(f"unknown stage(s) {bad}; stages are {', '.join(STAGES + EXTRA_STAGES)}")
        tc = cfgs["train"]
        device = pick_device(tc.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        run_dir = tc.out_dir
        cfg_json = resolved_config(cfgs)
        check_run_dir(run_dir, cfg_json)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    os.makedirs(run_dir, exist_ok=True)
    metrics = Metrics(os.path.join(run_dir, "metrics.jsonl"))
    report_path = os.path.join(run_dir, "report.json")
    report = json.load(open(report_path)) if os.path.exists(report_path) else {"benchmarks": {}, "stages": {}}
    outputs = {"tokenizer": "tokenizer.json", "vq": "vq.safetensors", "lm": "gpt.safetensors", "rewards": rewards.HEADS_FILE,
               "post": "lora_post.safetensors"}
    t_all = time.time()
    print(f"run {run_dir} on {device}; stages {', '.join(stages)}")
    for stage in stages:
        out = outputs.get(stage)
        if out and os.path.exists(os.path.join(run_dir, out)):
            print(f"[{stage}] reusing {os.path.join(run_dir, out)}")
            continue
        needs = STAGES[:STAGES.index(stage)] if stage in STAGES else [s for s in STAGES if s != "post"]
        missing = [s for s in needs if s in outputs and not os.path.exists(os.path.join(run_dir, outputs[s]))]
        if missing:
            raise SystemExit(f"stage {stage} needs the {missing[0]} stage first: run with --stages={','.join(missing + [stage])}")
        derive_sizes(cfgs, run_dir)
        t0 = time.time()
        print(f"[{stage}] start")
        try:
            if stage == "tokenizer":
                figures = stage_tokenizer(cfgs, run_dir)
            elif stage == "vq":
                figures = stage_vq(cfgs, run_dir, device, metrics)
            elif stage == "lm":
                figures = stage_lm(cfgs, run_dir, device, metrics)
            elif stage == "rewards":
                figures = stage_rewards(cfgs, run_dir, device, metrics)
            elif stage == "ablations":
                figures = stage_ablations(cfgs, run_dir, device, metrics, report)
            elif stage == "post":
                figures, report["post"] = stage_post(cfgs, run_dir, device, metrics, report)
            else:
                figures = stage_eval(cfgs, run_dir, device)
                report["benchmarks"] = figures.pop("benchmarks")
                report["weakness"] = figures.pop("weakness")
                write_json(report["weakness"], os.path.join(run_dir, "weakness.json"))
        except (RunError, ConfigError, rewards.RewardError) as e:
            raise SystemExit(f"error: {e}")
        derive_sizes(cfgs, run_dir)
        write_json(resolved_config(cfgs), os.path.join(run_dir, "config.json"))
        figures["seconds"] = round(time.time() - t0, 1)
        report["stages"][stage] = figures
        write_json(report, report_path)
        print(f"[{stage}] done in {figures['seconds']:.0f}s: " + json.dumps({k: v for k, v in figures.items() if not isinstance(v, dict)}))
    evaluate.write_report_md(report, os.path.join(run_dir, "report.md"))
    if report["benchmarks"]:
        print(evaluate.table(report["benchmarks"]))
    print(f"total {time.time() - t_all:.0f}s; report in {report_path} and {os.path.join(run_dir, 'report.md')}")


if __name__ == "__main__":
    main()
