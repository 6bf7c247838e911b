"""Everyday use and scale: image folders, data-parallel training, exact resume, atomic checkpoints."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from PIL import Image
from safetensors.torch import load_file

import data
import generate
import pretrain
import train

MICRO = os.path.join(os.path.dirname(__file__), "..", "tiny_configs", "micro.toml")
ROOT = os.path.join(os.path.dirname(__file__), "..")


# -----------------------------------------------------------------------------
# image folders


def odd_folder(path):
    """Good, grayscale, RGBA, palette, corrupt, truncated and uncaptioned files, captions in metadata.jsonl."""
    path.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path / "good.png")
    Image.new("L", (50, 40), 90).save(path / "grey.png")  # another size and not square
    Image.new("RGBA", (32, 32), (0, 0, 255, 0)).save(path / "clear.png")  # fully transparent: white
    Image.new("P", (16, 16), 3).save(path / "palette.gif")
    (path / "corrupt.png").write_bytes(b"not an image at all")
    Image.new("RGB", (64, 64)).save(path / "whole.png")
    full = (path / "whole.png").read_bytes()
    (path / "truncated.png").write_bytes(full[:len(full) // 2])
    os.remove(path / "whole.png")
    Image.new("RGB", (32, 32)).save(path / "nocaption.png")
    rows = [("good.png", "a red one"), ("grey.png", "a grey one"), ("clear.png", "a clear one"),
            ("palette.gif", "a palette one"), ("corrupt.png", "broken"), ("truncated.png", "cut"),
            ("nocaption.png", ""), ("missing.png", "gone")]
    (path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in rows))
    return path


def test_folder_loader_converts_and_skips(tmp_path):
    f = data.load_folder(str(odd_folder(tmp_path / "imgs")), 32)
    assert f.names == ["good.png", "grey.png", "clear.png", "palette.gif"]
    assert f.images.shape == (4, 32, 32, 3) and f.images.dtype == np.uint8
    assert (f.images[0] == (200, 10, 10)).all() and (f.images[1] == 90).all() and (f.images[2] == 255).all()
    skipped = dict(f.skipped)
    assert set(skipped) == {"corrupt.png", "truncated.png", "nocaption.png", "missing.png"}
    assert "unreadable" in skipped["truncated.png"] and skipped["nocaption.png"] == "no caption"
    assert f.captions[0] == "a red one"


def test_folder_with_sidecar_captions(tmp_path):
    d = tmp_path / "side"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(d / f"{i}.jpg")
        (d / f"{i}.txt").write_text(f"image  number\n{i}")
    f = data.load_folder(str(d), 16)
    assert f.captions == ["image number 0", "image number 1", "image number 2"] and f.images.shape == (3, 16, 16, 3)
    assert data.folder_dev(f.names) == data.folder_dev(list(f.names))  # stable, at least one held out
    assert len(data.folder_dev(f.names)) == 1


def test_folder_with_nothing_usable_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no usable images in .*metadata.jsonl"):
        data.load_folder(str(empty), 32)
    (empty / "bad.png").write_bytes(b"junk")
    (empty / "bad.txt").write_text("a caption")
    with pytest.raises(ValueError, match=r"1 skipped, e.g. bad.png \(unreadable"):
        data.load_folder(str(empty), 32)
    with pytest.raises(SystemExit, match="train.data_dir: no usable images"):
        train.main([MICRO, f"--train.out_dir={tmp_path / 'r'}", f"--train.data_dir={empty}", "--train.p_plan=0",
                    "--sample.think=false"])
    with pytest.raises(train.ConfigError, match="set train.p_plan = 0"):
        train.load_config(MICRO, [f"--train.data_dir={empty}"])


def test_folder_run_end_to_end(tmp_path, capsys, one_thread):
    folder = tmp_path / "mine"
    data.make_folder(str(folder), 48, seed=3)
    Image.new("LA", (20, 30)).save(folder / "extra.png")  # not in metadata.jsonl: ignored
    out = tmp_path / "run"
    train.main([MICRO, f"--train.out_dir={out}", f"--train.data_dir={folder}", "--stages=tokenizer,vq,lm,eval",
                "--train.p_plan=0", "--train.p_direct=0.8", "--sample.think=false", "--train.lm_steps=4"])
    # (the rewards and post stages of a folder run: tests/test_folder.py)
    assert "benchmarks skipped" in capsys.readouterr().out
    report = json.load(open(out / "report.json"))
    assert report["benchmarks"] == {} and report["stages"]["eval"]["images"] >= 1
    assert "parser_agreement" not in report["stages"]["vq"]
    assert os.path.exists(out / "samples_folder.png")
    tok = data.load_tokenizer(str(out / "tokenizer.json"))
    assert tok.token_to_id("circle") is not None and tok.token_to_id("grass") is None  # the captions' words only
    import generate
    with pytest.raises(SystemExit, match="not in the vocabulary: 'colour', 'grass'"):
        generate.main([str(out), "a circle the colour of grass"])


# -----------------------------------------------------------------------------
# data-parallel training and exact resume, on the micro config


@pytest.fixture
def one_thread():
    """One torch thread, as torchrun gives each process: the tests run faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm_ready(src, dst):
    """A run directory holding the micro run's tokenizer and VQ, so that only the lm stage runs."""
    os.makedirs(dst)
    for name in ("tokenizer.json", "vq.safetensors"):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return str(dst)


def lm_losses(run_dir):
    """step -> training loss, the last logged value of each step (a resumed run logs some steps twice)."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r.get("stage") == "lm" and "loss" in r}


def _lm_worker(rank, world, run_dir, port, overrides):
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfgs = train.load_config(MICRO, [f"--train.out_dir={run_dir}", *overrides])
    dist, device = pretrain.dist_setup(cfgs["train"], "cpu")
    train.derive_sizes(cfgs, run_dir)
    metrics = train.Metrics(os.path.join(run_dir, "metrics.jsonl") if dist.master else None)
    model, _ = pretrain.train_lm(cfgs, run_dir, device, metrics, dist, train.resolved_config(cfgs),
                                    train.config_diff)
    generate.save_atomic(model.state_dict(), os.path.join(run_dir, f"rank{rank}.safetensors"))
    if world > 1:
        torch.distributed.destroy_process_group()


EPISODES = ["--train.episode_share=0.5", "--train.episode_examples=64", "--train.episode_batch=2",
            "--train.episode_images=2", "--gpt.block_size=256", "--gpt.ctx_tokens=2", "--gpt.sync_every=1"]


@pytest.mark.parametrize("extra", [[], EPISODES], ids=["pairs", "episodes"])
def test_two_processes_match_one(tmp_path, micro_run, one_thread, extra):
    """2 gloo processes, each with half of every global batch of 8, against 1 process with all of it; with episodes,
    the pair steps leave the interleaved modules without gradients."""
    overrides = ["--train.log_every=1", "--train.lm_steps=6", *extra]
    one, two = lm_ready(micro_run, tmp_path / "one"), lm_ready(micro_run, tmp_path / "two")
    _lm_worker(0, 1, one, None, overrides)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_lm_worker, args=(2, two, port, overrides), nprocs=2)
    r0, r1 = load_file(os.path.join(two, "rank0.safetensors")), load_file(os.path.join(two, "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "the two replicas diverged"
    single = load_file(os.path.join(one, "rank0.safetensors"))
    worst = max((r0[k] - single[k]).abs().max().item() for k in r0)
    assert worst < 1e-5, f"2 processes vs 1: weights differ by {worst:.2e} (tolerance 1e-5: float summation order only)"
    a, b = lm_losses(one), lm_losses(two)
    assert sorted(a) == sorted(b) == list(range(6))
    assert np.allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5, atol=0), (a, b)


def test_interrupted_run_resumes_exactly(tmp_path, micro_run, monkeypatch, capsys, one_thread):
    args = ["--stages=lm", "--train.log_every=1", "--train.ckpt_every=4"]
    ref = lm_ready(micro_run, tmp_path / "ref")
    train.main([MICRO, f"--train.out_dir={ref}", *args])
    run = lm_ready(micro_run, tmp_path / "run")
    real_lr = pretrain.cosine_lr

    def ctrl_c_at_step_7(step, *schedule):
        if step == 7:
            raise KeyboardInterrupt
        return real_lr(step, *schedule)
    monkeypatch.setattr(pretrain, "cosine_lr", ctrl_c_at_step_7)
    with pytest.raises(SystemExit, match="interrupted in the lm stage; run the same command again to resume"):
        train.main([MICRO, f"--train.out_dir={run}", *args])
    monkeypatch.setattr(pretrain, "cosine_lr", real_lr)
    assert os.path.exists(os.path.join(run, pretrain.CKPT)) and not os.path.exists(os.path.join(run, "gpt.safetensors"))
    # the checkpoint refuses another config, naming the difference
    with pytest.raises(SystemExit, match=r"checkpoint of another config \(train.lm_lr: 0.0015 -> 0.001\)"):
        train.main([MICRO, f"--train.out_dir={run}", *args, "--train.lm_lr=0.001"])
    # config.json is rewritten only when a stage finishes, so beside a checkpoint it may still be an older
    # version's (no n_tags, no plan_version): the checkpoint's own config says whether its GPT is older
    with safe_open(os.path.join(run, pretrain.CKPT), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    del cfg["gpt"]["n_tags"]
    del cfg["plan_version"]
    json.dump(cfg, open(os.path.join(run, "config.json"), "w"))
    train.main([MICRO, f"--train.out_dir={run}", *args])
    assert "resuming the lm stage at step 4" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(run, pretrain.CKPT))  # the finished model supersedes it
    a, b = lm_losses(ref), lm_losses(run)
    assert a == b, "the resumed loss curve differs from the uninterrupted one"
    wa, wb = load_file(os.path.join(ref, "gpt.safetensors")), load_file(os.path.join(run, "gpt.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed final weights differ from the uninterrupted run's"


WRITER = """
import sys, time, torch
sys.path.insert(0, {root!r})
import generate
from safetensors.torch import save

def slow_disk(tensors, path, metadata=None):  # writes half the file, then stalls: the kill lands here
    blob = save(tensors, metadata=metadata)
    with open(path, "wb") as f:
        f.write(blob[:len(blob) // 2])
        f.flush()
        print("mid-write", flush=True)
        time.sleep(60)
        f.write(blob[len(blob) // 2:])

generate.save_atomic({{"w": torch.full((100_000,), 1.0)}}, {path!r})
generate.save_file = slow_disk
generate.save_atomic({{"w": torch.full((100_000,), 2.0)}}, {path!r})
"""


def test_kill_mid_write_leaves_the_last_complete_file(tmp_path):
    path = str(tmp_path / "ckpt.safetensors")
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=os.path.abspath(ROOT), path=path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "mid-write"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (load_file(path)["w"] == 1.0).all()  # the previous complete version, untouched
    with pytest.raises(Exception):
        load_file(path + ".tmp")  # what the kill interrupted is corrupt, and was never renamed into place


def test_bench_json(micro_run, capsys, monkeypatch, one_thread):
    import bench
    monkeypatch.setattr("sys.argv", ["bench.py", micro_run, "--json", "--batch", "2", "--threads", "1"])
    bench.main()
    out = json.loads(capsys.readouterr().out)
    g, t = out["generation"], out["training"]
    assert out["matmul_peak_gflops"] > 0 and 0 < t["mfu"] and t["memory"]["peak_mb"] > 0
    assert g["cache"] > 0 and g["cache_guided"] > 0 and g["reference_guided"] > 0 and 0 < g["fraction_of_bound"]
    assert set(out["targets"]) == {"cache_guided_at_least_5x_reference", "guidance_at_most_1.5x_unguided",
                                   "training_at_least_plain_gpt"}
