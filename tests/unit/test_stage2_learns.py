"""Stage 2 learns a study's PE from slice embeddings that carry it: the positive control of the sequence model.

With ``study_norm`` (layer normalization of the pooled study features) the model, the RSNA loss and the padding of
``training.fitting.data`` learn PE when the embeddings of the positive slices stand out. Without it the exam head first
learns the features' common part, and positive studies, whose features are larger, score as more negative: on
small models and weak signals that inverted state lasts (``pe_node.model.sequence``; models/README.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pe_node.findings import EXAM_LABELS
from pe_node.model import SequenceModel, rsna_loss
from training.fitting.data import pad_studies

DIM = 16
NEGATIVE = EXAM_LABELS.index("negative_exam_for_pe")


def _studies(count: int, seed: int, signal: float) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Half positive: a run of 2-6 positive slices whose first four embedding values are raised by ``signal``."""
    rng = np.random.default_rng(seed)
    studies = []
    for index in range(count):
        slices = int(rng.integers(16, 30))
        embeddings = rng.normal(0.4, 0.2, (slices, DIM)).astype(np.float32)
        image = np.zeros(slices, dtype=np.float32)
        exam = np.zeros(len(EXAM_LABELS), dtype=np.float32)
        if index % 2:
            start, length = int(rng.integers(0, slices - 6)), int(rng.integers(2, 7))
            image[start:start + length] = 1.0
            embeddings[image > 0, :4] += signal
            exam[EXAM_LABELS.index("rightsided_pe")] = exam[EXAM_LABELS.index("rv_lv_ratio_lt_1")] = 1.0
        else:
            exam[NEGATIVE] = 1.0
        studies.append((torch.from_numpy(embeddings), torch.from_numpy(image), torch.from_numpy(exam)))
    return studies


def _pe_auc(model: SequenceModel, studies: list) -> float:
    model.eval()
    with torch.no_grad():
        batch = pad_studies(studies)
        exam = torch.sigmoid(model(batch.features, batch.mask).exam)
    labels = [bool(image.any()) for _, image, _ in studies]
    return float(roc_auc_score(labels, 1.0 - exam[:, NEGATIVE].numpy()))


@pytest.mark.parametrize("pooling", ["attention", "mean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_stage2_with_study_norm_learns_pe_from_embeddings_that_show_it(pooling: str, seed: int) -> None:
    torch.manual_seed(seed)
    train, held_out = _studies(48, seed=1, signal=1.0), _studies(32, seed=2, signal=1.0)
    model = SequenceModel(DIM, lstm_hidden=16, dense_dim=16, attention_dim=8, pooling=pooling, study_norm=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = _pe_auc(model, held_out)
    for epoch in range(25):
        model.train()
        order = np.random.default_rng(epoch).permutation(len(train))
        for start in range(0, len(train), 8):
            batch = pad_studies([train[i] for i in order[start:start + 8]])
            output = model(batch.features, batch.mask)
            loss = rsna_loss(output.exam, batch.exam, output.image, batch.image, batch.mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert _pe_auc(model, train) > 0.95
    assert _pe_auc(model, held_out) > 0.9 > before + 0.2


def test_study_norm_is_off_by_default_and_adds_no_weights_then() -> None:
    plain, normed = SequenceModel(DIM, lstm_hidden=8, dense_dim=8, attention_dim=4), SequenceModel(
        DIM, lstm_hidden=8, dense_dim=8, attention_dim=4, study_norm=True)
    assert not any(key.startswith("study_norm") for key in plain.state_dict())  # older checkpoints load as before
    assert {"study_norm.weight", "study_norm.bias"} <= set(normed.state_dict())
