import csv
import json
import re

import numpy as np
import pytest
import torch

from _audio_corpus import EMOTIONS, PROBLEMS, csv_corpus, folder_corpus, write_good
from advanced_training_utils.app.audio import (
    AudioError,
    AudioFolderDataset,
    CsvAudioDataset,
    LogMel,
    load_audio,
    load_audio_splits,
)
from advanced_training_utils.app.audio.normalize import dataset_stats


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def _speakers(ds):
    return {re.search(r"spk\d+", p).group(0) for p in ds.paths}


def _rows(csv_path):
    with open(csv_path) as f:
        return list(csv.DictReader(f))


def _assert_skipped_report(summary, bad):
    reported = {s["path"]: s["problem"] for s in summary["skipped"]}
    for kind, path in bad.items():
        assert re.search(PROBLEMS[kind], reported[str(path)]), (kind, reported[str(path)])
    assert summary["n_skipped"] == len(summary["skipped"]) == len(reported)


def test_csv_grouped_80_10_10_with_broken_files(tmp_path, cache):
    csv_path, bad = csv_corpus(tmp_path / "c", speakers=10)
    train, val, test, summary = CsvAudioDataset.from_csv(
        csv_path, target="emotion", group_column="speaker", cache_dir=cache)
    assert isinstance(train, CsvAudioDataset)
    assert summary["task"] == "classification" and summary["class_names"] == sorted(EMOTIONS)
    assert train.class_names == sorted(EMOTIONS)
    # every broken file, and the missing one, reported by name with its problem
    _assert_skipped_report(summary, bad)
    assert str(tmp_path / "c" / "wav" / "bad" / "missing.wav") in {
        s["path"] for s in summary["skipped"]}
    assert summary["n_skipped"] == len(bad) + 1
    # grouped: no speaker in two splits; all 60 good clips used
    s_tr, s_va, s_te = _speakers(train), _speakers(val), _speakers(test)
    assert not (s_tr & s_va or s_tr & s_te or s_va & s_te)
    sizes = summary["split_sizes"]
    assert sizes == {"train": len(train), "val": len(val), "test": len(test)}
    assert sum(sizes.values()) == 60 and sizes["val"] > 0 and sizes["test"] > 0
    # labels follow the CSV through the mapping
    label_of = {str(tmp_path / "c" / r["path"]): r["emotion"] for r in _rows(csv_path)}
    for ds in (train, val, test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (1, 64, summary["crop_frames"]) and x.dtype == torch.float32
            assert y.dtype == torch.int64 and ds.class_names[int(y)] == label_of[ds.paths[i]]
    json.dumps(summary)                                            # goes into summary.json


def test_same_seed_same_split_and_second_build_hits_the_cache(tmp_path, cache):
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=8)
    first = CsvAudioDataset.from_csv(csv_path, "emotion", group_column="speaker", cache_dir=cache)
    again = CsvAudioDataset.from_csv(csv_path, "emotion", group_column="speaker", cache_dir=cache)
    for a, b in zip(first[:3], again[:3]):
        assert a.paths == b.paths
        assert all(torch.equal(x, y) for x, y in zip(a.features, b.features))
    good = sum(first.summary["split_sizes"].values())
    assert first.summary["cache"]["misses"] >= good and first.summary["cache"]["hits"] == 0
    assert again.summary["cache"]["hits"] == good                  # broken files never cached
    other = CsvAudioDataset.from_csv(csv_path, "emotion", group_column="speaker",
                                     cache_dir=cache, split_seed=99)
    assert other.train.paths != first.train.paths


def test_csv_without_group_column_splits_files(tmp_path, cache):
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=4, broken=False)
    train, val, test, summary = CsvAudioDataset.from_csv(csv_path, "emotion", cache_dir=cache)
    assert (len(train), len(val), len(test)) == (19, 3, 2)          # 80/10/10 of 24 files
    assert "grouped 80%/10%/10%" in summary["split_rule"]


def test_split_column_train_test_carves_val_from_train_by_group(tmp_path, cache):
    split_of = {f"spk{s}": ("test" if s in (0, 1) else "train") for s in range(10)}
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=10, split_of=split_of.get)
    train, val, test, summary = CsvAudioDataset.from_csv(
        csv_path, "emotion", split_column="split", group_column="speaker", cache_dir=cache)
    assert _speakers(test) == {"spk0", "spk1"}                     # as given
    assert val and _speakers(val) <= {f"spk{s}" for s in range(2, 10)}
    assert not _speakers(train) & _speakers(val)
    assert "val carved from train" in summary["split_rule"]
    assert len(val) == 6                                           # one speaker: ~10 % of 48


def test_split_column_with_all_three_is_used_as_given(tmp_path, cache):
    names = {0: "val", 1: "test", 2: "Validation"}
    split_of = {f"spk{s}": names.get(s, "train") for s in range(6)}
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=6, broken=False, split_of=split_of.get)
    train, val, test, summary = CsvAudioDataset.from_csv(
        csv_path, "emotion", split_column="split", cache_dir=cache)
    assert (_speakers(train), _speakers(val), _speakers(test)) == (
        {"spk3", "spk4", "spk5"}, {"spk0", "spk2"}, {"spk1"})
    assert summary["split_rule"] == "as given"


def test_split_column_train_val_only_gives_no_test(tmp_path, cache):
    split_of = {f"spk{s}": ("val" if s == 0 else "train") for s in range(3)}
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=3, broken=False, split_of=split_of.get)
    train, val, test, summary = CsvAudioDataset.from_csv(
        csv_path, "emotion", split_column="split", cache_dir=cache)
    assert test is None and summary["split_sizes"] == {"train": 12, "val": 6}


def test_regression_targets(tmp_path, cache):
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=4, broken=False)
    train, val, test, summary = CsvAudioDataset.from_csv(
        csv_path, "valence,arousal", group_column="speaker", cache_dir=cache)
    assert summary["task"] == "regression" and summary["class_names"] is None
    assert summary["target_names"] == ["valence", "arousal"]
    rows = {str(tmp_path / "c" / r["path"]): r for r in _rows(csv_path)}
    for i in range(len(train)):
        _, y = train[i]
        r = rows[train.paths[i]]
        assert y.dtype == torch.float32 and y.shape == (2,)
        assert y.tolist() == pytest.approx([float(r["valence"]), float(r["arousal"])])


def test_on_error_raise_names_the_first_broken_file(tmp_path, cache):
    csv_path, bad = csv_corpus(tmp_path / "c", speakers=6)
    with pytest.raises(AudioError, match=re.escape(str(bad["truncated_header"]))):
        CsvAudioDataset.from_csv(csv_path, "emotion", on_error="raise", cache_dir=cache)


def test_folder_layout_classes_groups_and_broken_files(tmp_path, cache):
    root, bad = folder_corpus(tmp_path / "f", speakers=10)

    def speaker(path):
        m = re.match(r"spk\d+", path.name)
        return m.group(0) if m else path.name

    train, val, test, summary = AudioFolderDataset.from_folder(root, group_fn=speaker,
                                                               cache_dir=cache)
    assert isinstance(train, AudioFolderDataset)
    assert summary["class_names"] == sorted(EMOTIONS) and summary["layout"] == "folder"
    _assert_skipped_report(summary, bad)
    assert summary["n_skipped"] == len(bad)                        # notes.txt ignored
    assert sum(summary["split_sizes"].values()) == 60
    assert not (_speakers(train) & _speakers(val) or _speakers(train) & _speakers(test)
                or _speakers(val) & _speakers(test))
    for ds in (train, val, test):
        for i in range(len(ds)):
            assert ds.class_names[int(ds[i][1])] == ds.paths[i].split("/")[-2]


def test_folder_layout_with_split_folders(tmp_path, cache):
    root, _ = folder_corpus(tmp_path / "f", speakers=5, broken=False,
                            splits=lambda s: "test" if s == 4 else "train")
    train, val, test, summary = load_audio_splits(root, cache_dir=cache)
    assert all("/test/" in p for p in test.paths) and len(test) == 6
    assert all("/train/" in p for p in train.paths + val.paths) and len(val) > 0
    assert "val carved from train" in summary["split_rule"]


def test_crops_train_random_per_epoch_eval_centre(tmp_path, cache):
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=4, broken=False)
    opts = dict(group_column="speaker", cache_dir=cache, crop_seconds=0.3)
    train, val, _, summary = CsvAudioDataset.from_csv(
        csv_path, "emotion", generator=torch.Generator().manual_seed(5), **opts)
    assert summary["crop_frames"] == 1 + 4800 // 160 and summary["crop_rule"] == "given"
    epoch0 = [train[i][0] for i in range(len(train))]
    assert all(torch.equal(a, train[i][0]) for i, a in enumerate(epoch0))   # repeatable
    train.set_epoch(1)
    assert not all(torch.equal(a, train[i][0]) for i, a in enumerate(epoch0))
    same = CsvAudioDataset.from_csv(csv_path, "emotion",
                                    generator=torch.Generator().manual_seed(5), **opts).train
    same.set_epoch(1)
    assert all(torch.equal(train[i][0], same[i][0]) for i in range(len(train)))
    val.set_epoch(3)                                               # eval windows never move
    crop = summary["crop_frames"]
    for i, full in enumerate(val.features):                        # [64, F] centre window
        start = (full.shape[-1] - crop) // 2
        assert full.shape[-1] > crop + 1 and torch.equal(val[i][0][0], full[:, start:start + crop])


def test_default_crop_from_durations_and_whole_clip_eval(tmp_path, cache):
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=4, broken=False)
    train, val, _, summary = CsvAudioDataset.from_csv(
        csv_path, "emotion", group_column="speaker", cache_dir=cache, eval_crop="whole")
    p90 = np.percentile([f.shape[-1] for f in train.features], 90) * 160 / 16000
    assert summary["crop_seconds"] == pytest.approx(np.ceil(p90 * 10 - 1e-6) / 10, abs=0.11)
    assert summary["train_durations_s"]["p90"] == pytest.approx(summary["crop_seconds"], abs=0.11)
    lengths = {val[i][0].shape[-1] for i in range(len(val))}
    assert lengths == {f.shape[-1] for f in val.features} and len(lengths) > 1
    x, y = val.collate([val[i] for i in range(len(val))])
    assert x.shape == (len(val), 1, 64, max(lengths)) and y.shape == (len(val),)
    loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=True)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 1, 64, summary["crop_frames"]) and yb.dtype == torch.int64


@pytest.mark.parametrize("mode", ["utterance", "dataset", "none"])
def test_normalisation_modes(tmp_path, cache, mode):
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=4, broken=False)
    train, val, _, summary = CsvAudioDataset.from_csv(
        csv_path, "emotion", group_column="speaker", cache_dir=cache, normalization=mode)
    raw = CsvAudioDataset.from_csv(csv_path, "emotion", group_column="speaker",
                                   cache_dir=cache, normalization="none")
    assert summary["normalization"] == mode
    f, r = train.features[0], raw.train.features[0]
    if mode == "utterance":
        torch.testing.assert_close(f.mean(1), torch.zeros(64), atol=1e-4, rtol=0)
    elif mode == "dataset":
        mean, std = dataset_stats(raw.train.features)
        assert torch.equal(train.norm_stats[0], mean) and val.norm_stats is train.norm_stats
        torch.testing.assert_close(f, (r - mean) / std.clamp(min=1e-3))
        torch.testing.assert_close(torch.cat(train.features, 1).mean(1), torch.zeros(64),
                                   atol=1e-3, rtol=0)
    else:
        assert torch.equal(f, r) and train.pad_value == pytest.approx(np.log(1e-6))


def test_features_equal_logmel_of_the_decoded_clip(tmp_path, cache):
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=3, broken=False)
    lm = LogMel(n_mels=40, f_max=None)
    train, *_ = CsvAudioDataset.from_csv(csv_path, "emotion", cache_dir=cache, features=lm,
                                         normalization="none")
    expected = lm(torch.from_numpy(load_audio(train.paths[0], 16000)))
    assert torch.equal(train.features[0], expected) and expected.shape[0] == 40


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(target="mood"), ValueError, r"target 'mood': column 'mood' not in .*columns: \['path'"),
    (dict(target="emotion", group_column="spk"), ValueError, r"group_column: column 'spk' not in"),
    (dict(target="emotion", normalization="global"), ValueError,
     r"normalization must be one of 'utterance', 'dataset', 'none'; got 'global'"),
    (dict(target="emotion", on_error="ignore"), ValueError, r"on_error must be one of"),
    (dict(target="emotion", crop_secs=2.0), TypeError, r"unexpected keyword argument 'crop_secs'"),
    (dict(target="emotion,valence"), ValueError, r"classification needs exactly one target"),
])
def test_csv_argument_errors(tmp_path, cache, kwargs, exc, match):
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=2, per_class=1, broken=False)
    with pytest.raises(exc, match=match):
        CsvAudioDataset.from_csv(csv_path, cache_dir=cache, **kwargs)


def test_bad_split_value_and_missing_train(tmp_path, cache):
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=2, per_class=1, broken=False,
                             split_of=lambda s: "holdout")
    with pytest.raises(ValueError, match=r"split column, data row 1: 'holdout' is not a split"):
        CsvAudioDataset.from_csv(csv_path, "emotion", split_column="split", cache_dir=cache)
    csv_path, _ = csv_corpus(tmp_path / "d", speakers=2, per_class=1, broken=False,
                             split_of=lambda s: "test")
    with pytest.raises(ValueError, match=r"assigns no clip to train \(found \['test'\]\)"):
        CsvAudioDataset.from_csv(csv_path, "emotion", split_column="split", cache_dir=cache)


def test_too_few_groups_for_a_val_split(tmp_path, cache):
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=1, per_class=1, broken=False)
    with pytest.raises(ValueError, match=r"no clip lands in val \(3 clips in 1 groups\)"):
        CsvAudioDataset.from_csv(csv_path, "emotion", group_column="speaker", cache_dir=cache)


def test_all_training_files_broken(tmp_path, cache):
    root = tmp_path / "c"
    write_good(root / "ok.wav", 0)
    (root / "bad.wav").write_bytes(b"RIFF")
    (root / "labels.csv").write_text("path,y,split\nbad.wav,a,train\nok.wav,b,val\n")
    with pytest.raises(ValueError, match=r"every training file was skipped.*bad.wav"):
        CsvAudioDataset.from_csv(root / "labels.csv", "y", split_column="split", cache_dir=cache)


def test_load_audio_splits_dispatch_errors(tmp_path, cache):
    root, _ = folder_corpus(tmp_path / "f", speakers=3, per_class=1, broken=False)
    with pytest.raises(ValueError, match=r"is a folder .*\['target'\] apply to a labels CSV"):
        load_audio_splits(root, target="emotion")
    csv_path, _ = csv_corpus(tmp_path / "c", speakers=2, per_class=1, broken=False)
    with pytest.raises(ValueError, match="is a CSV: target must name"):
        load_audio_splits(csv_path)
    with pytest.raises(ValueError, match=r"labels \.csv file or a folder.*\(not found\)"):
        load_audio_splits(tmp_path / "nothing.txt")
    with pytest.raises(ValueError, match="task must be 'classification' for a folder"):
        AudioFolderDataset.from_folder(root, task="regression", cache_dir=cache)
    got = load_audio_splits(csv_path, "emotion", cache_dir=cache)
    assert isinstance(got.train, CsvAudioDataset)


def test_allow_silent_is_part_of_the_cache_key(tmp_path, cache):
    csv_path, bad = csv_corpus(tmp_path / "c", speakers=6)
    kept = CsvAudioDataset.from_csv(csv_path, "emotion", cache_dir=cache, allow_silent=True)
    assert str(bad["silent"]) not in {s["path"] for s in kept.summary["skipped"]}
    strict = CsvAudioDataset.from_csv(csv_path, "emotion", cache_dir=cache)
    assert str(bad["silent"]) in {s["path"] for s in strict.summary["skipped"]}
