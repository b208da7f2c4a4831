"""The out-of-distribution score on every /classify answer: `ood: {score, threshold, flag, method}` per image.

The method and its statistics come from the export step (export/evaluate_ood.py, which measured it against the
others): `knn_cos_l2`, the larger of (1 - the largest cosine similarity) and the smallest euclidean distance of the
image's embedding to 10,000 training embeddings, each divided by its scale (its 95th percentile on the validation
split), the references and scales stored in models/<name>/ood.npz (sha256 in the card's features.ood, checked
before the server starts like the similarity index: service/similarity.py). `flag` is true when the score is over the card's threshold, set on the
validation split so that 95% of in-distribution images pass. The score is a derived output of the model
(`ood_score`, ModelEntry.derived_outputs), computed inside the same batched model call as the probabilities, from its
embeddings: one matrix product per batch. Computed per request on the event loop, with two products, it was 20% of a
worker's CPU under 32 users (py-spy, issue 22). The product is the score's cost, compute-bound: in process 0.071 ms
for one CNN image, 0.030 ms per image in a batch of 64 (four times that for the MLP's 512-wide embedding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from .similarity import verified_feature_sections

logger = logging.getLogger("bentoml.visionserve")
OOD_SCORE = "ood_score"  # the derived output's name: float [N], one score per image


@dataclass
class OodScorer:
    method: str
    references: np.ndarray  # float32 [R, D], training embeddings
    scales: tuple[float, float]  # of the cosine and the euclidean part
    threshold: float

    def __post_init__(self) -> None:
        norms = np.maximum(np.linalg.norm(self.references, axis=1), 1e-12)
        # One product x . r gives both parts: divided by |r| (and |x|) it is the cosine, and |r|^2 - 2 x . r + |x|^2
        # the squared distance. (Two products, against unit rows and raw rows, cost twice as much: the product is
        # the score's whole cost, about as much as the CNN itself per image.) The product takes references.T as a
        # view: BLAS reads it transposed, as fast as a transposed copy (measured), which would double the memory.
        self.inverse_norms = (1.0 / norms)[None, :].astype(np.float32)
        self.reference_squares = (norms ** 2)[None, :].astype(np.float32)

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """export/evaluate_ood.py's knn_cos_l2_score, rearranged: max((1 - max cos) / s0, min euclidean / s1)."""
        x = embeddings.astype(np.float32)
        x_norms = np.maximum(np.linalg.norm(x, axis=1), 1e-12)
        dots = x @ self.references.T                                                    # [N, R]
        cosine = 1.0 - (dots * self.inverse_norms).max(1) / x_norms
        squared = (self.reference_squares - 2 * dots).min(1) + x_norms ** 2
        return np.maximum(cosine / self.scales[0], np.sqrt(np.maximum(squared, 0)) / self.scales[1])

    def answers(self, scores: np.ndarray) -> list[dict]:
        """Each image's answer from its score (the model's `ood_score` output)."""
        return [{"score": round(float(score), 6), "threshold": self.threshold,
                 "flag": bool(score > self.threshold), "method": self.method} for score in scores]


def load_ood_scorers(entries) -> dict[str, OodScorer]:
    """The scorer of every available classifier whose card has features.ood, each added to its model as the derived
    output `ood_score`; start-up only."""
    # numpy's BLAS on one thread in this worker: its threads waking for a [1, D] x [D, 10000] product cost ~100x the
    # product on 2 busy cores (measured: 19 ms against 0.17 ms per image); onnxruntime keeps its own thread pool.
    threadpool_limits(limits=1, user_api="blas")
    scorers = {}
    for entry, section in verified_feature_sections(entries, "ood", "OOD statistics"):
        if section.get("method") != "knn_cos_l2":
            logger.error("OOD statistics of %s not loaded: unknown method %r", entry.name, section.get("method"))
            continue
        with np.load(entry.folder / section["file"], allow_pickle=False) as stored:
            references = stored["references"].astype(np.float32)
            scales = tuple(float(value) for value in stored["scales"])
        scorers[entry.name] = OodScorer(section["method"], np.ascontiguousarray(references), scales,
                                        float(section["threshold"]))
        entry.derived_outputs[OOD_SCORE] = ("embedding", scorers[entry.name].scores)
        logger.info("OOD scores of %s: %s over %d references, threshold %.6f, sha256 verified (%s)", entry.name,
                    section["method"], len(references), section["threshold"], section["sha256"])
    return scorers
