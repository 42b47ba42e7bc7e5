"""The pretraining data path, end to end, on one worker core: a real pretraining LMDB (written by the
project's own writer, msgpack values in the published tensorpack layout, base-size features) read
through the real ``ConceptCapDataset`` and the trainer's ``make_loader`` (one worker, span + group
masking, batch 64), this project's code against the code of ``BASELINE_COMMIT``, in one run.

The baseline is the package as it was at ``BASELINE_COMMIT`` (``git archive`` of ``vilbert/`` into a
temporary folder put first on ``PYTHONPATH``), so both sides run their own reader, sample builder,
masking and collate, unchanged, through the same DataLoader settings, over the same file. Each side
runs in its own process, one side after the other, each ``--passes`` times over a warm file (read
once before timing); a pass is the wall time from ``iter(loader)`` to the last batch received in the
main process, with the one persistent worker already started. The best pass is reported, together
with the worker's CPU time over it (samples per worker CPU-second does not depend on the load from
elsewhere on the machine). After timing, each side digests every batch of one more pass (SHA-256 of
every tensor, in order; the baseline's whole ``image_target`` is reduced to the counted regions'
rows, which is what this project's batch carries as ``mrm_targets``); the two digests must be equal:
the speed-up may not change a number.

Both sides follow the corrected data rules, the only ones the baseline had; this project's side is
then timed once more with the published rules (``--recipe published``, the scripts' default), which
also label regions stored as zeros. The last line printed is ``ratio=<baseline time / our time>``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE_COMMIT = "2d75b9cf840a9925b52350c81d6f12806019d934"  # the loader before issue 13
FEATURE_DIM, NUM_CLASSES, BOXES, CAPTION_WORDS = 2048, 1601, (10, 36), (8, 20)
RESULT_PREFIX = "RESULT "


def write_data(folder: str, num_samples: int, seed: int) -> tuple[str, str]:
    """``training_feat_all.lmdb`` + ``caption_train.json``, base-size features, by the project's writer."""
    from vilbert.datasets.features import PretrainDatapoint, write_pretraining_lmdb
    from vilbert.tokenization import BertTokenizer, default_vocab_path

    rng = np.random.default_rng(seed)
    vocab = BertTokenizer(default_vocab_path()).vocab
    words = np.array([w for w, i in vocab.items() if 2000 <= i < 8000 and w.isalpha() and len(w) > 2])

    def datapoints() -> Iterator[PretrainDatapoint]:
        for index in range(num_samples):
            n = int(rng.integers(BOXES[0], BOXES[1] + 1))
            w, h = int(rng.integers(300, 800)), int(rng.integers(300, 800))
            x1, y1 = rng.uniform(0, w * 0.7, n), rng.uniform(0, h * 0.7, n)
            x2 = np.minimum(x1 + rng.uniform(20, w * 0.5, n), w - 1)
            y2 = np.minimum(y1 + rng.uniform(20, h * 0.5, n), h - 1)
            scores = rng.random((n, NUM_CLASSES), dtype=np.float32)
            yield PretrainDatapoint(
                features=rng.random((n, FEATURE_DIM), dtype=np.float32),
                cls_prob=scores / scores.sum(axis=1, keepdims=True),
                boxes=np.stack([x1, y1, x2, y2], axis=1).astype(np.float32),
                num_boxes=n,
                image_h=h,
                image_w=w,
                image_id=str(3_000_000 + index),
                caption=" ".join(rng.choice(words, size=int(rng.integers(*CAPTION_WORDS, endpoint=True)))),
            )

    captions: dict[str, str] = {}

    def recorded() -> Iterator[PretrainDatapoint]:
        for point in datapoints():
            captions[point.image_id] = point.caption
            yield point

    lmdb_path = os.path.join(folder, "training_feat_all.lmdb")
    write_pretraining_lmdb(lmdb_path, recorded())
    caption_json = os.path.join(folder, "caption_train.json")
    with open(caption_json, "w", encoding="utf-8") as f:
        json.dump(captions, f)
    return lmdb_path, caption_json


def warm(path: str) -> None:
    """Read the file once, so every pass of either side finds it in the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def worker_cpu_seconds() -> float:
    """User + system CPU time of this process's children (the DataLoader workers), from /proc."""
    total = 0
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children", encoding="ascii") as f:
            for pid in f.read().split():
                with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


# Added to the batch after the baseline commit, derived from its other keys (tested elsewhere).
DERIVED_KEYS = ("msm_positions", "mrm_positions")


def counted_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with ``mrm_targets`` (the counted regions' MRM targets, which this project's collate
    writes) in place of the baseline's whole ``image_target``, which holds the same rows."""
    if "image_target" not in batch:
        return batch
    counted = (batch["image_label"] == 1) & (batch["is_next"] == 0)[:, None]
    rest = {key: value for key, value in batch.items() if key != "image_target"}
    return {**rest, "mrm_targets": batch["image_target"][counted]}


def batch_digest(batch: dict[str, torch.Tensor], digest: hashlib._Hash) -> None:
    batch = counted_targets(batch)
    for key in sorted(set(batch) - set(DERIVED_KEYS)):
        array = np.ascontiguousarray(batch[key].numpy())
        digest.update(f"{key}{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())


def run_side(lmdb_path: str, caption_json: str, args: argparse.Namespace) -> dict[str, object]:
    """Time ``args.passes`` passes of the trainer's loader, then digest one more pass."""
    from vilbert.datasets.concept_cap import ConceptCapDataset
    from vilbert.datasets.loader import make_loader
    from vilbert.distributed import DistContext
    from vilbert.tokenization import BertTokenizer, default_vocab_path

    torch.set_num_threads(1)
    rules = {"rules": args.rules} if "rules" in inspect.signature(ConceptCapDataset).parameters else {}
    dataset = ConceptCapDataset(
        lmdb_path, caption_json, BertTokenizer(default_vocab_path()), span_mask=True, seed=args.seed, **rules
    )
    ctx = DistContext(rank=0, local_rank=-1, world_size=1, device=torch.device("cpu"))
    # Exact padding on both sides, so that their batches can be compared bit for bit.
    exact = (
        {"pad_to_multiple": 1}
        if "pad_to_multiple" in inspect.signature(dataset.collate_fn).parameters
        else {}
    )
    loader = make_loader(
        dataset, args.batch_size, dataset.collate_fn(**exact), ctx, False, True, args.workers, args.seed
    )
    passes = []
    for _ in range(args.passes):
        loader.batch_sampler.set_epoch(0)
        samples = 0
        cpu, start = worker_cpu_seconds(), time.perf_counter()
        for batch in loader:
            samples += len(batch["input_ids"])
        wall = time.perf_counter() - start
        passes.append({"wall": wall, "worker_cpu": worker_cpu_seconds() - cpu, "samples": samples})
    digest = hashlib.sha256()
    for batch in loader:
        batch_digest(batch, digest)
    return {"passes": passes, "digest": digest.hexdigest()}


def baseline_package(folder: str) -> str:
    """``vilbert/`` as of ``BASELINE_COMMIT``, extracted under ``folder``; returns the folder."""
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", BASELINE_COMMIT, "vilbert"], capture_output=True, check=False
    )
    if archive.returncode:
        raise SystemExit(
            f"bench_loader.py: error: cannot read the baseline commit {BASELINE_COMMIT[:12]} with git "
            f"(needs this repository's history): {archive.stderr.decode().strip()}"
        )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def side_process(
    name: str, package_root: str, lmdb_path: str, caption_json: str, args, rules: str = "modern"
) -> dict:
    """Run one side in a fresh interpreter whose ``vilbert`` is the one under ``package_root``
    (``rules``: the data rules, where that ``vilbert`` has them)."""
    env = {**os.environ, "PYTHONPATH": package_root, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--side",
        lmdb_path,
        caption_json,
        *("--batch_size", str(args.batch_size), "--passes", str(args.passes)),
        *("--workers", str(args.workers), "--seed", str(args.seed), "--rules", rules),
    ]
    result = subprocess.run(command, cwd=package_root, capture_output=True, text=True, env=env, check=False)
    if result.returncode:
        raise SystemExit(f"bench_loader.py: error: the {name} side failed:\n{result.stderr}")
    line = next(x for x in result.stdout.splitlines() if x.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX) :])


def report(name: str, outcome: dict) -> float:
    passes = outcome["passes"]
    best = min(passes, key=lambda p: p["wall"])
    rates = ", ".join(f"{p['samples'] / p['wall']:.0f}" for p in passes)
    per_cpu = best["samples"] / best["worker_cpu"] if best["worker_cpu"] else float("nan")
    print(
        f"{name}: {best['samples'] / best['wall']:.0f} samples/s (best of {len(passes)}: {rates}); "
        f"{per_cpu:.0f} samples per worker CPU-second in the best pass"
    )
    return best["wall"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_samples", type=int, default=2000, help="datapoints in the LMDB")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3, help="timed passes per side (best reported)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", nargs=2, metavar=("LMDB", "CAPTIONS"), help=argparse.SUPPRESS)
    parser.add_argument("--rules", default="modern", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.num_samples < args.batch_size or args.passes < 1 or args.workers < 1:
        parser.error("need --num_samples >= --batch_size, --passes >= 1 and --workers >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side:
        print(RESULT_PREFIX + json.dumps(run_side(*args.side, args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_loader.") as folder:
        start = time.perf_counter()
        lmdb_path, caption_json = write_data(folder, args.num_samples, args.seed)
        size = os.path.getsize(lmdb_path)
        print(
            f"wrote {args.num_samples} datapoints ({size / 2**20:.0f} MiB, {FEATURE_DIM}-d features, "
            f"{NUM_CLASSES} classes, {BOXES[0]}-{BOXES[1]} boxes) in {time.perf_counter() - start:.1f} s; "
            f"batch {args.batch_size}, {args.workers} worker(s), span masking, torch {torch.__version__}"
        )
        warm(lmdb_path)
        baseline_root = baseline_package(os.path.join(folder, "baseline"))
        baseline = side_process("baseline", baseline_root, lmdb_path, caption_json, args)
        ours = side_process("ours", ROOT, lmdb_path, caption_json, args)
        published = side_process("ours, published rules", ROOT, lmdb_path, caption_json, args, "published")
    baseline_time = report(f"baseline (vilbert at {BASELINE_COMMIT[:12]})", baseline)
    our_time = report("ours", ours)
    if baseline["digest"] != ours["digest"]:
        raise SystemExit("bench_loader.py: error: the two sides produced different batches")
    print(f"batches bitwise identical on both sides (sha256 {ours['digest'][:16]})")
    # The scripts' default data rules; the baseline had only the corrected ones, so no ratio.
    report("ours with the published data rules (--recipe published, the default)", published)
    print(f"ratio={baseline_time / our_time:.2f}")


if __name__ == "__main__":
    main()
