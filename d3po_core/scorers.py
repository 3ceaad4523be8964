"""Scorers: scripted labelers and objectives, ``score(image, prompt) -> float``.

A scorer labels grids automatically (best = argmax, worst = argmin) for simulation and
benchmarks, can suggest picks in the UI, and is the reward of the DDPO baseline. Shipped: the
D3PO/DDPO papers' JPEG (in)compressibility proxies. Plug-ins are named
``package.module:function`` or ``path/to/file.py:function``.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from .errors import ScorerError

Scorer = Callable[[Image.Image, str], float]


def jpeg_kilobytes(image: Image.Image, quality: int = 95) -> float:
    """Size of the image saved as JPEG at ``quality``, in kB (the papers' measure)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


def jpeg_compressibility(image: Image.Image, prompt: str = "") -> float:
    """Higher for images that compress better: minus the JPEG size in kB."""
    return -jpeg_kilobytes(image)


def jpeg_incompressibility(image: Image.Image, prompt: str = "") -> float:
    """Higher for images that compress worse: the JPEG size in kB."""
    return jpeg_kilobytes(image)


BUILTIN: dict[str, Scorer] = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
}


def load_scorer(spec: str) -> Scorer:
    """Resolve a built-in name, ``package.module:function`` or ``path/file.py:function``."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ScorerError(
            f"scorer {spec!r} is not a built-in ({', '.join(BUILTIN)}) "
            "nor of the form package.module:function or path/file.py:function"
        )
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise ScorerError(f"scorer file not found: {path}")
        loader_spec = importlib.util.spec_from_file_location(f"_scorer_{path.stem}", path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise ScorerError(f"scorer file {path} failed to import: {exc}") from exc
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ScorerError(f"scorer module {module_name!r} cannot be imported: {exc}") from exc
    scorer = getattr(module, attr, None)
    if not callable(scorer):
        raise ScorerError(f"{module_name} has no callable {attr!r}")
    return scorer


def score_images(scorer: Scorer, images: Sequence[Image.Image], prompt: str) -> list[float]:
    return [float(scorer(image, prompt)) for image in images]


def scripted_pick(scores: Sequence[float]) -> tuple[int, int] | None:
    """(best, worst) = (argmax, argmin) of the scores; None when all scores are equal (a tie)."""
    best = max(range(len(scores)), key=scores.__getitem__)
    worst = min(range(len(scores)), key=scores.__getitem__)
    if scores[best] == scores[worst]:
        return None
    return best, worst
