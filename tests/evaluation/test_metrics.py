"""Metrics against scikit-learn and a brute-force per-group loop."""
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from gerne_jax.evaluation import metrics


def _random_predictions(seed, n=500, num_classes=2, num_attributes=3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    attributes = rng.integers(0, num_attributes, n)
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels] * rng.random((n, 1))
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, attributes, probabilities


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_report_matches_sklearn_and_brute_force(seed):
    labels, attributes, probabilities = _random_predictions(seed)
    # Empty one group on purpose: class 1 never has attribute 2.
    keep = ~((labels == 1) & (attributes == 2))
    labels, attributes, probabilities = labels[keep], attributes[keep], probabilities[keep]
    report = metrics.classification_report(labels, probabilities, attributes, num_attributes=3)
    predictions = probabilities.argmax(1)

    assert report["balanced_class_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert report["auroc"] == pytest.approx(roc_auc_score(labels, probabilities[:, 1]))
    assert report["average_accuracy"] == pytest.approx(np.mean(predictions == labels))

    group_accuracies = []
    for y in range(2):
        for a in range(3):
            members = [i for i in range(len(labels)) if labels[i] == y and attributes[i] == a]
            assert report["group_count"][y][a] == len(members)
            if members:
                accuracy = sum(predictions[i] == y for i in members) / len(members)
                assert report["group_accuracy"][y][a] == pytest.approx(accuracy)
                group_accuracies.append(accuracy)
            else:
                assert np.isnan(report["group_accuracy"][y][a])
    assert report["worst_group_accuracy"] == pytest.approx(min(group_accuracies))
    assert report["group_balanced_accuracy"] == pytest.approx(np.mean(group_accuracies))
    recalls = [np.mean(predictions[labels == y] == y) for y in range(2)]
    assert report["worst_class_accuracy"] == pytest.approx(min(recalls))


def test_auroc_with_ties_matches_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 5, 300).astype(float)  # many ties
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_auroc_single_class_is_nan():
    assert np.isnan(metrics.auroc(np.ones(5), np.arange(5)))


def test_multiclass_report_has_no_auroc_but_balanced_accuracy():
    labels, attributes, probabilities = _random_predictions(4, num_classes=3, num_attributes=2)
    report = metrics.classification_report(labels, probabilities, attributes, num_attributes=2)
    assert np.isnan(report["auroc"])
    assert report["balanced_class_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels, probabilities.argmax(1)))


def test_out_of_range_attribute_is_rejected():
    with pytest.raises(ValueError, match="attribute values must lie in"):
        metrics.per_group_accuracy(np.zeros(3), np.zeros(3), np.array([0, 1, 5]), 2, 2)
