"""Post-training on a folder of your own images (folderpost.py): word-swap negatives, the learnt reward, bad
folders, the post stage end to end, and a training path that never calls the shapes world's verifier."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import data
import folderpost
import parser
import posttrain
import pretrain
import train
import vqascore
import world
from config import ConfigError
from generate import RunError
from heads import RewardsConfig, padded_text_ids
from model import VQ, VQConfig

MICRO = os.path.join(os.path.dirname(__file__), "..", "tiny_configs", "micro.toml")
FOLDER = ["--train.p_plan=0", "--train.p_direct=0.8", "--sample.think=false", "--train.lm_steps=6",
          "--rewards.clip_steps=40", "--rewards.vqascore_steps=40", "--post.eval_samples=2"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A micro run of every stage on a demo folder of 60 images: (folder, run directory)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("folder")
    folder, out = str(root / "images"), str(root / "run")
    data.make_folder(folder, 60, seed=3)
    train.main([MICRO, f"--train.out_dir={out}", f"--train.data_dir={folder}", *FOLDER])
    return folder, out


def test_word_swap_puts_in_a_word_used_alike_that_the_caption_lacks():
    caps = ["a red circle at the top", "a blue square at the bottom", "a green circle at the bottom",
            "a red square at the top", "a blue triangle at the top"]
    table = folderpost.swap_table(caps)
    assert {"blue", "green"} <= set(table["red"]) and "circle" not in table["red"], table["red"]
    rng = np.random.default_rng(0)
    for c in caps * 4:
        s = folderpost.word_swap(c, table, rng)
        old, new = folderpost.caption_words(c), folderpost.caption_words(s)
        changed = [(a, b) for a, b in zip(old, new) if a != b]
        assert len(old) == len(new) and len(changed) == 1, (c, s)
        assert changed[0][1] not in old and changed[0][1] in table[changed[0][0]]
    assert folderpost.word_swap("red and blue", folderpost.swap_table(["red and blue", "blue and red"]), rng) is None
    assert folderpost.word_swap("a red circle, at the top.", {"red": ["blue"]}, rng) == "a blue circle, at the top."


def test_reward_pairs_and_their_fallback_to_other_captions():
    caps = ["a red circle", "a blue circle", "a red square", "a blue square"]
    image, caption, label, group, kind = folderpost.reward_pairs(caps, np.random.default_rng(0),
                                                                 folderpost.swap_table(caps), 2)
    assert label.sum() == 4 and all(caption[k] == caps[image[k]] for k in np.nonzero(label)[0])
    assert all(caption[k] != caps[group[k]] for k in np.nonzero(kind == 1)[0]), "a swap changes the caption"
    near = np.nonzero(kind == 3)[0]  # the caption on the image of the most similar other caption
    assert all(caption[k] == caps[group[k]] and image[k] != group[k] for k in near) and len(near) == 4
    _, _, _, _, kind = folderpost.reward_pairs(caps, np.random.default_rng(0), {}, 2)
    assert (kind == 1).sum() == 0 and (kind == 2).sum() == 4 * 3, "no swaps: other captions instead"


def test_bad_folders_stop_with_a_message():
    imgs = np.zeros((30, 8, 8, 3), np.uint8)
    same = data.Folder(imgs, ["a cat"] * 30, [f"{i}.png" for i in range(30)], [])
    with pytest.raises(RunError, match="every one of the 27 training captions of the folder is the same"):
        folderpost.check_folder(same, list(range(27)), [27, 28, 29])
    few = data.Folder(imgs, [f"a cat {i}" for i in range(30)], same.names, [])
    with pytest.raises(RunError, match="too few to hold some out"):
        folderpost.check_folder(few, list(range(27)), [27, 28, 29])
    folderpost.check_folder(few, list(range(26)), [26, 27, 28, 29])


def test_a_folder_run_refuses_a_post_reward_it_does_not_train(tmp_path):
    args = [MICRO, f"--train.data_dir={tmp_path}", *FOLDER]
    train.load_config(MICRO, args[1:] + ["--post.reward=clip + 0.5*self"])
    with pytest.raises(ConfigError, match=r"post.reward='aesthetic': a folder run has the rewards vqascore, clip, self"):
        train.load_config(MICRO, args[1:] + ["--post.reward=aesthetic"])


def test_the_reward_ranks_a_true_caption_above_a_word_swapped_one_on_held_out_renders():
    """vqascore trained on the pairs of 300 renders of one object captioned with its colour and shape (word swaps,
    other captions, other images as negatives); 100 held-out renders: the true caption must score above its
    word swap for most of them. Chance is 0.5 (+- 0.05); 800 steps reached 0.86, 400 stayed at chance."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    scenes = [world.random_scene(rng, 1) for _ in range(400)]
    caps = [f"a {o.colour} {o.shape}" for s in scenes for o in s.objects]
    vq = VQ(VQConfig()).eval()  # untrained: its encoder's features still tell colours and shapes apart
    imgs = np.stack([world.render(s, vq.cfg.image_size) for s in scenes])
    tok = data.train_tokenizer(corpus=caps)
    cfg = RewardsConfig(batch=32, vqascore_dim=32, vqascore_steps=800)
    net = vqascore.VQAScore(cfg.vqascore_dim, 1, tok.get_vocab_size(), cfg.max_text, vq.cfg)
    table = folderpost.swap_table(caps[:300])
    image, caption, label, group, _ = folderpost.reward_pairs(caps[:300], rng, table, 2)
    vqascore.train(net, cfg, vq, (imgs[:300], padded_text_ids(tok, caption, cfg.max_text), label, image, group),
                   0, "cpu")
    held = caps[300:]
    swaps = [folderpost.word_swap(c, table, rng) for c in held]
    x = data.to_float(imgs[300:])
    with torch.no_grad():
        true, swapped = (net.eval()(x, padded_text_ids(tok, t, cfg.max_text)) for t in (held, swaps))
    share = (true > swapped).float().mean().item()
    assert share > 0.75, f"the true caption above its swap on {share:.2f} of 100 held-out renders (chance 0.5)"


def test_folder_post_stage_end_to_end(folder_run):
    folder, run = folder_run
    report = json.load(open(os.path.join(run, "report.json")))
    cal = report["stages"]["rewards"]["calibration"]
    assert set(folderpost.CHECKS) <= set(cal) and set(cal["vqascore"]) == set(folderpost.NEGATIVES)
    assert report["stages"]["rewards"]["swap_share"] > 0.9
    post = report["folder_post"]
    assert set(post["rewards"]) == set(folderpost.CHECKS) and post["held_out_captions"] == 2
    assert {"before", "after", "change", "change_se"} <= set(post["rewards"]["clip"])
    assert set(post["verifier"]) == {"clause_share", "pass_rate", "round", "round_weighted"}, "a demo folder"
    assert post["hacking"]["held_out_rose"].keys() == {"clip", "self"}
    assert post["round"]["samples"] == 4 * 2 and post["weakness"][0]["mean"] <= post["weakness"][-1]["mean"]
    assert os.path.exists(os.path.join(run, "post_samples_folder.png"))
    assert os.path.exists(os.path.join(run, "lora_post.safetensors"))
    md = open(os.path.join(run, "report.md")).read()
    for title in ("Reward calibration", "Weak words", "Post-training on the folder"):
        assert f"## {title}" in md


def test_the_folder_training_path_never_calls_the_verifier(folder_run, tmp_path, monkeypatch, capsys):
    """With the exact parser and checker made to raise, the folder's reward trains and the post stage runs on
    a folder without scenes (not the demo folder: the verifier is not asked, and the report says so). The word
    swaps here are impossible, so the reward falls back to other captions and says so."""
    folder, run = folder_run
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    for name in ("rewards.safetensors", "lora_post.safetensors"):
        os.remove(os.path.join(copy, name))
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    rows = [json.loads(line) for line in open(plain / "metadata.jsonl")]
    with open(plain / "metadata.jsonl", "w") as f:  # captions no word can be swapped in, no scenes
        f.writelines(json.dumps({"file_name": r["file_name"], "text": ("red and blue", "blue and red")[i % 2]}) + "\n"
                     for i, r in enumerate(rows))
    cfgs = train.load_config(MICRO, [f"--train.out_dir={copy}", f"--train.data_dir={plain}", *FOLDER,
                                     "--rewards.clip_steps=4", "--rewards.vqascore_steps=4"])
    train.derive_sizes(cfgs, copy)
    f, tr, dev = pretrain.open_folder(cfgs)

    def verifier(*args, **kwargs):
        raise AssertionError("the verifier was called in the training path")
    for module, name in ((parser, "parse"), (parser, "parse_batch"), (world, "passes"), (world, "check"),
                         (world, "clause_share")):
        monkeypatch.setattr(module, name, verifier)
    monkeypatch.setattr(posttrain, "verifier_scores", verifier)
    figures, _ = folderpost.train_reward(cfgs, copy, "cpu", f, tr, dev, lambda **kv: None)
    assert figures["swap_share"] == 0 and "too small for word-swap negatives" in capsys.readouterr().out
    _, post, _ = folderpost.run(cfgs, copy, "cpu", lambda **kv: None, f, tr, dev)
    assert post["verifier"].startswith("not judged") and "verifier_rose" not in post["hacking"]
    with pytest.raises(AssertionError, match="the verifier was called"):
        folderpost.judge([f.images[0]], [f.names[0]], {f.names[0]: world.Scene(())})


@pytest.mark.parametrize("stage", ["overopt", "versat2i", "textcraftor", "ablations"])
def test_the_shapes_world_stages_refuse_a_folder_run(folder_run, stage):
    folder, run = folder_run
    with pytest.raises(SystemExit, match=f"--stages={stage} needs the shapes world"):
        train.main([MICRO, f"--train.out_dir={run}", f"--train.data_dir={folder}", *FOLDER, f"--stages={stage}"])
