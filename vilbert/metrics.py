"""Retrieval and VCR metrics, computed from saved scores so they can be checked without a model.

Ranks are 1-based. Ties are broken *against* the true item (pessimistic): an item whose score
equals the true item's score counts as ranked above it, so a constant model scores R@1 = 0, not 100.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vilbert.errors import BadInputError

RECALL_AT = (1, 5, 10)


def _check_scores(scores: np.ndarray, caption_image_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and indices once, so every metric fails with the same clear message."""
    scores = np.asarray(scores)
    index = np.asarray(caption_image_index)
    if scores.ndim != 2:
        raise BadInputError(f"scores must be a [num_captions, num_images] matrix, got shape {scores.shape}")
    if index.ndim != 1 or index.shape[0] != scores.shape[0]:
        raise BadInputError(
            f"caption_image_index must hold one image index per caption ({scores.shape[0]}), "
            f"got shape {index.shape}"
        )
    if index.size and not np.issubdtype(index.dtype, np.integer):
        raise BadInputError(f"caption_image_index must be integers, got dtype {index.dtype}")
    num_images = scores.shape[1]
    bad = np.flatnonzero((index < 0) | (index >= num_images))
    if bad.size:
        caption = int(bad[0])
        raise BadInputError(
            f"{bad.size} caption(s) point at an image outside the score matrix: caption {caption} -> "
            f"image {int(index[caption])}, but there are {num_images} images (is the image missing?)"
        )
    if np.isnan(scores).any():
        raise BadInputError(f"scores contain {int(np.isnan(scores).sum())} NaN value(s)")
    return scores, index.astype(np.int64)


def _summary(ranks: np.ndarray) -> dict[str, float]:
    """R@K in percent, median rank (floored, as published) and mean rank of 1-based ranks."""
    if ranks.size == 0:
        raise BadInputError("no queries to evaluate: the score matrix is empty")
    metrics = {f"r{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_AT}
    metrics["medr"] = float(np.floor(np.median(ranks)))
    metrics["meanr"] = float(np.mean(ranks))
    metrics["num_queries"] = int(ranks.size)
    return metrics


def retrieval_ranks(scores: np.ndarray, caption_image_index: np.ndarray) -> np.ndarray:
    """For each caption, the 1-based rank of its true image among all images (pessimistic ties).

    scores: [num_captions, num_images]; caption_image_index: [num_captions], the true image column.
    """
    scores, index = _check_scores(scores, caption_image_index)
    true_scores = scores[np.arange(scores.shape[0]), index]
    return (scores >= true_scores[:, None]).sum(axis=1).astype(np.int64)


def image_retrieval_metrics(scores: np.ndarray, caption_image_index: np.ndarray) -> dict[str, float]:
    """Caption-based image retrieval (the paper's number): r1/r5/r10 (percent), medr, meanr."""
    return _summary(retrieval_ranks(scores, caption_image_index))


def text_retrieval_ranks(scores: np.ndarray, caption_image_index: np.ndarray) -> np.ndarray:
    """For each image with at least one caption, the rank of its best-ranked caption among all captions.

    Only other images' captions scoring at least as high as the best true caption rank above it
    (pessimistic against negatives; a tie between two true captions is still a hit). Images
    without captions (e.g. when a prefix of the captions was evaluated) are left out.
    """
    scores, index = _check_scores(scores, caption_image_index)
    num_captions, num_images = scores.shape
    positive_scores = scores[np.arange(num_captions), index]
    best_positive = np.full(num_images, -np.inf, dtype=np.float64)
    np.maximum.at(best_positive, index, positive_scores)
    has_caption = np.zeros(num_images, dtype=bool)
    has_caption[index] = True

    at_least_best = (scores >= best_positive[None, :]).sum(axis=0)
    positives_at_least_best = np.zeros(num_images, dtype=np.int64)
    np.add.at(positives_at_least_best, index, positive_scores >= best_positive[index])
    ranks = 1 + at_least_best - positives_at_least_best
    return ranks[has_caption].astype(np.int64)


def text_retrieval_metrics(scores: np.ndarray, caption_image_index: np.ndarray) -> dict[str, float]:
    """Image-based text retrieval from the same matrix: r1/r5/r10 (percent), medr, meanr."""
    return _summary(text_retrieval_ranks(scores, caption_image_index))


def top_k_images(scores: np.ndarray, k: int = 20) -> np.ndarray:
    """The k best image columns per caption, best first; equal scores keep the lower column first."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise BadInputError(f"scores must be a [num_captions, num_images] matrix, got shape {scores.shape}")
    if k < 1:
        raise BadInputError(f"k must be at least 1, got {k}")
    return np.argsort(-scores, axis=1, kind="stable")[:, : min(k, scores.shape[1])]


def _predictions_by_id(results: Sequence[Mapping[str, Any]], what: str) -> dict[str, int]:
    """Map question id (as a string) to the argmax option of a results list, rejecting duplicates."""
    predictions: dict[str, int] = {}
    for position, entry in enumerate(results):
        for key in ("question_id", "answer"):
            if key not in entry:
                raise BadInputError(f"{what}: entry {position} has no '{key}' key (keys: {sorted(entry)})")
        question_id = str(entry["question_id"])
        if question_id in predictions:
            raise BadInputError(f"{what}: question id {question_id!r} appears more than once")
        probabilities = np.asarray(entry["answer"], dtype=np.float64)
        if probabilities.ndim != 1 or probabilities.size == 0:
            raise BadInputError(f"{what}: entry {position} ('{question_id}') has no option scores")
        predictions[question_id] = int(np.argmax(probabilities))
    return predictions


def _labels_by_id(labels: Mapping[Any, int]) -> dict[str, int]:
    return {str(question_id): int(label) for question_id, label in labels.items()}


def _check_same_ids(predictions: Mapping[str, int], labels: Mapping[str, int], what: str) -> None:
    """Results and ground truth must cover the same questions: a mismatch means another split."""
    unknown = sorted(set(predictions) - set(labels))
    if unknown:
        raise BadInputError(
            f"{what}: {len(unknown)} result id(s) are not in the ground truth (e.g. {unknown[0]!r}); "
            "are the results from another split?"
        )
    missing = sorted(set(labels) - set(predictions))
    if missing:
        raise BadInputError(
            f"{what}: {len(missing)} ground-truth question(s) have no result (e.g. {missing[0]!r}); "
            "are the results incomplete or from another split?"
        )


def vcr_accuracy(results: Sequence[Mapping[str, Any]], ground_truth: Mapping[Any, int]) -> float:
    """Percent of questions whose highest-scoring option is the labelled one, matched by question id.

    results: [{"question_id": id, "answer": [p0, p1, p2, p3]}, ...] as eval_tasks.py writes them;
    ground_truth: question id -> correct option. Ids are compared as strings (7 == "7").
    """
    predictions = _predictions_by_id(results, "results")
    labels = _labels_by_id(ground_truth)
    _check_same_ids(predictions, labels, "results")
    if not labels:
        raise BadInputError("no questions to evaluate: results and ground truth are empty")
    correct = sum(predictions[question_id] == label for question_id, label in labels.items())
    return 100.0 * correct / len(labels)


def q_ar_accuracy(
    qa_results: Sequence[Mapping[str, Any]],
    qar_results: Sequence[Mapping[str, Any]],
    answer_labels: Mapping[Any, int],
    rationale_labels: Mapping[Any, int],
) -> dict[str, float]:
    """Q→A, QA→R and Q→AR (both right for the same question) in percent, joined by question id."""
    answers = _predictions_by_id(qa_results, "Q->A results")
    rationales = _predictions_by_id(qar_results, "QA->R results")
    gold_answers = _labels_by_id(answer_labels)
    gold_rationales = _labels_by_id(rationale_labels)
    _check_same_ids(gold_rationales, gold_answers, "rationale labels vs answer labels")
    _check_same_ids(answers, gold_answers, "Q->A results")
    _check_same_ids(rationales, gold_rationales, "QA->R results")
    if not gold_answers:
        raise BadInputError("no questions to evaluate: results and ground truth are empty")

    answer_right = {qid: answers[qid] == label for qid, label in gold_answers.items()}
    rationale_right = {qid: rationales[qid] == label for qid, label in gold_rationales.items()}
    total = len(gold_answers)
    return {
        "q_a": 100.0 * sum(answer_right.values()) / total,
        "qa_r": 100.0 * sum(rationale_right.values()) / total,
        "q_ar": 100.0 * sum(answer_right[qid] and rationale_right[qid] for qid in gold_answers) / total,
        "num_questions": total,
    }
