"""
Over-optimisation, measured (Gao et al. 2022, "Scaling laws for reward model overoptimization"): from a
trained run, post-train for overopt.rounds rounds with the run's [post] config and, every overopt.every
LoRA steps, sample a fixed set of dev prompts and score the same samples with the proxy reward (post.reward,
what training climbs) and the exact verifier (the gold, which training never sees). Where they part, more
optimisation of the proxy stops buying what it stands for.

    python train.py tiny_configs/shapes_cpu.toml --stages=overopt    # after the main job: ~10 min on 2 cores
    -> RUN/overopt/overopt.json, overopt.md (the table) and overopt.png (the plot)
"""

import dataclasses
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import evaluate
import posttrain
import rewards
from generate import load_run, write_json
from model import merge_lora, unmerge_lora


@dataclass
class OverOptConfig:
    rounds: int = 4  # post-training rounds, each sampling its training data from the model as it now is
    round_prompts: int = 64  # post.prompts of these rounds: fewer than the post stage's, to fit ~10 min
    every: int = 15  # LoRA steps between measurements (plus one of the base before any step)
    prompts: int = 8  # dev prompts per category measured at every point (the same ones each time)
    samples: int = 2  # samples per dev prompt at every point (the same sampling seed each time)


def config_rules(oc):
    """[overopt] values that type-check but cannot work: (holds, message) pairs, checked before any work."""
    return [(min(oc.rounds, oc.round_prompts, oc.every, oc.prompts, oc.samples) >= 1,
             "overopt.rounds, round_prompts, every, prompts and samples must be >= 1")]


def measure(gpt, vq, vocab, tokenizer, sample_cfg, examples, reward_fn, n_samples, batch, device):
    """The proxy reward and the verifier on the same samples of the dev prompts: means over prompts and
    their standard errors (per-prompt means, so a prompt's samples are not counted as independent)."""
    merge_lora(gpt)  # a no-op on a model without an adapter
    s = posttrain.self_generate(gpt, vq, vocab, tokenizer, examples, n_samples, sample_cfg, 0, batch)
    unmerge_lora(gpt)
    proxy = rewards.score(reward_fn, s["image"], [examples[i].prompt for i in s["example"]], device)
    gold = posttrain.verifier_scores(s["image"], examples, s["example"])
    out = {}
    for key, x in (("proxy", proxy), ("verifier", gold)):
        per = np.array([np.mean(np.asarray(x)[np.asarray(s["example"]) == i]) for i in range(len(examples))])
        out[key], out[f"{key}_se"] = float(per.mean()), float(per.std(ddof=1) / math.sqrt(len(per)) if len(per) > 1
                                                              else 0.0)
    return out


def parting(points):
    """Index of the first point where the proxy still rises (above the point before, and above where the
    verifier peaked: a proxy that only recovers from a dip has not gained) while the verifier has fallen
    from its peak so far by more than the standard error of that drop; None if they never part."""
    for i in range(1, len(points)):
        peak, p = max(points[:i], key=lambda q: q["verifier"]), points[i]
        rises = p["proxy"] > max(points[i - 1]["proxy"], peak["proxy"])
        if rises and peak["verifier"] - p["verifier"] > math.hypot(peak["verifier_se"], p["verifier_se"]):
            return i
    return None


def table(res):
    """overopt.json -> markdown: one row a point, and where proxy and verifier part."""
    pts, at = res["points"], res["parting"]
    out = ["# Over-optimisation", "",
           f"Proxy `{res['reward']}` and the exact verifier on the same samples of {res['dev_prompts']} dev prompts "
           f"x {res['config']['samples']} samples, every {res['config']['every']} LoRA steps "
           f"({res['config']['rounds']} rounds of `{res['strategy']}` post-training); +- the standard error "
           "over prompts.", "",
           "| LoRA step | round | proxy | verifier |", "|---|---|---|---|"]
    out += [f"| {p['step']} | {p['round']} | {p['proxy']:.3f} +- {p['proxy_se']:.3f} | "
            f"{p['verifier']:.3f} +- {p['verifier_se']:.3f} |" for p in pts]
    out += ["", f"**They part at LoRA step {pts[at]['step']}**: the proxy still rises, the verifier has fallen "
                "from its peak beyond the standard error of the drop." if at is not None else
            f"They do not part within {pts[-1]['step']} LoRA steps."]
    return "\n".join(out)


def plot(res, path, size=(640, 400)):
    """Both curves against LoRA steps as a PNG (Pillow only): axes with ticks, two lines, their labels, a
    legend, and a dashed line where they part."""
    img = Image.new("RGB", size, "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, top, right, bottom = 60, 50, size[0] - 20, size[1] - 50
    pts = res["points"]
    xs = [p["step"] for p in pts]
    ys = [p[k] for p in pts for k in ("proxy", "verifier")]
    lo, hi = min(ys), max(ys)
    lo, hi = lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1)
    px = lambda x: left + (right - left) * x / max(xs[-1], 1)
    py = lambda y: bottom - (bottom - top) * (y - lo) / (hi - lo)
    d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for i in range(6):
        y = lo + (hi - lo) * i / 5
        d.line([(left - 4, py(y)), (left, py(y))], fill="black")
        d.text((left - 40, py(y) - 6), f"{y:.2f}", fill="black", font=font)
    for x in xs[::max(1, len(xs) // 8)]:
        d.line([(px(x), bottom), (px(x), bottom + 4)], fill="black")
        d.text((px(x) - 6, bottom + 8), str(x), fill="black", font=font)
    d.text(((left + right) / 2 - 30, bottom + 28), "LoRA steps", fill="black", font=font)
    d.text((8, top - 16), "score", fill="black", font=font)
    d.text((left + 10, 8), f"over-optimisation: proxy {res['reward']} vs the exact verifier", fill="black", font=font)
    colours = {"proxy": (31, 119, 180), "verifier": (214, 39, 40)}
    for key, colour in colours.items():
        line = [(px(p["step"]), py(p[key])) for p in pts]
        d.line(line, fill=colour, width=2)
        for x, y in line:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    if res["parting"] is not None:
        x = px(pts[res["parting"]]["step"])
        for y in range(top, bottom, 8):
            d.line([(x, y), (x, y + 4)], fill="gray")
        d.text((x + 4, top + 2), "they part", fill="gray", font=font)
    for i, (key, colour) in enumerate(colours.items()):  # the legend, above the plot where no line runs
        x = right - 320 + 160 * i
        d.line([(x, 32), (x + 25, 32)], fill=colour, width=3)
        d.text((x + 32, 26), f"proxy ({res['reward']})" if key == "proxy" else "verifier (gold)",
               fill="black", font=font)
    img.save(path)


def run(cfgs, run_dir, device, log, report):
    """The measurement: the base's point, then post_train with a hook that measures every overopt.every
    steps; writes RUN/overopt/overopt.{json,md,png}."""
    tc, oc = cfgs["train"], cfgs["overopt"]
    pc = dataclasses.replace(cfgs["post"], rounds=oc.rounds, prompts=oc.round_prompts)
    _, tokenizer, vocab, vq, base = load_run(run_dir, device)
    examples = evaluate.dev_prompts(oc.prompts)
    reward_fn = rewards.load_reward(run_dir, pc.reward, device, {ex.prompt: ex.spec for ex in examples})
    point = lambda gpt: measure(gpt, vq, vocab, tokenizer, cfgs["sample"], examples, reward_fn, oc.samples,
                                tc.eval_batch, device)
    points = [{"round": 0, "step": 0, **point(base)}]

    def hook(gpt, k, step):
        if (k * pc.steps + step) % oc.every == 0:
            points.append({"round": k, "step": k * pc.steps + step, **point(gpt)})
            log(stage="overopt", **points[-1])
            tqdm.write(f"[overopt] step {points[-1]['step']}: proxy {points[-1]['proxy']:.3f}, "
                       f"verifier {points[-1]['verifier']:.3f}")
    posttrain.post_train(cfgs, run_dir, device, log, pc, tc.seed, adapter="overopt", log_prefix="overopt/post",
                         hook=hook)
    res = {"config": asdict(oc), "reward": pc.reward, "strategy": pc.strategy, "dev_prompts": len(examples),
           "points": points, "parting": parting(points)}
    out = os.path.join(run_dir, "overopt")
    os.makedirs(out, exist_ok=True)
    write_json(res, os.path.join(out, "overopt.json"))
    with open(os.path.join(out, "overopt.md"), "w") as f:
        f.write(table(res) + "\n")
    plot(res, os.path.join(out, "overopt.png"))
    print(table(res))
    at = res["parting"]
    return {"points": len(points), "parting_step": None if at is None else points[at]["step"],
            "proxy_gain": points[-1]["proxy"] - points[0]["proxy"],
            "verifier_gain": points[-1]["verifier"] - points[0]["verifier"]}
