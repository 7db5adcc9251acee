"""Training-step throughput of video FG-CLIP, against plain CLIP in the same run.

One process per configuration (peak memory is per process). For each it times
full optimizer steps on synthetic batches: the training loop's own step
(``fgclip.train.step.TrainStep``, built from ``train.*`` in params.yaml: forward,
FGCLIPLoss with the memory bank's negatives, backward, gradient clipping, AdamW,
the schedule, the logit-scale clamp), and the same number of images and captions
through a plain CLIP image-text step with the same optimizer, so the ratio shows
what the video head and the region path cost. The same step with hard negatives
off (``train.hardneg_loss_weight: 0``, no negative captions in the batch) runs
in the same process too: the ratio is what FG-CLIP's hard-negative loss costs
(``--negatives`` captions per region, FG-CLIP's 10). The bank is on from the first
step (warm-up 0), as in the steady state of a run. On CUDA both steps run under
bf16 autocast, as training does. FLOPs per step are counted by torch's
FlopCounterMode on one step run with eager attention and nothing compiled (the
model's FLOPs, whatever kernels run them: the CPU's SDPA kernel is invisible to
the counter); MFU is achieved FLOP/s over the GPU's dense bf16 peak, and on CPU
the achieved GFLOP/s is reported instead.

The step's GPU knobs (issue 17) are options here, each the ``train.*`` knob of
the same name, applied to both steps where it means something: ``--attn``
(train.attn_implementation), ``--compile`` (train.compile: the forward and the
loss; plain CLIP's two towers), ``--sync-every`` (train.sync_every: the FG-CLIP
step reads its losses on the host every N steps; the plain CLIP step never
does), ``--fused`` (train.fused_adamw), ``--grad-accum`` (forward passes per
optimizer step, both steps) and ``--batch-size`` (videos per pass).

    python benchmarks/train_throughput.py --config default --device cpu
    python benchmarks/train_throughput.py --config vitb32 --device cpu --steps 2 --warmup 1 --batch-size 4
    python benchmarks/train_throughput.py --config vitb16 --device cuda --attn sdpa --compile --sync-every 25
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgclip.config import ModelConfig, TrainConfig, load_params
from fgclip.data.batch import Batch
from fgclip.model.fgclip import FGCLIPVideoModel, clip_config
from fgclip.model.losses import contrastive_loss
from fgclip.train.optim import build_optimizer, use_fused_adamw
from fgclip.train.step import TrainStep

# Dense bf16 tensor-core peaks (datasheets, SXM parts), for MFU.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}

VITB16 = {  # OpenAI ViT-B/16 shapes; random weights (nothing is downloaded)
    "image_size": 224,
    "patch_size": 16,
    "vision_hidden": 768,
    "vision_layers": 12,
    "vision_heads": 12,
    "text_hidden": 512,
    "text_layers": 12,
    "text_heads": 8,
    "projection_dim": 512,
    "max_text_len": 77,
    "temporal_heads": 8,
}
VITB32 = {**VITB16, "patch_size": 32}  # OpenAI ViT-B/32: the same towers, 7 x 7 patches
SHAPES = {"vitb16": VITB16, "vitb32": VITB32}


def configs(name: str, batch_videos: int, grad_accum: int = 1, **knobs) -> tuple[ModelConfig, TrainConfig]:
    """params.yaml's model (or ViT-B shapes) and training sections, the bank on from step 1.

    ``knobs``: other ``train.*`` values (attn_implementation, compile, fused_adamw), validated.
    """
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    model = (
        params.model
        if name == "default"
        else ModelConfig.model_validate({**params.model.model_dump(), **SHAPES[name]})
    )
    # `grad_accum` forward passes a step (one by default: images/s counts one batch), the bank on from the first.
    update = {"batch_size": batch_videos, "grad_accum_steps": grad_accum, "memory_bank_warmup_steps": 0, **knobs}
    train = TrainConfig.model_validate({**params.train.model_dump(), **update})
    return model, train


@contextmanager
def counted_as_eager(clip: CLIPModel, trainer: TrainStep | None = None):
    """Eager attention and nothing compiled while FLOPs are counted; the settings as they were after."""
    impl = clip.config._attn_implementation
    compiled = trainer.compile if trainer is not None else None
    clip.set_attn_implementation("eager")
    if trainer is not None:
        trainer.compile = False
    try:
        yield
    finally:
        clip.set_attn_implementation(impl)
        if trainer is not None:
            trainer.compile = compiled


def openai_vocab_config(cfg: ModelConfig, vocab: int = 49408) -> CLIPConfig:
    """OpenAI CLIP's vocabulary size and special ids (BOS 49406, EOS 49407) at ``cfg``'s shapes."""
    return clip_config(cfg, vocab_size=vocab, pad_token_id=0, bos_token_id=vocab - 2, eos_token_id=vocab - 1)


def synthetic_batch(
    cfg: ModelConfig, b: int, t: int, k: int, r: int, vocab: int, device, negatives: int = 10
) -> Batch:
    g = torch.Generator().manual_seed(0)
    s, L = cfg.image_size, cfg.text_len

    def ids(*shape):
        x = torch.randint(3, vocab - 2, (*shape, L), generator=g)
        x[..., -1] = vocab - 1  # EOS last: CLIP pools there
        return x

    x1 = torch.rand(b, r, k, 2, generator=g) * 0.5
    boxes = torch.cat([x1, x1 + 0.2 + torch.rand(b, r, k, 2, generator=g) * 0.3], dim=-1)
    region_caption_ids = torch.arange(b * r).view(b, r) + b
    batch = Batch(
        videos=[f"video{i}" for i in range(b)],
        frames=torch.randn(b, t, 3, s, s, generator=g),
        text_token_ids=ids(b),
        text_mask=torch.ones(b, L, dtype=torch.long),
        caption_ids=torch.arange(b),
        keyframes=torch.randn(b, k, 3, s, s, generator=g),
        boxes=boxes,
        box_mask=torch.ones(b, r, k, dtype=torch.bool),
        region_token_ids=ids(b, r),
        region_text_mask=torch.ones(b, r, L, dtype=torch.long),
        region_caption_ids=region_caption_ids,
        region_image_ids=region_caption_ids.clone(),  # every region shows pixels of its own
        region_mask=torch.ones(b, r, dtype=torch.bool),
        # FG-CLIP's 10 hard negatives per box (none when hard negatives are off).
        region_negative_token_ids=ids(b, r, negatives),
        region_negative_text_mask=torch.ones(b, r, negatives, L, dtype=torch.long),
        region_negative_mask=torch.ones(b, r, negatives, dtype=torch.bool),
    )
    return batch.to(device)


def fgclip_step_fn(cfg, train_cfg, ccfg, batch, device, sync_every: int = 1):
    """The training loop's step, on the same batch every time; host reads every ``sync_every`` steps."""
    model = FGCLIPVideoModel(CLIPModel(ccfg), cfg).to(device).train()
    trainer = TrainStep.build(model, train_cfg, device)
    batches = itertools.repeat(batch)
    calls = itertools.count(1)

    def step():
        return trainer(batches, sync=next(calls) % sync_every == 0).last.loss

    def count():
        with counted_as_eager(model.clip, trainer):
            return trainer(batches).last.loss

    step.count = count  # what count_flops runs
    return step


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; 4.x returned the tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def clip_step_fn(cfg, train_cfg, ccfg, batch, device, sync_every: int = 1):
    """Plain CLIP on the same images and captions: every frame and keyframe vs a caption.

    ``train_cfg``'s attention, compile, fused AdamW and gradient accumulation apply; it
    never reads a value on the host, whatever ``sync_every`` says.
    """
    model = CLIPModel(ccfg).to(device).train()
    model.set_attn_implementation(train_cfg.attn_implementation)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = use_fused_adamw(train_cfg.fused_adamw, params)
    opt = build_optimizer(model, train_cfg.lr, train_cfg.weight_decay, fused=fused)
    accum = train_cfg.grad_accum_steps
    image_fn, text_fn = model.get_image_features, model.get_text_features
    compiled = (torch.compile(image_fn), torch.compile(text_fn)) if train_cfg.compile else (image_fn, text_fn)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    s = cfg.image_size
    images = torch.cat([batch.frames, batch.keyframes], dim=1).reshape(-1, 3, s, s)
    texts = torch.cat([batch.text_token_ids, batch.region_token_ids.flatten(0, 1)])
    texts = texts.repeat((images.shape[0] + texts.shape[0] - 1) // texts.shape[0], 1)[: images.shape[0]]
    mask = torch.ones_like(texts)

    def run(encode_image, encode_text):
        for _ in range(accum):
            with amp:
                img = F.normalize(_pooled(encode_image(pixel_values=images)), dim=-1)
                txt = F.normalize(_pooled(encode_text(input_ids=texts, attention_mask=mask)), dim=-1)
                loss = contrastive_loss(img, txt, model.logit_scale).loss
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def step():
        return run(*compiled)

    def count():
        with counted_as_eager(model):
            return run(image_fn, text_fn)

    step.count = count
    return step


def time_steps(step, device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert torch.isfinite(loss), "non-finite loss in the benchmark"
    return (time.perf_counter() - t0) / steps


def count_flops(step) -> int:
    """FLOPs of one step, run as ``step.count`` (eager attention, uncompiled) when it has one."""
    with FlopCounterMode(display=False) as counter:
        getattr(step, "count", step)()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["default", *SHAPES], default="default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", "--batch-size", dest="batch", type=int, default=8, help="videos per forward pass")
    ap.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimizer step (both steps)")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="sdpa", help="train.attn_implementation")
    ap.add_argument("--compile", action="store_true", help="train.compile (the forward and the loss)")
    ap.add_argument("--sync-every", type=int, default=1, help="train.sync_every (the FG-CLIP step)")
    ap.add_argument("--fused", choices=["auto", "true", "false"], default="auto", help="train.fused_adamw")
    ap.add_argument("--runs", default="fgclip,fgclip_no_hardneg,clip",
                    help="which steps to time, comma-separated (fgclip, fgclip_no_hardneg, clip)")  # fmt: skip
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--keyframes", type=int, default=4)
    ap.add_argument("--regions", type=int, default=4)
    ap.add_argument("--negatives", type=int, default=10, help="hard-negative captions per region")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path, help="append the result as one JSON line")
    args = ap.parse_args()
    if args.grad_accum < 1 or args.sync_every < 1:
        ap.error("--grad-accum and --sync-every must be at least 1")
    wanted = args.runs.split(",")
    unknown = set(wanted) - {"fgclip", "fgclip_no_hardneg", "clip"}
    if unknown:
        ap.error(f"unknown --runs: {', '.join(sorted(unknown))}")

    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    fused = {"auto": "auto", "true": True, "false": False}[args.fused]
    cfg, train_cfg = configs(
        args.config, args.batch, args.grad_accum,
        attn_implementation=args.attn, compile=args.compile, fused_adamw=fused,
    )  # fmt: skip
    ccfg = openai_vocab_config(cfg)
    batch = synthetic_batch(
        cfg, args.batch, args.frames, args.keyframes, args.regions, 49408, device, args.negatives
    )
    plain_batch = synthetic_batch(
        cfg, args.batch, args.frames, args.keyframes, args.regions, 49408, device, 0
    )
    plain_cfg = train_cfg.model_copy(update={"hardneg_loss_weight": 0.0})
    videos = args.batch * args.grad_accum  # per optimizer step
    images = videos * (args.frames + args.keyframes)

    result = {
        "config": args.config,
        "device": args.device,
        "bf16": device.type == "cuda",
        "attn": args.attn,
        "compile": args.compile,
        "sync_every": args.sync_every,
        "fused_adamw": args.fused,
        "batch_videos": args.batch,
        "grad_accum": args.grad_accum,
        "videos_per_step": videos,
        "frames": args.frames,
        "keyframes": args.keyframes,
        "regions": args.regions,
        "negatives": args.negatives,
        "images_per_step": images,
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    runs = (
        ("fgclip", fgclip_step_fn, train_cfg, batch),
        ("fgclip_no_hardneg", fgclip_step_fn, plain_cfg, plain_batch),
        ("clip", clip_step_fn, train_cfg, batch),
    )
    for name, build, step_cfg, step_batch in runs:
        if name not in wanted:
            continue
        step = build(cfg, step_cfg, ccfg, step_batch, device, args.sync_every)
        flops = count_flops(step)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = time_steps(step, device, args.warmup, args.steps)
        entry = {
            "step_s": round(sec, 4),
            "step_ms": round(sec * 1e3, 1),
            "videos_per_s": round(videos / sec, 2),  # = samples/s: a sample is a video
            "images_per_s": round(images / sec, 1),
            "tflop_per_step": round(flops / 1e12, 3),
            "achieved_tflops": round(flops / sec / 1e12, 2),
        }
        if device.type == "cpu":
            entry["achieved_gflops"] = round(flops / sec / 1e9, 1)
        if device.type == "cuda":
            entry["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            peak = next((v for k, v in PEAK_BF16.items() if k in result["gpu"]), None)
            if peak:
                entry["mfu"] = round(flops / sec / peak, 4)
        # ru_maxrss is the process's peak so far (KiB on Linux): FG-CLIP runs first, so its
        # figure is its own; plain CLIP's is the peak of both.
        entry["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        result[name] = entry
        del step
        if args.compile:
            torch._dynamo.reset()  # each step compiles afresh: no cache limit shared between them
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "fgclip" in result and "clip" in result:
        result["fgclip_vs_clip_images_per_s"] = round(
            result["fgclip"]["images_per_s"] / result["clip"]["images_per_s"], 3
        )
    if "fgclip" in result and "fgclip_no_hardneg" in result:
        result["hardneg_step_cost"] = round(
            result["fgclip"]["step_s"] / result["fgclip_no_hardneg"]["step_s"], 3
        )
    line = json.dumps(result)
    print(line)
    if args.json:
        with args.json.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
