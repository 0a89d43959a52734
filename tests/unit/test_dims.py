import numpy as np
import pytest

from mmembed.engine.dims import DimensionMapper, fit_basis, lift_matrix, reduction_basis
from mmembed.models.base import l2_normalize
from mmembed.models.catalog import load_catalog
from mmembed.models.conse import ConSEBackend


def _clustered(n: int, dim: int, rank: int, seed: int = 0) -> np.ndarray:
    """Unit vectors that mostly live in a low-rank subspace, like real embeddings."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, dim))
    return l2_normalize(low + 0.05 * rng.standard_normal((n, dim)))


def _cos(x: np.ndarray) -> np.ndarray:
    x = l2_normalize(x)
    return x @ x.T


def test_basis_is_orthonormal_and_ordered():
    samples = _clustered(500, 32, 6)
    basis = fit_basis(samples)
    assert np.allclose(basis.T @ basis, np.eye(32), atol=1e-5)
    energy = ((samples @ basis) ** 2).sum(axis=0)
    assert np.all(np.diff(energy) <= 1e-4)  # non-increasing: most energy first
    assert np.array_equal(fit_basis(samples), basis)  # reproducible, signs fixed


def test_native_dimension_returns_the_models_own_vectors():
    x = _clustered(50, 32, 6, seed=1)
    mapper = DimensionMapper(32, matryoshka=False, basis=fit_basis(_clustered(500, 32, 6)))
    assert np.allclose(mapper(x, 32), x, atol=1e-6)


@pytest.mark.parametrize("dim", [48, 64, 129])
def test_longer_dimensions_are_isometric(dim):
    x = _clustered(40, 32, 6, seed=2)
    mapper = DimensionMapper(32, matryoshka=False, basis=fit_basis(_clustered(500, 32, 6)))
    out = mapper(x, dim)
    assert out.shape == (40, dim)
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert np.allclose(_cos(out), _cos(x), atol=1e-5)
    # values spread over all coordinates rather than zero padding
    assert np.count_nonzero(np.abs(out).max(axis=0) > 1e-3) == dim


def test_lift_matrix_rows_orthonormal():
    m = lift_matrix(16, 40)
    assert m.shape == (16, 40)
    assert np.allclose(m @ m.T, np.eye(16), atol=1e-5)


def test_ordered_basis_beats_plain_truncation_for_short_vectors():
    data = _clustered(2100, 64, 8, seed=3)
    fit, held_out = data[:2000], data[2000:]  # one distribution, disjoint samples
    mapper = DimensionMapper(64, matryoshka=False, basis=fit_basis(fit))
    target = _cos(held_out)
    err_basis = np.abs(_cos(mapper(held_out, 8)) - target).mean()
    err_trunc = np.abs(_cos(held_out[:, :8]) - target).mean()
    assert err_basis < 0.05
    assert err_basis < err_trunc / 3


def test_matryoshka_truncates_and_normalises():
    x = l2_normalize(np.random.default_rng(4).standard_normal((5, 16)))
    out = DimensionMapper(16, matryoshka=True, basis=None)(x, 4)
    assert np.allclose(out, l2_normalize(x[:, :4]))


def test_non_matryoshka_needs_basis():
    with pytest.raises(ValueError):
        DimensionMapper(16, matryoshka=False, basis=None)


class _Samples:
    """What the engine reads of a backend to pick its basis."""

    def __init__(self, matryoshka: bool, samples=None, packaged=None) -> None:
        self.matryoshka = matryoshka
        self._samples = samples
        if packaged is not None:
            self.packaged_basis = lambda: packaged

    def basis_samples(self):
        return self._samples


def test_reduction_basis_prefers_the_packaged_one():
    samples = _clustered(200, 16, 4)
    packaged = lift_matrix(16, 16)
    assert reduction_basis(_Samples(True, samples)) is None
    assert reduction_basis(_Samples(False, None)) is None
    assert np.array_equal(reduction_basis(_Samples(False, samples)), fit_basis(samples))
    assert reduction_basis(_Samples(False, samples, packaged)) is packaged


def test_offline_backend_ships_its_basis_for_the_catalog_options():
    options = load_catalog("offline").backends["offline"].options
    basis = ConSEBackend(**options).packaged_basis()  # no load(): the file and the options
    assert basis is not None and basis.shape == (384, 384) and basis.dtype == np.float32
    assert np.allclose(basis.T @ basis, np.eye(384), atol=1e-5)
    other = {**options, "prompts_en": ["a picture of a {}."]}
    assert ConSEBackend(**other).packaged_basis() is None  # fitted at start-up instead
    assert ConSEBackend(**{**options, "top_k": 5}).packaged_basis() is None
