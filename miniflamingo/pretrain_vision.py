"""`python -m miniflamingo pretrain-vision`: contrastive pretraining of the vision encoder on image-text
pairs (Flamingo App. B.1.3), then a held-out report. The model and loss are in contrastive.py.

Notable features
- Data: the synthetic world's `vision_pairs` (named shapes plus 48 blob shapes), or any folder with
  captions.jsonl (`{"image": relpath, "caption": str}` per line), read by readers.py as `train` reads it
  (letterboxed; errors name the file and line; every caption's length checked before training).
- Hard negatives (a deviation, see `batch_indices`): part of each batch is groups of captions that differ
  in one word, so that shape, not just colour and position, tells pairs apart. `--size-twins` (off by
  default) makes size tell them apart too: see batch_indices.
- AdamW with warmup + cosine, adaptive gradient clipping (agc.py) on both encoders.
- Deterministic: the batch of a step is a function of (seed, step); `--resume` continues from the last
  atomic checkpoint RUN/vision.pt to the same weights as an uninterrupted run (with --steps).
- Report: zero-shot colour and shape accuracy (CLIP-style prompt ensembles against the text encoder) on
  held-out single-object images, and image->text retrieval R@1 on held-out pairs; RUN/vision_eval.json
  (not eval.json: the demo keeps every stage in one folder, and eval.json is the few-shot table's).
- RUN/vision.pt = {"model": VisionEncoder state_dict, "config": asdict(VisionConfig), "contrastive": ...,
  "optimizer", "step", ...}; `miniflamingo.vision.load_pretrained(path)` gives the encoder back.

Shapes: N images, B batch, L text length, Dj joint embedding width.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from miniflamingo.agc import adaptive_grad_clip
from miniflamingo.config import FlamingoConfig
from miniflamingo.contrastive import ContrastiveConfig, ContrastiveModel
from miniflamingo.data import DataError
from miniflamingo.readers import captions_jsonl, read_captions
from miniflamingo.trainutil import (
    avoid_cudnn_attention,
    load_checkpoint,
    release_freed_memory,
    resume_mismatches,
    save_checkpoint,
    write_json,
)

# What a resumed run must share with the checkpoint's (with the vision config): what defines its data,
# batches and schedule. --steps and --seconds may grow (the schedule then stretches from where it is).
RESUME_ARGS = ("preset", "data", "data_format", "n_train", "size_twins", "seed", "batch_size",
               "hard_fraction", "hard_group", "lr", "weight_decay", "agc")
# How a --data folder becomes pairs and a held-out set; saved with the run's args, so that a checkpoint
# from an older reading (centre-cropped, the file's first tenth held out) is not resumed on this one.
DATA_FORMAT = "readers.read_captions, letterboxed; held-out tenth after a seed-0 shuffle"

# ----------------------------------------------------------------------------- data


def images_to_tensor(images) -> torch.Tensor:
    """A list of uint8 (H, W, 3) arrays -> uint8 (N, 3, H, W); converted to float per batch (memory).
    Copied one by one into the result: a stack, then its channels-first copy, held two more copies of
    the pixels at once (the demo's 40k images: 0.49 GB each)."""
    if not len(images):
        raise ValueError("expected at least one image")
    shape, out = np.shape(images[0]), None
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8 or img.shape != shape:
            raise ValueError(f"expected images uint8 (H, W, 3), all of the first one's shape {shape}; "
                             f"image {i} is {img.shape} {img.dtype}")
        if out is None:
            out = torch.empty((len(images), 3, *shape[:2]), dtype=torch.uint8)
        out[i] = torch.from_numpy(img).permute(2, 0, 1)
    return out


def encode_texts(tok, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> ids (N, L) long padded with eot_id, mask (N, L) bool. Raw data text: encode_ordinary."""
    rows = [tok.encode_ordinary(t) for t in texts]
    too_long = [t for t, r in zip(texts, rows) if len(r) > max_len or not r]
    if too_long:
        raise ValueError(f"{len(too_long)} captions are empty or longer than max_len={max_len} tokens, "
                         f"e.g. {too_long[0]!r}")
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), tok.eot_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return ids, mask


def load_captions_folder(folder: str | Path, image_size: int) -> list[dict]:
    """A captions folder (captions.jsonl of {"image": relpath, "caption": str} per line; or the file) ->
    pairs, read by readers.read_captions as `train` and `ask` read them: each image letterboxed to
    image_size (the whole picture kept, black bars where its aspect ratio differs; the encoder trains on
    what Flamingo will see), captions non-empty. Errors name the file and line."""
    pairs, _ = read_captions(folder, image_size)
    if not pairs:
        raise DataError(f"{folder}: no pairs")
    return [{**p, "attrs": None} for p in pairs]


def check_caption_lengths(tok, pairs: list[dict], max_len: int) -> None:
    """Every caption fits the text tower (max_len tokens), held-out ones too, checked before training
    starts: a long held-out caption would otherwise stop the run at its first evaluation."""
    for p in pairs:
        n = len(tok.encode_ordinary(p["caption"]))
        if not 0 < n <= max_len:
            raise DataError(f"{p.get('where', 'a caption')}: caption of {n} tokens; the text tower takes "
                            f"1 to {max_len}: {p['caption'][:60]!r}")


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def embed_images(model: ContrastiveModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> (N, Dj)."""
    dev = next(model.parameters()).device
    return torch.cat([model.embed_images(images[i:i + batch_size].to(dev).float() / 255)
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def embed_texts(model: ContrastiveModel, tok, texts: list[str]) -> torch.Tensor:
    ids, mask = encode_texts(tok, texts, model.cfg.max_len)
    dev = next(model.parameters()).device
    return model.embed_texts(ids.to(dev), mask.to(dev))


@torch.no_grad()
def zero_shot_accuracy(model, tok, img_emb: torch.Tensor, labels: list[str],
                       prompts: dict[str, list[str]]) -> float:
    """CLIP-style zero-shot classification: each class is the mean embedding of its prompts (prompt
    ensembling), renormalised; an image takes the class of highest cosine similarity."""
    names = sorted(prompts)
    cls = torch.stack([F.normalize(embed_texts(model, tok, prompts[c]).mean(0), dim=0) for c in names])
    # cls (K, Dj): one unit vector per class
    pred = (img_emb @ cls.T).argmax(1)  # (N,)
    return sum(names[p] == y for p, y in zip(pred.tolist(), labels)) / max(1, len(labels))


@torch.no_grad()
def retrieval_r1(img_emb: torch.Tensor, txt_emb: torch.Tensor, captions: list[str]) -> float:
    """Image->text R@1 over a gallery of the held-out captions: a hit when the top caption is the image's
    own, or a word-for-word identical one (the world repeats captions; the text cannot tell them apart)."""
    top = (img_emb @ txt_emb.T).argmax(1)  # (N,)
    return sum(captions[j] == c for j, c in zip(top.tolist(), captions)) / max(1, len(captions))


def class_prompts(colours: list[str], shapes: list[str]) -> tuple[dict, dict]:
    """Zero-shot prompts in the captions' words ("a red circle", like CLIP's "a photo of a dog"), ensembled
    over the other attribute: "red" is the mean of "a red circle", "a red square", ...; "circle" the mean
    over colours."""
    colour = {c: [f"a {c} {s}" for s in shapes] for c in colours}
    shape = {s: [f"a {c} {s}" for c in colours] for s in shapes}
    return colour, shape


def evaluate(model, tok, pairs: list[dict], zero_shot_pairs: list[dict] | None = None, colours=None,
             shapes=None) -> dict:
    """Held-out pairs -> {"retrieval_r1", "colour_acc", "shape_acc", counts}. Zero-shot accuracy uses the
    single-object images of `zero_shot_pairs`, labelled by their attrs (the object the caption names)."""
    model.eval()
    captions = [p["caption"] for p in pairs]
    img_emb = embed_images(model, images_to_tensor([p["image"] for p in pairs]))
    txt_emb = torch.cat([embed_texts(model, tok, captions[i:i + 256]) for i in range(0, len(captions), 256)])
    out = {"retrieval_r1": retrieval_r1(img_emb, txt_emb, captions), "n_retrieval": len(pairs)}
    if zero_shot_pairs and colours and shapes:
        single = [p for p in zero_shot_pairs if len(p["attrs"]["objects"]) == 1]
        single = [p for p in single if p["attrs"]["objects"][0]["shape"] in shapes
                  and p["attrs"]["objects"][0]["colour"] in colours]
        objs = [p["attrs"]["objects"][0] for p in single]
        emb = embed_images(model, images_to_tensor([p["image"] for p in single]))
        c_prompts, s_prompts = class_prompts(colours, shapes)
        out["colour_acc"] = zero_shot_accuracy(model, tok, emb, [o["colour"] for o in objs], c_prompts)
        out["shape_acc"] = zero_shot_accuracy(model, tok, emb, [o["shape"] for o in objs], s_prompts)
        out["n_zero_shot"] = len(single)
    return out


# ----------------------------------------------------------------------------- training


def get_lr(progress: float, lr: float, warmup: float = 0.05) -> float:
    """Linear warmup over the first 5% of the run, then cosine decay to lr / 10."""
    if progress < warmup:
        return lr * progress / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def one_word_neighbours(captions: list[str]) -> list[list[int]]:
    """For each caption, the other captions that differ from it in exactly one word ("a small red circle"
    vs "a small red square"): the hard negatives that `batch_indices` groups together."""
    groups: dict[tuple, list[int]] = {}
    words = [c.split() for c in captions]
    for i, w in enumerate(words):
        for k in range(len(w)):
            groups.setdefault((k, *w[:k], "*", *w[k + 1:]), []).append(i)
    out: list[set[int]] = [set() for _ in captions]
    for members in groups.values():
        for i in members:
            out[i].update(j for j in members if words[j] != words[i])  # an identical caption is a positive
    return [sorted(n) for n in out]


def batch_indices(n: int, batch_size: int, seed: int, step: int, neighbours=None, hard_fraction: float = 0.5,
                  group: int = 8, partners=None) -> torch.Tensor:
    """The batch of a step is a pure function of (seed, step): a resumed run sees the same batches.

    Deviation from the paper (whose web batches are random): a share `hard_fraction` of the batch is
    groups of `group` captions, an anchor and random one-word neighbours of it. In a random batch of the
    world's captions, colour and position alone tell the pairs apart, so the encoder is never asked about
    shape; captions that differ only in the shape word make it ask (hard negatives, as in NegCLIP,
    Yuksekgonul et al. 2023). With 56 shapes against 8 colours and 2 sizes, most neighbours differ in shape;
    taking the differing word from each slot in turn instead (colour, size, shape, position) learned shape
    far more slowly (zero-shot shape 31% against 71% after 200 steps).

    `partners` ({index: index}, World.size_twin's pairs, `--size-twins`) join the random rest of the batch:
    each random pick brings its partner. Why: without them size held 0.6% of the between-class variance
    of the resampler's latents (position 7%, shape 47%), and Flamingo never learned it (size questions at
    chance, even about one object, though a linear probe reads size from the features at 99%). Measured
    (seed 0, 550 steps on 40k pairs, then the demo's Flamingo, 100 episodes): with twins for half the
    pairs size questions 53% -> 81% and 5-way binding 96% -> 80%, as zero-shot shape fell 0.96 -> 0.75
    (for 15% of the pairs: 81%, 89%, 0.85): in this step budget size is learned at shape's expense, so the
    demo leaves them off. Twins in the hard groups (taking shape negatives' places): size 81-88%, 5-way
    binding 82-89%."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    perm = torch.randperm(n, generator=g).tolist()
    hard: dict[int, None] = {}  # insertion-ordered set: an index appears once (its caption is its positive)
    n_hard = int(batch_size * hard_fraction) if neighbours else 0
    for a in perm:
        if len(hard) + group > n_hard:
            break
        if a in hard or not neighbours[a]:
            continue
        picks = torch.randperm(len(neighbours[a]), generator=g)[:group - 1].tolist()
        for j in [a] + [neighbours[a][k] for k in picks]:
            hard[j] = None
    rest: dict[int, None] = {}
    for i in perm:  # the rest at random, each with its partner (its size twin), if it has one
        if len(hard) + len(rest) >= batch_size:
            break
        if i in hard or i in rest:
            continue
        rest[i] = None
        j = partners.get(i) if partners else None
        if j is not None and j not in hard and len(hard) + len(rest) < batch_size:
            rest[j] = None
    return torch.tensor(list(hard) + list(rest))


def make_optimizer(model: ContrastiveModel, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # weights decay; gains, biases, temperature not
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def train(model, opt, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, args, log, start_step=0,
          start_elapsed=0.0, on_checkpoint=None, neighbours=None, on_eval=None,
          partners=None, on_step=None, data_name="the training pairs", ckpt_path=None) -> tuple[int, float]:
    """The loop: AdamW, warmup + cosine, AGC on the encoders. Stops after args.steps or args.seconds.
    on_step(step), if given, runs after every optimizer step (the demo raises the thread count there).
    A NaN or infinite loss stops the run before its update, naming the step, `data_name` and the last
    good checkpoint (the last one on_checkpoint wrote to `ckpt_path`, or the one resumed from)."""
    model.train()
    clipped = model.clipped_parameters()
    step, t0 = start_step, time.perf_counter() - start_elapsed
    last_good = f"{ckpt_path} (step {step})" if step and ckpt_path else "none"
    while True:
        elapsed = time.perf_counter() - t0
        progress = max(step / args.steps if args.steps else 0.0,
                       elapsed / args.seconds if args.seconds else 0.0)
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = get_lr(progress, args.lr)
        idx = batch_indices(len(images), args.batch_size, args.seed, step, neighbours, args.hard_fraction,
                            args.hard_group, partners)
        b_ids, b_mask = ids[idx], mask[idx]
        L = int(b_mask.sum(1).max())  # trim padding shared by the whole batch
        b_ids, b_mask = b_ids[:, :L], b_mask[:, :L]
        # deviation (see contrastive_loss): identical captions are positives of each other
        same = (b_ids[:, None, :] == b_ids[None, :, :]).all(-1)  # (B, B)
        loss = model(images[idx].float() / 255, b_ids, b_mask, positives=same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        n_clip = adaptive_grad_clip(clipped, args.agc, eps=1e-3) if args.agc > 0 else 0
        value = loss.item()  # read every step: a small model, and the parameters must stay finite
        if not math.isfinite(value):
            raise SystemExit(f"pretrain-vision: loss is {value} at step {step + 1} on a batch of "
                             f"{data_name}; last good checkpoint: {last_good}")
        opt.step()
        step += 1
        if on_step is not None:
            on_step(step)
        if step % args.log_every == 0 or step == 1:
            rec = {"step": step, "loss": round(value, 4), "inv_temp": round(model.inv_temp().item(), 2),
                   "lr": round(opt.param_groups[0]["lr"], 6), "agc_clipped": n_clip,
                   "elapsed": round(time.perf_counter() - t0, 1)}
            log(rec)
        if on_checkpoint and args.ckpt_every and step % args.ckpt_every == 0:
            on_checkpoint(step, time.perf_counter() - t0, opt)
            last_good = f"{ckpt_path} (step {step})"
        if on_eval and args.eval_every and step % args.eval_every == 0:
            t_eval = time.perf_counter()
            on_eval(step)
            t0 += time.perf_counter() - t_eval  # evaluation time is not training time
            model.train()
    return step, time.perf_counter() - t0


# ----------------------------------------------------------------------------- the command


def load_data(args, image_size: int) -> dict:
    """{"train", "eval" (retrieval), "zero_shot", "colours", "shapes"}: the synthetic world by default, or a
    captions folder (then 10% of it is held out for retrieval, and there is no zero-shot test)."""
    if args.data:
        pairs = load_captions_folder(args.data, image_size)
        if len(pairs) < 2:
            raise DataError(f"{args.data}: one pair; need at least 2 (a tenth is held out)")
        # a fixed shuffle (not --seed's: the held-out set stays the same across seeds), so the held-out
        # tenth is not whatever the file happens to begin with
        order = np.random.default_rng(0).permutation(len(pairs))
        pairs = [pairs[i] for i in order]
        n_eval = max(1, len(pairs) // 10)
        return {"train": pairs[n_eval:], "eval": pairs[:n_eval], "zero_shot": None, "colours": None,
                "shapes": None, "partners": None}
    from miniflamingo import world as W  # imported here: the command works on a folder without it

    world = W.World(seed=0, image_size=image_size)  # the default world; --seed varies the draws
    # retrieval on held-out pairs captioned as in training; zero-shot on held-out images of the named shapes
    train = world.vision_pairs(args.n_train, split="train", seed=args.seed)
    n, n_twins = len(train), int(args.size_twins * len(train))
    train += [world.size_twin(train[i], i, "train", args.seed) for i in range(n_twins)]  # pair i's: n + i
    partners = {**{i: n + i for i in range(n_twins)}, **{n + i: i for i in range(n_twins)}}
    return {"train": train, "partners": partners,
            "eval": world.vision_pairs(args.n_eval, split="test", seed=args.seed),
            "zero_shot": world.image_text_pairs(args.n_eval, split="test", seed=args.seed),
            "colours": list(W.COLOURS), "shapes": list(W.SHAPES)}


def main(argv: list[str] | None = None, on_step=None) -> int:
    """The command. on_step(step): called after every training step (see `train`)."""
    ap = argparse.ArgumentParser(
        prog="python -m miniflamingo pretrain-vision",
        description="Contrastive image-text pretraining of the vision encoder (Flamingo App. B.1.3). "
                    "Extra --vision.FIELD=VALUE arguments override the preset's vision config.")
    ap.add_argument("--run", default="runs/vision",
                    help="output folder: vision.pt, log.jsonl, vision_eval.json")
    ap.add_argument("--preset", default="tiny", help="FlamingoConfig preset whose vision config is trained")
    ap.add_argument("--data", default=None,
                    help="folder with captions.jsonl, or the file (default: the synthetic world)")
    ap.add_argument("--steps", type=int, default=400, help="training steps (0 = until --seconds)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="also stop after this much training time (the schedule follows the sooner end)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--inv-temp", type=float, default=10.0, help="initial inverse temperature (trained)")
    ap.add_argument("--agc", type=float, default=0.1, help="AGC lambda (0 = off); NFNet: 0.01 at batch 4096")
    ap.add_argument("--hard-fraction", type=float, default=0.75,
                    help="share of each batch made of groups of one-word-different captions (0 = random)")
    ap.add_argument("--hard-group", type=int, default=8, help="captions per hard-negative group")
    ap.add_argument("--n-train", type=int, default=20000, help="training pairs drawn from the world")
    ap.add_argument("--size-twins", type=float, default=0.0,
                    help="share of the world's pairs that also come with a size twin (see batch_indices)")
    ap.add_argument("--n-eval", type=int, default=2000, help="held-out pairs for zero-shot and retrieval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch's default); the tiny model's small convs gain little from "
                         "more, and on a busy machine a second thread mostly waits (benchmarks/vision.py)")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=0,
                    help="held-out evaluation every N steps (0 = at the end only)")
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--resume", action="store_true", help="continue from RUN/vision.pt")
    args, extra = ap.parse_known_args(argv)
    if not args.steps and not args.seconds:
        ap.error("give --steps or --seconds")
    args.data_format = DATA_FORMAT if args.data else None  # saved with the args: see RESUME_ARGS
    if args.size_twins and args.data:
        ap.error("--size-twins re-renders the synthetic world's scenes; a --data folder has none")
    if not 0.0 <= args.size_twins <= 1.0:
        ap.error(f"--size-twins is a share of the pairs, in [0, 1]; got {args.size_twins}")
    if args.threads:
        torch.set_num_threads(args.threads)
    bad = [a for a in extra if not a.startswith("--vision.")]
    if bad:
        ap.error(f"unknown arguments {bad} (config overrides must look like --vision.FIELD=VALUE)")
    vision_cfg = FlamingoConfig.preset(args.preset).override(extra).vision
    from miniflamingo.tokenizer import Tokenizer

    tok = Tokenizer.default()
    cfg = ContrastiveConfig(vocab_size=tok.n_vocab, init_inv_temp=args.inv_temp)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = run / "vision.pt", run / "log.jsonl"

    t = time.perf_counter()
    try:
        data = load_data(args, vision_cfg.image_size)
        check_caption_lengths(tok, data["train"] + data["eval"], cfg.max_len)
    except DataError as e:
        raise SystemExit(f"pretrain-vision: {e}") from None
    train_pairs = data["train"]
    images = images_to_tensor([p["image"] for p in train_pairs])  # uint8 (N, 3, H, W)
    for p in train_pairs:  # the tensor holds the pixels now; two copies doubled the stage's memory
        del p["image"]
    release_freed_memory()  # the 40k arrays' heap pages, kept mapped otherwise through the whole stage
    ids, mask = encode_texts(tok, [p["caption"] for p in train_pairs], cfg.max_len)
    print(f"data: {len(train_pairs)} training pairs, {len(data['eval'])} held out, "
          f"{images.shape[-1]}x{images.shape[-2]} images ({time.perf_counter() - t:.1f}s)")

    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    avoid_cudnn_attention(device)  # the text tower's attention (contrastive.py)
    model = ContrastiveModel(vision_cfg, cfg).to(device)  # initialised on the CPU: the same on any device
    images, ids, mask = images.to(device), ids.to(device), mask.to(device)  # uint8 images: 4x smaller
    opt = make_optimizer(model, args.lr, args.weight_decay)
    step, elapsed = 0, 0.0
    if args.resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, map_location=device)
        # The same model and the same data stream, or resuming would silently train another run.
        differ = [f"vision config ({ck['config']} != {asdict(vision_cfg)})"] if ck["config"] != asdict(
            vision_cfg) else []
        differ += resume_mismatches(ck["args"], args, RESUME_ARGS)
        if differ:
            raise SystemExit(f"pretrain-vision: {ckpt_path} was trained with another {'; '.join(differ)}; "
                             f"use the same options to resume, or another --run")
        model.load_state_dict(ck["contrastive"]["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"].cpu())
        step, elapsed = ck["step"], ck["elapsed"]
        print(f"resumed from {ckpt_path} at step {step}")
    n_vision = sum(p.numel() for p in model.vision.parameters())
    n_text = sum(p.numel() for p in model.text.parameters())
    g = vision_cfg.grid_size
    print(f"vision encoder: {n_vision / 1e6:.2f}M parameters, grid {g}x{g}, Dv {vision_cfg.d_out}; "
          f"text encoder: {n_text / 1e6:.2f}M; on {device}")

    def log(rec: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if "eval" in rec:
            print(f"eval at step {rec.get('step', '')}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in rec["eval"].items() if isinstance(v, float)), flush=True)
        if "loss" in rec:
            print(f"step {rec['step']:5d}/{args.steps or '?'} | loss {rec['loss']:.4f} | "
                  f"inv_temp {rec['inv_temp']:6.2f} | lr {rec['lr']:.2e} | {rec['elapsed']:.0f}s", flush=True)

    def checkpoint(step: int, elapsed: float, opt, metrics=None) -> None:
        save_checkpoint(ckpt_path, {
            "model": model.vision.state_dict(), "config": asdict(vision_cfg),
            "contrastive": {"model": model.state_dict(), "config": asdict(cfg)},
            "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": step, "elapsed": elapsed,
            "args": {k: v for k, v in vars(args).items()}, "eval": metrics or {},
        })

    def held_out(n: int | None = None) -> dict:
        zs = data["zero_shot"][:n] if data["zero_shot"] else None
        return evaluate(model, tok, data["eval"][:n], zs, data["colours"], data["shapes"])

    def interim_eval(step: int) -> None:
        log({"step": step, "eval": held_out(args.n_eval // 2)})

    neighbours = one_word_neighbours([p["caption"] for p in train_pairs]) if args.hard_fraction > 0 else None
    step, elapsed = train(model, opt, images, ids, mask, args, log, step, elapsed, checkpoint, neighbours,
                          interim_eval, partners=data["partners"], on_step=on_step,
                          data_name=str(captions_jsonl(args.data)) if args.data else
                          f"the synthetic world's pairs (--seed {args.seed})", ckpt_path=ckpt_path)
    metrics = held_out()
    metrics = {"step": step, "train_seconds": round(elapsed, 1), **metrics}
    checkpoint(step, elapsed, opt, metrics)
    log({"step": step, "eval": metrics})
    write_json(metrics, run / "vision_eval.json", indent=2)  # atomic: never half-written
    shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    print(f"held-out: {shown}\nwrote {ckpt_path}")
    if metrics["n_retrieval"] < 10:  # R@1 picks among the held-out captions: among a handful, chance is high
        print(f"(retrieval R@1 over {metrics['n_retrieval']} held-out caption(s): chance is "
              f"{1 / metrics['n_retrieval']:.0%}; more held-out pairs tell more)")
    return 0
