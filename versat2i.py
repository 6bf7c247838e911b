"""
VersaT2I (arXiv 2403.18493, docs/versat2i.md): per-aspect best-of-K self-training, one LoRA per aspect, and a
learned Mixture of LoRA (MoL) gate over them, compared on a trained run.

  1. train-split prompts (the `aligned` strategy) -> K samples each from the base model;
  2. per aspect (a reward head of the run: alignment = vqascore, aesthetic, quality, geometry), keep the samples
     whose reward reaches that aspect's own quantile, then only the best per prompt (best-of-K);
  3. one LoRA per aspect fine-tuned on its set with the ordinary generative loss on plan and image tokens;
  4. MoL: the aspect LoRAs frozen, per adapted layer a gate (a linear map of the layer's input, softmax over the
     adapters) mixes them, trained on the union of the selected sets with a load-balancing loss.
Compared: the base, each single-aspect LoRA, the plain average of the adapters merged into the weights, one LoRA
trained on the union, and MoL: every aspect's reward and the exact verifier on dev prompts, the four benchmarks
once. Only the reward heads choose samples; the verifier judges afterwards and never trains.

    python train.py tiny_configs/shapes_cpu.toml --stages=versat2i --versat2i.seed=0   # after the main job, ~13 min
    -> RUN/versat2i/versat2i.json, versat2i.md (the tables), versat2i.png (the same prompts under each variant)
    python versat2i.py A/versat2i/versat2i.json B/versat2i/versat2i.json ...   # seeds as runs: one table, verdicts
"""

import argparse
import copy
import dataclasses
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import evaluate
import parser
import posttrain
import rewards
import stats
import targeting
from generate import RunError, load_run, read_json, read_tensors, save_atomic, save_grid, write_json
from model import add_lora, cosine_lr, load_lora, lora_layers, lora_state_dict, merge_lora

ASPECTS = {"alignment": "vqascore", "aesthetic": "aesthetic", "quality": "quality",
           "geometry": "geometry"}  # aspect -> the reward head that scores it (rewards.py)


@dataclass
class VersaT2IConfig:
    aspects: str = "alignment,aesthetic,quality,geometry"  # comma-separated names of ASPECTS: one LoRA each
    seed: int = 0  # seeds the prompts, the self-generated samples and the training (evaluation samples with train.seed)
    prompts: int = 128  # train-split prompts sampled from the base
    samples: int = 4  # K samples per prompt
    quantile: float = 0.5  # an aspect keeps a prompt's best sample only if it reaches this quantile of that aspect's
    #                        rewards over all samples: a threshold from the reward itself, never from the verifier
    steps: int = 30  # LoRA steps per aspect (the union LoRA gets steps x aspects: the same compute as all of them)
    pretrain_weight: float = 0.0  # the post stage's anti-drift term; 0 as the paper self-trains (and half the cost)
    gate_steps: int = 30  # MoL gate training steps (the adapters frozen)
    gate_lr: float = 1e-2  # the gates' learning rate: they start at zero (uniform = the plain average)
    balance: float = 0.1  # weight of the load-balancing loss (1 at uniform use of the adapters, n when one takes all)
    dev_prompts: int = 19  # dev prompts per category (8 categories) x dev_samples = the dev figures (1,216 samples)
    dev_samples: int = 8  # samples per dev prompt
    bench_prompts: int = 50  # benchmark prompts per task, 1 sample each (oneig 2), for every variant


def config_rules(vc):
    """[versat2i] values that type-check but cannot work: (holds, message) pairs, checked before any work."""
    names = aspect_names(vc)
    return [
        (bool(names) and set(names) <= set(ASPECTS) and len(set(names)) == len(names),
         f"versat2i.aspects={vc.aspects!r}: expected distinct names from {','.join(ASPECTS)} "
         f"(e.g. --versat2i.aspects={','.join(ASPECTS)})"),
        (0 <= vc.quantile < 1, "versat2i.quantile must lie in [0, 1)"),
        (min(vc.prompts, vc.samples, vc.steps, vc.gate_steps, vc.dev_prompts, vc.dev_samples, vc.bench_prompts) >= 1,
         "versat2i.prompts, samples, steps, gate_steps, dev_prompts, dev_samples and bench_prompts must be >= 1"),
        (vc.gate_lr > 0 and vc.balance >= 0 and vc.pretrain_weight >= 0,
         "versat2i.gate_lr must be > 0, versat2i.balance and versat2i.pretrain_weight >= 0"),
    ]


def aspect_names(vc):
    return [a.strip() for a in vc.aspects.split(",") if a.strip()]


def check_heads(run_dir, aspects):
    """Every aspect's head is in the run's rewards.safetensors, else a RunError naming the fix."""
    path = os.path.join(run_dir, "rewards.safetensors")
    if not os.path.exists(path):
        raise RunError(f"{run_dir} has no trained reward heads ({path}): run --stages=rewards first")
    keys = read_tensors(path)[0].keys()
    for a in aspects:
        if a not in ASPECTS:
            raise RunError(f"unknown aspect {a!r}: versat2i.aspects takes {','.join(ASPECTS)}")
        if not any(k.startswith(ASPECTS[a] + ".") for k in keys):
            raise RunError(f"aspect {a!r} needs the {ASPECTS[a]!r} head, which {path} lacks: retrain the heads "
                           f"(delete it, then --stages=rewards) or drop {a} from versat2i.aspects")


# -----------------------------------------------------------------------------
# per-aspect best-of-K selection


def select(r, group, quantile):
    """One aspect's rewards (N,) and each sample's prompt (N,) -> 0/1 weights: the best sample of each prompt,
    kept only if it reaches the `quantile` of these rewards. At most one sample per prompt."""
    r = np.asarray(r, dtype=np.float64)
    return posttrain.sample_weights(r, group, "best_above", threshold=float(np.quantile(r, quantile)))


# -----------------------------------------------------------------------------
# Mixture of LoRA: a gate per adapted layer


class MixtureGate(nn.Module):
    """A layer's input x (..., in) -> softmax weights (..., n) over its n adapters, for model.LoRALinear.gate.
    Zero-initialised: it starts at 1/n each, the plain average of the adapters. Keeps its last output for the
    balancing loss and the report."""

    def __init__(self, in_features, n):
        super().__init__()
        if n < 1:
            raise ValueError("a gate over zero adapters: load at least one adapter (versat2i.aspects) first")
        self.proj = nn.Linear(in_features, n)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.last = None

    def forward(self, x):
        self.last = F.softmax(self.proj(x), dim=-1)  # (..., n)
        return self.last


def attach_gates(model):
    """A MixtureGate on every LoRA layer, over its adapters; only the gates train. Returns them in layer order.
    The gated model must never be merged: merge_lora would fold every adapter in at full weight."""
    layers = lora_layers(model)
    if not layers or not all(len(m.lora_A) for _, m in layers):
        raise ValueError("a gate over zero adapters: load the aspect LoRAs (load_lora) before attach_gates")
    model.requires_grad_(False)
    for _, m in layers:
        m.gate = MixtureGate(m.base.in_features, len(m.lora_A)).to(m.base.weight.device)
    return [m.gate for _, m in layers]


def balance_loss(g):
    """Gate weights (..., n) -> n * sum_i (mean use of adapter i)^2: 1 when every adapter is used equally on
    average, n when one takes every token (Cauchy-Schwarz); per-token choices are free."""
    use = g.reshape(-1, g.shape[-1]).mean(0)  # (n,)
    return g.shape[-1] * (use ** 2).sum()


def train_gates(model, gates, samples, rows, pc, vc, vocab, device, rng):
    """vc.gate_steps AdamW steps of the gates on the selected samples: the generative loss of post-training
    (plan and image tokens, pc.null_prob of them with the null condition) + vc.balance * the balancing loss of
    every gate over the target positions."""
    params = [p for g in gates for p in g.parameters()]
    opt = torch.optim.AdamW(params, lr=vc.gate_lr, weight_decay=0.0)
    model.train()
    logs = []
    for step in range(vc.gate_steps):
        pick = list(rng.choice(rows, min(pc.batch, len(rows)), replace=False))
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, vc.gate_lr, pc.warmup, vc.gate_steps, vc.gate_lr)
        b = posttrain.sample_batch(samples, pick, vocab, device, rng.random(len(pick)) < pc.null_prob)
        gen, _ = posttrain.weighted_loss(model, b, torch.ones(len(pick), device=device), pc.alpha_text, pc.alpha_image)
        mask = b.weight > 0
        bal = torch.stack([balance_loss(g.last[mask]) for g in gates]).mean()
        loss = gen + vc.balance * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        logs.append((gen.item(), bal.item()))
    model.eval()
    return {"gen_loss": float(np.mean([x for x, _ in logs])), "balance_loss": float(logs[-1][1])}


@torch.no_grad()
def gate_usage(model, samples, examples, vocab, device, batch):
    """The gates' mean weights over the plan and image positions of the gated model's own samples,
    teacher-forced: {"layers": {layer: [w_1..w_n]}, "categories": {category: [...]} (mean over layers),
    "modalities": {"plan": [...], "image": [...]}}."""
    layers = [(n, m) for n, m in lora_layers(model)]
    cats = [examples[i].category for i in samples["example"]]
    rows = [i for i, c in enumerate(samples["codes"]) if c is not None]
    n = len(layers[0][1].lora_A)
    by_layer, by_cat = torch.zeros(len(layers), n), {}
    by_mod, counts = torch.zeros(2, n), torch.zeros(2)
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        b = posttrain.sample_batch(samples, chunk, vocab, device)
        model(b.x, patch=b.patch, tags=b.tags)
        mask = b.weight > 0  # (B, T): the positions whose next token the model wrote (plan, image)
        g = torch.stack([m.gate.last for _, m in layers]).cpu()  # (L, B, T, n)
        by_layer += (g * mask.cpu()[None, ..., None]).sum((1, 2))
        for r, i in enumerate(chunk):
            s = by_cat.setdefault(cats[i], torch.zeros(n + 1))
            s[:n] += g[:, r][:, mask[r].cpu()].mean(0).sum(0)
            s[n] += mask[r].sum().item()
        for k, m in enumerate((data.TEXT, data.IMAGE)):
            sel = (mask & (b.modality == m)).cpu()
            by_mod[k] += g[:, sel].mean(0).sum(0)
            counts[k] += sel.sum()
    tokens = sum(s[n] for s in by_cat.values())
    return {"layers": {name: (v / tokens).tolist() for (name, _), v in zip(layers, by_layer)},
            "categories": {c: (s[:n] / s[n]).tolist() for c, s in sorted(by_cat.items())},
            "modalities": {"plan": (by_mod[0] / counts[0]).tolist(), "image": (by_mod[1] / counts[1]).tolist()}}


# -----------------------------------------------------------------------------
# the variants


def lora_spec(pc, alpha=None):
    return tuple(pc.lora_targets.split(",")), pc.lora_r, pc.lora_alpha if alpha is None else alpha


def train_lora(base, name, samples, weights, pc, vocab, device, rng, drift, seed):
    """A fresh adapter `name` on a copy of the base, fine-tuned on the samples with weight 1 (posttrain.finetune):
    its tensors (lora_state_dict) and the fit figures."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    params = add_lora(model, name, *lora_spec(pc), pc.lora_dropout)
    fit = posttrain.finetune(model, params, samples, weights, pc, vocab, device, rng, drift)
    return lora_state_dict(model, name), fit


def with_adapters(base, loras, pc, scale=1.0):
    """A copy of the base with each adapter of `loras` ({name: tensors}) loaded, each at `scale` times its
    trained scaling (1/n of each: the plain average)."""
    model = copy.deepcopy(base)
    for name, tensors in loras.items():
        targets, r, alpha = lora_spec(pc)
        load_lora(model, name, tensors, targets, r, alpha * scale)
    return model.requires_grad_(False).eval()


# -----------------------------------------------------------------------------
# measurement


def interval(per_prompt):
    m, ci = stats.score([np.asarray(per_prompt)])
    return {"mean": m, "ci": ci}


def measure(model, vq, vocab, tokenizer, sample_cfg, examples, fns, vc, batch, seed, device):
    """One variant: every aspect's reward, their mean and the exact verifier on its dev samples (per prompt and
    per category, with 95% intervals over prompts), then the four benchmarks. Returns (figures, dev samples, each
    with its own "verifier" score)."""
    t0 = time.time()
    s = posttrain.self_generate(model, vq, vocab, tokenizer, examples, vc.dev_samples, sample_cfg, seed, batch)
    dev_seconds = time.time() - t0
    prompts, ex = [examples[i].prompt for i in s["example"]], np.asarray(s["example"])
    scores = {a: rewards.score(fn, s["image"], prompts, device) for a, fn in fns.items()}
    scores["aspects"] = np.mean([scores[a] for a in fns], axis=0)
    scores["verifier"] = s["verifier"] = posttrain.verifier_scores(s["image"], examples, s["example"])  # judges
    where = placement(parser.parse_batch(np.stack(s["image"])), examples, s["example"])
    per = {k: [float(v[ex == i].mean()) for i in range(len(examples))] for k, v in scores.items()}
    cats = np.array([e.category for e in examples])
    figs = {"dev": {k: {**interval(v), "per_prompt": v} for k, v in per.items()},
            "categories": {c: {k: float(np.mean(np.asarray(v)[cats == c])) for k, v in per.items()}
                           for c in dict.fromkeys(cats)},
            "placement": where, "dev_seconds": round(dev_seconds, 2), "dev_images": len(prompts)}
    t0 = time.time()
    figs["benchmarks"] = evaluate.score_benchmarks(model, vq, vocab, tokenizer, sample_cfg, vc.bench_prompts, 1,
                                                   batch, seed)[0]
    figs["bench_seconds"] = round(time.time() - t0, 2)
    return figs, s


CORNERS = ((0, 0), (0, 2), (2, 0), (2, 2))  # (row, col) of the corner cells


def placement(scenes, examples, example_index):
    """Where a variant draws: the share of drawn objects in the centre cell and in a corner cell, and of the
    objects a prompt asks for in a corner cell (dense prompts) the share drawn there. The composition score
    behind the aesthetic head rewards the centre; these prompts ask for corners."""
    cells = [(o.row, o.col) for sc in scenes for o in sc.objects]
    asked = [any((o.row, o.col) == (r.row, r.col) for o in sc.objects) for sc, i in zip(scenes, example_index)
             for r in examples[i].spec.reqs if (r.row, r.col) in CORNERS]
    share = lambda x: float(np.mean(x)) if len(x) else None
    return {"centre": share([c == (1, 1) for c in cells]), "corners": share([c in CORNERS for c in cells]),
            "asked_corner_kept": share(asked), "asked_corners": len(asked)}


def shown(name, samples, examples, rows):
    """The picture's cells of one variant: the first dev sample of each prompt in rows, as (caption, image, whether
    that sample itself passes the verifier)."""
    first = [samples["example"].index(i) for i in rows]
    return [(f"{name}: {examples[i].prompt}", samples["image"][j], samples["verifier"][j] == 1.0)
            for i, j in zip(rows, first)]


# -----------------------------------------------------------------------------
# the stage


def run(cfgs, run_dir, device, log, report):
    """The whole comparison on one seed: selection, the aspect LoRAs, the union LoRA, the MoL gates, every variant
    measured; writes RUN/versat2i/ (versat2i.json/.md/.png, the adapters and gates as safetensors + JSON)."""
    tc, vc = cfgs["train"], cfgs["versat2i"]
    aspects = aspect_names(vc)
    check_heads(run_dir, aspects)
    t_start, times, peaks = time.time(), {}, {}

    def done(phase, t0):  # its seconds, and the process's peak memory so far
        times[phase], peaks[phase] = round(time.time() - t0, 1), round(stats.rss_mb("VmHWM"))
    pc = dataclasses.replace(cfgs["post"], steps=vc.steps, pretrain_weight=vc.pretrain_weight)
    out = os.path.join(run_dir, "versat2i")
    os.makedirs(out, exist_ok=True)
    _, tokenizer, vocab, vq, base = load_run(run_dir, device)
    rng = np.random.default_rng([vc.seed, 32])
    fns = {a: rewards.load_reward(run_dir, ASPECTS[a], device) for a in aspects}

    # 1-2. K samples of train prompts from the base; per aspect, best-of-K above the aspect's own quantile
    t0 = time.time()
    prompts = targeting.draw_prompts("aligned", vc.prompts, rng)
    gen_cfg = dataclasses.replace(cfgs["sample"], text_temperature=pc.plan_temperature)
    samples = posttrain.self_generate(base, vq, vocab, tokenizer, prompts, vc.samples, gen_cfg, 1000 * vc.seed + 32,
                                      tc.eval_batch)
    texts = [prompts[i].prompt for i in samples["example"]]
    r = {a: rewards.score(fn, samples["image"], texts, device) for a, fn in fns.items()}
    w = {a: select(r[a], samples["example"], vc.quantile) for a in aspects}
    union = np.maximum.reduce([w[a] for a in aspects])
    done("self_generate_and_select", t0)
    gold = posttrain.verifier_scores(samples["image"], prompts, samples["example"])  # reported, never used to choose
    selection = {a: {"reward": ASPECTS[a], "threshold": float(np.quantile(r[a], vc.quantile)),
                     "kept": int(w[a].sum()), "reward_all": float(r[a].mean()),
                     "reward_kept": float(r[a][w[a] > 0].mean()) if w[a].any() else None,
                     **{f"{b}_kept": float(r[b][w[a] > 0].mean()) if w[a].any() else None for b in aspects if b != a},
                     "verifier_kept": float(gold[w[a] > 0].mean()) if w[a].any() else None} for a in aspects}
    selection["union"] = {"kept": int(union.sum()), "verifier_kept": float(gold[union > 0].mean())}
    overlap = {f"{a}/{b}": float(((w[a] > 0) & (w[b] > 0)).sum() / max(((w[a] > 0) | (w[b] > 0)).sum(), 1))
               for i, a in enumerate(aspects) for b in aspects[i + 1:]}  # Jaccard of the selected sets
    print("[versat2i] selected: " + ", ".join(f"{a} {selection[a]['kept']}" for a in aspects)
          + f", union {selection['union']['kept']} of {len(texts)} samples")

    # 3. one LoRA per aspect, and one on the union with the same compute as all of them together
    drift = (posttrain.pretraining_batches(tc, pc.batch, vc.seed, rng, tokenizer, vq, vocab, device)
             if pc.pretrain_weight > 0 else None)
    loras, fits = {}, {}
    for k, a in enumerate(aspects + ["union"]):
        t0 = time.time()
        pa = pc if a != "union" else dataclasses.replace(pc, steps=vc.steps * len(aspects))
        loras[a], fits[a] = train_lora(base, a, samples, union if a == "union" else w[a], pa, vocab, device, rng,
                                       drift, 1000 * vc.seed + k)
        done(f"lora_{a}", t0)
        save_atomic(loras[a], os.path.join(out, f"lora_{a}.safetensors"))
        write_json(asdict(pa), os.path.join(out, f"lora_{a}.json"))  # as posttrain writes lora_post.json
        log(stage="versat2i", lora=a, **fits[a])
        print(f"[versat2i] LoRA {a}: {fits[a]['kept']} samples, loss {fits[a]['loss']:.3f}, {times[f'lora_{a}']:.0f}s")

    # 4. MoL: the aspect LoRAs frozen, gates trained on the union
    t0 = time.time()
    aspect_loras = {a: loras[a] for a in aspects}
    mol = with_adapters(base, aspect_loras, pc)
    gates = attach_gates(mol)
    torch.manual_seed(vc.seed)
    rows = [i for i in np.nonzero(union)[0] if samples["codes"][i] is not None]
    gate_fit = train_gates(mol, gates, samples, rows, pc, vc, vocab, device, rng)
    done("mol_gates", t0)
    save_atomic({k: v for k, v in mol.state_dict().items() if ".gate." in k},
                os.path.join(out, "mol_gates.safetensors"))
    print(f"[versat2i] MoL gates: loss {gate_fit['gen_loss']:.3f}, balance {gate_fit['balance_loss']:.3f}, "
          f"{times['mol_gates']:.0f}s")

    # every variant, the same dev prompts and benchmarks, the same sampling seed
    def variants():
        yield "base", base
        for a in aspects:
            yield a, with_adapters(base, {a: loras[a]}, pc)
        yield "average", with_adapters(base, aspect_loras, pc, 1 / len(aspects))
        yield "union", with_adapters(base, {"union": loras["union"]}, pc)
        yield "mol", mol

    examples = evaluate.dev_prompts(vc.dev_prompts)
    grid_rows = [examples.index(next(e for e in examples if e.category == c)) for c in dict.fromkeys(
        e.category for e in examples)]  # the first dev prompt of every category
    results, grid = {}, []
    for name, model in variants():
        t0 = time.time()
        if name != "mol":
            merge_lora(model)  # a merged adapter samples at the base's cost; MoL's gates depend on the input
        results[name], s = measure(model, vq, vocab, tokenizer, cfgs["sample"], examples, fns, vc, tc.eval_batch,
                                   tc.seed, device)
        done(f"measure_{name}", t0)
        grid += shown(name, s, examples, grid_rows)
        d = results[name]["dev"]
        print(f"[versat2i] {name}: " + ", ".join(f"{k} {d[k]['mean']:.3f}" for k in aspects + ["aspects", "verifier"])
              + f", geneval {results[name]['benchmarks']['geneval']['overall']:.3f}, {times[f'measure_{name}']:.0f}s")
        if name == "mol":
            results[name]["gates"] = gate_usage(model, s, examples, vocab, device, tc.eval_batch)
    save_grid([g[1] for g in grid], [g[0] for g in grid], os.path.join(out, "versat2i.png"), cols=len(grid_rows),
              marks=[g[2] for g in grid])
    cost = {"seconds": round(time.time() - t_start, 1), "peak_rss_mb": round(stats.rss_mb("VmHWM"), 1),
            "phases": times, "peak_rss_mb_after": peaks,
            "threads": torch.get_num_threads(),
            "mol_vs_merged_sampling": results["mol"]["dev_seconds"] / results["average"]["dev_seconds"],
            "mol_vs_merged_benchmarks": results["mol"]["bench_seconds"] / results["average"]["bench_seconds"]}
    res = {"config": asdict(vc), "post": asdict(pc), "aspects": aspects, "seed": vc.seed, "eval_seed": tc.seed,
           "selection": selection, "overlap": overlap, "fits": fits, "gate_fit": gate_fit, "variants": results,
           "cost": cost}
    write_json(res, os.path.join(out, "versat2i.json"))
    md = summary([res])
    with open(os.path.join(out, "versat2i.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return {"seed": vc.seed, "seconds": cost["seconds"], "peak_rss_mb": cost["peak_rss_mb"],
            "mol_aspects": results["mol"]["dev"]["aspects"]["mean"],
            "base_aspects": results["base"]["dev"]["aspects"]["mean"]}


# -----------------------------------------------------------------------------
# tables and verdicts over one run (intervals over prompts) or several seeds (their spread)


def value(rec, key):
    """A variant's figure: a dev key (an aspect, "aspects", "verifier") or a benchmark's overall / "<b> seen"."""
    if key in rec["dev"]:
        return rec["dev"][key]["mean"]
    b, _, part = key.partition(" ")
    return rec["benchmarks"][b][part]["score"] if part else rec["benchmarks"][b]["overall"]


def ci(rec, key):
    if key in rec["dev"]:
        return rec["dev"][key]["ci"]
    b, _, part = key.partition(" ")
    return rec["benchmarks"][b][part]["ci"] if part else rec["benchmarks"][b]["ci"]["overall"]


def variant(run, name):
    """A run's variant; "best" is its single-aspect LoRA with the highest dev mean of the aspects (chosen on dev,
    per seed)."""
    if name == "best":
        name = max((a for a in run["aspects"] if a in run["variants"]),
                   key=lambda a: run["variants"][a]["dev"]["aspects"]["mean"])
    return run["variants"][name]


def run_difference(run, a, b, key):
    """Within one run: (a - b, its standard error), paired over the same dev prompts, or for a benchmark from
    the two intervals (half-width / 1.96, as if independent)."""
    va, vb = variant(run, a), variant(run, b)
    if key in va["dev"]:
        d = np.array(va["dev"][key]["per_prompt"]) - np.array(vb["dev"][key]["per_prompt"])
        return float(d.mean()), stats.paired_se(d)
    half = lambda v: (ci(v, key)[1] - ci(v, key)[0]) / 2 / 1.96
    return value(va, key) - value(vb, key), float(math.hypot(half(va), half(vb)))


def difference(runs, a, b, key):
    """(mean of a - b over the runs, its standard error): one run's own; over seeds, the spread of the per-seed
    differences, but never below the runs' own sampling error / sqrt(seeds) (two or three seeds can agree by
    chance: an SE of 0.000 from two points measures nothing)."""
    per = [run_difference(r, a, b, key) for r in runs]
    if len(runs) == 1:
        return per[0]
    d, own = np.array([x for x, _ in per]), np.array([s for _, s in per])
    floor = math.sqrt(np.mean(own ** 2) / len(runs))
    return float(d.mean()), float(max(stats.paired_se(d), floor))


def verdict(runs, claimed, rival, key):
    gap, se = difference(runs, claimed, rival, key)
    word = ("reproduces" if gap > se else "does not reproduce") if abs(gap) > se else "not settled"
    return f"**{word}** ({claimed} - {rival} = {gap:+.3f}, SE {se:.3f})"


def cell(runs, name, key):
    """mean [95% interval] for one run, mean +- sample std over seeds for several."""
    vals = [value(r["variants"][name], key) for r in runs]
    if len(runs) == 1:
        lo, hi = ci(runs[0]["variants"][name], key)
        return f"{vals[0]:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{np.mean(vals):.3f} +- {np.std(vals, ddof=1):.3f}"


def summary(runs):
    """versat2i.json of one or several seeds -> markdown: the selection, the aspect x variant matrix, the
    single-aspect rows against the base (own aspect, conflicts), the paper's claims, the gates, the cost."""
    r0, n = runs[0], len(runs)
    aspects, names = r0["aspects"], list(r0["variants"])
    singles = [a for a in aspects if a in names]
    dev_keys, bench_keys = aspects + ["aspects", "verifier"], list(evaluate.BENCHMARKS)
    parts = [f"{b} {p}" for b in bench_keys for p in ("seen", "tail") if p in r0["variants"]["base"]["benchmarks"][b]]
    c = r0["config"]
    spread = "mean [95% interval over prompts]" if n == 1 else f"mean +- sample std over {n} seeds"
    out = ["# VersaT2I: per-aspect LoRAs and a Mixture of LoRA", "",
           f"Seeds {', '.join(str(r['seed']) for r in runs)}: {c['prompts']} train prompts x K={c['samples']} base "
           f"samples; per aspect the best of K above its {c['quantile']:.2f} quantile; {c['steps']} LoRA steps per "
           f"aspect, MoL gates {c['gate_steps']} steps. Dev: {r0['variants']['base']['dev_images']} samples "
           f"({c['dev_prompts']} prompts x 8 categories x {c['dev_samples']}); benchmarks: {c['bench_prompts']} "
           f"prompts x 1 sample (oneig 2). {spread}.", "", "## Selection (seed " + str(r0["seed"]) + ")", "",
           "| aspect | head | threshold | kept | reward all -> kept | verifier of kept |", "|---|---|---|---|---|---|"]
    for a in aspects:
        s = r0["selection"][a]
        out.append(f"| {a} | {s['reward']} | {s['threshold']:.3f} | {s['kept']} | {s['reward_all']:.3f} -> "
                   f"{s['reward_kept']:.3f} | {s['verifier_kept']:.3f} |")
    out += [f"| union | | | {r0['selection']['union']['kept']} | | {r0['selection']['union']['verifier_kept']:.3f} |",
            "", "Overlap of the selected sets (Jaccard): "
            + ", ".join(f"{k} {v:.2f}" for k, v in r0["overlap"].items()), ""]
    for title, keys in (("Aspect x variant (dev)", dev_keys), ("Benchmarks (overall)", bench_keys),
                        ("Benchmarks (seen and tail parts)", parts)):
        out += [f"## {title}", "", "| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        out += [f"| {v} | " + " | ".join(cell(runs, v, k) for k in keys) + " |" for v in names]
        out.append("")
    out += ["## Single-aspect LoRAs against the base (dev; change +- SE of the difference)", "",
            "| LoRA | " + " | ".join(aspects + ["verifier"]) + " |", "|---" * (len(aspects) + 2) + "|"]
    for a in singles:
        cells = []
        for k in aspects + ["verifier"]:
            gap, se = difference(runs, a, "base", k)
            mark = (" (own)" if k == a else "") + (" **conflict**" if k != a and gap < -2 * se else "")
            cells.append(f"{gap:+.3f} +- {se:.3f}{mark}")
        out.append(f"| {a} | " + " | ".join(cells) + " |")
    out += [""]
    for a in singles:  # the base is the same model in every seed's run, scored with the same sampling seed
        lo, hi = ci(r0["variants"]["base"], a)
        mine = np.mean([value(r["variants"][a], a) for r in runs])
        out.append(f"- {a}: its LoRA {mine:.3f} against the base's interval [{lo:.3f}, {hi:.3f}]: "
                   + ("raised beyond it" if mine > hi else "**not** beyond it")
                   + f"; LoRA vs base: {verdict(runs, a, 'base', a)}")
    cats = list(r0["variants"]["base"]["categories"])
    for key in [k for k in ("alignment", "aesthetic", "verifier") if k in dev_keys]:  # dense prompts name corners
        out += ["", f"{key} by category, dev (mean over {n} seed(s)): where a prompt that names a corner meets "
                "the centre-loving aesthetic", "", "| variant | " + " | ".join(cats) + " |",
                "|---" * (len(cats) + 1) + "|"]
        out += [f"| {v} | " + " | ".join(f"{np.mean([r['variants'][v]['categories'][cat][key] for r in runs]):.3f}"
                                         for cat in cats) + " |" for v in names]
    if all("placement" in r["variants"][v] for r in runs for v in names):
        f = lambda v, k: np.mean([r["variants"][v]["placement"][k] or 0.0 for r in runs])
        out += ["", "Where each variant draws (dev, parsed scenes): objects in the centre cell, in a corner cell, and "
                f"of the objects a prompt asks for in a corner (about {f('base', 'asked_corners'):.0f} per run) "
                "the share drawn there", "", "| variant | centre | corners | asked corners kept |", "|---|---|---|---|"]
        out += [f"| {v} | {f(v, 'centre'):.3f} | {f(v, 'corners'):.3f} | {f(v, 'asked_corner_kept'):.3f} |"
                for v in names]
    picks = [max(singles, key=lambda a: value(r["variants"][a], "aspects")) for r in runs]  # as variant() picks
    out += ["", "## The paper's claims at our scale", "",
            f"`best` is each seed's single-aspect LoRA with the highest dev mean of the aspects: {', '.join(picks)}."]
    if "mol" in names:
        out += ["- MoL beats the best single LoRA:"]
        out += [f"  - {k}: {verdict(runs, 'mol', 'best', k)}" for k in ["aspects", "verifier"] + bench_keys]
        if "alignment" in aspects:
            gap, se = difference(runs, "mol", "base", "alignment")
            out.append(f"- MoL keeps alignment: MoL - base = {gap:+.3f}, SE {se:.3f}: "
                       + ("**lost** (below the base beyond its SE)" if gap < -se else "**kept**"))
        out += ["- MoL beats the plain average of the adapters:"]
        out += [f"  - {k}: {verdict(runs, 'mol', 'average', k)}" for k in ["aspects", "verifier"] + bench_keys]
        out += ["- MoL beats one LoRA on the union:"]
        out += [f"  - {k}: {verdict(runs, 'mol', 'union', k)}" for k in ["aspects", "verifier"] + bench_keys]
    gates = [r["variants"]["mol"]["gates"] for r in runs]
    out += ["", f"## What the gates chose (mean weight over the plan and image positions of MoL's dev samples, mean "
            f"over {n} seed(s))", "", "| | " + " | ".join(aspects) + " |", "|---" * (len(aspects) + 1) + "|"]
    for part, label in (("categories", "{}"), ("modalities", "({} tokens)"), ("layers", "{}")):
        for k in gates[0][part]:
            w = np.mean([g[part][k] for g in gates if k in g[part]], axis=0)
            out.append(f"| {label.format(k)} | " + " | ".join(f"{x:.3f}" for x in w) + " |")
    cost = [r["cost"] for r in runs]
    out += ["", "## Cost", "", f"The whole comparison: {np.mean([x['seconds'] for x in cost]) / 60:.1f} min "
            f"({', '.join('%.0f s' % x['seconds'] for x in cost)}), peak memory (RSS) "
            f"{max(x['peak_rss_mb'] for x in cost):.0f} MB, {cost[0]['threads']} thread(s). MoL samples "
            f"{np.mean([x['mol_vs_merged_sampling'] for x in cost]):.2f}x the time of one merged adapter on the dev "
            f"prompts ({np.mean([x['mol_vs_merged_benchmarks'] for x in cost]):.2f}x on the benchmarks): its gates "
            "depend on the input, so it cannot be merged.", "",
            "Phases (s, seed " + str(r0["seed"]) + "): " + ", ".join(f"{k} {v}" for k, v in cost[0]["phases"].items())]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="One table of several seeds' versat2i.json, with verdicts.")
    p.add_argument("files", nargs="+", metavar="JSON", help="RUN/versat2i/versat2i.json of each seed's run")
    args = p.parse_args(argv)
    try:
        runs = [read_json(f) for f in args.files]
    except RunError as e:
        raise SystemExit(f"error: {e}")
    if len({tuple(r["aspects"]) for r in runs}) != 1:
        raise SystemExit("these runs compare different aspects (versat2i.aspects): they cannot be merged")
    print(summary(runs))


if __name__ == "__main__":
    main()
