"""Our BERT forward reproduces all-MiniLM-L6-v2, and the distillation workload's metrics."""
from __future__ import annotations

import pytest
import torch

from gsmsearch.workloads import get_workload
from gsmsearch.workloads._sentences import pydoc_sentences

# sentence-transformers' documented output for all-MiniLM-L6-v2 on these three sentences
# (sbert.net, "Usage" page: model.similarity(embeddings, embeddings)), printed to 4 decimals.
REFERENCE_SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
REFERENCE_SIMILARITY = torch.tensor([[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]])


@pytest.fixture(scope="module")
def workload():
    return get_workload("minilm-compress", max_sentences=20, max_seq_length=32)


@pytest.fixture(scope="module")
def dense(workload):
    return workload.build_model().eval()


def embed(workload, model, sentences):
    return workload.embed(model, workload.tokenize(sentences))


def test_matches_sentence_transformers_reference(workload, dense):
    embeddings = embed(workload, dense, REFERENCE_SENTENCES)
    assert torch.allclose(embeddings @ embeddings.T, REFERENCE_SIMILARITY, atol=1e-4)


def test_embeddings_are_unit_norm_deterministic_and_batch_independent(workload, dense):
    sentences = ["A cat sat on the mat.", "Lists are mutable sequences of arbitrary objects."]
    first = embed(workload, dense, sentences)
    assert torch.allclose(first.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.equal(first, embed(workload, dense, sentences))
    alone = embed(workload, dense, sentences[:1])  # no padding in this batch
    assert torch.allclose(alone[0], first[0], atol=1e-5)


def test_similar_sentences_are_closer_than_unrelated(workload, dense):
    a, b, c = embed(workload, dense, [
        "A tuple is an immutable sequence of objects.",
        "Tuples are sequences that cannot be changed.",
        "The chef cooked a delicious dinner for the guests.",
    ])
    assert a @ b > a @ c + 0.3


def test_dense_student_is_perfect_and_a_perturbed_one_is_not(workload, dense):
    splits = workload.load_data(seed=0)
    assert len(splits.test) >= 3
    metrics = workload.evaluate(dense, splits.test)
    assert metrics["quality"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["retrieval_top1"] == 1.0
    worse = workload.build_model().eval()
    with torch.no_grad():
        for layer in worse.encoder.layer:
            layer.intermediate.dense.weight.mul_(0.0)
    worse_metrics = workload.evaluate(worse, splits.test)
    assert worse_metrics["quality"] < 0.99
    assert worse_metrics["loss"] > metrics["loss"]


def test_loss_is_zero_for_teacher_and_positive_otherwise(workload):
    teacher = torch.nn.functional.normalize(torch.randn(4, 384), dim=-1)
    batch = {"teacher": teacher}
    assert workload.loss(teacher, batch).item() == pytest.approx(0.0, abs=1e-6)
    assert workload.loss(-teacher, batch).item() == pytest.approx(2.0, abs=1e-5)


def test_sentences_are_deterministic_prose():
    sentences = pydoc_sentences()
    assert len(sentences) > 1000 and len(set(sentences)) == len(sentences)
    assert all(s[0].isupper() and s[-1] in ".!?" and 6 <= len(s.split()) <= 40 for s in sentences)


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="loss"):
        get_workload("minilm-compress", loss="kl")
    with pytest.raises(ValueError, match="max_seq_length"):
        get_workload("minilm-compress", max_seq_length=4096)
    with pytest.raises(ValueError, match="lacks config.json"):
        get_workload("minilm-compress", model_dir="/nonexistent")


def test_distill_option_is_refused_with_a_reason(tmp_path):
    from gsmsearch.trainer import TrialConfig, TrialFailed, run_trial

    cfg = TrialConfig(workload="minilm-compress", workload_options={"max_sentences": 20, "max_seq_length": 32},
                      family="lowrank", mode="finetune", distill=0.5, epochs=1, measure_latency=False)
    with pytest.raises(TrialFailed, match="already trains by distillation"):
        run_trial(cfg, cache_dir=tmp_path)
