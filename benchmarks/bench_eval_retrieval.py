"""Flickr30K retrieval evaluation throughput: this project's scoring engine against the published loop,
on the same model, weights and data, in one run.

The baseline re-implements the published ``eval_retrieval.py`` loop as it ran: one caption per step,
scored against blocks of 500 images (500 pairs per forward), the block's features copied to the
device each step, the full task model (``pooled_only=False``: vocabulary and region heads too), the
reference attention math, fp32, one process. Ours is ``RetrievalScorer``: image embeddings computed
once, fixed-size blocks of pairs spanning captions, shortest first and cut to the columns they use,
the pooled ITM path only, SDPA; its timing includes embedding and sorting the images. Features are
random (``v_feature_size``-d, 10-100 boxes + the global one as the published extractor's adaptive
10-100 boxes give, padded to 102 regions as in the published eval YAML), captions random tokens of
8-30 positions (padded to 30). ``--min_boxes 100 --min_tokens 30`` removes padding from the data, and
with it the share of the speed-up that comes from not computing padding.

Both must give the same score matrix: max abs difference <= 1e-5 on the CPU, 5e-5 on CUDA in fp32 (its
GEMM kernels change their reduction order with the shape, so a 500-pair block and ours round apart),
and within bf16/fp16 rounding when ``--precision`` puts ours in autocast (the baseline stays fp32, as
published). Printed: both rates, the projected time of the full 5,000 x 1,000 test for each, and last
``ratio=<baseline time / our time>``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from vilbert.config import BertConfig
from vilbert.modeling import InterBertForVLTasks
from vilbert.precision import Precision, use_tf32
from vilbert.retrieval_scorer import PairStream, RetrievalScorer, block_size, default_memory_budget

PUBLISHED_BLOCK = 500
# Random weights drawn wider than BERT's 0.02 (0.2 at width 64, scaled by 1/sqrt(width)), so that
# scores spread over (0, 1) and the equality check compares something (at 0.02 every score is
# 0.5 +- 0.001); the cost is the same.
INIT_RANGE_AT_64 = 0.2
FULL_CAPTIONS, FULL_IMAGES = 5000, 1000
TOLERANCE = {"cpu": 1e-5, "cuda": 5e-5}
# Absolute, on scores in (0, 1): a sanity bound, not exactness. On an H200 the base config in bf16 gave
# 7.7e-2 against fp32 (the benchmark's wide random init spreads the logits: scores' std 0.24).
MIXED_TOLERANCE = {"bf16": 0.1, "fp16": 2e-2, "tf32": 2e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/interbert_tiny.json", help="model configuration JSON")
    p.add_argument("--num_images", type=int, default=100)
    p.add_argument("--num_captions", type=int, default=12)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--pairs_per_forward", type=int, help="pairs per forward of ours (default: 2 GiB budget)")
    p.add_argument("--num_regions", type=int, default=102, help="regions per image (published eval YAML)")
    p.add_argument("--max_seq_length", type=int, default=30, help="caption positions (published eval YAML)")
    p.add_argument("--min_boxes", type=int, default=10, help="boxes per image: uniform in [min, 100]")
    p.add_argument("--min_tokens", type=int, default=8, help="caption positions: uniform in [min, T]")
    p.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="ours: autocast precision"
    )
    p.add_argument("--tf32", action="store_true", help="ours: fp32 matrix products in TF32 (CUDA)")
    p.add_argument("--quick", action="store_true", help="a smaller run (6 captions x 50 images)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.num_captions, args.num_images = min(args.num_captions, 6), min(args.num_images, 50)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def make_data(config: BertConfig, args: argparse.Namespace) -> tuple[dict, dict]:
    """Random captions [Nc, T] and padded images [Ni, R, ...], on the host."""
    g = torch.Generator().manual_seed(args.seed)
    nc, ni, t, r = args.num_captions, args.num_images, args.max_seq_length, args.num_regions
    lengths = torch.randint(min(args.min_tokens, t), t + 1, (nc, 1), generator=g)
    input_mask = (torch.arange(t)[None] < lengths).long()
    input_ids = torch.randint(1000, config.vocab_size, (nc, t), generator=g) * input_mask
    captions = {"input_ids": input_ids, "input_mask": input_mask, "segment_ids": torch.zeros_like(input_ids)}
    boxes = torch.randint(args.min_boxes, 101, (ni, 1), generator=g) + 1
    image_mask = (torch.arange(r)[None] < boxes.clamp(max=r)).long()
    images = {
        "image_feat": torch.rand(ni, r, config.v_feature_size, generator=g) * image_mask[..., None],
        "image_loc": torch.rand(ni, r, 5, generator=g) * image_mask[..., None],
        "image_mask": image_mask,
    }
    return captions, images


@torch.no_grad()
def published_loop(
    model: InterBertForVLTasks, captions: dict, images: dict, device: torch.device
) -> np.ndarray:
    """One caption per step against 500-image blocks, full heads, reference attention, fp32."""
    model.set_attention_impl(False)
    num_captions, num_images = captions["input_ids"].shape[0], images["image_feat"].shape[0]
    scores = np.zeros((num_captions, num_images), dtype=np.float32)
    for i in range(num_captions):
        for start in range(0, num_images, PUBLISHED_BLOCK):
            block = {k: v[start : start + PUBLISHED_BLOCK].to(device) for k, v in images.items()}
            n = block["image_feat"].shape[0]
            text = {k: v[i : i + 1].to(device).expand(n, -1) for k, v in captions.items()}
            out = model(
                text["input_ids"],
                block["image_feat"],
                block["image_loc"],
                text["segment_ids"],
                text["input_mask"],
                block["image_mask"],
                multimodal_mask=torch.cat((block["image_mask"], text["input_mask"]), dim=-1),
                pooled_only=False,
            )
            scores[i, start : start + n] = out.vil_binary_prediction.softmax(dim=1)[:, 0].cpu().numpy()
    return scores


def ours(
    model: InterBertForVLTasks,
    captions: dict,
    images: dict,
    device: torch.device,
    pairs: int | None,
    precision: str = "fp32",
) -> np.ndarray:
    """The engine of eval_retrieval.py, images embedded once (part of the timed work)."""
    scorer, stream = engine_stream(model, captions, images, device, pairs, precision)
    return scorer.score(stream)


def engine_stream(
    model: InterBertForVLTasks,
    captions: dict,
    images: dict,
    device: torch.device,
    pairs: int | None,
    precision: str,
) -> tuple[RetrievalScorer, PairStream]:
    """The scorer and the sorted pair stream of eval_retrieval.py for these captions and images."""
    model.set_attention_impl(True)
    config = model.config
    num_captions, num_images = captions["input_ids"].shape[0], images["image_feat"].shape[0]
    num_regions, num_tokens = images["image_feat"].shape[1], captions["input_ids"].shape[1]
    budget = default_memory_budget(device)
    pairs = pairs or block_size(config, num_regions, num_tokens, num_captions * num_images, budget)
    scorer = RetrievalScorer(model, Precision(precision, device), pairs)
    chunks = ({k: v[s : s + 32] for k, v in images.items()} for s in range(0, num_images, 32))
    bank = scorer.embed_images(chunks, num_images)
    return scorer, scorer.stream(captions, bank)


def timed(run: Callable[[], np.ndarray], device: torch.device) -> tuple[np.ndarray, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def subset(captions: dict, images: dict, nc: int, ni: int) -> tuple[dict, dict]:
    return {k: v[:nc] for k, v in captions.items()}, {k: v[:ni] for k, v in images.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    config = BertConfig.from_json_file(args.config)
    config.initializer_range = INIT_RANGE_AT_64 * math.sqrt(64 / config.hidden_size)
    torch.manual_seed(args.seed)
    model = InterBertForVLTasks(config).to(device).eval()
    captions, images = make_data(config, args)
    pairs = args.num_captions * args.num_images
    print(
        f"model {args.config}, device {device} ({torch.get_num_threads()} threads); {args.num_captions} "
        f"captions x {args.num_images} images, {args.num_regions} regions, {args.max_seq_length} positions"
    )

    warm_captions, warm_images = subset(captions, images, 1, min(args.num_images, 8))
    published_loop(model, warm_captions, warm_images, device)
    ours(model, warm_captions, warm_images, device, args.pairs_per_forward, args.precision)

    baseline_scores, baseline_time = timed(lambda: published_loop(model, captions, images, device), device)

    def run_ours() -> np.ndarray:
        use_tf32(args.tf32)  # ours only: the baseline stays exact fp32
        try:
            return ours(model, captions, images, device, args.pairs_per_forward, args.precision)
        finally:
            use_tf32(False)

    our_scores, our_time = timed(run_ours, device)

    def report(name: str, seconds: float) -> str:
        full_hours = seconds / pairs * FULL_CAPTIONS * FULL_IMAGES / 3600
        return (
            f"{name}: {args.num_captions / seconds:.3g} captions/s against {args.num_images} images "
            f"({pairs / seconds:.3g} pairs/s); {FULL_CAPTIONS:,} x {FULL_IMAGES:,} test: {full_hours:.3g} h"
        )

    print(
        report(
            "baseline (published loop: 1 caption x 500 images per forward, full heads, fp32)", baseline_time
        )
    )
    mode = "tf32" if args.tf32 and args.precision == "fp32" else args.precision
    print(report(f"ours (eval_retrieval.py engine, {mode})", our_time))
    _, stream = engine_stream(model, captions, images, device, args.pairs_per_forward, args.precision)
    print(f"ours: {stream.padding()}, {stream.pairs_per_forward} pairs per forward")
    difference = float(np.abs(our_scores - baseline_scores).max())
    spread = float(our_scores.std())
    limit = TOLERANCE[device.type] if mode == "fp32" else MIXED_TOLERANCE[mode]
    print(f"max |score difference| = {difference:.2e} (limit {limit:.0e}; scores' std {spread:.3f})")
    if not difference <= limit:
        print("bench_eval_retrieval: error: the two score matrices differ", file=sys.stderr)
        return 1
    print(f"ratio={baseline_time / our_time:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
