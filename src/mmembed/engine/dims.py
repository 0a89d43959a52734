"""Output dimensions that differ from a model's native width.

- Shorter: project onto the first k vectors of an orthonormal basis ordered by how much of the
  embeddings' energy each direction carries (eigenvectors of the uncentred second-moment matrix
  of sample embeddings). Keeping the top k is the best rank-k approximation of inner products for
  that distribution, so cosine structure survives truncation as well as any linear map allows.
  Matryoshka-trained models simply truncate instead.
  The eigenvectors are only as stable as the gaps between their eigenvalues, which are tiny in
  the tail of an embedding spectrum: samples that differ in the last bits (another build of the
  model's kernels, another C library) rotate neighbouring directions into each other, so two
  machines' short vectors can differ far more than their native ones. A backend whose weights
  ship with the package ships its fitted basis too (``packaged_basis()``); the others are fitted
  once per machine (and cached by the backend).
- Native: the model's own vectors, untouched.
- Longer: a fixed matrix with orthonormal columns (QR of a seeded Gaussian) lifts the vector; an
  isometry, so every cosine is unchanged while the values spread over all coordinates.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmembed.models.base import l2_normalize


def fit_basis(samples: np.ndarray) -> np.ndarray:
    """Columns ordered by decreasing eigenvalue; sign fixed so results are reproducible."""
    x = np.asarray(samples, dtype=np.float64)
    second_moment = x.T @ x / max(len(x), 1)
    eigvals, eigvecs = np.linalg.eigh(second_moment)
    basis = eigvecs[:, np.argsort(eigvals)[::-1]]
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(basis.shape[1])])
    return (basis * signs).astype(np.float32)


def reduction_basis(backend: Any) -> np.ndarray | None:
    """The basis for a backend's shorter dimensions: none for Matryoshka models (or a backend
    without samples), its packaged basis where it ships one, else fitted to its samples."""
    if backend.matryoshka:
        return None
    packaged = getattr(backend, "packaged_basis", None)
    basis = packaged() if packaged is not None else None
    if basis is not None:
        return basis
    samples = backend.basis_samples()
    return None if samples is None else fit_basis(samples)


def lift_matrix(native: int, dim: int, seed: int = 20240917) -> np.ndarray:
    """(native, dim) with orthonormal rows: v @ M preserves every inner product."""
    rng = np.random.default_rng(seed + dim)
    q, r = np.linalg.qr(rng.standard_normal((dim, native)))
    q *= np.sign(np.diag(r))  # make the factorisation unique
    return q.T.astype(np.float32)


class DimensionMapper:
    """Maps native vectors of one backend to any requested width, caching the matrices."""

    def __init__(self, native_dim: int, *, matryoshka: bool, basis: np.ndarray | None) -> None:
        if not matryoshka and basis is None:
            raise ValueError("a non-Matryoshka model needs a fitted basis")
        self.native_dim = native_dim
        self.matryoshka = matryoshka
        self.basis = basis
        self._lifts: dict[int, np.ndarray] = {}

    def __call__(self, vectors: np.ndarray, dim: int) -> np.ndarray:
        v = vectors
        if dim < self.native_dim:
            v = v[:, :dim] if self.basis is None else v @ self.basis[:, :dim]
        elif dim > self.native_dim:
            lift = self._lifts.get(dim)
            if lift is None:
                lift = self._lifts[dim] = lift_matrix(self.native_dim, dim)
            v = v @ lift
        return l2_normalize(v)

    @property
    def method(self) -> str:
        return "truncation" if self.matryoshka else "ordered basis"
