"""
What post-training aims at: prompts drawn by a strategy, `broad` (the pretraining mix), `aligned` (the
benchmarks' categories) or `targeted` (the weakness report's categories the model passes sometimes but not
reliably, and its most-failed attribute values), always from the "train" split. posttrain.py draws its
rounds' prompts here.
"""

import math

import numpy as np

import evaluate
import world

STRATEGIES = ("broad", "aligned", "targeted")
ALIGNED_CATEGORIES = evaluate.GENEVAL_TASKS + ("dense", "knowledge")  # what the four benchmarks draw from


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
    passes teaches nothing, and so does one it never passes. pass * (1 - pass) is the variance of a
    pass/fail reward (for dense's share of facts, an upper bound of its variance).
    top > 0 keeps only the `top` weakest categories passed at least `floor` of the time: the budget then
    buys enough good samples of each to move it. judged: the category names the reward can judge
    (calibrate_thresholds); the others get no prompts."""
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
    often all its facts hold: most of a layout's facts can be right while half its layouts have a mistake.
    measure(name) -> (pass rate, samples, threshold or None) on fresh dev samples (aim draws
    post.calib_samples) is called for a category
    - whose dev samples are too few to tell that it passes at least `below` of the time (the lower end of
      its 95% interval lies below `below`): the eval stage draws only ~24 of each knowledge kind;
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


def draw_prompts(strategy, n, rng, weakness=None, focus=0.5, top_attributes=5,
                 top_categories=0, judged=None, anchor=0.0):
    """n distinct train-split Examples for a strategy. `targeted` needs the weakness report: categories
    are drawn with target_shares (among the `judged` ones), and a `focus` share of the prompts must also
    name one of the `top_attributes` most-failed attribute values; an `anchor` share is drawn as `aligned`
    draws, from every category the benchmarks draw from."""
    if strategy == "targeted":
        if not weakness:
            raise ValueError("the targeted strategy needs the weakness report (weakness.json): "
                             "run the eval stage first")
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
