"""Training data: image folders, and the built-in corpus of photos that ship inside PyPI wheels.

The held-out photos in :data:`HOLDOUT` are never trained on; they are the evaluation set of the
benchmarks and model cards.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difftool.app.batch import IMAGE_SUFFIXES
from difftool.core.images import open_image

#: Evaluation photos (colour, natural): never used for training.
HOLDOUT: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "grace_hopper")

#: name -> (package, path inside it, licence note)
CORPUS: dict[str, tuple[str, str, str]] = {
    **{
        name: ("skimage", f"data/{name}.{ext}", "scikit-image sample data (see skimage/data/README.txt)")
        for name, ext in [
            ("astronaut", "png"),
            ("chelsea", "png"),
            ("coffee", "png"),
            ("brick", "png"),
            ("camera", "png"),
            ("coins", "png"),
            ("color", "png"),
            ("grass", "png"),
            ("gravel", "png"),
            ("hubble_deep_field", "jpg"),
            ("ihc", "png"),
            ("moon", "png"),
            ("motorcycle_left", "png"),
            ("motorcycle_right", "png"),
            ("page", "png"),
            ("retina", "jpg"),
            ("rocket", "jpg"),
            ("text", "png"),
        ]
    },
    "china": ("sklearn", "datasets/images/china.jpg", "scikit-learn sample image (CC BY 2.0, Wikimedia Commons)"),
    "flower": ("sklearn", "datasets/images/flower.jpg", "scikit-learn sample image (CC BY 2.0, Wikimedia Commons)"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "public domain (US Navy photo)"),
}


@dataclass(frozen=True)
class CorpusImage:
    name: str
    path: Path
    licence: str


def corpus_path(name: str) -> Path | None:
    package, relative, _ = CORPUS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / relative
    return path if path.is_file() else None


def builtin_corpus(split: str = "train") -> list[CorpusImage]:
    """The wheel-shipped images of ``split`` (``train``: all but :data:`HOLDOUT`; ``eval``: the holdout)."""
    names = [n for n in CORPUS if (n in HOLDOUT) == (split == "eval")]
    found = [CorpusImage(n, p, CORPUS[n][2]) for n in names if (p := corpus_path(n)) is not None]
    if not found:
        raise RuntimeError(
            "none of the built-in corpus images were found; install difftool[train] "
            "(scikit-image, scikit-learn, matplotlib)"
        )
    return found


def folder_images(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise RuntimeError(f"{folder} holds no images")
    return files


def load_rgb(path: Path) -> np.ndarray:
    return open_image(path).rgb


class ImagePool:
    """Images in memory (float RGB) with reproducible random crops, flips, rotations and scale jitter."""

    def __init__(self, images: list[np.ndarray], names: list[str] | None = None) -> None:
        if not images:
            raise ValueError("an ImagePool needs at least one image")
        self.images = images
        self.names = names or [str(i) for i in range(len(images))]
        # Sample images in proportion to their area, so small images are not over-represented.
        areas = np.array([im.shape[0] * im.shape[1] for im in images], dtype=np.float64)
        self.weights = areas / areas.sum()

    @classmethod
    def from_sources(cls, folders: list[Path] = (), builtin: bool = True) -> ImagePool:
        paths: list[tuple[str, Path]] = []
        if builtin:
            paths += [(c.name, c.path) for c in builtin_corpus("train")]
        for folder in folders:
            paths += [(p.name, p) for p in folder_images(folder)]
        return cls([load_rgb(p) for _, p in paths], [n for n, _ in paths])

    def crop(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """One augmented ``size`` x ``size`` crop (H x W x 3 float32)."""
        image = self.images[rng.choice(len(self.images), p=self.weights)]
        scale = rng.uniform(0.6, 1.0) if min(image.shape[:2]) * 0.6 >= size else 1.0
        side = min(int(round(size / scale)), image.shape[0], image.shape[1])
        y = rng.integers(0, image.shape[0] - side + 1)
        x = rng.integers(0, image.shape[1] - side + 1)
        patch = image[y : y + side, x : x + side]
        if side != size:
            from PIL import Image

            patch = np.stack(
                [
                    np.asarray(Image.fromarray(patch[..., c], "F").resize((size, size), Image.Resampling.BICUBIC))
                    for c in range(3)
                ],
                axis=2,
            ).clip(0, 1)
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        patch = np.rot90(patch, k=int(rng.integers(0, 4)))
        return np.ascontiguousarray(patch, dtype=np.float32)
