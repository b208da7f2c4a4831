"""The release policy, in one place: every released model ships with its measured figures beside a goal;
only a floor, which marks a broken model, blocks a release.

A goal is a direction (the card and the README show `mIoU 0.756 / goal 0.90`); missing it never stops a
release. A floor is what a model that works at all reaches: below it the evaluator exits non-zero and the
exporter's result must not ship. The classifiers' floors are the accuracies of their earlier releases.
Exporters write `release_block(...)` onto the card; evaluators re-measure and report `floor_problems(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICY = ("figures measured by onnxruntime on the exported graph, each beside its goal; a goal is never a "
          "release gate; only a figure below its floor (a broken model) blocks a release")


@dataclass(frozen=True)
class Target:
    metric: str                  # key of the figure in the measured metrics
    label: str                   # how a person reads it
    goal: float | None = None
    floor: float | None = None
    higher_is_better: bool = True

    def meets(self, value: float, bound: float | None) -> bool | None:
        if bound is None:
            return None
        return value >= bound if self.higher_is_better else value <= bound


SEGMENTER_TARGETS = (
    Target("miou", "mIoU", goal=0.90, floor=0.70),
    Target("pixel_accuracy", "pixel accuracy", goal=0.98),
    # Outlines are what a segmenter that works at all gets right, whatever it names the garments.
    Target("foreground_iou", "garment-vs-background IoU", floor=0.95),
)

GENERATOR_TARGETS = (
    Target("class_consistency", "class consistency", goal=0.97, floor=0.95),
    # FID in the released CNN's features divided by the same figure for real training images: 1.0 is what
    # a generator indistinguishable from the training set would score.
    Target("fid_to_reference", "FID / real-images reference", goal=2.0, higher_is_better=False),
    Target("recall", "recall (k=3)", goal=0.5),
)

# Classifiers: the accuracy each earlier release reached is both its floor and, met already, its goal.
# DenseNet-BC has no earlier release: its goal is the anchor (DenseNet-BC, 768K parameters, 95.4% in the
# Fashion-MNIST benchmark table); its floor sits under the lecture CNN's 93% release by a point, a DenseNet
# below it has not learnt, so that only a broken run is held back.
CLASSIFIER_FLOORS = {"mlp": 0.900, "cnn": 0.930, "resnet": 0.950, "resnet-student": 0.940, "densenet": 0.920}
CLASSIFIER_GOALS = {"mlp": 0.900, "cnn": 0.930, "resnet": 0.950, "resnet-student": 0.948, "densenet": 0.954}


# A quantized variant (export/quantize.py writes models/<source>-int8) is the same model, held to its source's goal
# and floor.
VARIANT_SUFFIXES = ("-int8",)


def source_model(name: str) -> str:
    """The released model a variant was made from (`cnn-int8` -> `cnn`); a model's own name otherwise."""
    return next((name.removesuffix(suffix) for suffix in VARIANT_SUFFIXES if name.endswith(suffix)), name)


def classifier_floor(name: str) -> float | None:
    return CLASSIFIER_FLOORS.get(source_model(name))


def classifier_targets(name: str) -> tuple[Target, ...]:
    source = source_model(name)
    return (Target("accuracy", "test accuracy", goal=CLASSIFIER_GOALS.get(source),
                   floor=CLASSIFIER_FLOORS.get(source)),)


def figure_text(target: Target, value: float) -> str:
    """`mIoU 0.756 / goal 0.90 (floor 0.70)`: what the card and the README show for one figure."""
    words = [f"{target.label} {value:.4g}"]
    if target.goal is not None:
        words.append(f"/ goal {'>=' if target.higher_is_better else '<='} {target.goal:g}")
    if target.floor is not None:
        words.append(f"(floor {target.floor:g})")
    return " ".join(words)


def release_block(targets: tuple[Target, ...], figures: dict) -> dict:
    """The card's `release` entry: per figure its value, goal, floor and how far from the goal it is."""
    entries = []
    for target in targets:
        value = float(figures[target.metric])
        entries.append({"metric": target.metric, "label": target.label, "value": value, "goal": target.goal,
                        "floor": target.floor, "higher_is_better": target.higher_is_better,
                        "goal_met": target.meets(value, target.goal),
                        "to_goal": None if target.goal is None else round(target.goal - value, 6),
                        "above_floor": target.meets(value, target.floor), "text": figure_text(target, value)})
    return {"policy": POLICY, "figures": entries,
            "above_floors": all(e["above_floor"] is not False for e in entries),
            "summary": "; ".join(e["text"] for e in entries)}


def floor_problems(targets: tuple[Target, ...], figures: dict) -> list[str]:
    """One line per figure below its floor: what blocks a release."""
    return [f"{t.label} {figures[t.metric]:.4f} {'below' if t.higher_is_better else 'above'} the floor {t.floor}"
            for t in targets if t.meets(float(figures[t.metric]), t.floor) is False]


def say_floor_problems(name: str, targets: tuple[Target, ...], figures: dict) -> None:
    """At export, print each floor the model is under: the card says so too, and its evaluator fails on it."""
    for problem in floor_problems(targets, figures):
        print(f"{name}: {problem}: a broken model, not to be released", flush=True)
