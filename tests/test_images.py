"""Auto-invert on whole data sets, in process: the rule the server applies to every uploaded image.

The models were trained on light items on a dark background; `invert=auto` must leave such images alone
and turn dark-on-light photographs (white or grey paper) into that polarity. Checked on all 10,000
Fashion-MNIST test images as PNG bytes, on the same images inverted, and on dark items pasted on grey 160.
"""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from helpers import png
from service.images import InputSpec, background_is_light, decode_image, fit_to_input_spec, to_model_mode
from training.data import load_dataset

SPEC = InputSpec(channels=1, height=28, width=28, padding_value=0, light_on_dark=True)


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    split = load_dataset("fashion-mnist", "test")
    return split.images.numpy()[:, 0], split.labels.numpy()


def fitted(gray: np.ndarray) -> tuple[np.ndarray, bool]:
    return fit_to_input_spec(decode_image(png(gray), 10**8, "test"), SPEC, "auto")


def test_no_test_image_is_inverted_and_every_one_arrives_unchanged(test_split):
    images, _ = test_split
    inverted, changed = [], []
    for index, gray in enumerate(images):
        pixels, was_inverted = fitted(gray)
        if was_inverted:
            inverted.append(index)
        if not np.array_equal(pixels[0], gray):
            changed.append(index)
    assert inverted == [] and changed == [], (inverted[:20], changed[:20])


def test_every_test_image_inverted_is_inverted_back(test_split):
    images, _ = test_split
    missed = [i for i, gray in enumerate(images) if not np.array_equal(fitted(255 - gray)[0][0], gray)]
    assert missed == [], missed[:20]


def test_dark_items_on_mid_grey_paper_are_inverted(test_split):
    images, _ = test_split
    # A dark item photographed on grey (160) paper: the item darkens the paper where it is.
    on_grey = np.rint(160 * (1 - images[:2000].astype(np.float64) / 255)).astype(np.uint8)
    decisions = [to_model_mode(Image.fromarray(gray), 1, True, "auto")[1] for gray in on_grey]
    assert all(decisions), [i for i, d in enumerate(decisions) if not d][:20]


def test_light_items_on_a_dark_background_at_any_size_are_left_alone(test_split):
    images, _ = test_split
    # The same items scaled up and set on a larger black canvas, as a scene or a screenshot would be.
    for gray in images[:50]:
        canvas = np.zeros((200, 300), np.uint8)
        canvas[30:170, 80:220] = np.asarray(Image.fromarray(gray).resize((140, 140)))
        assert not background_is_light(canvas)
        assert background_is_light(255 - canvas)


def test_a_uniform_image_is_not_inverted():
    for value in (0, 128, 255):
        assert not background_is_light(np.full((28, 28), value, np.uint8))
