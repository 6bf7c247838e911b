"""
The post stage: post-training on the model's own samples ("multimodal RWR", docs/papers.md), from a
trained run to a LoRA adapter and the benchmarks before and after. Entry point: `run`.

One round:
  1. prompts from a strategy (targeting.py): `broad` (the pretraining mix), `aligned` (the benchmarks' categories in
     the benchmarks' proportions), or `targeted` (aimed by the weakness report on dev prompts at the
     colour-shape compositions and categories the model passes sometimes but not reliably, dense prompts by
     their share of facts, and at the attribute values that fail most; skipped when there is none);
     always from the "train" split, so never a benchmark (or dev) prompt;
  2. K samples per prompt from the current model (plan text, then the image it draws by itself);
  3. a reward per sample (default rewards.DEFAULT), a black box: nothing else scores the samples in training;
  4. weights w_i from the rewards alone (`best_above`, the default: each prompt's best sample if its reward
     reaches post.threshold; `threshold`, `rwr`, `exp`, `best`, or `uniform` = plain self-training);
  5. LoRA fine-tuning on those samples with
        loss_i = alpha_text * CE(plan tokens of sample i) + alpha_image * CE(image tokens of sample i),
        loss   = mean over a mini-batch of w_i * loss_i      (w normalised to mean 1 over the kept samples)
     plus pretrain_weight * the pretraining loss on pretraining data, against drift (Lee et al. 2023).
After training, `judge` runs the exact verifier on the rounds' samples, to report them and to watch for
reward hacking; it never feeds back into the weights.

    python train.py tiny_configs/shapes_cpu.toml --stages=post               # after the pretraining stages
    python train.py tiny_configs/shapes_cpu.toml --stages=post --post.weighting=uniform --train.out_dir=...
"""

import dataclasses
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

import data
import evaluate
import parser
import rewards
import targeting
import world
from data import Vocab, build_sequence
from generate import RunError, SampleConfig, decode_images, generate, load_run, read_json, save_atomic, write_json
from model import add_lora, cosine_lr, lora_state_dict, merge_lora, token_ce, unmerge_lora

WEIGHTINGS = ("best_above", "rwr", "exp", "best", "threshold", "uniform")


@dataclass
class PostConfig:
    rounds: int = 1  # generate -> score -> fine-tune cycles; each round samples from the updated model
    prompts: int = 256  # prompts per round
    samples: int = 8  # K samples per prompt: more give a dense prompt's best sample a better chance to be right
    plan_temperature: float = 1.0  # plan tokens of the self-generated samples (sample.text_temperature is for
    #                                evaluation): weighting samples of a sharpened pi^(1/T) would also collapse
    #                                what the prompt leaves open (layout, size)
    strategy: str = "targeted"  # broad | aligned | targeted
    reward: str = rewards.DEFAULT  # reward name or weighted sum, e.g. "vqascore + 0.5*aesthetic" (see rewards.py)
    weighting: str = "best_above"  # best_above | rwr | exp | best | threshold | uniform (see sample_weights)
    threshold: float = 0.5  # best_above and threshold keep rewards >= this, on the reward's own scale (0.5: a
    #                         probability that the image shows the prompt, as vqascore gives, above even odds)
    beta: float = 0.1  # temperature of rwr and exp: smaller trusts the reward's ranking more
    alpha_text: float = 1.0  # weight of the plan (text) tokens' loss
    alpha_image: float = 1.0  # weight of the image tokens' loss
    pretrain_weight: float = 1.0  # weight of a loss on pretraining data, against drift (0 = off): without it the
    #                              categories a round's prompts rarely name are forgotten
    null_prob: float = 0.1  # samples trained with the null condition, so that the adapter also moves the unguided
    #                         branch: guidance amplifies any gap that opens between the two
    steps: int = 60  # fine-tuning steps per round
    batch: int = 32  # samples per fine-tuning step
    lr: float = 1e-3  # adapter learning rate (constant after the warm-up)
    warmup: int = 10  # steps of linear learning-rate warm-up
    grad_clip: float = 1.0  # gradient norm clip of the adapter
    lora_r: int = 8  # adapter rank
    lora_alpha: float = 16.0  # adapter scaling is lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the adapter branch only
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # Linear layers that get adapters
    focus: float = 0.5  # targeted: share of category prompts that must name one of the most-failed attribute values
    composition_share: float = 0.5  # targeted: share of the non-anchor prompts that name a weak composition
    #                                 of the weakness report (all of them when no category is weak)
    anchor: float = 0.25  # targeted: share of prompts drawn from every benchmark category (as `aligned`), so that a
    #                       round also imitates the model's right samples of what it already draws well
    target_top: int = 2  # targeted: aim only at this many weakest categories, and as many weakest compositions, the
    #                      model passes sometimes (0 = all): spread over all, each gets too few good samples to move
    weak_below: float = 0.8  # targeted: aim only at categories and compositions passed less often than this on dev
    #                          (and at least 5%); with none, post-training is skipped
    eval_samples: int = 4  # after post-training: samples per benchmark prompt (as train.bench_samples)


def config_rules(pc):
    """[post] values that type-check but cannot work: (holds, message) pairs, checked before any work."""
    return [
        (pc.strategy in targeting.STRATEGIES,
         f"post.strategy={pc.strategy!r}: expected one of {', '.join(targeting.STRATEGIES)}"),
        (pc.weighting in WEIGHTINGS,
         f"post.weighting={pc.weighting!r}: expected one of {', '.join(WEIGHTINGS)}"),
        (0 <= pc.null_prob <= 1 and 0 <= pc.focus <= 1 and 0 <= pc.composition_share <= 1 and 0 <= pc.anchor < 1,
         "post.null_prob, post.focus and post.composition_share must lie in [0, 1], post.anchor in [0, 1)"),
        (pc.plan_temperature >= 0, "post.plan_temperature must be >= 0 (0 = greedy plans)"),
        (pc.target_top >= 0, "post.target_top must be >= 0 (0 = every category)"),
        (0 < pc.weak_below <= 1, "post.weak_below must lie in (0, 1]"),
        (pc.warmup >= 1 and pc.grad_clip > 0, "post.warmup must be >= 1 and post.grad_clip > 0"),
        (min(pc.rounds, pc.prompts, pc.samples, pc.steps, pc.batch, pc.lora_r, pc.eval_samples) >= 1,
         "post.rounds, prompts, samples, steps, batch, lora_r and eval_samples must be >= 1"),
        (pc.beta > 0 and pc.lr > 0 and min(pc.alpha_text, pc.alpha_image, pc.pretrain_weight) >= 0
         and pc.alpha_text + pc.alpha_image > 0,
         "post.beta and post.lr must be > 0; post.alpha_text, alpha_image, pretrain_weight >= 0, not both alphas 0"),
    ]


# -----------------------------------------------------------------------------
# self-generated samples


def self_generate(gpt, vq, vocab, tokenizer, examples, k, sample_cfg: SampleConfig, seed, batch):
    """k samples of every example from the current model. Returns a dict of lists, one entry per sample:
    example index, prompt/plan/code ids (codes None when no image was drawn) and the decoded image."""
    jobs = [(i, ex) for i, ex in enumerate(examples) for _ in range(k)]
    ids = [data.encode_text(tokenizer, ex.prompt) for ex in examples]
    out = {"example": [], "prompt": [], "plan": [], "codes": [], "image": [],
           "format": "plan" if sample_cfg.think else "direct"}  # how sample_batch rebuilds them for training
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        samples = generate(gpt, vocab, [ids[i] for i, _ in chunk], sample_cfg, seed=seed + start)
        for (i, _), s, img in zip(chunk, samples, decode_images(vq, samples)):
            out["example"].append(i)
            out["prompt"].append(ids[i])
            out["plan"].append(s["plan"])
            out["codes"].append(s["codes"])
            out["image"].append(img)
    return out


def verifier_scores(images, examples, example_index):
    """The exact verifier on each sample: world.clause_share of the parsed image, 1.0 exactly when it passes;
    graded, so that a round on dense prompts still shows whether its samples got better."""
    scenes = parser.parse_batch(np.stack(images))
    return np.array([world.clause_share(s, examples[i].spec) for s, i in zip(scenes, example_index)])


# -----------------------------------------------------------------------------
# weights


def best_of_group(r, g):
    """1 for the highest reward of each group (the first on ties), else 0."""
    w = np.zeros_like(r)
    for k in np.unique(g):
        m = np.nonzero(g == k)[0]
        w[m[np.argmax(r[m])]] = 1.0
    return w


def sample_weights(rewards, group, scheme, beta=0.1, threshold=0.5):
    """Rewards (N,) and each sample's prompt index (N,) -> weights (N,) >= 0, mean 1 over the samples
    with weight > 0 (so the learning rate means the same under every scheme).
        best_above 1 for the best sample of each prompt if its reward >= threshold, else 0: best-of-K where
                   the reward believes the best; a prompt it believes none of teaches nothing
        rwr        softmax(r / beta) within each prompt's group: prompts count equally, better samples more
        exp        exp(r / beta) over all samples: prompts with high rewards count more
        best       1 for the best sample of each prompt (RAFT / best-of-K), else 0
        threshold  1 where r >= threshold, else 0
        uniform    1 for every sample: plain self-training, the control"""
    r = np.asarray(rewards, dtype=np.float64)
    g = np.asarray(group)
    if scheme == "uniform":
        w = np.ones_like(r)
    elif scheme == "best_above":
        w = best_of_group(r, g) * (r >= threshold)
    elif scheme == "threshold":
        w = (r >= threshold).astype(np.float64)
    elif scheme == "exp":
        w = np.exp((r - r.max()) / beta)  # shifted for stability; the normalisation below removes the shift
    elif scheme == "best":
        w = best_of_group(r, g)
    elif scheme == "rwr":
        w = np.zeros_like(r)
        for k in np.unique(g):
            m = np.nonzero(g == k)[0]
            e = np.exp((r[m] - r[m].max()) / beta)
            w[m] = e / e.sum()
    else:
        raise ValueError(f"unknown weighting {scheme!r}; choose one of {', '.join(WEIGHTINGS)}")
    kept = w > 0
    return w / w[kept].mean() if kept.any() else w


# -----------------------------------------------------------------------------
# the weighted loss on both modalities


def sample_batch(samples, rows, vocab: Vocab, device, nulls=None):
    """Samples -> a data.Batch, as the pretraining batches: <bos> prompt <think> plan <boi> codes <eoi> <eos>
    (without <think> and plan for samples drawn without one), loss on everything after the prompt; rows where nulls is True get the null condition (image tokens only),
    as in pretraining."""
    nulls = [False] * len(rows) if nulls is None else nulls
    seqs = [build_sequence(samples["format"], vocab, samples["prompt"][i], samples["plan"][i],
                           samples["codes"][i], null=bool(n))
            for i, n in zip(rows, nulls)]
    return data.collate(seqs, vocab, device)


def per_sample_losses(model, batch):
    """Mean cross-entropy of each sample's text targets (<think>, plan, <boi>, <eoi>, <eos>) and of its
    image tokens: two tensors (B,)."""
    ce = token_ce(model(batch.x, patch=batch.patch, tags=batch.tags), batch.y)  # (B, T)
    parts = []
    for m in (data.TEXT, data.IMAGE):
        mask = batch.weight * (batch.modality == m)
        parts.append((ce * mask).sum(1) / mask.sum(1).clamp(min=1))
    return parts


def weighted_loss(model, batch, w, alpha_text, alpha_image):
    """mean_i w_i * (alpha_text * CE_text_i + alpha_image * CE_image_i); also the unweighted parts."""
    text, image = per_sample_losses(model, batch)
    loss = (w * (alpha_text * text + alpha_image * image)).mean()
    return loss, {"text": text.mean().item(), "image": image.mean().item()}


def mean_token_loss(model, batch):
    """The pretraining loss of a batch: mean cross-entropy over its target tokens (the anti-drift term)."""
    ce = token_ce(model(batch.x, patch=batch.patch, tags=batch.tags), batch.y)  # (B, T)
    return (ce * batch.weight).sum() / batch.weight.sum()


def finetune(model, params, samples, weights, pc: PostConfig, vocab, device, rng, drift_batch=None, hook=None):
    """pc.steps AdamW steps on the LoRA parameters over the samples with weight > 0 (drawn without
    replacement, reshuffled each pass). drift_batch() gives the batches of the pretraining term; hook(step),
    if given, is called after each step with the model in eval mode. Returns the mean loss figures."""
    rows = [i for i in np.nonzero(np.asarray(weights) > 0)[0] if samples["codes"][i] is not None]
    if not rows:
        return {"loss": float("nan"), "text": float("nan"), "image": float("nan"), "kept": 0}
    opt = torch.optim.AdamW(params, lr=pc.lr, weight_decay=0.0)
    w_all = torch.tensor(weights, dtype=torch.float32, device=device)
    order, logs = [], []
    model.train()
    for step in range(pc.steps):
        if len(order) < pc.batch:
            order += list(rng.permutation(rows))
        pick, order = order[:pc.batch], order[pc.batch:]
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, pc.lr, pc.warmup, pc.steps, pc.lr)
        nulls = rng.random(len(pick)) < pc.null_prob
        loss, parts = weighted_loss(model, sample_batch(samples, pick, vocab, device, nulls),
                                    w_all[pick], pc.alpha_text, pc.alpha_image)
        if pc.pretrain_weight > 0:
            loss = loss + pc.pretrain_weight * mean_token_loss(model, drift_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, pc.grad_clip)
        opt.step()
        logs.append((loss.item(), parts["text"], parts["image"]))
        if hook:
            model.eval()
            hook(step + 1)
            model.train()
    model.eval()
    mean = np.mean(logs, axis=0)
    return {"loss": float(mean[0]), "text": float(mean[1]), "image": float(mean[2]), "kept": len(rows)}

# -----------------------------------------------------------------------------
# the stage: a trained run in, an adapter and the benchmarks before and after out

def save_round(samples, scores, path):
    """One round's self-generated samples and their scores, as safetensors (-1 pads the id lists;
    codes are all -1 where no image was drawn) plus a JSON of the prompts: cached for inspection and
    for re-weighting them under another reward without sampling again."""
    def pad(lists):
        width = max([len(x) for x in lists if x is not None] + [1])
        out = torch.full((len(lists), width), -1, dtype=torch.long)
        for i, x in enumerate(lists):
            if x:
                out[i, :len(x)] = torch.tensor(x)
        return out
    tensors = {"example": torch.tensor(samples["example"]), "prompt": pad(samples["prompt"]),
               "plan": pad(samples["plan"]),
               "codes": pad(samples["codes"]), "image": torch.from_numpy(np.stack(samples["image"])),
               **{k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in scores.items()}}
    save_atomic(tensors, path)


def pretraining_batches(tc, batch, seed, rng, tokenizer, vq, vocab, device):
    """A function returning one pretraining batch per call (a small world_data set, reshuffled each
    pass): the data of the anti-drift term."""
    ds = data.world_data(min(tc.lm_examples, 50 * batch), seed, "train", tokenizer, vq, device, tc.tail_keep)
    return drift_batches(ds, tc, batch, rng, vocab, device)


def drift_batches(ds, tc, batch, rng, vocab, device):
    """A function returning one batch of the data.LMData ds per call, in tc's format mix, reshuffled each pass
    (data.epoch_batches): the anti-drift term's data, the world's or a folder's."""
    queue = []

    def next_batch():
        if not queue:
            queue.extend(data.epoch_batches(ds, rng, tc, batch))
        return data.make_batch(ds, queue.pop(), vocab, device)
    return next_batch



def nothing_weak(weakness, below):
    """Why the targeted strategy has nothing to aim at, with the weakest entries of the weakness report."""
    entries = sorted(weakness["categories"] + weakness.get("compositions", []), key=evaluate.category_score)
    weakest = ", ".join(f"{c['name']} {evaluate.category_score(c):.2f} on {c['n']} samples" for c in entries[:3])
    return (f"no dev category or composition is passed between 5% and {below:.0%} of the time (weakest: {weakest}), "
            "so targeted post-training would aim at what the model already draws well; a higher post.weak_below "
            "changes that")


def post_train(cfgs, run_dir, device, log, pc, seed, adapter="post", log_prefix="post", check=False, hook=None):
    """Rounds of generate -> score -> weight -> fine-tune a fresh LoRA adapter on the run's GPT, from the
    reward alone: the exact verifier is never called here (judge does, afterwards). Returns the run's (gpt
    with the adapter enabled, tokenizer, vocab, vq), the adapter's parameters, the per-round figures and
    what each round drew, for judge: {"examples", "example", "image", "weight"} per round, and with check
    one more entry, the last round's prompts sampled again with the trained adapter (its reward figures go
    into the last round's). hook(gpt, round, step): called after every fine-tuning step (overopt.py)."""
    tc = cfgs["train"]
    _, tokenizer, vocab, vq, gpt = load_run(run_dir, device)
    weakness, targets = None, None  # every category, for the broad and aligned strategies
    if pc.strategy == "targeted":
        wpath = os.path.join(run_dir, "weakness.json")
        if not os.path.exists(wpath):
            raise RunError("the targeted strategy needs the eval stage's weakness.json: run --stages=eval first")
        weakness = read_json(wpath)
        targets = targeting.choose_targets(weakness, pc.target_top, pc.weak_below)
        if not any(targets):
            raise targeting.NothingToTarget(nothing_weak(weakness, pc.weak_below))
        tqdm.write(f"[{log_prefix}] targeted at {', '.join(targets[0] + targets[1])}")
    params = add_lora(gpt, adapter, tuple(pc.lora_targets.split(",")), pc.lora_r, pc.lora_alpha, pc.lora_dropout)
    rng = np.random.default_rng([seed, 1])
    torch.manual_seed(seed)
    drift_batch = (pretraining_batches(tc, pc.batch, seed, rng, tokenizer, vq, vocab, device)
                   if pc.pretrain_weight > 0 else None)
    sample_cfg = dataclasses.replace(cfgs["sample"], text_temperature=pc.plan_temperature)

    def scored_samples(examples, sample_seed):
        """K samples of every example from the current model and their rewards."""
        reward_fn = rewards.load_reward(run_dir, pc.reward, device, specs={ex.prompt: ex.spec for ex in examples})
        merge_lora(gpt)  # sample with the adapter folded into the weights: same outputs, fewer matmuls
        samples = self_generate(gpt, vq, vocab, tokenizer, examples, pc.samples, sample_cfg, sample_seed, tc.eval_batch)
        unmerge_lora(gpt)
        return samples, rewards.score(reward_fn, samples["image"], [examples[i].prompt for i in samples["example"]],
                                      device)

    rounds, drawn = [], []
    for k in range(pc.rounds):
        t0 = time.time()
        examples = targeting.draw_prompts(pc.strategy, pc.prompts, rng, weakness, targets, pc.focus, pc.anchor,
                                          pc.composition_share)
        samples, r = scored_samples(examples, seed * 1000 + k * 100_000)
        w = sample_weights(r, samples["example"], pc.weighting, pc.beta, pc.threshold)
        os.makedirs(os.path.dirname(os.path.join(run_dir, log_prefix)), exist_ok=True)
        save_round(samples, {"reward": r, "weight": w}, os.path.join(run_dir, f"{log_prefix}_round{k}.safetensors"))
        write_json([{"prompt": ex.prompt, "category": ex.category, "kind": ex.kind} for ex in examples],
                   os.path.join(run_dir, f"{log_prefix}_round{k}.json"))
        fit = finetune(gpt, params, samples, w, pc, vocab, device, rng, drift_batch,
                       hook and (lambda step: hook(gpt, k, step)))
        figs = {"round": k, "reward": float(r.mean()),
                "reward_weighted": float((w * r).sum() / max(w.sum(), 1e-9)),  # what the fine-tune imitates
                **fit, "targets": None if targets is None else targets[0] + targets[1],
                "seconds": round(time.time() - t0, 1)}
        rounds.append(figs)
        drawn.append({"examples": examples, "example": samples["example"], "image": samples["image"], "weight": w})
        log(stage=log_prefix, **figs)
        tqdm.write(f"[{log_prefix}] round {k}: reward {figs['reward']:.3f} (weighted {figs['reward_weighted']:.3f}), "
                   f"{fit['kept']} samples kept, loss {fit['loss']:.3f}, {figs['seconds']:.0f}s")
    if check:
        samples, r = scored_samples(examples, seed * 1000 + pc.rounds * 100_000)
        rounds[-1].update(reward_after=float(r.mean()), reward_after_se=float(r.std() / np.sqrt(len(r))))
        drawn.append({"examples": examples, "example": samples["example"], "image": samples["image"]})
        tqdm.write(f"[{log_prefix}] the last round's prompts after fine-tuning: reward {r.mean():.3f}")
    return gpt, tokenizer, vocab, vq, params, rounds, drawn


def judge(rounds, drawn):
    """After training: the exact verifier on what post_train drew, in place into its round figures: each
    round's mean, its mean weighted as the fine-tune imitated it, and its mean per category; with post_train's
    check, the last round's prompts after fine-tuning (verifier_after). Returns the rounds."""
    for figs, d in zip(rounds, drawn):
        v, w = verifier_scores(d["image"], d["examples"], d["example"]), d["weight"]
        cats = np.array([d["examples"][i].category for i in d["example"]])
        figs.update(verifier=float(v.mean()), verifier_weighted=float((w * v).sum() / max(w.sum(), 1e-9)),
                    categories={c: float(v[cats == c].mean()) for c in sorted(set(cats))})
    if len(drawn) > len(rounds):
        v = verifier_scores(drawn[-1]["image"], drawn[-1]["examples"], drawn[-1]["example"])
        rounds[-1].update(verifier_after=float(v.mean()), verifier_after_se=float(v.std() / np.sqrt(len(v))))
    return rounds


def hacking(rounds):
    """A proxy reward that rises while the exact verifier stays flat or falls (judged rounds): on the last
    round's prompts before and after fine-tuning (post_train's check), else from the first round to the
    last; None with one round and no check."""
    last = rounds[-1]
    if "reward_after" in last:  # a rise within twice its standard error is sampling noise, not a rise: for the
        #                         reward that makes it no rise, for the verifier "flat" (older reports lack its SE)
        rose = lambda key: last[f"{key}_after"] - last[key] > 2 * last.get(f"{key}_after_se", 0.0)
        return rose("reward") and not rose("verifier")
    if len(rounds) < 2:
        return None
    return last["reward"] > rounds[0]["reward"] and last["verifier"] <= rounds[0]["verifier"]


def run(cfgs, run_dir, device, log, report):
    """The post stage: post_train (the reward alone), then judge (the verifier), the adapter saved and the
    benchmarks again."""
    tc, pc = cfgs["train"], cfgs["post"]
    if not report.get("benchmarks"):
        raise RunError("the post stage compares against the eval stage's benchmarks: run --stages=eval first")
    try:
        gpt, tokenizer, vocab, vq, _, rounds, drawn = post_train(cfgs, run_dir, device, log, pc, tc.seed, check=True)
    except targeting.NothingToTarget as e:  # the report says so; no adapter is written, the base model stands
        print(f"[post] skipped: {e}")
        return {"skipped": str(e)}, {"config": asdict(pc), "skipped": str(e), "before": report["benchmarks"]}
    rounds = judge(rounds, drawn)
    for r in rounds:
        tqdm.write(f"[post] round {r['round']}: verifier {r['verifier']:.3f} (weighted {r['verifier_weighted']:.3f})")
    save_atomic(lora_state_dict(gpt, "post"), os.path.join(run_dir, "lora_post.safetensors"))
    write_json(asdict(pc), os.path.join(run_dir, "lora_post.json"))
    merge_lora(gpt)
    after = evaluate.run_all(gpt, vq, vocab, tokenizer, cfgs["sample"], run_dir, n_prompts=tc.bench_prompts,
                             n_samples=pc.eval_samples, batch=tc.eval_batch, seed=tc.seed, prefix="post_", dev=False)
    post = {"config": asdict(pc), "rounds": rounds, "reward_hacking": hacking(rounds),
            "before": report["benchmarks"], "after": after["benchmarks"]}
    return {"rounds": len(rounds), "final_reward": rounds[-1]["reward"], "final_verifier": rounds[-1]["verifier"]}, post
