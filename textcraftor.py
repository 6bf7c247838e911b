"""
TextCraftor (Li et al. 2024, arXiv 2403.18978) for a decoder-only model: tune only the prompt side of a frozen
generator by backpropagating differentiable rewards, from prompts alone; interpolate between prompt sides
tuned on different reward mixes; tune the generator on top and see whether the two add up.

- The prompt side: LoRA adapters that act only at the prompt's positions (<bos> prompt [<think>], what the
  sampler's first forward reads); every later position (plan, image) runs the frozen weights and sees the
  prompt only through its keys and values, as a U-Net sees a text encoder's output. (side = "embed": an
  offset on the prompt's word embeddings alone.) A KL term keeps the plan's distributions near the frozen ones.
- The differentiable path: the plan and the first image rows are sampled without gradient; the last k rows are
  drawn by straight-through Gumbel-softmax, each soft token's codebook mixture fed back as the next input
  (each step checkpointed); VQ.decode_soft decodes; loss = -sum_j w_j R_j of the differentiable heads.
- Measured on held-out dev prompts (the verifier judges; it never trains) and the four benchmarks; the
  interpolation in weight and output (logit) space; prompt side vs generator side vs both.

    python train.py tiny_configs/shapes_cpu.toml --train.out_dir=COPY --stages=textcraftor   # ~10 min, 1 core
    python train.py tiny_configs/shapes_cpu.toml --train.out_dir=COPY --stages=textcraftor --textcraftor.k=8 \
        --textcraftor.complement=false --textcraftor.blend=0 --textcraftor.bench_prompts=0   # an ablation, ~5 min
    python textcraftor.py COPY*/textcraftor/textcraftor.json          # seeds and ablations in one table
    -> COPY/textcraftor/textcraftor.{json,md} and interpolation.png
"""

import contextlib
import dataclasses
import functools
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import data
import evaluate
import posttrain
import rewards
import stats
import targeting
from data import BOI, BOS, NULL, PAD, THINK
from generate import decode_images, generate, guide, load_run, read_json, save_atomic, save_grid, write_json
from model import KVCache, add_lora, cosine_lr, lora_layers, lora_state_dict

DIFFERENTIABLE = rewards.HEADS  # rewards that pass gradients to the pixels; the verifier and `self` do not


@dataclass
class TextCraftorConfig:
    side: str = "lora"  # lora: adapters acting only at the prompt's positions | embed: prompt word-embedding offsets
    reward_a: str = "aesthetic + 0.25*clip"  # first reward mix (differentiable heads only): aesthetic-heavy
    reward_b: str = "vqascore + 0.25*clip"  # second mix: alignment-heavy; the two prompt sides are interpolated
    k: int = 2  # last image rows the gradient flows through (earlier rows are drawn without it); 0 = no training
    steps: int = 30  # AdamW steps per prompt side
    batch: int = 8  # prompts per step
    lr: float = 1e-2  # prompt-side learning rate (constant after the warm-up); 3e-2 broke plans after 10 steps
    warmup: int = 5  # steps of linear warm-up
    plan_kl: float = 1.0  # weight of KL(tuned || frozen) of the plan's next-token distributions: keeps the prompt
    #                       side from rewriting the plan (without it, plans collapsed onto one for every prompt)
    tau: float = 1.0  # Gumbel-softmax temperature of the backward pass (the forward is always the hard token)
    lora_r: int = 4  # adapter rank
    lora_alpha: float = 8.0  # adapter scaling is lora_alpha / lora_r
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # Linear layers with adapters
    dev_prompts: int = 4  # dev prompts per category for the reward and verifier figures (8 categories)
    samples: int = 2  # samples per dev prompt at each measurement (the same sampling seed each time)
    bench_prompts: int = 10  # prompts per benchmark prompt set for the benchmark figures (0 = none)
    blend: int = 5  # points of each interpolation curve from reward_a (0) to reward_b (1); 0 = no interpolation
    complement: bool = True  # prompt side vs generator side (the post stage's round) vs both, same step budget
    post_prompts: int = 64  # prompts of the generator side's round (x post.samples samples)
    seed: int = 0  # seed of the training (prompts, Gumbel noise, the generator side's round); the base run stays


def mix_terms(spec):
    """A reward mix -> [(weight, name)], every term a differentiable head, else RewardError with the fix."""
    terms = rewards.parse_spec(spec)
    bad = [n for _, n in terms if n not in DIFFERENTIABLE]
    if bad:
        raise rewards.RewardError(f"{bad[0]!r} in {spec!r} passes no gradient to the image (it reads parsed scenes or "
                                  f"picked codes); a mix takes only {', '.join(DIFFERENTIABLE)}")
    return terms


def config_rules(oc, grid=None):
    """[textcraftor] values that type-check but cannot work: (holds, message) pairs, checked before any work.
    grid: the VQ's codes per side, the image rows k may name."""
    rules = [(oc.side in ("lora", "embed"), f"textcraftor.side={oc.side!r}: expected lora or embed"),
             (min(oc.steps, oc.batch, oc.lora_r, oc.dev_prompts, oc.samples, oc.post_prompts) >= 1
              and min(oc.k, oc.seed) >= 0,
              "textcraftor.steps, batch, lora_r, dev_prompts, samples, post_prompts must be >= 1, k and seed >= 0"),
             (oc.lr > 0 and oc.tau > 0 and oc.warmup >= 1 and oc.plan_kl >= 0,
              "textcraftor.lr and tau must be > 0, warmup >= 1, plan_kl >= 0"),
             (oc.blend != 1 and oc.blend >= 0 and oc.bench_prompts >= 0,
              "textcraftor.blend must be 0 (off) or >= 2 points, bench_prompts >= 0"),
             (not oc.complement or oc.steps >= 2, "textcraftor.complement splits the steps in two: steps >= 2")]
    if grid is not None:
        rules.append((oc.k <= grid, f"textcraftor.k={oc.k}: the image has only {grid} rows of codes; k <= {grid}"))
    for key in ("reward_a", "reward_b"):
        try:
            mix_terms(getattr(oc, key))
        except rewards.RewardError as e:
            rules.append((False, f"textcraftor.{key}: {e}"))
    return rules


# -----------------------------------------------------------------------------
# the prompt side


def prompt_positions(idx, cache=None):
    """(B, T) True at the prompt's positions: <bos>, the prompt and <think> (or, without a plan, all before
    <boi>) of a conditional row. A row holding <null> is the unconditional branch: it has no prompt. A cached
    call after the first one reads only what follows the prompt. A GradCache carries the call's own positions."""
    if getattr(cache, "prompt", None) is not None:  # without <think> the ids do not say where a plan begins
        return cache.prompt
    if cache is not None and cache.length > 0:
        return torch.zeros_like(idx, dtype=torch.bool)
    think = idx == THINK
    before_plan = (think.long().cumsum(1) - think.long()) == 0  # up to and including the first <think>
    before_image = (idx == BOI).long().cumsum(1) == 0
    return before_plan & before_image & ~(idx == NULL).any(1, keepdim=True)


class PromptSide:
    """Prompt-side parameters on a GPT, each named and weighted (1 on, 0 off, between: a weight-space blend),
    acting only at prompt_positions of whatever the GPT is called on (the samplers, the fine-tune, the
    benchmarks): a hook reads each call's ids. LoRA adapters act through each layer's gate (a weight per
    adapter and position), so a generator-side adapter added later acts everywhere beside them."""

    def __init__(self, gpt, vocab):
        self.gpt, self.text_size = gpt, vocab.text_size
        self.weights = {}  # prompt-side name -> its weight
        self.offsets = nn.ParameterDict()  # side "embed": name -> (text_size, n_embd) word-embedding offsets
        self.mask = None  # (B, T) float: the prompt's positions in the call under way
        gpt.register_forward_pre_hook(self._find_prompt, with_kwargs=True)
        gpt.embed_tokens.register_forward_hook(self._add_offsets)

    def add(self, name, oc: TextCraftorConfig):
        """A new prompt side `name` (oc.side), changing nothing until trained, the only one on (weight 1, the others
        0). Returns its parameters; every other parameter is frozen."""
        self.weights = {**{n: 0.0 for n in self.weights}, name: 1.0}
        for p in self.offsets.values():
            p.requires_grad_(False)
        if oc.side == "embed":
            w = self.gpt.lm_head.weight
            self.offsets[name] = nn.Parameter(torch.zeros(self.text_size, self.gpt.cfg.n_embd, device=w.device,
                                                          dtype=w.dtype))
            self.gpt.requires_grad_(False)
            return [self.offsets[name]]
        params = add_lora(self.gpt, name, tuple(oc.lora_targets.split(",")), oc.lora_r, oc.lora_alpha)
        for p in params:  # add_lora makes float32 adapters: the model's dtype instead
            p.data = p.data.to(self.gpt.lm_head.weight.dtype)
        for _, layer in lora_layers(self.gpt):
            layer.gate = functools.partial(self._gate, layer)
        return params

    def set(self, **weights):
        """Weights of the prompt sides, e.g. set(a=1, b=0); names left out keep theirs."""
        self.weights.update(weights)

    @contextlib.contextmanager
    def off(self):
        """Inside the block the GPT is the frozen one."""
        kept = dict(self.weights)
        self.set(**{n: 0.0 for n in kept})
        try:
            yield
        finally:
            self.weights = kept

    def _find_prompt(self, module, args, kwargs):
        idx = args[0] if args else kwargs["idx"]
        self.mask = prompt_positions(idx, kwargs.get("cache")).float()

    def _gate(self, layer, x):
        """layer's LoRALinear gate: (..., n unmerged adapters) weights in the layer's order: a prompt side's weight
        at the prompt's positions and 0 elsewhere, 1 for any other adapter (a generator side)."""
        names = [n for n in layer.lora_A if n not in layer.merged]  # the columns LoRALinear.forward reads
        return torch.stack([self.mask * self.weights[n] if n in self.weights else torch.ones_like(self.mask)
                            for n in names], -1).to(x.dtype)  # (B, T, n)

    def _add_offsets(self, module, args, out):
        if not len(self.offsets):
            return out
        rows = args[0].clamp(max=self.text_size - 1)  # image ids are never prompt positions
        shift = sum(self.weights[n] * p[rows] for n, p in self.offsets.items())  # (B, T, C)
        return out + shift * self.mask.unsqueeze(-1)

    def state(self, name):
        """The tensors of prompt side `name`, as an adapter file holds them."""
        if name in self.offsets:
            return {f"offsets.{name}": self.offsets[name].detach().clone()}
        return lora_state_dict(self.gpt, name)


# -----------------------------------------------------------------------------
# the differentiable image path


class _Layers(list):
    """One tensor per layer behind KVCache's indexing (cache.k[layer, :, :, a:b])."""

    def __getitem__(self, key):
        return list.__getitem__(self, key[0])[key[1:]]

    def __setitem__(self, key, value):
        list.__getitem__(self, key[0])[key[1:]] = value


class GradCache:
    """A KV cache for calls that carry gradients: one tensor per layer, made anew (out of place) for each call,
    so that nothing autograd saved is written again (model.KVCache writes every layer into one tensor in place:
    right without gradients, a version error with them). past: per layer (B, n_kv_head, L, hd); prompt: (B, T)
    the call's prompt positions, what the sampler's first call read (PromptSide reads them)."""

    def __init__(self, past_k, past_v, T, prompt):
        self.length, self.prompt = past_k[0].shape[2], prompt
        self.k = _Layers(F.pad(k, (0, 0, 0, T)) for k in past_k)  # (B, nkv, L + T, hd)
        self.v = _Layers(F.pad(v, (0, 0, 0, T)) for v in past_v)


def _sequences(vocab, prompts, samples, guided, think, n_codes):
    """Each kept sample as the sampler saw it: <bos> prompt [<think> when think], the tokens it wrote before <boi>
    (its plan and any <think> of its own, which the sample's plan leaves out), <boi> and n_codes code slots (ids of
    code 0: only their patches and tags are read), its null row too when guided; left-padded.
    Returns idx, patch, tags, pos, valid, prompt (R, L); prompt: what the sampler's first call read (<bos>, the
    prompt and <think>) in the conditional rows."""
    rows = [[BOS] + p + [THINK] * think + s["tokens"][:s["tokens"].index(BOI) + 1] for p, s in zip(prompts, samples)]
    if guided:
        rows += [[BOS] + [NULL] * (len(r) - 2) + [BOI] for r in rows]
    rows = [r + [vocab.image_offset] * n_codes for r in rows]
    L = max(len(r) for r in rows)
    out = torch.full((6, len(rows), L), 0, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        out[0, i] = PAD
        out[0, i, L - n:] = torch.tensor(r)
        out[1, i, L - n:] = torch.tensor(data.patch_positions(r, vocab.image_offset))
        if vocab.tagger is not None:
            out[2, i, L - n:] = torch.tensor(vocab.tagger.tags(r))
        out[3, i, L - n:] = torch.arange(n)
        out[4, i, L - n:] = 1
        if i < len(prompts):
            out[5, i, L - n:L - n + 1 + len(prompts[i]) + think] = 1
    return out[0], out[1], out[2], out[3], out[4].bool(), out[5].bool()


def soft_token(logits, sample_cfg, tau, gen):
    """The image-code logits of one step (R, K), R = B conditional rows then, when guided, B null rows -> (the hard
    codes (B,), drawn as generate draws them: guidance, temperature, top-k; straight-through Gumbel-softmax
    one-hots (B, K), forward the hard code, backward that of softmax((log p + g) / tau))."""
    if sample_cfg.cfg_scale != 1.0:
        B = logits.shape[0] // 2
        logits = guide(logits[:B], logits[B:], sample_cfg.cfg_scale)
    z = logits  # greedy at temperature 0: no noise, as generate
    if sample_cfg.temperature > 0:
        z = logits / sample_cfg.temperature
        if sample_cfg.top_k > 0:
            z = z.masked_fill(z < torch.topk(z, sample_cfg.top_k, -1).values[:, -1:], float("-inf"))
        u = torch.rand(z.shape, generator=gen, device=z.device, dtype=z.dtype).clamp(1e-9, 1 - 1e-9)
        z = z.log_softmax(-1) - torch.log(-torch.log(u))  # log p + Gumbel noise: its argmax is a draw from p
    hard = z.argmax(-1)
    soft = (z / tau).softmax(-1)
    return hard, F.one_hot(hard, z.shape[-1]).to(z.dtype) + soft - soft.detach()


def check_sample(sample_cfg):
    """ValueError unless soft_token draws as generate does: it has guidance, temperature and top-k, no top-p."""
    if sample_cfg.top_p < 1.0:
        raise ValueError(f"sample.top_p={sample_cfg.top_p}: textcraftor's differentiable path draws without nucleus "
                         "sampling, so it would rerun samples the sampler never drew; set sample.top_p = 1")


def differentiable_images(gpt, vq, vocab, prompts, sample_cfg, k, tau, seed, side=None):
    """Prompts (lists of ids) -> (images (B, 3, H, W) whose last k code rows carry gradients to the prompt
    side, the indices of the prompts that got an image, the hard codes (B, N), and with side (the PromptSide) the
    mean KL(tuned || frozen) of the next-token distributions at the plan's positions, else None). The plan and the
    first rows come from generate (no gradient); the prompt and plan are then run again with gradients, the first
    rows without, and the last k rows drawn by straight-through Gumbel-softmax, one soft token at a time."""
    dev, cfg = gpt.lm_head.weight.device, gpt.cfg
    G, N, off = vq.cfg.grid, vq.cfg.n_codes, vocab.image_offset
    if not 0 <= k <= G:
        raise ValueError(f"k={k} rows: the image has {G} rows of codes; k must lie in [0, {G}] (textcraftor.k)")
    check_sample(sample_cfg)
    with torch.no_grad():
        drawn = generate(gpt, vocab, prompts, sample_cfg, seed=seed)
    keep = [i for i, s in enumerate(drawn) if s["codes"] is not None and len(s["codes"]) == N]
    if not keep:
        return None, keep, None, None
    B, guided, m = len(keep), sample_cfg.cfg_scale != 1.0, (G - k) * G  # m: codes drawn without gradient
    idx, patch, tags, pos, valid, prompt = (t.to(dev) for t in _sequences(
        vocab, [prompts[i] for i in keep], [drawn[i] for i in keep], guided, sample_cfg.think, N))
    early = torch.tensor([drawn[i]["codes"][:m] for i in keep], dtype=torch.long, device=dev).view(B, m)
    P = idx.shape[1] - N - 1  # column of <boi>
    idx[:, P + 1:P + 1 + m] = off + early.repeat(1 + guided, 1)
    dtype = gpt.lm_head.weight.dtype
    empty = idx.new_zeros(idx.shape[0], cfg.n_kv_head, 0, cfg.n_embd // cfg.n_head, dtype=dtype)
    past = [[empty] * cfg.n_layer, [empty] * cfg.n_layer]  # keys, values: per layer (R, nkv, L, hd)

    def call(a, b, past, embeds=None):
        """Columns a..b through the GPT on top of past -> (logits (R, b - a, V), the new past)."""
        cache = GradCache(*past, b - a, prompt[:, a:b])
        logits = gpt(idx[:, a:b], patch=patch[:, a:b], tags=tags[:, a:b] if vocab.tagger else None,
                     pos=pos[:, a:b], key_valid=valid[:, :b], cache=cache, embeds=embeds)
        return logits, [list(cache.k), list(cache.v)]

    def step(a, embeds, *flat):
        """One token, checkpointed: backward recomputes it instead of keeping it. flat: the keys and values
        before the soft rows (per layer), then each soft step's own (per layer, one position): the history is
        joined here and never kept, so the memory held grows by one position a step, not by the history."""
        n = 2 * cfg.n_layer
        chunks = [flat[i:i + n] for i in range(0, len(flat), n)]  # [keys (n_layer), values (n_layer)] per part
        past = [[torch.cat([c[i + j * cfg.n_layer] for c in chunks], 2) for i in range(cfg.n_layer)] for j in (0, 1)]
        logits, new = call(a, a + 1, past, embeds)
        return (logits[:, -1], *[t[:, :, -1:].clone() for t in new[0] + new[1]])  # (R, V); a copy, so that the
        #                                                                        history it is cut from is freed

    fresh = past
    logits, past = call(0, P, past)  # the prompt and plan, with gradients
    kl = None
    if side is not None:
        with torch.no_grad(), side.off():
            ref = call(0, P, fresh)[0]
        # the prompt's last position (<think>, or its last word without it) and the plan predict the plan and <boi>
        plan = (~prompt[:B, :P] | ~prompt[:B, 1:P + 1]).to(dtype)
        logp, logq = logits[:B].log_softmax(-1), ref[:B].log_softmax(-1)  # (B, P, V)
        kl = ((logp.exp() * (logp - logq)).sum(-1) * plan).sum() / plan.sum()
    if m:
        with torch.no_grad():  # <boi> and the first rows but the last code: no gradient (constant keys, values)
            _, far = call(P, P + m, past)
        past = [[torch.cat([p, f[:, :, P:]], 2) for p, f in zip(ps, fs)] for ps, fs in zip(past, far)]
    out = [F.one_hot(early, vq.cfg.codebook_size).to(dtype)]  # (B, m, K)
    embed = gpt.embed_tokens.weight[off:]  # (K, C) the frozen input embeddings of the codes
    a, x = P + m, None  # the last hard token (<boi> or the last early code) is fed with gradients
    flat = past[0] + past[1]
    gen = torch.Generator(device=dev).manual_seed(seed)
    for _ in range(N - m):
        res = checkpoint(step, a, x, *flat, use_reentrant=False)
        logits, flat = res[0], flat + list(res[1:])
        hard, y = soft_token(logits[:, off:], sample_cfg, tau, gen)
        out.append(y.unsqueeze(1))
        a += 1
        idx[:, a] = off + hard.repeat(1 + guided)
        x = (y @ embed).repeat(1 + guided, 1).unsqueeze(1)  # (R, 1, C) its codebook mixture, fed back
    probs = torch.cat(out, 1)  # (B, N, K)
    return vq.decode_soft(probs), keep, probs.argmax(-1), kl


def train(gpt, vq, vocab, tokenizer, side, name, spec, reward_fns, oc, sample_cfg, examples, seed, log, steps=None):
    """`steps` (default oc.steps) AdamW steps of a new prompt side `name` on -sum_j w_j R_j(image) of the
    differentiable path, prompts taken in turn from train-split examples; reward_fns: {name: checked reward}.
    Returns the training figures: time per step, the autograd memory of a step, the rewards of the first and
    last steps."""
    steps = oc.steps if steps is None else steps
    terms = mix_terms(spec)
    params = side.add(name, oc)
    opt = torch.optim.AdamW(params, lr=oc.lr, weight_decay=0.0)
    ids = [data.encode_text(tokenizer, ex.prompt) for ex in examples]
    logs, secs, mem = [], [], []
    for step in range(steps):
        t0 = time.time()
        pick = [(step * oc.batch + j) % len(ids) for j in range(oc.batch)]
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, oc.lr, oc.warmup, steps, oc.lr)
        with stats.SavedBytes() as saved:
            images, keep, _, kl = differentiable_images(gpt, vq, vocab, [ids[i] for i in pick], sample_cfg, oc.k,
                                                        oc.tau, seed * 100_003 + step, side)
            if images is None:  # no sample drew an image: nothing to score
                continue
            prompts = [examples[pick[i]].prompt for i in keep]
            values = {}
            for _, n in terms:
                try:
                    values[n] = reward_fns[n](images, prompts)
                except rewards.RewardError as e:  # NaN, a wrong shape: stop, naming the step
                    raise rewards.RewardError(f"textcraftor {name} ({spec}) at step {step}: {e}") from None
            loss = -sum(w * values[n].mean() for w, n in terms) + oc.plan_kl * kl
        if oc.k > 0:  # k = 0: no row carries the reward's gradient, and the KL's is 0 (up to rounding): no step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        secs.append(time.time() - t0)
        mem.append(saved.bytes)
        logs.append({**{n: v.mean().item() for n, v in values.items()}, "plan_kl": kl.item()})
        log(stage=f"textcraftor/{name}", step=step, loss=loss.item(), **logs[-1])
    side.offsets.requires_grad_(False)
    for p in params:
        p.requires_grad_(False)
    return {"steps": steps, "seconds_per_step": float(np.mean(secs)) if secs else None,
            "saved_mb": float(np.max(mem)) / 2**20 if mem else None,
            "first": logs[0] if logs else None, "last": logs[-1] if logs else None}


# -----------------------------------------------------------------------------
# measurements


def measure(gpt, vq, vocab, tokenizer, sample_cfg, examples, reward_fns, n_samples, batch, device):
    """The same samples of the dev prompts (sampling seed 0) scored by each reward and by the verifier:
    {name: per-prompt means (n_prompts,)}, so that two models are compared prompt by prompt."""
    s = posttrain.self_generate(gpt, vq, vocab, tokenizer, examples, n_samples, sample_cfg, 0, batch)
    prompts = [examples[i].prompt for i in s["example"]]
    scores = {n: rewards.score(fn, s["image"], prompts, device) for n, fn in reward_fns.items()}
    scores["verifier"] = posttrain.verifier_scores(s["image"], examples, s["example"])
    ex = np.asarray(s["example"])
    return {n: np.array([np.mean(v[ex == i]) for i in range(len(examples))]) for n, v in scores.items()}


def summary(per, base=None):
    """Per-prompt means -> {name: [mean, standard error]} and, against base (the same prompts), the paired
    difference {name_gain: [mean, standard error]}."""
    out = {n: [float(np.mean(v)), stats.paired_se(v)] for n, v in per.items()}
    if base is not None:
        out.update({f"{n}_gain": [float(np.mean(v - base[n])), stats.paired_se(v - base[n])]
                    for n, v in per.items()})
    return out


def benchmarks(gpt, vq, vocab, tokenizer, sample_cfg, run_dir, oc, batch, prefix):
    """The four benchmarks' overall scores and 95% intervals (oc.bench_prompts prompts a set, 2 samples each,
    sampling seed 0); their sample grids go to RUN/textcraftor/<prefix>samples_*.png."""
    if not oc.bench_prompts:
        return {}
    res = evaluate.run_all(gpt, vq, vocab, tokenizer, sample_cfg, run_dir, n_prompts=oc.bench_prompts, n_samples=2,
                           batch=batch, seed=0, prefix=f"textcraftor/{prefix}_", dev=False)["benchmarks"]
    return {b: [d["overall"], list(d["ci"]["overall"])] for b, d in res.items()}


class LogitBlend(nn.Module):
    """The GPT as generate calls it, giving (1 - alpha) * the logits with prompt side a + alpha * those with b:
    two forwards a call, each with its own KV cache (the output-space interpolation)."""

    def __init__(self, gpt, side, alpha):
        super().__init__()
        self.gpt, self.side, self.alpha, self.cfg = gpt, side, alpha, gpt.cfg
        self.caches = None

    def forward(self, idx, cache, **kw):
        if cache.length == 0:  # a new batch: one cache per prompt side, shaped as generate's
            self.caches = [KVCache(self.cfg, cache.k.shape[1], cache.k.shape[3], idx.device, cache.k.dtype)
                           for _ in range(2)]
        outs = []
        for c, w in zip(self.caches, (dict(a=1.0, b=0.0), dict(a=0.0, b=1.0))):
            self.side.set(**w)
            outs.append(self.gpt(idx, cache=c, **kw))
        cache.length += idx.shape[1]
        return (1 - self.alpha) * outs[0] + self.alpha * outs[1]


def generator_side(cfgs, run_dir, gpt, vq, vocab, tokenizer, steps, seed, oc, device):
    """The post stage's round on top of whatever prompt side the GPT holds: post.samples samples of
    oc.post_prompts aligned train-split prompts, post.reward, post.weighting, then `steps` LoRA steps of a new
    adapter "gen" (posttrain.finetune, with its pretraining term). Returns its figures."""
    tc, t0 = cfgs["train"], time.time()
    pc = dataclasses.replace(cfgs["post"], steps=steps, warmup=min(cfgs["post"].warmup, steps))
    rng = np.random.default_rng([seed, 33])
    examples = targeting.draw_prompts("aligned", oc.post_prompts, rng)
    scfg = dataclasses.replace(cfgs["sample"], text_temperature=pc.plan_temperature)
    s = posttrain.self_generate(gpt, vq, vocab, tokenizer, examples, pc.samples, scfg, seed * 1000, tc.eval_batch)
    fn = rewards.load_reward(run_dir, pc.reward, device, specs={ex.prompt: ex.spec for ex in examples})
    r = rewards.score(fn, s["image"], [examples[i].prompt for i in s["example"]], device)
    w = posttrain.sample_weights(r, s["example"], pc.weighting, pc.beta, pc.threshold)
    params = add_lora(gpt, "gen", tuple(pc.lora_targets.split(",")), pc.lora_r, pc.lora_alpha, pc.lora_dropout)
    drift = (posttrain.pretraining_batches(tc, pc.batch, seed, rng, tokenizer, vq, vocab, device)
             if pc.pretrain_weight > 0 else None)
    torch.manual_seed(seed)
    fit = posttrain.finetune(gpt, params, s, w, pc, vocab, device, rng, drift)
    return {"reward": float(r.mean()), **fit, "seconds": round(time.time() - t0, 1)}


# -----------------------------------------------------------------------------
# the stage


def strip(gpt, side, vq, vocab, tokenizer, sample_cfg, examples, alphas, path):
    """A PNG: each of the prompts along the blend from a (left) to b (right), in weight space (rows above) and
    in output space (rows below), one sample at the same sampling seed everywhere."""
    ids = [data.encode_text(tokenizer, ex.prompt) for ex in examples]
    grid = {}
    for space in ("weight", "output"):
        for a in alphas:
            side.set(a=1 - a, b=a)
            model = gpt if space == "weight" else LogitBlend(gpt, side, a)
            grid[space, a] = decode_images(vq, generate(model, vocab, ids, sample_cfg, seed=0))
    images, captions = [], []
    for space in ("weight", "output"):
        for j, ex in enumerate(examples):
            for a in alphas:
                images.append(grid[space, a][j])
                captions.append(f"{space} {a:.2f}" + (f": {ex.prompt}" if a == alphas[0] else ""))
    save_grid(images, captions, path, cols=len(alphas))


def run(cfgs, run_dir, device, log, report):
    """Prompt sides a and b tuned from the frozen run on their reward mixes, each measured on dev prompts against
    the frozen model (rewards and verifier) and on the benchmarks; the interpolation; prompt side vs generator
    side vs both. Writes RUN/textcraftor/textcraftor.{json,md}, interpolation.png, the prompt sides' tensors."""
    tc, oc, scfg = cfgs["train"], cfgs["textcraftor"], cfgs["sample"]
    check_sample(scfg)  # before any work
    load = lambda: load_run(run_dir, device)[1:]
    tokenizer, vocab, vq, gpt = load()
    out = os.path.join(run_dir, "textcraftor")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(oc.seed)
    names = sorted({"aesthetic", "vqascore", "clip"} | {n for s in (oc.reward_a, oc.reward_b) for _, n in mix_terms(s)})
    reward_fns = {n: rewards.load_reward(run_dir, n, device) for n in names}
    dev = evaluate.dev_prompts(oc.dev_prompts)
    pool = targeting.draw_prompts("aligned", oc.steps * oc.batch, np.random.default_rng([oc.seed, 2403]))
    m = lambda model: measure(model, vq, vocab, tokenizer, scfg, dev, reward_fns, oc.samples, tc.eval_batch, device)
    bench = lambda model, tag: benchmarks(model, vq, vocab, tokenizer, scfg, run_dir, oc, tc.eval_batch, tag)
    tune = lambda model, side, name, spec, steps=None: train(model, vq, vocab, tokenizer, side, name, spec, reward_fns,
                                                             oc, scfg, pool, oc.seed, log, steps)
    side = PromptSide(gpt, vocab)
    frozen = m(gpt)
    res = {"config": asdict(oc), "seed": oc.seed, "dev_prompts": len(dev), "samples": oc.samples,
           "arms": {"frozen": {"dev": summary(frozen), "bench": bench(gpt, "frozen")}}}
    for name, spec in (("a", oc.reward_a), ("b", oc.reward_b)):
        fig = tune(gpt, side, name, spec)
        save_atomic(side.state(name), os.path.join(out, f"prompt_{name}.safetensors"))
        side.set(**{n: float(n == name) for n in side.weights})
        res["arms"][name] = {"reward": spec, "train": fig, "dev": summary(m(gpt), frozen), "bench": bench(gpt, name)}
        print(f"[textcraftor] {name} ({spec}): {fig['seconds_per_step']:.2f} s/step; " + ", ".join(
            f"{n} {v[0]:+.3f} +- {v[1]:.3f}" for n, v in res["arms"][name]["dev"].items() if n.endswith("_gain")))
    if oc.blend:
        alphas = [float(a) for a in np.linspace(0, 1, oc.blend)]
        res["interpolation"] = []
        for a in alphas:
            side.set(a=1 - a, b=a)
            for space, model in (("weight", gpt), ("output", LogitBlend(gpt, side, a))):
                res["interpolation"].append({"alpha": a, "space": space, **summary(m(model), frozen)})
        strip(gpt, side, vq, vocab, tokenizer, scfg, dev[::len(dev) // 4][:4], alphas,
              os.path.join(out, "interpolation.png"))
    if oc.complement:  # the same budget of optimiser steps: all prompt side (arm b), all generator side, half each
        tokenizer, vocab, vq, g_only = load()
        fig = generator_side(cfgs, run_dir, g_only, vq, vocab, tokenizer, oc.steps, oc.seed, oc, device)
        res["arms"]["generator"] = {"train": fig, "dev": summary(m(g_only), frozen),
                                    "bench": bench(g_only, "generator")}
        tokenizer, vocab, vq, both = load()
        fig = tune(both, PromptSide(both, vocab), "b", oc.reward_b, oc.steps // 2)
        fig_g = generator_side(cfgs, run_dir, both, vq, vocab, tokenizer, oc.steps - oc.steps // 2, oc.seed, oc,
                               device)
        res["arms"]["both"] = {"train": {"prompt": fig, "generator": fig_g}, "dev": summary(m(both), frozen),
                               "bench": bench(both, "both")}
    write_json(res, os.path.join(out, "textcraftor.json"))
    with open(os.path.join(out, "textcraftor.md"), "w") as f:
        f.write(table([res]) + "\n")
    print(table([res]))
    return {arm: {n: v[0] for n, v in r["dev"].items() if n.endswith("_gain")} for arm, r in res["arms"].items()
            if arm != "frozen"}


# -----------------------------------------------------------------------------
# the report


def _pm(xs, ses):
    """One seed: its mean and standard error; several: the mean over seeds and its standard error over seeds."""
    if len(xs) == 1:
        return f"{xs[0]:+.3f} +- {ses[0]:.3f}"
    return f"{np.mean(xs):+.3f} +- {stats.paired_se(xs):.3f}"


def table(results):
    """textcraftor.json results -> markdown. Results of the same side and k are seeds of one setting: their
    figures are means over seeds +- the standard error over seeds; a lone seed's are +- the standard error over
    its dev prompts (paired with the frozen model's on the same prompts)."""
    groups = {}
    for r in results:
        groups.setdefault((r["config"]["side"], r["config"]["k"]), []).append(r)
    out = ["# TextCraftor: prompt-side tuning by differentiable rewards", ""]
    for (side, k), rs in sorted(groups.items()):
        c = rs[0]["config"]
        names = [n[:-5] for n in rs[0]["arms"]["a"]["dev"] if n.endswith("_gain")]
        out += [f"## side {side}, k = {k} rows, {c['steps']} steps of {c['batch']} prompts, seeds "
                f"{', '.join(str(r['seed']) for r in rs)}", "",
                f"Gains over the frozen model on {rs[0]['dev_prompts']} dev prompts x {rs[0]['samples']} samples "
                "(the verifier judges, it never trains); a = `" + c["reward_a"] + "`, b = `" + c["reward_b"] + "`.", "",
                "| arm | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        arms = [a for a in rs[0]["arms"] if a != "frozen" and all(a in r["arms"] for r in rs)]
        for arm in arms:
            cells = [_pm([r["arms"][arm]["dev"][f"{n}_gain"][0] for r in rs],
                         [r["arms"][arm]["dev"][f"{n}_gain"][1] for r in rs]) for n in names]
            out.append(f"| {arm} | " + " | ".join(cells) + " |")
        if rs[0]["arms"]["frozen"]["bench"]:
            benches = list(rs[0]["arms"]["frozen"]["bench"])
            out += ["", "Benchmarks, overall (one seed: [95% interval]; several: the gain over frozen +- its SE over "
                    "seeds):", "", "| arm | " + " | ".join(benches) + " |", "|---" * (len(benches) + 1) + "|"]
            for arm in ["frozen"] + arms:
                if len(rs) == 1 or arm == "frozen":  # the frozen model: the same samples in every seed's run
                    cells = [f"{v[0]:.3f} [{v[1][0]:.3f}, {v[1][1]:.3f}]" for v in rs[0]["arms"][arm]["bench"].values()]
                else:
                    cells = [_pm([r["arms"][arm]["bench"][b][0] - r["arms"]["frozen"]["bench"][b][0] for r in rs],
                                 [0.0] * len(rs)) for b in benches]
                out.append(f"| {arm} | " + " | ".join(cells) + " |")
        out += ["", "| prompt side | s / step | autograd MB / step |", "|---|---|---|"]
        for arm in ("a", "b"):
            t = [r["arms"][arm]["train"] for r in rs]
            out.append(f"| {arm} | {np.mean([x['seconds_per_step'] for x in t]):.2f} | "
                       f"{np.mean([x['saved_mb'] for x in t]):.1f} |")
        seed, inter = next(((r["seed"], r["interpolation"]) for r in rs if r.get("interpolation")), (None, None))
        if inter:
            out += ["", f"Interpolation from a (0) to b (1), seed {seed}: rewards and verifier on dev prompts.",
                    "", "| alpha | space | " + " | ".join(names) + " |", "|---|---" + "|---" * len(names) + "|"]
            out += [f"| {p['alpha']:.2f} | {p['space']} | " + " | ".join(f"{p[n][0]:.3f}" for n in names) + " |"
                    for p in inter]
            for space in ("weight", "output"):
                for n in names:
                    ys = [p[n][0] for p in inter if p["space"] == space]
                    d = np.diff(ys)
                    out.append(f"- {space} space, {n}: " + ("monotone" if (d >= 0).all() or (d <= 0).all()
                                                             else "not monotone") + f" ({ys[0]:.3f} -> {ys[-1]:.3f})")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Seeds and k ablations of the textcraftor stage in one table.")
    p.add_argument("results", nargs="+", help="RUN/textcraftor/textcraftor.json files")
    args = p.parse_args(argv)
    print(table([read_json(f) for f in args.results]))


if __name__ == "__main__":
    main()
