"""Classification metrics on whole (gathered) splits."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score


def classification_metrics(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    return {
        "accuracy": float((preds == labels).mean()) if len(labels) else float("nan"),
        "macro_f1": float(f1_score(labels, preds, labels=list(range(num_classes)), average="macro", zero_division=0)),
        "n": int(len(labels)),
    }
