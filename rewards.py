"""
Rewards: the protocol, the registry, the built-in rewards (the learned heads of heads.py, the verifier, the
GPT's own belief), and their calibration.

A reward is any callable `reward(images, prompts) -> Tensor[B]`: images (B, 3, H, W) floats in [0, 1],
prompts a list of B strings. Rewards are registered by name in one dict, REWARDS, and chosen by a
spec string: one name, or a weighted sum such as "vqascore + 0.5*aesthetic". `load_reward` turns a spec
into one callable; every term is checked on every call (a term that raises, returns the wrong shape
or NaN is named in the error, with what it returned).

    python train.py tiny_configs/shapes_cpu.toml --stages=rewards   # train the heads (minutes on a CPU)
    python rewards.py out/shapes_cpu                                 # calibration table (--json for report.json's)

    import rewards
    reward = rewards.load_reward("out/shapes_cpu", "vqascore + 0.5*aesthetic")
    r = reward(images, ["a red circle", "two blue squares"])        # (2,)

The built-in rewards, and what each stands in for (heads are trained on rendered shapes-world scenes):
    vqascore   VQAScore, P(yes | image, prompt) from a small generic vision-language model (vqascore.py):
               the run's frozen VQ encoder features, a text transformer that attends to them, a yes/no
               logit; no world rules in its architecture. Trained on renders of the whole world (half
               through the run's VQ), their edits as hard negatives and mismatched prompts, each labelled by
               construction; never on the model's samples. The DEFAULT post-training reward.
    structured a structured, near-oracle reward (NS-VQA): a learned image probe reads the 9 cells (shape,
               colour, size or empty), a learned prompt reader writes the prompt as a program (object slots,
               counts, total, relations), and a fixed soft executor, whose rules are the verifier's own,
               scores the program on the cells. The verifier in all but name: an upper bound for learned
               rewards, not a stand-in for a real reward model.
    clip       CLIPScore: a dual encoder trained contrastively with hard-negative captions; the reward is
               the cosine of the image and text embeddings, in [-1, 1].
    aesthetic  the LAION aesthetic predictor: an MLP on the clip image embedding regressing `edits.composition`
               (below), this world's stand-in for a human rating. In [0, 1].
    quality    a low-level quality model (e.g. a no-reference IQA net): P(clean) against noise, blur,
               blocking, colour bleeding and VQ code errors. In [0, 1].
    geometry   a shape well-formedness model: P(well formed) against objects stretched, skewed, cut in
               two or merged with a copy of themselves. In [0, 1].
    verifier   the oracle: the share of the prompt's Spec clauses that the scene the exact parser
               (parser.parse) finds satisfies (world.clause_share): 1 exactly when the sample passes, graded
               below, so that it ranks dense samples, which almost never pass. Needs the Specs:
               load_reward(..., specs={prompt: Spec}). Not differentiable.
    self       the unified GPT's own belief: the per-token geometric mean of p(prompt | image), the image
               read through the VQ encoder (image-to-text format). In [0, 1]. Not differentiable (the VQ
               encoder picks codes by argmax).
The trained heads (vqascore, structured, clip, aesthetic, quality, geometry; heads.py) pass gradients to the input
pixels; their weights are frozen, so only the images get gradients.
"""

import argparse
import difflib
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

import data
import edits
import heads
import parser
import world
from generate import RunError, decode_images, generate, load_run, read_json, sample_config
from model import token_ce

DEFAULT = "vqascore"  # the post-training reward unless a config names another

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
    """'vqascore + 0.5*aesthetic - 0.1*self' -> [(1.0, 'vqascore'), (0.5, 'aesthetic'), (-0.1, 'self')]."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"empty reward spec {spec!r}; expected e.g. 'vqascore' or 'vqascore + 0.5*aesthetic'")
    parts = re.split(r"([+-])", spec)  # [term, sign, term, sign, term ...]
    pairs = [("+", parts[0])] + list(zip(parts[1::2], parts[2::2]))
    if not parts[0].strip() and len(parts) > 1:
        pairs = pairs[1:]  # a leading sign: "-0.1*self + vqascore"
    terms = []
    for sign, term in pairs:
        m = _TERM.match(term.strip())
        if not m or (m.group(1) and m.group(3)):
            raise RewardError(f"bad reward spec {spec!r} at {term.strip() or sign!r}: "
                              "terms look like NAME, WEIGHT*NAME or NAME*WEIGHT "
                              "joined by + or -, e.g. 'vqascore + 0.5*aesthetic'")
        weight = float(m.group(1) or m.group(3) or 1.0) * (-1 if sign == "-" else 1)
        if m.group(2) not in REWARDS:
            hint = difflib.get_close_matches(m.group(2), REWARDS, n=1)
            raise RewardError(f"unknown reward {m.group(2)!r} in {spec!r}"
                              + (f"; did you mean {hint[0]!r}?" if hint else "")
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
            raise RewardError(f"reward {name!r}: images must be a float tensor (B, 3, H, W) in [0, 1], "
                              f"got {_describe(images)}")
        if isinstance(prompts, str) or len(prompts) != len(images):
            raise RewardError(f"reward {name!r}: expected a list of {len(images)} prompts (one per image), "
                              f"got {_describe(prompts)}")
        try:
            out = fn(images, prompts)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
        if not torch.is_tensor(out) or out.shape != (len(images),):
            raise RewardError(f"reward {name!r} returned {_describe(out)}; "
                              f"a reward returns a tensor of shape ({len(images)},)")
        if torch.isnan(out).any():
            raise RewardError(f"reward {name!r} returned NaN at rows {torch.isnan(out).nonzero().flatten().tolist()}: "
                              f"{out.detach().tolist()}")
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
            except ValueError as e:  # a damaged tokenizer.json
                raise RewardError(f"reward {name!r}: {e}") from None
        terms.append((weight, checked(name, fn)))

    def reward(images, prompts):
        return sum(w * fn(images, prompts) for w, fn in terms)
    reward.spec = spec
    return reward


# -----------------------------------------------------------------------------
# the built-in rewards


def _head_reward(name):
    def build(run_dir, device, specs):
        net = heads.load_heads(run_dir, device)
        tok = data.load_tokenizer(os.path.join(run_dir, "tokenizer.json"))
        ids = lambda prompts, images: heads.padded_text_ids(tok, prompts, net.cfg.max_text).to(images.device)
        return {
            "vqascore": lambda images, prompts: torch.sigmoid(net.vqascore(images, ids(prompts, images))),
            "structured": lambda images, prompts: torch.sigmoid(net.structured(images, ids(prompts, images))),
            "clip": lambda images, prompts: (net.clip.embed_images(images)
                                             * net.clip.embed_texts(ids(prompts, images))).sum(-1),
            "aesthetic": (lambda images, prompts:
                          torch.sigmoid(net.aesthetic(net.clip.embed_images(images)).squeeze(-1))),
            "quality": lambda images, prompts: torch.sigmoid(net.quality(images)),
            "geometry": lambda images, prompts: torch.sigmoid(net.geometry(images)),
        }[name]
    return build


HEADS = heads.NAMES  # the rewards heads.py trains
for _name in HEADS:
    register(_name, from_run=True)(_head_reward(_name))


@register("verifier", from_run=True)
def verifier(run_dir, device, specs):
    """The share of the prompt's Spec clauses the parsed image satisfies (1.0: it passes).
    specs: {prompt: world.Spec}."""
    specs = specs or {}

    def reward(images, prompts):
        missing = [p for p in prompts if p not in specs]
        if missing:
            raise KeyError(f"no Spec for prompt {missing[0]!r}: pass load_reward(..., specs={{prompt: spec}}), "
                           f"e.g. {{ex.prompt: ex.spec for ex in examples}}")
        scenes = parser.parse_batch(data.to_u8(images.detach()))
        return torch.tensor([world.clause_share(s, specs[p]) for s, p in zip(scenes, prompts)], device=images.device)
    return reward


@register("self", from_run=True)
def self_likelihood(run_dir, device, specs):
    """exp(mean log p(prompt tokens | <bos> <boi> image codes <eoi>)) under the run's GPT."""
    _, tok, vocab, vq, gpt = load_run(run_dir, device)

    @torch.no_grad()
    def reward(images, prompts):
        codes = vq.encode(images.to(device)).tolist()
        b = data.collate([data.build_sequence("caption", vocab, codes=c, caption=data.encode_text(tok, p))
                          for c, p in zip(codes, prompts)],
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


def within_auc(scores, labels, groups):
    """The mean AUC over groups (a prompt's K samples) that have both outcomes, and how many such groups:
    how well a reward ranks one prompt's samples, which is what reward weighting uses. (None, 0) if none."""
    s, y, groups = np.asarray(scores, float), np.asarray(labels, bool), np.asarray(groups)
    aucs = [auc(s[groups == k], y[groups == k]) for k in np.unique(groups)]
    aucs = [a for a in aucs if a is not None]
    return (float(np.mean(aucs)) if aucs else None), len(aucs)


def ranking(scores, labels, groups, rng, boots=200):
    """AUC against the verifier across prompts (pooled) and within a prompt's samples (within_auc), each with
    its standard error from a bootstrap over prompts, and below_chance: the AUCs more than 2 standard errors
    under 0.5. groups: a prompt id per sample."""
    s, y, groups = np.asarray(scores, float), np.asarray(labels, bool), np.asarray(groups)
    ids = np.unique(groups)
    rows = {k: np.nonzero(groups == k)[0] for k in ids}
    out = {"n": len(s), "across": auc(s, y)}
    out["within"], out["prompts_within"] = within_auc(s, y, groups)
    draws = {"across": [], "within": []}
    for _ in range(boots * (len(ids) > 0)):  # no prompts (say, no tail ones): no figures
        pick = rng.choice(ids, len(ids))
        idx = np.concatenate([rows[k] for k in pick])
        draws["across"].append(auc(s[idx], y[idx]))
        regroup = np.repeat(np.arange(len(pick)), [len(rows[k]) for k in pick])  # a drawn prompt twice is two prompts
        draws["within"].append(within_auc(s[idx], y[idx], regroup)[0])
    for k, d in draws.items():
        d = [v for v in d if v is not None]
        out[f"{k}_se"] = float(np.std(d)) if out[k] is not None and len(d) > 1 else None
    out["below_chance"] = [k for k in ("across", "within") if out[k] is not None and out[f"{k}_se"] is not None
                           and out[k] + 2 * out[f"{k}_se"] < 0.5]
    return out


def _corr(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return None if a.std() == 0 or b.std() == 0 else float(np.corrcoef(a, b)[0, 1])


def score(fn, images, prompts, device, batch=256):
    """A reward on uint8 images (N, H, W, 3), an array or a list, and their prompts -> (N,) numpy, in chunks."""
    with torch.no_grad():
        return np.concatenate([fn(data.to_float(images[i:i + batch]).to(device), prompts[i:i + batch]).cpu().numpy()
                               for i in range(0, len(prompts), batch)])


K = 4  # samples per dev prompt in calibration: the within-prompt ranking is what reward weighting uses
ALL = HEADS + ("verifier", "self")  # every built-in reward, calibrated
PROMPT_REWARDS = ("vqascore", "structured", "clip", "verifier", "self")  # those that read the prompt


def calibrate(run_dir, device="cpu", n_examples=600, n_samples=256, seed=0):
    """Each reward against the verifier or its target property, on held-out (dev split) renders and on the
    run's own samples: n_samples // K dev prompts, K samples each, ranked across and within prompts, seen
    and tail (world.is_tail) apart. Returns {"held_out": {...}, "samples": {...}} of plain floats."""
    cfg, tok, vocab, vq, gpt = load_run(run_dir, device)
    rng, g = np.random.default_rng([seed, 5]), torch.Generator().manual_seed(seed + 5)
    imgs, exs, labels, _ = heads.verified_pairs(n_examples, rng, vq, "dev", 0.5)
    cap_imgs, scenes, caps, negs = heads.caption_pairs(n_examples, rng, vq, "dev", 0.5)
    geo_imgs, geo_labels = heads.geometry_pairs(n_examples // 2, rng, vq, 0.5)
    clean = np.stack([world.render(world.random_scene(rng), vq.cfg.image_size) for _ in range(n_examples)])
    q_imgs, q_labels = zip(*[heads.quality_batch(clean[i:i + 64], vq, g, device) for i in range(0, n_examples, 64)])
    q_imgs, q_labels = data.to_u8(torch.cat(q_imgs)), torch.cat(q_labels).cpu().numpy()

    # the model's own samples of dev prompts, K each, judged by the verifier
    sample_exs = [e for e in (world.sample_example(rng, split="dev") for _ in range(max(1, n_samples // K)))
                  for _ in range(K)]
    sample_cfg = sample_config(cfg)
    samples = []
    for i in range(0, len(sample_exs), 128):
        chunk = sample_exs[i:i + 128]
        samples += generate(gpt, vocab, [data.encode_text(tok, e.prompt) for e in chunk], sample_cfg, seed=seed + i)
    s_imgs = np.stack(decode_images(vq, samples))
    s_prompts = [e.prompt for e in sample_exs]
    s_scenes = parser.parse_batch(s_imgs)
    s_pass = np.array([world.passes(s, e.spec) for s, e in zip(s_scenes, sample_exs)])
    group = np.arange(len(sample_exs)) // K
    tail = np.array([world.is_tail(e.spec) for e in sample_exs])

    specs = {e.prompt: e.spec for e in exs + sample_exs}
    R = {name: load_reward(run_dir, name, device, specs) for name in ALL}
    prompts = [e.prompt for e in exs]
    held = {name: {"auc_vs_verifier": auc(score(R[name], imgs, prompts, device), labels)} for name in PROMPT_REWARDS}
    n = len(caps)
    pos, neg = score(R["clip"], np.concatenate([cap_imgs, cap_imgs]), caps + negs, device).reshape(2, n)
    held["clip"]["caption_vs_hard_negative"] = float((pos > neg).mean())
    aest = score(R["aesthetic"], cap_imgs, caps, device)
    held["aesthetic"] = {"corr_with_composition": _corr(aest, [edits.composition(s) for s in scenes])}
    held["quality"] = {"auc_clean_vs_degraded": auc(score(R["quality"], q_imgs, [""] * len(q_imgs), device), q_labels)}
    held["geometry"] = {"auc_clean_vs_malformed": auc(score(R["geometry"], geo_imgs, [""] * len(geo_imgs), device),
                                                      geo_labels)}

    on_samples = {"n": len(sample_exs), "k": K, "verifier_pass_rate": float(s_pass.mean()),
                  "tail_share": float(tail.mean())}
    for name, fn in R.items():
        scores = score(fn, s_imgs, s_prompts, device)
        on_samples[name] = {"mean": float(scores.mean()),
                            **{part: ranking(scores[m], s_pass[m], group[m], np.random.default_rng([seed, 6]))
                               for part, m in (("seen", ~tail), ("tail", tail))}}
        if name == "aesthetic":  # its own target, on the scene the parser reads from each sample
            on_samples[name]["corr_with_composition"] = _corr(scores, [edits.composition(s) for s in s_scenes])
    return {"held_out": held, "samples": on_samples}


def table(cal):
    """The calibration dict as text: held-out renders, then the ranking of the model's own samples."""
    fmt = lambda v, w=8: f"{'-':>{w}}" if v is None else f"{v:>{w}.3f}"
    lines = ["held-out renders (dev prompts)", f"{'reward':<12}{'metric':<34}{'value':>8}"]
    for name, figs in cal["held_out"].items():
        lines += [f"{name if k == 0 else '':<12}{metric:<34}{fmt(v)}" for k, (metric, v) in enumerate(figs.items())]
    s = cal["samples"]
    lines += ["", f"model samples: {s['n']} = {s['n'] // s['k']} dev prompts x {s['k']}, verifier pass "
              f"{s['verifier_pass_rate']:.3f}, tail prompts {s['tail_share']:.3f}; AUC vs verifier +- bootstrap "
              "standard error, across prompts (pooled) and within a prompt's samples (prompts with both outcomes)",
              f"{'reward':<12}{'prompts':<8}{'n':>5}{'across':>9}{'+-':>7}{'within':>9}{'+-':>7}{'(prompts)':>10}"
              f"{'mean':>8}   note"]
    for name in ALL:
        for k, part in enumerate(("seen", "tail")):
            r = s[name][part]
            note = [f"{b} ranks worse than chance" for b in r["below_chance"]]
            if k == 0 and "corr_with_composition" in s[name]:
                note.append(f"corr_with_composition {fmt(s[name]['corr_with_composition'], 0)}")
            lines.append(f"{name if k == 0 else '':<12}{part:<8}{r['n']:>5}"
                         f"{fmt(r['across'], 9)}{fmt(r['across_se'], 7)}"
                         f"{fmt(r['within'], 9)}{fmt(r['within_se'], 7)}{r['prompts_within']:>10}"
                         f"{fmt(s[name]['mean']) if k == 0 else '':>8}   {'; '.join(note)}".rstrip())
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Calibration of a run's rewards: "
                                "held-out renders and the model's own samples.")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true",
                   help="print the calibration as JSON (report.json's stages.rewards.calibration)")
    p.add_argument("--examples", type=int, default=None,
                   help="held-out renders (default: the run's rewards.calib_examples)")
    p.add_argument("--samples", type=int, default=None, help="model samples (default: the run's rewards.calib_samples)")
    p.add_argument("--seed", type=int, default=None, help="default: the run's train.seed")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        cfg = read_json(os.path.join(args.run_dir, "config.json"))
        rc = heads.RewardsConfig(**cfg.get("rewards", {}))
        cal = calibrate(args.run_dir, args.device, args.examples or rc.calib_examples, args.samples or rc.calib_samples,
                        cfg["train"]["seed"] if args.seed is None else args.seed)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {args.run_dir} is not a run directory ({e.filename} missing)")
    except (RunError, RewardError) as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps(cal, indent=2) if args.json else table(cal))


if __name__ == "__main__":
    main()
