"""Bad input at the command line: a clear message, never a deep traceback, nothing overwritten."""
import os

import pytest

import data
import generate


def test_generate_cli_writes_a_grid(micro_run, capsys):
    out = os.path.join(micro_run, "cli.png")
    generate.main([micro_run, "a red circle", "three squares", "--n", "2", "--out", out])
    assert os.path.exists(out)
    assert capsys.readouterr().out.count("plan:") == 4


@pytest.mark.parametrize("prompt, message", [("a zebra circle", "not in the vocabulary: 'zebra'"),
                                             ("   ", "empty"),
                                             (" ".join(["a red circle"] * 60), "block_size")])
def test_generate_cli_bad_prompts(micro_run, prompt, message):
    with pytest.raises(SystemExit, match=message):
        generate.main([micro_run, prompt])


def test_generate_cli_bad_flags(micro_run, capsys):
    with pytest.raises(SystemExit):
        generate.main([micro_run, "a red circle", "--n", "0"])
    assert "--n must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main([micro_run, "a red circle", "--think", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


def test_missing_or_half_written_run(tmp_path, micro_run):
    with pytest.raises(SystemExit, match="not a run directory"):
        generate.main([str(tmp_path), "a red circle"])
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text(open(os.path.join(micro_run, "config.json")).read())
    with pytest.raises(SystemExit, match="missing .*tokenizer.json"):
        generate.main([str(half), "a red circle"])
    (half / "tokenizer.json").write_text(open(os.path.join(micro_run, "tokenizer.json")).read())
    with pytest.raises(SystemExit, match="missing .*vq.safetensors"):
        generate.main([str(half), "a red circle"])


@pytest.mark.parametrize("name, cut", [("gpt.safetensors", 0.5), ("vq.safetensors", 0.3), ("config.json", 0.5),
                                       ("tokenizer.json", 0.5)])
def test_a_damaged_run_file_is_named_with_what_to_do(tmp_path, micro_run, name, cut):
    # a file cut short (a full disk, a copy interrupted): the message names it and says how to recover
    import shutil
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    blob = (run / name).read_bytes()
    (run / name).write_bytes(blob[:int(len(blob) * cut)])
    with pytest.raises(SystemExit, match=rf"{name} is damaged .*delete it and run `python train.py`"):
        generate.main([str(run), "a red circle"])


@pytest.mark.parametrize("name, command", [
    ("lora_post.safetensors", lambda run: generate.main([run, "a red circle", "--adapter", "post"])),
    ("rewards.safetensors", lambda run: __import__("rewards").main([run])),
])
def test_damaged_weights_of_later_stages_are_named(tmp_path, micro_run, name, command):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    blob = (run / name).read_bytes()
    (run / name).write_bytes(blob[:len(blob) // 2])
    with pytest.raises(SystemExit, match=rf"{name} is damaged"):
        command(str(run))


def test_a_damaged_report_stops_train_with_its_name(tmp_path, micro_run):
    import shutil

    import train
    from conftest import MICRO
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    (run / "report.json").write_text('{"benchmarks": {"geneval": \n')
    with pytest.raises(SystemExit, match=r"report.json is damaged \(not valid JSON"):
        train.main([MICRO, f"--train.out_dir={run}", "--stages=eval"])


def test_checkpoint_from_another_config_is_refused(tmp_path, micro_run):
    import json
    import shutil
    other = tmp_path / "other"
    shutil.copytree(micro_run, other)
    cfg = json.load(open(other / "config.json"))
    cfg["gpt"]["n_embd"] = 64
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(generate.RunError, match="does not fit this model's config"):
        generate.load_run(str(other))


def test_sampling_and_scoring_with_the_post_training_adapter(micro_run, capsys):
    out = os.path.join(micro_run, "adapter.png")
    generate.main([micro_run, "a red circle", "--n", "1", "--adapter", "post", "--out", out])
    assert os.path.exists(out) and "plan:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no adapter .*lora_other.safetensors"):
        generate.main([micro_run, "a red circle", "--adapter", "other"])


def test_run_from_before_one_word_cells_is_refused(tmp_path, micro_run):
    """An older run's GPT writes 'top left' in its plans, which parse_plan no longer reads: say so up front."""
    import json
    import shutil

    import train
    old = tmp_path / "old"
    shutil.copytree(micro_run, old)
    tok = json.load(open(old / "tokenizer.json"))
    for cell in ("top-left", "middle-center"):
        del tok["model"]["vocab"][cell]
    (old / "tokenizer.json").write_text(json.dumps(tok))
    before = sorted(os.listdir(old))
    with pytest.raises(generate.RunError, match="older nanoloom.*new run"):
        generate.load_run(str(old))
    with pytest.raises(SystemExit, match="older nanoloom.*another --train.out_dir"):
        train.main(["tiny_configs/micro.toml", f"--train.out_dir={old}", "--stages=eval"])
    assert sorted(os.listdir(old)) == before


@pytest.mark.parametrize("version, message", [(1, "older nanoloom.*cell after the object"),
                                              (2, "older nanoloom.*did not begin with the number"),
                                              (4, "newer nanoloom")])
def test_run_from_before_count_first_plans_is_refused(tmp_path, micro_run, version, message):
    """An older run's GPT writes the cell last ('red circle large top-left') and has no cell embedding
    (version 1), or writes no count before its objects (version 2); or a newer nanoloom made it: say so up
    front, from both entry points, and change nothing."""
    import json
    import shutil

    import train
    old = tmp_path / "old"
    shutil.copytree(micro_run, old)
    cfg = json.load(open(old / "config.json"))
    if version > data.PLAN_VERSION:  # a newer nanoloom's run
        cfg["plan_version"] = version
    else:  # older ones wrote no plan_version
        del cfg["plan_version"]
    if version == 1:
        del cfg["gpt"]["n_tags"]
    (old / "config.json").write_text(json.dumps(cfg))
    before = {f: (old / f).read_bytes() for f in os.listdir(old) if (old / f).is_file()}
    with pytest.raises(generate.RunError, match=f"{message}.*new run"):
        generate.load_run(str(old))
    with pytest.raises(SystemExit, match=f"{message}.*another --train.out_dir"):
        train.main(["tiny_configs/micro.toml", f"--train.out_dir={old}", "--stages=eval"])
    assert {f: (old / f).read_bytes() for f in os.listdir(old) if (old / f).is_file()} == before


def test_run_whose_model_held_the_layout_cells_is_refused(tmp_path, micro_run):
    """A run of the version before region tags: its GPT config names the layout cells (cell_emb and the cell
    token ids) and has no n_tags. Say so up front, from both entry points, and change nothing."""
    import json
    import shutil

    import train
    old = tmp_path / "old"
    shutil.copytree(micro_run, old)
    cfg = json.load(open(old / "config.json"))
    del cfg["gpt"]["n_tags"]
    cfg["gpt"].update(cell_emb=True, cell_token_ids=[55, 49], attr_token_ids=[23], code_cells=[-1, 0])
    (old / "config.json").write_text(json.dumps(cfg))
    before = {f: (old / f).read_bytes() for f in os.listdir(old) if (old / f).is_file()}
    with pytest.raises(generate.RunError, match="older nanoloom, whose model held the layout cells.*new run"):
        generate.load_run(str(old))
    with pytest.raises(SystemExit, match="older nanoloom, whose model held the layout cells.*another --train.out_dir"):
        train.main(["tiny_configs/micro.toml", f"--train.out_dir={old}", "--stages=eval"])
    assert {f: (old / f).read_bytes() for f in os.listdir(old) if (old / f).is_file()} == before
    cfg["train"]["data_dir"] = str(tmp_path / "images")  # a folder run of that version:
    #                                                      no world to check, but keys unknown
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(generate.RunError, match="keys this nanoloom does not know .*cell_emb.*new run"):
        generate.load_run(str(old))
