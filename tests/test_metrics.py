"""Hand-computed checks of the retrieval and VCR metrics."""

import numpy as np
import pytest

from vilbert.metrics import (
    image_retrieval_metrics,
    q_ar_accuracy,
    retrieval_ranks,
    text_retrieval_metrics,
    text_retrieval_ranks,
    top_k_images,
    vcr_accuracy,
)

# 3 captions x 4 images. Caption 0 wins outright, caption 1 ties with two other images,
# caption 2's true image scores lowest of all.
SCORES = np.array(
    [
        [0.9, 0.1, 0.2, 0.3],
        [0.5, 0.5, 0.5, 0.1],
        [0.4, 0.3, 0.2, 0.1],
    ]
)
TRUE_IMAGE = np.array([0, 2, 3])


def test_ranks_are_one_based_and_pessimistic_on_ties():
    np.testing.assert_array_equal(retrieval_ranks(SCORES, TRUE_IMAGE), [1, 3, 4])


def test_caption_ranked_last_gets_rank_num_images():
    assert retrieval_ranks(SCORES, TRUE_IMAGE)[2] == SCORES.shape[1]


def test_constant_scores_never_count_as_a_hit():
    ranks = retrieval_ranks(np.zeros((2, 5)), np.array([0, 4]))
    np.testing.assert_array_equal(ranks, [5, 5])


def test_image_retrieval_metrics():
    metrics = image_retrieval_metrics(SCORES, TRUE_IMAGE)
    assert metrics["r1"] == pytest.approx(100 / 3)
    assert metrics["r5"] == 100.0
    assert metrics["r10"] == 100.0
    assert metrics["medr"] == 3.0
    assert metrics["meanr"] == pytest.approx(8 / 3)
    assert metrics["num_queries"] == 3


def test_median_rank_is_floored_for_an_even_count():
    scores = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.9, 0.5, 0.0], [1, 0.9, 0.8, 0.0]])
    ranks = retrieval_ranks(scores, np.array([0, 1, 2, 3]))
    np.testing.assert_array_equal(ranks, [1, 1, 3, 4])
    assert image_retrieval_metrics(scores, np.array([0, 1, 2, 3]))["medr"] == 2.0


def test_recall_at_k_counts_ranks_up_to_k():
    num_images = 12
    scores = np.tile(np.arange(num_images, 0, -1, dtype=float), (3, 1))  # column j has rank j + 1
    metrics = image_retrieval_metrics(scores, np.array([4, 5, 10]))  # ranks 5, 6, 11
    assert metrics["r1"] == 0.0
    assert metrics["r5"] == pytest.approx(100 / 3)
    assert metrics["r10"] == pytest.approx(200 / 3)
    assert metrics["meanr"] == pytest.approx((5 + 6 + 11) / 3)


# Text retrieval: 2 images, 2 captions each (captions 0, 1 -> image 0; captions 2, 3 -> image 1).
TEXT_SCORES = np.array(
    [
        [0.2, 0.9],
        [0.8, 0.1],
        [0.7, 0.3],
        [0.1, 0.6],
    ]
)
CAPTION_IMAGE = np.array([0, 0, 1, 1])


def test_text_retrieval_uses_best_of_several_positives():
    # Image 0: best true caption 1 (0.8), no other caption >= 0.8 -> rank 1.
    # Image 1: best true caption 3 (0.6), caption 0 of image 0 scores 0.9 -> rank 2.
    np.testing.assert_array_equal(text_retrieval_ranks(TEXT_SCORES, CAPTION_IMAGE), [1, 2])
    metrics = text_retrieval_metrics(TEXT_SCORES, CAPTION_IMAGE)
    assert metrics["r1"] == 50.0
    assert metrics["r5"] == 100.0
    assert metrics["meanr"] == 1.5


def test_text_retrieval_ties_with_a_negative_are_pessimistic():
    scores = TEXT_SCORES.copy()
    scores[0, 1] = 0.6  # a negative caption ties the best true caption of image 1
    np.testing.assert_array_equal(text_retrieval_ranks(scores, CAPTION_IMAGE), [1, 2])


def test_text_retrieval_tie_between_two_positives_is_a_hit():
    scores = TEXT_SCORES.copy()
    scores[0, 1] = 0.0
    scores[2, 1] = scores[3, 1] = 0.6
    np.testing.assert_array_equal(text_retrieval_ranks(scores, CAPTION_IMAGE), [1, 1])


def test_text_retrieval_skips_images_without_captions():
    scores = np.hstack([TEXT_SCORES, np.full((4, 1), 0.95)])  # image 2 has no caption, beats everything
    ranks = text_retrieval_ranks(scores, CAPTION_IMAGE)
    np.testing.assert_array_equal(ranks, [1, 2])
    assert text_retrieval_metrics(scores, CAPTION_IMAGE)["num_queries"] == 2


def test_caption_pointing_at_a_missing_image_is_a_clear_error():
    with pytest.raises(ValueError, match=r"caption 1 -> image 7, but there are 4 images"):
        retrieval_ranks(SCORES, np.array([0, 7, 3]))
    with pytest.raises(ValueError, match="outside the score matrix"):
        text_retrieval_metrics(SCORES, np.array([0, -1, 3]))


def test_shape_mismatch_and_nan_are_clear_errors():
    with pytest.raises(ValueError, match="one image index per caption"):
        retrieval_ranks(SCORES, np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_ranks(np.array([[np.nan, 1.0]]), np.array([0]))


def test_top_k_images_best_first():
    np.testing.assert_array_equal(top_k_images(SCORES, k=2), [[0, 3], [0, 1], [0, 1]])
    assert top_k_images(SCORES, k=20).shape == (3, 4)


# VCR: results arrive in any order; ids can be ints in results and strings in the ground truth.
QA_RESULTS = [
    {"question_id": 12, "answer": [0.1, 0.7, 0.1, 0.1]},  # predicts 1
    {"question_id": 10, "answer": [0.6, 0.2, 0.1, 0.1]},  # predicts 0
    {"question_id": 11, "answer": [0.1, 0.1, 0.1, 0.7]},  # predicts 3
]
QAR_RESULTS = [
    {"question_id": 11, "answer": [0.1, 0.1, 0.7, 0.1]},  # predicts 2
    {"question_id": 10, "answer": [0.1, 0.1, 0.1, 0.7]},  # predicts 3
    {"question_id": 12, "answer": [0.1, 0.7, 0.1, 0.1]},  # predicts 1
]
ANSWERS = {"10": 0, "11": 2, "12": 1}  # Q->A right for 10 and 12
RATIONALES = {"10": 1, "11": 2, "12": 1}  # QA->R right for 11 and 12


def test_vcr_accuracy_matches_by_id_not_position():
    assert vcr_accuracy(QA_RESULTS, ANSWERS) == pytest.approx(200 / 3)
    assert vcr_accuracy(list(reversed(QA_RESULTS)), ANSWERS) == pytest.approx(200 / 3)


def test_q_ar_needs_both_right_for_the_same_question():
    metrics = q_ar_accuracy(QA_RESULTS, QAR_RESULTS, ANSWERS, RATIONALES)
    assert metrics["q_a"] == pytest.approx(200 / 3)
    assert metrics["qa_r"] == pytest.approx(200 / 3)
    assert metrics["q_ar"] == pytest.approx(100 / 3)  # only question 12
    assert metrics["num_questions"] == 3
    shuffled = q_ar_accuracy(QA_RESULTS[::-1], QAR_RESULTS[1:] + QAR_RESULTS[:1], ANSWERS, RATIONALES)
    assert shuffled == metrics


def test_results_of_another_split_are_rejected():
    other_split = [dict(entry, question_id=entry["question_id"] + 1_000_000) for entry in QA_RESULTS]
    with pytest.raises(ValueError, match=r"3 result id\(s\) are not in the ground truth \(e.g. '1000010'\)"):
        vcr_accuracy(other_split, ANSWERS)
    with pytest.raises(ValueError, match=r"1 ground-truth question\(s\) have no result \(e.g. '11'\)"):
        q_ar_accuracy(QA_RESULTS, QAR_RESULTS[1:], ANSWERS, RATIONALES)


def test_malformed_vcr_results_are_clear_errors():
    with pytest.raises(ValueError, match="entry 0 has no 'answer'"):
        vcr_accuracy([{"question_id": 10}], {"10": 0})
    with pytest.raises(ValueError, match="appears more than once"):
        vcr_accuracy(QA_RESULTS + QA_RESULTS[:1], ANSWERS)
