"""Slice-wise parallel-beam PET projector and OSEM reconstruction (private to the simulator).

The system model is a sparse matrix built once per in-plane grid: every pixel centre is projected
onto the detector of each view and its value split linearly between the two nearest radial bins
(the "pixel-driven, linear interpolation" projector). Back-projection is the exact transpose, so
OSEM sees a matched pair. It is written by hand because no PET projector ships with the project's
dependencies, and a scipy CSR product measured ~10x faster on 2 CPU cores than rotating every
slice with ``torch.nn.functional.grid_sample`` (30 ms vs ~0.3-1 s for 96 views of 324 slices).

Layout used throughout: an image stack is a ``P x C`` array (``P = Nx * Ny`` pixels in C order of
an ``Nx x Ny`` slice, ``C`` independent slices, e.g. frames x axial planes); a sinogram stack is a
``R x C`` array whose rows are (view, radial bin) pairs, views ordered subset by subset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

__all__ = ["ParallelBeamProjector", "osem"]


@dataclass(frozen=True)
class ParallelBeamProjector:
    """Sparse parallel-beam projector for square ``N x N`` slices, views split into OSEM subsets.

    Radial bins have the width of one pixel and cover the slice diagonal, so no pixel ever falls
    off the detector. Matrix entries are line lengths in millimetres: projecting an attenuation
    map in 1/mm gives the line integral of attenuation directly.

    Args:
        n_pixels: in-plane matrix ``N`` of the square slice.
        pixel_mm: in-plane pixel size in mm.
        n_views: number of views over 180 degrees; must be a multiple of ``n_subsets``.
        n_subsets: number of interleaved OSEM subsets (view ``v`` goes to subset ``v % n_subsets``).
    """

    n_pixels: int
    pixel_mm: float
    n_views: int
    n_subsets: int
    _forward: tuple[sp.csr_matrix, ...] = field(init=False, repr=False, compare=False)
    _backward: tuple[sp.csr_matrix, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.n_pixels < 2:
            raise ValueError(f"`n_pixels` must be at least 2, but got {self.n_pixels}.")
        if self.pixel_mm <= 0:
            raise ValueError(f"`pixel_mm` must be positive, but got {self.pixel_mm}.")
        if self.n_subsets < 1 or self.n_views % self.n_subsets:
            raise ValueError(
                f"`n_views` must be a positive multiple of `n_subsets`, but got "
                f"{self.n_views} views and {self.n_subsets} subsets."
            )
        forward = tuple(self._subset_matrix(s) for s in range(self.n_subsets))
        # Frozen dataclass: set the cached matrices once, here.
        object.__setattr__(self, "_forward", forward)
        object.__setattr__(self, "_backward", tuple(m.T.tocsr() for m in forward))

    @property
    def n_bins(self) -> int:
        """Radial bins per view (covering the diagonal of the slice)."""
        return math.ceil(self.n_pixels * math.sqrt(2.0)) + 2

    @property
    def rows_per_subset(self) -> int:
        """Sinogram rows (view x bin) in one subset."""
        return (self.n_views // self.n_subsets) * self.n_bins

    def _subset_matrix(self, subset: int) -> sp.csr_matrix:
        n, n_bins = self.n_pixels, self.n_bins
        centre = (np.arange(n, dtype=np.float64) - (n - 1) / 2.0)
        x, y = np.meshgrid(centre, centre, indexing="ij")
        x, y = x.ravel(), y.ravel()
        pixels = np.arange(n * n)
        views = range(subset, self.n_views, self.n_subsets)
        rows, cols, vals = [], [], []
        for row_block, view in enumerate(views):
            angle = math.pi * view / self.n_views
            # Radial position of each pixel centre in bin units, 0 at the first bin.
            u = x * math.cos(angle) + y * math.sin(angle) + (n_bins - 1) / 2.0
            lower = np.floor(u)
            frac = u - lower
            lower = lower.astype(np.int64) + row_block * n_bins
            rows += [lower, lower + 1]
            cols += [pixels, pixels]
            vals += [(1.0 - frac) * self.pixel_mm, frac * self.pixel_mm]
        shape = (self.rows_per_subset, n * n)
        matrix = sp.csr_matrix(
            (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
            shape=shape,
        )
        matrix.sum_duplicates()
        return matrix

    def forward(self, images: np.ndarray, subset: int | None = None) -> np.ndarray:
        """Project an image stack.

        Args:
            images: ``P x C`` float32 stack (``P = N * N``).
            subset: one subset's views, or None for all views (subsets stacked in order).

        Returns:
            ``R x C`` sinogram stack (``R = rows_per_subset``, or all rows when ``subset`` is None).
        """
        if subset is not None:
            return self._forward[subset] @ images
        return np.concatenate([m @ images for m in self._forward], axis=0)

    def back(self, sinograms: np.ndarray, subset: int | None = None) -> np.ndarray:
        """Back-project a sinogram stack with the exact transpose of :meth:`forward`.

        Args:
            sinograms: ``R x C`` stack laid out as :meth:`forward` returns it.
            subset: the subset these rows belong to, or None for all subsets stacked in order.

        Returns:
            ``P x C`` image stack.
        """
        if subset is not None:
            return self._backward[subset] @ sinograms
        rows = self.rows_per_subset
        out = self._backward[0] @ sinograms[:rows]
        for s in range(1, self.n_subsets):
            out += self._backward[s] @ sinograms[s * rows : (s + 1) * rows]
        return out


def osem(
    projector: ParallelBeamProjector,
    counts: np.ndarray,
    plane_weights: np.ndarray,
    frame_scale: np.ndarray,
    background: np.ndarray,
    iterations: int,
) -> np.ndarray:
    """Ordered-subsets EM for ``mean counts = frame_scale * plane_weights * (A x) + background``.

    All frames and planes are reconstructed at once: they are independent problems that share the
    projector, so batching them turns each update into one sparse product.

    Args:
        projector: the system matrix ``A`` with its subsets.
        counts: ``R x F x Z`` measured (Poisson) counts for ``F`` frames of ``Z`` planes, rows laid
            out as ``projector.forward`` returns them.
        plane_weights: ``R x Z`` multiplicative factor per row and plane (attenuation x counts per
            unit activity); the same for every frame.
        frame_scale: ``F`` factor per frame (radioactive decay relative to the first frame).
        background: ``F`` expected randoms + scatter per sinogram row in each frame (flat), > 0.
        iterations: full passes over all subsets.

    Returns:
        ``P x F x Z`` float32 non-negative images, in the units of ``x`` (decay-corrected).
    """
    if iterations < 1:
        raise ValueError(f"`iterations` must be at least 1, but got {iterations}.")
    if np.any(background <= 0):
        raise ValueError("`background` must be strictly positive so that the EM ratio is defined.")
    _, n_frames, n_planes = counts.shape
    rows = projector.rows_per_subset
    tiny = np.float32(1e-12)
    scale = frame_scale.astype(np.float32)[None, :, None]
    background = background.astype(np.float32)[None, :, None]
    subsets = [slice(s * rows, (s + 1) * rows) for s in range(projector.n_subsets)]
    # Sensitivity A_s^T w_s per subset, P x Z; the frame factor is applied by broadcasting.
    sensitivity = [projector.back(plane_weights[rs], subset=s) for s, rs in enumerate(subsets)]
    # A flat start at the mean activity that explains the net counts avoids a wasted first pass.
    net = np.maximum(counts - background, 0).sum(axis=0)  # F x Z
    total_sensitivity = sum(sens.sum(axis=0) for sens in sensitivity)[None, :] * scale[0]
    start = net / np.maximum(total_sensitivity, tiny)
    n_pixels = projector.n_pixels**2
    image = np.broadcast_to(start.astype(np.float32), (n_pixels, n_frames, n_planes)).copy()
    for _ in range(iterations):
        for s, rs in enumerate(subsets):
            weights = plane_weights[rs][:, None, :] * scale  # R_s x F x Z
            projected = projector.forward(image.reshape(n_pixels, -1), subset=s)
            expected = weights * projected.reshape(-1, n_frames, n_planes) + background
            ratio = weights * counts[rs] / np.maximum(expected, tiny)
            update = projector.back(ratio.reshape(ratio.shape[0], -1), subset=s)
            norm = np.maximum(sensitivity[s][:, None, :] * scale, tiny)
            image *= update.reshape(n_pixels, n_frames, n_planes) / norm
    return image
