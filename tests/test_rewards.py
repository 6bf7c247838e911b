"""Rewards: the spec parser, the checked wrapper, the trained heads (micro run), the verifier, the README example."""
import json
import os
import re

import numpy as np
import pytest
import torch

import data
import edits
import heads
import rewards
import train
import world
from rewards import RewardError, load_reward, parse_spec

HEADS = rewards.HEADS
README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_spec_parsing():
    assert parse_spec("vqascore") == [(1.0, "vqascore")]
    assert parse_spec("vqascore + 0.5*aesthetic - 0.25*self") == [(1.0, "vqascore"), (0.5, "aesthetic"),
                                                                  (-0.25, "self")]
    assert parse_spec(" -clip*2 + quality ") == [(-2.0, "clip"), (1.0, "quality")]


@pytest.mark.parametrize("spec, message", [
    ("vqascore + aesthtic", "unknown reward 'aesthtic'.*did you mean 'aesthetic'"),
    ("vqascore +", "bad reward spec"),
    ("0.5*", "bad reward spec"),
    ("2*vqascore*3", "bad reward spec"),
    ("vqascore 0.5", "bad reward spec"),
    ("", "empty reward spec"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(RewardError, match=message):
        parse_spec(spec)


def test_weighted_sum_and_misbehaving_rewards_are_named(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "ones", lambda im, p: torch.ones(len(im)))
    monkeypatch.setitem(rewards.REWARDS, "mean", lambda im, p: im.mean((1, 2, 3)))
    monkeypatch.setitem(rewards.REWARDS, "boom", lambda im, p: 1 / 0)
    monkeypatch.setitem(rewards.REWARDS, "flat", lambda im, p: torch.ones(len(im), 2))
    monkeypatch.setitem(rewards.REWARDS, "nan", lambda im, p: torch.full((len(im),), float("nan")))
    images = torch.rand(3, 3, 32, 32)
    r = load_reward(None, "ones - 0.5*mean + 2*ones")
    assert torch.allclose(r(images, ["a"] * 3), 3 - 0.5 * images.mean((1, 2, 3)))
    with pytest.raises(RewardError, match="reward 'boom' raised ZeroDivisionError"):
        load_reward(None, "ones + boom")(images, ["a"] * 3)
    with pytest.raises(RewardError,
                       match=r"reward 'flat' returned a torch.float32 tensor of shape \(3, 2\).*shape \(3,\)"):
        load_reward(None, "flat")(images, ["a"] * 3)
    with pytest.raises(RewardError, match=r"reward 'nan' returned NaN at rows \[0, 1, 2\]"):
        load_reward(None, "nan")(images, ["a"] * 3)
    with pytest.raises(RewardError, match="expected a list of 3 prompts"):
        r(images, ["a"])
    with pytest.raises(RewardError, match=r"images must be a float tensor \(B, 3, H, W\)"):
        r(torch.zeros(3, 32, 32, 3, dtype=torch.uint8), ["a"] * 3)


def test_heads_need_a_trained_run(tmp_path):
    with pytest.raises(RewardError, match="reward 'vqascore' needs a trained run.*--stages=rewards"):
        load_reward(str(tmp_path), "vqascore")


def test_heads_shapes_ranges_and_gradients(micro_run):
    prompts = ["a red circle", "two blue squares", "a square the colour of grass"]
    for name in HEADS + ("self",):
        images = torch.rand(3, 3, 32, 32, requires_grad=True)
        r = load_reward(micro_run, name)(images, prompts)
        assert r.shape == (3,), name
        lo = -1.0 if name == "clip" else 0.0  # clip is a cosine; the others are probabilities
        assert ((r >= lo) & (r <= 1.0)).all(), (name, r)
        if name in HEADS:  # differentiable: the gradient reaches the pixels
            r.sum().backward()
            assert images.grad is not None and images.grad.abs().sum() > 0, name


def test_verifier_is_one_on_ground_truth_and_the_share_of_clauses_that_hold_on_another_scene():
    rng = np.random.default_rng(0)
    exs = [world.sample_example(rng, category=c) for c in world.CATEGORIES]
    others = [next(s for s in (world.random_scene(rng) for _ in range(100)) if not world.passes(s, e.spec))
              for e in exs]
    specs = {e.prompt: e.spec for e in exs}
    verifier = load_reward(None, "verifier", specs=specs)
    prompts = [e.prompt for e in exs]
    truth = data.to_float(np.stack([world.render(e.scene) for e in exs]))
    assert verifier(truth, prompts).tolist() == [1.0] * len(exs)
    got = verifier(data.to_float(np.stack([world.render(s) for s in others])), prompts).tolist()
    want = [np.mean(list(world.check(s, e.spec).values()))
            for s, e in zip(others, exs)]  # the share of clauses that hold
    assert got == pytest.approx(want) and all(0 <= g < 1 for g in got) and any(g > 0 for g in got)
    with pytest.raises(RewardError, match="no Spec for prompt 'a blue square'"):
        verifier(truth[:1], ["a blue square"])


def test_perturb_and_malformed_change_the_picture():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = world.random_scene(rng)
        assert edits.perturb(scene, rng) != scene
        assert not np.array_equal(edits.render_malformed(scene, rng, 32), world.render(scene, 32))
        assert 0.0 <= edits.composition(scene) <= 1.0


def test_tower_pools_the_real_tokens_only():
    # mean pooling (not a [cls] token, which left clip's contrastive loss at chance for a random number of
    # steps): padding must not change an embedding, and two sequences differing in one token must differ
    torch.manual_seed(0)
    tower = heads.Tower(16, 1).eval()
    x = torch.randn(2, 5, 16)
    padded = torch.cat([x, torch.randn(2, 3, 16)], 1)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[:, 5:] = True
    torch.testing.assert_close(tower(padded, pad), tower(x), atol=1e-5, rtol=1e-5)
    y = x.clone()
    y[1, 2] = torch.randn(16)
    assert not torch.allclose(tower(y)[1], tower(x)[1], atol=1e-3)


def test_auc():
    assert rewards.auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert rewards.auc([1, 2, 3, 3], [0, 0, 1, 0]) == pytest.approx(2.5 / 3)  # a tie counts half
    assert rewards.auc([0.5, 0.5], [1, 1]) is None


def test_each_head_beats_chance_after_micro_training(micro_run):
    cal = json.load(open(os.path.join(micro_run, "report.json")))["stages"]["rewards"]["calibration"]["held_out"]
    figures = {"structured": cal["structured"]["auc_vs_verifier"], "clip": cal["clip"]["caption_vs_hard_negative"],
               "quality": cal["quality"]["auc_clean_vs_degraded"],
               "geometry": cal["geometry"]["auc_clean_vs_malformed"], "verifier": cal["verifier"]["auc_vs_verifier"]}
    for name, value in figures.items():
        assert value > 0.6, f"{name}: {value:.3f} on held-out data, want > 0.6 (chance is 0.5)"
    assert cal["aesthetic"]["corr_with_composition"] > 0.2, cal["aesthetic"]


def test_calibration_cli_prints_a_table(micro_run, capsys):
    rewards.main([micro_run, "--examples", "32", "--samples", "4"])
    out = capsys.readouterr().out
    assert all(name in out for name in HEADS + ("verifier", "self")) and "AUC vs verifier" in out
    assert "within" in out and "tail" in out


def test_changed_reward_settings_name_the_heads_file(micro_run):
    with pytest.raises(SystemExit, match=r"rewards.dim.*Delete .*rewards.safetensors"):
        train.main([os.path.join(os.path.dirname(README), "tiny_configs", "micro.toml"), f"--train.out_dir={micro_run}",
                    "--stages=eval", "--rewards.dim=16"])


def test_readme_example_runs(micro_run, monkeypatch, capsys):
    text = open(README).read()
    code = re.search(r"### Rewards.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) < 15
    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))  # the example registers a name: keep it local
    exec(code.replace("out/shapes_cpu", micro_run), {})
    assert "tensor(" in capsys.readouterr().out


def test_structured_executor_on_exact_cells_and_programs_is_the_verifier():
    # the soft executor, fed certain cells (one-hot scenes) and certain programs (the Specs as near-infinite
    # logits), must agree with world.passes on true scenes and on their edits
    rng = np.random.default_rng(3)
    exs = [world.sample_example(rng) for _ in range(300)]
    scenes = [e.scene if k % 2 else edits.perturb(e.scene, rng) for k, e in enumerate(exs)]
    slots, total, rel = heads.program_targets([e.spec for e in exs])
    sure = lambda t, n: 50.0 * torch.nn.functional.one_hot(t, n).float()
    slot_logits = torch.cat([sure(slots[..., k], n) for k, n in enumerate(heads.SLOT_ATTRS)], -1)
    head = heads.StructuredHead(heads.RewardsConfig(dim=8, layers=1), 100, 32)
    targets = heads.cell_targets(scenes)  # (B, 9, 3): the exact scene, one-hot as ImageEncoder.cell_probs gives it
    cells = torch.cat([torch.nn.functional.one_hot(targets[..., k], n).float()
                       for k, n in enumerate(heads.CELL_ATTRS)], -1)
    p = head.execute(cells, slot_logits, sure(total, world.MAX_OBJECTS + 1), 50.0 * (2 * rel - 1))
    want = np.array([world.passes(s, e.spec) for s, e in zip(scenes, exs)])
    assert 0.2 < want.mean() < 0.8
    assert np.array_equal(p.numpy() > 0.5, want), \
        [e.prompt for e, a, b in zip(exs, p.numpy() > 0.5, want) if a != b][:3]
