"""
What post-training aims at: prompts drawn by a strategy, `broad` (the pretraining mix), `aligned` (the
benchmarks' categories) or `targeted` (what the weakness report on dev prompts shows the model passes
sometimes but not reliably: its weakest colour-shape compositions and categories, and its most-failed
attribute values), always from the "train" split. posttrain.py draws its rounds' prompts here.
"""

import numpy as np

import evaluate
import world

STRATEGIES = ("broad", "aligned", "targeted")
ALIGNED_CATEGORIES = evaluate.GENEVAL_TASKS + ("dense", "knowledge")  # what the four benchmarks draw from


class NothingToTarget(Exception):
    """The targeted strategy found nothing weak to aim at: it would aim at what the model draws well."""


def draw_example(rng, name, split="train"):
    """An Example of a category name as the weakness report writes it ("position",
    "knowledge/comparative"), its prompt from `split`."""
    category, _, kind = name.partition("/")
    return world.sample_example(rng, category, split, kind or None)


def names(ex):
    """The (attribute, value) pairs an example's clauses name, as in evaluate.weakness."""
    out = set()
    for r in ex.spec.reqs:
        out |= {("shape", r.shape), ("colour", r.colour), ("size", r.size), ("count", str(r.count))}
        if r.row is not None:
            out.add(("region", f"{world.ROWS[r.row]} {world.COLS[r.col]}"))
    out |= {("relation", rel) for _, rel, _ in ex.spec.relations}
    return {(a, str(v)) for a, v in out if v is not None} | {("total", str(ex.spec.total))}


def is_weak(entry, below, floor=0.05):
    """A weakness report entry (category or composition) worth aiming at: its score
    (evaluate.category_score: dense by its share of facts) at least `floor`, so there are good samples to
    imitate, and passed outright less often than `below`, so there is something to gain."""
    return floor <= evaluate.category_score(entry) and entry["pass_rate"] < below


def choose_targets(weakness, top=0, below=1.0, floor=0.05):
    """(categories, compositions) to aim at, weakest first: the weakness report's entries that are weak
    (is_weak), up to `top` of each (0 = all). A report without "compositions" aims at categories only."""
    pick = lambda entries: [c["name"] for c in sorted(entries, key=evaluate.category_score)
                            if is_weak(c, below, floor)][:top or None]
    return pick(weakness["categories"]), pick(weakness.get("compositions", []))


def shares(entries):
    """Name -> share of prompts, in proportion to pass * (1 - pass) + 0.01 (pass: evaluate.category_score).
    Reward-weighted self-training learns only from prompts whose K samples differ in reward: one always
    passed teaches nothing, and so does one never passed; pass * (1 - pass) is a pass/fail reward's variance."""
    rate = np.array([evaluate.category_score(c) for c in entries])
    w = rate * (1 - rate) + 0.01
    return {c["name"]: float(x) for c, x in zip(entries, w / w.sum())}


def draw_prompts(strategy, n, rng, weakness=None, targets=None, focus=0.5, anchor=0.0, composition_share=0.5,
                 top_attributes=5):
    """n distinct train-split Examples for a strategy. `targeted` needs the weakness report and aims at
    `targets` = (categories, compositions) (default: choose_targets(weakness)): an `anchor` share is drawn
    as `aligned` draws, from every category the benchmarks draw from; of the rest, a `composition_share`
    names one of the target compositions (all of them when no category is targeted), the others come
    from the target categories, a `focus` share of them naming one of the `top_attributes` most-failed
    attribute values. Compositions and categories are drawn by `shares`."""
    if strategy == "targeted":
        if not weakness:
            raise ValueError("the targeted strategy needs the weakness report (weakness.json): "
                             "run the eval stage first")
        cats, comps = choose_targets(weakness) if targets is None else targets
        if not cats and not comps:
            raise NothingToTarget("no weak category or composition to aim at")
        cat_p = shares([c for c in weakness["categories"] if c["name"] in cats]) if cats else {}
        comp_p = shares([c for c in weakness.get("compositions", []) if c["name"] in comps]) if comps else {}
        weak = {(a["attribute"], a["value"]) for a in weakness["attributes"][:top_attributes]}
    elif strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    pick = lambda p: list(p)[rng.choice(len(p), p=np.array(list(p.values())))]

    def draw(found):
        if strategy == "broad":
            return world.sample_example(rng, split="train")
        if strategy == "aligned":
            return world.sample_example(rng, ALIGNED_CATEGORIES[found % len(ALIGNED_CATEGORIES)], split="train")
        if anchor and rng.random() < anchor:
            return world.sample_example(rng, ALIGNED_CATEGORIES[rng.integers(len(ALIGNED_CATEGORIES))], split="train")
        if comp_p and (not cat_p or rng.random() < composition_share):
            return world.sample_example(rng, split="train", composition=pick(comp_p))
        name = pick(cat_p)
        for _ in range(50 if rng.random() < focus else 1):  # a few tries for a prompt naming a weak value
            ex = draw_example(rng, name)
            if names(ex) & weak:
                break
        return ex

    out = world.distinct_examples(draw, n, 100 * n)
    if len(out) == n:
        return out
    raise RuntimeError(f"only {len(out)} distinct prompts for strategy {strategy}")
