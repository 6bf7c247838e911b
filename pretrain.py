"""
The lm stage: pretraining the unified GPT on the token-sequence mix (pairs of the shapes world or of your image
folder, and interleaved episodes when train.episode_share > 0), resumable from a checkpoint and data-parallel
under torchrun. train.py runs it as the stage `lm`; tests/test_scale.py checks that resuming is exact and that
two processes train as one.
"""

import datetime
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import episodes
from config import ConfigError
from data import Vocab
from generate import load_weights, read_tensors, save_atomic
from model import GPT, VQ, cosine_lr, token_ce, use_bf16


def autocast(cfg, device):
    kind = device.split(":")[0]  # "cuda:1" -> "cuda"
    return torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=use_bf16(cfg.dtype, device))


def open_folder(cfgs):
    """The run's image folder -> (Folder, train indices, held-out indices), with the skipped files named."""
    try:
        folder = data.load_folder(cfgs["train"].data_dir, cfgs["vq"].image_size)
    except ValueError as e:
        raise ConfigError(f"train.data_dir: {e}") from None
    if folder.skipped:
        print(f"{cfgs['train'].data_dir}: skipped {len(folder.skipped)} file(s): "
              + ", ".join(f"{n} ({why})" for n, why in folder.skipped[:5])
              + (" ..." if len(folder.skipped) > 5 else ""))
    dev = data.folder_dev(folder.names)
    train = sorted(set(range(len(folder.names))) - set(dev))
    if not train:
        raise ConfigError(f"train.data_dir: {cfgs['train'].data_dir} has only {len(folder.names)} usable image(s): "
                          "too few to hold some out")
    return folder, train, dev


# -----------------------------------------------------------------------------
# data-parallel training: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in the environment


@dataclass
class Dist:
    rank: int = 0
    world: int = 1  # processes; each takes 1/world of every global batch of the lm stage
    local_rank: int = 0  # the GPU of this process on its node

    @property
    def master(self):  # the one process that prints and writes files
        return self.rank == 0


def dist_setup(tc, device):
    """-> (Dist, device). One process unless launched by torchrun with more than one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Dist(), device
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)))
    if tc.lm_batch % world:
        raise ConfigError(f"train.lm_batch={tc.lm_batch} is the global batch: it must divide among {world} processes")
    if tc.episode_share and tc.episode_batch % world:
        raise ConfigError(f"train.episode_batch={tc.episode_batch} is the global batch of an episode step: it must "
                          f"divide among {world} processes")
    if device == "cuda":
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
    # long timeout: the other ranks wait at a barrier while rank 0 trains the tokenizer and the VQ
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=d.rank,
                                         world_size=world, timeout=datetime.timedelta(hours=3))
    return d, device


def dist_barrier(dist):
    if dist.world > 1:
        torch.distributed.barrier()


def dist_mean(x, dist):
    """The mean of a tensor over the processes (x itself in one process)."""
    if dist.world == 1:
        return x
    x = x.detach().clone()
    torch.distributed.all_reduce(x)
    return x / dist.world


# -----------------------------------------------------------------------------
# resumable checkpoints

CKPT = "lm_ckpt.safetensors"


def save_checkpoint(path, model, opt, state, cfg_json):
    """Everything the lm stage needs to continue exactly, in ONE safetensors file so that one atomic rename
    covers it all: weights, AdamW moments and step counts, the torch RNG (a uint8 tensor); and in the file's
    metadata, as JSON: the step, the data position, the numpy RNG state and the config that made it."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": v for k, v in s.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_atomic(tensors, path, metadata={"state": json.dumps(state), "config": json.dumps(cfg_json)})


def load_checkpoint(path, model, opt, cfg_json, config_diff):
    """Restore a save_checkpoint file into model and opt; returns its state dict. Refuses a checkpoint made
    with another config, naming the difference (config_diff(old json, new json) -> ["section.key: a -> b"])."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ConfigError(f"{path} is not a readable checkpoint ({e}); delete it to start the lm stage again") from None
    diff = config_diff(json.loads(meta["config"]), cfg_json)
    if diff:
        raise ConfigError(f"{path} is a checkpoint of another config ({'; '.join(diff[:5])}). Resume with the "
                          f"config that made it, or delete it to start the lm stage again.")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    sd = opt.state_dict()
    sd["state"] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            sd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return json.loads(meta["state"])


# -----------------------------------------------------------------------------
# the lm stage


def lm_datasets(cfgs, tokenizer, vq, device):
    """(train, held-out) LMData of the shapes world or of the run's image folder."""
    tc = cfgs["train"]
    if not tc.data_dir:
        return (data.world_data(tc.lm_examples, tc.seed, "train", tokenizer, vq, device, tc.tail_keep),
                data.world_data(tc.eval_examples, tc.seed + 1, "dev", tokenizer, vq, device, tc.tail_keep))
    folder, train, dev = open_folder(cfgs)
    if len(train) < tc.lm_batch:
        raise ConfigError(f"train.data_dir has {len(train)} training images (after holding out {len(dev)}), fewer than "
                          f"train.lm_batch={tc.lm_batch}: lower train.lm_batch or add images")
    return data.folder_data(folder, train, tokenizer, vq, device), data.folder_data(folder, dev, tokenizer, vq, device)


def lm_loss(model, batch, denom=None):
    """Mean cross-entropy over a data.Batch's target tokens; also the text and image parts separately (for the
    log). denom: the number of target tokens to divide by (default: this batch's)."""
    ce = token_ce(model(batch.x, patch=batch.patch, tags=batch.tags, context=batch.context), batch.y)  # (B, T)
    w = batch.weight
    loss = (ce * w).sum() / (w.sum() if denom is None else denom)
    with torch.no_grad():
        parts = {name: ((ce * w * (batch.modality == m)).sum() / (w * (batch.modality == m)).sum().clamp(min=1)).item()
                 for name, m in (("text", data.TEXT), ("image", data.IMAGE))}
    return loss, parts


NEW_MODULES = ("image_features.", "resampler.", "syncs.")  # what an interleaved GPT has beyond a plain one


def load_init(model, run_dir, lm_init):
    """The lm stage continues lm_init's GPT: its weights, and fresh ones for the modules it lacks (the resampler and
    synchronizers of an interleaved config); the run must use lm_init's tokenizer and VQ."""
    for name in ("tokenizer.json", "vq.safetensors"):
        a, b = os.path.join(lm_init, name), os.path.join(run_dir, name)
        if not os.path.exists(a) or not os.path.exists(b) or open(a, "rb").read() != open(b, "rb").read():
            raise ConfigError(f"train.lm_init={lm_init}: {run_dir} must hold the same {name} as it "
                              f"(cp {a} {run_dir}/ before the tokenizer and vq stages)")
    tensors, _ = read_tensors(os.path.join(lm_init, "gpt.safetensors"))
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise ConfigError(f"train.lm_init={lm_init}: its GPT does not fit this [gpt] config: {str(e)[:300]}") from None
    bad = [k for k in missing if not k.startswith(NEW_MODULES)] + unexpected
    if bad:
        raise ConfigError(f"train.lm_init={lm_init}: its GPT does not fit this [gpt] config ({', '.join(bad[:3])})")


def train_lm(cfgs, run_dir, device, metrics, dist, cfg_json, config_diff):
    """The pretraining loop; every process of a data-parallel run runs it on its share of each global batch.
    Resumes from RUN_DIR/lm_ckpt.safetensors if there is one (cfg_json: the run's config.json, checked against
    the checkpoint's by config_diff). Returns the GPT (unwrapped) and the figures."""
    tc, gc = cfgs["train"], cfgs["gpt"]
    tokenizer = data.load_tokenizer(os.path.join(run_dir, "tokenizer.json"))
    vq = load_weights(VQ(cfgs["vq"]).to(device), os.path.join(run_dir, "vq.safetensors")).eval()
    vocab = Vocab(tokenizer.get_vocab_size(), cfgs["vq"].codebook_size,
                  data.region_tagger(tokenizer, vq.cfg.n_codes) if gc.n_tags else None)
    torch.manual_seed(tc.seed)
    model = GPT(gc).to(device)
    if tc.lm_init:
        load_init(model, run_dir, tc.lm_init)
    print(f"GPT: {model.num_params() / 1e6:.2f}M parameters, "
          f"vocabulary {vocab.size} ({vocab.text_size} text + {vocab.codebook_size} codes)")
    train_ds, val_ds = lm_datasets(cfgs, tokenizer, vq, device)
    longest = (max(max(len(p) + len(q), len(c)) for p, q, c in zip(train_ds.prompt, train_ds.plan, train_ds.caption))
               + vq.cfg.n_codes + 5)  # + specials
    if longest > gc.block_size:
        raise ConfigError(f"the longest training sequence has {longest} tokens > gpt.block_size={gc.block_size}: "
                          "raise gpt.block_size")
    val_rng = np.random.default_rng(tc.seed + 2)
    val_batches = [data.make_batch(val_ds, b, vocab, device)
                   for b in data.epoch_batches(val_ds, val_rng, tc, min(tc.lm_batch, len(val_ds)))]
    if tc.episode_share:  # the episodes' own held-out batches, so that their loss is read apart from the pairs'
        ep_args = (tokenizer, vocab, vq, device, gc.ctx_tokens, gc.block_size, tc.episode_images)
        ep_train = episodes.episode_data(tc.episode_examples, tc.seed, "train", *ep_args, tc.tail_keep)
        ep_val = episodes.episode_data(max(tc.episode_batch, tc.episode_examples // 16), tc.seed + 1, "dev", *ep_args,
                                       tc.tail_keep)
        ep_batch = lambda seqs: episodes.make_batch(seqs, vocab, vq.cfg.n_codes, gc.ctx_tokens, device)
        val_episodes = [ep_batch(ep_val[i:i + tc.episode_batch]) for i in range(0, len(ep_val), tc.episode_batch)]
    mult = lambda n: tc.new_lr_mult if tc.lm_init and n.startswith(NEW_MODULES) else 1.0
    groups = [{"params": [p for n, p in model.named_parameters() if (p.dim() >= 2) == matrix and mult(n) == m],
               "weight_decay": tc.weight_decay if matrix else 0.0, "lr_mult": m}
              for matrix in (True, False) for m in sorted({mult(n) for n, _ in model.named_parameters()})]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lm_lr, betas=(0.9, 0.95),
                            fused=device.startswith("cuda"))
    rng = np.random.default_rng(tc.seed)  # draws each epoch's formats and order:
    #                                       the data position is (its state, batches done)
    start, batches, done, epoch_state = 0, [], 0, None
    ckpt = os.path.join(run_dir, CKPT)
    if os.path.exists(ckpt):
        state = load_checkpoint(ckpt, model, opt, cfg_json, config_diff)
        start, epoch_state, done = state["step"], state["epoch_rng"], state["batches_done"]
        if epoch_state is not None:  # None: only episode steps so far
            rng.bit_generator.state = epoch_state
            batches = data.epoch_batches(train_ds, rng, tc)  # the same epoch again, minus the batches it had used
            del batches[len(batches) - done:]
        print(f"resuming the lm stage at step {start} from {ckpt}")
        metrics.log(stage="lm", step=start, resumed_from=ckpt)
    # DDP averages the gradients over the processes after every backward; the model saved is the plain one.
    # A pair step leaves the interleaved modules without gradients, which DDP must be told to expect.
    unused = any(n.startswith(NEW_MODULES) for n, _ in model.named_parameters())
    wrapped = (DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None,
                                       find_unused_parameters=unused)
               if dist.world > 1 else model)
    step_fn = torch.compile(wrapped) if tc.compile else wrapped
    tokens, t0, ev = 0, time.time(), {}

    def evaluate_loss():
        model.eval()
        with torch.no_grad(), autocast(tc, device):
            res = [lm_loss(model, b) for b in val_batches]
        model.train()
        out = {"val_loss": float(np.mean([r[0].item() for r in res])),
               "val_text": float(np.mean([r[1]["text"] for r in res])),
               "val_image": float(np.mean([r[1]["image"] for r in res]))}
        if tc.episode_share:
            model.eval()
            with torch.no_grad(), autocast(tc, device):
                out["val_episode"] = float(np.mean([lm_loss(model, b)[0].item() for b in val_episodes]))
            model.train()
        return out

    model.train()
    for step in (bar := tqdm(range(start, tc.lm_steps), initial=start, total=tc.lm_steps,
                             desc="lm", mininterval=2, disable=not dist.master)):
        if int((step + 1) * tc.episode_share) > int(step * tc.episode_share):  # an episode step: drawn by the
            #                                                                    step alone, so resuming is exact
            pick = np.random.default_rng((tc.seed, step)).choice(len(ep_train), tc.episode_batch, replace=False)
            batch = ep_batch([ep_train[i] for i in pick[dist.rank::dist.world]])
        else:
            if not batches:  # a new epoch: new formats, a new shuffle
                epoch_state, done = rng.bit_generator.state, 0
                batches = data.epoch_batches(train_ds, rng, tc)
            items = batches.pop()
            done += 1
            batch = data.make_batch(train_ds, items[dist.rank::dist.world], vocab, device)  # this process's share
        lr = cosine_lr(step, tc.lm_lr, tc.lm_warmup, tc.lm_steps, tc.lm_min_lr)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_mult"]
        # each process divides its token loss sum by the global batch's token count / world, and DDP
        # averages over the world: the gradient of the global batch's mean, as in one process
        denom = dist_mean(batch.weight.sum(), dist)
        with autocast(tc, device):
            loss, parts = lm_loss(step_fn, batch, denom)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        loss = dist_mean(loss.detach(), dist)  # the global batch's loss (the text/image parts are this process's)
        tokens += int(batch.weight.numel()) * dist.world
        if step % tc.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            metrics.log(stage="lm", step=step, lr=lr, loss=loss.item(), **parts)
        if dist.master and ((step + 1) % tc.eval_every == 0 or step == tc.lm_steps - 1):
            ev = evaluate_loss()
            metrics.log(stage="lm", step=step + 1, **ev)
            tqdm.write(f"step {step + 1}: train {loss.item():.3f}  held-out {ev['val_loss']:.3f} "
                       f"(text {ev['val_text']:.3f}, image {ev['val_image']:.3f})")
        if dist.master and tc.ckpt_every and (step + 1) % tc.ckpt_every == 0 and step + 1 < tc.lm_steps:
            save_checkpoint(ckpt, model, opt, {"step": step + 1, "epoch_rng": epoch_state, "batches_done": done},
                            cfg_json)
    seconds = time.time() - t0
    return model, {"params": model.num_params(), "train_loss": loss.item(), **ev, "tokens_per_s": tokens / seconds,
                   "bf16": use_bf16(tc.dtype, device),  # dtype=auto resolves per machine: say what this run used
                   "steps": tc.lm_steps, "resumed_at": start, "processes": dist.world}


