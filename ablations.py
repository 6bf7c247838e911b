"""
The post-training ablations: every variant of ABLATIONS x a few post-training seeds, each a fresh adapter
on the same pretrained base, measured on one category closely and on the four benchmarks; then the
paper's claims (targeted vs broad vs aligned prompts, both modalities vs one, reward weighting vs uniform)
judged by the standard error of the difference.

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
    focus_prompts: int = 150  # bench prompts of the measured category, x 4 samples x 2 sampling seeds


ABLATIONS = {  # variant -> [post] overrides of the run's config; each post-trains a fresh adapter from the base
    "both": {},  # the run's [post] config (default: targeted prompts, threshold weights, both modalities, vqascore)
    "uniform": {"weighting": "uniform"},  # plain self-training on the same kind of samples: the control
    "oracle": {"reward": "verifier"},  # the exact verifier as reward: the upper bound of a learned reward
    "text_only": {"alpha_image": 0.0},
    "image_only": {"alpha_text": 0.0},
    "aligned": {"strategy": "aligned"},
    "broad": {"strategy": "broad"},
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
    base. Each is measured on the category the run's post-training aims at first (aim; with a [post]
    strategy other than targeted, focus_category), by focus_score: focus_prompts x 4 samples x 2 sampling
    seeds = 1,200 samples, and on the four benchmarks (bench_prompts x 1 sample, 2 for oneig): about 2
    minutes a run on 2 CPU cores, 7 variants x 3 seeds. A base with nothing weak to aim at is refused."""
    tc, ac = cfgs["train"], cfgs["ablations"]
    weak = report.get("weakness")
    if not weak:
        raise RunError("ablations need the eval stage's weakness report: run --stages=eval first")
    _, tokenizer, vocab, vq, base = load_run(run_dir, device)
    calibrated = {}  # aim's fresh dev samples: the same for every variant and seed with the same reward
    focus = focus_category(weak)
    if cfgs["post"].strategy == "targeted":  # the category the run's post-training aims at first
        pc = cfgs["post"]
        try:
            thresholds = posttrain.reward_thresholds(run_dir, pc, device)
            focus = posttrain.aim(cfgs, run_dir, device, pc, weak, thresholds,
                                  (base, vq, vocab, tokenizer), "ablations", calibrated)[0][0]
        except targeting.NothingToTarget as e:
            raise RunError(f"no weakness to post-train on, so nothing for the ablations to compare: {e}") from None
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
            pc = dataclasses.replace(cfgs["post"], **ABLATIONS[name])
            gpt, *_, rounds = posttrain.post_train(cfgs, run_dir, device, log, pc, seed=1000 + seed,
                                                   log_prefix=f"ablations/{name}_s{seed}", calibrated=calibrated)
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
                   "data strategy": ["broad", "aligned", "both"], "reward": ["both", "oracle", "uniform"]}


def merge(parts):
    """Several ablations.json of one sweep (same base, other seeds) -> one, the runs of each variant joined."""
    if len({json.dumps(p["base"], sort_keys=True) for p in parts}) != 1:
        raise SystemExit("these ablation files come from different base runs: they cannot be merged")
    merged = {**parts[0], "runs": {}}
    for p in parts:
        for name, runs in p["runs"].items():
            merged["runs"].setdefault(name, []).extend(runs)
    return merged


def summary_table(results, tables=ABLATION_TABLES):
    """ablations.json -> markdown: per table, mean +- std over seeds of the focus category and the four
    benchmarks, and the paper's claims checked against the figures."""
    focus = results["focus_category"]
    metric = "facts" if focus in evaluate.GRADED else "pass_rate"  # dense is scored by DPG's fact fraction
    base = results["base"]
    get = lambda res: [res["focus"][metric]] + [res["benchmarks"][b]["overall"]
                                                for b in ("geneval", "dpg", "wise", "oneig")]
    stats = {name: (np.mean([get(r) for r in runs], 0),
                    np.std([get(r) for r in runs], 0, ddof=min(len(runs) - 1, 1)), len(runs))
             for name, runs in results["runs"].items()}
    head = f"| variant | {focus} ({metric}) | change | geneval | dpg | wise | oneig |"
    out = ["# Post-training ablations", "",
           f"Focus: `{focus}`, the base model's weakest dev category that post-training aims at, "
           f"measured on {base['focus']['samples']} samples "
           f"(bench prompts x 4 samples x 2 sampling seeds). Benchmarks: bench prompts x 1 sample (oneig 2). "
           f"Mean +- sample std over post-training seeds.", ""]
    for title, names in tables.items():
        out += [f"## {title}", "", head, "|---|---|---|---|---|---|---|",
                "| base (no post-training) | "
                + " | ".join([f"{get(base)[0]:.3f}", "-"] + [f"{v:.3f}" for v in get(base)[1:]]) + " |"]
        for n in names:
            if n in stats:
                m, sd, k = stats[n]
                cells = ([f"{m[0]:.3f} +- {sd[0]:.3f}", f"{m[0] - get(base)[0]:+.3f}"]
                         + [f"{a:.3f} +- {b:.3f}" for a, b in zip(m[1:], sd[1:])])
                label = f"{n} = targeted, the default" if n == "both" else n  # the run's [post] config
                out.append(f"| {label} (n={k}) | " + " | ".join(cells) + " |")
        out.append("")
    claims = []
    se = lambda n: stats[n][1][0] / np.sqrt(max(stats[n][2], 1))

    def verdict(claimed, rivals, label):
        """Whether `claimed` beats every rival beyond the standard error of their difference; a lead
        smaller than that is no verdict either way (one seed's noise would decide it)."""
        best = max((claimed, *rivals), key=lambda n: stats[n][0][0])
        other = max(rivals, key=lambda n: stats[n][0][0]) if best == claimed else claimed  # the comparison that decides
        gap, err = stats[best][0][0] - stats[other][0][0], float(np.hypot(se(best), se(other)))
        if gap <= err:
            return (f"**not settled**: {label(best)} leads {label(other)} by {gap:+.3f}, "
                    f"within the standard error {err:.3f}")
        return (f"**{'reproduces' if best == claimed else 'does not reproduce'}** (best: {label(best)}, "
                f"{gap:+.3f} over {label(other)}, standard error {err:.3f})")
    if {"both", "text_only", "image_only"} <= stats.keys():
        claims.append(f"- Weighting both modalities beats text only and image only on {focus}: "
                      + verdict("both", ("text_only", "image_only"), lambda n: n) + ".")
    if {"broad", "aligned", "both"} <= stats.keys():
        claims.append(f"- Targeted prompts beat broad and benchmark-aligned ones on {focus}: "
                      + verdict("both", ("broad", "aligned"), lambda n: "targeted" if n == "both" else n) + ".")
    if {"both", "uniform"} <= stats.keys():
        gain = stats["both"][0][0] - stats["uniform"][0][0]
        err = float(np.hypot(se("both"), se("uniform")))
        claims.append(f"- Reward weighting beats plain self-training (uniform) by {gain:+.3f} on {focus}, "
                      f"standard error {err:.3f}: **{'beyond' if gain > err else 'within'} its standard error**.")
    if {"both", "oracle"} <= stats.keys():
        claims.append("- Learned reward vs the exact verifier as reward (meant as the upper bound): "
                      f"{stats['both'][0][0]:.3f} vs {stats['oracle'][0][0]:.3f}.")
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
