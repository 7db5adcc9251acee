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
FlopCounterMode; MFU is achieved FLOP/s over the GPU's dense bf16 peak.

    python benchmarks/train_throughput.py --config default --device cpu
    python benchmarks/train_throughput.py --config vitb16 --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import sys
import time
from contextlib import nullcontext
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
from fgclip.train.optim import build_optimizer
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


def configs(name: str, batch_videos: int) -> tuple[ModelConfig, TrainConfig]:
    """params.yaml's model (or ViT-B/16 shapes) and training sections, the bank on from step 1."""
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    model = (
        params.model
        if name == "default"
        else ModelConfig.model_validate({**params.model.model_dump(), **VITB16})
    )
    # One forward pass a step (images/s counts one batch), the bank on from the first.
    update = {"batch_size": batch_videos, "grad_accum_steps": 1, "memory_bank_warmup_steps": 0}
    train = params.train.model_copy(update=update)
    return model, train


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


def fgclip_step_fn(cfg, train_cfg, ccfg, batch, device):
    """The training loop's step, on the same batch every time."""
    model = FGCLIPVideoModel(CLIPModel(ccfg), cfg).to(device).train()
    trainer = TrainStep.build(model, train_cfg, device)
    batches = itertools.repeat(batch)

    def step():
        return trainer(batches).last.loss

    return step


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; 4.x returned the tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def clip_step_fn(cfg, train_cfg, ccfg, batch, device):
    """Plain CLIP on the same images and captions: every frame and keyframe vs a caption."""
    model = CLIPModel(ccfg).to(device).train()
    opt = build_optimizer(model, train_cfg.lr, train_cfg.weight_decay)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    s = cfg.image_size
    images = torch.cat([batch.frames, batch.keyframes], dim=1).reshape(-1, 3, s, s)
    texts = torch.cat([batch.text_token_ids, batch.region_token_ids.flatten(0, 1)])
    texts = texts.repeat((images.shape[0] + texts.shape[0] - 1) // texts.shape[0], 1)[: images.shape[0]]
    mask = torch.ones_like(texts)

    def step():
        with amp:
            img = F.normalize(_pooled(model.get_image_features(pixel_values=images)), dim=-1)
            txt = F.normalize(_pooled(model.get_text_features(input_ids=texts, attention_mask=mask)), dim=-1)
            loss = contrastive_loss(img, txt, model.logit_scale).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

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
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["default", "vitb16"], default="default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8, help="videos per step")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--keyframes", type=int, default=4)
    ap.add_argument("--regions", type=int, default=4)
    ap.add_argument("--negatives", type=int, default=10, help="hard-negative captions per region")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path, help="append the result as one JSON line")
    args = ap.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg, train_cfg = configs(args.config, args.batch)
    ccfg = openai_vocab_config(cfg)
    batch = synthetic_batch(
        cfg, args.batch, args.frames, args.keyframes, args.regions, 49408, device, args.negatives
    )
    plain_batch = synthetic_batch(
        cfg, args.batch, args.frames, args.keyframes, args.regions, 49408, device, 0
    )
    plain_cfg = train_cfg.model_copy(update={"hardneg_loss_weight": 0.0})
    images = args.batch * (args.frames + args.keyframes)

    result = {
        "config": args.config,
        "device": args.device,
        "bf16": device.type == "cuda",
        "batch_videos": args.batch,
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
        step = build(cfg, step_cfg, ccfg, step_batch, device)
        flops = count_flops(step)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = time_steps(step, device, args.warmup, args.steps)
        entry = {
            "step_s": round(sec, 4),
            "videos_per_s": round(args.batch / sec, 2),
            "images_per_s": round(images / sec, 1),
            "tflop_per_step": round(flops / 1e12, 3),
            "achieved_tflops": round(flops / sec / 1e12, 2),
        }
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
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["fgclip_vs_clip_images_per_s"] = round(
        result["fgclip"]["images_per_s"] / result["clip"]["images_per_s"], 3
    )
    result["hardneg_step_cost"] = round(result["fgclip"]["step_s"] / result["fgclip_no_hardneg"]["step_s"], 3)
    line = json.dumps(result)
    print(line)
    if args.json:
        with args.json.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
