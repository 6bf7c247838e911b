"""
Every training stage of nanoloom behind one command. Stages, in order:
    tokenizer  word-level text tokenizer trained on the shapes world's text  -> tokenizer.json
               (or on the captions of your image folder, train.data_dir)
    vq         VQ image tokenizer trained on rendered scenes (or the folder)  -> vq.safetensors
    lm         the unified GPT pretrained on the token-sequence mix           -> gpt.safetensors
    eval       benchmarks on held-out prompts, sample grids, weakness report  -> report.json, report.md
    rewards    the reward heads (heads.py) and their calibration (rewards.py) -> rewards.safetensors
    post       post-training on the model's own samples (posttrain.py)        -> lora_post.safetensors
A finished stage is reused (its output file exists): to redo one, delete its file and run again, or
name later stages alone with --stages once the earlier ones are done. The eval stage always runs.
`--stages=ablations` (ablations.py) runs the post-training ablations on a finished run.
`--stages=overopt` (overopt.py) measures over-optimisation of the post reward on a finished run.
`--stages=versat2i` (versat2i.py) compares per-aspect LoRAs and a Mixture of LoRA on a finished run.
`--stages=textcraftor` (textcraftor.py) tunes the prompt side by differentiable rewards on a finished run.

    python train.py tiny_configs/shapes_cpu.toml                     # the main job, 12-25 minutes
    python train.py tiny_configs/micro.toml --train.out_dir=out/micro  # seconds; what the tests use
    python train.py tiny_configs/shapes_cpu.toml --stages=eval          # re-score a finished run
    python train.py tiny_configs/shapes_cpu.toml --train.lm_steps=300 --train.out_dir=out/short
    python data.py --make-folder out/my_images && python train.py tiny_configs/folder.toml  # your own images
    torchrun --nproc_per_node=2 train.py tiny_configs/shapes_cpu.toml --train.out_dir=out/ddp   # data-parallel

The lm stage writes a checkpoint every train.ckpt_every steps; an interrupted run (Ctrl-C, a kill) resumes
from it exactly when the same command is run again.

Overrides are `--section.key=value` for any key of the config file's sections ([train], [vq], [gpt],
[sample], [rewards], [post], [ablations], [overopt], [versat2i], [textcraftor]); an unknown key or a value of the wrong
type stops with a message naming it (config.py).
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

import ablations
import config
import data
import evaluate
import folderpost
import heads
import overopt
import posttrain
import pretrain
import rewards
import targeting
import textcraftor
import versat2i
import world
from ablations import AblationConfig
from config import ConfigError
from generate import (RunError, SampleConfig, load_run, load_weights, read_json, save_atomic, save_grid, vq_round_trip,
                      write_json)
from model import VQ, GPTConfig, VQConfig, use_bf16
from overopt import OverOptConfig
from posttrain import PostConfig
from textcraftor import TextCraftorConfig
from versat2i import VersaT2IConfig

STAGES = ("tokenizer", "vq", "lm", "eval", "rewards", "post")  # the main job: the benchmarks first,
#                                                                then what post-training needs
EXTRA_STAGES = ("ablations", "overopt", "versat2i", "textcraftor")  # run only when named: --stages=versat2i


@dataclass
class TrainConfig:
    out_dir: str = "out/shapes_cpu"  # everything the run makes goes here
    data_dir: str = ""  # a folder of your own captioned images (see data.load_folder); "" = the shapes world
    seed: int = 0  # seeds data generation, initialisation and sampling
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "float32"  # float32 | bfloat16 (autocast where the device has it)
    #                         | auto (bf16 where it is fast: see model.use_bf16)
    compile: bool = False  # torch.compile the GPT for training (opt-in: slow to start, helps on GPU)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    tokenizer_corpus: int = 1000  # examples per category in the tokenizer's corpus (every word list is in it too)
    # VQ stage
    vq_images: int = 20000  # rendered training scenes (a folder run uses all its images)
    vq_steps: int = 1500  # optimiser steps of the VQ stage
    vq_batch: int = 64  # images per VQ step
    vq_lr: float = 3e-3  # Adam learning rate of the encoder and decoder
    vq_codebook_lr: float = 3e-4  # the codebook's own (not scaled by vq_lr), lower: fast codes keep swapping patches
    vq_warmup: int = 200  # steps as a plain autoencoder; then the codebook starts from its encodings
    vq_init_images: int = 512  # images whose encodings the codebook is initialised from (farthest-point)
    vq_restart_every: int = 25  # steps between dead-code restarts (0 = never)
    vq_restart_until: float = 0.8  # no restarts in the last 20% of the steps, so the codebook settles before it is used
    vq_eval_scenes: int = 500  # held-out scenes for the parser round-trip figure
    # LM stage
    lm_examples: int = 30000  # pretraining examples (prompt, plan, caption, image codes);
    #                           a folder run uses all its images
    tail_keep: float = 1.0  # share of pretraining pairs showing a long-tail composition (world.TAIL) that are kept:
    #                         below 1 the generator's pairs have the gaps a real dataset has (the VQ and rewards don't)
    lm_steps: int = 2500  # optimiser steps of the lm stage
    lm_batch: int = 32  # sequences per step (the global batch, shared among data-parallel processes)
    lm_lr: float = 1.5e-3  # peak learning rate (AdamW); twice that ends at a higher held-out loss
    lm_min_lr: float = 1.5e-4  # cosine schedule ends here
    lm_warmup: int = 100  # steps of linear warm-up
    weight_decay: float = 0.1  # AdamW decay of the matrices (not of norms and gains)
    grad_clip: float = 1.0  # gradient norm clip
    p_plan: float = 0.8  # format mix: text->image with a plan ...
    p_direct: float = 0.1  # ... text->image without a plan; the rest is image->text captions
    null_prob: float = 0.1  # text->image sequences whose condition becomes <null> (for guidance)
    region_tags: bool = True  # tag plan words and image tokens with their layout region
    #                           (data.Tagger; shapes world only)
    lm_init: str = ""  # a finished run directory whose GPT the lm stage continues from (same tokenizer and VQ:
    #                    copy its tokenizer.json and vq.safetensors into out_dir); "" = from scratch
    episode_share: float = 0.0  # share of lm steps that train on a batch of interleaved episodes (episodes.py)
    episode_examples: int = 4000  # training episodes generated for them (and a sixteenth of that held out)
    episode_images: int = 4  # images per episode, uniform in 1..this
    episode_batch: int = 8  # episodes per episode step (an episode is about 2.5 pairs long)
    new_lr_mult: float = 1.0  # with lm_init: learning-rate multiplier of the interleaved modules (NEW_MODULES), which
    #                           start from scratch; a synchronizer's zero gate grows by about one lr per step
    eval_every: int = 250  # steps between held-out loss measurements
    log_every: int = 25  # steps between training-loss lines in metrics.jsonl
    ckpt_every: int = 250  # steps between resumable checkpoints of the lm stage (0 = none)
    eval_examples: int = 256  # held-out (dev split) examples for that loss
    # eval stage
    bench_prompts: int = 50  # prompts per benchmark task; a folder run: held-out captions drawn before and after post
    bench_samples: int = 4  # samples per prompt
    eval_batch: int = 128  # prompts sampled together


SECTIONS = {"train": TrainConfig, "vq": VQConfig, "gpt": GPTConfig, "sample": SampleConfig,
            "rewards": heads.RewardsConfig, "post": PostConfig, "ablations": AblationConfig,
            "overopt": OverOptConfig, "versat2i": VersaT2IConfig, "textcraftor": TextCraftorConfig}
DERIVED = {("gpt", "vocab_size"), ("gpt", "image_offset"),
           ("gpt", "n_image_tokens"), ("gpt", "n_tags")}  # set from tokenizer + VQ


# -----------------------------------------------------------------------------
# configuration: plain TOML files, command-line overrides, strict checking


def validate(cfgs):
    """Values that type-check but cannot work, refused before any work is done."""
    tc, vc = cfgs["train"], cfgs["vq"]
    rules = [
        (tc.device in ("auto", "cpu", "cuda", "mps"), f"train.device={tc.device!r}: expected auto, cpu, cuda or mps"),
        (tc.dtype in ("float32", "bfloat16", "auto"), f"train.dtype={tc.dtype!r}: expected float32, bfloat16 or auto"),
        (tc.ckpt_every >= 0 and tc.log_every >= 1, "train.ckpt_every must be >= 0 and train.log_every >= 1"),
        (min(tc.vq_steps, tc.lm_steps, tc.eval_every, tc.vq_batch, tc.lm_batch,
             tc.bench_prompts, tc.bench_samples) >= 1,
         "train.vq_steps, lm_steps, eval_every, vq_batch, lm_batch, bench_prompts and bench_samples must be >= 1"),
        (tc.lm_examples >= tc.lm_batch and tc.eval_examples >= tc.lm_batch,
         "train.lm_examples and train.eval_examples must be >= train.lm_batch"),
        (0 <= tc.p_plan and 0 <= tc.p_direct and tc.p_plan + tc.p_direct <= 1,
         "train.p_plan + train.p_direct must lie in [0, 1] (the rest are captions)"),
        (0 <= tc.null_prob <= 1, "train.null_prob must lie in [0, 1]"),
        (0 <= tc.episode_share <= 1 and tc.episode_batch >= 1, "train.episode_share must lie in [0, 1], "
         "train.episode_batch be >= 1"),
        (not tc.episode_share or 1 <= tc.episode_images <= min(cfgs["gpt"].max_images, len(world.NUMBER_WORDS) - 1),
         f"train.episode_images={tc.episode_images} must lie in 1..gpt.max_images={cfgs['gpt'].max_images} and "
         f"1..{len(world.NUMBER_WORDS) - 1} (questions name pictures by the world's number words)"),
        (not tc.episode_share or not tc.data_dir, "episodes are of the shapes world: a folder run "
         "(train.data_dir) needs train.episode_share = 0"),
        (0 <= tc.tail_keep <= 1, "train.tail_keep must lie in [0, 1] (1 = the whole world, 0 = the tail never shown)"),
        (tc.vq_init_images * vc.n_codes >= vc.codebook_size,
         f"train.vq_init_images={tc.vq_init_images} images of {vc.n_codes} codes each are fewer encodings than "
         f"vq.codebook_size={vc.codebook_size}: the codebook starts from that many distinct encodings"),
        (vc.image_size % vc.patch == 0, f"vq.image_size={vc.image_size} must be a multiple of vq.patch={vc.patch}"),
        (tc.data_dir or vc.image_size % (2 * world.LATTICE) == 0,
         f"vq.image_size={vc.image_size} must be a multiple of {2 * world.LATTICE} "
         "(the shapes world's layout lattice)"),
        # region tags give each image code the layout region its centre lies in: exact only if a lattice unit
        # is a whole number of codes
        (tc.data_dir or not tc.region_tags or (vc.image_size // vc.patch) % world.LATTICE == 0,
         f"vq.image_size / vq.patch = {vc.image_size // vc.patch} codes a side must be a multiple of {world.LATTICE} "
         f"(the shapes world's layout lattice) for region tags; lower vq.patch or set train.region_tags = false"),
        # a folder has captions, not reasoning plans: its text->image sequences are all direct
        (not tc.data_dir or tc.p_plan == 0,
         "a folder run (train.data_dir) has no reasoning plans: set train.p_plan = 0"),
        (not tc.data_dir or not cfgs["sample"].think,
         "a folder run (train.data_dir) has no reasoning plans: set sample.think = false"),
        (tc.vq_codebook_lr > 0 and 0 < tc.vq_restart_until <= 1,
         "train.vq_codebook_lr must be > 0, train.vq_restart_until in (0, 1]"),
    ]  # each section's own rules live beside its dataclass
    rules += heads.config_rules(cfgs["rewards"]) + posttrain.config_rules(cfgs["post"])
    rules += ablations.config_rules(cfgs["ablations"]) + overopt.config_rules(cfgs["overopt"])
    rules += versat2i.config_rules(cfgs["versat2i"])
    rules += textcraftor.config_rules(cfgs["textcraftor"], cfgs["vq"].image_size // cfgs["vq"].patch)
    try:
        post_terms = {n for _, n in rewards.parse_spec(cfgs["post"].reward)}
    except rewards.RewardError as e:
        raise ConfigError(f"post.reward: {e}") from None
    rules.append((not tc.data_dir or post_terms <= set(folderpost.CHECKS),
                  f"post.reward={cfgs['post'].reward!r}: a folder run has the rewards {', '.join(folderpost.CHECKS)} "
                  f"(the others are the shapes world's); e.g. --post.reward=vqascore"))
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)


def load_config(path, overrides=()):
    """A TOML file plus `section.key=value` overrides -> {section: dataclass}, checked by validate."""
    cfgs = config.load(path, SECTIONS, overrides, DERIVED)
    validate(cfgs)
    return cfgs


# -----------------------------------------------------------------------------
# small utilities


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return name


class Metrics:
    """JSON lines in RUN_DIR/metrics.jsonl: one object per measurement."""

    def __init__(self, path):
        self.path = path  # None: log nothing (the other processes of a data-parallel run)

    def log(self, **kv):
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(kv) + "\n")


# may change between runs of one directory: the weights do not depend on them
# -----------------------------------------------------------------------------
# run identity

# may change between runs of one directory: the weights do not depend on them
FREE_KEYS = ("out_dir", "bench_prompts", "bench_samples", "eval_batch", "threads", "device", "eval_every", "log_every",
             "ckpt_every", "compile", "calib_examples", "calib_samples", "eval_samples")


def config_diff(old, new, sections=("train", "vq", "gpt")):
    """`section.key: old -> new` for every key that matters and differs (a key missing from an older config
    counts as its default)."""
    default = lambda s, k: getattr(SECTIONS[s](), k)
    return [f"{s}.{k}: {old.get(s, {}).get(k, default(s, k))!r} -> {v!r}" for s in sections
            for k, v in new[s].items()
            if (s, k) not in DERIVED and k not in FREE_KEYS and old.get(s, {}).get(k, default(s, k)) != v]


# -----------------------------------------------------------------------------
# the stages: each takes the Run and returns its figures for report.json


@dataclass
class Run:
    cfgs: dict  # {section: config dataclass}
    dir: str  # the run directory
    device: str
    metrics: Metrics
    dist: pretrain.Dist
    report: dict  # report.json as it stands; a stage adds its own results


def stage_tokenizer(run):
    cfgs, run_dir = run.cfgs, run.dir
    path = os.path.join(run_dir, "tokenizer.json")
    corpus = pretrain.open_folder(cfgs)[0].captions if cfgs["train"].data_dir else None  # a folder: its own captions
    tok = data.train_tokenizer(path + ".tmp", n=cfgs["train"].tokenizer_corpus, seed=cfgs["train"].seed, corpus=corpus)
    os.replace(path + ".tmp", path)  # atomic: a half-written tokenizer is never mistaken for a finished stage
    return {"vocab_size": tok.get_vocab_size()}


# -----------------------------------------------------------------------------
# stage: vq


def scene_images(n, seed, image_size, split):
    rng = np.random.default_rng(seed)
    return np.stack([world.render(world.sample_example(rng, split=split).scene, image_size) for _ in range(n)])


def stage_vq(run):
    cfgs, run_dir, device, metrics = run.cfgs, run.dir, run.device, run.metrics
    tc, vc = cfgs["train"], cfgs["vq"]
    torch.manual_seed(tc.seed)
    if tc.data_dir:
        folder, train, dev = pretrain.open_folder(cfgs)
        train_imgs, held_out = data.to_float(folder.images[train]), folder.images[dev]
    else:
        train_imgs = data.to_float(scene_images(tc.vq_images, tc.seed, vc.image_size, "train"))
        held_out = scene_images(tc.vq_eval_scenes, tc.seed + 1, vc.image_size, "dev")
    vq = VQ(vc).to(device)
    # Adam moves every parameter at about its learning rate whatever the gradient: the codebook gets its own
    book = [vq.codebook.weight]
    nets = [p for n, p in vq.named_parameters() if n != "codebook.weight"]
    opt = torch.optim.Adam([{"params": nets, "lr": tc.vq_lr}, {"params": book, "lr": tc.vq_codebook_lr}])
    g = torch.Generator().manual_seed(tc.seed)
    encodings = lambda x: F.normalize(vq.encoder(x * 2 - 1), dim=1).permute(0, 2, 3, 1).reshape(-1, vc.code_dim)
    vq.train()
    for step in (bar := tqdm(range(tc.vq_steps), desc="vq", mininterval=2)):
        x = train_imgs[torch.randint(0, len(train_imgs), (tc.vq_batch,), generator=g)].to(device)
        if step == tc.vq_warmup:
            # a codebook drawn at random, before the encoder means anything, collapses onto the white
            # background; one spread over a warmed-up encoder's outputs does not
            with torch.no_grad():
                sample = train_imgs[torch.randint(0, len(train_imgs), (tc.vq_init_images,), generator=g)].to(device)
                vq.init_codebook(encodings(sample))
            vq.usage.zero_()
        recon, losses, _ = vq(x, quantize=step >= tc.vq_warmup)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        restart = tc.vq_restart_every and (step + 1) % tc.vq_restart_every == 0
        if restart and tc.vq_warmup < step and step + 1 < tc.vq_steps * tc.vq_restart_until:
            with torch.no_grad():
                restarted = vq.restart_dead_codes(encodings(x))
            metrics.log(stage="vq", step=step + 1, restarted_codes=restarted)
        if step % 50 == 0 or step == tc.vq_steps - 1:
            bar.set_postfix(recon=f"{losses['recon'].item():.4f}")
            metrics.log(stage="vq", step=step, **{k: round(v.item(), 5) for k, v in losses.items()})
    vq.eval()
    recon, codes = vq_round_trip(vq, held_out)
    counts = torch.bincount(codes.flatten(), minlength=vc.codebook_size).float()
    p = counts / counts.sum()
    usage = {"codes_used": float((counts > 0).float().mean()),
             "perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))}
    save_atomic(vq.state_dict(), os.path.join(run_dir, "vq.safetensors"))
    n = 16
    save_grid(list(held_out[:n]) + list(recon[:n]), ["original"] * n + ["reconstruction"] * n,
              os.path.join(run_dir, "vq_recon.png"))
    recon_l1 = float(np.abs(held_out.astype(np.float32) - recon.astype(np.float32)).mean() / 255)
    figures = {"held_out_images": len(held_out), "recon_l1": recon_l1, **usage}
    if tc.data_dir:
        print("VQ parser agreement skipped: the shapes world's parser cannot read a folder's images")
    else:
        figures["parser_agreement"], figures["parser_exact_scene"] = evaluate.parser_agreement(held_out, recon)
    return figures


# -----------------------------------------------------------------------------
# stage: lm


def stage_lm(run):
    model, figures = pretrain.train_lm(run.cfgs, run.dir, run.device, run.metrics, run.dist,
                                       resolved_config(run.cfgs), config_diff)
    if run.dist.master:
        save_atomic(model.state_dict(), os.path.join(run.dir, "gpt.safetensors"))
        if os.path.exists(os.path.join(run.dir, pretrain.CKPT)):
            os.remove(os.path.join(run.dir, pretrain.CKPT))  # the finished model supersedes it
    return figures


# -----------------------------------------------------------------------------
# stage: rewards


def stage_rewards(run):
    cfgs, run_dir, device = run.cfgs, run.dir, run.device
    tc, rc = cfgs["train"], cfgs["rewards"]
    if tc.data_dir:  # vqascore and clip learnt from the folder's own captions (folderpost.py)
        folder, train, dev = pretrain.open_folder(cfgs)
        figures, text = folderpost.train_reward(cfgs, run_dir, device, folder, train, dev,
                                                lambda **kv: run.metrics.log(stage="rewards", **kv))
        run.report.setdefault("folder", {})["Reward calibration (held-out images of the folder)"] = text
        print(text)
        return figures
    tokenizer = data.load_tokenizer(os.path.join(run_dir, "tokenizer.json"))
    vq = load_weights(VQ(cfgs["vq"]).to(device), os.path.join(run_dir, "vq.safetensors")).eval()
    net, figures = heads.train_heads(rc, tokenizer, vq, tc.seed, device,
                                     log=lambda **kv: run.metrics.log(stage="rewards", **kv))
    save_atomic(net.state_dict(), os.path.join(run_dir, heads.HEADS_FILE), heads.heads_metadata(net))
    figures["calibration"] = cal = rewards.calibrate(run_dir, device, rc.calib_examples, rc.calib_samples, tc.seed)
    print(rewards.table(cal))
    return figures


# -----------------------------------------------------------------------------
# stage: eval


def stage_eval(run):
    """The four benchmarks and the weakness report on dev prompts."""
    cfgs, run_dir, tc = run.cfgs, run.dir, run.cfgs["train"]
    _, tokenizer, vocab, vq, gpt = load_run(run_dir, run.device)
    if tc.data_dir:
        folder, _, dev = pretrain.open_folder(cfgs)
        figures = evaluate.folder_samples(gpt, vq, vocab, tokenizer, cfgs["sample"], folder, dev, tc.seed,
                                          os.path.join(run_dir, "samples_folder.png"))
    else:
        figures = evaluate.run_all(gpt, vq, vocab, tokenizer, cfgs["sample"], run_dir, n_prompts=tc.bench_prompts,
                                   n_samples=tc.bench_samples, batch=tc.eval_batch, seed=tc.seed)
        run.report["weakness"] = figures.pop("weakness")
        write_json(run.report["weakness"], os.path.join(run_dir, "weakness.json"))
    run.report["benchmarks"] = figures.pop("benchmarks")
    if run.report["benchmarks"]:
        print(evaluate.table(run.report["benchmarks"]))
    return figures


def stage_post(run):
    if run.cfgs["train"].data_dir:  # the folder's captions, its learnt reward, held-out captions (folderpost.py)
        folder, train, dev = pretrain.open_folder(run.cfgs)
        figures, run.report["folder_post"], tables = folderpost.run(run.cfgs, run.dir, run.device, run.metrics.log,
                                                                    folder, train, dev)
        run.report.setdefault("folder", {}).update(tables)
        print("\n\n".join(tables.values()))
        return figures
    figures, post = posttrain.run(run.cfgs, run.dir, run.device, run.metrics.log, run.report)
    if post:
        run.report["post"] = post
        if post.get("after"):
            print(evaluate.compare(post["before"], post["after"]))
    return figures


def extra_stage(module):
    """An extra stage (ablations, overopt, versat2i, textcraftor): a module whose run() works on a finished run of
    the shapes world (its prompts, reward heads and verifier)."""
    def stage(run):
        if run.cfgs["train"].data_dir:
            raise RunError(f"--stages={module.__name__} needs the shapes world (its prompts, reward heads and "
                           f"verifier), and {run.dir} is a folder run (train.data_dir): run it on a shapes-world run")
        return module.run(run.cfgs, run.dir, run.device, run.metrics.log, run.report)
    return stage


STAGE_FNS = {"tokenizer": stage_tokenizer, "vq": stage_vq, "lm": stage_lm, "eval": stage_eval, "rewards": stage_rewards,
             "post": stage_post, **{name: extra_stage(m) for name, m in
                                    (("ablations", ablations), ("overopt", overopt), ("versat2i", versat2i),
                                     ("textcraftor", textcraftor))}}
OUTPUTS = {"tokenizer": "tokenizer.json", "vq": "vq.safetensors", "lm": "gpt.safetensors", "rewards": heads.HEADS_FILE,
           "post": "lora_post.safetensors"}  # a stage whose output exists is finished: it is reused, not redone


# -----------------------------------------------------------------------------
# driver


def resolved_config(cfgs):
    """config.json: every section, and the plan format the GPT learns (data.check_world_run reads it)."""
    return {**{name: asdict(c) for name, c in cfgs.items()}, "plan_version": data.PLAN_VERSION}


def derive_sizes(cfgs, run_dir):
    """The GPT's vocabulary is the tokenizer's plus the codebook; its image length is the VQ grid; its tags
    are the shapes world's layout regions (data.region_tagger), none for a folder run or train.region_tags off."""
    path = os.path.join(run_dir, "tokenizer.json")
    try:
        tokenizer = data.load_tokenizer(path) if os.path.exists(path) else None
    except ValueError as e:
        raise RunError(str(e)) from None
    if tokenizer:
        cfgs["gpt"].image_offset = tokenizer.get_vocab_size()
    cfgs["gpt"].vocab_size = cfgs["gpt"].image_offset + cfgs["vq"].codebook_size
    cfgs["gpt"].n_image_tokens = cfgs["vq"].n_codes
    tagged = (tokenizer is not None and cfgs["train"].region_tags
              and not cfgs["train"].data_dir)  # a folder has no layout regions
    cfgs["gpt"].n_tags = data.region_tagger(tokenizer, cfgs["vq"].n_codes).n_tags if tagged else 0


def check_run_dir(run_dir, cfg_json, stages=STAGES):
    """Refuse to mix a run directory's finished stages with another config. The [post] keys matter only
    to the post stage (the ablations vary them on purpose)."""
    tok_path, path = os.path.join(run_dir, "tokenizer.json"), os.path.join(run_dir, "config.json")
    old = read_json(path) if os.path.exists(path) else None
    if not cfg_json["train"]["data_dir"] and os.path.exists(tok_path):
        # the config that trained the GPT: config.json beside a finished one; an interrupted lm stage's own
        # (config.json is rewritten only when a stage finishes, so it may still be an older version's)
        gpt_run = None
        if os.path.exists(os.path.join(run_dir, "gpt.safetensors")) and old:
            gpt_run = old
        elif os.path.exists(os.path.join(run_dir, pretrain.CKPT)):
            try:
                with safe_open(os.path.join(run_dir, pretrain.CKPT), "pt") as f:
                    gpt_run = json.loads(f.metadata()["config"])
            except Exception:  # a damaged checkpoint: load_checkpoint says so when the lm stage reaches it
                pass
        try:
            tokenizer = data.load_tokenizer(tok_path)
        except ValueError as e:  # damaged
            raise RunError(str(e)) from None
        try:
            data.check_world_run(tokenizer, gpt_run)
        except ValueError as e:
            raise ConfigError(f"{run_dir}: {e}. Use another --train.out_dir, "
                              f"or delete {run_dir} to start again.") from None
    if old is None:
        return
    # the reward heads come after the GPT: their settings matter only once they are trained
    sections = ("train", "vq", "gpt") + ("rewards",) * os.path.exists(os.path.join(run_dir, heads.HEADS_FILE))
    diff = config_diff(old, cfg_json, sections)
    if diff and all(d.startswith("rewards.") for d in diff):
        raise ConfigError(f"{run_dir} holds reward heads trained with another config ({'; '.join(diff[:5])}). "
                          f"Delete {os.path.join(run_dir, heads.HEADS_FILE)} to retrain them, "
                          "or use another --train.out_dir.")
    post_path = os.path.join(run_dir, "lora_post.json")
    if not diff and "post" in stages and os.path.exists(post_path):
        diff = config_diff({"post": read_json(post_path)}, cfg_json, ("post",))
        if diff:
            raise ConfigError(f"{run_dir}/lora_post.safetensors was post-trained with another [post] config "
                              f"({'; '.join(diff[:5])}). Delete {run_dir}/lora_post.safetensors (and .json) "
                              "to post-train again, or use another --train.out_dir.")
    if diff:
        raise ConfigError(f"{run_dir} holds a run made with another config ({'; '.join(diff[:5])}). "
                          f"Use another --train.out_dir, or delete {run_dir} to start again.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a TOML file from tiny_configs/")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES + EXTRA_STAGES)}")
    args, overrides = p.parse_known_args(argv)
    try:
        cfgs = load_config(args.config, overrides)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        bad = [s for s in stages if s not in STAGES + EXTRA_STAGES]
        if bad:
            raise ConfigError(f"unknown stage(s) {bad}; stages are {', '.join(STAGES + EXTRA_STAGES)}")
        tc = cfgs["train"]
        dist, device = pretrain.dist_setup(tc, pick_device(tc.device))
        if tc.threads:
            torch.set_num_threads(tc.threads)
        run_dir = tc.out_dir
        cfg_json = resolved_config(cfgs)
        check_run_dir(run_dir, cfg_json, stages)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    except RunError as e:
        raise SystemExit(f"error: {e}")
    if not dist.master:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints; errors still reach stderr
    os.makedirs(run_dir, exist_ok=True)
    metrics = Metrics(os.path.join(run_dir, "metrics.jsonl") if dist.master else None)
    report_path = os.path.join(run_dir, "report.json")
    try:
        report = read_json(report_path) if os.path.exists(report_path) else {"benchmarks": {}, "stages": {}}
    except RunError as e:
        raise SystemExit(f"error: {e}")
    run = Run(cfgs, run_dir, device, metrics, dist, report)
    t_all = time.time()
    print(f"run {run_dir} on {device} ({'bf16 autocast' if use_bf16(tc.dtype, device) else 'float32'}"
          f"{f', {dist.world} processes' if dist.world > 1 else ''}); stages {', '.join(stages)}")
    for stage in stages:
        if stage in OUTPUTS and os.path.exists(os.path.join(run_dir, OUTPUTS[stage])):
            print(f"[{stage}] reusing {os.path.join(run_dir, OUTPUTS[stage])}")
            continue
        needs = STAGES[:STAGES.index(stage)] if stage in STAGES else [s for s in STAGES if s != "post"]
        missing = [s for s in needs if s in OUTPUTS and not os.path.exists(os.path.join(run_dir, OUTPUTS[s]))]
        if missing:
            raise SystemExit(f"stage {stage} needs the {missing[0]} stage first: "
                             f"run with --stages={','.join(missing + [stage])}")
        t0 = time.time()
        print(f"[{stage}] start")
        try:  # the lm stage runs in every process; the others in rank 0 alone, the rest wait at the barrier
            derive_sizes(cfgs, run_dir)
            figures = STAGE_FNS[stage](run) if stage == "lm" or dist.master else {}
        except (RunError, ConfigError, rewards.RewardError, targeting.NothingToTarget) as e:
            raise SystemExit(f"error: {e}")
        except KeyboardInterrupt:
            resume = (f" from the last checkpoint (every {tc.ckpt_every} steps)"
                      if stage == "lm" and tc.ckpt_every else "")
            raise SystemExit(f"interrupted in the {stage} stage; "
                             f"run the same command again to resume{resume}") from None
        pretrain.dist_barrier(dist)
        if not dist.master:
            continue
        derive_sizes(cfgs, run_dir)
        write_json(resolved_config(cfgs), os.path.join(run_dir, "config.json"))
        figures["seconds"] = round(time.time() - t0, 1)
        report["stages"][stage] = figures
        write_json(report, report_path)
        evaluate.write_report_md(report, os.path.join(run_dir, "report.md"))
        flat = {k: v for k, v in figures.items() if not isinstance(v, dict)}
        print(f"[{stage}] done in {figures['seconds']:.0f}s: " + json.dumps(flat))
    evaluate.write_report_md(report, os.path.join(run_dir, "report.md"))
    print(f"total {time.time() - t_all:.0f}s; report in {report_path} and {os.path.join(run_dir, 'report.md')}")
    if dist.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
