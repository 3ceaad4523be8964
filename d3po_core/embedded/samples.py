"""A picture of the embedded model's samples: a row of seeds per prompt.

python -m d3po_core.embedded.samples --out docs/embedded_samples.png [--model DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from ..models import default_model, load_pipeline
from ..sampling import SampleSettings, sample_grid

PROMPTS = (
    "a circle",
    "a red square on a white background",
    "a large blue triangle on a black background",
    "a small yellow cross on a sky background",
    "a shape on a beige background",
)


def sample_sheet(
    pipe, prompts=PROMPTS, seeds: int = 8, tile: int = 128, label_width: int = 330
) -> Image.Image:
    """``seeds`` images per prompt (seeds 0…, independent noise, the model's guidance)."""
    guidance = pipe.recommended.get("guidance", SampleSettings().guidance)
    settings = SampleSettings(n=seeds, steps=20, guidance=guidance, eta=1.0, shared_noise=False)
    sheet = Image.new("RGB", (label_width + seeds * tile, len(prompts) * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for row, prompt in enumerate(prompts):
        grid = sample_grid(pipe, prompt, settings, seed=0)
        draw.text((6, row * tile + tile // 2 - 6), prompt, fill="black")
        for col, image in enumerate(grid.images):
            sheet.paste(
                image.resize((tile, tile), Image.BICUBIC), (label_width + col * tile, row * tile)
            )
    return sheet


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default=None, help="default: the embedded model")
    args = p.parse_args(argv)
    pipe = load_pipeline(args.model or default_model(), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    sample_sheet(pipe).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
