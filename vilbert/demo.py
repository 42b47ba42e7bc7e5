"""The demo pipeline behind ``demo.py`` and ``make demo``.

Each stage calls the library entry point of a published script with that script's flags, so the
demo exercises exactly what users run: ``train_concap.py`` → ``eval_retrieval.py --zero_shot`` →
``train_tasks.py --tasks 1-2-3 --use_ema`` → ``eval_retrieval.py`` and ``eval_tasks.py --compute_q_ar``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vilbert import finetuning, pretraining, retrieval_eval, vcr_eval
from vilbert.atomic import atomic_write_json
from vilbert.datasets.retrieval import load_retrieval_annotations
from vilbert.datasets.synthetic import SyntheticWorldConfig, generate_synthetic_world
from vilbert.distributed import DistContext, init_distributed
from vilbert.tokenization import default_bert_dir

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {"r1": 61.9, "r5": 87.1, "r10": 92.7, "zs_r1": 49.2, "zs_r5": 77.6, "zs_r10": 86.0,
         "q_a": 73.1, "qa_r": 74.8, "q_ar": 54.9}  # fmt: skip
COLUMNS = ("r1", "r5", "r10", "zs_r1", "zs_r5", "zs_r10", "q_a", "qa_r", "q_ar")
HEADER = ("R@1", "R@5", "R@10", "zs R@1", "zs R@5", "zs R@10", "Q>A", "QA>R", "Q>AR")
# The demo's short synthetic schedules (learning rates, ITM take-off near 900 steps) were tuned for
# AdamW; the published recipe's BertAdam (no bias correction) takes larger early steps.
DEMO_RECIPE = "modern"


@dataclass
class DemoSettings:
    """Sizes and hyper-parameters of one demo run (tuned so every stage visibly learns on 2 cores)."""

    seed: int = 0
    world: SyntheticWorldConfig = field(default_factory=SyntheticWorldConfig)
    config_file: str = os.path.join(ROOT, "config", "interbert_demo.json")
    init_from_minilm: bool = False
    pretrain_epochs: int = 16
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3
    max_seq_length: int = 24
    finetune_epochs: int = 4
    finetune_lr: float = 1e-3
    ema_decay: float = 0.99
    eval_batch: int = 100

    @classmethod
    def preset(cls, quick: bool = False, init_from_minilm: bool = False, seed: int = 0) -> DemoSettings:
        world = SyntheticWorldConfig(
            seed=seed,
            feature_dim=64,
            num_classes=41,
            max_boxes=10,
            pretrain_train_images=1000 if quick else 6000,
            pretrain_val_images=100,
            flickr_train_images=150 if quick else 400,
            flickr_val_images=50,
            flickr_test_images=50 if quick else 100,
            vcr_train_questions=300 if quick else 1000,
            vcr_val_questions=100 if quick else 200,
            vcr_test_questions=50,
            hard_negative_pool_size=20,
            task_batch_size=16,
            flickr_max_region_num=12,
            vcr_max_region_num=16,
        )
        settings = cls(seed=seed, world=world, init_from_minilm=init_from_minilm)
        if init_from_minilm:
            settings.config_file = os.path.join(ROOT, "config", "interbert_minilm.json")
            settings.pretrain_lr = 1e-4
            settings.finetune_lr = 5e-5
        if quick:
            settings.pretrain_epochs, settings.finetune_epochs = 3, 4
        return settings


def _stage(name: str, timings: dict[str, float], body: Callable[[], Any]) -> Any:
    logger.info("===== %s =====", name)
    start = time.perf_counter()
    result = body()
    timings[name] = round(time.perf_counter() - start, 1)
    logger.info("===== %s done in %.0f s =====", name, timings[name])
    return result


def _stop_if_interrupted(result: Any, stage: str) -> None:
    """A stage stopped by a signal returns its exit status: the demo stops too (with that status),
    instead of running the next stage on a checkpoint that was never written."""
    if isinstance(result, int) and result:
        logger.warning("demo: %s was stopped by a signal; rerun the demo to resume it", stage)
        raise SystemExit(result)


def _pretrain(out: str, world: str, s: DemoSettings, ctx: DistContext) -> str:
    cc = os.path.join(world, "conceptual_captions")
    argv = [
        "--bert_model", "bert-base-uncased",
        "--from_pretrained", default_bert_dir() if s.init_from_minilm else "",
        "--train_data_dir", cc, "--val_data_dir", cc,
        "--config_file", s.config_file,
        "--learning_rate", str(s.pretrain_lr), "--train_batch_size", str(s.pretrain_batch),
        "--save_name", "pretrained", "--output_dir", out,
        "--num_train_epochs", str(s.pretrain_epochs),
        "--span_mask", "--num_workers", "1", "--seed", str(s.seed),
        "--max_seq_length", str(s.max_seq_length), "--region_len", str(s.world.max_boxes),
        "--bert_lr_factor", "1", "--log_every", "25", "--quiet", "--recipe", DEMO_RECIPE,
    ]  # fmt: skip
    _stop_if_interrupted(pretraining.train(pretraining.parse_args(argv), ctx), "pretraining")
    return os.path.join(out, "pretrained", f"pytorch_model_{s.pretrain_epochs - 1}.bin")


def _eval_retrieval(
    checkpoint: str, world: str, out: str, s: DemoSettings, ctx: DistContext, zero_shot: bool
):
    argv = [
        "--bert_model", "bert-base-uncased", "--from_pretrained", checkpoint,
        "--config_file", s.config_file, "--task", "3", "--split", "test",
        "--batch_size", str(s.eval_batch), "--task_config", os.path.join(world, "interbert_tasks_eval.yml"),
        "--output_dir", out, "--save_name", "zero_shot" if zero_shot else "fine_tuned", "--quiet",
    ] + (["--zero_shot"] if zero_shot else [])  # fmt: skip
    return retrieval_eval.evaluate_retrieval(retrieval_eval.retrieval_parser().parse_args(argv), ctx)


def _finetune(pretrained: str, world: str, out: str, s: DemoSettings, ctx: DistContext) -> str:
    argv = [
        "--bert_model", "bert-base-uncased", "--from_pretrained", pretrained,
        "--config_file", s.config_file, "--learning_rate", str(s.finetune_lr),
        "--num_workers", "1", "--tasks", "1-2-3", "--save_name", "demo",
        "--use_ema", "--ema_decay_ratio", str(s.ema_decay), "--num_train_epochs", str(s.finetune_epochs),
        "--task_config", os.path.join(world, "interbert_tasks.yml"), "--output_dir", out,
        "--seed", str(s.seed), "--log_every", "25", "--quiet", "--recipe", DEMO_RECIPE,
    ]  # fmt: skip
    args = finetuning.parse_args(argv)
    _stop_if_interrupted(finetuning.train(args, ctx), "fine-tuning")
    return os.path.join(out, f"VCR_Q-A-VCR_QA-R-RetrievalFlickr30k_{_stem(s.config_file)}-demo")


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _eval_vcr(checkpoint: str, world: str, out: str, s: DemoSettings, ctx: DistContext) -> dict[str, Any]:
    argv = [
        "--bert_model", "bert-base-uncased", "--from_pretrained", checkpoint,
        "--config_file", s.config_file, "--tasks", "1-2", "--split", "val", "--batch_size", "32",
        "--task_config", os.path.join(world, "interbert_tasks.yml"), "--output_dir", out,
        "--save_name", "vcr", "--compute_q_ar", "--quiet",
    ]  # fmt: skip
    return vcr_eval.evaluate_vcr(vcr_eval.vcr_parser().parse_args(argv), ctx)


def results_table(row: dict[str, float], num_test_images: int) -> str:
    """The paper's table: the paper, this run, and chance level."""
    chance_r = {k: 100.0 * min(k, num_test_images) / num_test_images for k in (1, 5, 10)}
    chance = {"r1": chance_r[1], "r5": chance_r[5], "r10": chance_r[10],
              "zs_r1": chance_r[1], "zs_r5": chance_r[5], "zs_r10": chance_r[10],
              "q_a": 25.0, "qa_r": 25.0, "q_ar": 6.25}  # fmt: skip

    def line(label: str, values: dict[str, float]) -> str:
        cells = [f"{values[c]:6.1f}" for c in COLUMNS]
        return f"{label:<20} {' '.join(cells[:3])} | {' '.join(cells[3:6])} | {' '.join(cells[6:])}"

    header = (
        f"{'':<20} {' '.join(f'{h:>6}' for h in HEADER[:3])} | "
        + " ".join(f"{h:>6}" for h in HEADER[3:6])
        + " | "
        + " ".join(f"{h:>6}" for h in HEADER[6:])
    )
    return "\n".join([header, line("InterBERT (paper)", PAPER), line("demo (synthetic)", row),
                      line(f"chance ({num_test_images} images)", chance)])  # fmt: skip


def _read_history(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, "history.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(pretrain_dir: str, finetune_dir: str, row: dict[str, float], chance_r1: float, path: str) -> None:
    """Training curves of the loss components and the recall@K bars, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, run_dir, title in (
        (axes[0], pretrain_dir, "pretraining"),
        (axes[1], finetune_dir, "fine-tuning"),
    ):
        train = [r for r in _read_history(run_dir) if r["split"] == "train"]
        names = [k for k in (train[0] if train else {}) if k not in ("split", "step", "lr", "samples_per_s")]
        for name in names:
            ax.plot([r["step"] for r in train], [r[name] for r in train], label=name)
        ax.set_title(f"{title} losses")
        ax.set_xlabel("optimiser step")
        ax.legend(fontsize=7)
    labels = ["R@1", "R@5", "R@10"]
    xs = range(len(labels))
    axes[2].bar([x - 0.2 for x in xs], [row["r1"], row["r5"], row["r10"]], width=0.4, label="fine-tuned")
    axes[2].bar(
        [x + 0.2 for x in xs], [row["zs_r1"], row["zs_r5"], row["zs_r10"]], width=0.4, label="zero-shot"
    )
    axes[2].axhline(chance_r1, color="grey", linestyle="--", label="chance R@1")
    axes[2].set_xticks(list(xs), labels)
    axes[2].set_ylim(0, 100)
    axes[2].set_title("Flickr30K-style image retrieval (synthetic test)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _attention_picture(checkpoint: str, world: str, s: DemoSettings, output_dir: str) -> None:
    """``attention.png`` (+ ``.json``): what the fine-tuned model's words look at, for the first test
    caption and its image (the synthetic world does not teach word→region grounding; the picture
    shows what the attention does, not that it points at the named object)."""
    from vilbert.attention_maps import attention_map, write_attention_map
    from vilbert.inference import RankSettings, load_model, open_features

    flickr = os.path.join(world, "flickr30k")
    annotations = load_retrieval_annotations(os.path.join(flickr, "all_data_final_test_set0_2014.jsonline"))
    image_id = str(annotations.image_ids[0])
    features = open_features(os.path.join(flickr, "flickr30k_test_resnet101_faster_rcnn_genome.lmdb"))
    loaded = load_model(checkpoint, s.config_file)
    settings = RankSettings(max_seq_length=s.max_seq_length, max_region_num=s.world.flickr_max_region_num)
    attention = attention_map(loaded, features[image_id], annotations.captions[0], image_id, settings)
    write_attention_map(attention, os.path.join(output_dir, "attention.png"), layer="mean")


def run_demo(output_dir: str, settings: DemoSettings) -> dict[str, Any]:
    """Run every stage; returns (and writes to ``results.json``) the metrics, timings and table."""
    os.makedirs(output_dir, exist_ok=True)
    ctx = init_distributed(-1, no_cuda=False)
    world = os.path.join(output_dir, "world")
    runs = os.path.join(output_dir, "runs")
    timings: dict[str, float] = {}
    _stage("synthetic world", timings,
           lambda: generate_synthetic_world(world, settings.world, overwrite=True))  # fmt: skip
    pretrained = _stage("pretraining", timings, lambda: _pretrain(runs, world, settings, ctx))
    zero_shot = _stage(
        "zero-shot retrieval", timings, lambda: _eval_retrieval(pretrained, world, runs, settings, ctx, True)
    )
    finetuned = _stage("fine-tuning", timings, lambda: _finetune(pretrained, world, runs, settings, ctx))
    ema = os.path.join(finetuned, f"pytorch_model_{settings.finetune_epochs - 1}_ema.bin")
    retrieval = _stage(
        "fine-tuned retrieval", timings, lambda: _eval_retrieval(ema, world, runs, settings, ctx, False)
    )
    vcr = _stage("VCR evaluation", timings, lambda: _eval_vcr(ema, world, runs, settings, ctx))
    _stage("attention map", timings, lambda: _attention_picture(ema, world, settings, output_dir))

    image, zs = retrieval["image_retrieval"], zero_shot["image_retrieval"]
    row = {"r1": image["r1"], "r5": image["r5"], "r10": image["r10"],
           "zs_r1": zs["r1"], "zs_r5": zs["r5"], "zs_r10": zs["r10"],
           "q_a": vcr["q_ar"]["q_a"], "qa_r": vcr["q_ar"]["qa_r"], "q_ar": vcr["q_ar"]["q_ar"]}  # fmt: skip
    num_images = retrieval["num_images"]
    table = results_table(row, num_images)
    plot(
        os.path.join(runs, "pretrained"),
        finetuned,
        row,
        100.0 / num_images,
        os.path.join(output_dir, "demo.png"),
    )
    results = {
        "results": row,
        "paper": PAPER,
        "text_retrieval": retrieval["text_retrieval"],
        "zero_shot_text_retrieval": zero_shot["text_retrieval"],
        "num_test_images": num_images,
        "num_test_captions": retrieval["num_captions"],
        "stage_seconds": timings,
        "settings": {**dataclasses.asdict(settings), "world": dataclasses.asdict(settings.world)},
        "table": table,
    }
    atomic_write_json(os.path.join(output_dir, "results.json"), results)
    return results
