"""The sample images the web page ships (service/static/samples/), made from the data, never drawn by hand.

    .venv/bin/python tests/web_samples.py        (writes them; tests/test_web.py checks the committed bytes)

A few Fashion-MNIST test images (28x28, grey) for Classify and one 64x64 two-item test scene for Segment,
the first such scene of training.scenes.fixed_test_scenes, the scene tests/test_service.py segments too.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO / "service" / "static" / "samples"
# Test-split indices of a few classes that look different from one another.
CLASSIFY_SAMPLES = {"ankle-boot.png": 0, "pullover.png": 1, "trouser.png": 2, "sneaker.png": 9}
SCENE_SAMPLE = "scene-two-items.png"
SCENES_SEARCHED = 40


def png_bytes(gray: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def sample_images() -> dict[str, tuple[bytes, list[str]]]:
    """File name -> (PNG bytes, the labels of what it shows)."""
    sys.path.insert(0, str(REPO))  # run as a script from anywhere: training/ is a package of the checkout
    from training.data import load_dataset
    from training.scenes import fixed_test_scenes

    test = load_dataset("fashion-mnist", "test")
    samples = {name: (png_bytes(test.images[index, 0].numpy()), [test.label_names[int(test.labels[index])]])
               for name, index in CLASSIFY_SAMPLES.items()}
    scenes = fixed_test_scenes(SCENES_SEARCHED, test=test)
    index = next(i for i in range(len(scenes)) if (scenes.classes[i] >= 0).sum() == 2)
    items = [test.label_names[int(k)] for k in scenes.classes[index] if k >= 0]
    samples[SCENE_SAMPLE] = (png_bytes(scenes.images[index, 0].numpy()), items)
    return samples


def main() -> None:
    SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in sample_images().items():
        (SAMPLES_DIR / name).write_bytes(data)
        print(f"{SAMPLES_DIR / name}: {len(data)} bytes, {', '.join(labels)}")


if __name__ == "__main__":
    main()
