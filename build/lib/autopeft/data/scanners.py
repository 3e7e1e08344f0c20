"""The five simulated scanners, mirroring the five ADNI scanners of PETITE.

Matrix and voxel spacing are those of PETITE's data (Siemens x3, Philips, Siemens ECAT). Everything
else is an assumption, chosen from public facts about the scanner families those grids suggest and
written down in each profile's ``assumptions``: the system resolution (FWHM at the centre of the
field of view), the counts a 5-minute frame of an ADNI 18F-FDG scan collects (185 MBq, frames from
30 to 60 minutes after injection), the randoms + scatter level, and the vendor's reconstruction.

A CPU cannot simulate native grids in minutes, so :meth:`ScannerProfile.at_size` scales every
scanner by one factor: ``size`` is the in-plane matrix of scanner 1 over a fixed head field of view
(:data:`HEAD_FOV_MM`), and every scanner's voxel spacing and FWHM are multiplied by the same factor.
FWHM-to-voxel ratios, anisotropy and the ranking of resolutions are kept; counts are divided by the
factor cubed so that each resolution element collects the counts it would natively.

>>> from autopeft.data.scanners import SCANNERS
>>> grid = SCANNERS["1"].at_size(64)
>>> grid.matrix, grid.spacing_mm[0]
((64, 64, 53), 3.125)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "HEAD_FOV_MM",
    "HEAD_CENTRE_MM",
    "ScannerProfile",
    "SimulatedScanner",
    "SCANNERS",
    "scale_factor",
]

#: Field of view (x, y, z in mm) that every simulated scanner covers at most: a box around an adult
#: head (the MNI152 brain spans 144 x 178 x 154 mm; skull and scalp add ~1 cm on each side).
HEAD_FOV_MM: tuple[float, float, float] = (200.0, 200.0, 170.0)
#: Centre of the MNI152 brain mask's bounding box in MNI space (mm): every grid is centred here, as
#: a technologist centres the head in the scanner.
HEAD_CENTRE_MM: tuple[float, float, float] = (0.0, -17.0, 5.0)

# Angles per view must sample the object finely enough: pi/2 x matrix views (Nyquist for a
# parallel-beam sinogram), and at least this many views per OSEM subset as vendors use (~6-8).
_MIN_VIEWS_PER_SUBSET = 6
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class ScannerProfile:
    """One scanner as it is natively, with what the simulator assumes about it.

    Args:
        scanner_id: "1".."5", the id used in manifests.
        name: assumed scanner family.
        maker: vendor.
        matrix: native image matrix (x, y, z).
        spacing_mm: native voxel spacing (x, y, z) in mm.
        fwhm_mm: system resolution (x, y, z) in mm at the centre of the field of view.
        counts_per_frame: expected true coincidences in the first 5-minute frame for a typical
            subject (estimate).
        background_fraction: randoms + scatter as a flat background, a fraction of the mean trues.
        algorithm: the vendor's reconstruction as it is named.
        iterations: reconstruction iterations.
        subsets: reconstruction subsets.
        postfilter_fwhm_mm: isotropic Gaussian post-filter in mm.
        assumptions: what is assumed and why.
    """

    scanner_id: str
    name: str
    maker: str
    matrix: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    fwhm_mm: tuple[float, float, float]
    counts_per_frame: float
    background_fraction: float
    algorithm: str
    iterations: int
    subsets: int
    postfilter_fwhm_mm: float
    assumptions: str

    def __post_init__(self) -> None:
        if self.spacing_mm[0] != self.spacing_mm[1]:
            raise ValueError(f"`spacing_mm` must be equal in x and y, but got {self.spacing_mm}.")
        if self.counts_per_frame <= 0 or self.background_fraction <= 0:
            raise ValueError("`counts_per_frame` and `background_fraction` must be positive.")

    @property
    def native_fov_mm(self) -> tuple[float, float, float]:
        """Field of view (x, y, z) of the native grid in mm."""
        return tuple(n * s for n, s in zip(self.matrix, self.spacing_mm))  # type: ignore[return-value]

    def at_size(self, size: int) -> SimulatedScanner:
        """The scaled-down grid, resolution and counts the simulator uses for this scanner.

        Args:
            size: in-plane matrix of scanner 1 over :data:`HEAD_FOV_MM`; every scanner is scaled
                by the same factor ``HEAD_FOV_MM[0] / (size x scanner 1 spacing)``.

        Returns:
            The simulated scanner.
        """
        if size < 8:
            raise ValueError(f"`size` must be at least 8, but got {size}.")
        factor = scale_factor(size)
        spacing = tuple(round(s * factor, 6) for s in self.spacing_mm)
        # Cover the native field of view, cut to the head box: scanners 2 and 5 keep their shorter
        # axial coverage, the in-plane fields of view (23-26 cm) are cut to the head.
        matrix = tuple(
            max(4, round(min(fov, box) / s))
            for fov, box, s in zip(self.native_fov_mm, HEAD_FOV_MM, spacing)
        )
        nyquist_views = math.ceil(math.pi / 2.0 * matrix[0])
        subsets = max(1, min(self.subsets, nyquist_views // _MIN_VIEWS_PER_SUBSET))
        n_views = subsets * math.ceil(nyquist_views / subsets)
        # Keep the number of EM updates (iterations x subsets) of the native reconstruction, which
        # is what sets how far OSEM converges, when fewer views allow fewer subsets.
        iterations = math.ceil(self.iterations * self.subsets / subsets)
        return SimulatedScanner(
            profile=self,
            size=size,
            scale=factor,
            matrix=matrix,  # type: ignore[arg-type]
            spacing_mm=spacing,  # type: ignore[arg-type]
            fwhm_mm=tuple(f * factor for f in self.fwhm_mm),  # type: ignore[arg-type]
            postfilter_fwhm_mm=self.postfilter_fwhm_mm * factor,
            counts_per_frame=self.counts_per_frame / factor**3,
            n_views=n_views,
            subsets=subsets,
            iterations=iterations,
        )


@dataclass(frozen=True)
class SimulatedScanner:
    """A scanner on its scaled-down simulation grid (see :meth:`ScannerProfile.at_size`).

    Args:
        profile: the native profile.
        size: the ``size`` it was scaled for.
        scale: factor applied to spacing and FWHM.
        matrix: image matrix (x, y, z).
        spacing_mm: voxel spacing (x, y, z) in mm.
        fwhm_mm: system resolution (x, y, z) in mm.
        postfilter_fwhm_mm: Gaussian post-filter FWHM in mm.
        counts_per_frame: expected trues in the first frame for a typical subject.
        n_views: views over 180 degrees in the simulated sinogram.
        subsets: OSEM subsets.
        iterations: OSEM iterations.
    """

    profile: ScannerProfile
    size: int
    scale: float
    matrix: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    fwhm_mm: tuple[float, float, float]
    postfilter_fwhm_mm: float
    counts_per_frame: float
    n_views: int
    subsets: int
    iterations: int

    @property
    def resolution_fwhm_mm(self) -> tuple[float, float, float]:
        """Image resolution (x, y, z): system FWHM and post-filter added in quadrature."""
        post = self.postfilter_fwhm_mm
        return tuple(math.hypot(f, post) for f in self.fwhm_mm)  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """4 x 4 voxel-to-world (MNI, mm) affine: spacing on the diagonal, grid centred on the head."""
        affine = np.diag([*self.spacing_mm, 1.0])
        for axis in range(3):
            extent = (self.matrix[axis] - 1) * self.spacing_mm[axis]
            affine[axis, 3] = HEAD_CENTRE_MM[axis] - extent / 2.0
        return affine

    def sigma_voxels(self, fwhm_mm: tuple[float, float, float] | float) -> tuple[float, ...]:
        """Gaussian sigma in this grid's voxels for a FWHM in mm (scalar or per axis)."""
        fwhm = (fwhm_mm,) * 3 if isinstance(fwhm_mm, (int, float)) else fwhm_mm
        return tuple(f * _FWHM_TO_SIGMA / s for f, s in zip(fwhm, self.spacing_mm))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: simulated grid and settings, with the native ones beside them."""
        p = self.profile
        return {
            "name": p.name,
            "maker": p.maker,
            "matrix": list(self.matrix),
            "spacing_mm": [round(s, 6) for s in self.spacing_mm],
            "fwhm_mm": [round(f, 4) for f in self.fwhm_mm],
            "resolution_fwhm_mm": [round(f, 4) for f in self.resolution_fwhm_mm],
            "counts_per_frame": round(self.counts_per_frame),
            "background_fraction": p.background_fraction,
            "recon": {
                "algorithm": "OSEM (2D, slice-wise)",
                "iterations": self.iterations,
                "subsets": self.subsets,
                "views": self.n_views,
                "postfilter_fwhm_mm": round(self.postfilter_fwhm_mm, 4),
            },
            "frames": "6 x 5 min from 30 min post-injection; short = frame 1, long = mean of 6",
            "size": self.size,
            "scale": round(self.scale, 6),
            "native": {
                "matrix": list(p.matrix),
                "spacing_mm": list(p.spacing_mm),
                "fwhm_mm": list(p.fwhm_mm),
                "counts_per_frame": p.counts_per_frame,
                "recon": {
                    "algorithm": p.algorithm,
                    "iterations": p.iterations,
                    "subsets": p.subsets,
                    "postfilter_fwhm_mm": p.postfilter_fwhm_mm,
                },
            },
            "assumptions": p.assumptions,
        }


_COMMON = (
    "Simulated as 2D slice-wise parallel-beam data (as after Fourier rebinning), a spatially "
    "invariant Gaussian PSF, attenuation from a head model, a flat randoms + scatter background "
    "known to the reconstruction, no time of flight and no PSF modelling. Counts per frame are an "
    "estimate (~1e8-3e8 trues per 30-minute 3D brain scan), not a measured figure."
)

SCANNERS: dict[str, ScannerProfile] = {
    "1": ScannerProfile(
        scanner_id="1",
        name="Siemens Biograph mCT class",
        maker="Siemens",
        matrix=(192, 192, 136),
        spacing_mm=(1.21875, 1.21875, 1.21875),
        fwhm_mm=(4.4, 4.4, 4.5),
        counts_per_frame=5.0e7,
        background_fraction=0.4,
        algorithm="OSEM 3D",
        iterations=2,
        subsets=21,
        postfilter_fwhm_mm=2.0,
        assumptions="LSO ring of the mCT generation (~4.4 mm FWHM at centre), the most sensitive "
        "of the five, Siemens' default 2 iterations x 21 subsets and the lightest post-filter: the "
        "sharpest and, per voxel, the noisiest images. " + _COMMON,
    ),
    "2": ScannerProfile(
        scanner_id="2",
        name="Siemens Biograph TruePoint class",
        maker="Siemens",
        matrix=(192, 192, 128),
        spacing_mm=(1.21875, 1.21875, 1.21875),
        fwhm_mm=(4.8, 4.8, 5.0),
        counts_per_frame=2.0e7,
        background_fraction=0.5,
        algorithm="OSEM 3D",
        iterations=4,
        subsets=21,
        postfilter_fwhm_mm=4.0,
        assumptions="Same grid family as scanner 1 but a shorter axial field of view and an older "
        "LSO ring (~4.8 mm FWHM) with lower sensitivity and a 4 mm post-filter. " + _COMMON,
    ),
    "3": ScannerProfile(
        scanner_id="3",
        name="Siemens Biograph HiRez / TruePoint",
        maker="Siemens",
        matrix=(224, 224, 81),
        spacing_mm=(1.01821, 1.01821, 2.02699),
        fwhm_mm=(4.6, 4.6, 5.1),
        counts_per_frame=3.0e7,
        background_fraction=0.5,
        algorithm="FORE + OSEM 2D",
        iterations=4,
        subsets=16,
        postfilter_fwhm_mm=3.0,
        assumptions="81 planes of 2.03 mm suggest a HiRez/TruePoint ring (~4.6-5.1 mm FWHM); "
        "finest in-plane voxels, thick planes. " + _COMMON,
    ),
    "4": ScannerProfile(
        scanner_id="4",
        name="Philips Gemini / Allegro",
        maker="Philips",
        matrix=(128, 128, 90),
        spacing_mm=(2.0, 2.0, 2.0),
        fwhm_mm=(4.9, 4.9, 5.1),
        counts_per_frame=2.2e7,
        background_fraction=0.45,
        algorithm="3D-RAMLA (blob basis)",
        iterations=3,
        subsets=33,
        postfilter_fwhm_mm=4.0,
        assumptions="90 planes of 2 mm suggest a Philips GSO ring (~4.8-5.1 mm FWHM at 1 cm); "
        "RAMLA is simulated as OSEM with as many updates, and the smoothing of its blob basis as "
        "a 4 mm post-filter. " + _COMMON,
    ),
    "5": ScannerProfile(
        scanner_id="5",
        name="Siemens ECAT HR+",
        maker="Siemens",
        matrix=(128, 128, 63),
        spacing_mm=(2.05941, 2.05941, 2.425),
        fwhm_mm=(5.5, 5.5, 5.0),
        counts_per_frame=1.5e7,
        background_fraction=0.6,
        algorithm="FORE + OSEM 2D",
        iterations=6,
        subsets=16,
        postfilter_fwhm_mm=5.0,
        assumptions="63 planes of 2.425 mm are the ECAT HR+ BGO ring: 4.3-4.6 mm FWHM at the "
        "centre worsening to ~8 mm at 20 cm, taken as 5.5 mm over a brain; lowest sensitivity, "
        "most scatter and randoms, heaviest post-filter (coarsest images, ~7.4 mm). " + _COMMON,
    ),
}


def scale_factor(size: int) -> float:
    """Factor from native to simulated spacing for a given ``size`` (see :meth:`ScannerProfile.at_size`)."""
    return HEAD_FOV_MM[0] / (size * SCANNERS["1"].spacing_mm[0])
