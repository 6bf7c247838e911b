"""
Post-training on the model's own samples ("multimodal RWR", PAPERS.md section 1), the algorithm; the
`post` stage of train.py runs it round after round, caches every round on disk and reports.

One round:
  1. prompts from a strategy: `broad` (the pretraining mix), `aligned` (the benchmarks' categories in
     the benchmarks' proportions), or `targeted` (aimed by the weakness report on dev prompts at the
     categories the model passes sometimes but not reliably and its reward can judge, dense prompts by
     their share of facts, and at the attribute values that fail most; skipped when there is no such
     category); always from the "train" split of the prompt hash, so never a benchmark (or dev) prompt;
  2. K samples per prompt from the current model (plan text, then the image it draws by itself);
  3. a reward per sample (default `vqa`), and the exact verifier beside it to watch for reward hacking;
  4. weights w_i from the rewards (`threshold`, the default: per category, calibrated on the base model's
     dev samples, and each dense prompt's best sample; `rwr`, `exp`, `best`, or `uniform` = plain
     self-training);
  5. LoRA fine-tuning on those samples with
        loss_i = alpha_text * CE(plan tokens of sample i) + alpha_image * CE(image tokens of sample i),
        loss   = mean over a mini-batch of w_i * loss_i      (w normalised to mean 1 over the kept samples)
     plus pretrain_weight * the pretraining loss on pretraining data, against drift (Lee et al. 2023).

    python train.py tiny_configs/shapes_cpu.toml --stages=post               # after the pretraining stages
    python train.py tiny_configs/shapes_cpu.toml --stages=post --post.weighting=uniform --train.out_dir=...
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

import data
import world
import evaluate
from data import Vocab, build_sequence
from generate import SampleConfig, decode_images, generate
from model import token_ce

STRATEGIES = ("broad", "aligned", "targeted")
WEIGHTINGS = ("rwr", "exp", "best", "threshold", "uniform")
ALIGNED_CATEGORIES = evaluate.GENEVAL_TASKS + ("dense", "knowledge")  # what the four benchmarks draw from


@dataclass
class PostConfig:
    rounds: int = 1  # generate -> score -> fine-tune cycles; each round samples from the updated model (measured,
    #                  one base: a second round added 2 points on the targeted category and cost 3.5 on counting)
    prompts: int = 256  # prompts per round
    samples: int = 8  # K samples per prompt (dense prompts keep each prompt's best: measured on one base, DPG 0.545 ->
    #                   0.584 with 4, -> 0.624 with 8)
    plan_temperature: float = 1.0  # plan tokens of the self-generated samples (sample.text_temperature is for
    #                                evaluation): reward-weighting samples drawn from pi gives pi * w, but from a
    #                                sharpened pi^(1/T) it also collapses what the prompt leaves open (layout, size)
    strategy: str = "targeted"  # broad | aligned | targeted
    reward: str = "vqa"  # reward name or weighted sum, e.g. "vqa + 0.5*aesthetic" (see rewards.py)
    weighting: str = "threshold"  # rwr | exp | best | threshold | uniform (see sample_weights; why threshold: below)
    beta: float = 0.1  # temperature of rwr and exp: smaller trusts the reward's ranking more
    precision: float = 0.95  # `threshold` keeps, per category, samples at or above the lowest reward from which this share
    #                          of the base model's dev samples pass, counting two extra failures so that a few
    #                          lucky dev samples do not pass (calibrate_thresholds): one fixed threshold does not
    #                          fit, since vqa scores passing samples 0.15-0.65 depending on the category
    alpha_text: float = 1.0  # weight of the plan (text) tokens' loss
    alpha_image: float = 1.0  # weight of the image tokens' loss
    pretrain_weight: float = 1.0  # weight of a loss on pretraining data, against drift (0 = off): without it,
    #                              categories the round's prompts rarely name (counting) were forgotten
    null_prob: float = 0.1  # samples trained with the null condition: the adapter also moves the unguided
    #                         branch, and guidance amplifies any gap that opens between the two (measured
    #                         without it: single objects, colours and counting fell 0.1-0.3 at cfg_scale 1.5,
    #                         mostly recovered at cfg_scale 1.0)
    steps: int = 60  # fine-tuning steps per round
    batch: int = 32  # samples per fine-tuning step
    lr: float = 1e-3  # adapter learning rate (constant after a short warm-up)
    lora_r: int = 8  # adapter rank
    lora_alpha: float = 16.0  # adapter scaling is lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the adapter branch only
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # Linear layers that get adapters
    focus: float = 0.5  # targeted: share of prompts that must name one of the most-failed attribute values
    anchor: float = 0.25  # targeted: share of prompts drawn from every benchmark category (as `aligned`), so that
    #                       the round also imitates the model's right samples of what it already draws well. Measured
    #                       (one base, post seeds 0-2, 1,200 samples each): with 0, comparatives +0.29 to +0.71 but
    #                       single objects -9.6 and -8.8 on two seeds ("a small circle" planned large); with 0.25,
    #                       comparatives +0.19 to +0.30, single objects and position within -2.6
    target_top: int = 2  # targeted: aim only at this many weakest categories the model passes sometimes (0 = all);
    #                      spread over all seven, the weakest got ~50 good samples a round and did not move
    weak_below: float = 0.8  # targeted: aim only at categories passed less often than this on dev; when the reward can
    #                          judge none of them, post-training is skipped (0.7 skipped a base whose comparatives
    #                          passed 0.75: aimed at them, 0.744 -> 0.964; with an older reward, aimed at GenEval
    #                          categories passed 0.76-0.79, it had cost counting 9 points and raised nothing)
    calib_samples: int = 400  # fresh dev samples for a category the eval stage's dev samples cannot settle: too few to call
    #                           it strong, or too few passing ones to calibrate a threshold (choose_targets); ~6 s each
    eval_samples: int = 4  # after post-training: samples per benchmark prompt (as train.bench_samples)


# -----------------------------------------------------------------------------
# prompts


def draw_example(rng, name, split="train"):
    """An Example of a category name as the weakness report writes it ("position",
    "knowledge/comparative"), its prompt from `split`."""
    category, _, kind = name.partition("/")
    return world.sample_example(rng, category, split, kind or None)


def dev_examples(name, n, seed=evaluate.DEV_SEED):
    """n dev-split Examples of a category name, to calibrate a reward on (choose_targets): distinct
    prompts while the world has them, then repeats."""
    rng = np.random.default_rng([seed, *name.encode()])  # one stream per category name
    out = world.distinct_examples(lambda found: draw_example(rng, name, "dev"), n, 50 * n)
    return [out[i % len(out)] for i in range(n)]


def names(ex):
    """The (attribute, value) pairs an example's clauses name, as in evaluate.weakness."""
    out = set()
    for r in ex.spec.reqs:
        out |= {("shape", r.shape), ("colour", r.colour), ("size", r.size), ("count", str(r.count))}
        if r.row is not None:
            out.add(("region", f"{world.ROWS[r.row]} {world.COLS[r.col]}"))
    out |= {("relation", rel) for _, rel, _ in ex.spec.relations}
    return {(a, str(v)) for a, v in out if v is not None} | {("total", str(ex.spec.total))}


def target_shares(weakness, top=0, floor=0.05, judged=None):
    """Category -> share of targeted prompts, in proportion to pass * (1 - pass) on dev prompts (pass:
    evaluate.category_score; plus 0.01, so that with top = 0 no category is dropped entirely). Reward-weighted
    self-training learns only from prompts whose K samples differ in reward: a category the model always
    passes teaches nothing, and so does one it never passes (measured, when dense prompts were judged by
    all-or-nothing thresholds: a third of the prompts on dense scenes, passed 0% of the time, gave no gain
    there and less everywhere else). pass * (1 - pass) is the variance of a pass/fail reward (for dense's
    share of facts, an upper bound of its variance).
    top > 0 keeps only the `top` weakest categories passed at least `floor` of the time: the budget then
    buys enough good samples of each to move it (measured, vqa reward, threshold weights: the weakest
    category, color_attr, 0.326 -> 0.376 spread over every category, -> 0.498 with top = 2). judged: the
    category names the reward can judge (calibrate_thresholds); the others get no prompts."""
    cats = [c for c in weakness["categories"] if judged is None or c["name"] in judged]
    if not cats:
        raise ValueError("the reward cannot judge any dev category (see calibrate_thresholds): nothing to target")
    score = evaluate.category_score  # the pass rate; dense prompts' share of facts
    if top:  # only the `top` weakest of those passed at least `floor` of the time
        live = sorted((c for c in cats if score(c) >= floor), key=score)
        cats = live[:top] or cats
    rate = np.array([score(c) for c in cats])
    w = rate * (1 - rate) + 0.01
    return {c["name"]: float(x) for c, x in zip(cats, w / w.sum())}


class NothingToTarget(Exception):
    """The targeted strategy found no weak category its reward can judge: it would aim at strong ones."""


def min_passing(precision, prior_failures=2):
    """The fewest passing dev samples with which calibrate_thresholds can find a threshold of a category
    (every one of them ranked above every failing one): hits >= precision * (hits + prior_failures)."""
    return math.ceil(precision * prior_failures / (1 - precision) - 1e-9)


def wilson_low(rate, n, z=1.96):
    """The lower end of the 95% Wilson interval of a pass rate seen on n samples (0 with none)."""
    if n == 0:
        return 0.0
    centre, half = rate + z * z / (2 * n), z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n)


def is_weak(name, score, passed, below, floor=0.05):
    """A category worth aiming at: its score (evaluate.category_score) at least `floor`, so there are good
    samples to imitate, and passed less often than `below`. A graded category's prompt passes when all
    its facts hold (`passed`); any other's score is its pass rate (pooled, once measured again)."""
    return floor <= score and (passed if name in evaluate.GRADED else score) < below


def choose_targets(weakness, thresholds, top, below, measure, min_rate=0.0, floor=0.05, min_hits=0):
    """The categories targeted prompts aim at, weakest first: dev categories passed at least `floor` of
    the time (one never passed has no good sample to imitate) and less than `below` (one passed more
    often has little to gain, and aiming at it cost other categories points) whose reward threshold
    exists, or that is graded (evaluate.GRADED: dense prompts; no threshold needed), up to `top` of them
    (0 = all). A graded category is ranked and floored by its share of facts and called weak by how
    often all its facts hold: a base with 0.92 of its dense facts right drew half its layouts with a
    mistake, and one round on them took DPG's all-facts-right 0.525 -> 0.685. measure(name) -> (pass rate, samples, threshold or None) on
    fresh dev samples (train.py draws post.calib_samples) is called for a category
    - whose dev samples are too few to tell that it passes at least `below` of the time (the lower end of
      its 95% interval lies below `below`): the eval stage draws ~24 of each knowledge kind, and a kind that
      passed 22 of 24 passed 0.69 on the benchmark;
    - that is a candidate without a threshold and passes at least `min_rate` of the time.
    Its rate is then pooled with the fresh one and its threshold is the fresh samples' (`thresholds` is
    updated in place), unless they set none for want of passing samples (fewer than `min_hits`): then the
    dev threshold stands (with enough of them and none set, the reward cannot judge the category). The
    walk goes on from the weakest category by the rates as they now stand. Returns (targets, {name:
    (pooled pass rate, samples)} of the measured categories); no targets means: nothing to target."""
    rates = {c["name"]: (evaluate.category_score(c), c["n"]) for c in weakness["categories"]}
    graded = set(evaluate.GRADED)
    outright = {c["name"]: c["pass_rate"] for c in weakness["categories"]}
    measured = {}

    def remeasure(name):
        (rate, n), (fresh, m, threshold) = rates[name], measure(name)
        rates[name] = measured[name] = ((rate * n + fresh * m) / max(1, n + m), n + m)
        if threshold is not None or round(fresh * m) >= min_hits:
            thresholds[name] = threshold

    for name, (rate, n) in list(rates.items()):
        if rate >= below and wilson_low(rate, n) < below and name not in graded:
            remeasure(name)
    targets, seen = [], set()
    while not top or len(targets) < top:
        left = [k for k in rates if k not in seen and is_weak(k, rates[k][0], outright[k], below, floor)]
        if not left:
            break
        name = min(left, key=lambda k: rates[k][0])
        if name in graded:  # no threshold: its samples are weighted by their prompt's best (sample_weights)
            seen.add(name)
            targets.append(name)
            continue
        if thresholds.get(name) is None and rates[name][0] >= min_rate and name not in measured:
            remeasure(name)  # its pooled rate may now rank it elsewhere, or out of range: pick again
            continue
        seen.add(name)
        if thresholds.get(name) is not None:
            targets.append(name)
    return sorted(targets, key=lambda k: rates[k][0]), measured


def with_rates(weakness, measured):
    """A copy of the weakness report whose measured categories carry their pooled pass rate and sample
    count (choose_targets), so that target_shares weighs them by what was measured last."""
    cats = [{**c, "pass_rate": measured[c["name"]][0], "n": measured[c["name"]][1]} if c["name"] in measured else c
            for c in weakness["categories"]]
    return {**weakness, "categories": cats}


def draw_prompts(strategy, n, rng, weakness=None, focus=0.5, top_attributes=5, top_categories=0, judged=None, anchor=0.0):
    """n distinct train-split Examples for a strategy. `targeted` needs the weakness report: categories
    are drawn with target_shares (among the `judged` ones), and a `focus` share of the prompts must also
    name one of the `top_attributes` most-failed attribute values; an `anchor` share is drawn as `aligned`
    draws, from every category the benchmarks draw from."""
    if strategy == "targeted":
        if not weakness:
            raise ValueError("the targeted strategy needs the weakness report (weakness.json): run the eval stage first")
        shares = target_shares(weakness, top_categories, judged=judged)
        cats, p = list(shares), np.array(list(shares.values()))
        weak = {(a["attribute"], a["value"]) for a in weakness["attributes"][:top_attributes]}
    elif strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")

    def draw(found):
        if strategy == "broad":
            return world.sample_example(rng, split="train")
        if strategy == "aligned":
            return world.sample_example(rng, ALIGNED_CATEGORIES[found % len(ALIGNED_CATEGORIES)], split="train")
        if anchor and rng.random() < anchor:
            return world.sample_example(rng, ALIGNED_CATEGORIES[rng.integers(len(ALIGNED_CATEGORIES))], split="train")
        name = cats[rng.choice(len(cats), p=p)]
        for _ in range(50 if rng.random() < focus else 1):  # a few tries for a prompt naming a weak value
            ex = draw_example(rng, name)
            if names(ex) & weak:
                break
        return ex

    out = world.distinct_examples(draw, n, 100 * n)
    if len(out) == n:
        return out
    raise RuntimeError(f"only {len(out)} distinct prompts for strategy {strategy}")


# -----------------------------------------------------------------------------
# self-generated samples


def self_generate(gpt, vq, vocab, tokenizer, examples, k, sample_cfg: SampleConfig, seed, batch):
    """k samples of every example from the current model. Returns a dict of lists, one entry per sample:
    example index, prompt/plan/code ids (codes None when no image was drawn) and the decoded image."""
    jobs = [(i, ex) for i, ex in enumerate(examples) for _ in range(k)]
    ids = [data.encode_text(tokenizer, ex.prompt) for ex in examples]
    out = {"example": [], "prompt": [], "plan": [], "codes": [], "image": []}
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        samples = generate(gpt, vocab, [ids[i] for i, _ in chunk], sample_cfg, seed=seed + start)
        for (i, _), s, img in zip(chunk, samples, decode_images(vq, samples, vocab)):
            out["example"].append(i)
            out["prompt"].append(ids[i])
            out["plan"].append(s["plan"])
            out["codes"].append(s["codes"])
            out["image"].append(img)
    return out


def verifier_scores(images, examples, example_index):
    """The exact verifier on each sample: world.clause_share of the parsed image, 1.0 exactly when it passes;
    graded, so that a round on dense prompts still shows whether its samples got better."""
    scenes = world.parse_batch(np.stack(images))
    return np.array([world.clause_share(s, examples[i].spec) for s, i in zip(scenes, example_index)])


# -----------------------------------------------------------------------------
# weights


def calibrate_thresholds(rewards, passed, names, precision=0.95, prior_failures=2):
    """A reward's threshold per category, from dev samples the verifier has judged: category name -> the
    lowest reward t such that passing / (samples scoring >= t + prior_failures) >= precision; None where
    no t qualifies: the reward cannot pick out that category's passing samples, or the dev set is too
    small to show that it can (the prior failures need >= 38 passing samples at precision 0.95: with 100
    dev samples per category, one passed less than ~38% of the time cannot qualify, even for the verifier).
    The dev samples have the evaluation's plan temperature, the rounds' a higher one: expect somewhat lower
    precision on the rounds (measured: 96% of the kept samples passed in the main job of 2026-12-01).
    Measured, vqa on one base: colour attribution t = 0.175, position 0.094, counting 0.211; knowledge
    kinds (about 25 dev samples each) none, and on that base's round samples vqa read counting words no
    better than chance (AUC 0.45-0.62) and kept comparatives at 81-92% precision."""
    rewards, passed, names = np.asarray(rewards, dtype=np.float64), np.asarray(passed, dtype=np.float64), np.asarray(names)
    out = {}
    for name in sorted(set(names.tolist())):
        order = np.argsort(-rewards[names == name], kind="stable")
        r, p = rewards[names == name][order], passed[names == name][order]
        hits = np.cumsum(p)
        ok = hits >= precision * (np.arange(1, len(p) + 1) + prior_failures)
        ok &= np.r_[r[1:] != r[:-1], True]  # a threshold keeps every sample tied with it
        out[name] = float(r[np.nonzero(ok)[0][-1]]) if ok.any() else None
    return out


def best_of_group(r, g):
    """1 for the highest reward of each group (the first on ties), else 0."""
    w = np.zeros_like(r)
    for k in np.unique(g):
        m = np.nonzero(g == k)[0]
        w[m[np.argmax(r[m])]] = 1.0
    return w


def sample_weights(rewards, group, scheme, beta=0.1, threshold=0.5, graded=None):
    """Rewards (N,) and each sample's prompt index (N,) -> weights (N,) >= 0, mean 1 over the samples
    with weight > 0 (so the learning rate means the same under every scheme).
        rwr        softmax(r / beta) within each prompt's group: prompts count equally, better samples more
        exp        exp(r / beta) over all samples: prompts with high rewards count more
        best       1 for the best sample of each prompt (RAFT / best-of-K), else 0
        threshold  1 where r >= threshold (a number, or one per sample: its category's), else 0; samples
                   marked in `graded` (N,) bool (dense prompts, scored by their share of facts: almost none
                   passes outright, so no threshold exists) are weighted as `best` instead
        uniform    1 for every sample: plain self-training, the control"""
    r = np.asarray(rewards, dtype=np.float64)
    g = np.asarray(group)
    if scheme == "uniform":
        w = np.ones_like(r)
    elif scheme == "threshold":
        w = (r >= threshold).astype(np.float64)
        if graded is not None and np.any(graded):
            m = np.asarray(graded, dtype=bool)
            w[m] = best_of_group(r[m], g[m])
    elif scheme == "exp":
        w = np.exp((r - r.max()) / beta)  # shifted for stability; the normalisation below removes the shift
    elif scheme == "best":
        w = best_of_group(r, g)
    elif scheme == "rwr":
        w = np.zeros_like(r)
        for k in np.unique(g):
            m = np.nonzero(g == k)[0]
            e = np.exp((r[m] - r[m].max()) / beta)
            w[m] = e / e.sum()
    else:
        raise ValueError(f"unknown weighting {scheme!r}; choose one of {', '.join(WEIGHTINGS)}")
    kept = w > 0
    return w / w[kept].mean() if kept.any() else w


# -----------------------------------------------------------------------------
# the weighted loss on both modalities


def sample_batch(samples, rows, vocab: Vocab, device, nulls=None):
    """Samples -> a data.Batch, as the pretraining batches: <bos> prompt <think> plan <boi> codes <eoi> <eos>,
    loss on everything after the prompt; rows where nulls is True get the null condition (image tokens only),
    as in pretraining."""
    nulls = [False] * len(rows) if nulls is None else nulls
    seqs = [build_sequence("plan", vocab, samples["prompt"][i], samples["plan"][i], samples["codes"][i], null=bool(n))
            for i, n in zip(rows, nulls)]
    return data.collate(seqs, vocab, device)


def per_sample_losses(model, batch):
    """Mean cross-entropy of each sample's text targets (<think>, plan, <boi>, <eoi>, <eos>) and of its
    image tokens: two tensors (B,)."""
    ce = token_ce(model(batch.x, patch=batch.patch, tags=batch.tags), batch.y)  # (B, T)
    parts = []
    for m in (data.TEXT, data.IMAGE):
        mask = batch.weight * (batch.modality == m)
        parts.append((ce * mask).sum(1) / mask.sum(1).clamp(min=1))
    return parts


def weighted_loss(model, batch, w, alpha_text, alpha_image):
    """mean_i w_i * (alpha_text * CE_text_i + alpha_image * CE_image_i); also the unweighted parts."""
    text, image = per_sample_losses(model, batch)
    loss = (w * (alpha_text * text + alpha_image * image)).mean()
    return loss, {"text": text.mean().item(), "image": image.mean().item()}


def finetune(model, params, samples, weights, pc: PostConfig, vocab, device, rng, drift_batch=None, drift_loss=None):
    """pc.steps AdamW steps on the LoRA parameters over the samples with weight > 0 (drawn without
    replacement, reshuffled each pass). drift_batch() / drift_loss(model, batch) give the optional
    pretraining term. Returns the mean loss figures."""
    rows = [i for i in np.nonzero(np.asarray(weights) > 0)[0] if samples["codes"][i] is not None]
    if not rows:
        return {"loss": float("nan"), "text": float("nan"), "image": float("nan"), "kept": 0}
    opt = torch.optim.AdamW(params, lr=pc.lr, weight_decay=0.0)
    w_all = torch.tensor(weights, dtype=torch.float32, device=device)
    order, logs = [], []
    model.train()
    for step in range(pc.steps):
        if len(order) < pc.batch:
            order += list(rng.permutation(rows))
        pick, order = order[:pc.batch], order[pc.batch:]
        for group in opt.param_groups:
            group["lr"] = pc.lr * min(1.0, (step + 1) / 10)  # 10 warm-up steps
        nulls = rng.random(len(pick)) < pc.null_prob
        loss, parts = weighted_loss(model, sample_batch(samples, pick, vocab, device, nulls), w_all[pick], pc.alpha_text, pc.alpha_image)
        if pc.pretrain_weight > 0:
            loss = loss + pc.pretrain_weight * drift_loss(model, drift_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        logs.append((loss.item(), parts["text"], parts["image"]))
    model.eval()
    mean = np.mean(logs, axis=0)
    return {"loss": float(mean[0]), "text": float(mean[1]), "image": float(mean[2]), "kept": len(rows)}
