"""A learned linear whitening of feature vectors, fitted on differences between vectors that should
match (Mikolajczyk & Matas 2007, "Improving descriptors for fast tree matching by optimal linear
projection"; Radenovic et al. 2016 learned the same for CNN features):

    P = eigvecs(cov(C_S^-1/2 (x - mean)))^T  C_S^-1/2,   C_S = cov of the differences

shrinks the directions in which matching vectors differ and keeps the ones that tell them apart;
vectors are then compared as `P (x - mean)`, L2-normalised. Used for RootSIFT descriptors
(`keypoints.whitening`, differences of correct correspondences) and for the network's embedding
(`siamese.index.fit_embedding_whitening`, differences of one individual's photos from their mean).
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.runfolder import atomic_write_bytes


@dataclass(frozen=True)
class Whitening:
    """`apply(x)` = rows of `P (x - mean)`, each L2-normalised."""

    P: np.ndarray  # float32 (k, D)
    mean: np.ndarray  # float32 (D,)
    correspondences: int = 0  # how many differences it was fitted on (for the record)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha1(np.ascontiguousarray(self.P, np.float32).tobytes())
        h.update(np.ascontiguousarray(self.mean, np.float32).tobytes())
        return h.hexdigest()[:16]

    def apply(self, x: np.ndarray, chunk: int = 16384) -> np.ndarray:
        """Rows of `x` whitened, `chunk` rows at a time (a gallery of 100k embeddings needs no
        transient copies of its size)."""
        x = np.asarray(x, np.float32)
        out = np.empty((len(x), self.P.shape[0]), np.float32)
        for start in range(0, len(x), chunk):
            y = (x[start:start + chunk] - self.mean) @ self.P.T
            y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
            out[start:start + chunk] = y
        return out

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, P=self.P, mean=self.mean, correspondences=np.int64(self.correspondences))
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "Whitening":
        """The whitening saved at `path`; ValueError when the file is not one (truncated, another
        format, arrays of the wrong shapes or not finite), OSError when it cannot be read."""
        try:
            with np.load(path) as z:
                out = cls(z["P"].astype(np.float32), z["mean"].astype(np.float32), int(z["correspondences"]))
        except (zipfile.BadZipFile, EOFError, KeyError, TypeError) as e:
            raise ValueError(f"not a saved whitening ({e.__class__.__name__}: {e})") from None
        if out.P.ndim != 2 or out.mean.ndim != 1 or out.P.shape[1] != out.mean.shape[0]:
            raise ValueError(f"P of shape {out.P.shape} and mean of shape {out.mean.shape} do not fit together")
        if not (np.isfinite(out.P).all() and np.isfinite(out.mean).all()):
            raise ValueError("P or mean holds values that are not finite")
        return out


def whitening_from_differences(diff: np.ndarray, sample: np.ndarray, eps: float, cls=Whitening) -> Whitening:
    """The whitening from differences between vectors that should match (rows of `diff`) and a sample
    of all vectors (for the mean and the directions that tell them apart). Eigenvalues of the
    differences' covariance below `eps` x the largest are raised to it (regularisation: with fewer
    differences than dimensions most are 0)."""
    diff = np.asarray(diff, np.float64)
    if len(diff) < 2:
        raise ValueError(f"need at least two differences to fit a whitening, got {len(diff)}")
    w, V = np.linalg.eigh(diff.T @ diff / len(diff))
    if not w.max() > 0:
        raise ValueError("the differences are all zero: nothing to learn a whitening from")
    w = np.maximum(w, eps * w.max())
    P1 = (V / np.sqrt(w)) @ V.T  # C_S^-1/2
    X = np.asarray(sample, np.float64)
    mean = X.mean(0)
    _, V2 = np.linalg.eigh(np.cov(((X - mean) @ P1.T).T))
    P = V2[:, ::-1].T @ P1  # rotation to the principal axes of the whitened data (no reduction)
    return cls(P.astype(np.float32), mean.astype(np.float32), len(diff))
