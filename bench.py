"""
Performance figures of a trained run on this machine: generation images/s for the slow reference
sampler, the KV-cache sampler, and the KV-cache sampler with batched classifier-free guidance; and
training throughput of the GPT in tokens/s.

    python bench.py                       # uses out/shapes_cpu (train it first)
    python bench.py out/shapes_cpu --json # one JSON object
"""

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

import data
from generate import RunError, SampleConfig, generate, generate_reference, load_run


def images_per_s(fn, n_images, repeats=1):
    fn()  # warm-up (allocations, thread pools)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n_images * repeats / (time.perf_counter() - t0)


def bench_generation(gpt, vocab, tokenizer, sample_cfg, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [data.encode_text(tokenizer, data.sample_example(rng, split="dev").prompt) for _ in range(batch)]
    guided = replace(sample_cfg, cfg_scale=sample_cfg.cfg_scale if sample_cfg.cfg_scale != 1.0 else 1.5)
    plain = replace(sample_cfg, cfg_scale=1.0)
    out = {
        "reference_guided": images_per_s(lambda: [generate_reference(gpt, vocab, p, guided, seed) for p in prompts[:4]], len(prompts[:4])),
        "cache": images_per_s(lambda: generate(gpt, vocab, prompts, plain, seed), batch, 2),
        "cache_guided": images_per_s(lambda: generate(gpt, vocab, prompts, guided, seed), batch, 2),
    }
    out["speedup_guided"] = out["cache_guided"] / out["reference_guided"]
    out["guidance_cost"] = out["cache"] / out["cache_guided"]  # time with guidance / time without
    return out


def bench_training(gpt, steps=10, batch=32, T=128, seed=0):
    """Tokens/s of forward + backward + AdamW step on random tokens of the run's shapes."""
    torch.manual_seed(seed)
    model = type(gpt)(gpt.cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, gpt.cfg.vocab_size, (batch, T))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"tokens_per_s": steps * batch * (T - 1) / (time.perf_counter() - t0), "batch": batch, "T": T}


def main():
    p = argparse.ArgumentParser(description="Performance figures of a trained run.")
    p.add_argument("run_dir", nargs="?", default="out/shapes_cpu")
    p.add_argument("--json", action="store_true")
    p.add_argument("--batch", type=int, default=16, help="images generated together")
    args = p.parse_args()
    try:
        cfg, tokenizer, vocab, vq, gpt = load_run(args.run_dir)
    except RunError as e:
        raise SystemExit(f"error: {e}")
    figures = {"threads": torch.get_num_threads(), "params": gpt.num_params(),
               "generation_images_per_s": bench_generation(gpt, vocab, tokenizer, SampleConfig(**cfg["sample"]), args.batch),
               "training": bench_training(gpt)}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        g = figures["generation_images_per_s"]
        print(f"generation, batch {args.batch}: reference {g['reference_guided']:.1f} img/s, KV cache {g['cache']:.1f}, "
              f"KV cache + guidance {g['cache_guided']:.1f} ({g['speedup_guided']:.1f}x the reference; guidance costs {g['guidance_cost']:.2f}x)")
        print(f"training: {figures['training']['tokens_per_s']:.0f} tokens/s ({figures['params'] / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    main()
