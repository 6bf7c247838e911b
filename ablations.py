"""
The post-training ablations: every variant of ABLATIONS x a few post-training seeds, each a fresh adapter
on the same pretrained base, measured on one category closely on dev prompts and on the four benchmarks;
then the paper's claims (targeted vs broad vs aligned prompts, both modalities vs one, reward weighting vs
uniform, the pretraining term vs self-generated data alone) judged on each figure by the standard error of
the difference.

    python train.py tiny_configs/shapes_cpu.toml --stages=ablations        # after the main job: ~2 min a run
    python train.py tiny_configs/shapes_cpu.toml --stages=ablations --ablations.variants=both,uniform
    python ablations.py out/a/ablations/ablations.json out/b/ablations/ablations.json   # merge split sweeps
"""

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import numpy as np

import evaluate
import posttrain
import targeting
from generate import RunError, load_run, read_json, write_json
from model import merge_lora


@dataclass
class AblationConfig:
    seeds: int = 3  # post-training seeds per variant
    first_seed: int = 0  # first of those seeds (to split one sweep across processes or machines)
    variants: str = "all"  # comma-separated names of ABLATIONS to run, e.g. "both,uniform" (all = every one)
    focus_prompts: int = 150  # dev prompts of the measured category, x 4 samples x 2 sampling seeds


ABLATIONS = {  # variant -> [post] overrides of the run's config; each post-trains a fresh adapter from the base
    "both": {},  # the run's [post] config (default: targeted prompts, best_above weights, both modalities, vqascore)
    "uniform": {"weighting": "uniform"},  # plain self-training on the same kind of samples: the control
    "oracle": {"reward": "verifier"},  # the exact verifier as reward: the upper bound of a learned reward
    "text_only": {"alpha_image": 0.0},
    "image_only": {"alpha_text": 0.0},
    "aligned": {"strategy": "aligned"},
    "broad": {"strategy": "broad"},
    "no_pretrain": {"pretrain_weight": 0.0},  # self-generated data alone, as the seed paper post-trains
}


def config_rules(ac):
    """[ablations] values that type-check but cannot work: (holds, message) pairs, checked before any work."""
    return [
        (min(ac.seeds, ac.focus_prompts) >= 1 and ac.first_seed >= 0,
         "ablations.seeds and ablations.focus_prompts must be >= 1, ablations.first_seed >= 0"),
        (ac.variants == "all" or set(ac.variants.split(",")) <= set(ABLATIONS),
         f"ablations.variants={ac.variants!r}: "
         f"expected all or a comma-separated subset of {','.join(ABLATIONS)}"),
    ]


def focus_category(weakness, floor=0.05):
    """The weakest dev category (a knowledge kind on its own; dense by its share of facts) that the base
    model passes at least `floor` of the time: what the ablations measure when the run's post-training is
    not `targeted`. One it never passes is left out: reward-weighted self-training has no good sample of it
    to imitate, so it cannot test the method (it is still in the benchmark tables)."""
    rates = {c["name"]: evaluate.category_score(c) for c in weakness["categories"]}
    live = {k: r for k, r in rates.items() if r >= floor}
    return min(live or rates, key=(live or rates).get)


def run(cfgs, run_dir, device, log, report):
    """Every variant of ABLATIONS x ablations.seeds post-training seeds, from the same pretrained
    base. Each is measured on what the run's post-training aims at (targeting.choose_targets): the tail's
    prompts when it aims at a tail composition, else its first category (with a [post] strategy other than
    targeted, or aimed at other compositions only, focus_category), by
    focus_score on dev prompts: focus_prompts x 4 samples x 2 sampling seeds = 1,200 samples, and on the
    four benchmarks (bench_prompts x 1 sample, 2 for oneig): about 2 minutes a run on 2 CPU cores, 8
    variants x 3 seeds. A base with nothing weak to aim at is refused."""
    tc, ac, pc = cfgs["train"], cfgs["ablations"], cfgs["post"]
    weak = report.get("weakness")
    if not weak:
        raise RunError("ablations need the eval stage's weakness report: run --stages=eval first")
    _, tokenizer, vocab, vq, base = load_run(run_dir, device)
    focus = focus_category(weak)
    if pc.strategy == "targeted":  # the category the run's post-training aims at first
        cats, comps = targeting.choose_targets(weak, pc.target_top, pc.weak_below)
        if not cats and not comps:
            raise RunError("no weakness to post-train on, so nothing for the ablations to compare: "
                           + posttrain.nothing_weak(weak, pc.weak_below))
        focus = "tail" if set(comps) & set(evaluate.TAIL_NAMES) else cats[0] if cats else focus
    measure = lambda gpt: {
        "focus": evaluate.focus_score(gpt, vq, vocab, tokenizer, cfgs["sample"],
                                      focus, ac.focus_prompts, batch=tc.eval_batch),
        "benchmarks": evaluate.score_benchmarks(gpt, vq, vocab, tokenizer, cfgs["sample"],
                                                tc.bench_prompts, 1, tc.eval_batch, tc.seed)[0]}
    results = {"focus_category": focus, "base": measure(base), "runs": {}}
    chosen = list(ABLATIONS) if ac.variants == "all" else ac.variants.split(",")
    for seed in range(ac.first_seed, ac.first_seed + ac.seeds):
        for name in (n for n in ABLATIONS if n in chosen):  # ABLATIONS' order, whatever the order given
            t0 = time.time()
            gpt, *_, rounds, _ = posttrain.post_train(cfgs, run_dir, device, log,
                                                      dataclasses.replace(pc, **ABLATIONS[name]), seed=1000 + seed,
                                                      log_prefix=f"ablations/{name}_s{seed}")
            merge_lora(gpt)
            res = {**measure(gpt), "rounds": rounds, "seconds": round(time.time() - t0, 1)}
            results["runs"].setdefault(name, []).append(res)
            metric = "facts" if focus in evaluate.GRADED else "pass_rate"
            print(f"[ablations] {name} seed {seed}: {focus} {metric} {res['focus'][metric]:.3f} "
                  f"(base {results['base']['focus'][metric]:.3f}), {res['seconds']:.0f}s")
            # after every run: an interrupted sweep keeps its results
            write_json(results, os.path.join(run_dir, "ablations", "ablations.json"))
    summary = summary_table(results)
    with open(os.path.join(run_dir, "ablations", "ablations.md"), "w") as f:
        f.write(summary + "\n")
    print(summary)
    return {"variants": len(results["runs"]), "seeds": ac.seeds, "focus_category": focus}


ABLATION_TABLES = {"modality weighting": ["both", "text_only", "image_only", "uniform"],
                   "data strategy": ["broad", "aligned", "both"], "reward": ["both", "oracle", "uniform"],
                   "pretraining term": ["both", "no_pretrain"]}


def merge(parts):
    """Several ablations.json of one sweep (same base, other seeds) -> one, the runs of each variant joined."""
    if len({json.dumps(p["base"], sort_keys=True) for p in parts}) != 1:
        raise SystemExit("these ablation files come from different base runs: they cannot be merged")
    merged = {**parts[0], "runs": {}}
    for p in parts:
        for name, runs in p["runs"].items():
            merged["runs"].setdefault(name, []).extend(runs)
    return merged


def figures(res, metric):
    """One measurement (the base's or a run's) -> {figure: value}: the focus category on dev, then each
    benchmark's overall score and, where its dict has them, its `seen` and `tail` parts."""
    out = {"focus": res["focus"][metric]}
    for b in evaluate.BENCHMARKS:
        d = res["benchmarks"][b]
        out[b] = d["overall"]
        out.update({f"{b} {part}": d[part]["score"] for part in ("seen", "tail") if part in d})
    return out


def summary_table(results, tables=ABLATION_TABLES):
    """ablations.json -> markdown: per table, mean +- std over seeds of every figure (the focus category
    on dev, the four benchmarks and their seen/tail parts when present), and the paper's claims checked
    on each figure."""
    focus = results["focus_category"]
    metric = "facts" if focus in evaluate.GRADED else "pass_rate"  # dense is scored by DPG's fact fraction
    base = figures(results["base"], metric)
    keys = list(base)
    stats = {}  # variant -> {figure: (mean, sample std, runs)}
    for name, runs in results["runs"].items():
        vals = np.array([[figures(r, metric)[k] for k in keys] for r in runs])
        sd = np.std(vals, 0, ddof=min(len(runs) - 1, 1))
        stats[name] = {k: (m, s, len(runs)) for k, m, s in zip(keys, vals.mean(0), sd)}
    names = {"focus": f"{focus} ({metric}, dev)"}
    head = "| variant | " + " | ".join([names["focus"], "change"] + keys[1:]) + " |"
    out = ["# Post-training ablations", "",
           f"Focus: `{focus}`, the base model's weakest dev category that post-training aims at, "
           f"measured on {results['base']['focus']['samples']} samples of dev prompts "
           f"(x 4 samples x 2 sampling seeds). Benchmarks: bench prompts x 1 sample (oneig 2). "
           f"Mean +- sample std over post-training seeds.", ""]
    for title, rows in tables.items():
        out += [f"## {title}", "", head, "|" + "---|" * (len(keys) + 2),
                "| base (no post-training) | " + " | ".join([f"{base['focus']:.3f}", "-"]
                                                          + [f"{base[k]:.3f}" for k in keys[1:]]) + " |"]
        for n in (n for n in rows if n in stats):
            st = stats[n]
            cells = ([f"{st['focus'][0]:.3f} +- {st['focus'][1]:.3f}", f"{st['focus'][0] - base['focus']:+.3f}"]
                     + [f"{st[k][0]:.3f} +- {st[k][1]:.3f}" for k in keys[1:]])
            label = f"{n} = targeted, the default" if n == "both" else n  # the run's [post] config
            out.append(f"| {label} (n={st['focus'][2]}) | " + " | ".join(cells) + " |")
        out.append("")

    def verdict(key, claimed, rivals, label):
        """Whether `claimed` beats every rival on figure `key` beyond the standard error of their
        difference; a lead smaller than that is no verdict either way (one seed's noise would decide it)."""
        mean, se = (lambda n: stats[n][key][0]), (lambda n: stats[n][key][1] / np.sqrt(max(stats[n][key][2], 1)))
        best = max((claimed, *rivals), key=mean)
        other = max(rivals, key=mean) if best == claimed else claimed  # the comparison that decides
        gap, err = mean(best) - mean(other), float(np.hypot(se(best), se(other)))
        if gap <= err:
            return (f"**not settled**: {label(best)} leads {label(other)} by {gap:+.3f}, "
                    f"within the standard error {err:.3f}")
        return (f"**{'reproduces' if best == claimed else 'does not reproduce'}** (best: {label(best)}, "
                f"{gap:+.3f} over {label(other)}, standard error {err:.3f})")

    claims = []
    same = lambda n: n
    for text, claimed, rivals, label in (
            ("Weighting both modalities beats text only and image only", "both", ("text_only", "image_only"), same),
            ("Targeted prompts beat broad and benchmark-aligned ones", "both", ("broad", "aligned"),
             lambda n: "targeted" if n == "both" else n),
            ("Reward weighting beats plain self-training (uniform)", "both", ("uniform",), same),
            ("The pretraining term beats self-generated data alone", "both", ("no_pretrain",), same)):
        if {claimed, *rivals} <= stats.keys():
            claims += [f"- {text}:"] + [f"  - {names.get(k, k)}: " + verdict(k, claimed, rivals, label) for k in keys]
    if {"both", "oracle"} <= stats.keys():
        claims.append("- Learned reward vs the exact verifier as reward (meant as the upper bound), on "
                      f"{names['focus']}: {stats['both']['focus'][0]:.3f} vs {stats['oracle']['focus'][0]:.3f}.")
    return "\n".join(out + ["## The paper's claims at our scale", ""] + claims)


def main(argv=None):
    p = argparse.ArgumentParser(description="Merge and print the tables of ablations.json files of one sweep.")
    p.add_argument("files", nargs="+", metavar="JSON",
                   help="ablations.json files (one sweep split by ablations.first_seed)")
    args = p.parse_args(argv)
    try:
        print(summary_table(merge([read_json(f) for f in args.files])))
    except RunError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
