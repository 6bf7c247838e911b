"""The over-optimisation measurement: where proxy and verifier part, and the stage's table and plot."""
import json
import os
import shutil

from PIL import Image

import overopt
import rewards
import train
from conftest import MICRO


def point(step, proxy, verifier, se=0.01):
    return {"round": 0, "step": step, "proxy": proxy, "proxy_se": se, "verifier": verifier, "verifier_se": se}


def test_proxy_and_verifier_part_where_the_proxy_rises_and_the_verifier_falls_beyond_its_error():
    rising = [point(0, 0.5, 0.6), point(10, 0.6, 0.7), point(20, 0.7, 0.72)]
    assert overopt.parting(rising) is None, "both rise: they have not parted"
    noise = rising + [point(30, 0.75, 0.71)]
    assert overopt.parting(noise) is None, "a fall within the standard error of the drop is noise"
    parted = noise + [point(40, 0.8, 0.65), point(50, 0.85, 0.6)]
    assert overopt.parting(parted) == 4, "the first point below the peak beyond its error, the proxy still rising"
    flat = noise + [point(40, 0.74, 0.65), point(50, 0.8, 0.6)]
    assert overopt.parting(flat) == 5, "where the proxy falls too, they have not parted yet"
    dip = [point(0, 0.8, 0.7), point(10, 0.7, 0.6), point(20, 0.75, 0.55)]
    assert overopt.parting(dip) is None, "a proxy recovering from a dip, still below where the verifier peaked"


def test_overopt_stage_writes_the_table_and_a_plot(micro_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(micro_run, run)
    train.main([MICRO, f"--train.out_dir={run}", "--stages=overopt"])  # micro: 2 rounds x 2 steps, every step
    res = json.load(open(os.path.join(run, "overopt", "overopt.json")))
    assert [p["step"] for p in res["points"]] == [0, 1, 2, 3, 4] and res["reward"] == rewards.DEFAULT
    assert all(0 <= p["verifier"] <= 1 and p["proxy_se"] >= 0 for p in res["points"])
    md = open(os.path.join(run, "overopt", "overopt.md")).read()
    assert "| LoRA step | round | proxy | verifier |" in md and md.count("\n| ") == 6 and "part" in md
    img = Image.open(os.path.join(run, "overopt", "overopt.png")).convert("RGB")
    colours = {c for _, c in img.getcolors(1 << 16)}
    assert img.size == (640, 400) and {(31, 119, 180), (214, 39, 40)} <= colours, "both lines drawn"
    assert json.load(open(os.path.join(run, "report.json")))["stages"]["overopt"]["points"] == 5
