"""Fixed episode manifests: determinism, round trip, tamper and mismatch detection."""

import numpy as np
import pytest
import torch

from fewshot_nsl.episodes.manifest import Manifest, ManifestSpec, draw
from fewshot_nsl.errors import UserError
from tests.test_sampler import synthetic_set

SPEC = ManifestSpec("synthetic", "none", "test", ways=4, shots=2, queries=3, episodes=25, seed=5)


def test_draw_is_deterministic_and_named():
    dataset = synthetic_set()
    a, b = draw(SPEC, dataset), draw(SPEC, dataset)
    assert a.content_hash() == b.content_hash()
    assert a.classes.shape == (25, 4) and a.support.shape == (25, 4, 2) and a.query.shape == (25, 4, 3)
    assert draw(ManifestSpec(**{**SPEC.__dict__, "seed": 6}), dataset).content_hash() != a.content_hash()
    assert SPEC.name == "synthetic-none-test-4w2s3q-25e-v1"


def test_round_trip_is_compact_and_exact(tmp_path):
    manifest = draw(SPEC, synthetic_set())
    path = tmp_path / f"{SPEC.name}.npz"
    manifest.save(path)
    with np.load(path) as archive:
        assert archive["support"].dtype == np.uint8
    loaded = Manifest.load(path)
    assert loaded.content_hash() == manifest.content_hash()
    assert torch.equal(loaded.query, manifest.query) and loaded.spec == SPEC


def test_tampered_manifest_is_refused(tmp_path):
    manifest = draw(SPEC, synthetic_set())
    path = tmp_path / "m.npz"
    manifest.save(path)
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["query"] = arrays["query"].copy()
    arrays["query"][0, 0, 0] ^= 1
    np.savez_compressed(path, **arrays)
    with pytest.raises(UserError, match="altered"):
        Manifest.load(path)


def test_manifest_refuses_another_split():
    manifest = draw(SPEC, synthetic_set())
    manifest.check_dataset(synthetic_set())
    with pytest.raises(UserError, match="fingerprint"):
        manifest.check_dataset(synthetic_set(classes=13))


@pytest.mark.real_data
def test_shipped_manifests_match_real_data(real_omniglot_root, real_cache_dir, monkeypatch):
    """Every committed Omniglot manifest (5- and 20-way) is what a fresh seeded draw gives, and refuses the wrong split."""
    from fewshot_nsl.data.registry import load_split
    from fewshot_nsl.episodes.manifest import STANDARD_SPECS, manifest_path

    monkeypatch.setenv("FEWSHOT_NSL_CACHE", str(real_cache_dir))
    vinyals = load_split("omniglot", "test", "vinyals", real_omniglot_root)
    lake = load_split("omniglot", "test", "lake", real_omniglot_root)
    checked = 0
    for spec in STANDARD_SPECS:
        if spec.dataset != "omniglot":
            continue
        split = vinyals if spec.protocol == "vinyals" else lake
        stored = Manifest.load(manifest_path(spec))
        stored.check_dataset(split)
        assert stored.content_hash() == draw(spec, split).content_hash(), spec.name
        with pytest.raises(UserError, match="fingerprint"):
            stored.check_dataset(lake if split is vinyals else vinyals)
        checked += 1
    assert checked == 8


@pytest.mark.real_data
def test_shipped_miniimagenet_manifests_match_real_data(real_miniimagenet_root, real_cache_dir, monkeypatch):
    """The 600-episode files and the 10,000-episode pins both give what a fresh seeded draw gives."""
    from fewshot_nsl.data.registry import load_split
    from fewshot_nsl.episodes.manifest import STANDARD_SPECS, manifest_path, pin_path, stored_manifest

    monkeypatch.setenv("FEWSHOT_NSL_CACHE", str(real_cache_dir))
    test = load_split("miniimagenet", "test", "ravi", real_miniimagenet_root)
    specs = [spec for spec in STANDARD_SPECS if spec.dataset == "miniimagenet"]
    assert sorted((s.shots, s.episodes) for s in specs) == [(1, 600), (1, 10000), (5, 600), (5, 10000)]
    for spec in specs:
        committed = manifest_path(spec) if spec.episodes == 600 else pin_path(spec)
        assert committed.exists(), committed
        stored = stored_manifest(spec, test)
        stored.check_dataset(test)
        assert len(stored) == spec.episodes
        assert stored.content_hash() == draw(spec, test).content_hash(), spec.name


def test_the_standard_specs_are_the_committed_manifests_and_follow_the_registry(monkeypatch):
    """STANDARD_SPECS is built from ``data.registry``; it must still name exactly the committed files."""
    from fewshot_nsl.data.registry import DATASETS
    from fewshot_nsl.episodes.manifest import EPISODES_ENV, PIN_ABOVE_EPISODES, STANDARD_SPECS, episodes_dir, manifest_path, pin_path

    monkeypatch.delenv(EPISODES_ENV, raising=False)
    expected = {(manifest_path(s) if s.episodes <= PIN_ABOVE_EPISODES else pin_path(s)).name for s in STANDARD_SPECS}
    assert expected == {p.name for p in episodes_dir().iterdir()} and len(STANDARD_SPECS) == 12
    for spec in STANDARD_SPECS:
        protocol = DATASETS[spec.dataset]
        assert spec.protocol in protocol.protocols and spec.queries == protocol.eval_queries
        assert protocol.eval_ways in {s.ways for s in STANDARD_SPECS if s.dataset == spec.dataset}
        assert protocol.eval_episodes in {s.episodes for s in STANDARD_SPECS if s.dataset == spec.dataset}


def test_large_manifests_are_pinned_and_a_changed_draw_is_refused(tmp_path):
    """Above PIN_ABOVE_EPISODES only spec, fingerprint and hash are written; a redraw must reproduce the hash."""
    import json

    from fewshot_nsl.episodes.manifest import PIN_ABOVE_EPISODES, manifest_path, pin_path, save_standard, stored_manifest

    dataset = synthetic_set()
    small = ManifestSpec("synthetic", "none", "test", 5, 1, 2, PIN_ABOVE_EPISODES)
    large = ManifestSpec("synthetic", "none", "test", 5, 1, 2, PIN_ABOVE_EPISODES + 1)
    assert save_standard(draw(small, dataset), tmp_path) == manifest_path(small, tmp_path)
    assert save_standard(draw(large, dataset), tmp_path) == pin_path(large, tmp_path)
    assert not manifest_path(large, tmp_path).exists()
    restored = stored_manifest(large, dataset, tmp_path)
    assert restored.content_hash() == draw(large, dataset).content_hash() and len(restored) == PIN_ABOVE_EPISODES + 1
    assert stored_manifest(ManifestSpec("synthetic", "none", "test", 5, 1, 3, 5000), dataset, tmp_path) is None

    pin = json.loads(pin_path(large, tmp_path).read_text())
    pin_path(large, tmp_path).write_text(json.dumps(pin | {"hash": "0" * 16}))
    with pytest.raises(UserError, match="no longer gives the pinned episodes"):
        stored_manifest(large, dataset, tmp_path)
    pin_path(large, tmp_path).write_text(json.dumps(pin))
    with pytest.raises(UserError, match="fingerprint"):
        stored_manifest(large, synthetic_set(classes=13), tmp_path)


@pytest.mark.real_data
def test_vinyals_characters_and_ravi_classes_are_disjoint(real_omniglot_root, real_miniimagenet_root, real_cache_dir, monkeypatch):
    """No character (any rotation) or Mini-ImageNet class is in two splits: nothing leaks into evaluation."""
    from fewshot_nsl.data.registry import load_split

    monkeypatch.setenv("FEWSHOT_NSL_CACHE", str(real_cache_dir))
    characters = {
        split: {name.rsplit("/", 1)[0] for name in load_split("omniglot", split, "vinyals", real_omniglot_root).class_names}
        for split in ("train", "val", "test")
    }
    assert [len(c) for c in characters.values()] == [1028, 172, 423]  # Vinyals et al.'s 1200 + 423 characters
    csvs = real_miniimagenet_root / "miniimagenet" / "splits" / "ravi"
    classes = {split: {row.split(",")[1] for row in (csvs / f"{split}.csv").read_text().splitlines()[1:]} for split in ("train", "val", "test")}
    assert [len(c) for c in classes.values()] == [64, 16, 20]
    for kind in (characters, classes):
        names = list(kind)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                assert not kind[first] & kind[second], f"{first} and {second} share {sorted(kind[first] & kind[second])[:3]}"
