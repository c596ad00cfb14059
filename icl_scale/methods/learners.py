"""Learner baselines (`eval.learners`): classifiers trained on the same demonstrations, on frozen
sentence representations of the model at θ0 — if ICL's predictions agree with a kNN as often as
with FT's, agreement with FT says little that is specific to finetuning.

Representation: the last hidden state (after the final norm) mean-pooled over `<bos> input`, the
input formatted as the task's template without the answer. kNN: cosine similarity, the k nearest
demonstrations (k = 5, at most the number of demonstrations) vote, a tie goes to the nearest of
the tied labels. Logistic regression: multinomial, features standardised by the demonstrations'
mean and std, L2 penalty 1.0 on the weights, fitted by L-BFGS in float64 (deterministic).
"""

from __future__ import annotations

import numpy as np
import torch

KNN_K = 5


def representations(model, enc, rows: list[dict]) -> np.ndarray:
    """[N, d] float64: mean-pooled last hidden states of `<bos> input` (one forward per row)."""
    out = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([[enc.bos] + enc.input_ids(row)], device=model.device)
            h = model.base_model(input_ids=ids).last_hidden_state[0]
            out.append(h.float().mean(0).cpu().double().numpy())
    return np.stack(out) if out else np.zeros((0, model.config.hidden_size))


def knn_predict(train: np.ndarray, labels: np.ndarray, test: np.ndarray, k: int = KNN_K) -> np.ndarray:
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)   # noqa: E731
    sim = unit(test) @ unit(train).T
    k = min(k, len(train))
    out = []
    for row in sim:
        near = np.argsort(-row, kind="stable")[:k]
        votes: dict[int, int] = {}
        for i in near:
            votes[int(labels[i])] = votes.get(int(labels[i]), 0) + 1
        top = max(votes.values())
        out.append(next(int(labels[i]) for i in near if votes[int(labels[i])] == top))   # tie: the nearest
    return np.array(out, dtype=np.int64)


def logreg_fit(train: np.ndarray, labels: np.ndarray, n_classes: int, l2: float = 1.0):
    """(w [d, C], b [C], mean, std) minimising mean cross-entropy + l2/2·‖w‖²/N on standardised
    features (sklearn's C = 1/l2)."""
    mu, sd = train.mean(0), train.std(0) + 1e-8
    x = torch.tensor((train - mu) / sd, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.long)
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=1e-15)

    def loss():
        opt.zero_grad()
        v = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 / 2 * (w ** 2).sum() / len(y)
        v.backward()
        return v

    opt.step(loss)
    return w.detach().numpy(), b.detach().numpy(), mu, sd


def logreg_predict(train: np.ndarray, labels: np.ndarray, test: np.ndarray, n_classes: int) -> np.ndarray:
    w, b, mu, sd = logreg_fit(train, labels, n_classes)
    return (((test - mu) / sd) @ w + b).argmax(1).astype(np.int64)


def learner_predictions(model, enc, demos: list[dict], rows: list[dict]) -> dict[str, list[int]]:
    """kNN and logistic-regression predictions of `rows` from the demonstrations."""
    train = representations(model, enc, demos)
    test = representations(model, enc, rows)
    labels = np.array([r["label"] for r in demos], dtype=np.int64)
    n_classes = len(enc.spec.label_words)
    if not rows:
        return {"knn": [], "logreg": []}
    return {"knn": knn_predict(train, labels, test).tolist(),
            "logreg": logreg_predict(train, labels, test, n_classes).tolist()}
