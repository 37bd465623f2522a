"""Regenerate web/demo.png, the page's demo scene: held-out evaluation scene 56 of the project's scene generator
(samserve_build.scenes; training never drew it), 384 x 288, on which the shipped model segments most objects
from one click. Run: python web/demo_scene.py"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from samserve_build import scenes

DEMO_SCENE = 56
DEMO_SIZE = (288, 384)  # (height, width)


def main() -> None:
    scene = scenes.generate_scene(scenes.EVAL_SEED_OFFSET + DEMO_SCENE, size=DEMO_SIZE)
    Image.fromarray(scene.image).save(Path(__file__).with_name("demo.png"), optimize=True)


if __name__ == "__main__":
    main()
