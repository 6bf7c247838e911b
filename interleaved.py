"""
The interleaved benchmarks of a run, scored exactly by the world's parser (episodes.py has the episodes):
- consistency: for each step of held-out (bench) episodes of 4 images, the model is given the episode so far (the
  true earlier images, in its own context format) and the step's instruction, writes its plan and draws the image;
  parsed, the image must keep every object the edit does not name (shape, colour, size, cell: `persist`), change
  the named one as asked (`edit`), and be exactly the scene the step asks for (`exact`); per step, as the number
  of images in context grows 0, 1, 2, 3;
- understanding: the episode's question about one of its images, answered in one word (`questions`, by how many
  images back the asked one is), and a caption of a single image in the pair format (`captions`: the scene the
  caption names, read back by a small caption parser, equals the image's).
Greedy decoding (temperature 0, no guidance): one answer per episode, every interval (95%, bootstrap over
episodes) is the benchmark's alone.

    python interleaved.py out/interleaved                   # writes RUN/interleaved.json and interleaved.png
    python interleaved.py out/interleaved --episodes 60 --batch 30
    python interleaved.py --compare few=out/il_few mmfs=out/il_mmfs full=out/il_full   # the table, gap closed
    python interleaved.py --show 3                          # out/episodes.png: what episodes look like
    python interleaved.py out/interleaved --bench           # time and memory of a training step, with and without
                                                            # the synchronizers, on one batch of episodes
"""
import argparse
import json
import os
import re
import time
from dataclasses import replace

import numpy as np
import torch

import parser
import world
from data import BOI, BOS, EOI, EOS, PAD, decode_text
from episodes import episode_codes, episode_data, episode_sequence, make_batch, sample_episodes
from stats import SavedBytes, bootstrap_ci, paired_se, score
from generate import (SampleConfig, decode_images, generate_interleaved, load_run, read_json, save_grid,
                      write_json)
from model import GPT, token_ce

BENCH_SEED = 1234  # the bench episodes: fixed, so every run is scored on the same ones
GREEDY = SampleConfig(temperature=0.0, text_temperature=0.0, cfg_scale=1.0, max_plan_tokens=48)


def first_image(tokens, image_offset):
    """The codes (0..K-1) of the first image a sample drew, or None."""
    if BOI not in tokens or EOI not in tokens[tokens.index(BOI):]:
        return None
    start = tokens.index(BOI) + 1
    return [t - image_offset for t in tokens[start:start + tokens[start:].index(EOI)]]


def score_step(ep, s, got):
    """One generated step (got: the parsed Scene, or None without an image) against episode ep's step s."""
    target = ep.steps[s].scene
    rec = {"exact": float(got == target)}
    if s == 0:
        return rec
    edit = ep.steps[s].edit
    kept = [o for o in ep.steps[s - 1].scene.objects if o != edit.target]
    have = set(got.objects) if got is not None else set()
    rec["persist"] = float(np.mean([o in have for o in kept])) if kept else 1.0
    if edit.kind == "add":
        rec["edit"] = float(edit.obj in have)
    elif edit.kind == "remove":
        rec["edit"] = float(got is not None and all((o.row, o.col) != (edit.target.row, edit.target.col) for o in have))
    else:
        rec["edit"] = float(edit.obj in have and edit.target not in have)
    return rec


def sample_all(gpt, vocab, prefixes, batch, max_images, seed, plain=False):
    out = []
    for i in range(0, len(prefixes), batch):
        out += generate_interleaved(gpt, vocab, prefixes[i:i + batch], GREEDY, max_images, seed + i, plain)
    return out


SIZE_OF = {w: size for size, words in world.SIZE_WORDS.items() for w in words}  # every size word -> its size
_one_of = lambda words: "|".join(map(re.escape, words))
CAPTION_OBJECT = re.compile(rf"({_one_of(SIZE_OF)}) (\w+) ({_one_of(world.SHAPES)}) "
                            rf"(in the center|at the ({_one_of(world.ROWS)}) ({_one_of(world.COLS)}))")


def parse_caption(text):
    """A caption in world.caption_text's words -> the Scene it names (None if it names two objects in a cell)."""
    objs = []
    for size, colour, shape, where, row, col in CAPTION_OBJECT.findall(text):
        r, c = (1, 1) if where == "in the center" else (world.ROWS.index(row), world.COLS.index(col))
        objs.append(world.Obj(shape, colour, SIZE_OF[size], r, c))
    return world.Scene(tuple(objs)) if len({(o.row, o.col) for o in objs}) == len(objs) else None


def run_benchmark(gpt, vq, vocab, tokenizer, n_episodes=100, batch=50, seed=0):
    """-> (report dict with intervals, per-episode records for comparisons, a few samples for a picture)."""
    dev = next(gpt.parameters()).device
    eps = sample_episodes(n_episodes, BENCH_SEED, "bench", n_images=4)
    codes = episode_codes(eps, vq, dev)
    k, bs = gpt.cfg.ctx_tokens, gpt.cfg.block_size
    records = {"steps": [], "questions": [], "captions": []}
    pictures = []
    for s in range(4):
        prefixes = [episode_sequence(ep, tokenizer, vocab, c, k, bs, upto=s)[0] for ep, c in zip(eps, codes)]
        drawn = [first_image(t, vocab.image_offset) for t in sample_all(gpt, vocab, prefixes, batch, 1, seed + 1000 * s)]
        images = decode_images(vq, [{"codes": d} for d in drawn])
        scenes = [parser.parse(img) if d else None for img, d in zip(images, drawn)]
        records["steps"].append([score_step(ep, s, got) for ep, got in zip(eps, scenes)])
        pictures.append(images[:4])
    prefixes = [episode_sequence(ep, tokenizer, vocab, c, k, bs, upto=4)[0] for ep, c in zip(eps, codes)]
    for ep, t in zip(eps, sample_all(gpt, vocab, prefixes, batch, 0, seed + 5000)):
        answer = decode_text(tokenizer, [x for x in t if x not in (EOS, PAD)]).strip()
        records["questions"].append({"correct": float(answer == ep.question.answer), "back": 4 - ep.question.image})
    singles = [c[0] for c in codes]
    prefixes = [[BOS, BOI] + [vocab.image_offset + x for x in c] + [EOI] for c in singles]
    for ep, t in zip(eps, sample_all(gpt, vocab, prefixes, batch, 0, seed + 6000, plain=True)):
        got = parse_caption(decode_text(tokenizer, [x for x in t if x not in (EOS, PAD)]))
        records["captions"].append({"correct": float(got == ep.steps[0].scene)})
    return summarise(records), records, (eps[:4], pictures)


def mean_ci(values):
    m, ci = score([values])
    return [round(m, 4), ci]


def summarise(records):
    steps = {}
    for s, recs in enumerate(records["steps"]):
        steps[f"step{s + 1}"] = {m: mean_ci([r[m] for r in recs]) for m in recs[0]}
    q = records["questions"]
    by_back = {f"{b}_back": mean_ci([r["correct"] for r in q if r["back"] == b])
               for b in sorted({r["back"] for r in q})}
    return {"episodes": len(records["captions"]), "consistency": steps,
            "understanding": {"questions": mean_ci([r["correct"] for r in q]), "questions_by_distance": by_back,
                              "captions": mean_ci([r["correct"] for r in records["captions"]])}}


def table(report):
    lines = ["| step (images in context) | exact | persist | edit |", "|---|---|---|---|"]
    fmt = lambda v: f"{v[0]:.3f} [{v[1][0]:.2f}, {v[1][1]:.2f}]" if v else "-"
    for s, m in report["consistency"].items():
        lines.append(f"| {s} ({int(s[4:]) - 1}) | {fmt(m['exact'])} | {fmt(m.get('persist'))} | {fmt(m.get('edit'))} |")
    u = report["understanding"]
    lines += ["", f"questions {fmt(u['questions'])}; " + "; ".join(f"{k} {fmt(v)}" for k, v in
                                                                  u["questions_by_distance"].items()),
              f"captions {fmt(u['captions'])}"]
    return "\n".join(lines)


def late(records, metric):
    """Per episode: the mean of a step metric over the steps with 2 or 3 images in context (steps 3 and 4)."""
    return np.mean([[r[metric] for r in records["steps"][s]] for s in (2, 3)], axis=0)


def compare(runs, seed=0, n=1000):
    """{name: run dir} with few, mmfs and full -> lines: per metric (persist: the objects an edit leaves must stay;
    exact: the whole scene), each run's score at steps 3-4, the paired differences with their standard errors, and
    the share of the gap (full - few) that mmfs closes, with a paired bootstrap interval over the bench episodes."""
    recs = {name: read_json(os.path.join(d, "interleaved_records.json")) for name, d in runs.items()}
    lines = []
    for metric in ("persist", "exact"):
        v = {name: late(r, metric) for name, r in recs.items()}
        lines += [f"{metric} at steps 3-4: " + ", ".join(f"{k} {x.mean():.3f} {bootstrap_ci([x])}" for k, x in v.items())]
        if not {"few", "mmfs", "full"} <= set(v):
            continue
        few, mm, full = v["few"], v["mmfs"], v["full"]
        for a, b in (("mmfs", "few"), ("full", "few"), ("full", "mmfs")):
            d = v[a] - v[b]
            lines.append(f"  {a} - {b}: {d.mean():+.3f} (standard error of the paired difference "
                         f"{paired_se(d):.3f})")
        idx = np.random.default_rng(seed).integers(0, len(few), (n, len(few)))
        gaps = full[idx].mean(1) - few[idx].mean(1)
        closed = (mm[idx].mean(1) - few[idx].mean(1)) / np.where(gaps == 0, np.nan, gaps)
        point = (mm.mean() - few.mean()) / (full.mean() - few.mean()) if full.mean() != few.mean() else float("nan")
        lo, hi = np.nanpercentile(closed, [2.5, 97.5])
        lines.append(f"  share of the gap mmfs closes: {point:.2f} [{lo:.2f}, {hi:.2f}] (the aim: >= 0.5)")
    return lines


def step_cost(model, batch, rounds=5, steps=3):
    """One training step (forward, backward, AdamW) of model on an episode batch: (best seconds per step over
    `rounds` rounds of `steps` steps, MB autograd saves for the backward: stats.SavedBytes)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        ce = token_ce(model(batch.x, patch=batch.patch, tags=batch.tags, context=batch.context), batch.y)
        loss = (ce * batch.weight).sum() / batch.weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with SavedBytes() as saved:
        step()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best, saved.bytes / 2**20


def bench(cfg, gpt, vq, vocab, tokenizer, n=8, seed=0):
    """The run's GPT against the same GPT without synchronizers (and without resampler tokens), on one batch of
    n episodes of 4 images: seconds per training step and activation MB, each in its own format."""
    tc = cfg["train"]
    out = {}
    for name, kw in (("run", {}), ("no_sync", {"sync_every": 0}), ("full_tokens", {"sync_every": 0, "ctx_tokens": 0})):
        gcfg = replace(gpt.cfg, **kw)
        torch.manual_seed(seed)
        model = GPT(gcfg)
        model.load_state_dict(gpt.state_dict(), strict=False)
        seqs = episode_data(n, tc["seed"] + 7, "dev", tokenizer, vocab, vq, "cpu", gcfg.ctx_tokens, gcfg.block_size, 4)
        batch = make_batch(seqs, vocab, vq.cfg.n_codes, gcfg.ctx_tokens, "cpu")
        seconds, mb = step_cost(model, batch)
        out[name] = {"seconds_per_step": round(seconds, 4), "activation_mb": round(mb, 1),
                     "params": sum(p.numel() for p in model.parameters()), "tokens": int(batch.x.numel()),
                     "ctx_tokens": gcfg.ctx_tokens, "sync_every": gcfg.sync_every}
    return out


def save_picture(vq, eps, pictures, path):
    """Per episode: the true images (top row) and the drawn ones (bottom row), step by step."""
    images, captions = [], []
    for e, ep in enumerate(eps):
        for s, step in enumerate(ep.steps):
            images.append(world.render(step.scene, vq.cfg.image_size))
            captions.append(f"{s + 1}: {step.instruction}")
        for s in range(len(ep.steps)):
            images.append(pictures[s][e])
            captions.append(f"drawn {s + 1}")
    marks = [True] * len(images)
    for e, ep in enumerate(eps):
        for s, step in enumerate(ep.steps):
            marks[e * 8 + 4 + s] = parser.parse(pictures[s][e]) == step.scene
    save_grid(images, captions, path, cols=4, marks=marks)


def show(n, seed, out):
    """A grid of random training episodes: one row each, every image with its instruction, the question last."""
    eps = sample_episodes(n, seed, "train", n_images=4)
    images, captions = [], []
    for ep in eps:
        for i, s in enumerate(ep.steps):
            images.append(world.render(s.scene, 32))
            q = f" || Q: {ep.question.text}? {ep.question.answer}" if i == len(ep.steps) - 1 else ""
            captions.append(f"{i + 1}: {s.instruction}{q}")
    save_grid(images, captions, out, cols=4)
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Consistency and understanding across the images of an episode.")
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--episodes", type=int, default=100, help="bench episodes of 4 images")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs="+", metavar="NAME=RUN", help="tabulate runs already scored")
    p.add_argument("--show", type=int, default=0, help="write out/episodes.png with this many episodes")
    p.add_argument("--bench", action="store_true", help="time and memory of a training step instead")
    args = p.parse_args(argv)
    if args.show:
        return show(args.show, args.seed, "out/episodes.png")
    if args.compare:
        runs = dict(a.split("=", 1) for a in args.compare)
        print("\n".join(compare(runs)))
        return
    if not args.run_dir:
        p.error("give a run directory, --compare or --show")
    cfg, tokenizer, vocab, vq, gpt = load_run(args.run_dir)
    if args.bench:
        torch.set_num_threads(1)
        figures = bench(cfg, gpt, vq, vocab, tokenizer, seed=args.seed)
        write_json(figures, os.path.join(args.run_dir, "interleaved_bench.json"))
        print(json.dumps(figures, indent=1))
        return
    report, records, (eps, pictures) = run_benchmark(gpt, vq, vocab, tokenizer, args.episodes, args.batch, args.seed)
    write_json(report, os.path.join(args.run_dir, "interleaved.json"))
    write_json(records, os.path.join(args.run_dir, "interleaved_records.json"))
    save_picture(vq, eps, pictures, os.path.join(args.run_dir, "interleaved.png"))
    print(table(report))
    print(json.dumps({"ctx_tokens": gpt.cfg.ctx_tokens, "sync_every": gpt.cfg.sync_every}))


if __name__ == "__main__":
    main()
