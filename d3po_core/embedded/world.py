"""The procedural world of shapes the embedded model is trained on.

One 64x64 RGB image holds one shape. Its attributes are a kind, a colour, a size, a background
colour and a placement; a caption names them ("a large red circle on a black background, on the
left"). Training captions drop attributes at random so that short prompts ("a circle") leave
room for variety. Everything is deterministic from a seed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

IMAGE_SIZE = 64
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (30, 30, 30),
    "gray": (128, 128, 128),
    "sky": (150, 200, 240),
    "beige": (225, 205, 165),
}
SIZES: dict[str, float] = {"small": 11.0, "medium": 15.0, "large": 20.0}
PLACEMENTS: dict[str, tuple[float, float]] = {
    "center": (32.0, 32.0),
    "left": (21.0, 32.0),
    "right": (43.0, 32.0),
    "top": (32.0, 21.0),
    "bottom": (32.0, 43.0),
}
PLACEMENT_PHRASES: dict[str, str] = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
JITTER = 2.0
GENERIC_KIND = "shape"
_SUPERSAMPLE = 4

#: Every word a caption of the world can contain (the tokenizer makes each one a single token).
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            "a",
            "an",
            "on",
            "background",
            "the",
            "in",
            "at",
            GENERIC_KIND,
            *KINDS,
            *COLOURS,
            *BACKGROUNDS,
            *SIZES,
            *PLACEMENTS,
        ]
    )
)


@dataclass(frozen=True)
class Scene:
    """The attributes of one image; ``dx``/``dy`` is the placement jitter in pixels."""

    kind: str
    colour: str
    size: str
    background: str
    placement: str
    dx: float = 0.0
    dy: float = 0.0

    def as_dict(self) -> dict[str, str | float]:
        """The scene as a plain dict."""
        return asdict(self)


def shape_mask(
    kind: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray
) -> np.ndarray:
    """Boolean inside-test of a shape of half-extent ``r`` centred at (cx, cy) at points xs, ys."""
    x, y = xs - cx, ys - cy
    if kind == "circle":
        return x * x + y * y <= r * r
    if kind == "square":
        s = 0.8 * r
        return (np.abs(x) <= s) & (np.abs(y) <= s)
    if kind == "triangle":
        base = 0.8 * r
        return (y <= base) & (y >= -r) & (np.abs(x) <= r * (y + r) / (base + r))
    if kind == "cross":
        w = 0.33 * r
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
        return inside & ((np.abs(x) <= w) | (np.abs(y) <= w))
    raise ValueError(f"unknown shape kind {kind!r}")


def pixel_grid(size: int = IMAGE_SIZE, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (xs, ys); with supersampling, ``supersample**2`` points a pixel."""
    coords = (np.arange(size * supersample) + 0.5) / supersample
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    return xs, ys


_FINE_GRID = pixel_grid(IMAGE_SIZE, _SUPERSAMPLE)


def coverage(scene: Scene) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of the scene's shape."""
    cx, cy = PLACEMENTS[scene.placement]
    mask = shape_mask(scene.kind, cx + scene.dx, cy + scene.dy, SIZES[scene.size], *_FINE_GRID)
    k = _SUPERSAMPLE
    return mask.reshape(IMAGE_SIZE, k, IMAGE_SIZE, k).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 (64, 64, 3) RGB array."""
    alpha = coverage(scene)[..., None]
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float64)
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float64)
    return np.round(alpha * fg + (1.0 - alpha) * bg).astype(np.uint8)


def random_scene(rng: np.random.Generator) -> Scene:
    """A uniformly drawn scene whose background differs from the shape colour."""
    colour = str(rng.choice(list(COLOURS)))
    background = str(rng.choice([b for b in BACKGROUNDS if b != colour]))
    dx, dy = rng.uniform(-JITTER, JITTER, size=2)
    return Scene(
        kind=str(rng.choice(KINDS)),
        colour=colour,
        size=str(rng.choice(list(SIZES))),
        background=background,
        placement=str(rng.choice(list(PLACEMENTS))),
        dx=float(dx),
        dy=float(dy),
    )


def make_dataset(n: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """``n`` scenes drawn from ``seed`` and their renders, uint8 (n, 64, 64, 3)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(s) for s in scenes])
    return images, scenes


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def compose_caption(
    kind: str | None = None,
    colour: str | None = None,
    size: str | None = None,
    background: str | None = None,
    placement: str | None = None,
) -> str:
    """A caption naming the given attributes; ``None`` leaves one out."""
    head = " ".join(w for w in (size, colour, kind or GENERIC_KIND) if w)
    text = f"{_article(head)} {head}"
    if background:
        text += f" on {_article(background)} {background} background"
    if placement:
        text += f", {PLACEMENT_PHRASES[placement]}"
    return text


def caption(
    scene: Scene, rng: np.random.Generator | None = None, drop: float = 0.4, drop_kind: float = 0.15
) -> str:
    """The scene's caption; with ``rng``, each attribute is dropped with its probability."""

    def keep(p: float) -> bool:
        return rng is None or rng.random() >= p

    return compose_caption(
        kind=scene.kind if keep(drop_kind) else None,
        colour=scene.colour if keep(drop) else None,
        size=scene.size if keep(drop) else None,
        background=scene.background if keep(drop) else None,
        placement=scene.placement if keep(drop) else None,
    )


_PHRASE_TO_PLACEMENT = {v: k for k, v in PLACEMENT_PHRASES.items()}
_CAPTION_RE = re.compile(
    r"^an? (?:(?P<size>{s}) )?(?:(?P<colour>{c}) )?(?P<kind>{k})"
    r"(?: on an? (?P<background>{b}) background)?(?:, (?P<placement>{p}))?$".format(
        s="|".join(SIZES),
        c="|".join(COLOURS),
        k="|".join((*KINDS, GENERIC_KIND)),
        b="|".join(BACKGROUNDS),
        p="|".join(PLACEMENT_PHRASES.values()),
    )
)


def parse_caption(text: str) -> dict[str, str | None]:
    """The attributes a caption names (``None`` where left out); ValueError if not a caption."""
    match = _CAPTION_RE.match(" ".join(text.lower().split()))
    if match is None:
        raise ValueError(f"not a caption of the shapes world: {text!r}")
    found = match.groupdict()
    if found["kind"] == GENERIC_KIND:
        found["kind"] = None
    if found["placement"] is not None:
        found["placement"] = _PHRASE_TO_PLACEMENT[found["placement"]]
    return found
