"""Segmentation: unpooling, the scene generator, SegNet, a dry-run training run and its export."""

import hashlib
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from export import evaluate_segmenter
from export import segmenter as export_segmenter
from export.onnx_io import ParityError
from training.common import TrainSetup
from training.data import FASHION_MNIST_DIR, FASHION_MNIST_LABELS, load_dataset, train_val_split
from training.metrics import item_coverage
from training.models import CLASSIFIERS, SEGMENTERS, build_segmenter, count_parameters
from training.scenes import ITEM_THRESHOLD, TEST_SCENE_SEED, fixed_test_scenes, make_scenes
from training.train_segnet import (PRESETS, command_for, main as train_main, parse_args as train_args,
                                   pretrain_encoder, resolve_config)

TINY = ["--canvas", "32", "32", "--widths", "8", "16", "--batch-size", "8", "--epochs", "2", "--dry-run",
        "--no-progress"]


@pytest.fixture(scope="module")
def splits():
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST_DIR} (make data)")
    return load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")


# --- max-unpooling ----------------------------------------------------------------------------------
def test_max_unpool_puts_values_back_at_the_pooled_indices():
    x = torch.tensor([[1., 5., 0., 2.],
                      [3., 4., 7., 1.],
                      [0., 0., 1., 1.],
                      [9., 2., 3., 8.]]).view(1, 1, 4, 4)
    pooled, indices = torch.nn.MaxPool2d(2, return_indices=True)(x)
    assert pooled.flatten().tolist() == [5., 7., 9., 8.]
    assert indices.flatten().tolist() == [1, 6, 12, 15]  # flat positions in the 4x4 plane
    restored = torch.nn.MaxUnpool2d(2)(pooled, indices)
    assert torch.equal(restored, torch.tensor([[0., 5., 0., 0.],
                                               [0., 0., 7., 0.],
                                               [0., 0., 0., 0.],
                                               [9., 0., 0., 8.]]).view(1, 1, 4, 4))
    # Each decoder stage unpools with the indices of its mirrored encoder stage.
    model, _ = build_segmenter("segnet", widths=(4,), convs_per_stage=1)
    model.eval()
    features = model.encoder[0].convs(x)
    pooled, where = model.encoder[0](x)
    sparse = model.decoder[0].unpool(pooled, where)
    kept = sparse != 0
    assert torch.equal(sparse[kept], features[kept]) and kept.view(4, -1).sum(1).le(4).all()


# --- scenes -----------------------------------------------------------------------------------------
def test_scenes_are_deterministic(splits):
    train, _ = splits
    a = make_scenes(train, 40, seed=3)
    b = make_scenes(train, 40, seed=3, chunk=7)  # chunking only bounds memory
    assert a.images.dtype == torch.uint8 and a.images.shape == (40, 1, 64, 64) and a.masks.shape == (40, 64, 64)
    assert a.images.numpy().tobytes() == b.images.numpy().tobytes() and torch.equal(a.masks, b.masks)
    c = make_scenes(train, 40, seed=4)
    assert not torch.equal(a.images, c.images)
    counts = (a.items >= 0).sum(1)
    assert counts.min() >= 1 and counts.max() <= 4
    assert make_scenes(train, 3, seed=0, height=48, width=80).images.shape == (3, 1, 48, 80)


def test_labels_follow_the_threshold_and_the_visible_item(splits):
    train, _ = splits
    scenes = make_scenes(train, 200, seed=1, flip=True)
    image = scenes.images[:, 0]
    assert torch.equal(scenes.masks == 0, image <= ITEM_THRESHOLD)  # background exactly where nothing is bright
    visible = scenes.instances > 0
    owner_class = scenes.classes.gather(1, (scenes.instances.long() - 1).clamp(min=0).flatten(1)).view_as(image)
    assert torch.equal(scenes.masks[visible].long(), owner_class[visible] + 1)  # the visible item's own class
    assert torch.equal(visible, scenes.masks > 0)


def test_one_item_matches_an_interpolated_paste(splits):
    train, _ = splits
    scenes = make_scenes(train, 60, seed=2, min_items=1, max_items=1)
    for n in range(60):
        item, cls = scenes.items[n, 0].item(), scenes.classes[n, 0].item()
        top, left, h, w = scenes.boxes[n, 0].tolist()
        assert cls == train.labels[item].item() and 22 <= h <= 45 and h == w  # 28 * (0.8 .. 1.6), rounded
        resized = F.interpolate(train.images[item:item + 1].float(), size=(h, w), mode="bilinear",
                                align_corners=False)[0, 0].round().clamp(0, 255)
        canvas = torch.zeros(64 + 2 * 64, 64 + 2 * 64)
        canvas[64 + top:64 + top + h, 64 + left:64 + left + w] = resized
        want = canvas[64:128, 64:128]
        assert (scenes.images[n, 0].float() - want).abs().max() <= 1  # rounding at .5 may differ
        near_threshold = (want - ITEM_THRESHOLD).abs() <= 1
        want_mask = torch.where(want > ITEM_THRESHOLD, cls + 1, 0)
        assert torch.equal(scenes.masks[n][~near_threshold].long(), want_mask[~near_threshold])
        assert set(scenes.masks[n].unique().tolist()) <= {0, cls + 1}


def test_test_scenes_come_from_test_images_only(splits):
    train, test = splits
    fixed = fixed_test_scenes(50, height=32, width=32, test=test)
    assert fixed.source == "fashion-mnist:test"
    assert torch.equal(fixed.images, make_scenes(test, 50, TEST_SCENE_SEED, 32, 32).images)
    assert not torch.equal(fixed.images, make_scenes(train, 50, TEST_SCENE_SEED, 32, 32).images)
    assert int(fixed.items.max()) < len(test)


# --- SegNet -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width", [(64, 64), (48, 80)])
def test_segnet_shapes_and_gradients(height, width):
    torch.manual_seed(0)
    model, config = build_segmenter("segnet", init="kaiming-normal")
    assert model.stride == 8 and config["num_classes"] == 11
    logits = model(torch.randn(2, 1, height, width))
    assert logits.shape == (2, 11, height, width) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.randint(0, 11, (2, height, width))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a gradient: {missing}"
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_release_preset_size_and_registries():
    config = resolve_config(train_args(["--preset", "release-segnet"]))
    model, _ = build_segmenter("segnet", widths=config["widths"], convs_per_stage=config["convs_per_stage"])
    assert count_parameters(model) == 589_547 and model.stride == 16
    assert set(SEGMENTERS) == {"segnet"} and not set(SEGMENTERS) & set(CLASSIFIERS)
    assert command_for(config) == "python -m training.train_segnet --preset release-segnet --seed 0"
    assert "release-segnet" in PRESETS
    wide = resolve_config(train_args(["--preset", "release-segnet-wide"]))
    model, _ = build_segmenter("segnet", widths=wide["widths"], convs_per_stage=wide["convs_per_stage"])
    # Under 2.5M parameters keeps the exported graph under evaluate_segmenter's 10 MB file cap.
    assert count_parameters(model) == 2_175_979 and model.stride == 16 and wide["epochs"] == 40
    pretrained = resolve_config(train_args(["--preset", "release-segnet-pretrained"]))
    assert pretrained["widths"] == wide["widths"] and pretrained["pretrain_epochs"] == 10
    assert all(side % model.stride == 0 for side in pretrained["pretrain_canvas"])


def test_reference_paints_each_visible_item_with_its_class(splits):
    _, test = splits
    scenes = make_scenes(test, 30, seed=11)
    true_classes = test.labels.numpy()
    assert np.array_equal(evaluate_segmenter.instance_labels(scenes, true_classes), scenes.masks.numpy())
    # Every item called a Bag (class 8, label 9): foreground becomes all 9, background stays 0.
    bags = evaluate_segmenter.instance_labels(scenes, np.full_like(true_classes, 8))
    foreground = scenes.masks.numpy() > 0
    assert (bags[foreground] == 9).all() and (bags[~foreground] == 0).all()
    # Relabel only the last slot of the first scene: only its visible pixels change.
    items = scenes.items[0].numpy()
    last = int(np.flatnonzero(items >= 0)[-1])
    moved = true_classes.copy()
    moved[items[last]] = (true_classes[items[last]] + 1) % 10
    painted = evaluate_segmenter.instance_labels(scenes, moved)
    changed = painted != scenes.masks.numpy()
    assert np.array_equal(changed[0], scenes.instances[0].numpy() == last + 1) and not changed[1:].any()


def test_classifier_reference_with_a_released_classifier(splits):
    from pathlib import Path
    from training.scenes import SCENE_LABELS
    cnn = Path("models/cnn")
    if not (cnn / "model.onnx").is_file():
        pytest.skip("no released CNN in models/cnn")
    _, test = splits
    scenes = make_scenes(test, 60, seed=12)
    reference = evaluate_segmenter.classifier_reference(cnn, test, scenes, SCENE_LABELS)
    # True outlines: background is exact, and so is garment against background.
    assert reference["per_class_iou"]["background"] == 1.0 and reference["foreground_iou"] == 1.0
    assert reference["items_classified"] == len(np.unique(scenes.items.numpy()[scenes.items.numpy() >= 0]))
    # A released classifier (93.5% on the test split) labels most items right, and mIoU follows from that.
    assert 0.8 < reference["item_accuracy"] <= 1.0 and 0.6 < reference["miou"] <= 1.0
    assert reference["pixel_accuracy"] > 0.9
    # Each item is painted one class, so the majority repainting changes nothing.
    assert reference["majority_class_true_outline_miou"] == pytest.approx(reference["miou"])
    assert all(v["found"] == 1.0 for v in reference["per_class_found_and_named"].values())


def test_per_class_split_tells_lost_outlines_from_wrong_names(splits):
    scenes = make_scenes(splits[1], 40, seed=13)
    truth = scenes.masks.numpy()
    k = int(truth[0][truth[0] > 0][0])            # a garment class present in scene 0
    other = k % 10 + 1                             # another garment class
    lost = truth.copy()
    lost[truth == k] = 0                           # every pixel of class k called background
    split = item_coverage(scenes, lost)["per_class_found_and_named"]
    name = evaluate_segmenter.SCENE_LABELS[k]
    assert split[name]["found"] == 0.0 and split[name]["named"] == 0.0
    assert all(v == {"found": 1.0, "named": 1.0} for n, v in split.items() if n != name)
    renamed = truth.copy()
    renamed[truth == k] = other                    # outlines kept, garment misnamed
    split = item_coverage(scenes, renamed)["per_class_found_and_named"]
    assert split[name] == {"found": 1.0, "named": 0.0}


def test_encoder_pretraining_teaches_the_encoder_to_name_single_items(splits):
    train_items, val_items = train_val_split(splits[0], 0.1, 0)
    torch.manual_seed(0)
    model, _ = build_segmenter("segnet", init="kaiming-normal", widths=[8, 16, 32], convs_per_stage=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    setup = TrainSetup(model, None, None, torch.device("cpu"), [20.0], [60.0], use_bf16=False, channels_last=False)
    config = resolve_config(train_args(["--widths", "8", "16", "32", "--batch-size", "32", "--pretrain-epochs", "2",
                                        "--pretrain-canvas", "32", "32", "--lr", "0.01"]))
    history = pretrain_encoder(config, setup, train_items, val_items, max_batches=100, progress=False)
    assert [h["epoch"] for h in history] == [1, 2]
    # 200 steps of a 6k-parameter encoder (0.53 here): far above the 10% of guessing, on items it never saw.
    assert history[-1]["val_accuracy"] > 0.4, history
    after = model.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"encoder"}, "pretraining must leave the decoder and the pixel classifier untouched"


def test_a_pretrained_run_records_its_pretraining(tmp_path):
    run = train_main(train_args([*TINY, "--pretrain-epochs", "2", "--pretrain-canvas", "32", "32",
                                 "--out", str(tmp_path)]))
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["pretrain_history"]] == [1, 2]
    assert all(0 <= h["val_accuracy"] <= 1 for h in metrics["pretrain_history"])
    config = json.loads((run / "config.json").read_text())
    assert "--pretrain-epochs 2" in config["command"] and "--pretrain-canvas 32 32" in config["command"]
    with pytest.raises(ValueError, match="--pretrain-canvas .* multiples of the stride 4"):
        train_main(train_args([*TINY, "--pretrain-epochs", "1", "--pretrain-canvas", "30", "32",
                               "--out", str(tmp_path)]))


# --- training and export ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dry_run(splits, tmp_path_factory):
    return train_main(train_args([*TINY, "--seed", "1", "--out", str(tmp_path_factory.mktemp("runs"))]))


def test_dry_run_writes_a_complete_run(dry_run):
    for name in ("config.json", "metrics.json", "best.pt", "last.pt", "curves.png", "class_iou.png",
                 "test_overlay.png", "scenes.png"):
        assert (dry_run / name).stat().st_size > 0, name
    assert dry_run.parent.name == "segnet" and dry_run.name.endswith("-seed1")
    config = json.loads((dry_run / "config.json").read_text())
    assert config["config"]["seed"] == 1 and config["stride"] == 4 and config["hardware"]
    assert len(config["data_files"]) == 4 and all(len(h) == 64 for h in config["data_files"].values())
    assert config["label_names"] == ["background"] + FASHION_MNIST_LABELS
    metrics = json.loads((dry_run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    test = metrics["test_torch"]
    assert set(test["per_class_iou"]) == set(config["label_names"]) and 0 <= test["miou"] <= 1
    assert 0 <= test["pixel_accuracy"] <= 1 and metrics["wall_seconds"] > 0
    best = torch.load(dry_run / "best.pt", weights_only=False)
    assert best["epoch"] == metrics["best_epoch"] and best["stride"] == 4


def test_same_seed_same_metrics(dry_run, tmp_path):
    again = train_main(train_args([*TINY, "--seed", "1", "--out", str(tmp_path)]))
    first, second = (json.loads((run / "metrics.json").read_text()) for run in (dry_run, again))
    assert first["history"] == second["history"] and first["test_torch"] == second["test_torch"]


def test_canvas_must_be_a_multiple_of_the_stride(tmp_path):
    with pytest.raises(ValueError, match="multiples of the stride 4"):
        train_main(train_args(["--canvas", "30", "32", *TINY[3:], "--out", str(tmp_path)]))


@pytest.fixture(scope="module")
def exported(dry_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    card = export_segmenter.main(export_segmenter.parse_args(
        ["--run", str(dry_run), "--name", "tiny-segnet", "--out", str(out), "--parity-scenes", "64",
         "--parity-size", "48", "80"]))
    return out / "tiny-segnet", card


def test_export_card_and_checksum(exported, dry_run):
    model_dir, card = exported
    assert {p.name for p in model_dir.iterdir()} == {"model.onnx", "card.json", "class_iou.png", "curves.png",
                                                     "test_overlay.png"}
    assert hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest() == card["sha256"]
    assert card["task"] == "segmentation" and card["name"] == "tiny-segnet" and card["version"]
    assert card["labels"] == ["background"] + FASHION_MNIST_LABELS and len(card["palette"]) == 11
    assert card["architecture"]["stride"] == 4 and card["input"]["stride"] == 4
    assert card["input"]["dtype"] == "uint8" and card["input"]["shape"] == ["N", 1, "H", "W"]
    assert "crop" in card["input"]["fit"]["pad"]
    assert [o["name"] for o in card["outputs"]] == ["mask", "probabilities"]
    metrics = card["metrics"]
    assert metrics["scenes"] == 2000 and metrics["measured_by"].startswith("onnxruntime")
    assert set(metrics["per_class_iou"]) == set(card["labels"]) and 0 <= metrics["miou"] <= 1
    assert [(s["height"], s["width"]) for s in card["parity"]["sizes"]] == [(32, 32), (48, 80)]
    parity = card["parity"]
    assert parity["mask_agreement"] >= 0.999 and parity["widest_flipped_gap"] <= export_segmenter.NEAR_TIE
    assert parity["max_abs_probability_diff_same_switches"] <= 1e-4
    training = card["training"]
    assert training["seed"] == 1 and training["command"].endswith("--seed 1") and "--widths 8 16" in training["command"]
    assert training["data_files"] and training["hardware"] and training["wall_seconds"] > 0


def test_exported_graph_at_a_non_square_size(exported, dry_run, splits):
    model_dir, _ = exported
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (pixels,) = session.get_inputs()
    assert pixels.type == "tensor(uint8)" and [isinstance(d, int) for d in pixels.shape] == [False, True, False, False]
    images = make_scenes(splits[1], 3, seed=5, height=48, width=80).images.numpy()
    mask, probabilities = session.run(None, {"pixels": images})
    assert mask.dtype == np.uint8 and mask.shape == (3, 48, 80) and probabilities.shape == (3, 11, 48, 80)
    graph, _, _, _ = export_segmenter.load_run(dry_run)
    with torch.no_grad():
        want_mask, want_probabilities = graph(torch.from_numpy(images))
    assert np.mean(mask == want_mask.numpy()) >= 0.999
    np.testing.assert_allclose(probabilities, want_probabilities.numpy(), atol=1e-4)
    switches = export_segmenter.switches_session(graph, torch.from_numpy(images[:1]))
    report = export_segmenter.check_parity(graph, session, switches, [images], tolerance=1e-4)
    assert report["sizes"][0]["switch_windows"] > 0 and report["max_abs_probability_diff_same_switches"] <= 1e-4
    with pytest.raises(ParityError, match="disagrees"):
        export_segmenter.check_parity(graph, session, switches, [images], tolerance=-1.0)


def test_flip_tta_graph_averages_the_image_and_its_mirror(dry_run, splits):
    plain, _, _, _ = export_segmenter.load_run(dry_run)
    graph, _, _, _ = export_segmenter.load_run(dry_run, tta="flip")
    images = make_scenes(splits[1], 3, seed=6, height=48, width=80).images.numpy()
    example = torch.from_numpy(images[:2])
    session = export_segmenter.cpu_session(export_segmenter.export_graph(graph, example))
    mask, probabilities = session.run(None, {"pixels": images})
    with torch.no_grad():
        x = torch.from_numpy(images)
        want = (plain(x)[1] + plain(x.flip(3))[1].flip(3)) / 2
    # Not exact everywhere: where a 2x2 window's two largest values tie within float32 rounding the runtimes may
    # pick other max-unpool switches (0.24% of elements for this tiny model); the exact check, with both passes'
    # switches replayed, is check_parity's below.
    assert np.mean(np.isclose(probabilities, want.numpy(), atol=1e-4)) >= 0.99
    assert np.mean(mask == want.argmax(1).numpy()) >= 0.99
    assert not np.allclose(probabilities, plain(x)[1].detach().numpy(), atol=1e-3), "the mirror pass changes nothing"
    # Parity replays the switches of both passes: one set of outputs per stage per pass.
    switches = export_segmenter.switches_session(graph, example)
    assert len(switches.get_outputs()) == 2 * len(graph.model.encoder)
    report = export_segmenter.check_parity(graph, session, switches, [images], tolerance=1e-4)
    assert report["max_abs_probability_diff_same_switches"] <= 1e-4
    card = export_segmenter.main(export_segmenter.parse_args(
        ["--run", str(dry_run), "--name", "tiny-segnet-flip", "--tta", "flip", "--parity-scenes", "16", "--dry-run"]))
    assert "mirror" in card["input"]["test_time_augmentation"] and "mirror" in card["outputs"][1]["meaning"]
    with pytest.raises(ValueError, match="tta must be one of"):
        export_segmenter.load_run(dry_run, tta="flip-shift")


def test_independent_evaluation_agrees_with_the_card(exported):
    model_dir, card = exported
    result = evaluate_segmenter.evaluate_segmenter(model_dir)
    assert result["miou"] == pytest.approx(card["metrics"]["miou"], abs=1e-5)
    assert result["non_square_shapes_ok"] and result["mask_is_argmax"] and result["batch_independent"]
    assert 0.0 <= result["foreground_iou"] <= 1.0 and result["items"] > 0
    # An untrained dry-run model is below the floors (a broken model), and says so; nothing else is wrong with it.
    assert all("below the floor" in p for p in result["problems"]) and result["problems"]
    assert not result["release"]["above_floors"] and not card["release"]["above_floors"]
    assert [f["metric"] for f in card["release"]["figures"]] == ["miou", "pixel_accuracy", "foreground_iou"]
    assert card["release"]["figures"][0]["goal"] == 0.90 and card["release"]["figures"][0]["floor"] == 0.70


def test_run_diagnosis_agrees_with_the_exported_graph(exported, dry_run):
    _, card = exported
    diagnosis = evaluate_segmenter.diagnose_run(dry_run)
    # PyTorch on best.pt against onnxruntime on its export: masks agree on >= 99.9% of pixels.
    assert diagnosis["scenes"] == 2000 and diagnosis["epoch"] == card["training"]["best_epoch"]
    assert diagnosis["miou"] == pytest.approx(card["metrics"]["miou"], abs=2e-3)
    assert diagnosis["pixel_accuracy"] == pytest.approx(card["metrics"]["pixel_accuracy"], abs=1e-3)
    assert 0.0 <= diagnosis["majority_class_true_outline_miou"] <= 1.0


def test_two_stage_renames_each_region_with_the_classifier():
    """evaluate_segmenter --two-stage: every 8-connected garment region of a mask gets the class a released
    classifier gives the region alone (fitted like a Fashion-MNIST item); background stays background."""
    import onnxruntime as ort

    from training.data import load_dataset

    items = load_dataset("fashion-mnist", "test")
    canvas = np.zeros((1, 1, 64, 64), np.uint8)
    canvas[0, 0, 2:30, 2:30] = items.images[0, 0].numpy()     # two items far apart: two regions
    canvas[0, 0, 34:62, 34:62] = items.images[1, 0].numpy()
    predicted = np.where(canvas[:, 0] > 40, 5, 0).astype(np.uint8)  # outlines right, every name wrong (class 4)
    classifier = ort.InferenceSession("models/cnn/model.onnx", providers=["CPUExecutionProvider"])
    renamed, regions = evaluate_segmenter.two_stage_masks(canvas, predicted, classifier)
    assert regions == 2 and np.array_equal(renamed > 0, predicted > 0)
    labels = items.labels[:2].tolist()
    assert renamed[0, 15, 15] == labels[0] + 1 and renamed[0, 48, 48] == labels[1] + 1
    fitted = evaluate_segmenter.fit_component(canvas[0, 0], predicted[0] > 0)
    assert fitted.shape == (1, 28, 28) and fitted.dtype == np.uint8
