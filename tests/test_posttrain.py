"""Post-training pieces: weighting schemes on hand-made rewards, prompt strategies that never produce a
benchmark or dev prompt, and the weighted two-modality loss."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ablations
import data
import evaluate
import posttrain
import targeting
import train
import world
from conftest import MICRO
from model import GPT, GPTConfig

GROUP = np.array([0, 0, 0, 1, 1, 1])
R = np.array([0.9, 0.1, 0.5, 0.2, 0.2, 0.8])


def test_weighting_schemes_on_hand_made_rewards():
    w = posttrain.sample_weights(R, GROUP, "uniform")
    assert np.allclose(w, 1)
    w = posttrain.sample_weights(R, GROUP, "best")
    assert w.tolist() == [1, 0, 0, 0, 0, 1]
    w = posttrain.sample_weights(R, GROUP, "threshold", threshold=0.5)
    assert w.tolist() == [1, 0, 1, 0, 0, 1]
    # graded samples (dense prompts: no threshold exists) keep their prompt's best instead
    assert posttrain.sample_weights(R, GROUP, "threshold", threshold=0.85).tolist() == [1, 0, 0, 0, 0, 0]
    graded = [False] * 3 + [True] * 3
    assert posttrain.sample_weights(R, GROUP, "threshold", threshold=0.85, graded=graded).tolist() == [1, 0, 0, 0, 0, 1]
    assert posttrain.sample_weights(R, GROUP, "threshold",
                                    threshold=np.inf, graded=graded).tolist() == [0, 0, 0, 0, 0, 1]
    w = posttrain.sample_weights(R, GROUP, "rwr", beta=0.1)
    e = np.exp(R / 0.1)
    soft = np.concatenate([e[:3] / e[:3].sum(), e[3:] / e[3:].sum()])
    assert np.allclose(w, soft / soft.mean())
    assert np.isclose(w[:3].sum(), w[3:].sum()), "rwr: every prompt carries the same total weight"
    w = posttrain.sample_weights(R, GROUP, "exp", beta=0.1)
    assert np.allclose(w, e / e.mean())
    assert w[0] > w[5] > w[2], "exp: ranks by reward across prompts"
    # a large beta flattens rwr towards uniform; a tiny one approaches best-of-K
    assert np.allclose(posttrain.sample_weights(R, GROUP, "rwr", beta=1e6), 1, atol=1e-4)
    sharp = posttrain.sample_weights(R, GROUP, "rwr", beta=1e-3)
    assert np.allclose(sharp / sharp.max(), [1, 0, 0, 0, 0, 1], atol=1e-6)
    with pytest.raises(ValueError, match="unknown weighting"):
        posttrain.sample_weights(R, GROUP, "softmax")


@pytest.mark.parametrize("strategy", targeting.STRATEGIES)
def test_post_training_prompts_never_equal_benchmark_or_dev_prompts(strategy):
    bench = {e.prompt for exs in evaluate.prompt_sets(50).values() for e in exs}
    bench |= {e.prompt for name in ("counting", "knowledge/comparative")
              for e in evaluate.focus_prompts(name, 150)}  # the ablations'
    dev = {e.prompt for e in evaluate.dev_prompts(25)}
    weakness = {"categories": [{"name": "dense", "pass_rate": 0.0}, {"name": "knowledge/comparative", "pass_rate": 0.2},
                               {"name": "position", "pass_rate": 0.5}, {"name": "colors", "pass_rate": 1.0}],
                "attributes": [{"attribute": "relation", "value": "left of", "fail_rate": 0.9}]}
    exs = targeting.draw_prompts(strategy, 400, np.random.default_rng(0), weakness)
    prompts = [e.prompt for e in exs]
    assert len(set(prompts)) == 400
    assert not set(prompts) & (bench | dev)
    assert all(world.prompt_split(p) == "train" for p in prompts)
    cats = [e.category + (f"/{e.kind}" if e.category == "knowledge" else "") for e in exs]
    if strategy == "aligned":
        assert set(cats) >= set(evaluate.GENEVAL_TASKS) | {"dense"}
    if strategy == "targeted":
        # most where the model passes sometimes (the reward then separates its samples), little where it
        # never or always passes
        share = {c: cats.count(c) / len(cats) for c in ("position", "knowledge/comparative", "colors", "dense")}
        assert share["position"] > share["knowledge/comparative"] > 4 * max(share["colors"], share["dense"]), share
        named = np.mean([("relation", "left of") in targeting.names(e) for e in exs if e.category == "position"])
        assert named > 0.5, f"targeted position prompts name the weak relation only {named:.2f} of the time"


def test_targeted_top_keeps_only_the_weakest_categories_the_model_sometimes_passes():
    weakness = {"categories": [{"name": "dense", "pass_rate": 0.0}, {"name": "knowledge/comparative", "pass_rate": 0.2},
                               {"name": "color_attr", "pass_rate": 0.3}, {"name": "position", "pass_rate": 0.5},
                               {"name": "colors", "pass_rate": 1.0}]}
    # dense: never passed
    assert set(targeting.target_shares(weakness, top=2)) == {"knowledge/comparative", "color_attr"}
    assert set(targeting.target_shares(weakness)) == {c["name"] for c in weakness["categories"]}
    exs = targeting.draw_prompts("targeted", 200, np.random.default_rng(0),
                                 {**weakness, "attributes": []}, top_categories=2)
    assert ({e.category for e in exs} == {"knowledge", "color_attr"}
            and {e.kind for e in exs if e.category == "knowledge"} == {"comparative"})
    # a category the reward cannot judge gets no prompts: the next weakest takes its place
    judged = {"color_attr", "position", "colors"}
    assert set(targeting.target_shares(weakness, top=2, judged=judged)) == {"color_attr", "position"}
    with pytest.raises(ValueError, match="cannot judge any"):
        targeting.target_shares(weakness, top=2, judged=set())


def test_an_anchor_share_of_targeted_prompts_comes_from_every_benchmark_category():
    weakness = {"categories": [{"name": "knowledge/comparative", "pass_rate": 0.2},
                               {"name": "colors", "pass_rate": 1.0}],
                "attributes": []}
    draw = lambda **kw: targeting.draw_prompts("targeted", 400, np.random.default_rng(0), weakness,
                                               top_categories=1, **kw)
    assert [e.prompt for e in draw(anchor=0.0)] == [e.prompt for e in draw()], "anchor 0 draws what it drew before"
    exs = draw(anchor=0.25)
    other = [e for e in exs if e.kind != "comparative"]
    assert 0.18 < len(other) / len(exs) < 0.32 and {e.category for e in other} >= set(evaluate.GENEVAL_TASKS)
    bench = ({e.prompt for exs in evaluate.prompt_sets(50).values() for e in exs}
             | {e.prompt for e in evaluate.dev_prompts(25)})
    assert not {e.prompt for e in exs} & bench and all(world.prompt_split(e.prompt) == "train" for e in exs)


def test_thresholds_are_calibrated_per_category_on_dev_samples():
    rng = np.random.default_rng(0)
    # "a": 100 samples, passing ones score 0.5-0.7, failing ones 0-0.2 -> with 51 passing (this seed) and two prior
    # failures, 95% precision is reached only once every passing sample is in: the threshold is the lowest passing score
    pa = rng.random(100) < 0.6
    ra = np.where(pa, rng.uniform(0.5, 0.7, 100), rng.uniform(0.0, 0.2, 100))
    # "b": the same, on a tenfold smaller scale; "c": reward unrelated to passing;
    # "d": never passes; "e": 20 perfect samples
    pb, rb = pa, ra / 10
    pc_, rc = pa, rng.random(100)
    pe, re = np.ones(20, bool), rng.random(20)
    names = ["a"] * 100 + ["b"] * 100 + ["c"] * 100 + ["d"] * 10 + ["e"] * 20
    t = posttrain.calibrate_thresholds(np.r_[ra, rb, rc, rng.random(10), re], np.r_[pa, pb, pc_, np.zeros(10), pe],
                                       names, precision=0.95)
    assert t["a"] == pytest.approx(ra[pa].min()) and t["b"] == pytest.approx(rb[pa].min()), \
        "one threshold per category's scale"
    assert t["c"] is None and t["d"] is None, "no threshold where the reward cannot pick out passing samples"
    assert t["e"] is None, "20 samples are too few to show 95% precision with two prior failures"
    assert posttrain.calibrate_thresholds(re, pe, ["e"] * 20, precision=0.9)["e"] == pytest.approx(re.min())
    # per-sample thresholds in the threshold weighting
    w = posttrain.sample_weights(np.array([0.3, 0.3, 0.05]), np.arange(3), "threshold",
                                 threshold=np.array([0.2, np.inf, 0.04]))
    assert w.tolist() == [1, 0, 1]


def test_min_passing_is_where_calibration_first_finds_a_threshold():
    for precision in (0.8, 0.9, 0.95):
        n = targeting.min_passing(precision)
        assert posttrain.calibrate_thresholds(np.ones(n), np.ones(n), ["a"] * n, precision)["a"] == 1.0
        assert posttrain.calibrate_thresholds(np.ones(n - 1), np.ones(n - 1), ["a"] * (n - 1), precision)["a"] is None
    assert targeting.min_passing(0.95) == 38


def test_targets_are_weak_categories_the_reward_can_judge_else_nothing():
    weakness = {"categories": [{"name": "dense", "pass_rate": 0.0, "n": 100},
                               {"name": "knowledge/comparative", "pass_rate": 0.1, "n": 100},
                               {"name": "color_attr", "pass_rate": 0.3, "n": 100},
                               {"name": "position", "pass_rate": 0.4, "n": 100},
                               {"name": "counting", "pass_rate": 0.76, "n": 400},
                               {"name": "colors", "pass_rate": 1.0, "n": 100}]}
    calls = []

    def measure(found, rate=0.5):
        return lambda name: calls.append(name) or (rate, 400, found.get(name))

    # the eval's dev samples judge only strong categories: comparative (too rare to reach min_rate) is not sampled
    # again, color_attr gets a threshold from fresh samples, position none; counting (0.76) is never aimed at
    t = {"counting": 0.2, "colors": 0.1, "color_attr": None, "position": None}
    out, again = targeting.choose_targets(weakness, t, 2, 0.7, measure({"color_attr": 0.3}), min_rate=0.2)
    assert (out == ["color_attr"] and calls == ["color_attr", "position"]
            and t["color_attr"] == 0.3 and t["position"] is None)
    assert again["color_attr"] == (pytest.approx((0.3 * 100 + 0.5 * 400) / 500), 500), "dev and fresh samples pooled"
    # nothing weak can be judged: no targets (the post stage then skips); a higher bar lets counting in
    calls.clear()
    assert targeting.choose_targets(weakness, {"counting": 0.2}, 2, 0.7, measure({}))[0] == []
    assert calls == ["knowledge/comparative", "color_attr", "position"], "dense (never passed) is not a candidate"
    assert targeting.choose_targets(weakness, {"counting": 0.2}, 2, 0.8, measure({}))[0] == ["counting"]
    # judged categories need no fresh samples; the walk stops at `top`
    calls.clear()
    t = {"knowledge/comparative": 0.1, "color_attr": 0.2, "position": None}
    assert (targeting.choose_targets(weakness, t, 2, 0.7, measure({})) == (["knowledge/comparative", "color_attr"], {})
            and calls == [])
    assert targeting.choose_targets(weakness, {"color_attr": 0.2, "position": 0.1},
                                    0, 1.0, measure({}))[0] == ["color_attr", "position"]


def test_the_verifier_scores_the_share_of_clauses_and_the_oracle_threshold_is_its_verdict():
    rng = np.random.default_rng(3)
    exs = [world.sample_example(rng, "dense") for _ in range(6)]
    wrong = [world.Scene(ex.scene.objects[1:]) for ex in exs]  # the first object left out
    images = [world.render(s) for s in [ex.scene for ex in exs] + wrong]
    v = posttrain.verifier_scores(images, exs, list(range(6)) * 2)
    assert v[:6].tolist() == [1.0] * 6
    assert v[6:] == pytest.approx([np.mean(list(world.check(s, ex.spec).values())) for s, ex in zip(wrong, exs)])
    assert all(0 < x < 1 for x in v[6:])
    # calibrated on graded verifier scores, a strong category's threshold would let near misses in; the oracle's
    # threshold is calibrated on its verdict instead, so it keeps exactly the passing samples
    r, passed = np.r_[np.ones(100), [0.9] * 3, np.zeros(10)], np.r_[np.ones(100), np.zeros(13)]
    pc = posttrain.PostConfig(reward="verifier")
    assert posttrain.calibrate_thresholds(r, passed, ["x"] * len(r))["x"] == 0.9
    assert posttrain.calibrate_thresholds(posttrain.oracle_verdict(pc, r, passed), passed, ["x"] * len(r))["x"] == 1.0
    assert posttrain.oracle_verdict(posttrain.PostConfig(reward="structured"), r, passed) is r


def test_dense_prompts_are_aimed_at_by_their_share_of_facts_without_a_threshold():
    """A strong base whose only weakness is dense layouts (almost none right outright, half their facts
    right): dense is a target, ranked by its facts, with no threshold and no fresh samples. It stays one
    while fewer than `below` of its layouts have every fact right, however many of their facts hold."""
    cats = [{"name": "dense", "pass_rate": 0.03, "n": 100, "facts": 0.55},
            {"name": "counting", "pass_rate": 0.97, "n": 100},
            {"name": "knowledge/comparative", "pass_rate": 0.6, "n": 400}]
    calls = []
    measure = lambda name: calls.append(name) or (0.5, 400, None)
    assert (targeting.choose_targets({"categories": cats}, {"counting": 0.2}, 1, 0.8, measure) == (["dense"], {})
            and calls == [])
    judged = {"counting": 0.2, "knowledge/comparative": 0.3}
    assert (targeting.choose_targets({"categories": cats}, judged, 2, 0.8, measure)[0]
            == ["dense", "knowledge/comparative"])
    assert targeting.target_shares({"categories": cats}, top=1) == {"dense": 1.0}
    strong = [{**cats[0], "pass_rate": 0.5, "facts": 0.92}, cats[1]]  # most facts right, half the layouts not all right
    assert (targeting.choose_targets({"categories": strong}, {"counting": 0.2}, 2, 0.8, measure) == (["dense"], {})
            and calls == [])
    strong[0].update(pass_rate=0.85, facts=0.97)  # all facts right in most layouts: nothing weak
    assert targeting.choose_targets({"categories": strong}, {"counting": 0.2}, 2, 0.8, measure)[0] == []
    cats[0]["facts"] = 0.02  # below the floor: nothing right to imitate
    assert targeting.choose_targets({"categories": cats}, {"counting": 0.2}, 2, 0.8, measure)[0] == []
    del cats[0]["facts"]  # a report without facts: dense by its pass rate, below the floor, and no threshold
    assert targeting.choose_targets({"categories": cats}, {"counting": 0.2}, 2, 0.8, measure)[0] == []


def test_a_category_seen_on_too_few_dev_samples_is_measured_again_before_it_is_called_strong():
    # a knowledge kind the eval stage saw pass 22 of 24 times may well pass less than 0.8: measured again, it
    # passes 0.70 of 400 fresh samples, is aimed at, with the fresh samples' threshold; 24 of 24 is strong enough
    weakness = {"categories": [{"name": "counting", "pass_rate": 0.5, "n": 100},
                               {"name": "knowledge/comparative", "pass_rate": 22 / 24, "n": 24},
                               {"name": "knowledge/colour", "pass_rate": 1.0, "n": 24}]}
    calls = []
    fresh = {"knowledge/comparative": (0.70, 400, 0.4), "counting": (0.5, 400, 0.3)}
    measure = lambda name: calls.append(name) or fresh[name]
    t = {"counting": 0.2, "knowledge/comparative": None, "knowledge/colour": None}
    out, again = targeting.choose_targets(weakness, t, 2, 0.8, measure)
    assert calls == ["knowledge/comparative"] and out == ["counting", "knowledge/comparative"]
    assert t["knowledge/comparative"] == 0.4 and again["knowledge/comparative"][1] == 424
    assert again["knowledge/comparative"][0] == pytest.approx((22 + 280) / 424)
    # measured again and found strong: not a target
    fresh["knowledge/comparative"] = (0.95, 400, 0.4)
    calls.clear()
    assert (targeting.choose_targets(weakness, {"counting": 0.2}, 2, 0.8, measure)[0] == ["counting"]
            and calls == ["knowledge/comparative"])
    # the interval: 22 of 24 reaches below 0.8, 24 of 24 does not; 0.85 of 100 does, 0.9 of 100 does not
    assert targeting.wilson_low(22 / 24, 24) < 0.8 < targeting.wilson_low(1.0, 24)
    assert targeting.wilson_low(0.85, 100) < 0.8 < targeting.wilson_low(0.9, 100)
    assert targeting.wilson_low(0.5, 0) == 0.0


def test_targets_follow_the_rates_measured_again():
    weakness = {"categories": [{"name": "a", "pass_rate": 0.3, "n": 100}, {"name": "b", "pass_rate": 0.4, "n": 100},
                               {"name": "c", "pass_rate": 0.5, "n": 100}]}
    fresh, calls = {"b": (0.1, 400, 0.2), "a": (0.7, 400, 0.3)}, []
    measure = lambda name: calls.append(name) or fresh[name]
    # b looked weaker than c and stronger than a; measured again it is the weakest of all: first
    out, again = targeting.choose_targets(weakness, {"a": 0.1, "b": None, "c": 0.1}, 2, 0.8, measure)
    assert out == ["b", "a"] and again["b"] == (pytest.approx(0.16), 500) and calls == ["b"]
    # a, measured again, passes 0.62: c (0.5) is weaker and takes the second place
    calls.clear()
    out, again = targeting.choose_targets(weakness, {"a": None, "b": 0.1, "c": 0.1}, 2, 0.8, measure)
    assert out == ["b", "c"] and again["a"] == (pytest.approx(0.62), 500) and calls == ["a"]
    # a passed 22 of 24 on dev: measured again. Fresh samples too rarely passing to set a threshold (20 of
    # 400, fewer than min_hits) leave the dev one standing; 200 passing and still none: the reward cannot judge a
    weakness["categories"][0].update(pass_rate=22 / 24, n=24)
    t = {"a": 0.1, "b": 0.1, "c": 0.1}
    out, _ = targeting.choose_targets(weakness, t, 0, 0.8, lambda name: (0.05, 400, None), min_hits=38)
    assert t["a"] == 0.1 and out == ["a", "b", "c"]
    t = {"a": 0.1, "b": 0.1, "c": 0.1}
    out, _ = targeting.choose_targets(weakness, t, 0, 0.8, lambda name: (0.5, 400, None), min_hits=38)
    assert t["a"] is None and out == ["b", "c"]
    # prompt shares follow the pooled rate: a passed 22 of 24 on dev, 0.5 measured again, so it gets more
    # prompts than b (0.4), not fewer (pass * (1 - pass) is largest at 0.5)
    pooled = targeting.with_rates(weakness, {"a": (0.5, 424)})
    assert pooled["categories"][0] == {"name": "a", "pass_rate": 0.5, "n": 424} and weakness["categories"][0]["n"] == 24
    before, after = (targeting.target_shares(weakness, judged={"a", "b"}),
                     targeting.target_shares(pooled, judged={"a", "b"}))
    assert before["a"] < before["b"] and after["a"] > after["b"]


def test_calibration_prompts_are_dev_prompts_of_the_category():
    bench = {e.prompt for exs in evaluate.prompt_sets(50).values() for e in exs}
    for name in ("position", "knowledge/comparative"):
        exs = targeting.dev_examples(name, 100)
        assert len(exs) == 100 and len({e.prompt for e in exs}) == 100
        assert all(world.prompt_split(e.prompt) == "dev" for e in exs) and not {e.prompt for e in exs} & bench
        assert {evaluate.category_name(e.category, e.kind) for e in exs} == {name}


def test_focus_prompts_are_fixed_bench_prompts_of_one_category_or_knowledge_kind():
    for name in ("counting", "knowledge/comparative", "knowledge/number"):
        exs = evaluate.focus_prompts(name, 150)
        assert len({e.prompt for e in exs}) == 150 and all(world.prompt_split(e.prompt) == "bench" for e in exs)
        assert {evaluate.category_name(e.category, e.kind) for e in exs} == {name}
        assert [e.prompt for e in exs] == [e.prompt for e in evaluate.focus_prompts(name, 150)], "the same on every run"
    assert evaluate.focus_prompts("counting", 50) == evaluate.benchmark_prompts("counting", 50)


def test_targeted_needs_a_weakness_report():
    with pytest.raises(ValueError, match="weakness"):
        targeting.draw_prompts("targeted", 10, np.random.default_rng(0), None)


def test_weighted_loss_is_the_weighted_sum_of_both_modalities():
    vocab = data.Vocab(text_size=20, codebook_size=8,
                       tagger=data.Tagger(20, cell_ids=(12,), keep_ids=(13,), patch_tags=(1, 1, 0, 0)))
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=vocab.size, image_offset=vocab.image_offset, n_image_tokens=4, block_size=32,
                        n_layer=1, n_head=2, n_kv_head=2, n_embd=16, mlp_hidden=32, n_tags=2))
    samples = {"prompt": [[9, 10], [11]], "plan": [[12, 13, 14], [15]], "codes": [[1, 2, 3, 4], [5, 6, 7, 0]]}
    batch = posttrain.sample_batch(samples, [0, 1], vocab, "cpu")
    text, image = posttrain.per_sample_losses(gpt, batch)
    # reference: each sample alone, cross-entropy over its own targets of each modality
    for i in range(2):
        b = posttrain.sample_batch(samples, [i], vocab, "cpu")
        ce = torch.nn.functional.cross_entropy(gpt(b.x, patch=b.patch, tags=b.tags)[0], b.y[0], reduction="none")
        for part, m in ((text, data.TEXT), (image, data.IMAGE)):
            sel = (b.weight[0] > 0) & (b.modality[0] == m)
            torch.testing.assert_close(part[i], ce[sel].mean(), rtol=1e-5, atol=1e-5)
    w = torch.tensor([2.0, 0.5])
    loss, _ = posttrain.weighted_loss(gpt, batch, w, alpha_text=0.3, alpha_image=1.5)
    torch.testing.assert_close(loss, (w * (0.3 * text + 1.5 * image)).mean())
    only_text, _ = posttrain.weighted_loss(gpt, batch, w, alpha_text=1.0, alpha_image=0.0)
    torch.testing.assert_close(only_text, (w * text).mean())


def test_micro_post_training_round_changes_only_the_adapter(micro_run, tmp_path):

    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    report = json.load(open(os.path.join(run, "report.json")))
    assert {"before", "after", "rounds", "reward_hacking"} <= set(report["post"])
    assert {"reward_after", "verifier_after"} <= set(report["post"]["rounds"][-1]), \
        "the main job re-samples the last round's prompts"
    saved = load_file(os.path.join(run, "lora_post.safetensors"))
    assert saved and all(".lora_" in k for k in saved), "the adapter file holds adapter tensors only"
    # one more round by hand: every base weight stays as it was, the adapter moves
    cfgs = train.load_config(MICRO, [f"--train.out_dir={run}", "--post.steps=3", "--post.weighting=uniform"])
    train.derive_sizes(cfgs, run)
    base = load_file(os.path.join(run, "gpt.safetensors"))
    gpt, *_, rounds = posttrain.post_train(cfgs, run, "cpu", train.Metrics(os.path.join(run, "m.jsonl")).log,
                                           cfgs["post"], seed=5, adapter="t")
    state = gpt.state_dict()
    for k, v in base.items():
        key = (k.replace("_proj.weight", "_proj.base.weight")
               if k.replace("_proj.weight", "_proj.base.weight") in state else k)
        assert torch.equal(state[key], v), k
    assert any(state[k].abs().sum() > 0 for k in state if ".lora_B." in k), "the adapter did not train"
    assert rounds and 0 <= rounds[0]["verifier"] <= 1


def test_ablations_stage_writes_tables_and_claims(micro_run, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    train.main([MICRO, f"--train.out_dir={run}", "--stages=ablations", "--ablations.variants=both,uniform"])
    res = json.load(open(os.path.join(run, "ablations", "ablations.json")))
    assert set(res["runs"]) == {"both", "uniform"} and res["base"]["focus"]["samples"] == 2 * 4 * 2
    md = open(os.path.join(run, "ablations", "ablations.md")).read()
    assert "standard error" in md and "| uniform (n=1)" in md
    assert json.load(open(os.path.join(run, "report.json")))["stages"]["ablations"]["variants"] == 2


def passes_nothing(run):
    """Make a copy of the micro run's weakness report say it passes nothing on dev (the micro model gets
    about a tenth of a dense layout's facts right by chance, which could count as "sometimes")."""
    for name in ("report.json", "weakness.json"):
        with open(os.path.join(run, name)) as f:
            doc = json.load(f)
        for c in (doc["weakness"] if name == "report.json" else doc)["categories"]:
            c["pass_rate"] = 0.0
            c.pop("facts", None)
        with open(os.path.join(run, name), "w") as f:
            json.dump(doc, f)


def test_ablations_refuse_a_base_with_nothing_weak_to_aim_at(micro_run, tmp_path):
    # with the targeted strategy the ablations focus on what post-training aims at; a base that passes
    # nothing has no such category: a clear error before any variant runs, nothing written
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    passes_nothing(run)
    with pytest.raises(SystemExit, match="no weakness to post-train on, so nothing for the ablations to compare"):
        train.main([MICRO, f"--train.out_dir={run}", "--stages=ablations", "--post.strategy=targeted",
                    "--ablations.variants=both"])
    assert not os.path.exists(os.path.join(run, "ablations"))


def test_focus_category_is_the_weakest_the_model_sometimes_passes():
    weakness = {"categories": [{"name": "dense", "pass_rate": 0.0, "n": 20},
                               {"name": "knowledge/comparative", "pass_rate": 0.1, "n": 10},
                               {"name": "position", "pass_rate": 0.3, "n": 20},
                               {"name": "knowledge/number", "pass_rate": 0.9, "n": 30}]}
    assert ablations.focus_category(weakness) == "knowledge/comparative"  # a kind on its own; dense never passes
    weakness["categories"][1]["pass_rate"] = 0.01
    assert ablations.focus_category(weakness) == "position"
    assert ablations.focus_category({"categories": [{"name": "dense", "pass_rate": 0.0, "n": 5}]}) == "dense"
    weakness["categories"][0]["facts"] = 0.2  # dense by its share of facts: now the weakest it sometimes gets right
    assert ablations.focus_category(weakness) == "dense"


def test_another_post_config_is_refused_by_the_post_stage_only(micro_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    with pytest.raises(SystemExit, match=r"another \[post\] config \(post.prompts: 4 -> 5\)"):
        train.main([MICRO, f"--train.out_dir={run}", "--stages=post", "--post.prompts=5"])
    cfgs = train.load_config(MICRO, [f"--train.out_dir={run}", "--post.prompts=5"])
    train.derive_sizes(cfgs, run)
    train.check_run_dir(run, train.resolved_config(cfgs), ("ablations",))  # ablations vary [post] on purpose


def test_split_ablation_sweeps_merge(capsys, tmp_path):
    base = {"focus": {"pass_rate": 0.3, "samples": 16},
            "benchmarks": {b: {"overall": 0.5} for b in ("geneval", "dpg", "wise", "oneig")}}
    run = lambda x: {"focus": {"pass_rate": x}, "benchmarks": base["benchmarks"]}
    parts = [{"focus_category": "position", "base": base, "runs": {"both": [run(0.4)], "uniform": [run(0.3)]}},
             {"focus_category": "position", "base": base, "runs": {"both": [run(0.5)], "uniform": [run(0.3)]}}]
    paths = []
    for i, p in enumerate(parts):
        paths.append(str(tmp_path / f"a{i}.json"))
        json.dump(p, open(paths[-1], "w"))
    ablations.main(paths)
    out = capsys.readouterr().out
    assert "| both = targeted, the default (n=2) | 0.450 +- 0.071 | +0.150" in out  # the sample std (ddof 1)
    assert "beats plain self-training (uniform) by +0.150" in out and "beyond its standard error" in out
    other = dict(parts[1], base={**base, "focus": {"pass_rate": 0.1, "samples": 16}})
    with pytest.raises(SystemExit, match="different base"):
        ablations.merge([parts[0], other])


def test_ablation_claims_need_a_lead_beyond_the_standard_error():
    base = {"focus": {"pass_rate": 0.3, "samples": 16},
            "benchmarks": {b: {"overall": 0.5} for b in ("geneval", "dpg", "wise", "oneig")}}
    runs = lambda *xs: [{"focus": {"pass_rate": x}, "benchmarks": base["benchmarks"]} for x in xs]
    res = lambda **v: {"focus_category": "position", "base": base, "runs": {k: runs(*x) for k, x in v.items()}}
    # image only ahead by 0.001 with seeds spread by 0.01: no verdict either way
    md = ablations.summary_table(res(both=(0.40, 0.41, 0.42), text_only=(0.30, 0.31, 0.32),
                                     image_only=(0.401, 0.411, 0.421)))
    assert ("both modalities beats text only and image only on position: **not settled**: "
            "image_only leads both by +0.001" in md)
    # a rival clearly ahead of the claimed variant: the claim does not reproduce, however close the rest
    md = ablations.summary_table(res(both=(0.40, 0.41, 0.42), broad=(0.50, 0.51, 0.52), aligned=(0.495, 0.505, 0.515)))
    assert "**does not reproduce** (best: broad, +0.100 over targeted" in md
    md = ablations.summary_table(res(both=(0.50, 0.51, 0.52), text_only=(0.40, 0.41, 0.42),
                                     image_only=(0.30, 0.31, 0.32)))
    assert "**reproduces** (best: both, +0.100 over text_only" in md


def test_self_generated_plans_use_the_post_plan_temperature(micro_run, tmp_path):
    """post.plan_temperature, not sample.text_temperature, draws the round's plans: at 0 every sample of a
    prompt has the same (greedy) plan; at 1 they differ."""
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    distinct = {}
    for temp in (0.0, 1.0):
        cfgs = train.load_config(MICRO, [f"--train.out_dir={run}", "--post.steps=1", "--post.rounds=1",
                                         "--post.samples=4", f"--post.plan_temperature={temp}",
                                         "--sample.text_temperature=0.5"])
        train.derive_sizes(cfgs, run)
        posttrain.post_train(cfgs, run, "cpu", train.Metrics(os.path.join(run, "m.jsonl")).log,
                             cfgs["post"], seed=3, log_prefix=f"t{temp}")
        t = load_file(os.path.join(run, f"t{temp}_round0.safetensors"))
        plans = {}
        for i, plan in zip(t["example"].tolist(), t["plan"].tolist()):
            plans.setdefault(i, set()).add(tuple(plan))
        distinct[temp] = sum(len(p) for p in plans.values()) / len(plans)
    assert distinct[0.0] == 1, "greedy plans must not vary within a prompt"
    assert distinct[1.0] > 1, "plans at temperature 1 should vary"


def test_post_stage_without_dev_samples_says_what_to_run(micro_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    os.remove(os.path.join(run, "lora_post.safetensors"))
    os.remove(os.path.join(run, "lora_post.json"))
    os.remove(os.path.join(run, posttrain.DEV_FILE))
    with pytest.raises(SystemExit, match="dev_samples.safetensors is missing.*--stages=eval"):
        train.main([MICRO, f"--train.out_dir={run}", "--stages=post"])
    assert not os.path.exists(os.path.join(run, "lora_post.safetensors")), "nothing written"


def test_reward_hacking_is_flagged_when_the_verifier_does_not_follow_the_reward():
    rnd = lambda **kw: {"reward": 0.3, "verifier": 0.5, "reward_after_se": 0.01, **kw}
    assert posttrain.hacking([rnd(reward_after=0.4, verifier_after=0.5)]) is True
    assert posttrain.hacking([rnd(reward_after=0.4, verifier_after=0.6)]) is False
    assert posttrain.hacking([rnd(reward_after=0.31, verifier_after=0.45)]) is False, \
        "a rise within 2 standard errors is noise"
    assert posttrain.hacking([rnd(reward_after=0.4, verifier_after=0.51, verifier_after_se=0.01)]) is True, \
        "a flat verifier"
    assert posttrain.hacking([rnd(reward_after=0.4, verifier_after=0.53, verifier_after_se=0.01)]) is False, \
        "beyond 2 SE: it rose"
    assert posttrain.hacking([rnd()]) is None, "one round and no check: nothing to compare"
    assert posttrain.hacking([rnd(), rnd(reward=0.4, verifier=0.45)]) is True


def test_each_sample_is_weighted_by_its_own_category_threshold(micro_run, tmp_path, monkeypatch):
    """The calibrated thresholds reach the weights: a category at threshold 0 keeps every sample it drew,
    one the reward cannot judge (None) keeps none and gets no targeted prompts; dense prompts, graded by
    their share of facts, keep one sample each (their best)."""
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    cfgs = train.load_config(MICRO, [f"--train.out_dir={run}", "--post.steps=1", "--post.prompts=12",
                                     "--post.strategy=broad"])
    train.derive_sizes(cfgs, run)
    judged = set(world.CATEGORIES) - {"position", "dense", "knowledge"}
    monkeypatch.setattr(posttrain, "reward_thresholds", lambda *a: {c: (0.0 if c in judged else None)
                                                                    for c in world.CATEGORIES})
    _, *_, rounds = posttrain.post_train(cfgs, run, "cpu", train.Metrics(os.path.join(run, "m.jsonl")).log,
                                         cfgs["post"], seed=2, log_prefix="thr")
    t = load_file(os.path.join(run, "thr_round0.safetensors"))
    exs = json.load(open(os.path.join(run, "thr_round0.json")))
    cats = [exs[i]["category"] for i in t["example"].tolist()]
    kept = (t["weight"] > 0).tolist()
    others = [(k, c) for k, c in zip(kept, cats) if c != "dense"]
    assert [k for k, _ in others] == [c in judged for _, c in others], "judged categories kept, the rest not"
    assert any(kept) and not all(kept) and "dense" in cats
    dense = [i for i, c in zip(t["example"].tolist(), cats) if c == "dense"]
    assert sum(k for k, c in zip(kept, cats) if c == "dense") == len(set(dense)), "one dense sample per prompt"
    assert rounds[0]["thresholds"]["colors"] == 0.0 and rounds[0]["thresholds"]["position"] is None


def test_post_stage_is_skipped_when_no_weak_category_is_passed_sometimes(micro_run, tmp_path):
    """A base that passes nothing on dev: targeted post-training has nothing to aim at. The stage says so in
    the report, writes no adapter, and the other stages' results stay as they were."""
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    passes_nothing(run)
    for f in ("lora_post.safetensors", "lora_post.json"):
        os.remove(os.path.join(run, f))
    before = json.load(open(os.path.join(run, "report.json")))
    train.main([MICRO, f"--train.out_dir={run}", "--stages=post", "--post.strategy=targeted"])
    report = json.load(open(os.path.join(run, "report.json")))
    assert "no dev category is passed between 5% and" in report["post"]["skipped"] and "after" not in report["post"]
    assert report["post"]["before"] == before["benchmarks"] == report["benchmarks"]
    assert report["stages"]["post"]["skipped"] and not os.path.exists(os.path.join(run, "lora_post.safetensors"))
    assert "Skipped" in open(os.path.join(run, "report.md")).read()


def test_a_weak_category_without_threshold_is_calibrated_on_fresh_dev_samples(micro_run, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    weakness = {"categories": [{"name": "position", "pass_rate": 0.5, "n": 1},
                               {"name": "colors", "pass_rate": 0.9, "n": 1000},
                               {"name": "single_object", "pass_rate": 0.9, "n": 1}], "attributes": []}
    json.dump(weakness, open(os.path.join(run, "weakness.json"), "w"))
    cfgs = train.load_config(MICRO, [f"--train.out_dir={run}", "--post.strategy=targeted", "--post.calib_samples=6",
                                     "--post.precision=0.5"])  # needs 2 passing samples:
    #                                                            position (0.5) is worth sampling
    train.derive_sizes(cfgs, run)
    calibrated = {}
    for _ in range(2):  # the second call (as the ablations' next variant) reuses the first one's calibration
        with pytest.raises(targeting.NothingToTarget, match="cannot judge") as e:  # the micro model draws noise:
            #                                                                        none pass
            posttrain.post_train(cfgs, run, "cpu", train.Metrics(None).log, cfgs["post"], seed=0,
                                 log_prefix="aim", calibrated=calibrated)
        assert "single_object 0.13 on 7 samples" in str(e.value)  # 0.9 on one dev sample proved nothing
    out = capsys.readouterr()
    assert "position: 6 more dev samples, 0.00 pass, threshold on them none" in out.out + out.err
    assert (out.out + out.err).count("more dev samples") == 2, \
        "colors (surely above weak_below) is not sampled, the others once"
    assert calibrated == {("vqascore", 0.5, 6, name): (0.0, 6, None) for name in ("position", "single_object")}
