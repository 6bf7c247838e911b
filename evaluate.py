"""
Scoring a trained run on held-out benchmark prompts, exactly, with the shapes world's parser.

First scorer (the full four-benchmark suite grows here):
- geneval: six GenEval-style tasks (single object, two objects, counting, colours, position, colour
  attribution); a sample counts only if every clause of its prompt holds; overall = mean of the tasks.
- wise (knowledge/reasoning prompts): the image scored on the resolved scene, and the plan on its own.
- the rate at which the model emits <boi> by itself after its plan.
Benchmark prompts come from the "bench" split of the prompt hash, which the training generators never
emit, drawn with a fixed seed (BENCH_SEED), so every run is scored on the same prompts.

    python evaluate.py out/shapes_cpu          # table
    python evaluate.py out/shapes_cpu --json   # the `benchmarks` part of report.json
"""

import argparse
import json
import os
import time

import numpy as np

import data
from generate import RunError, SampleConfig, decode_images, generate, load_run, save_grid

GENEVAL_TASKS = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
BENCH_SEED = 2026  # fixes the benchmark prompt sets; change it only with BENCH_VERSION
BENCH_VERSION = 1


def benchmark_prompts(category, n, seed=BENCH_SEED):
    """n distinct bench-split examples of one category, the same on every machine and every run."""
    rng = np.random.default_rng([seed, data.CATEGORIES.index(category)])
    seen, out = set(), []
    for _ in range(100 * n):
        ex = data.sample_example(rng, category=category, split="bench")
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
            if len(out) == n:
                return out
    raise RuntimeError(f"only {len(out)} distinct bench prompts for {category}; the world has too few phrasings")


def sample_and_score(gpt, vq, vocab, tokenizer, examples, sample_cfg, n_samples, batch, seed):
    """Every example sampled n_samples times. Returns one record per sample."""
    jobs = [(ex, k) for ex in examples for k in range(n_samples)]
    ids = {ex.prompt: data.encode_text(tokenizer, ex.prompt) for ex in examples}
    records = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        samples = generate(gpt, vocab, [ids[ex.prompt] for ex, _ in chunk], sample_cfg, seed=seed + start)
        images = decode_images(vq, samples, vocab)
        for (ex, _), s, img in zip(chunk, samples, images):
            plan_text = data.decode_text(tokenizer, s["plan"])
            plan_scene = data.parse_plan(plan_text)
            has_image = s["codes"] is not None
            clauses = data.check(data.parse(img), ex.spec) if has_image else {"image": False}
            records.append({
                "prompt": ex.prompt, "category": ex.category, "kind": getattr(ex, "kind", None),
                "plan": plan_text, "emitted_boi": s["emitted_boi"], "image": img,
                "passed": all(clauses.values()), "clauses": clauses,
                "plan_correct": plan_scene is not None and all(data.check(plan_scene, ex.spec).values()),
            })
    return records


def run_all(gpt, vq, vocab, tokenizer, sample_cfg, run_dir, n_prompts=50, n_samples=4, batch=128, seed=0):
    """All benchmarks -> {"benchmarks": {...}, other figures}; writes a PNG grid per benchmark."""
    t0 = time.time()
    by_task = {t: sample_and_score(gpt, vq, vocab, tokenizer, benchmark_prompts(t, n_prompts), sample_cfg, n_samples, batch, seed)
               for t in GENEVAL_TASKS}
    knowledge = sample_and_score(gpt, vq, vocab, tokenizer, benchmark_prompts("knowledge", n_prompts), sample_cfg, n_samples, batch, seed)
    tasks = {t: float(np.mean([r["passed"] for r in recs])) for t, recs in by_task.items()}
    every = [r for recs in by_task.values() for r in recs] + knowledge
    n_images = len(every)
    seconds = time.time() - t0
    benchmarks = {
        "geneval": {"overall": float(np.mean(list(tasks.values()))), "tasks": tasks},
        "wise": {"overall": float(np.mean([r["passed"] for r in knowledge])),
                 "plan_accuracy": float(np.mean([r["plan_correct"] for r in knowledge]))},
    }
    for name, recs in [("geneval", [r for t in GENEVAL_TASKS for r in by_task[t][:8 * n_samples:n_samples]]), ("wise", knowledge[:48])]:
        save_grid([r["image"] for r in recs], [f"{r['prompt']} | {r['plan']}" for r in recs],
                  os.path.join(run_dir, f"samples_{name}.png"), cols=8, marks=[r["passed"] for r in recs])
    return {"benchmarks": benchmarks, "bench_version": BENCH_VERSION, "boi_rate": float(np.mean([r["emitted_boi"] for r in every])),
            "images": n_images, "images_per_s": n_images / seconds, "sample_config": vars(sample_cfg)}


def table(benchmarks):
    lines = [f"{'benchmark':<14}{'task':<16}{'score':>7}"]
    for name, b in benchmarks.items():
        lines.append(f"{name:<14}{'overall':<16}{b['overall']:>7.3f}")
        for k, v in b.get("tasks", {}).items():
            lines.append(f"{'':<14}{k:<16}{v:>7.3f}")
        for k, v in b.items():
            if k not in ("overall", "tasks"):
                lines.append(f"{'':<14}{k:<16}{v:>7.3f}")
    return "\n".join(lines)


def write_report_md(report, path):
    parts = ["# nanoloom run report", "", "## Benchmarks", "", "```", table(report.get("benchmarks", {})), "```", "", "## Stages", ""]
    for stage, figs in report.get("stages", {}).items():
        flat = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figs.items() if not isinstance(v, dict))
        parts.append(f"- **{stage}**: {flat}")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def main():
    p = argparse.ArgumentParser(description="Score a trained run on the benchmarks.")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the `benchmarks` part of report.json")
    p.add_argument("--prompts", type=int, default=None, help="prompts per task (default: the run's train.bench_prompts)")
    p.add_argument("--samples", type=int, default=None, help="samples per prompt (default: the run's train.bench_samples)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's; the prompts are fixed)")
    args = p.parse_args()
    try:
        cfg, tokenizer, vocab, vq, gpt = load_run(args.run_dir)
    except RunError as e:
        raise SystemExit(f"error: {e}")
    if cfg["train"].get("data_dir"):
        raise SystemExit(f"the benchmarks need the shapes world's parser, which cannot read the images of a folder run; see "
                         f"{os.path.join(args.run_dir, 'samples_folder.png')}, or draw with `python generate.py {args.run_dir} \"a caption\"`")
    tc = cfg["train"]  # the run's own settings, so the scores match its report.json
    pick = lambda given, key: tc[key] if given is None else given
    res = run_all(gpt, vq, vocab, tokenizer, SampleConfig(**cfg.get("sample", {})), args.run_dir,
                  n_prompts=pick(args.prompts, "bench_prompts"), n_samples=pick(args.samples, "bench_samples"),
                  batch=tc["eval_batch"], seed=pick(args.seed, "seed"))
    if args.json:
        print(json.dumps(res["benchmarks"], indent=2))
    else:
        print(table(res["benchmarks"]))
        print(f"<boi> emitted by the model itself: {res['boi_rate']:.3f}; {res['images']} images at {res['images_per_s']:.1f}/s")


if __name__ == "__main__":
    main()
