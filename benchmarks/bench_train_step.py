"""One pretraining step (forward, backward, optimiser step), this project's fast paths against the plain
path, in one run: the same initial weights, the same samples, the same loss and step machinery.

- fast: ``scaled_dot_product_attention``, MSM/MRM heads only on counted positions (``gather_heads``),
  batches padded to their own longest caption / region list, ``--precision``, and AdamW as
  ``build_optimizer`` picks it (torch's fused kernel on CUDA, and on the CPU from torch 2.4;
  ``--adamw fused`` forces it).
- plain: the published math (explicit softmax attention, heads over every position, every batch
  padded to 36 tokens / 36 + 1 regions, fp32, unfused AdamW: torch's for-loop on the CPU, foreach on
  CUDA): a stand-in for the published cost.

Both run the training loop's own code: ``pretraining_losses`` (published loss weights) under the
``Precision`` autocast, then ``Optimization.backward`` / ``step`` (GradScaler, clipping at 1.0, the
non-finite guard); a step includes moving its batch to the device. Samples come from
``PretrainingSampleBuilder`` (span + group masking) over synthetic datapoints: captions of 10-18
tokens, 10-36 regions, the config's feature and class sizes. The two sides' steps are interleaved
(alternating which goes first) so background load hits both alike; the median of ``--steps`` timed
steps is reported per side.

Peak memory of a side = its parameters + optimiser state + the high water of one more (untimed) step
above what was resident before it: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's
peak RSS (``VmHWM``, the counter behind ``ru_maxrss``, reset through ``/proc/self/clear_refs``) after
``malloc_trim``, so freed pages kept by the allocator are not counted as free.

Operators per step of an eager side: the aten operators one more (untimed) step dispatches, counted
by a dispatch mode, views apart. On a GPU each of the others launches at least one kernel, so the
count is a floor on an eager step's launches, and nearly the same on any device (a few operators
are device-specific, such as the attention kernel's).

``--compare compile`` times the eager fast path ("plain") against what ``--compile`` trains
("fast": ``torch.compile``, the heads on every position so that the graph has static shapes).

``--compare recipes`` times the two training recipes instead, both on the fast path: ``--recipe
modern`` (fused AdamW, one global clip; the baseline, printed as "plain") against ``--recipe
published`` (the vectorised BertAdam with per-parameter clipping and its own schedule, "fast").

The last line printed is ``ratio=<plain time / fast time>``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import importlib.util
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vilbert.config import BertConfig
from vilbert.engine import Optimization
from vilbert.flops import batch_flops, estimate_mfu, peak_flops
from vilbert.modeling import InterBertForMultiModalPreTraining
from vilbert.optimization import build_optimizer, param_groups
from vilbert.precision import PRECISIONS, Precision
from vilbert.recipe import pretraining_plan
from vilbert.training_args import add_compile_flag, compile_mode
from vilbert.training_state import NonFiniteGuard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "config", "bert_base_6layer_interbert.json")
MAX_SEQ_LENGTH, REGION_LEN = 36, 36
CAPTION_TOKENS = (10, 18)  # uniform, mean 14 (Conceptual Captions averages ~10 words, ~14 WordPieces)
REGIONS = (10, 36)
FIRST_WORD_ID = 1000  # past [PAD], [unused*], [CLS], [SEP], [MASK] and the other specials
LEARNING_RATE = 1e-4
RECIPE_T_TOTAL = 1000  # a schedule long enough that the timed steps run at a nonzero lr
DISTINCT_BATCHES = 8  # steps cycle through at most this many batches (bounds host memory at batch 64)
MIB = 2**20
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
# Imported by the dataset module for its LMDB reader only; the image of the GPU machines lacks them.
STORAGE_MODULES = ("lmdb", "msgpack", "msgpack_numpy")


def _unavailable_module(name: str) -> types.ModuleType:
    """A placeholder that lets ``import name`` succeed and fails loudly on first use.

    AttributeError (not ImportError), so introspection that probes modules (``inspect``) stays happy.
    """
    module = types.ModuleType(name)

    def missing(attribute: str) -> None:
        raise AttributeError(f"{name} is not installed: this placeholder has no {attribute!r}")

    module.__getattr__ = missing  # type: ignore[method-assign]
    return module


def import_pretraining_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """``vilbert.datasets.concept_cap`` and ``vilbert.pretraining``, importable without lmdb/msgpack.

    Both import the LMDB reader at module level; nothing here reads an LMDB, so on a machine without
    those packages (the GPU image) placeholders stand in for them.
    """
    for name in STORAGE_MODULES:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = _unavailable_module(name)
    from vilbert import pretraining
    from vilbert.datasets import concept_cap

    return concept_cap, pretraining


@dataclass(frozen=True)
class IdTokenizer:
    """The tokenizer interface the sample builder uses, over captions written as WordPiece ids.

    Tokenising is not part of a training step, and this needs no vocabulary file (the GPU image has
    none); ``cls``/``sep``/``mask`` ids are bert-base-uncased's.
    """

    vocab_size: int
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103

    def encode(self, caption: str) -> list[int]:
        return [int(word) for word in caption.split()]


def make_datapoints(config: BertConfig, num: int, rng: np.random.Generator) -> list:
    """Decoded Conceptual Captions datapoints with the config's feature and class sizes."""
    concept_cap, _ = import_pretraining_modules()
    points = []
    for index in range(num):
        n = int(rng.integers(REGIONS[0], REGIONS[1] + 1))
        w, h = int(rng.integers(300, 800)), int(rng.integers(300, 800))
        x1, y1 = rng.uniform(0, w * 0.7, n), rng.uniform(0, h * 0.7, n)
        x2 = np.minimum(x1 + rng.uniform(20, w * 0.5, n), w - 1)
        y2 = np.minimum(y1 + rng.uniform(20, h * 0.5, n), h - 1)
        scores = rng.random((n, config.v_target_size), dtype=np.float32)
        words = rng.integers(
            FIRST_WORD_ID, config.vocab_size, int(rng.integers(*CAPTION_TOKENS, endpoint=True))
        )
        points.append(
            concept_cap.PretrainDatapoint(
                features=rng.random((n, config.v_feature_size), dtype=np.float32),
                cls_prob=scores / scores.sum(axis=1, keepdims=True),
                boxes=np.stack([x1, y1, x2, y2], axis=1).astype(np.float32),
                num_boxes=n,
                image_h=h,
                image_w=w,
                image_id=str(1_000_000 + index),
                caption=" ".join(map(str, words)),
            )
        )
    return points


def make_batches(
    config: BertConfig, batch_size: int, num_batches: int, seed: int, pad_to_multiple: int = 8
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """The same masked samples collated twice: dynamically padded and padded to the maxima."""
    concept_cap, _ = import_pretraining_modules()
    points = make_datapoints(config, batch_size * num_batches, np.random.default_rng(seed))
    builder = concept_cap.PretrainingSampleBuilder(
        IdTokenizer(config.vocab_size),
        {p.image_id: p.caption for p in points},
        max_seq_length=MAX_SEQ_LENGTH,
        region_len=REGION_LEN,
        span_mask=True,
        predict_feature=config.predict_feature,
    )
    dynamic, full = [], []
    for first in range(0, len(points), batch_size):
        samples = [
            builder.build(points[i], concept_cap.sample_rng(seed, 0, 0, i))
            for i in range(first, first + batch_size)
        ]
        dynamic.append(
            concept_cap.collate_pretraining(samples, True, MAX_SEQ_LENGTH, REGION_LEN, pad_to_multiple)
        )
        full.append(concept_cap.collate_pretraining(samples, False, MAX_SEQ_LENGTH, REGION_LEN))
    return dynamic, full


def loader_batches(
    config: BertConfig,
    data_dir: str,
    batch_size: int,
    num_batches: int,
    seed: int,
    pad_to_multiple: int,
    device,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Batches of a real pretraining LMDB through the trainer's loader (one worker, span masking;
    pinned on CUDA): dynamically padded to multiples of ``pad_to_multiple``, and padded to the maxima.

    ``data_dir`` holds ``training_feat_all.lmdb`` + ``caption_train.json`` (``bench_loader.py``'s
    layout); its features must have the config's sizes.
    """
    concept_cap, _ = import_pretraining_modules()
    from vilbert.datasets.loader import make_loader
    from vilbert.distributed import DistContext
    from vilbert.tokenization import BertTokenizer, default_vocab_path

    files = concept_cap.pretraining_files(data_dir, "train")
    dataset = concept_cap.ConceptCapDataset(
        *files,
        BertTokenizer(default_vocab_path()),
        MAX_SEQ_LENGTH,
        REGION_LEN,
        True,
        config.predict_feature,
        seed,
    )
    ctx = DistContext(rank=0, local_rank=-1, world_size=1, device=device)

    def collect(collate) -> list[dict[str, torch.Tensor]]:
        loader = make_loader(dataset, batch_size, collate, ctx, False, False, 1, seed)
        loader.batch_sampler.set_epoch(0)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == num_batches:
                break
        return batches

    return collect(dataset.collate_fn(True, pad_to_multiple)), collect(dataset.collate_fn(False))


@dataclass
class Side:
    """One configuration under test: its model, optimiser machinery, precision and batches."""

    name: str
    description: str
    model: InterBertForMultiModalPreTraining
    optimization: Optimization
    precision: Precision
    batches: list[dict[str, torch.Tensor]]

    def resident_bytes(self) -> int:
        """Parameters and optimiser state (gradients are freed between steps)."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        state = sum(
            t.numel() * t.element_size()
            for s in self.optimization.optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        return params + state


def make_side(
    name: str,
    model: InterBertForMultiModalPreTraining,
    fast: bool,
    precision: Precision,
    batches: list[dict[str, torch.Tensor]],
    fused_adamw: bool | None,
    recipe: str | None = None,
) -> Side:
    """``fused_adamw``: None lets ``build_optimizer`` choose, as the training scripts do.
    ``recipe``: the optimiser, schedule and clipping of that recipe, as ``train_concap.py`` builds
    them (from scratch); None: plain AdamW, no schedule."""
    model.set_attention_impl(use_sdpa=fast)
    model.gather_heads = fast
    model.train()
    if recipe is None:
        optimizer = build_optimizer("AdamW", param_groups(model), LEARNING_RATE, fused=fused_adamw)
        step = Optimization(model, optimizer, None, precision.make_scaler(), NonFiniteGuard(max_bad_steps=20))
        kind = f"{adamw_kind(optimizer)} AdamW"
    else:
        plan = pretraining_plan(recipe, model, LEARNING_RATE, 0.1, RECIPE_T_TOTAL, from_pretrained=False)
        optimizer = plan.optimizer
        step = Optimization(
            model, optimizer, plan.scheduler, precision.make_scaler(), NonFiniteGuard(20), plan.max_grad_norm
        )
        kind = f"--recipe {recipe}: " + (
            f"{adamw_kind(optimizer)} AdamW" if recipe == "modern" else "foreach BertAdam"
        )
    description = (
        f"{'SDPA' if fast else 'plain'} attention, {'gathered' if fast else 'full'} heads, "
        f"{'dynamic' if fast else 'full'} padding (mean {mean_shape(batches)}), {precision.mode}, {kind}"
    )
    return Side(name, description, model, step, precision, batches)


def adamw_kind(optimizer: torch.optim.Optimizer) -> str:
    """Which AdamW implementation torch runs: unfused, it uses foreach kernels on CUDA by default."""
    if optimizer.defaults.get("fused"):
        return "fused"
    on_cuda = all(p.is_cuda for group in optimizer.param_groups for p in group["params"])
    return "foreach" if on_cuda and optimizer.defaults.get("foreach") is not False else "for-loop"


def device_name_or_none(device: torch.device) -> str | None:
    """The GPU's name (to look up its peak); ``""`` on the CPU, which has no peak in the table."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(side: Side, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> None:
    """The body of the pretraining loop (``vilbert.pretraining.train``) for one micro-batch = one step."""
    with side.precision.autocast():
        loss = loss_fn(side.model, batch)
    side.optimization.backward(loss)
    side.optimization.step()


def timed_step(side: Side, index: int, device: torch.device, loss_fn: LossFn) -> float:
    synchronize(device)
    start = time.perf_counter()
    train_step(side, side.batches[index % len(side.batches)], loss_fn)
    synchronize(device)
    return time.perf_counter() - start


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


@contextlib.contextmanager
def cpu_high_water() -> Iterator[list[int]]:
    """Yields a list that receives the peak RSS growth (bytes) over the block, from a trimmed heap."""
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if malloc_trim is not None:
        malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _read_status_kib("VmRSS")
    growth: list[int] = []
    yield growth
    growth.append((_read_status_kib("VmHWM") - before) * 1024)


def step_high_water(side: Side, device: torch.device, loss_fn: LossFn) -> int | None:
    """Bytes allocated at the peak of one step above what was allocated before it (None: unmeasurable)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_step(side, side.batches[0], loss_fn)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        with cpu_high_water() as growth:
            train_step(side, side.batches[0], loss_fn)
    except OSError:
        return None
    return growth[0]


def profile_step(side: Side, device: torch.device, loss_fn: LossFn, rows: int = 15) -> None:
    """Top operators of one step by self CPU time (self CUDA time on a GPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        renamed = hasattr(torch.autograd.profiler_util.FunctionEventAvg, "self_device_time_total")
        sort_by = "self_device_time_total" if renamed else "self_cuda_time_total"  # renamed in torch 2.4
    with torch.profiler.profile(activities=activities) as prof:
        train_step(side, side.batches[0], loss_fn)
        synchronize(device)
    print(f"\nprofile of one {side.name} step ({side.description}), by {sort_by}:")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=rows))


class OperatorCount(TorchDispatchMode):
    """Counts the aten operators a block dispatches, views (which run no kernel) apart. On a GPU each
    other operator is at least one kernel launch, so the count bounds an eager step's launches from
    below, on whichever device it is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def format_operators(side: Side, device: torch.device, loss_fn: LossFn) -> str:
    """The operators of one more (untimed) step of ``side``; a compiled model runs its own kernels."""
    if isinstance(side.model, torch._dynamo.eval_frame.OptimizedModule):
        return "operators per step: not counted (compiled)"
    with OperatorCount() as count:
        train_step(side, side.batches[0], loss_fn)
    synchronize(device)
    return f"operators per step: {count.kernels} (+ {count.views} views)"


def mean_shape(batches: list[dict[str, torch.Tensor]]) -> str:
    tokens = statistics.mean(b["input_ids"].shape[1] for b in batches)
    regions = statistics.mean(b["image_feat"].shape[1] for b in batches)
    return f"{tokens:.1f} tokens + {regions:.1f} regions"


def format_throughput(side: Side, config: BertConfig, median: float, peak: float | None) -> str:
    """Achieved model TFLOP/s of the side's median step, and its MFU where the peak is known."""
    flops = statistics.mean(
        batch_flops(config, batch, gather_heads=side.model.gather_heads).training_step
        for batch in side.batches
    )
    text = f"{flops / median / 1e12:.2f} TFLOP/s ({flops / batch_size_of(side) / 1e9:.2f} GFLOP/sample)"
    if peak is not None:
        text += f", MFU {estimate_mfu(flops, 1 / median, peak):.1%} of {peak / 1e12:.0f} TFLOP/s"
    return text


def batch_size_of(side: Side) -> int:
    return side.batches[0]["input_ids"].shape[0]


def format_memory(side: Side, high_water: int | None) -> str:
    resident = side.resident_bytes()
    if high_water is None:  # no /proc/self/clear_refs (not Linux)
        return f"peak n/a (resident {resident / MIB:.0f} MiB)"
    return f"peak {(resident + high_water) / MIB:.0f} MiB ({resident / MIB:.0f} + {high_water / MIB:.0f})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=BASE_CONFIG, help="model config json (default: the published base)"
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="the fast side's precision")
    parser.add_argument(
        "--adamw",
        choices=("auto", "fused"),
        default="auto",
        help="fast side AdamW: build_optimizer's choice (fused where torch has it) or forced fused",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (0: torch's default); 1 keeps a busy shared machine from stalling both threads",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare",
        choices=("paths", "recipes", "compile"),
        default="paths",
        help="paths: the plain path vs every fast path (AdamW both); recipes: --recipe modern (the "
        "baseline, 'plain') vs --recipe published ('fast'), both on the fast path; compile: the eager "
        "fast path vs the trainer's --compile set-up (torch.compile, heads on every position)",
    )
    parser.add_argument("--profile", action="store_true", help="print the top operators of one step per side")
    parser.add_argument(
        "--data_dir",
        default="",
        help="read the batches from DATA_DIR/training_feat_all.lmdb + caption_train.json through the loader",
    )
    parser.add_argument(
        "--pad_to_multiple", type=int, default=8, help="fast side: dynamic padding rounded up to N positions"
    )
    add_compile_flag(parser, "the fast side's model")
    parser.add_argument("--peak_tflops", type=float, default=None, help="peak for MFU (default: by device)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.threads < 0:
        parser.error("need --steps >= 1, --warmup >= 0, --batch_size >= 1, --threads >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = BertConfig.from_json_file(args.config)
    _, pretraining = import_pretraining_modules()
    # The published loss weights (all 1): the trainer's LossWeights where it has them, else its flags.
    weights_class = getattr(pretraining, "LossWeights", None)
    train_args = weights_class() if weights_class else pretraining.build_parser().parse_args([])

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return pretraining.pretraining_losses(model, pretraining.to_device(batch, device), train_args)[0]

    num_batches = min(args.warmup + args.steps, DISTINCT_BATCHES)
    if args.data_dir:
        dynamic, full = loader_batches(
            config, args.data_dir, args.batch_size, num_batches, args.seed, args.pad_to_multiple, device
        )
    else:
        dynamic, full = make_batches(config, args.batch_size, num_batches, args.seed, args.pad_to_multiple)
    plain_model = InterBertForMultiModalPreTraining(config).to(device)
    fast_model = copy.deepcopy(plain_model)  # same weights, ties kept
    fused_adamw = True if args.adamw == "fused" else None
    if args.compare == "recipes":  # the baseline is modern; both sides take the fast path
        precision = Precision(args.precision, device)
        plain = make_side("plain", plain_model, True, precision, dynamic, None, recipe="modern")
        fast = make_side("fast", fast_model, True, precision, dynamic, None, recipe="published")
    elif args.compare == "compile":  # eager fast path vs the trainer's --compile set-up
        precision = Precision(args.precision, device)
        plain = make_side("plain", plain_model, True, precision, dynamic, fused_adamw)
        fast = make_side("fast", fast_model, True, precision, dynamic, fused_adamw)
        fast.model.gather_heads = False  # as the trainer does under --compile: static shapes
        fast.model = torch.compile(fast.model, mode=compile_mode(args.compile or "default"))
        fast.description = fast.description.replace("gathered heads", "full heads") + ", torch.compile"
    else:
        plain = make_side("plain", plain_model, False, Precision("fp32", device), full, fused_adamw=False)
        fast = make_side("fast", fast_model, True, Precision(args.precision, device), dynamic, fused_adamw)
    if args.compile and args.compare != "compile":
        fast.model = torch.compile(fast.model, mode=compile_mode(args.compile))
        fast.description += f", torch.compile ({args.compile})"
    fast.description += f", padding to multiples of {args.pad_to_multiple}"
    sides = (plain, fast)
    peaks = {
        side.name: peak_flops(side.precision.mode, device_name_or_none(device), args.peak_tflops)
        for side in sides
    }

    for index in range(args.warmup):
        for side in sides:
            timed_step(side, index, device, loss_fn)
    times: dict[str, list[float]] = {side.name: [] for side in sides}
    wall, cpu = time.perf_counter(), time.process_time()
    for index in range(args.warmup, args.warmup + args.steps):
        for side in sides if index % 2 else sides[::-1]:  # alternate which side goes first
            times[side.name].append(timed_step(side, index, device, loss_fn))
    cpu_share = (time.process_time() - cpu) / (time.perf_counter() - wall) / torch.get_num_threads()
    high_water = {side.name: step_high_water(side, device, loss_fn) for side in sides}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(
        f"config={os.path.relpath(args.config, ROOT)} device={name} batch_size={args.batch_size} "
        f"steps={args.steps} warmup={args.warmup} torch={torch.__version__}"
    )
    if device.type == "cpu":  # on a shared machine, say how much of the CPUs the timed steps got
        print(f"cpu share while timing: {cpu_share:.0%} of {torch.get_num_threads()} threads x wall time")
    for side in sides:
        print(f"{side.name:5s} = {side.description}")
    counter = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"
    print(f"peak memory = parameters + optimiser state + one step's high water above them ({counter})")
    medians = {side.name: statistics.median(times[side.name]) for side in sides}
    for side in sides:
        median = medians[side.name]
        print(
            f"{side.name}: median {median:.4f} s/step, {args.batch_size / median:.2f} samples/s, "
            f"{format_throughput(side, config, median, peaks[side.name])}, "
            f"{format_memory(side, high_water[side.name])}"
        )
    for side in sides:
        print(f"{side.name}: {format_operators(side, device, loss_fn)}")
    if args.profile:
        for side in sides:
            profile_step(side, device, loss_fn)
    if args.compare == "recipes":
        print(f"published / modern step time = {medians['fast'] / medians['plain']:.3f} (goal <= 1.15)")
    print(f"ratio={medians['plain'] / medians['fast']:.2f}")


if __name__ == "__main__":
    main()
