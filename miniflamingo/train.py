"""Stage 3 of training (DESIGN.md 4, paper 2.4 and App. B.1.2): Flamingo itself.

    python -m miniflamingo train --run runs/demo          # needs runs/demo/vision.pt and runs/demo/lm.pt
    python -m miniflamingo train --run runs/mine --captions data_samples/captions --interleaved \
        data_samples/interleaved.jsonl --vision runs/demo/vision.pt --lm runs/demo/lm.pt   # local data
    torchrun --nproc_per_node=2 -m miniflamingo train --run-dir runs/ddp   # DistributedDataParallel
    torchrun --nproc_per_node=2 -m miniflamingo train --run-dir runs/fsdp --fsdp   # sharded (FSDP)

Notable features
- The vision encoder and the LM come from stages 1 and 2 and stay frozen; only the Perceiver Resampler,
  the gated xattn-dense layers and the embeddings of <image> and <|endofchunk|> train (paper 2.3).
- The frozen encoder's features are computed once for every media and cached: the encoder does not
  change during this stage, so re-encoding the same pixels each step would be wasted work.
- Each step sees one batch from every dataset and accumulates lambda_m * NLL_m over all of them before
  the optimizer step (paper 2.4: accumulating beat round-robin). Datasets here: the synthetic world's
  interleaved documents (M3W-like), image-text pairs (ALIGN/LTIP-like), video-text pairs (VTP-like);
  or the user's own local files instead (`--captions DIR`, `--interleaved FILE`: readers.py's formats,
  DESIGN.md 5), each source that is given.
- AdamW, no weight decay on the resampler (paper App. B.1.2), linear warmup then constant or cosine,
  global gradient-norm clip 1.0.
- Batch `step` is a pure function of (seed, step, rank) and checkpoints are atomic, so a run killed at
  any point and resumed ends with the same parameters as an uninterrupted one.
- Under torchrun each rank reads a disjoint shard; the loss is normalised by the token count of the
  global batch, so N processes compute exactly the gradient of one process with N times the batch.
  `--fsdp` shards the parameters, gradients and optimizer state instead of replicating them (distributed.py).
- A NaN or infinite loss stops the run, naming the step, the dataset and the last good checkpoint.

Shapes: B batch, T media slots, F frames, S grid cells, Dv feature width, L text length.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from miniflamingo import distributed
from miniflamingo.config import FlamingoConfig
from miniflamingo.data import DataError, DocumentDataset, MixtureSampler, Source, to_device
from miniflamingo.flamingo import Flamingo
from miniflamingo.pretrain_lm import auto_dtype
from miniflamingo.trainutil import (
    JsonlLogger,
    Progress,
    avoid_cudnn_attention,
    compile_regions,
    configure_optimizer,
    get_lr,
    load_checkpoint,
    release_freed_memory,
    resume_mismatches,
    save_checkpoint,
    seed_everything,
)

# paper 2.4: M3W 1.0, ALIGN 0.2, LTIP 0.2, VTP 0.03. The world has one image-text set (weight 0.2);
# its videos are fewer and simpler than VTP's, and a weight of 0.03 leaves motion questions unlearned
# in a few minutes, so the demo gives them 0.2 (a deliberate deviation; override with --weights).
DEFAULT_WEIGHTS = {"interleaved": 1.0, "image_text": 0.2, "video_text": 0.2}


# ----------------------------------------------------------------------------- models and data


def load_part(name: str, path: Path, part_cfg) -> dict:
    """The weights of a stage-1 or stage-2 checkpoint (`name` "vision" or "lm"), after checking that it
    was trained with the config the Flamingo config asks for."""
    state = load_checkpoint(path)
    stage = {"vision": "pretrain-vision", "lm": "pretrain-lm"}[name]
    if not isinstance(state, dict) or not {"model", "config"} <= set(state):
        raise SystemExit(f"train: {path} is not a {stage} checkpoint (it lacks 'model' or 'config')")
    try:
        saved = getattr(FlamingoConfig.from_dict({name: state["config"]}), name)
    except (TypeError, ValueError, AttributeError) as e:  # another stage's config: other fields
        raise SystemExit(f"train: {path} is not a {stage} checkpoint: its config does not describe "
                         f"the {name} ({e})") from e
    if saved != part_cfg:
        raise SystemExit(f"train: {path} holds the {name} config {saved}, but the Flamingo config "
                         f"asks for {part_cfg}; use the same preset and overrides")
    return state["model"]


def build_model(cfg: FlamingoConfig, run: Path, vision_path=None, lm_path=None) -> Flamingo:
    """A Flamingo with the pretrained, frozen vision encoder and LM of stages 1 and 2."""
    model = Flamingo(cfg)
    model.load_pretrained(vision_state=load_part("vision", vision_path or run / "vision.pt", cfg.vision),
                          lm_state=load_part("lm", lm_path or run / "lm.pt", cfg.lm))
    return model


# What a resumed run must share with its checkpoint (besides the config, checked as a whole): what
# defines its data, batches and schedule shape. --steps, --stop-at and --seconds may change (a run may
# be stopped early and continued, or extended); the thread count and --log-every change nothing.
RESUME_ARGS = ("preset", "captions", "interleaved", "skip_bad", "docs", "families", "blob_binding", "pairs",
               "videos", "weights", "seq_len", "p_next", "batch_size", "pair_batch_size", "video_batch_size",
               "lr", "gate_lr_mult", "warmup", "schedule", "weight_decay", "grad_clip", "train_lm", "seed",
               "world_seed")


# Options that only shape the synthetic world's data (render_world), not local files.
WORLD_ARGS = ("docs", "families", "blob_binding", "pairs", "videos", "world_seed")


def world_data(vision, image_size: int, tok, args,
               rendered: dict | None = None) -> dict[str, DocumentDataset]:
    """The synthetic world's three datasets, with every media replaced by its frozen features. rendered:
    render_world's result for these args, or None: render here."""
    t0 = time.perf_counter()
    data = load_pixels(image_size, tok, args) if rendered is None else rendered
    t1 = time.perf_counter()
    # Each batch is encoded on one torch thread: on 2 threads some batches came out a few ulps apart from
    # 1 thread's (max 5e-7), and a run must not depend on who encoded its data or with how many threads.
    # The cores are used by encoding batches side by side instead, one Python thread per torch thread
    # the process had (with_features' workers), same features. Batches of 64: each thread's allocator
    # arena keeps what its batches needed (measured on the demo's data, 2 threads: batches of 256 took
    # the process to 2.93 GiB at its peak, 64 to 1.50 GiB, one thread with 256 to 1.60 GiB; encoded in
    # 12.3, 12.4 and 23.4 s).
    threads = torch.get_num_threads()
    on_cpu = next(vision.parameters()).device.type == "cpu"
    torch.set_num_threads(1)
    try:  # the encoder is frozen: encode once
        data = {name: d.with_features(vision, batch_size=64, workers=threads if on_cpu else 1)
                for name, d in data.items()}
    finally:
        torch.set_num_threads(threads)
    what = ", ".join(f"{name} {len(d)}" for name, d in data.items())
    source = "local files" if is_local(args) else "the synthetic world"
    log(f"data: {what} from {source}, "
        f"{'read in %.1f s' % (t1 - t0) if rendered is None else 'read earlier'}, encoded by the "
        f"frozen vision encoder in {time.perf_counter() - t1:.1f} s")
    return data


def is_local(args) -> bool:
    return bool(args.captions or args.interleaved)


def load_pixels(image_size: int, tok, args) -> dict[str, DocumentDataset]:
    """The datasets in pixels: the user's local files when --captions or --interleaved is given (only
    those: a real data set is not mixed with the synthetic world), else the world's three."""
    return read_local(image_size, tok, args) if is_local(args) else render_world(image_size, tok, args)


def read_local(image_size: int, tok, args) -> dict[str, DocumentDataset]:
    """Real data from local files (readers.py, DESIGN.md 5): a captions folder becomes the image_text
    dataset (paper 2.4: ALIGN/LTIP-like pairs), OBELICS/MMC4-style documents the interleaved one (M3W-like).
    Letterboxed to the model's image size. Bad items fail the run naming file and line, or with
    --skip-bad are skipped, counted and listed (readers.Report); a source left with nothing is an error."""
    from miniflamingo import readers

    defaults = option_defaults()
    ignored = [f"--{k.replace('_', '-')}" for k in WORLD_ARGS if getattr(args, k) != defaults[k]]
    if ignored:
        log(f"train: {', '.join(ignored)} shape the synthetic world's data; with local files they are "
            f"ignored")
    weights = parse_weights(args.weights)
    data = {}
    for name, path, read, build in (
            ("image_text", args.captions, readers.read_captions, DocumentDataset.from_pairs),
            ("interleaved", args.interleaved, readers.read_interleaved, DocumentDataset.from_documents)):
        if path is None:
            continue
        if weights[name] <= 0:  # not in the mixture (world_sources): not worth reading and encoding
            log(f"train: {path} not read: --weights gives {name} weight {weights[name]}")
            continue
        try:
            items, report = read(path, image_size, skip_bad=args.skip_bad, quiet=True)
        except DataError as e:
            raise SystemExit(f"train: {e}") from None
        if not items:
            raise SystemExit(f"train: {path}: no usable item ({report.read} read, {len(report.skipped)} "
                             f"skipped)")
        log(report.summary())  # what was read and every skip, once (log: rank 0 only under torchrun)
        data[name] = build(items, tok)
    return data


def render_world(image_size: int, tok, args) -> dict[str, DocumentDataset]:
    """The synthetic world's three datasets, in pixels: no model needed, so the demo renders them while the
    vision stage still trains."""
    from miniflamingo.world import World

    world = World(seed=args.world_seed, image_size=image_size)
    return {
        "interleaved": DocumentDataset.from_documents(
            world.documents(args.docs, seed=args.seed, families=args.family_weights,
                            blob_binding=args.blob_binding), tok),
        "image_text": DocumentDataset.from_pairs(world.image_text_pairs(args.pairs, seed=args.seed), tok),
        "video_text": DocumentDataset.from_pairs(world.video_text_pairs(args.videos, seed=args.seed), tok),
    }  # split "train" (the default): held-out images, combinations and novel shapes never appear


def render_data(argv: list[str]) -> dict:
    """load_pixels for a `train` command line: the first half of prepare_data, which needs no checkpoint."""
    from miniflamingo.tokenizer import Tokenizer

    args, overrides = parse_args(argv)
    cfg = FlamingoConfig.preset(args.preset).override(overrides)
    return {"argv": list(argv), "data": load_pixels(cfg.vision.image_size, Tokenizer.default(), args)}


def prepare_data(argv: list[str], rendered: dict | None = None) -> dict:
    """world_data for a `train` command line, before stage 2 has finished: it needs only the vision
    checkpoint and the tokenizer. The demo calls it on a core that a finished stage frees (with the
    pixels that render_data drew meanwhile, when the LM finished first), then passes it to
    main(argv, prepared=...), which uses it only for the very same command line. The features are
    bit-identical to main's own (both encode on one thread), so a run is the same either way. rendered:
    render_data's result for the same argv, or None: render here."""
    from miniflamingo.tokenizer import Tokenizer
    from miniflamingo.vision import VisionEncoder

    if rendered is not None and rendered["argv"] != list(argv):  # before loading anything
        raise ValueError(f"rendered for {rendered['argv']}, not for {list(argv)}")
    args, overrides = parse_args(argv)
    cfg = FlamingoConfig.preset(args.preset).override(overrides)
    vision = VisionEncoder(cfg.vision)
    vision.load_state_dict(load_part("vision", Path(args.vision or Path(args.run) / "vision.pt"), cfg.vision))
    vision.requires_grad_(False).eval()
    return {"argv": list(argv), "data": world_data(vision, cfg.vision.image_size, Tokenizer.default(), args,
                                                   None if rendered is None else rendered["data"])}


def world_sources(data: dict[str, DocumentDataset], cfg: FlamingoConfig, args, weights: dict[str, float],
                  world_size: int = 1) -> list[Source]:
    """The mixture's sources: each dataset with its weight lambda_m, batch size and row settings.
    world_size: the processes that will each take a shard of every source (setup_distributed's)."""
    batch = {"interleaved": args.batch_size, "image_text": args.pair_batch_size,
             "video_text": args.video_batch_size}
    seq_len = min(args.seq_len, cfg.lm.context_length)
    # Packing needs cross-attention to the immediate media only (Flamingo.forward says why): with all
    # previous media (the Table 10 ablation) rows are padded as before.
    pack = args.pack and cfg.xattn.only_immediate_media
    sources = [Source(name, data[name], weights[name], batch[name], seq_len=seq_len, max_media=cfg.max_media,
                      p_next=args.p_next, pack=pack) for name in data if weights[name] > 0]
    if not sources:
        raise SystemExit(f"train: no dataset with a weight above 0: datasets {sorted(data)}, --weights "
                         f"{weights}")
    origin = {"image_text": args.captions, "interleaved": args.interleaved}
    for src in sources:  # each rank takes a disjoint shard (MixtureSampler): at least one item each
        if len(src.data) < world_size:
            raise SystemExit(f"train: {origin.get(src.name) or src.name} has {len(src.data)} usable items, "
                             f"fewer than the {world_size} processes that must each take a share")
    return sources


def log(msg: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the run


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m miniflamingo train",
        description="Train Flamingo's resampler and gated xattn-dense layers on the synthetic world, or on "
                    "local files (--captions, --interleaved).",
        epilog="Any other --part.field=value argument overrides the preset's config, e.g. --xattn.every=2.",
    )
    # torchrun's own parser takes "--run" for an abbreviation of its --run-path, hence the alias
    ap.add_argument("--run", "--run-dir", dest="run", default="runs/demo",
                    help="run folder: flamingo.pt, train_log.jsonl (--run-dir under torchrun)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vision", default=None, help="stage-1 checkpoint (default RUN/vision.pt)")
    ap.add_argument("--lm", default=None, help="stage-2 checkpoint (default RUN/lm.pt)")
    ap.add_argument("--steps", type=int, default=1300, help="total optimizer steps (the schedule's length)")
    ap.add_argument("--stop-at", type=int, default=None, help="stop (and checkpoint) at this step")
    ap.add_argument("--seconds", type=float, default=None, help="stop (and checkpoint) after this wall time")
    ap.add_argument("--batch-size", type=int, default=16, help="interleaved documents per step (per rank)")
    ap.add_argument("--pair-batch-size", type=int, default=16, help="image-text pairs per step (per rank)")
    ap.add_argument("--video-batch-size", type=int, default=8, help="video-text pairs per step (per rank)")
    ap.add_argument("--weights", default=None,
                    help="lambda per dataset, e.g. interleaved=1,image_text=0.2,video_text=0.2 (0 drops one)")
    ap.add_argument("--docs", type=int, default=3000, help="interleaved documents drawn from the world")
    ap.add_argument("--families", default=None,
                    help="interleaved documents' family weights, e.g. binding=0.5,questions=0.2 (the others "
                         "keep world_docs.FAMILIES' weights; 0 drops one)")
    ap.add_argument("--blob-binding", type=float, default=0.0,
                    help="share of binding documents whose words name the vision stage's blob shapes instead "
                         "of the named ones (default 0; the demo uses 0.3: novel-shape binding 84.5 / "
                         "57.8%% -> 88.3 / 70.7%% over four seeds, README)")
    ap.add_argument("--captions", default=None,
                    help="train on local image-text pairs instead of the world: a folder with captions.jsonl "
                         "(DESIGN.md 5; or the file), as `python -m miniflamingo data` reads it")
    ap.add_argument("--interleaved", default=None,
                    help="train on local OBELICS/MMC4-style JSONL documents instead of the world's")
    ap.add_argument("--skip-bad", action="store_true",
                    help="with --captions / --interleaved: skip bad items (counted and listed) instead of "
                         "stopping at the first")
    ap.add_argument("--pairs", type=int, default=2000, help="image-text pairs drawn from the world")
    ap.add_argument("--videos", type=int, default=600, help="video-text pairs drawn from the world")
    ap.add_argument("--seq-len", type=int, default=256, help="paper A.3: 256-token subsequences")
    ap.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                    help="pack short rows together, each attending only within itself: the same loss and "
                         "gradients, to rounding, from fewer padded positions (data.collate; off with "
                         "--xattn.only_immediate_media=false). Not a resume option: it changes no result "
                         "beyond rounding")
    ap.add_argument("--p-next", type=float, default=0.0,
                    help="paper A.3.2 uses 0.5 on web pages; the world's text always follows its image")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (tiny: 2e-3 beat 1e-3)")
    ap.add_argument("--gate-lr-mult", type=float, default=1.0, help="the tanh gates' lr = this x --lr")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--schedule", choices=["constant", "cosine"], default="cosine")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--fsdp", action="store_true",
                    help="under torchrun, shard parameters, gradients and optimizer state across ranks "
                         "(FSDP, distributed.py) instead of replicating them (DDP)")
    ap.add_argument("--train-lm", action="store_true",
                    help="ablation (paper Table 3 viii, lesson 13): train the pretrained LM too, not frozen")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default="auto",
                    help="bf16 autocast; auto: the LM's measured rule (bf16 on GPUs, on CPU from width 256)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each LM block, xattn layer and resampler layer (trainutil."
                         "compile_regions). Measured (README, 'Results so far'): 672 -> 627 ms a step on an "
                         "H200 at batch 512, no gain on a CPU; minutes of compiling first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=100)
    args, overrides = ap.parse_known_args(argv)
    args.family_weights = parse_families(args.families)  # parsed once; a bad one fails before any work
    if not 0.0 <= args.blob_binding <= 1.0:
        raise SystemExit(f"train: --blob-binding is a share of the binding documents, 0 to 1; got "
                         f"{args.blob_binding}")
    return args, overrides


def option_defaults() -> dict:
    """Every option's default, as parse_args gives it with no arguments."""
    return vars(parse_args([])[0])


def parse_named_weights(text: str | None, defaults: dict[str, float], option: str, kind: str
                        ) -> dict[str, float]:
    """`name=w,name=w` over the defaults: the named weights changed, the others kept."""
    weights = dict(defaults)
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        if name.strip() not in weights:
            raise SystemExit(f"train: {option} names {name.strip()!r}; {kind} are {sorted(weights)}")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"train: {option} {item!r}: expected name=weight") from None
    return weights


def parse_weights(text: str | None) -> dict[str, float]:
    """--weights: the lambda of each dataset (paper 2.4), DEFAULT_WEIGHTS where not named."""
    return parse_named_weights(text, DEFAULT_WEIGHTS, "--weights", "datasets")


def parse_families(text: str | None) -> dict[str, float] | None:
    """--families: world_docs.FAMILIES with the named weights changed; None when not given."""
    from miniflamingo.world_docs import FAMILIES

    if not text:
        return None
    families = parse_named_weights(text, FAMILIES, "--families", "families")
    if any(w < 0 for w in families.values()) or not any(families.values()):
        raise SystemExit(f"train: --families weights must be >= 0 and not all 0, got {families}")
    return families


def gates(model: Flamingo) -> dict[str, list[float]]:
    """tanh of every gate, to watch the layers open (lesson 9). A collective when sharded (FSDP)."""
    # one read for all gates (on a GPU each .item() would make the host wait for the device)
    values = torch.stack(distributed.gate_values(model)).float().reshape(-1).tolist()
    values = [round(math.tanh(g), 5) for g in values]
    return {"attn": values[0::2], "ffw": values[1::2]}


def main(argv: list[str] | None = None, prepared: dict | None = None) -> int:
    """`prepared`: prepare_data's result for this same argv (the demo's), or None: render and encode here."""
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    cfg = FlamingoConfig.preset(args.preset).override(overrides)
    weights = parse_weights(args.weights)
    rank, world_size, device = distributed.setup_distributed(args.device)
    avoid_cudnn_attention(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    run = Path(args.run)

    from miniflamingo.tokenizer import Tokenizer

    tok = Tokenizer.default()
    if tok.n_vocab != cfg.lm.vocab_size:
        raise SystemExit(f"train: tokenizer has {tok.n_vocab} ids but lm.vocab_size={cfg.lm.vocab_size}")
    model = build_model(cfg, run, args.vision, args.lm).to(device)
    if args.train_lm:
        model.lm.requires_grad_(True)  # still in eval mode (Flamingo.train): the tiny LM has no dropout
    if args.compile:
        compile_regions(model)  # in place: parameter names and checkpoints stay those of the eager model
    if prepared is not None and prepared["argv"] == list(argv):
        data = prepared["data"]
    else:  # encodes the world's media: before any sharding
        data = world_data(model.vision, cfg.vision.image_size, tok, args)
    release_freed_memory()  # the pixels are gone by now (the demo's too): 1.9-2.1 -> 1.4-1.5 GiB in training
    sampler = MixtureSampler(world_sources(data, cfg, args, weights, world_size), seed=args.seed, rank=rank,
                             world_size=world_size)
    n = model.param_counts()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fsdp = args.fsdp and world_size > 1
    if fsdp:
        distributed.shard(model)  # each rank now holds 1/world_size of every parameter
    opt = configure_optimizer(model, args.lr, args.weight_decay,
                              no_decay=("resampler", "latents", "time_embeddings", "special_embeddings"),
                              lr_mult={"_gate": args.gate_lr_mult} if args.gate_lr_mult != 1 else None)
    ckpt_path, step = run / "flamingo.pt", 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        if not isinstance(state, dict) or not {"model", "config", "step", "optimizer"} <= set(state):
            raise SystemExit(f"train: {ckpt_path} is not a train checkpoint (it lacks 'model', 'config', "
                             f"'step' or 'optimizer'); use another --run")
        if state["config"] != cfg.to_dict():
            raise SystemExit(f"train: {ckpt_path} holds another config; use another --run or the same "
                             f"options")
        differ = resume_mismatches(state.get("args", {}), args, RESUME_ARGS,
                                   defaults=option_defaults())  # options added since: their defaults
        if differ:
            raise SystemExit(f"train: cannot resume {ckpt_path}: it was trained with another "
                             f"{'; '.join(differ)}; use the same options, or another --run")
        try:
            if fsdp:
                distributed.load_state_dicts(model, opt, state["model"], state["optimizer"])
            else:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:  # parameter groups or sharding differ
            raise SystemExit(f"train: cannot resume {ckpt_path}: its model or optimizer state does not fit "
                             f"this run (other --gate-lr-mult, --train-lm or --fsdp?): {e}") from e
        step = state["step"]
        log(f"resuming from {ckpt_path} at step {step}")
    dtype = auto_dtype(cfg.lm, device) if args.dtype == "auto" else args.dtype
    log(f"Flamingo ({args.preset}): {n['total'] / 1e6:.2f}M parameters, {trained / 1e6:.2f}M trained "
        f"(resampler {n['resampler'] / 1e6:.2f}M, xattn {n['xattn'] / 1e6:.2f}M); {world_size} process(es) "
        f"on {device} in {dtype}{', FSDP' if fsdp else ''}; lambda "
        f"{ {name: w for name, w in weights.items() if name in data} }")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 and not fsdp else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    last_good = f"{ckpt_path} (step {step})" if step else None  # a resumed run's starting point

    def checkpoint():
        nonlocal last_good
        model_state, opt_state = distributed.state_dicts(model, opt) if fsdp else (model.state_dict(),
                                                                                 opt.state_dict())
        if rank == 0:
            save_checkpoint(ckpt_path, {"model": model_state, "config": cfg.to_dict(), "step": step,
                                        "optimizer": opt_state, "args": vars(args)})
        last_good = f"{ckpt_path} (step {step})"

    stop = min(args.steps, args.stop_at or args.steps)
    logger = JsonlLogger(run / "train_log.jsonl") if rank == 0 else None
    progress = Progress(stop, start=step, every=args.log_every, desc="train ", stream=None if rank == 0 else
                        open(os.devnull, "w"))  # noqa: SIM115
    t_start, empty_batches = time.perf_counter(), 0
    model.train()
    while step < stop:
        lr = get_lr(step, args.lr, args.warmup, args.steps, args.schedule)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        opt.zero_grad(set_to_none=True)
        losses = {}
        # No reads of device values inside the batch loop: on a GPU each one makes the host wait until the
        # device has caught up, instead of queueing the next kernels and assembling the next batch (issue
        # 6). Token counts come from the host's targets; the losses are read once, after the loop.
        batches = sampler.batch(step)  # paper 2.4: accumulate over all datasets, then one update
        n_locals = [int((b.targets != -100).sum()) for b in batches]  # tokens with a target, per batch
        # Across ranks, one sum of all batches' counts for the step (it is read: one wait, not one a batch)
        n_globals = n_locals if world_size == 1 else distributed.global_count(
            to_device(torch.tensor(n_locals), device), world_size).tolist()
        for b, n_local, n_global in zip(batches, n_locals, n_globals):
            # No wait for the GPU: pinned copies (data.to_device); the targets stay on the host, where the
            # LM finds the positions that have one without a device read (lm.GPT.forward).
            x, y = to_device(b.input_ids, device), b.targets
            feats = None if b.media is None else to_device(b.media, device)
            frames = b.frames  # stays on the host: the resampler groups media by these counts (no sync)
            segments = None if b.segments is None else to_device(b.segments, device)  # packed rows
            if n_global == 0:
                empty_batches += 1  # nothing to predict in this batch (no text after an <image>): counted,
                continue  # and said at the end
            with autocast:
                _, loss = ddp(x, vision_features=feats, targets=y, media_frames=frames, segments=segments,
                              return_logits=False, media_checked=True)  # collate checked the media
            if n_local == 0:
                loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0  # keep DDP in step
            losses[b.name] = distributed.global_count(loss.detach() * n_local, world_size) / n_global
            # mean over this rank's tokens -> sum / global tokens, times world_size because DDP (and FSDP's
            # reduce-scatter) averages gradients over ranks
            (b.weight * loss * n_local * world_size / n_global).backward()
        grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], args.grad_clip))
        # One read for the step, before the update: a NaN or inf loss (or gradient, from a finite loss)
        # stops the run with its parameters as they were, naming the first batch that had it.
        *values, grad_norm = torch.stack([*losses.values(), grad_norm.float()]).tolist()
        losses = dict(zip(losses, values))
        for name, value in losses.items():
            if not math.isfinite(value):
                raise SystemExit(f"train: loss is {value} at step {step + 1} on the {name!r} batch; last "
                                 f"good checkpoint: {last_good or 'none'}")
        if not math.isfinite(grad_norm):
            raise SystemExit(f"train: gradient norm is {grad_norm} at step {step + 1} (batches "
                             f"{', '.join(losses)}); last good checkpoint: {last_good or 'none'}")
        opt.step()
        step += 1
        total = sum(weights[k] * v for k, v in losses.items())
        # tok/s counts the tokens trained on (those with a target, all ranks), not the positions run:
        # padding and packing change the second, not the first.
        progress.update(step, total, tokens=sum(n_globals), lr=lr)
        if step % args.log_every == 0 or step == stop:
            g = gates(model)  # every rank: a collective under FSDP
            if logger:
                logger.log(step=step, loss=total, lr=lr, grad_norm=grad_norm,
                           **{f"loss_{k}": v for k, v in losses.items()}, gates=g)
        if step % args.save_every == 0:
            checkpoint()
        if args.seconds is not None and time.perf_counter() - t_start > args.seconds:
            log(f"\nstopping after {args.seconds:g} s at step {step}")
            break
    progress.close()
    checkpoint()
    if logger:
        logger.close()
    g = gates(model)
    log(f"step {step}/{args.steps}: {time.perf_counter() - t_start:.0f} s; tanh(attn gates) {g['attn']}, "
        f"tanh(ffw gates) {g['ffw']}; checkpoint {ckpt_path}")
    if empty_batches:
        log(f"{empty_batches} batches had no token to predict (no text after an <image> in any row) and "
            f"were skipped")
    if fsdp:
        log(f"parameters sharded across {world_size} ranks (FSDP)")
    elif world_size > 1:
        diff = distributed.check_ranks_agree(model, world_size)
        log(f"parameters identical across {world_size} ranks (max difference {diff})")
    if world_size > 1:
        dist.barrier()  # every rank done with every collective before the group goes
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
