"""Config checking, the schedule, and a micro end-to-end run of every stage."""
import json
import os

import pytest

import train
from model import cosine_lr
from train import ConfigError, load_config

MICRO = os.path.join(os.path.dirname(__file__), "..", "tiny_configs", "micro.toml")


def test_shipped_configs_load():
    for name in os.listdir(os.path.join(os.path.dirname(MICRO))):
        load_config(os.path.join(os.path.dirname(MICRO), name))


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlm_stesp = 3\n")
    with pytest.raises(ConfigError, match=r"train\.lm_stesp.*did you mean train\.lm_steps"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"unknown config section \[trian\]"):
        load_config(None, ["--trian.lm_steps=3"])


def test_wrong_types_are_refused():
    bad_values = ["--train.lm_steps=3.5", "--train.lm_lr=fast", "--train.compile=maybe", "--gpt.n_layer=two"]
    for item in bad_values:
        with pytest.raises(ConfigError, match=item.split("=")[0].lstrip("-")):
            load_config(MICRO, [item])


def test_file_types_checked(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[gpt]\nn_layer = "4"\n')
    with pytest.raises(ConfigError, match=r"gpt\.n_layer = '4' is a str, expected a int"):
        load_config(str(bad))
    bad.write_text("[train]\nlm_lr = 1\ncompile = true\n")  # an int is a fine float
    assert load_config(str(bad))["train"].lm_lr == 1.0


@pytest.mark.parametrize("override, message", [
    ("--train.device=gpu", "train.device='gpu'"),
    ("--train.p_plan=0.95", "p_plan \\+ train.p_direct"),
    ("--train.lm_examples=4", "lm_examples and train.eval_examples"),
    ("--train.eval_every=0", "must be >= 1"),
    ("--vq.image_size=40", "multiple of"),
    ("--train.dtype=float16", "expected float32, bfloat16 or auto"),
    ("--post.plan_temperature=-1", "post.plan_temperature must be >= 0"),
    ("--ablations.variants=both,nope", "ablations.variants='both,nope'"),
    ("--post.weak_below=0", "post.weak_below must lie in"),
    ("--vq.patch=8", "4 codes a side must be a multiple of 8.*train.region_tags = false"),  # a code would straddle
    #                                                                                         two layout cells
])
def test_values_that_cannot_work_are_refused_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(MICRO, [override])


def test_overrides_and_derived_keys():
    cfgs = load_config(MICRO, ["--train.lm_steps=7", "--sample.think=false", "--train.lm_lr=1e-3"])
    assert cfgs["train"].lm_steps == 7 and cfgs["sample"].think is False and cfgs["train"].lm_lr == 1e-3
    for key in ("vocab_size", "n_tags"):
        with pytest.raises(ConfigError, match="derived"):
            load_config(MICRO, [f"--gpt.{key}=10"])
    # codes may straddle cells untagged
    assert load_config(MICRO, ["--vq.patch=8", "--train.region_tags=false"])["vq"].patch == 8
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(MICRO, ["--lm_steps=3"])


def test_cosine_schedule():
    lr = lambda step: cosine_lr(step, peak=1.0, warmup=10, total=110, floor=0.1)
    assert lr(0) == pytest.approx(0.1)
    assert lr(9) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)
    assert lr(110) == pytest.approx(0.1)
    assert [cosine_lr(s, 1.0, 10, 60, 1.0) for s in (10, 35, 59)] == [1.0] * 3, \
        "floor = peak: constant after warm-up"


def test_micro_run_end_to_end(micro_run, capsys):
    out = micro_run
    for f in ["config.json", "tokenizer.json", "vq.safetensors", "gpt.safetensors", "metrics.jsonl",
              "report.json", "report.md", "samples_geneval.png", "vq_recon.png", "weakness.json"]:
        assert os.path.exists(os.path.join(out, f)), f
    report = json.load(open(os.path.join(out, "report.json")))
    g = report["benchmarks"]["geneval"]
    assert 0.0 <= g["overall"] <= 1.0 and len(g["tasks"]) == 6
    assert set(report["benchmarks"]) == {"geneval", "dpg", "wise", "oneig"}
    assert report["weakness"]["categories"] and report["weakness"]["split"] == "dev"
    assert 0.0 <= report["stages"]["vq"]["parser_agreement"] <= 1.0
    # in this order: the benchmarks are scored and written before the reward heads and post-training
    assert list(report["stages"]) == ["tokenizer", "vq", "lm", "eval", "rewards", "post"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["gpt"]["vocab_size"] == cfg["gpt"]["image_offset"] + cfg["vq"]["codebook_size"]
    # a second run reuses every finished stage instead of redoing it
    mtime = os.path.getmtime(os.path.join(out, "gpt.safetensors"))
    train.main([MICRO, f"--train.out_dir={out}", "--stages=tokenizer,vq,lm"])
    assert "reusing" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "gpt.safetensors")) == mtime
    # the same directory with another config is refused, naming the difference, and nothing is touched
    with pytest.raises(SystemExit, match="gpt.n_embd"):
        train.main([MICRO, f"--train.out_dir={out}", "--gpt.n_embd=64"])
    assert os.path.getmtime(os.path.join(out, "gpt.safetensors")) == mtime


def test_stage_order_is_enforced(tmp_path):
    with pytest.raises(SystemExit, match="needs the tokenizer stage first"):
        train.main([MICRO, f"--train.out_dir={tmp_path / 'r'}", "--stages=lm"])


def test_episode_images_are_bounded_by_the_number_words():
    path = os.path.join(os.path.dirname(__file__), "..", "tiny_configs", "interleaved.toml")
    load_config(path, ["--gpt.max_images=6", "--train.episode_images=4"])
    with pytest.raises(ConfigError, match=r"train.episode_images=5 must lie in 1..gpt.max_images=6 and 1..4"):
        load_config(path, ["--gpt.max_images=6", "--train.episode_images=5"])
