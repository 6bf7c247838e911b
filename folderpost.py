"""
Post-training on your own image folder: a reward learnt from the folder, the weakness report of its
caption words, and the post stage. train.py's rewards and post stages call it for a folder run
(train.data_dir); nothing here reads the shapes world's rules, except `judge`, after training, and only
for the demo folder (data.py --make-folder), whose metadata.jsonl holds each caption's scene.

    python data.py --make-folder out/my_images --n 2000
    python train.py tiny_configs/folder.toml                         # every stage, rewards and post included
    python train.py tiny_configs/folder.toml --train.data_dir=path/to/yours --train.out_dir=out/yours

The reward (rewards stage): vqascore (vqascore.py, the default post reward) and clip (heads.CLIPHead),
trained on the folder's training images. Negatives: each caption with one word swapped for another word of
the folder's vocabulary that the caption lacks, used as it is used (swap_table), another image's
caption, and the caption on the image of the most similar other caption. The held-out images give each
reward's calibration: how often it puts the true caption above each kind of negative (AUC).

The post stage: the held-out images are split in two. On the first half the base model draws each
caption, the reward scores the drawings, and the weakness report ranks caption words by that score. Prompts
are the training captions, a post.focus share of them holding one of the post.target_top weakest words
(post.strategy = targeted). post.samples samples each, weights from the reward (post.weighting), the LoRA
fine-tune of posttrain.finetune with the folder's own pretraining data against drift. Then the second half
of the held-out captions is drawn before and after with the same seeds and scored by every reward: the one
that trained (post.reward) and the ones it did not (the hacking check); on the demo folder also by the exact
verifier.
"""

import dataclasses
import os
import re
from types import SimpleNamespace

import numpy as np
import torch

import data
import heads
import parser
import posttrain
import rewards
import stats
import vqascore
import world
from generate import RunError, load_run, save_atomic, save_grid, write_json
from model import add_lora, lora_state_dict, merge_lora

FOLDER_HEADS = ("vqascore", "clip")  # the heads a folder run trains
CHECKS = ("vqascore", "clip", "self")  # rewards scored before and after; those post.reward lacks are held out
MIN_HELD_OUT = 4  # held-out images: half for the weakness report, half for before/after
NEGATIVES = ("swap", "other_caption", "other_image")  # the kinds of negative pair, as reward_pairs makes them


# -----------------------------------------------------------------------------
# the reward's pairs


WORD = re.compile(r"\w+(?:-\w+)*")  # a word as the tokenizer splits it (train_tokenizer), punctuation left out


def caption_words(caption):
    """A caption's words, lower-cased as the tokenizer reads them, punctuation dropped."""
    return WORD.findall(caption.lower())


def swap_table(captions, top=4, most=2000):
    """word -> up to `top` other words of the captions' vocabulary used most like it: the cosine of their
    counts of neighbouring words (the word before, the word after) is highest and above 0. Words used alike
    are the ones a caption could have said instead (a colour for a colour, a place for a place), so a swap
    makes a plausible caption that is false. Only the `most` most common words take part (memory)."""
    contexts, count = {}, {}
    for c in set(captions):
        w = ["<s>"] + caption_words(c) + ["</s>"]
        for i in range(1, len(w) - 1):
            ctx = contexts.setdefault(w[i], {})
            for key in ("<" + w[i - 1], ">" + w[i + 1]):
                ctx[key] = ctx.get(key, 0) + 1
            count[w[i]] = count.get(w[i], 0) + 1
    words = sorted(count, key=lambda x: (-count[x], x))[:most]
    keys = sorted({k for w in words for k in contexts[w]})
    col = {k: j for j, k in enumerate(keys)}
    m = np.zeros((len(words), len(keys)), np.float32)  # (W, contexts)
    for i, w in enumerate(words):
        for k, v in contexts[w].items():
            m[i, col[k]] = v
    m /= np.linalg.norm(m, axis=1, keepdims=True).clip(min=1e-9)
    sim = m @ m.T  # (W, W) cosine
    np.fill_diagonal(sim, 0)
    out = {}
    for i, w in enumerate(words):
        best = [j for j in np.argsort(-sim[i], kind="stable")[:top] if sim[i, j] > 0]
        if best:
            out[w] = [words[j] for j in best]
    return out


def word_swap(caption, table, rng):
    """The caption with one word replaced by a word of table[word] that the caption lacks (lower-cased,
    punctuation glued back), or None when no word of it can be swapped."""
    words = caption_words(caption)
    have = set(words)
    options = [(i, [v for v in table.get(w, ()) if v not in have]) for i, w in enumerate(words)]
    options = [(i, vs) for i, vs in options if vs]
    if not options:
        return None
    i, vs = options[rng.integers(len(options))]
    toks = re.findall(r"\w+(?:-\w+)*|[^\w\s]+", caption.lower())  # words and punctuation, in order
    k = [j for j, t in enumerate(toks) if WORD.fullmatch(t)][i]
    toks[k] = vs[rng.integers(len(vs))]
    return re.sub(r" ([,.;:!?])", r"\1", " ".join(toks))




def check_folder(folder, train, dev):
    """Bad folders for a reward stop here, with what to do about it."""
    caps = {folder.captions[i] for i in train}
    if len(caps) < 2:
        raise RunError(f"every one of the {len(train)} training captions of the folder is the same "
                       f"({next(iter(caps))!r}): a reward learns from captions that differ, and there are no "
                       "negatives to learn from. Write captions that say what each image shows")
    if len(dev) < MIN_HELD_OUT:
        raise RunError(f"the folder holds out {len(dev)} of its {len(folder.names)} images (a tenth): too few to "
                       f"hold some out for the reward's calibration and the before/after (at least {MIN_HELD_OUT}); "
                       f"add images, {10 * MIN_HELD_OUT} or more")


def nearest_other(captions):
    """For each caption, the index of the most similar other one (most shared words over words in either,
    the Jaccard index) whose text differs; -1 if every other caption is the same text."""
    words = sorted({w for c in captions for w in caption_words(c)})
    col = {w: j for j, w in enumerate(words)}
    m = np.zeros((len(captions), len(words)), np.float32)  # (N, W) which words each caption holds
    for i, c in enumerate(captions):
        m[i, [col[w] for w in caption_words(c)]] = 1
    text = np.array(captions, dtype=object)
    out = np.full(len(captions), -1)
    for a in range(0, len(captions), 512):  # (512, N) at a time
        inter = m[a:a + 512] @ m.T
        jac = inter / (m[a:a + 512].sum(1, keepdims=True) + m.sum(1) - inter).clip(min=1)
        jac[text[a:a + 512, None] == text[None, :]] = -1  # the same text (the caption itself too) is no negative
        best = jac.argmax(1)
        out[a:a + 512] = np.where(jac[np.arange(len(best)), best] >= 0, best, -1)
    return out


def reward_pairs(captions, rng, table, swaps):
    """Pairs for images 0..N-1 with captions: (image i, its caption, 1); `swaps` word swaps of it (0), or
    another caption where no word can be swapped; (i, another caption, 0); (the image of the most similar
    other caption, i's caption, 0). Returns (image index, caption, label, group = i, kind) arrays; kind
    indexes ("true",) + NEGATIVES."""
    n, near = len(captions), nearest_other(captions)
    rows = []

    def other(i):
        for _ in range(100):  # a caption of another text (check_folder made sure there is one)
            j = int(rng.integers(n))
            if captions[j] != captions[i]:
                return captions[j]
        return next(c for c in captions if c != captions[i])
    for i, c in enumerate(captions):
        rows.append((i, c, 1, i, 0))
        for _ in range(swaps):
            s = word_swap(c, table, rng)
            rows.append((i, s, 0, i, 1) if s else (i, other(i), 0, i, 2))
        rows.append((i, other(i), 0, i, 2))
        if near[i] >= 0:
            rows.append((int(near[i]), c, 0, i, 3))
    image, caption, label, group, kind = zip(*rows)
    return np.array(image), list(caption), np.array(label, np.float32), np.array(group), np.array(kind)


# -----------------------------------------------------------------------------
# the rewards stage


def train_reward(cfgs, run_dir, device, folder, train, dev, log):
    """vqascore and clip trained on the folder's training images, saved as RUN_DIR/rewards.safetensors, then
    calibrated on the held-out ones. Returns (figures, the calibration as a text table)."""
    check_folder(folder, train, dev)
    tc, rc = cfgs["train"], cfgs["rewards"]
    _, tokenizer, _, vq, _ = load_run(run_dir, device)
    rng = np.random.default_rng([tc.seed, 31])
    torch.manual_seed(tc.seed)
    caps = [folder.captions[i] for i in train]
    table = swap_table(caps)
    image, caption, label, group, kind = reward_pairs(caps, rng, table, rc.vqascore_edits)
    swapped = float((kind == 1).sum() / max(1, len(caps) * rc.vqascore_edits))
    if swapped == 0:
        print("the captions' vocabulary is too small for word-swap negatives (no word has another used like it "
              "that a caption lacks): other captions are the negatives instead")
    imgs = heads.vq_round_trip_some(vq, folder.images[train], rng.random(len(train)) < rc.p_vq)
    net = heads.Heads(rc, tokenizer.get_vocab_size(), vq.cfg, FOLDER_HEADS).to(device).train()
    ids = heads.padded_text_ids(tokenizer, caption, rc.max_text)
    figures = vqascore.train(net.vqascore, rc, vq, (imgs, ids, label, image, group), tc.seed, device, log)

    # clip: each image against the batch's captions and one hard negative each (a swap where there is one)
    neg = {}
    for g, c, k in zip(group, caption, kind):
        if k in (1, 2):
            neg.setdefault(g, c)
    x = data.to_float(imgs)
    cap_ids = heads.padded_text_ids(tokenizer, caps, rc.max_text)
    neg_ids = heads.padded_text_ids(tokenizer, [neg[i] for i in range(len(caps))], rc.max_text)
    gen = torch.Generator().manual_seed(tc.seed)

    def clip_loss(step):
        i = torch.randint(0, len(caps), (min(rc.batch, len(caps)),), generator=gen)
        return heads.clip_contrastive(net.clip, x[i].to(device), cap_ids[i].to(device), neg_ids[i].to(device))[0]
    figures["clip_train_loss"] = heads._fit("clip", net.clip.parameters(), clip_loss, rc.clip_steps, rc, log)
    net.eval()
    save_atomic(net.state_dict(), os.path.join(run_dir, heads.HEADS_FILE), heads.heads_metadata(net))
    cal = calibrate(run_dir, device, folder, dev[:rc.calib_examples], table, rc.vqascore_edits, tc.seed)
    figures.update(pairs=len(label), swap_share=round(swapped, 3),
                   swap_words=len(table), calibration=cal)
    return figures, calibration_table(cal)


def calibrate(run_dir, device, folder, held_out, table, swaps, seed):
    """Each of CHECKS on held-out images: the true caption against each kind of negative, across images
    (pooled AUC) and within an image's pairs, each with its bootstrap standard error (rewards.ranking)."""
    rng = np.random.default_rng([seed, 32])
    caps = [folder.captions[i] for i in held_out]
    image, caption, label, group, kind = reward_pairs(caps, rng, table, swaps)
    imgs = folder.images[held_out][image]
    out = {"images": len(held_out), "pairs": len(label)}
    for name in CHECKS:
        s = rewards.score(rewards.load_reward(run_dir, name, device), imgs, caption, device)
        out[name] = {}
        for k, neg in enumerate(NEGATIVES, 1):
            m = (kind == 0) | (kind == k)  # the true pairs and this kind of negative
            if (kind == k).any():
                out[name][neg] = rewards.ranking(s[m], label[m], group[m], np.random.default_rng([seed, 33]))
    return out


def calibration_table(cal):
    fmt = lambda v, se: "-" if v is None else f"{v:.3f} +- {se:.3f}" if se is not None else f"{v:.3f}"
    lines = [f"{cal['images']} held-out images, {cal['pairs']} pairs: AUC of the true caption against each kind of "
             "negative, across images and within an image's pairs (+- bootstrap standard error)",
             f"{'reward':<10}{'negative':<15}{'across':>18}{'within':>18}"]
    for name in CHECKS:
        for k, (neg, r) in enumerate(cal[name].items()):
            lines.append(f"{name if k == 0 else '':<10}{neg:<15}{fmt(r['across'], r['across_se']):>18}"
                         f"{fmt(r['within'], r['within_se']):>18}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the weakness report of words


def word_weakness(captions, scores, min_captions=3):
    """Caption words ranked by the mean reward of the samples of the captions that hold them, weakest first:
    [{"word", "captions", "mean", "se"}], words held by at least min_captions captions."""
    by_word = {}
    for c, s in zip(captions, scores):
        for w in set(caption_words(c)):
            by_word.setdefault(w, []).append(float(s))
    rows = [{"word": w, "captions": len(v), "mean": float(np.mean(v)), "se": float(np.std(v) / np.sqrt(len(v)))}
            for w, v in by_word.items() if len(v) >= min_captions]
    return sorted(rows, key=lambda r: (r["mean"], r["word"]))


def weakness_table(rows, overall, top=12):
    lines = [f"caption words by the reward of the model's drawings of held-out captions that hold them "
             f"(all: {overall:.3f}), weakest first",
             f"{'word':<14}{'captions':>9}{'mean':>8}{'+-':>7}"]
    return "\n".join(lines + [f"{r['word']:<14}{r['captions']:>9}{r['mean']:>8.3f}{r['se']:>7.3f}"
                              for r in rows[:top]])


def choose_prompts(captions, weak, n, focus, rng):
    """Indices of n training captions: a `focus` share of them holding one of the weak words (when any does),
    the rest drawn from all."""
    holding = [i for i, c in enumerate(captions) if weak & set(caption_words(c))]
    k = round(n * focus) if holding else 0
    return [holding[j] for j in rng.integers(0, len(holding), k)] + rng.integers(0, len(captions), n - k).tolist()


# -----------------------------------------------------------------------------
# the post stage


def draw(gpt, vq, vocab, tokenizer, captions, k, sample_cfg, seed, batch):
    """k samples of every caption (posttrain.self_generate): the same seed gives the same noise before and after."""
    prompts = [SimpleNamespace(prompt=c) for c in captions]
    return posttrain.self_generate(gpt, vq, vocab, tokenizer, prompts, k, sample_cfg, seed, batch)


def paired(before, after, caption):
    """Means before and after (the same captions and seeds) and the standard error of the paired difference,
    over captions (a caption's samples averaged first: they are not independent)."""
    d = np.asarray(after, float) - np.asarray(before, float)
    caption = np.asarray(caption)
    per = np.array([d[caption == c].mean() for c in np.unique(caption)])
    return {"before": float(np.mean(before)), "after": float(np.mean(after)), "change": float(d.mean()),
            "change_se": stats.paired_se(per)}


def scene_spec(scene):
    """The demo folder's caption as the verifier reads it: every object, its attributes and its cell, no more."""
    return world.Spec(tuple(world.Req(o.shape, o.colour, o.size, 1, o.row, o.col) for o in scene.objects),
                      total=len(scene.objects))


def judge(images, names, scenes):
    """After training, on the demo folder only: the exact verifier on drawings of captions (their file names):
    (share of the caption's clauses that hold, passes) per drawing."""
    parsed = parser.parse_batch(np.stack(images))
    specs = [scene_spec(scenes[n]) for n in names]
    return (np.array([world.clause_share(p, s) for p, s in zip(parsed, specs)]),
            np.array([world.passes(p, s) for p, s in zip(parsed, specs)], float))


def run(cfgs, run_dir, device, log, folder, train, dev):
    """The post stage of a folder run. Returns (figures, report section, text tables)."""
    check_folder(folder, train, dev)
    tc, pc, sc = cfgs["train"], cfgs["post"], cfgs["sample"]
    if not os.path.exists(os.path.join(run_dir, heads.HEADS_FILE)):
        raise RunError(f"the post stage of a folder run needs its reward: missing {run_dir}/{heads.HEADS_FILE}; "
                       "run --stages=rewards first")
    _, tokenizer, vocab, vq, gpt = load_run(run_dir, device)
    rng = np.random.default_rng([tc.seed, 34])
    torch.manual_seed(tc.seed)
    weak_half, test_half = dev[0::2], dev[1::2][:tc.bench_prompts]
    reward = rewards.load_reward(run_dir, pc.reward, device)
    checks = {name: rewards.load_reward(run_dir, name, device) for name in CHECKS}
    scored = lambda fn, s, caps: rewards.score(fn, s["image"], [caps[i] for i in s["example"]], device)

    # the weakness report of words, on the first half of the held-out captions
    weak_caps = [folder.captions[i] for i in weak_half]
    s = draw(gpt, vq, vocab, tokenizer, weak_caps, pc.eval_samples, sc, tc.seed, tc.eval_batch)
    r = scored(reward, s, weak_caps)
    words = word_weakness([weak_caps[i] for i in s["example"]], r)
    weak = {w["word"] for w in words[:pc.target_top] if w["mean"] < r.mean()} if pc.strategy == "targeted" else set()

    test_caps = [folder.captions[i] for i in test_half]
    before = draw(gpt, vq, vocab, tokenizer, test_caps, pc.eval_samples, sc, tc.seed + 1, tc.eval_batch)

    # one round: K samples of training captions, weights from the reward alone, the LoRA fine-tune
    params = add_lora(gpt, "post", tuple(pc.lora_targets.split(",")), pc.lora_r, pc.lora_alpha, pc.lora_dropout)
    train_caps = [folder.captions[i] for i in train]
    chosen = choose_prompts(train_caps, weak, pc.prompts, pc.focus, rng)
    prompts = [train_caps[j] for j in chosen]
    samples = draw(gpt, vq, vocab, tokenizer, prompts, pc.samples, sc, tc.seed * 1000 + 7, tc.eval_batch)
    r_train = scored(reward, samples, prompts)
    w = posttrain.sample_weights(r_train, samples["example"], pc.weighting, pc.beta, pc.threshold)
    drift = data.folder_data(folder, train[:50 * pc.batch], tokenizer, vq, device)
    fit = posttrain.finetune(gpt, params, samples, w, pc, vocab, device, rng,
                             posttrain.drift_batches(drift, tc, pc.batch, rng, vocab, device))
    if not fit["kept"]:
        print(f"[post] no sample was kept by post.weighting={pc.weighting} (post.threshold={pc.threshold}): the adapter "
              "did not train; the reward's scale may sit below the threshold: try post.weighting=best")
    save_atomic(lora_state_dict(gpt, "post"), os.path.join(run_dir, "lora_post.safetensors"))
    write_json(dataclasses.asdict(pc), os.path.join(run_dir, "lora_post.json"))
    merge_lora(gpt)
    after = draw(gpt, vq, vocab, tokenizer, test_caps, pc.eval_samples, sc, tc.seed + 1, tc.eval_batch)
    log(stage="post", reward=float(r_train.mean()), **fit)

    held = {name: paired(scored(fn, before, test_caps), scored(fn, after, test_caps), before["example"])
            for name, fn in checks.items()}
    trained = {n for _, n in rewards.parse_spec(pc.reward)}
    rose = lambda f: f["change"] > 2 * f["change_se"]
    round_figs = {"prompts": len(prompts), "samples": len(r_train), "weak_words": sorted(weak),
                  "reward": float(r_train.mean()), "reward_weighted": float((w * r_train).sum() / max(w.sum(), 1e-9)),
                  **fit}
    post = {"config": dataclasses.asdict(pc), "reward": pc.reward, "held_out_captions": len(test_caps),
            "samples_per_caption": pc.eval_samples, "seed": tc.seed, "round": round_figs, "rewards": held,
            "weakness": words[:24]}
    checked_by = [n for n in CHECKS if n not in trained]
    post["hacking"] = {"reward_rose": all(rose(held[n]) for n in trained if n in held),
                       "held_out_rose": {n: rose(held[n]) for n in checked_by}}

    # after training, the demo folder only: the exact verifier
    scenes = data.folder_scenes(cfgs["train"].data_dir)
    marks = None
    if scenes is None:
        post["verifier"] = "not judged: only the demo folder (python data.py --make-folder) has scenes to check"
        print(f"[post] verifier {post['verifier']}")
    else:
        names = [folder.names[test_half[i]] for i in before["example"]]
        (vb, pb), (va, pa) = judge(before["image"], names, scenes), judge(after["image"], names, scenes)
        vr, _ = judge(samples["image"], [folder.names[train[chosen[i]]] for i in samples["example"]], scenes)
        post["verifier"] = {"clause_share": paired(vb, va, before["example"]),
                            "pass_rate": paired(pb, pa, before["example"]),
                            "round": float(vr.mean()), "round_weighted": float((w * vr).sum() / max(w.sum(), 1e-9))}
        post["hacking"]["verifier_rose"] = rose(post["verifier"]["clause_share"])
        marks = (pb, pa)

    # the picture: 8 held-out captions, one sample each, before (top) and after (bottom), the same seeds
    first = list(range(0, min(8, len(test_caps)) * pc.eval_samples, pc.eval_samples))
    save_grid([before["image"][i] for i in first] + [after["image"][i] for i in first],
              [f"before: {test_caps[before['example'][i]]}" for i in first]
              + [f"after: {test_caps[after['example'][i]]}" for i in first],
              os.path.join(run_dir, "post_samples_folder.png"), cols=len(first),
              marks=None if marks is None else [bool(m[i]) for m in marks for i in first])  # green: the verifier passes
    tables = {"Weak words (the post reward on the model's drawings of held-out captions)":
              weakness_table(words, float(r.mean())), "Post-training on the folder (held-out captions)": post_table(post)}
    figures = {**{f"{n}_change": d["change"] for n, d in held.items()}, "kept": fit["kept"],
               **({} if isinstance(post["verifier"], str) else
                  {"verifier_change": post["verifier"]["clause_share"]["change"]})}
    return figures, post, tables


def post_table(post):
    """The before/after of a folder post stage as text: every reward, the verifier on the demo folder."""
    f = lambda d: (f"{d['before']:.3f} -> {d['after']:.3f}   change {d['change']:+.3f} "
                   f"[{d['change'] - 1.96 * d['change_se']:+.3f}, {d['change'] + 1.96 * d['change_se']:+.3f}]")
    trained = {n for _, n in rewards.parse_spec(post["reward"])}
    lines = [f"{post['held_out_captions']} held-out captions x {post['samples_per_caption']} samples, the same seeds "
             f"before and after; change with its 95% interval (paired); seed {post['seed']}"]
    for name, d in post["rewards"].items():
        lines.append(f"{name:<10}{'(trained on)' if name in trained else '(held out)':<14}{f(d)}")
    v = post["verifier"]
    if isinstance(v, str):
        lines.append(f"verifier  {v}")
    else:
        lines.append(f"{'verifier':<10}{'clauses':<14}{f(v['clause_share'])}")
        lines.append(f"{'verifier':<10}{'passes':<14}{f(v['pass_rate'])}")
        lines.append(f"the round's samples by the verifier: {v['round']:.3f}, as the reward weighted them "
                     f"{v['round_weighted']:.3f}")
    h = post["hacking"]
    lines.append("hacking check: the reward " + ("rose" if h["reward_rose"] else "did not rise") + "; "
                 + ", ".join(f"{n} {'rose' if r else 'did not rise'}" for n, r in h["held_out_rose"].items())
                 + ("" if "verifier_rose" not in h else
                    f", the verifier {'rose' if h['verifier_rose'] else 'did not rise'}"))
    return "\n".join(lines)
