"""
The four benchmarks and the weakness report, scored exactly by the shapes world's parser.

Shapes-world analogues of the benchmarks the post-training paper measures:
- geneval  six tasks with GenEval's semantics: single object, two objects, counting (exactly N; N+1
           fails), colours, position (judged on layout cells, a third of the image apart: GenEval's
           "centres differ by more than a margin" rule), colour attribution. A sample counts only if
           every clause holds; overall = mean of the six task accuracies.
- dpg      dense prompts (3-4 objects with colour, shape, size and region, plus one or two relations),
           broken into atomic facts (see `dpg_facts`); score = mean fraction of facts that hold, and
           the rate at which all of them hold; also each kind of fact alone (entity, colour, size,
           region, relation, count) and the plan's own share of facts, to say where a layout goes wrong.
- wise     prompts that need knowledge or reasoning to resolve (colour knowledge, counting words and
           small arithmetic, shape descriptions, comparatives), scored on the resolved scene; also the
           plan alone (text modality) and the image score when the plan was right vs wrong.
- oneig    four dimensions, averaged: alignment (fraction of clauses that hold), reasoning (knowledge
           prompts passed), diversity (distinct correct scenes among one prompt's samples) and quality
           (how well the image is explained by clean shapes: colour-matched foreground IoU between the
           image and a re-render of its parsed scene).
Every score carries a 95% interval from a bootstrap over prompts (`bootstrap_ci`).

Every benchmark also reports its `seen` and `tail` parts: prompts that name a long-tail composition
(world.TAIL: colour-shape pairs the generator's text-image pairs show rarely) against the others. Half
of every prompt set's prompts are tail prompts (part_example), so the tail part is measured as closely.

Prompt sets (version BENCH_VERSION) are fixed: drawn with BENCH_SEED from the "bench" split, which is
split by what a prompt asks (world.split_of hashes its Spec's canonical key, not its words), so no
training or post-training generator ever asks the same thing in other words; n prompts per set (the run's
train.bench_prompts, 50 by default), n samples each (train.bench_samples, 4). The weakness report is
computed on the separate "dev" split, never on the benchmark, so post-training can aim at it without
seeing benchmark prompts, and recipe choices are read there.

    python evaluate.py out/shapes_cpu          # table with intervals, weakness report; PNG grid per benchmark
    python evaluate.py out/shapes_cpu --json   # the `benchmarks` part of report.json
    python evaluate.py out/shapes_cpu --focus knowledge/comparative --adapter post   # one category, 1,200 dev samples
"""

import argparse
import json
import os
import time
from collections import defaultdict

import numpy as np

import data
import parser
import world
from stats import score
from generate import RunError, decode_images, generate, load_adapter, load_run, sample_config, save_grid

BENCHMARKS = ("geneval", "dpg", "wise", "oneig")  # score_benchmarks' keys, in its order
GENEVAL_TASKS = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
GRADED = ("dense",)  # scored by their share of facts (category_score); post-training keeps each prompt's best sample
ONEIG_CATEGORIES = GENEVAL_TASKS + ("knowledge",)  # oneig's mix: every category with something left open
BENCH_SEED = 2026  # fixes the benchmark prompt sets; change it only with BENCH_VERSION
BENCH_VERSION = 3  # 1: geneval + wise; 2: + dpg, oneig, intervals; 3: split by content, seen and tail parts
DEV_SEED = 7  # fixes the dev prompts of the weakness report


# -----------------------------------------------------------------------------
# Prompt sets


NO_COMPOSITION = ("two_objects",)  # categories whose prompts name shapes alone, never a colour-shape pair
TAIL_NAMES = tuple(f"{c} {s}" for c, s in world.TAIL)  # as the weakness report names compositions


def part_example(rng, category, split, slot, kind=None):
    """An example for a prompt set's slot: odd slots name a tail composition, even ones none, so that every
    set has a seen and a tail part of about equal size (a category that names no composition is all seen)."""
    tail = slot % 2 == 1 and category not in NO_COMPOSITION
    for _ in range(5_000):
        ex = world.sample_example(rng, category, split, kind)
        if world.is_tail(ex.spec) == tail:
            return ex
    raise RuntimeError(f"no {split} prompt of {category} that {'names' if tail else 'names no'} a tail composition: "
                       "world.SPLIT_SALT must give every category seen and tail requests on dev and bench")


def _distinct(rng, categories, n, split, exclude=()):
    """n distinct examples of `split`, cycling through categories, half of each category's seen and half
    tail (part_example); prompts in `exclude` are skipped."""
    k = len(categories)
    draw = lambda found: part_example(rng, categories[found % k], split, found // k)
    out = world.distinct_examples(draw, n, 200 * n, exclude)
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} distinct {split} prompts of {', '.join(categories)}; "
                           "the world has too few phrasings")
    return out


def benchmark_prompts(category, n, seed=BENCH_SEED):
    """n distinct bench-split examples of one category, the same on every machine and every run."""
    return _distinct(np.random.default_rng([seed, world.CATEGORIES.index(category)]), (category,), n, "bench")


FOCUS_NAMES = ([c for c in world.CATEGORIES if c != "knowledge"] + [f"knowledge/{k}" for k in world.KNOWLEDGE_KINDS]
               + ["tail", "seen"])  # tail: prompts naming a tail composition, from every category that can name one


def focus_prompts(name, n, split="dev", seed=BENCH_SEED):
    """n distinct examples of `split` of a category name as the weakness report writes it ("position",
    "knowledge/comparative"), or of a part, "tail" or "seen", drawn from every category in turn: one thing
    measured closely (focus_score). Dev by default: decisions are read on dev, the benchmarks only report
    them; the seed is not the weakness report's, so a category chosen for failing its dev prompts is
    measured on others. With split "bench" and no kind, a category's are benchmark_prompts."""
    if name in ("tail", "seen"):
        cats = [c for c in world.CATEGORIES if name == "seen" or c not in NO_COMPOSITION]
        rng = np.random.default_rng([seed, 200 + (name == "tail")])
        draw = lambda found: part_example(rng, cats[found % len(cats)], split, int(name == "tail"))
    else:
        category, _, kind = name.partition("/")
        rng = np.random.default_rng([seed, world.CATEGORIES.index(category)]
                                    + ([world.KNOWLEDGE_KINDS.index(kind)] if kind else []))
        draw = lambda found: part_example(rng, category, split, found, kind or None)
    out = world.distinct_examples(draw, n, 200 * n)
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} distinct {split} prompts of {name}; the world has too few phrasings")
    return out


def prompt_sets(n, seed=BENCH_SEED):
    """Every benchmark's fixed prompts: {"geneval/<task>": [...], "dpg": [...], "wise": [...], "oneig": [...]}.
    oneig draws its own prompts, none shared with the other sets."""
    sets = {f"geneval/{t}": benchmark_prompts(t, n, seed) for t in GENEVAL_TASKS}
    sets["dpg"] = benchmark_prompts("dense", n, seed)
    sets["wise"] = benchmark_prompts("knowledge", n, seed)
    used = {ex.prompt for exs in sets.values() for ex in exs}
    # at least one prompt of each category, so every dimension has prompts
    sets["oneig"] = _distinct(np.random.default_rng([seed, 100]), ONEIG_CATEGORIES,
                              max(n, len(ONEIG_CATEGORIES)), "bench", used)
    return sets


def dev_prompts(n_per_category, seed=DEV_SEED):
    """Dev-split prompts of every category, for the weakness report (never the benchmark's)."""
    return [ex for c in world.CATEGORIES
            for ex in _distinct(np.random.default_rng([seed, world.CATEGORIES.index(c)]), (c,), n_per_category, "dev")]


# -----------------------------------------------------------------------------
# Scores of one sample


def dpg_facts(scene, spec):
    """DPG-style atomic facts of a dense prompt -> whether each holds. Per object: it exists (shape),
    has its colour, its size, sits in its region, each fact given the ones before (as DPG-Bench skips
    an attribute question when the entity is missing); per relation: some object of each named colour
    and shape stands in it; and the scene has exactly the named number of objects."""
    def has(**attrs):
        return [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]
    facts = {}
    for i, r in enumerate(spec.reqs):
        facts[f"{i}:entity {r.shape}"] = bool(has(shape=r.shape))
        facts[f"{i}:colour {r.colour}"] = bool(has(shape=r.shape, colour=r.colour))
        facts[f"{i}:size {r.size}"] = bool(has(shape=r.shape, colour=r.colour, size=r.size))
        facts[f"{i}:region {world.ROWS[r.row]} {world.COLS[r.col]}"] = bool(has(shape=r.shape, colour=r.colour,
                                                                                row=r.row, col=r.col))
    for i, rel, j in spec.relations:
        a, b = (has(shape=spec.reqs[k].shape, colour=spec.reqs[k].colour) for k in (i, j))
        facts[f"relation:{i} {rel} {j}"] = any(world.holds(x, rel, y) for x in a for y in b)
    facts["count"] = len(scene.objects) == spec.total
    return facts


FACT_KINDS = ("entity", "colour", "size", "region", "relation", "count")


def fact_kind(name):
    """A dpg_facts key -> its kind: "2:region top left" -> "region", "relation:0 above 1" -> "relation"."""
    return name.split(":")[0] if not name[0].isdigit() else name.split(":")[1].split()[0]


def render_agreement(images, scenes):
    """Colour-matched foreground IoU between each image and a clean re-render of its parsed scene:
    1 when the image is exactly clean shapes, falling with blur, speckle, fragments and distortions."""
    size = images[0].shape[0]
    got = parser.palette_map(np.stack(images))
    clean = parser.palette_map(np.stack([world.render(s, size) for s in scenes]))
    inter = ((got == clean) & (got >= 0)).sum((1, 2))
    union = ((got >= 0) | (clean >= 0)).sum((1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def sample_and_score(gpt, vq, vocab, tokenizer, examples, sample_cfg, n_samples, batch, seed):
    """Every example sampled n_samples times, all in batches. Returns one record per sample, in the
    order (example, sample)."""
    jobs = [(ex, k) for ex in examples for k in range(n_samples)]
    ids = {ex.prompt: data.encode_text(tokenizer, ex.prompt) for ex in examples}
    samples, images = [], []
    for start in range(0, len(jobs), batch):
        chunk = generate(gpt, vocab, [ids[ex.prompt] for ex, _ in jobs[start:start + batch]],
                         sample_cfg, seed=seed + start)
        samples += chunk
        images += decode_images(vq, chunk)
    scenes = parser.parse_batch(np.stack(images))
    quality = render_agreement(images, scenes)
    records = []
    for (ex, _), s, img, scene, q in zip(jobs, samples, images, scenes, quality):
        plan_text = data.decode_text(tokenizer, s["plan"])
        plan_scene = world.parse_plan(plan_text)
        has_image = s["codes"] is not None
        clauses = world.check(scene, ex.spec) if has_image else {"image": False}
        records.append({
            "example": ex, "prompt": ex.prompt, "category": ex.category, "kind": ex.kind,
            "plan": plan_text, "emitted_boi": s["emitted_boi"], "image": img, "scene": scene,
            "passed": all(clauses.values()), "clauses": clauses, "quality": float(q) if has_image else 0.0,
            "facts": dpg_facts(scene, ex.spec) if ex.category == "dense" and has_image else None,
            # the plan judged as a scene: a malformed plan has no facts right
            "plan_facts": (dpg_facts(plan_scene or world.Scene(()), ex.spec) if ex.category == "dense" else None),
            "plan_correct": plan_scene is not None and all(world.check(plan_scene, ex.spec).values()),
        })
    return records


# -----------------------------------------------------------------------------
# Intervals


def per_prompt(records, value):
    """Mean of value(record) over each prompt's samples -> array, one entry per prompt."""
    groups = defaultdict(list)
    for r in records:
        groups[r["prompt"]].append(value(r))
    return np.array([np.mean(v) for v in groups.values()], dtype=float)


# -----------------------------------------------------------------------------
# The benchmarks


def geneval(by_task):
    vals = {t: per_prompt(recs, lambda r: r["passed"]) for t, recs in by_task.items()}
    overall, ci = score(list(vals.values()))
    out = {"overall": overall, "tasks": {}, "ci": {"overall": ci}}
    for t, v in vals.items():
        out["tasks"][t], out["ci"][t] = score([v])
    return out


def parts(bench, records):
    """A benchmark (records -> dict with "overall" and its interval) on its seen and tail prompts apart:
    {"seen": {"score", "ci", "prompts"}, "tail": {...}}; a part without prompts is left out."""
    out = {}
    for part, tail in (("seen", False), ("tail", True)):
        sub = [r for r in records if world.is_tail(r["example"].spec) == tail]
        if sub:
            b = bench(sub)
            out[part] = {"score": b["overall"], "ci": b["ci"]["overall"], "prompts": len({r["prompt"] for r in sub})}
    return out


def by_category(records):
    groups = defaultdict(list)
    for r in records:
        groups[r["category"]].append(r)
    return dict(groups)


def fact_share(record):
    """A dense sample's share of DPG facts that hold (0 when it drew no image)."""
    return float(np.mean(list(record["facts"].values()))) if record["facts"] else 0.0


def dpg(records):
    facts = per_prompt(records, fact_share)
    every = per_prompt(records, lambda r: bool(r["facts"]) and all(r["facts"].values()))
    (overall, ci), (all_rate, all_ci) = score([facts]), score([every])
    out = {"overall": overall, "all_facts": all_rate}
    # the plan first (a wrong plan dooms its image), then each kind of fact in the image, pooled over the
    # samples that drew one (overall counts a sample without an image as 0; all of them draw, in practice)
    out["plan_facts"] = float(np.mean([np.mean(list(r["plan_facts"].values())) for r in records]))
    for kind in FACT_KINDS:
        held = [v for r in records for k, v in (r["facts"] or {}).items() if fact_kind(k) == kind]
        if held:
            out[f"facts_{kind}"] = float(np.mean(held))
    out["ci"] = {"overall": ci, "all_facts": all_ci}
    return out


def wise(records):
    out, ci = {}, {}
    out["overall"], ci["overall"] = score([per_prompt(records, lambda r: r["passed"])])
    out["plan_accuracy"], ci["plan_accuracy"] = score([per_prompt(records, lambda r: r["plan_correct"])])
    for plan_ok in (True, False):
        # conditional on the plan, so resampled over samples, not prompts
        sub = np.array([r["passed"] for r in records if r["plan_correct"] == plan_ok], dtype=float)
        key = f"image_when_plan_{'right' if plan_ok else 'wrong'}"
        if len(sub):
            out[key], ci[key] = score([sub])
    kinds = sorted({r["kind"] for r in records})
    out["kinds"] = {k: float(np.mean([r["passed"] for r in records if r["kind"] == k])) for k in kinds}
    out["ci"] = ci
    return out


def distinct_correct(recs):
    """(distinct correct scenes - 1) / (samples - 1) over one prompt's samples: 0 when every correct
    sample is the same scene (or none is correct), 1 when all samples are correct and all differ."""
    scenes = {tuple(sorted((o.shape, o.colour, o.size, o.row, o.col) for o in r["scene"].objects))
              for r in recs if r["passed"]}
    return max(len(scenes) - 1, 0) / max(len(recs) - 1, 1)


def oneig(records):
    by_prompt = defaultdict(list)
    for r in records:
        by_prompt[r["prompt"]].append(r)
    align = per_prompt([r for r in records if r["category"] != "knowledge"],
                       lambda r: np.mean(list(r["clauses"].values())))
    dims = {"alignment": align,
            "reasoning": per_prompt([r for r in records if r["category"] == "knowledge"], lambda r: r["passed"]),
            "diversity": np.array([distinct_correct(recs) for recs in by_prompt.values()]),
            "quality": per_prompt(records, lambda r: r["quality"])}
    dims = {k: v for k, v in dims.items() if len(v)}  # a seen or tail part may lack knowledge prompts
    overall, ci = score(list(dims.values()))
    out, cis = {"overall": overall}, {"overall": ci}
    for k, v in dims.items():
        out[k], cis[k] = score([v])
    out["ci"] = cis
    return out


def category_score(entry):
    """A weakness report's category entry -> its score as its benchmark scores it: the share of DPG's facts
    that hold for dense prompts (a 4-object layout is rarely all right, so the pass rate says little about
    progress), the pass rate elsewhere."""
    return entry.get("facts", entry["pass_rate"])


def weakness(records, min_n=8):
    """Where the model fails most, on dev prompts: categories ranked by category_score (knowledge split by
    kind), attribute values (colour, shape, size, count, region, relation, total) ranked by the failure
    rate of the clauses that name them, and colour-shape compositions ranked by the pass rate of the
    clauses that name them (the long tail shows there). Values named by fewer than min_n clauses are left out."""
    cats, facts = defaultdict(list), defaultdict(list)
    for r in records:
        name = category_name(r["category"], r["kind"])
        cats[name].append(r["passed"])
        if r["category"] in GRADED:  # also DPG's share of facts
            facts[name].append(fact_share(r))
    attrs = defaultdict(list)
    for r in records:
        spec, clauses = r["example"].spec, r["clauses"]
        for req in spec.reqs:
            ok = clauses.get(f"count:{req.describe()}", False)
            named = [("shape", req.shape), ("colour", req.colour), ("size", req.size), ("count", req.count)]
            if req.row is not None:
                named.append(("region", f"{world.ROWS[req.row]} {world.COLS[req.col]}"))
            for a, v in named:
                if v is not None:
                    attrs[(a, str(v))].append(ok)
        for i, rel, j in spec.relations:
            attrs[("relation", rel)].append(clauses.get(f"relation:{i} {rel} {j}", False))
        attrs[("total", str(spec.total))].append(clauses.get("total", False))
    comps = defaultdict(list)  # a composition's clauses: whether the object of that colour and shape was drawn
    for r in records:
        for req in r["example"].spec.reqs:
            if req.colour and req.shape:
                comps[f"{req.colour} {req.shape}"].append(r["clauses"].get(f"count:{req.describe()}", False))
    compositions = sorted(({"name": c, "tail": c in TAIL_NAMES, "pass_rate": float(np.mean(oks)), "n": len(oks)}
                           for c, oks in comps.items() if len(oks) >= min_n), key=lambda d: d["pass_rate"])
    categories = [{"name": c, "pass_rate": float(np.mean(v)), "n": len(v)} for c, v in cats.items()]
    for c in categories:
        if c["name"] in facts:
            c["facts"] = float(np.mean(facts[c["name"]]))
    categories.sort(key=category_score)
    attributes = sorted(({"attribute": a, "value": v, "fail_rate": 1 - float(np.mean(oks)), "n": len(oks)}
                         for (a, v), oks in attrs.items() if len(oks) >= min_n), key=lambda d: -d["fail_rate"])
    return {"split": "dev", "seed": DEV_SEED, "samples": len(records),
            "categories": categories, "attributes": attributes, "compositions": compositions}


def score_benchmarks(gpt, vq, vocab, tokenizer, sample_cfg, n_prompts=50, n_samples=4, batch=128, seed=0):
    """The four benchmarks -> (benchmarks dict, {prompt set: records})."""
    run = lambda exs, k: sample_and_score(gpt, vq, vocab, tokenizer, exs, sample_cfg, k, batch, seed)
    recs = {name: run(exs, max(2, n_samples) if name == "oneig" else n_samples)
            for name, exs in prompt_sets(n_prompts).items()}
    out = {"geneval": (lambda rs: geneval(by_category(rs)), [r for t in GENEVAL_TASKS for r in recs[f"geneval/{t}"]]),
           "dpg": (dpg, recs["dpg"]), "wise": (wise, recs["wise"]), "oneig": (oneig, recs["oneig"])}
    return {name: {**bench(rs), **parts(bench, rs)} for name, (bench, rs) in out.items()}, recs


def focus_score(gpt, vq, vocab, tokenizer, sample_cfg, category, n_prompts=150, n_samples=4, seeds=(0, 1), batch=128):
    """One category ("counting", "knowledge/comparative") or part ("tail") measured closely: n_prompts dev
    prompts (focus_prompts) x n_samples x len(seeds) sampling seeds. Returns the pass rate (and, for dense
    prompts, DPG's fact score) with intervals over prompts."""
    exs = focus_prompts(category, n_prompts)
    recs = [r for s in seeds for r in sample_and_score(gpt, vq, vocab, tokenizer, exs, sample_cfg, n_samples, batch, s)]
    out = {"category": category, "samples": len(recs)}
    out["pass_rate"], out["pass_rate_ci"] = score([per_prompt(recs, lambda r: r["passed"])])
    if category == "dense":
        out["facts"], out["facts_ci"] = score([per_prompt(recs, fact_share)])
    return out


def run_all(gpt, vq, vocab, tokenizer, sample_cfg, run_dir, n_prompts=50, n_samples=4,
            batch=128, seed=0, prefix="", dev=True):
    """All four benchmarks and, with dev, the weakness report (n_prompts // 2 dev prompts per category).
    Returns {"benchmarks", "weakness" (with dev), other figures}; writes <prefix>samples_<benchmark>.png,
    pass/fail marked, into run_dir. oneig takes at least 2 samples per prompt (its diversity needs them)."""
    t0 = time.time()
    benchmarks, recs = score_benchmarks(gpt, vq, vocab, tokenizer, sample_cfg, n_prompts, n_samples, batch, seed)
    t_bench = time.time() - t0
    every = [r for rs in recs.values() for r in rs]
    by_task = {t: recs[f"geneval/{t}"] for t in GENEVAL_TASKS}
    grids = {"geneval": [r for t in GENEVAL_TASKS for r in by_task[t][:8 * n_samples:n_samples]],
             "dpg": recs["dpg"][:32], "wise": recs["wise"][:48], "oneig": recs["oneig"][:48]}
    for name, rs in grids.items():
        save_grid([r["image"] for r in rs], [f"{r['prompt']} | {r['plan']}" for r in rs],
                  os.path.join(run_dir, f"{prefix}samples_{name}.png"), cols=8, marks=[r["passed"] for r in rs])
    out = {"benchmarks": benchmarks, "bench_version": BENCH_VERSION,
           "boi_rate": float(np.mean([r["emitted_boi"] for r in every])), "images": len(every),
           "benchmark_seconds": round(t_bench, 1), "images_per_s": len(every) / t_bench,
           "sample_config": vars(sample_cfg)}
    if dev:
        dev_recs = sample_and_score(gpt, vq, vocab, tokenizer, dev_prompts(max(1, n_prompts // 2)),
                                    sample_cfg, n_samples, batch, seed)
        out.update(weakness=weakness(dev_recs), dev_images=len(dev_recs))
    return out


def parser_agreement(images, recon):
    """The VQ round trip judged by the parser: the fraction of scenes whose reconstruction parses to the
    same objects (shape and colour of each, so also how many) as the original, which is what the
    benchmarks need the VQ to keep; and the fraction that parses to exactly the same scene (sizes and cells too)."""
    objects = lambda scene: sorted((o.shape, o.colour) for o in scene.objects)
    pairs = list(zip(parser.parse_batch(images), parser.parse_batch(recon)))
    return float(np.mean([objects(a) == objects(b) for a, b in pairs])), float(np.mean([a == b for a, b in pairs]))


def folder_samples(gpt, vq, vocab, tokenizer, sample_cfg, folder, held_out, seed, path, n=16):
    """A folder run's eval: held-out images (top) and what the GPT draws from their captions (bottom), as a
    PNG at path. The benchmarks score images with the shapes world's parser, which cannot read a folder's."""
    print("benchmarks skipped: they need the shapes world's parser, which cannot read a folder's images")
    held_out = held_out[:n]
    caps = [folder.captions[i] for i in held_out]
    samples = generate(gpt, vocab, [data.encode_text(tokenizer, c) for c in caps], sample_cfg, seed=seed)
    save_grid(list(folder.images[held_out]) + decode_images(vq, samples),
              ["held out: " + c for c in caps] + ["drawn: " + c for c in caps], path, cols=min(8, len(held_out)))
    return {"benchmarks": {}, "skipped": "benchmarks (they need the shapes parser)", "images": len(samples),
            "boi_rate": float(np.mean([s["emitted_boi"] for s in samples]))}


def category_name(category, kind):
    """The weakness report's name of a category: knowledge prompts split by kind ("knowledge/number")."""
    return category + (f"/{kind}" if kind else "")


# -----------------------------------------------------------------------------
# Tables


def rows(b):
    """A benchmark dict -> [(row name, score, 95% interval or None)]: overall, tasks, other figures, kinds,
    then the seen and tail parts."""
    ci = b.get("ci", {})
    out = [(k, v, ci.get(k)) for k, v in [("overall", b["overall"]), *b.get("tasks", {}).items()]]
    out += [(k, v, ci.get(k)) for k, v in b.items() if k not in ("overall", "tasks", "ci", "kinds", "seen", "tail")]
    out += [(f"kind {k}", v, None) for k, v in b.get("kinds", {}).items()]
    return out + [(p, b[p]["score"], b[p]["ci"]) for p in ("seen", "tail") if p in b]


def table(benchmarks):
    """Benchmarks -> a plain-text table, every score with its 95% interval where it has one."""
    lines = [f"{'benchmark':<10}{'score':<22}{'':<2}{'95% interval':>20}"]
    for name, b in benchmarks.items():
        for i, (k, v, ci) in enumerate(rows(b)):
            lo_hi = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            lines.append(f"{name if i == 0 else '':<10}{k:<24}{v:>6.3f}   {lo_hi}")
    return "\n".join(lines)


def weakness_table(w, top=8):
    lines = [f"weakness report ({w['samples']} samples of {w['split']} prompts, seed {w['seed']})",
             "  categories, weakest first: " + ", ".join(
                 f"{c['name']} {c['pass_rate']:.2f}" + (f" (facts {c['facts']:.2f})" if "facts" in c else "")
                 for c in w["categories"]),
             "  attributes, most failed first: " + ", ".join(
                 f"{a['attribute']}={a['value']} {a['fail_rate']:.2f} (n={a['n']})" for a in w["attributes"][:top]),
             "  compositions, weakest first: " + ", ".join(
                 f"{c['name']}{' (tail)' if c['tail'] else ''} {c['pass_rate']:.2f} (n={c['n']})"
                 for c in w.get("compositions", [])[:top])]
    return "\n".join(lines)


def compare(before, after):
    """Two `benchmarks` dicts -> before -> after lines, every score with its interval."""
    lines = [f"{'benchmark':<10}{'score':<24}{'before':>28}{'after':>28}{'change':>9}"]
    fmt = lambda v, ci: f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    for name, b in before.items():
        later = {k: (v, ci) for k, v, ci in rows(after[name])} if name in after else {}
        for i, (k, vb, cb) in enumerate((k, v, ci) for k, v, ci in rows(b) if k in later):
            va, ca = later[k]
            lines.append(f"{name if i == 0 else '':<10}{k:<24}{fmt(vb, cb):>28}{fmt(va, ca):>28}{va - vb:>+9.3f}")
    return "\n".join(lines)


def post_section(post):
    c = post["config"]
    if post.get("skipped"):
        return ["## Post-training", "",
                f"Skipped (`{c['strategy']}` prompts, reward `{c['reward']}`): {post['skipped']}.", ""]
    parts = ["## Post-training", "",
             f"{c['rounds']} rounds x {c['prompts']} `{c['strategy']}` prompts x {c['samples']} samples, "
             f"reward `{c['reward']}`, weighting `{c['weighting']}` (beta {c['beta']}), "
             f"alpha_text {c['alpha_text']}, alpha_image {c['alpha_image']}, "
             f"LoRA r {c['lora_r']} on {c['lora_targets']}.", ""]
    first = post["rounds"][0]
    if first.get("targets"):
        again = [f"{n} {m['pass_rate']:.2f} on {m['samples']}" for n, m in first.get("measured_again", {}).items()]
        parts += [f"Aimed at: {', '.join(first['targets'])}."
                  + (f" Measured again on fresh dev samples (pass rate on all of a category's dev samples): "
                     f"{', '.join(again)}." if again else ""), ""]
    parts += ["The verifier's figure is the share of each prompt's clauses the parsed image satisfies "
              "(1 when it passes).", "",
              "| round | mean reward | verifier (same samples) | verifier, weighted | loss | seconds |",
              "|---|---|---|---|---|---|"]
    parts += [f"| {r['round']} | {r['reward']:.3f} | {r['verifier']:.3f} | {r['verifier_weighted']:.3f} | "
              f"{r['loss']:.3f} | {r['seconds']} |"
              for r in post["rounds"]]
    last = post["rounds"][-1]
    if "reward_after" in last:
        parts += ["", f"The last round's prompts sampled again after fine-tuning: reward {last['reward']:.3f} -> "
                      f"{last['reward_after']:.3f}, verifier {last['verifier']:.3f} -> {last['verifier_after']:.3f}."]
    if post.get("reward_hacking"):
        parts += ["", "**Reward hacking:** the reward rose while the exact verifier did not."]
    parts += ["", "Benchmarks before -> after (95% intervals):", "",
              "```", compare(post["before"], post["after"]), "```", ""]
    return parts


def write_report_md(report, path):
    parts = ["# nanoloom run report", "", "## Benchmarks", "",
             "Scores with 95% bootstrap intervals over prompts (fixed bench prompt sets).", "",
             "```", table(report.get("benchmarks", {})), "```", ""]
    if report.get("weakness"):
        parts += ["## Weakness report (dev prompts)", "", "```", weakness_table(report["weakness"], top=12), "```", ""]
    if report.get("post"):
        parts += post_section(report["post"])
    for title, text in report.get("folder", {}).items():  # a folder run's rewards and post stages (folderpost.py)
        parts += [f"## {title}", "", "```", text, "```", ""]
    parts += ["## Stages", ""]
    for stage, figs in report.get("stages", {}).items():
        flat = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in figs.items() if not isinstance(v, dict))
        parts.append(f"- **{stage}**: {flat}")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description="Score a trained run on the four benchmarks.")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true",
                   help="print the `benchmarks` part of report.json (with --focus: its figures)")
    p.add_argument("--prompts", type=int, default=None,
                   help="prompts per set (default: the run's train.bench_prompts; "
                        "with --focus, ablations.focus_prompts)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per prompt (default: the run's train.bench_samples; with --focus, 4)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: the run's; with --focus, 0, and the next one too); "
                        "the prompts are fixed")
    p.add_argument("--adapter", default=None, help="score the model with a post-training adapter, e.g. post")
    p.add_argument("--focus", default=None, metavar="NAMES",
                   help="instead: measure categories closely, e.g. knowledge/comparative,single_object: "
                        "--prompts dev prompts x --samples x two sampling seeds "
                        "(by default as the ablations: 150 x 4 x 2)")
    args = p.parse_args(argv)
    for name in ("prompts", "samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    focus = [n.strip() for n in args.focus.split(",") if n.strip()] if args.focus is not None else []
    if args.focus is not None and (not focus or set(focus) - set(FOCUS_NAMES)):
        p.error(f"--focus takes category names separated by commas, from: {', '.join(FOCUS_NAMES)}")
    try:
        cfg, tokenizer, vocab, vq, gpt = load_run(args.run_dir)
        if args.adapter:
            load_adapter(gpt, args.run_dir, args.adapter)
    except RunError as e:
        raise SystemExit(f"error: {e}")
    if cfg["train"].get("data_dir"):
        raise SystemExit(f"the benchmarks need the shapes world's parser, which cannot read the images "
                         f"of a folder run; see {os.path.join(args.run_dir, 'samples_folder.png')}, "
                         f"or draw with `python generate.py {args.run_dir} \"a caption\"`")
    tc = cfg["train"]  # the run's own settings, so the scores match its report.json
    sample_cfg = sample_config(cfg)
    if focus:
        n_prompts, seed = args.prompts or cfg.get("ablations", {}).get("focus_prompts", 150), args.seed or 0
        for name in focus:  # before any sampling: the dev split of some categories holds fewer prompts
            try:
                focus_prompts(name, n_prompts)
            except RuntimeError as e:
                p.error(f"--focus {name}: {e}: give --prompts at most that many, and more --samples")
        res = {name: focus_score(gpt, vq, vocab, tokenizer, sample_cfg, name, n_prompts, args.samples or 4,
                                 (seed, seed + 1), tc["eval_batch"]) for name in focus}
        print(json.dumps(res, indent=2) if args.json else "\n".join(
            f"{name:24s} {r['pass_rate']:.3f} [{r['pass_rate_ci'][0]:.3f}, {r['pass_rate_ci'][1]:.3f}] "
            f"on {r['samples']} samples"
            + (f"; share of facts {r['facts']:.3f} [{r['facts_ci'][0]:.3f}, {r['facts_ci'][1]:.3f}]"
               if "facts" in r else "")
            for name, r in res.items()))
        return
    pick = lambda given, key: tc[key] if given is None else given
    res = run_all(gpt, vq, vocab, tokenizer, sample_cfg, args.run_dir,
                  n_prompts=pick(args.prompts, "bench_prompts"), n_samples=pick(args.samples, "bench_samples"),
                  batch=tc["eval_batch"], seed=pick(args.seed, "seed"),
                  prefix=f"{args.adapter}_" if args.adapter else "")
    if args.json:
        print(json.dumps(res["benchmarks"], indent=2))
    else:
        print(table(res["benchmarks"]))
        print(weakness_table(res["weakness"]))
        print(f"<boi> emitted by the model itself: {res['boi_rate']:.3f}; {res['images']} benchmark images at "
              f"{res['images_per_s']:.1f}/s; grids in {args.run_dir}/samples_*.png")


if __name__ == "__main__":
    main()
