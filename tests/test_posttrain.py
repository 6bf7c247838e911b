"""Post-training pieces: weighting schemes on hand-made rewards, prompt strategies that never produce a
benchmark or dev prompt, targets from the weakness report, the weighted two-modality loss, a training path
without the verifier, and the ablations' tables."""
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
import parser
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
    # the default: each prompt's best sample, where the reward reaches the threshold
    assert posttrain.PostConfig().weighting == "best_above" and posttrain.PostConfig().threshold == 0.5
    assert posttrain.sample_weights(R, GROUP, "best_above", threshold=0.5).tolist() == [1, 0, 0, 0, 0, 1]
    assert posttrain.sample_weights(R, GROUP, "best_above", threshold=0.85).tolist() == [1, 0, 0, 0, 0, 0]
    assert posttrain.sample_weights(R, GROUP, "best_above", threshold=0.95).tolist() == [0] * 6
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
def test_post_training_prompts_never_ask_what_benchmark_or_dev_prompts_ask(strategy):
    key = world.spec_key  # by content: the same request in other words counts
    bench = {key(e.spec) for exs in evaluate.prompt_sets(50).values() for e in exs}
    bench |= {key(e.spec) for name in ("counting", "knowledge/comparative")
              for e in evaluate.focus_prompts(name, 150)}  # the ablations'
    dev = {key(e.spec) for e in evaluate.dev_prompts(25)}
    weakness = {"categories": [{"name": "dense", "pass_rate": 0.0}, {"name": "knowledge/comparative", "pass_rate": 0.2},
                               {"name": "position", "pass_rate": 0.5}, {"name": "colors", "pass_rate": 1.0}],
                "attributes": [{"attribute": "relation", "value": "left of", "fail_rate": 0.9}]}
    exs = targeting.draw_prompts(strategy, 400, np.random.default_rng(0), weakness)
    assert len({e.prompt for e in exs}) == 400
    assert not {key(e.spec) for e in exs} & (bench | dev)
    assert all(world.split_of(e.spec) == "train" for e in exs)
    cats = [e.category + (f"/{e.kind}" if e.category == "knowledge" else "") for e in exs]
    if strategy == "aligned":
        assert set(cats) >= set(evaluate.GENEVAL_TASKS) | {"dense"}
    if strategy == "targeted":
        # most where the model passes sometimes (the reward then separates its samples), none where it
        # never or always passes
        share = {c: cats.count(c) / len(cats) for c in ("position", "knowledge/comparative", "colors", "dense")}
        assert share["position"] > share["knowledge/comparative"] > 0 == share["colors"] == share["dense"], share
        named = np.mean([("relation", "left of") in targeting.names(e) for e in exs if e.category == "position"])
        assert named > 0.5, f"targeted position prompts name the weak relation only {named:.2f} of the time"


def test_targets_are_the_weakest_categories_and_compositions_passed_sometimes():
    weakness = {"categories": [{"name": "dense", "pass_rate": 0.0, "n": 100},
                               {"name": "knowledge/comparative", "pass_rate": 0.2, "n": 100},
                               {"name": "color_attr", "pass_rate": 0.3, "n": 100},
                               {"name": "position", "pass_rate": 0.5, "n": 100},
                               {"name": "colors", "pass_rate": 1.0, "n": 100}],
                "compositions": [{"name": "blue circle", "tail": True, "pass_rate": 0.01, "n": 40},
                                 {"name": "red triangle", "tail": True, "pass_rate": 0.3, "n": 40},
                                 {"name": "green circle", "tail": False, "pass_rate": 0.6, "n": 40},
                                 {"name": "red circle", "tail": False, "pass_rate": 0.9, "n": 40}]}
    # dense and blue circle: never passed, nothing to imitate; colors and red circle: strong enough
    assert targeting.choose_targets(weakness, top=2, below=0.8) == (["knowledge/comparative", "color_attr"],
                                                                     ["red triangle", "green circle"])
    assert targeting.choose_targets(weakness, top=1, below=0.5) == (["knowledge/comparative"], ["red triangle"])
    assert targeting.choose_targets(weakness, top=0, below=0.8)[0] == ["knowledge/comparative", "color_attr",
                                                                       "position"]
    assert targeting.choose_targets({"categories": weakness["categories"]}, 2, 0.8)[1] == [], "an older report"
    # dense by its share of facts, and weak while fewer than `below` of its layouts have every fact right
    dense = {"name": "dense", "pass_rate": 0.5, "facts": 0.92, "n": 100}
    assert targeting.choose_targets({"categories": [dense]}, 2, 0.8)[0] == ["dense"]
    assert targeting.choose_targets({"categories": [{**dense, "pass_rate": 0.85}]}, 2, 0.8)[0] == []
    assert targeting.choose_targets({"categories": [{**dense, "facts": 0.02}]}, 2, 0.8)[0] == []


def test_targeted_prompts_name_the_weak_compositions_by_their_share():
    weakness = {"categories": [{"name": "position", "pass_rate": 0.5, "n": 100}],
                "compositions": [{"name": "red triangle", "tail": True, "pass_rate": 0.3, "n": 40},
                                 {"name": "green square", "tail": True, "pass_rate": 0.5, "n": 40}],
                "attributes": []}
    targets = targeting.choose_targets(weakness, 2, 0.8)
    draw = lambda **kw: targeting.draw_prompts("targeted", 300, np.random.default_rng(0), weakness, targets, **kw)
    named = lambda exs: np.mean([bool({"red triangle", "green square"} & set(world.compositions(e.spec)))
                                 for e in exs])
    # 0.4 of them by design (half of the 0.8 left by the anchor), and the others' chance share (~0.2) of the rest
    exs = draw(composition_share=0.5, anchor=0.2)
    position = np.mean([e.category == "position" for e in exs])
    chance = named(draw(composition_share=0.0))
    assert 0.4 < named(exs) < 0.65 and 0.35 < position < 0.55 and chance < 0.3 and named(exs) > chance + 0.2
    both = [e for e in exs if "red triangle" in world.compositions(e.spec)]
    assert both and world.is_tail(both[0].spec) and {e.category for e in both} - {"position"}, \
        "a composition's prompts come from every category that can name it"
    assert all(world.split_of(e.spec) == "train" for e in exs)
    # no weak category: every non-anchor prompt names a weak composition; none weak at all: nothing to target
    exs = targeting.draw_prompts("targeted", 100, np.random.default_rng(1), weakness, ([], ["red triangle"]))
    assert all("red triangle" in world.compositions(e.spec) for e in exs)
    with pytest.raises(targeting.NothingToTarget):
        targeting.draw_prompts("targeted", 10, np.random.default_rng(0), weakness, ([], []))


def test_an_anchor_share_of_targeted_prompts_comes_from_every_benchmark_category():
    weakness = {"categories": [{"name": "knowledge/comparative", "pass_rate": 0.2},
                               {"name": "colors", "pass_rate": 1.0}],
                "attributes": []}
    draw = lambda **kw: targeting.draw_prompts("targeted", 400, np.random.default_rng(0), weakness,
                                               targeting.choose_targets(weakness, 1), **kw)
    assert [e.prompt for e in draw(anchor=0.0)] == [e.prompt for e in draw()], "anchor 0 draws what it drew before"
    exs = draw(anchor=0.25)
    other = [e for e in exs if e.kind != "comparative"]
    assert 0.18 < len(other) / len(exs) < 0.32 and {e.category for e in other} >= set(evaluate.GENEVAL_TASKS)
    bench = ({e.prompt for exs in evaluate.prompt_sets(50).values() for e in exs}
             | {e.prompt for e in evaluate.dev_prompts(25)})
    assert not {e.prompt for e in exs} & bench and all(world.split_of(e.spec) == "train" for e in exs)


def test_the_verifier_scores_the_share_of_clauses():
    rng = np.random.default_rng(3)
    exs = [world.sample_example(rng, "dense") for _ in range(6)]
    wrong = [world.Scene(ex.scene.objects[1:]) for ex in exs]  # the first object left out
    images = [world.render(s) for s in [ex.scene for ex in exs] + wrong]
    v = posttrain.verifier_scores(images, exs, list(range(6)) * 2)
    assert v[:6].tolist() == [1.0] * 6
    assert v[6:] == pytest.approx([np.mean(list(world.check(s, ex.spec).values())) for s, ex in zip(wrong, exs)])
    assert all(0 < x < 1 for x in v[6:])


def test_focus_prompts_are_fixed_dev_prompts_of_one_category_or_knowledge_kind():
    weakness_dev = {e.prompt for e in evaluate.dev_prompts(25)}
    for name in ("counting", "knowledge/comparative", "knowledge/number"):
        exs = evaluate.focus_prompts(name, 150)
        assert len({e.prompt for e in exs}) == 150 and all(world.split_of(e.spec) == "dev" for e in exs)
        assert {evaluate.category_name(e.category, e.kind) for e in exs} == {name}
        assert [e.prompt for e in exs] == [e.prompt for e in evaluate.focus_prompts(name, 150)], "the same on every run"
        assert len({e.prompt for e in exs} & weakness_dev) < 15, "mostly others than the weakness report's"
    bench = evaluate.focus_prompts("knowledge/number", 50, "bench")
    assert all(world.split_of(e.spec) == "bench" for e in bench)
    assert evaluate.focus_prompts("counting", 50, "bench") == evaluate.benchmark_prompts("counting", 50)


def test_targeted_needs_a_weakness_report():
    with pytest.raises(ValueError, match="weakness"):
        targeting.draw_prompts("targeted", 10, np.random.default_rng(0), None)


def test_weighted_loss_is_the_weighted_sum_of_both_modalities():
    vocab = data.Vocab(text_size=20, codebook_size=8,
                       tagger=data.Tagger(20, cell_ids=(12,), keep_ids=(13,), patch_tags=(1, 1, 0, 0)))
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=vocab.size, image_offset=vocab.image_offset, n_image_tokens=4, block_size=32,
                        n_layer=1, n_head=2, n_kv_head=2, n_embd=16, mlp_hidden=32, n_tags=2))
    samples = {"prompt": [[9, 10], [11]], "plan": [[12, 13, 14], [15]], "codes": [[1, 2, 3, 4], [5, 6, 7, 0]],
               "format": "plan"}
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
    gpt, *_, rounds, drawn = posttrain.post_train(cfgs, run, "cpu", train.Metrics(os.path.join(run, "m.jsonl")).log,
                                                  cfgs["post"], seed=5, adapter="t")
    state = gpt.state_dict()
    for k, v in base.items():
        key = (k.replace("_proj.weight", "_proj.base.weight")
               if k.replace("_proj.weight", "_proj.base.weight") in state else k)
        assert torch.equal(state[key], v), k
    assert any(state[k].abs().sum() > 0 for k in state if ".lora_B." in k), "the adapter did not train"
    assert rounds and "verifier" not in rounds[0], "post_train reports the reward's figures only"
    assert 0 <= posttrain.judge(rounds, drawn)[0]["verifier"] <= 1


def weak_report(run):
    """Make a copy of the micro run's weakness report name a weak category and a weak composition, so that
    targeted post-training has something to aim at (the micro model passes nothing)."""
    weakness = {"categories": [{"name": "position", "pass_rate": 0.5, "n": 8}],
                "compositions": [{"name": "red triangle", "tail": True, "pass_rate": 0.3, "n": 8}], "attributes": []}
    with open(os.path.join(run, "weakness.json"), "w") as f:
        json.dump(weakness, f)


def test_post_train_never_calls_the_verifier(micro_run, tmp_path, monkeypatch):
    """The training path weights samples by the reward alone: with the exact parser and checker made to raise,
    a targeted post_train (with its after-training check) completes; judge, afterwards, is what calls them."""
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    weak_report(run)
    cfgs = train.load_config(MICRO, [f"--train.out_dir={run}", "--post.strategy=targeted", "--post.rounds=2",
                                     "--post.threshold=0.0"])
    train.derive_sizes(cfgs, run)

    def verifier(*args, **kwargs):
        raise AssertionError("the verifier was called in the training path")
    for module, name in ((parser, "parse"), (parser, "parse_batch"), (world, "passes"), (world, "check"),
                         (world, "clause_share")):
        monkeypatch.setattr(module, name, verifier)
    monkeypatch.setattr(posttrain, "verifier_scores", verifier)
    *_, rounds, drawn = posttrain.post_train(cfgs, run, "cpu", train.Metrics(None).log, cfgs["post"], seed=0,
                                             log_prefix="nv", check=True)
    assert len(rounds) == 2 and rounds[0]["targets"] == ["position", "red triangle"]
    assert (drawn[1]["weight"] > 0).sum() == cfgs["post"].prompts, "threshold 0: every prompt's best sample"
    assert {"reward", "reward_weighted", "reward_after"} <= set(rounds[-1]) and "verifier" not in rounds[-1]
    with pytest.raises(AssertionError, match="the verifier was called"):
        posttrain.judge(rounds, drawn)
    monkeypatch.undo()
    judged = posttrain.judge(rounds, drawn)[-1]
    assert {"verifier", "verifier_weighted", "verifier_after", "categories"} <= set(judged)


def test_threshold_weights_keep_what_the_reward_puts_at_or_above_post_threshold(micro_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    kept = {}
    for weighting, threshold in (("threshold", 0.0), ("threshold", 2.0), ("best_above", 0.0)):
        cfgs = train.load_config(MICRO, [f"--train.out_dir={run}", "--post.steps=1", f"--post.weighting={weighting}",
                                         f"--post.threshold={threshold}"])
        train.derive_sizes(cfgs, run)
        posttrain.post_train(cfgs, run, "cpu", train.Metrics(None).log, cfgs["post"], seed=2, log_prefix="thr")
        t = load_file(os.path.join(run, "thr_round0.safetensors"))
        kept[weighting, threshold] = int((t["weight"] > 0).sum())
        assert "verifier" not in t, "round files hold the reward's figures only"
    n = cfgs["post"].prompts
    assert kept == {("threshold", 0.0): n * cfgs["post"].samples, ("threshold", 2.0): 0, ("best_above", 0.0): n}


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
    assert "no dev category or composition is passed between 5% and" in report["post"]["skipped"]
    assert "after" not in report["post"]
    assert report["post"]["before"] == before["benchmarks"] == report["benchmarks"]
    assert report["stages"]["post"]["skipped"] and not os.path.exists(os.path.join(run, "lora_post.safetensors"))
    assert "Skipped" in open(os.path.join(run, "report.md")).read()


def test_targeted_post_training_without_a_weakness_report_says_what_to_run(micro_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    for f in ("lora_post.safetensors", "lora_post.json", "weakness.json"):
        os.remove(os.path.join(run, f))
    with pytest.raises(SystemExit, match="weakness.json: run --stages=eval first"):
        train.main([MICRO, f"--train.out_dir={run}", "--stages=post", "--post.strategy=targeted"])
    assert not os.path.exists(os.path.join(run, "lora_post.safetensors")), "nothing written"


def test_ablations_stage_writes_tables_and_claims(micro_run, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    train.main([MICRO, f"--train.out_dir={run}", "--stages=ablations", "--ablations.variants=both,uniform,no_pretrain"])
    res = json.load(open(os.path.join(run, "ablations", "ablations.json")))
    assert set(res["runs"]) == {"both", "uniform", "no_pretrain"} and res["base"]["focus"]["samples"] == 2 * 4 * 2
    md = open(os.path.join(run, "ablations", "ablations.md")).read()
    assert "standard error" in md and "| uniform (n=1)" in md and "| no_pretrain (n=1)" in md and ", dev)" in md
    assert json.load(open(os.path.join(run, "report.json")))["stages"]["ablations"]["variants"] == 3


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
    assert ("- Reward weighting beats plain self-training (uniform):\n  - position (pass_rate, dev): **reproduces** "
            "(best: both, +0.150 over uniform, standard error 0.050)") in out
    other = dict(parts[1], base={**base, "focus": {"pass_rate": 0.1, "samples": 16}})
    with pytest.raises(SystemExit, match="different base"):
        ablations.merge([parts[0], other])


def test_ablation_claims_need_a_lead_beyond_the_standard_error_on_every_figure():
    bench = lambda x, tail=None: {b: {"overall": x, **({} if tail is None else {"seen": {"score": x},
                                                                                "tail": {"score": tail}})}
                                  for b in ("geneval", "dpg", "wise", "oneig")}
    base = {"focus": {"pass_rate": 0.3, "samples": 16}, "benchmarks": bench(0.5)}
    runs = lambda *xs: [{"focus": {"pass_rate": x}, "benchmarks": bench(0.5)} for x in xs]
    res = lambda **v: {"focus_category": "position", "base": base, "runs": {k: runs(*x) for k, x in v.items()}}
    # image only ahead by 0.001 with seeds spread by 0.01: no verdict either way
    md = ablations.summary_table(res(both=(0.40, 0.41, 0.42), text_only=(0.30, 0.31, 0.32),
                                     image_only=(0.401, 0.411, 0.421)))
    assert ("- Weighting both modalities beats text only and image only:\n  - position (pass_rate, dev): "
            "**not settled**: image_only leads both by +0.001" in md)
    assert "  - geneval: **not settled**: both leads text_only by +0.000" in md, "equal benchmarks settle nothing"
    # a rival clearly ahead of the claimed variant: the claim does not reproduce, however close the rest
    md = ablations.summary_table(res(both=(0.40, 0.41, 0.42), broad=(0.50, 0.51, 0.52), aligned=(0.495, 0.505, 0.515)))
    assert "  - position (pass_rate, dev): **does not reproduce** (best: broad, +0.100 over targeted" in md
    # seen and tail parts, where the benchmarks have them, are judged as figures of their own
    base["benchmarks"] = bench(0.5, 0.2)
    run = lambda tail: {"focus": {"pass_rate": 0.4}, "benchmarks": bench(0.5, tail)}
    md = ablations.summary_table({"focus_category": "position", "base": base,
                                  "runs": {"both": [run(t) for t in (0.30, 0.31, 0.32)],
                                           "no_pretrain": [run(t) for t in (0.20, 0.21, 0.22)]}})
    assert "| variant | position (pass_rate, dev) | change | geneval | geneval seen | geneval tail | dpg |" in md
    assert ("- The pretraining term beats self-generated data alone:" in md
            and "  - dpg tail: **reproduces** (best: both, +0.100 over no_pretrain" in md
            and "  - dpg seen: **not settled**" in md), md
