"""VCR evaluation: per-question option probabilities, Q→A / QA→R / Q→AR, and the leaderboard file.

Result files are JSON lists, one entry per scored sample, as the published ``eval_tasks.py`` wrote
them: ``{"question_id": id, "answer": [p0, p1, p2, p3]}`` (softmax over ``vil_logit``). On the test
split QA→R is scored once per candidate answer, so its entries also carry ``answer_index``.

Entries are joined with the ground truth by question id, never by position. Ids written here are
annotation ids (``val-123``); the published scripts wrote the integer after the dash, and such files
are matched through that integer.

The leaderboard submission (test split, no labels) is the CSV the VCR leaderboard reads: a row per
question with ``annot_id``, ``answer_0..3`` and ``rationale_conditioned_on_a{i}_{j}`` (the
probability of rationale j given answer i), 20 probabilities in all.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from vilbert.atomic import atomic_write, atomic_write_json
from vilbert.datasets.loader import loader_workers
from vilbert.datasets.vcr import NUM_OPTIONS, VCR_TASKS, load_vcr_annotations
from vilbert.distributed import DistContext, gather_to_main
from vilbert.errors import BadInputError
from vilbert.evaluation import (
    TASKS_YAML,
    VCR_HEAD,
    EvaluationError,
    add_new_flags,
    base_parser,
    check_head_trained,
    command_main,
    config_and_tokenizer,
    load_model,
    make_run_folder,
    progress,
    resolve_task_config,
    shard,
    split_annotations,
)
from vilbert.metrics import q_ar_accuracy, vcr_accuracy
from vilbert.modeling import InterBertForVLTasks
from vilbert.precision import Precision, use_tf32
from vilbert.tasks import (
    TASKS,
    FeatureStores,
    TaskConfig,
    TaskOutput,
    batch_to_device,
    load_task_configs,
    select_tasks,
)
from vilbert.tokenization import BertTokenizer

logger = logging.getLogger(__name__)

Result = dict[str, Any]


class ResultsError(BadInputError):
    """A results file that is unreadable, malformed, or does not fit the questions it is joined with."""


def results_file_name(task_name: str, split: str) -> str:
    """``VCR_Q-A_val_result.json`` and the like, in the run folder."""
    return f"{task_name}_{split}_result.json"


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    forward: Callable[[nn.Module, dict[str, Any]], TaskOutput],
    precision: Precision,
    conditioned: bool,
    on_batch: Callable[[int], None] | None = None,
) -> list[Result]:
    """One result per sample: ``question_id`` and the softmax over its options' ``vil_logit``.

    ``conditioned``: also record ``answer_index``, the answer a QA→R sample was conditioned on
    (test split, where every question is scored once per answer). Entries keep the published
    layout, so the task is told by the file's name (see :func:`results_task`).
    """
    model.eval()
    results: list[Result] = []
    for batch in batches:
        with precision.autocast():
            output = forward(model, batch_to_device(batch, precision.device))
        probabilities = output.logits.float().softmax(dim=1).cpu().tolist()
        answers = batch["answer_index"].tolist()
        for annot_id, answer_index, probs in zip(batch["annot_id"], answers, probabilities):
            entry: Result = {"question_id": annot_id, "answer": probs}
            if conditioned:
                entry["answer_index"] = int(answer_index)
            results.append(entry)
        if on_batch is not None:
            on_batch(len(probabilities))
    return results


def load_results(path: str) -> list[Result]:
    """A results file as written by :func:`predict` (or by the published script)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(results, list) or not all(isinstance(entry, dict) for entry in results):
        raise ResultsError(f"{path}: expected a JSON list of {{question_id, answer}} entries")
    for position, entry in enumerate(results):
        missing = [key for key in ("question_id", "answer") if key not in entry]
        if missing:
            raise ResultsError(f"{path}: entry {position} lacks {', '.join(missing)}")
        answer = entry["answer"]
        if not isinstance(answer, list) or len(answer) != NUM_OPTIONS:
            raise ResultsError(
                f"{path}: entry {position} ('{entry['question_id']}') has no {NUM_OPTIONS} scores"
            )
    return results


def _published_id(annot_id: str) -> str:
    """``val-123`` → ``123``: the id the published scripts wrote."""
    return annot_id.rsplit("-", 1)[-1]


def _keyed_like(results: Sequence[Result], labels: Mapping[str, int]) -> dict[str, int]:
    """``labels`` (by annotation id) re-keyed by published integer ids when the results use those."""
    ids = {str(entry["question_id"]) for entry in results}
    published = all(isinstance(entry["question_id"], int) for entry in results)
    if results and published and not ids & labels.keys():
        return {_published_id(annot_id): label for annot_id, label in labels.items()}
    return dict(labels)


def ground_truth(annotations_path: str) -> tuple[dict[str, int], dict[str, int]]:
    """Answer and rationale labels of a labelled split's ``.jsonl``, by annotation id."""
    examples = load_vcr_annotations(annotations_path, "VCR_QA-R", labelled=True)
    answers = {example.annot_id: int(example.answer_label) for example in examples}
    rationales = {example.annot_id: int(example.rationale_label) for example in examples}
    return answers, rationales


def _checked(compute: Callable[[], Any], what: str) -> Any:
    """Name the files when the join fails (results of another split, duplicates, ...)."""
    try:
        return compute()
    except ValueError as err:
        raise ResultsError(f"{what}: {err}") from None


def answer_accuracy(results_path: str, annotations_path: str, label: str) -> float:
    """Q→A (``label="answer"``) or QA→R (``label="rationale"``) accuracy of one results file."""
    answers, rationales = ground_truth(annotations_path)
    results = load_results(results_path)
    labels = _keyed_like(results, answers if label == "answer" else rationales)
    return _checked(lambda: vcr_accuracy(results, labels), f"{results_path} vs {annotations_path}")


_TASK_NAMES = {"VCR_Q-A": "Q->A", "VCR_QA-R": "QA->R"}


def results_task(path: str, results: Sequence[Result]) -> str | None:
    """The VCR task a results file holds, by its own evidence, or ``None`` when nothing tells.

    Evidence, strongest first: a ``task`` entry key; ``answer_index`` (QA→R scored per candidate
    answer, the test split); the name ``eval_tasks.py`` gives the file (:func:`results_file_name`).
    """
    recorded = sorted({str(entry["task"]) for entry in results if "task" in entry})
    if len(recorded) > 1:
        raise ResultsError(f"{path}: entries of several tasks ({', '.join(recorded)})")
    if recorded:
        return recorded[0]
    if any("answer_index" in entry for entry in results):
        return "VCR_QA-R"
    name = os.path.basename(path)
    return next((task for task in _TASK_NAMES if name.startswith(f"{task}_")), None)


def check_results_task(path: str, results: Sequence[Result], task: str) -> None:
    """Refuse a results file that holds the other task's results (the two files swapped)."""
    found = results_task(path, results)
    if found is not None and found != task:
        raise ResultsError(
            f"{path}: holds {_TASK_NAMES.get(found, found)} results, not the {_TASK_NAMES[task]} "
            "results it was given as (Q->A and QA->R files swapped?)"
        )


def load_results_pair(qa_path: str, qar_path: str) -> tuple[list[Result], list[Result]]:
    """The Q→A and the QA→R results files, each checked to hold the task it is given as."""
    qa, qar = load_results(qa_path), load_results(qar_path)
    check_results_task(qa_path, qa, "VCR_Q-A")
    check_results_task(qar_path, qar, "VCR_QA-R")
    return qa, qar


def q_ar_from_files(qa_path: str, qar_path: str, annotations_path: str) -> dict[str, float]:
    """Q→A, QA→R and Q→AR (percent) of a Q→A and a QA→R results file against the split's labels;
    files holding the other task (swapped) are refused."""
    answers, rationales = ground_truth(annotations_path)
    qa, qar = load_results_pair(qa_path, qar_path)
    return _checked(
        lambda: q_ar_accuracy(qa, qar, _keyed_like(qa, answers), _keyed_like(qar, rationales)),
        f"{qa_path} + {qar_path} vs {annotations_path}",
    )


def format_q_ar(metrics: Mapping[str, float]) -> str:
    """``Q->A 73.10  QA->R 74.80  Q->AR 54.90  (26534 questions)``"""
    return (
        f"Q->A {metrics['q_a']:.2f}  QA->R {metrics['qa_r']:.2f}  Q->AR {metrics['q_ar']:.2f}  "
        f"({int(metrics['num_questions'])} questions)"
    )


LEADERBOARD_COLUMNS = (
    ["annot_id"]
    + [f"answer_{i}" for i in range(NUM_OPTIONS)]
    + [f"rationale_conditioned_on_a{i}_{j}" for i in range(NUM_OPTIONS) for j in range(NUM_OPTIONS)]
)


def leaderboard_rows(
    annot_ids: Sequence[str], qa_results: Sequence[Result], qar_results: Sequence[Result]
) -> list[list[Any]]:
    """One row per question (in ``annot_ids`` order) of :data:`LEADERBOARD_COLUMNS`.

    ``qar_results`` must hold, for every question, one entry per ``answer_index`` 0..3.
    """
    answers: dict[str, list[float]] = {}
    for entry in qa_results:
        answers[str(entry["question_id"])] = entry["answer"]
    rationales: dict[tuple[str, int], list[float]] = {}
    for entry in qar_results:
        if "answer_index" not in entry:
            raise ResultsError(
                f"QA->R entry for {entry['question_id']!r} has no answer_index: the leaderboard needs the "
                "test-split results, scored once per candidate answer"
            )
        rationales[(str(entry["question_id"]), int(entry["answer_index"]))] = entry["answer"]
    rows = []
    for annot_id in annot_ids:
        if annot_id not in answers:
            raise ResultsError(f"no Q->A result for question {annot_id!r} (results of another split?)")
        row: list[Any] = [annot_id, *answers[annot_id]]
        for answer_index in range(NUM_OPTIONS):
            key = (annot_id, answer_index)
            if key not in rationales:
                raise ResultsError(
                    f"no QA->R result for question {annot_id!r} given answer {answer_index} "
                    "(results of another split?)"
                )
            row.extend(rationales[key])
        rows.append(row)
    return rows


def write_leaderboard_csv(path: str, rows: Sequence[Sequence[Any]]) -> None:
    """The submission file, written atomically (probabilities at full float precision)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(LEADERBOARD_COLUMNS)
    writer.writerows([row[0], *(repr(float(p)) for p in row[1:])] for row in rows)
    data = text.getvalue().encode("utf-8")
    atomic_write(path, lambda handle: handle.write(data))


def leaderboard_from_files(qa_path: str, qar_path: str, annotations_path: str, output_path: str) -> int:
    """Write the submission CSV of a test split from its two results files; returns the row count."""
    examples = load_vcr_annotations(annotations_path, "VCR_QA-R", labelled=False)
    rows = leaderboard_rows(
        [example.annot_id for example in examples], load_results(qa_path), load_results(qar_path)
    )
    write_leaderboard_csv(output_path, rows)
    return len(rows)


TEST_SPLIT = "test"  # the VCR split without labels


def vcr_parser() -> argparse.ArgumentParser:
    p = base_parser(
        "eval_tasks.py",
        "VCR evaluation: per-question option probabilities, Q->A / QA->R / Q->AR, leaderboard file.",
        tasks="1-2",
        batch_size=None,
        batch_help="questions per batch (default: the task's batch_size in the YAML)",
    )
    new = add_new_flags(p, TASKS_YAML)
    new.add_argument(
        "--compute_q_ar", action="store_true", help="join Q->A and QA->R results with the labels"
    )
    return p


def _vcr_results(
    task: TaskConfig,
    split: str,
    annotations: str,
    args: argparse.Namespace,
    ctx: DistContext,
    model: nn.Module,
    tokenizer: BertTokenizer,
    stores: FeatureStores,
) -> list[dict[str, Any]] | None:
    """Every sample of ``split`` scored, gathered on rank 0 in dataset order (None elsewhere)."""
    spec = TASKS[task.name]
    dataset = spec.build(task, split, tokenizer, stores, args.seed, args.recipe, annotations)
    loader = DataLoader(
        Subset(dataset, shard(len(dataset), ctx)),
        batch_size=args.batch_size or task.batch_size,
        collate_fn=spec.collate,
        num_workers=loader_workers(args.num_workers * ctx.world_size, ctx.world_size, 1),
        pin_memory=ctx.device.type == "cuda",
    )
    precision = Precision.from_flags(args.fp16, args.bf16, ctx.device)
    use_tf32(args.tf32)
    conditioned = task.name == "VCR_QA-R" and not dataset.labelled
    with progress(len(dataset), 1, "sample", ctx, args.quiet) as bar:
        results = predict(
            model,
            loader,
            spec.forward,
            precision,
            conditioned,
            lambda done: bar.update(min(done * ctx.world_size, bar.total - bar.n)),
        )
    gathered = gather_to_main(results)
    return None if gathered is None else [entry for part in gathered for entry in part]


def _vcr_split(args: argparse.Namespace, tasks: Sequence[TaskConfig]) -> str:
    """One split for every task: the Q->AR join and the leaderboard file pair their results."""
    if args.split:
        return args.split
    splits = sorted({task.val_split for task in tasks})
    if len(splits) > 1:
        raise EvaluationError(f"the tasks' val_split differ ({', '.join(splits)}); pass --split")
    return splits[0]


def evaluate_vcr(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any] | None:
    """Write each task's results file; then per-task accuracy, Q->AR or the leaderboard file (rank 0)."""
    yaml_path = resolve_task_config(args.task_config, (TASKS_YAML,))
    tasks = select_tasks(load_task_configs(yaml_path), args.tasks, yaml_path)
    for task in tasks:
        if task.name not in VCR_TASKS:
            raise EvaluationError(
                f"{yaml_path}: {task.key} is {task.name}; eval_tasks.py evaluates VCR tasks "
                "(use eval_retrieval.py for retrieval)"
            )
    split = _vcr_split(args, tasks)
    labelled = split != TEST_SPLIT
    if args.compute_q_ar and not labelled:
        raise EvaluationError(
            "--compute_q_ar needs labels; the test split has none (its leaderboard file is written instead)"
        )
    annotations = {task.key: split_annotations(task, split, yaml_path) for task in tasks}
    config, tokenizer = config_and_tokenizer(args)
    model = load_model(InterBertForVLTasks, args, config, VCR_HEAD).to(ctx.device)
    for task in tasks:
        check_head_trained(args.from_pretrained, task.name)
    folder = make_run_folder(args, ctx)
    stores = FeatureStores(args.in_memory)

    summary: dict[str, Any] = {}
    for task in tasks:
        results = _vcr_results(task, split, annotations[task.key], args, ctx, model, tokenizer, stores)
        if results is None:
            continue
        path = os.path.join(folder, results_file_name(task.name, split))
        atomic_write_json(path, results)
        print(f"{task.name} {split}: {len(results)} results -> {path}")
        if labelled:
            label = "answer" if task.name == "VCR_Q-A" else "rationale"
            summary[task.name] = answer_accuracy(path, annotations[task.key], label)
            print(f"{task.name} {split}: accuracy {summary[task.name]:.2f}")
    if not ctx.is_main:
        return None

    qa_path = os.path.join(folder, results_file_name("VCR_Q-A", split))
    qar_path = os.path.join(folder, results_file_name("VCR_QA-R", split))
    annotation_file = annotations[tasks[0].key]
    if args.compute_q_ar:
        for path in (qa_path, qar_path):
            if not os.path.isfile(path):
                raise EvaluationError(f"--compute_q_ar: {path} not found; evaluate --tasks 1-2 on {split}")
        summary["q_ar"] = metrics = q_ar_from_files(qa_path, qar_path, annotation_file)
        print(f"VCR {split}: " + format_q_ar(metrics))
    if not labelled:
        if os.path.isfile(qa_path) and os.path.isfile(qar_path):
            csv_path = os.path.join(folder, f"VCR_{split}_submission.csv")
            count = leaderboard_from_files(qa_path, qar_path, annotation_file, csv_path)
            print(f"leaderboard submission: {count} questions -> {csv_path}")
        else:
            logger.warning(
                "the leaderboard file needs VCR_Q-A and VCR_QA-R results on %s: run --tasks 1-2", split
            )
    if summary:
        atomic_write_json(os.path.join(folder, f"VCR_{split}_metrics.json"), summary)
    return summary


def vcr_main(argv: Sequence[str] | None = None) -> int:
    return command_main(vcr_parser(), evaluate_vcr, argv)
