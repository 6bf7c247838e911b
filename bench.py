"""
Performance figures of a trained run on this machine, all measured in the same run:
- the fp32 matmul peak (a big square matmul, timed), the yardstick of the other figures;
- training: tokens/s of the run's GPT and of a plain GPT of the same size (nanoGPT's architecture), taking
  turns on one pretraining batch of the run's, the model FLOPs utilisation (MFU) of each against that
  peak, and the peak memory of training; in float32, and our GPT again under bf16 autocast when the run
  trained that way (train.dtype);
- generation: images/s of the slow reference sampler, the KV-cache sampler, and the KV-cache sampler with
  batched classifier-free guidance; the peak memory of generation; and the bound: images/s if every
  decode step ran at the matmul peak, and the fraction of it reached.

    python bench.py                                  # uses out/shapes_cpu (train it first)
    python bench.py out/shapes_cpu --json            # one JSON object
    python bench.py out/shapes_cpu --profile         # also the ops that dominate training and sampling
"""

import argparse
import json
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import world
from stats import rss_mb
from generate import RunError, generate, generate_reference, load_run, sample_config
from model import GPT, use_bf16

# -----------------------------------------------------------------------------
# yardsticks: the matmul peak, FLOP counts, peak memory


def matmul_peak(device, n=1024, repeats=10):
    """FLOP/s of an n x n fp32 matmul, the best of 3 rounds after a warm-up (on a shared machine the best
    round is the nearest to the peak)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(4):  # the first round warms up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * repeats / best


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_params(model):
    """Parameters that take part in a matmul (embedding lookups and norm gains do not)."""
    return sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and "emb" not in n and "wte" not in n and "wpe" not in n)


def train_flops_per_token(model, n_layer, n_embd, T):
    """6 N (forward 2 N, backward 4 N) plus attention's 12 L C T (PaLM's appendix, as in nanoGPT's MFU)."""
    return 6 * matmul_params(model) + 12 * n_layer * n_embd * T


def reset_peak_memory(device):
    """Start a new peak: CUDA's counter, or on Linux the process's peak RSS (VmHWM) via /proc/self/clear_refs."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the peak below is the process's peak so far
    return rss_mb("VmRSS")


def peak_memory(device, start_mb):
    """MB the phase needed above what the process held when it began (peak - start)."""
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else rss_mb("VmHWM")
    return {"peak_mb": round(peak, 1), "above_start_mb": round(peak - start_mb, 1)}


# -----------------------------------------------------------------------------
# training


class PlainGPT(nn.Module):
    """nanoGPT's architecture (learned positions, pre-LayerNorm, GELU MLP 4x wide) at the width, depth and
    vocabulary of the run's GPT: the throughput our GPT should at least match."""

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        layer = nn.TransformerEncoderLayer(n_embd, n_head, 4 * n_embd, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.ln_f, self.lm_head = nn.LayerNorm(n_embd), nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device)
        return self.lm_head(self.ln_f(self.blocks(x, mask=mask, is_causal=True)))


def bench_batch(cfg, tokenizer, vocab, vq, n, device, seed=0):
    """A pretraining batch of n sequences as the lm stage draws them (data.epoch_batches: the run's format
    mix, sequences of similar length), from shapes-world examples or the run's image folder, with the
    patches and tags training gives them."""
    tc = SimpleNamespace(**cfg["train"])
    if tc.data_dir:
        folder = data.load_folder(tc.data_dir, cfg["vq"]["image_size"])
        ds = data.folder_data(folder, np.arange(16 * n) % len(folder.captions), tokenizer, vq, device)
    else:
        ds = data.world_data(16 * n, seed, "dev", tokenizer, vq, device)
    return data.make_batch(ds, data.epoch_batches(ds, np.random.default_rng(seed), tc, n)[0], vocab, device)


def train_step(model, batch, device, seed=0, bf16=False):
    """One forward + backward + AdamW step of model on a data.Batch, as a function. Our GPT is given the
    batch's patches and tags, as in training; the plain GPT has no use for them."""
    torch.manual_seed(seed)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kw = dict(patch=batch.patch, tags=batch.tags) if isinstance(model, GPT) else {}

    def step():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch.x, **kw)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_training(models, batch, device, peak, steps=3, rounds=5, bf16=False):
    """Tokens/s of training steps (train_step) on a data.Batch (bench_batch) of each of `models` (name ->
    module), and the peak memory of the first one's step. In each of `rounds` rounds every model in turn
    runs `steps` steps; each model's best round counts, as the matmul peak's does: taken in turns, the
    models see a shared machine alike, and at its least busy."""
    B, T = batch.x.shape
    fns = {name: train_step(model, batch, device, bf16=bf16) for name, model in models.items()}
    for fn in fns.values():
        fn()  # warm-up: allocations, thread pools
    start = reset_peak_memory(device)
    next(iter(fns.values()))()
    memory = peak_memory(device, start)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    out = {}
    for name, model in models.items():
        tokens_per_s = steps * B * T / best[name]
        cfg = ((len(model.layers), model.cfg.n_embd) if hasattr(model, "layers")
               else (len(model.blocks.layers), model.wte.embedding_dim))
        out[name] = {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * train_flops_per_token(model, *cfg, T) / peak,
                     "params": sum(p.numel() for p in model.parameters()), "batch": B, "T": T}
    out[next(iter(models))]["memory"] = memory
    return out


# -----------------------------------------------------------------------------
# generation


def images_per_s(fn, n_images, rounds=1):
    """n_images / the best time of `rounds` calls after a warm-up call; also the last call's output."""
    fn()  # warm-up (allocations, thread pools)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return n_images / best, out


def decode_flops(gpt, rows, prompt_len, steps):
    """Forward FLOPs of one generate call: the prompt, then one token per row per step, each 2 N for the
    matmuls plus 4 L C (context) for attention scores and values."""
    n, L, C = matmul_params(gpt), gpt.cfg.n_layer, gpt.cfg.n_embd
    per_token = lambda ctx: 2 * n + 4 * L * C * ctx
    return rows * (sum(per_token(t + 1) for t in range(prompt_len))
                   + sum(per_token(prompt_len + s + 1) for s in range(steps)))


def bench_generation(gpt, vocab, prompts, sample_cfg, device, peak, seed=0):
    batch = len(prompts)
    guided = replace(sample_cfg, cfg_scale=sample_cfg.cfg_scale if sample_cfg.cfg_scale != 1.0 else 1.5)
    plain = replace(sample_cfg, cfg_scale=1.0)
    out = {"batch": batch}
    few = prompts[:4]  # the reference sampler is slow: a few prompts suffice
    reference = lambda: [generate_reference(gpt, vocab, p, guided, seed) for p in few]
    out["reference_guided"], _ = images_per_s(reference, len(few))
    out["cache"], _ = images_per_s(lambda: generate(gpt, vocab, prompts, plain, seed), batch, 3)
    start = reset_peak_memory(device)
    out["cache_guided"], samples = images_per_s(lambda: generate(gpt, vocab, prompts, guided, seed), batch, 3)
    out["memory"] = peak_memory(device, start)
    out["speedup_guided"] = out["cache_guided"] / out["reference_guided"]
    out["guidance_cost"] = out["cache"] / out["cache_guided"]  # time with guidance / time without
    prompt_len = max(len(p) for p in prompts) + 1 + guided.think  # <bos> prompt [<think>]
    flops = decode_flops(gpt, 2 * batch, prompt_len, len(samples[0]["tokens"]))
    out["bound_guided"] = batch * peak / flops  # images/s if every step ran at the matmul peak
    out["fraction_of_bound"] = out["cache_guided"] / out["bound_guided"]
    return out


def bench_prompts(cfg, tokenizer, n, seed=0):
    """The run's own kind of prompt: shapes-world prompts, or a folder's captions."""
    if cfg["train"].get("data_dir"):
        folder = data.load_folder(cfg["train"]["data_dir"], cfg["vq"]["image_size"])
        return [data.encode_text(tokenizer, folder.captions[i % len(folder.captions)]) for i in range(n)]
    rng = np.random.default_rng(seed)
    return [data.encode_text(tokenizer, world.sample_example(rng, split="dev").prompt) for _ in range(n)]


# -----------------------------------------------------------------------------


def profile(gpt, batch, vocab, prompts, sample_cfg, device, rows=12):
    """The ops that take the most time (self time) in 3 training steps and in one guided generation."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    model = type(gpt)(gpt.cfg).to(device).train()
    with torch_profile(activities=acts) as prof:
        bench_training({"ours": model}, batch, device, peak=1.0, steps=3, rounds=1)
    print("training, top ops by self time:\n" + prof.key_averages().table(sort_by=sort, row_limit=rows))
    with torch_profile(activities=acts) as prof:
        generate(gpt, vocab, prompts, sample_cfg, 0)
    print("generation (KV cache + guidance), top ops by self time:\n"
          + prof.key_averages().table(sort_by=sort, row_limit=rows))


def main():
    p = argparse.ArgumentParser(description="Performance figures of a trained run on this machine.")
    p.add_argument("run_dir", nargs="?", default="out/shapes_cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch", type=int, default=16, help="images generated together")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    p.add_argument("--profile", action="store_true",
                   help="also print the top ops of training and of sampling (torch.profiler)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is steadier on a busy machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg, tokenizer, vocab, vq, gpt = load_run(args.run_dir, args.device)
    except RunError as e:
        raise SystemExit(f"error: {e}")
    sample_cfg = sample_config(cfg)
    prompts = bench_prompts(cfg, tokenizer, args.batch)
    batch = bench_batch(cfg, tokenizer, vocab, vq, 32, args.device)
    peak = matmul_peak(args.device)
    gc = gpt.cfg
    figures = {  # generation first: its memory is measured before training has grown the process
        "device": args.device, "threads": torch.get_num_threads(), "params": gpt.num_params(),
        "matmul_peak_gflops": peak / 1e9,
        "generation": bench_generation(gpt, vocab, prompts, sample_cfg, args.device, peak),
    }
    plain_gpt = PlainGPT(gc.vocab_size, gc.block_size, gc.n_layer, gc.n_head, gc.n_embd)
    both = bench_training({"ours": type(gpt)(gc), "plain": plain_gpt}, batch, args.device, peak)
    figures["training"], figures["training_plain_gpt"] = both["ours"], both["plain"]
    if use_bf16(cfg["train"]["dtype"], args.device):
        # MFU still against the fp32 peak
        figures["training_bf16"] = bench_training({"ours": type(gpt)(gc)}, batch, args.device, peak, bf16=True)["ours"]
    t, plain, g = figures["training"], figures["training_plain_gpt"], figures["generation"]
    figures["targets"] = {"cache_guided_at_least_5x_reference": g["speedup_guided"] >= 5,
                          "guidance_at_most_1.5x_unguided": g["guidance_cost"] <= 1.5,
                          "training_at_least_plain_gpt": t["tokens_per_s"] >= plain["tokens_per_s"]}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"matmul peak (fp32, {args.device}, {figures['threads']} threads): {peak / 1e9:.1f} GFLOP/s")
        print(f"training, batch {t['batch']} x T {t['T']}: {t['tokens_per_s']:.0f} tokens/s, MFU {t['mfu']:.1%} "
              f"({t['params'] / 1e6:.2f}M params); plain GPT of the same size {plain['tokens_per_s']:.0f} tokens/s, "
              f"MFU {plain['mfu']:.1%} ({plain['params'] / 1e6:.2f}M params); "
              f"peak memory +{t['memory']['above_start_mb']:.0f} MB")
        if "training_bf16" in figures:
            print(f"training under bf16 autocast (the run's train.dtype): "
                  f"{figures['training_bf16']['tokens_per_s']:.0f} tokens/s, "
                  f"{figures['training_bf16']['tokens_per_s'] / t['tokens_per_s']:.2f}x float32")
        print(f"generation, batch {g['batch']}: reference {g['reference_guided']:.1f} img/s, "
              f"KV cache {g['cache']:.1f}, "
              f"KV cache + guidance {g['cache_guided']:.1f} ({g['speedup_guided']:.1f}x the reference; "
              f"guidance costs {g['guidance_cost']:.2f}x); "
              f"peak memory +{g['memory']['above_start_mb']:.0f} MB")
        print(f"generation bound at the matmul peak: {g['bound_guided']:.0f} img/s (guided); "
              f"reached {g['fraction_of_bound']:.1%}")
        print("targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in figures["targets"].items()))
    if args.profile:
        profile(gpt, batch, vocab, prompts, sample_cfg, args.device)


if __name__ == "__main__":
    main()
