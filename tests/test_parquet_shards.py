"""Parquet image shards (issue 23): written by convert and by Hugging Face `datasets`, read by train and score,
in an order that is a pure function of (seed, epoch), with bad shards named."""

from __future__ import annotations

import io
import json
import os

import datasets  # a dev dependency (pyproject.toml)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import SHARED_FIXTURES, write_image_folder
from train_pytorch_model.cli import main
from train_pytorch_model.convert import shrink
from train_pytorch_model.data import BadImageTracker, build_dataset, evaluation_loader, training_loader
from train_pytorch_model.errors import InvalidDatasetError
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.preprocessing import Preprocessing
from train_pytorch_model.shard_data import ShardBatchSampler, shuffle_buffer, stream_segments
from train_pytorch_model.shards import HF_METADATA_KEY, shard_schema

CPU = torch.device("cpu")
CLASSES = {"ant": 7, "bee": 6, "cat": 7}
FAST = ["--image-size", "32", "--num-workers", "0", "--batch-size", "4", "--epochs", "1"]


def png(color, size=(24, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def hf_dataset(rows: int, names=("cat", "dog"), seed: int = 0):
    """A `datasets` Dataset with Image and ClassLabel features, images that encode their class."""
    rng = np.random.default_rng(seed)
    labels = [i % len(names) for i in range(rows)]
    images = [{"bytes": png((200 * (label == 0), int(rng.integers(0, 60)), 200 * (label == 1))), "path": f"{i}.png"}
              for i, label in enumerate(labels)]
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"img": images, "fine_label": labels}, features=features)


def hub_layout(folder, dataset, shards: int, split="train"):
    """The layout of a Hub download: data/<split>-0000k-of-0000n.parquet, written by datasets itself."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        dataset.shard(shards, k, contiguous=True).to_parquet(
            str(folder / "data" / f"{split}-{k:05d}-of-{shards:05d}.parquet"), batch_size=5)
    return folder


@pytest.fixture
def shards(tmp_path):
    folder = write_image_folder(tmp_path / "folder", CLASSES, size=(40, 36))
    assert main(["convert", "--input", str(folder), "--image-directory", str(tmp_path / "shards"), "--to", "parquet",
                 "--shard-rows", "8"]) == 0
    return tmp_path / "shards"


# --- writing ------------------------------------------------------------------------------------------------


def test_convert_writes_shards_datasets_loads_with_image_and_classlabel(tmp_path, shards):
    files = sorted((shards / "data").iterdir())
    assert [f.name for f in files] == [f"train-0000{k}-of-00003.parquet" for k in range(3)]  # 20 rows, 8 a shard
    loaded = datasets.Dataset.from_parquet([str(f) for f in files])
    assert loaded.features["image"] == datasets.Image()
    assert loaded.features["label"] == datasets.ClassLabel(names=sorted(CLASSES))
    assert len(loaded) == sum(CLASSES.values())
    # The bytes are the files' own (no re-encode), in ImageFolder order, with their labels.
    first = loaded.cast_column("image", datasets.Image(decode=False))[0]
    assert first["image"]["bytes"] == (tmp_path / "folder" / "ant" / "0.png").read_bytes()
    assert loaded[0]["label"] == 0 and loaded[len(loaded) - 1]["label"] == 2
    assert loaded[0]["image"].size == (40, 36)


def test_max_side_shrinks_only_larger_images_keeping_the_aspect(tmp_path):
    folder = tmp_path / "photos" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (300, 150), (10, 120, 200)).save(folder / "big.jpg", quality=90)
    Image.new("RGB", (60, 40), (10, 120, 200)).save(folder / "small.png")
    (tmp_path / "photos" / "b").mkdir()
    Image.new("RGB", (90, 200), (200, 0, 0)).save(tmp_path / "photos" / "b" / "tall.png")
    assert main(["convert", "--input", str(tmp_path / "photos"), "--image-directory", str(tmp_path / "out"),
                 "--to", "parquet", "--max-side", "100"]) == 0
    table = pq.read_table(next((tmp_path / "out" / "data").glob("*.parquet")))
    rows = {row["image"]["path"]: row["image"]["bytes"] for row in table.to_pylist()}
    assert set(rows) == {"a/big.jpg", "a/small.png", "b/tall.jpg"}  # a re-encoded image is named .jpg
    assert rows["a/small.png"] == (folder / "small.png").read_bytes()  # not larger: kept as it came
    assert Image.open(io.BytesIO(rows["a/big.jpg"])).size == (100, 50)
    tall = Image.open(io.BytesIO(rows["b/tall.jpg"]))
    assert tall.size == (45, 100) and tall.format == "JPEG"


def test_shrink_applies_exif_orientation_before_resizing():
    image = Image.new("RGB", (200, 100), (0, 90, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    data, reencoded = shrink(buffer.getvalue(), 50)
    assert reencoded and Image.open(io.BytesIO(data)).size == (25, 50)


def test_shard_writer_bounds_row_groups_and_schema_is_datasets_layout(shards):
    parquet = pq.ParquetFile(next((shards / "data").glob("train-00000-*.parquet")))
    assert parquet.metadata.num_rows == 8
    features = json.loads(parquet.schema_arrow.metadata[HF_METADATA_KEY])["info"]["features"]
    assert features == {"image": {"_type": "Image"}, "label": {"names": sorted(CLASSES), "_type": "ClassLabel"}}
    assert shard_schema(None).names == ["image"]  # unlabeled images: no label column


def test_convert_to_parquet_refuses_a_non_empty_output(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "folder", {"a": 2, "b": 2})
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["convert", "--input", str(folder), "--image-directory", str(out), "--to", "parquet"]) != 0
    assert (out / "mine.txt").read_text() == "keep" and sorted(os.listdir(out)) == ["mine.txt"]
    assert "OutputDirectoryError" in capsys.readouterr().err


# --- reading ------------------------------------------------------------------------------------------------


def test_a_hub_download_of_several_splits_trains_and_scores(tmp_path):
    hub = tmp_path / "hub"
    hub_layout(hub, hf_dataset(24), shards=3)
    hub_layout(hub, hf_dataset(10, seed=1), shards=1, split="validation")
    train = load_image_directory(hub, "Training")
    valid = load_image_directory(hub, "Validation")
    assert (train.layout, len(train), train.categories, len(train.shards.files)) == ("parquet", 24, ["cat", "dog"], 3)
    assert len(valid) == 10 and valid.files[3] == "data/validation-00000-of-00001.parquet row 3"
    out = tmp_path / "trained"
    assert main(["train", "--untrained-model", str(resnet18()), "--training-data", str(hub),
                 "--validation-data", str(hub), "--trained-model", str(out), "--image-column", "img", *FAST]) == 0
    info = json.loads((out / "training_info.json").read_text())
    assert info["classes"] == ["cat", "dog"] and info["training"]["training_images"] == 24
    scored = tmp_path / "scored"
    assert main(["score", "--trained-model", str(out), "--image-directory", str(hub / "data"),
                 "--scored-data", str(scored), "--num-workers", "0"]) == 1  # several splits: name one
    assert main(["score", "--trained-model", str(out), "--image-directory",
                 str(hub / "data" / "validation-00000-of-00001.parquet"), "--scored-data", str(scored),
                 "--num-workers", "0"]) == 0
    table = pq.read_table(scored / "scored.parquet").to_pandas()
    assert list(table["file"])[:2] == ["validation-00000-of-00001.parquet row 0",
                                       "validation-00000-of-00001.parquet row 1"]
    assert (table["error"] == "").all() and set(table["category"]) == {"cat", "dog"}


def resnet18():
    return SHARED_FIXTURES / "legacy_untrained_model" / "resnet18"


def test_a_parquet_table_of_paths_is_still_a_table(tmp_path):
    folder = write_image_folder(tmp_path / "t", {"a": 2, "b": 2})
    pq.write_table(pa.table({"image_path": ["a/0.png", "a/1.png", "b/0.png", "b/1.png"],
                             "label": ["a", "a", "b", "b"]}), folder / "index.parquet")
    directory = load_image_directory(folder / "index.parquet", "Training")
    assert directory.layout == "table" and directory.shards is None and directory.files[0] == "a/0.png"


# --- the order ----------------------------------------------------------------------------------------------


def order_of(directory, *, seed=5, epoch=0, rank=0, world_size=1, workers=0, batch=4, train=True):
    prep = Preprocessing(image_size=32, augmentation="none")
    dataset = build_dataset(directory, {c: i for i, c in enumerate(directory.categories)}, prep, train=train,
                            seed=seed)
    make = training_loader if train else evaluation_loader
    extra = {"seed": seed} if train else {}
    loader = make(dataset, batch_size=batch, rank=rank, world_size=world_size, num_workers=workers, device=CPU,
                  **extra)
    loader.sampler.set_epoch(epoch)
    # The rows each key's batch holds, asked of the dataset in this process.
    return [item[2] for key in loader.sampler for item in loader.dataset[key]], loader


def test_training_order_is_a_function_of_seed_and_epoch_and_ranks_read_disjoint_rows(shards):
    directory = load_image_directory(shards, "Training")
    first, loader = order_of(directory)
    assert len(first) == 20 and len(loader) == 5 and sorted(first) == list(range(20))
    assert order_of(directory)[0] == first  # same seed, same epoch: the same rows in the same order
    assert order_of(directory, epoch=1)[0] != first and order_of(directory, seed=6)[0] != first
    rank0, rank1 = order_of(directory, world_size=2)[0], order_of(directory, rank=1, world_size=2)[0]
    assert len(rank0) == len(rank1) == 8 and not set(rank0) & set(rank1)  # equal whole batches, disjoint


def test_worker_processes_deliver_exactly_the_batches_of_the_keys(shards):
    directory = load_image_directory(shards, "Training")
    rows, loader = order_of(directory, workers=2, epoch=2)
    # 2 streams x 2 whole batches: 16 distinct rows (the rest, under a batch a stream, waits for another epoch)
    assert len(set(rows)) == len(rows) == 16 and len(loader) == 4
    expected = [torch.stack([item[0] for item in loader.dataset[key]]) for key in loader.sampler]
    delivered = [batch.images for batch in loader]  # by two worker processes, each with its own stream
    assert len(delivered) == 4 and all(torch.equal(a, b) for a, b in zip(delivered, expected))


def test_validation_reads_every_row_exactly_once_over_ranks_and_workers(shards):
    directory = load_image_directory(shards, "Validation")
    seen = []
    for rank in range(3):
        rows, _ = order_of(directory, rank=rank, world_size=3, workers=2, train=False, batch=3)
        seen += rows
    assert sorted(seen) == list(range(20))


def test_streams_read_contiguous_runs_of_shuffled_row_groups(shards):
    directory = load_image_directory(shards, "Training")
    index = directory.shards
    runs = [stream_segments(index, seed=1, epoch=0, stream=s, streams=2, batch_size=4, train=True) for s in range(2)]
    groups = [[g for g, _, _ in run] for run in runs]
    shared = set(groups[0]) & set(groups[1])
    assert len(shared) <= 1  # neighbours share at most the row group at their boundary
    assert sum(end - start for run in runs for _, start, end in run) == 16  # 2 streams x 2 batches x 4


def test_shuffle_buffer_is_bounded_and_keeps_every_row():
    rows = [(i, b"x" * 10) for i in range(100)]
    out = list(shuffle_buffer(iter(rows), np.random.default_rng(0), max_rows=8))
    assert sorted(r for r, _ in out) == list(range(100)) and [r for r, _ in out] != list(range(100))
    # A row leaves the buffer at most 8 rows after its successor entered: no row travels far forward.
    assert all(position >= row - 8 for position, (row, _) in enumerate(out))


def test_sampler_keys_carry_the_epoch_and_pad_short_streams():
    sampler = ShardBatchSampler([2, 1])
    sampler.set_epoch(3)
    assert list(sampler) == [(3, 0, 0), (3, 1, 0), (3, 0, 1), (3, 1, None)] and len(sampler) == 4


# --- bad shards ---------------------------------------------------------------------------------------------


def write_shard(path, images, labels=None, names=("cat", "dog"), image_type=None, row_group_size=None):
    """A shard in datasets' layout from raw values (so that it can hold what datasets would refuse)."""
    schema = shard_schema(list(names) if names is not None else None)
    columns = {"image": pa.array(images, image_type or schema.field("image").type)}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    table = pa.table(columns).replace_schema_metadata(schema.metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def good_rows(count):
    return [{"bytes": png((200 * (i % 2), 40, 0)), "path": f"{i}.png"} for i in range(count)]


def test_a_truncated_shard_is_named(tmp_path):
    write_shard(tmp_path / "s" / "train-00000-of-00002.parquet", good_rows(4), [0, 1, 0, 1])
    bad = write_shard(tmp_path / "s" / "train-00001-of-00002.parquet", good_rows(4), [0, 1, 0, 1])
    bad.write_bytes(bad.read_bytes()[:-30])
    with pytest.raises(InvalidDatasetError, match=r"shard 'train-00001-of-00002.parquet' cannot be read as Parquet"):
        load_image_directory(tmp_path / "s", "Training")


def test_a_non_parquet_file_among_shards_is_named(tmp_path):
    write_shard(tmp_path / "s" / "train-00000-of-00002.parquet", good_rows(4), [0, 1, 0, 1])
    (tmp_path / "s" / "train-00001-of-00002.parquet").write_text("id,label\n1,cat\n")
    with pytest.raises(InvalidDatasetError, match=r"'train-00001-of-00002.parquet' cannot be read as Parquet.*"
                                                  r"truncated or not a Parquet file"):
        load_image_directory(tmp_path / "s", "Training")


def test_a_missing_or_wrong_typed_column_is_named(tmp_path):
    write_shard(tmp_path / "a" / "x.parquet", good_rows(4), [0, 1, 0, 1])
    with pytest.raises(InvalidDatasetError, match=r"has no label column 'kind'"):
        load_image_directory(tmp_path / "a", "Training", label_column="kind")
    # A second shard without the label column the first one has.
    write_shard(tmp_path / "b" / "train-00000-of-00002.parquet", good_rows(2), [0, 1])
    write_shard(tmp_path / "b" / "train-00001-of-00002.parquet", good_rows(2), None, names=None)
    with pytest.raises(InvalidDatasetError, match=r"'train-00001-of-00002.parquet' has no column 'label'"):
        load_image_directory(tmp_path / "b", "Training")
    # A float label column.
    table = pa.table({"image": pa.array(good_rows(2), shard_schema(None).field("image").type),
                      "label": pa.array([0.5, 1.5])})
    (tmp_path / "c").mkdir()
    pq.write_table(table, tmp_path / "c" / "x.parquet")
    with pytest.raises(InvalidDatasetError, match=r"label column 'label' is double"):
        load_image_directory(tmp_path / "c", "Training")


def test_a_label_outside_the_classlabel_names_is_named_by_row(tmp_path):
    write_shard(tmp_path / "s" / "x.parquet", good_rows(5), [0, 1, 0, 7, 1])
    with pytest.raises(InvalidDatasetError, match=r"shard 'x.parquet' row 3: label 7 is not a class id .*0 to 1"):
        load_image_directory(tmp_path / "s", "Training")


def test_labels_without_classlabel_stop_at_the_class_limit(tmp_path, monkeypatch):
    import train_pytorch_model.shards as shards_module

    monkeypatch.setattr(shards_module, "MAX_CLASSES", 3)
    image_type = shard_schema(None).field("image").type
    for name, labels in (("ints", [5, 6, 5, 7, 6, 8, 9]), ("text", ["a", "b", "a", "c", "b", "d", "e"]),
                         ("lists", [[5], [6, 5], [7], [6, 8], [9], [5], [5]])):
        (tmp_path / name).mkdir()
        pq.write_table(pa.table({"image": pa.array(good_rows(7), image_type), "label": pa.array(labels)}),
                       tmp_path / name / "x.parquet")
        with pytest.raises(InvalidDatasetError, match=r"shard 'x.parquet' row [35]: label .* is class number 4; "
                                                      r"at most 3 classes are allowed"):
            load_image_directory(tmp_path / name, "Training")
    # Up to the limit: read as before.
    pq.write_table(pa.table({"image": pa.array(good_rows(4), image_type), "label": pa.array([7, 5, 6, 5])}),
                   tmp_path / "ints" / "x.parquet")
    pq.write_table(pa.table({"image": pa.array(good_rows(4), image_type), "label": pa.array(["c", "a", "b", "a"])}),
                   tmp_path / "text" / "x.parquet")
    for name in ("ints", "text"):
        directory = load_image_directory(tmp_path / name, "Training")
        assert len(directory.categories) == 3 and list(directory.labels) == [2, 0, 1, 0]


def test_a_subset_of_shard_rows_is_refused_not_misread(tmp_path):
    write_shard(tmp_path / "s" / "x.parquet", good_rows(4), [0, 1, 0, 1])
    directory = load_image_directory(tmp_path / "s", "Training")
    with pytest.raises(InvalidDatasetError, match="Parquet shards.*a subset of its rows cannot be taken"):
        directory.subset([1, 3])


def test_row_group_sizes_are_computed_once_and_travel_to_workers(tmp_path):
    import pickle

    from train_pytorch_model.shards import ShardReader

    write_shard(tmp_path / "s" / "x.parquet", good_rows(7), [0, 1] * 3 + [0], row_group_size=3)
    index = load_image_directory(tmp_path / "s", "Training").shards
    assert index.group_rows is index.group_rows and list(index.group_rows) == [3, 3, 1]
    reader = pickle.loads(pickle.dumps(ShardReader(index)))
    assert list(reader.index.group_rows) == [3, 3, 1] and len(reader.read_group(2)) == 1


def test_rows_without_a_label_cannot_train_but_can_be_scored(tmp_path):
    write_shard(tmp_path / "s" / "x.parquet", good_rows(4), [0, -1, 1, 0])
    with pytest.raises(InvalidDatasetError, match=r"1 rows have no label .* first x.parquet row 1"):
        load_image_directory(tmp_path / "s", "Training")
    assert list(load_image_directory(tmp_path / "s", "Scoring", keep_unlabeled=True).labels) == [0, -1, 1, 0]


def test_a_row_group_larger_than_a_reader_may_hold_is_named(tmp_path, monkeypatch):
    import train_pytorch_model.shards as shards_module

    write_shard(tmp_path / "s" / "x.parquet", good_rows(6), [0, 1] * 3, row_group_size=3)
    monkeypatch.setattr(shards_module, "MAX_ROW_GROUP_BYTES", 100)
    with pytest.raises(InvalidDatasetError, match=r"'x.parquet' row group 0 holds .* more than a reader may hold"):
        load_image_directory(tmp_path / "s", "Training")


def test_null_and_undecodable_images_are_skipped_by_file_and_row(tmp_path, caplog):
    rows = good_rows(8)
    rows[2] = None  # a null image
    rows[5] = {"bytes": b"not an image at all", "path": "5.png"}
    rows[6] = {"bytes": None, "path": "/etc/passwd"}  # a path without bytes is never followed
    write_shard(tmp_path / "s" / "x.parquet", rows, [0, 1] * 4)
    directory = load_image_directory(tmp_path / "s", "Training")
    prep = Preprocessing(image_size=32, augmentation="none")
    dataset = build_dataset(directory, {"cat": 0, "dog": 1}, prep, train=False, seed=0)
    loader = evaluation_loader(dataset, batch_size=8, rank=0, world_size=1, num_workers=0, device=CPU)
    batches = list(loader)
    tracker = BadImageTracker(directory, "Training", max_fraction=0.5)
    for batch in batches:
        tracker.record(batch.failures)
    assert sum(len(b) for b in batches) == 5
    assert sorted(tracker.bad) == [2, 5, 6]
    assert "the image is empty (null)" in tracker.bad[2] and "/etc/passwd" in tracker.bad[6]
    assert "Skipping unreadable training image 'x.parquet row 5'" in caplog.text
    with pytest.raises(InvalidDatasetError, match=r"3 of 8 images cannot be read.*'x.parquet row 2'"):
        BadImageTracker(directory, "Training", max_fraction=0.1).record(batches[0].failures)


def test_a_damaged_row_group_skips_its_rows_by_name(tmp_path):
    path = write_shard(tmp_path / "s" / "x.parquet", good_rows(6), [0, 1] * 3, row_group_size=3)
    directory = load_image_directory(tmp_path / "s", "Scoring", keep_unlabeled=True)
    data = bytearray(path.read_bytes())
    start = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data[start:start + 40] = b"\xff" * 40  # the second row group's page header is garbage; the footer is intact
    path.write_bytes(bytes(data))
    from train_pytorch_model.shards import ShardReader
    reader = ShardReader(directory.shards)
    assert all(isinstance(v, bytes) for v in reader.read_group(0))
    damaged = reader.read_group(1)
    assert len(damaged) == 3 and all(isinstance(v, str) and "row group 1 of the shard cannot be read" in v
                                     for v in damaged)


def test_list_labels_are_multi_label(tmp_path):
    from train_pytorch_model.errors import SingleLabelFormatError
    from train_pytorch_model.tasks import MultiClass

    table = pa.table({"image": pa.array(good_rows(2), shard_schema(None).field("image").type),
                      "label": pa.array([[0, 1], [1]])})
    (tmp_path / "m").mkdir()
    pq.write_table(table, tmp_path / "m" / "x.parquet")
    directory = load_image_directory(tmp_path / "m", "Training")
    assert directory.is_multilabel and [directory.label_names(i) for i in range(2)] == [["0", "1"], ["1"]]
    with pytest.raises(SingleLabelFormatError, match="label lists"):
        MultiClass().prepare(directory, "Training")


def test_a_hub_dataset_with_a_sequence_of_classlabel_trains_multilabel(tmp_path):
    """datasets' multi-label layout: `Sequence(ClassLabel(names))`, ids per image; an empty list is no class."""
    names = ["can", "carton", "milk_bottle"]
    sets = [[0], [1, 2], [], [0, 2], [2], [0, 1], [1], [0, 1, 2]] * 2
    images = [{"bytes": png((200 * (0 in s), 200 * (1 in s), 200 * (2 in s))), "path": f"{i}.png"}
              for i, s in enumerate(sets)]
    features = datasets.Features({"image": datasets.Image(),
                                  "labels": datasets.Sequence(datasets.ClassLabel(names=names))})
    dataset = datasets.Dataset.from_dict({"image": images, "labels": sets}, features=features)
    folder = hub_layout(tmp_path / "hub", dataset, shards=2)
    directory = load_image_directory(folder, "Training")
    assert directory.categories == names
    assert [directory.label_names(i) for i in range(len(sets))] == [[names[k] for k in sorted(s)] for s in sets]
    out = tmp_path / "model"
    assert main(["train", "--untrained-model", str(resnet18()), "--training-data", str(folder),
                 "--validation-data", str(folder), "--trained-model", str(out), *FAST]) == 0
    info = json.loads((out / "training_info.json").read_text())
    assert info["task"] == "multilabel" and info["classes"] == names


def test_gpu_decode_of_shards_is_refused_by_name(tmp_path, shards, capsys):
    code = main(["train", "--untrained-model", str(resnet18()), "--training-data", str(shards),
                 "--validation-data", str(shards), "--trained-model", str(tmp_path / "t"), *FAST, "--decode", "gpu"])
    assert code != 0 and "--decode gpu reads image files; Parquet shards are decoded on the CPU" in \
        capsys.readouterr().err


def test_shards_convert_again_to_smaller_shards(tmp_path, shards):
    assert main(["convert", "--input", str(shards), "--image-directory", str(tmp_path / "again"), "--to", "parquet",
                 "--shard-rows", "5"]) == 0
    again = load_image_directory(tmp_path / "again", "Training")
    before = load_image_directory(shards, "Training")
    assert len(again.shards.files) == 4 and list(again.labels) == list(before.labels)
    assert again.image_source(7) == before.image_source(7)
    assert main(["convert", "--input", str(shards), "--image-directory", str(tmp_path / "folder")]) == 1


# --- resume -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_then_resume_on_shards_is_bit_identical(tmp_path, shards):
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    from train_pytorch_model import checkpoint

    valid = tmp_path / "valid"
    hub_layout(valid, hf_dataset(9, names=("ant", "bee", "cat")), shards=2)

    def command(out, *extra):
        return ["train", "--untrained-model", str(resnet18()), "--training-data", str(shards), "--validation-data",
                str(valid), "--trained-model", str(out), "--image-size", "32", "--batch-size", "4", "--epochs", "3",
                "--num-workers", "2", *extra]

    def start(args):
        return subprocess.Popen([sys.executable, "-m", "train_pytorch_model", *args], cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def finish(process):
        return process.returncode if process.wait(timeout=300) is not None else None, process.stderr.read()

    checkpoints = tmp_path / "checkpoints"
    reference = start(command(tmp_path / "reference"))
    interrupted = start(command(tmp_path / "out", "--checkpoint-dir", str(checkpoints)))
    deadline = time.monotonic() + 240
    while not (checkpoints / checkpoint.CHECKPOINT_FILE).exists():
        assert interrupted.poll() is None and time.monotonic() < deadline, finish(interrupted)[1][-3000:]
        time.sleep(0.02)
    interrupted.send_signal(signal.SIGTERM)
    assert finish(interrupted)[0] == 143
    assert finish(reference)[0] == 0
    saved = torch.load(checkpoints / checkpoint.CHECKPOINT_FILE, weights_only=True)
    assert saved["identity"]["data_streams"] == 2 and saved["next_epoch"] < 3

    # Another worker count reads other batches: refused by name, not resumed into other bits.
    code, stderr = finish(start(command(tmp_path / "other", "--checkpoint-dir", str(checkpoints),
                                        "--num-workers", "0")))
    assert code == 1 and "data_streams: 2 in the checkpoint, 1 now" in stderr

    code, stderr = finish(start(command(tmp_path / "out", "--checkpoint-dir", str(checkpoints))))
    assert code == 0, stderr[-3000:]
    assert "Resuming from the checkpoint" in stderr
    resumed = torch.load(tmp_path / "out" / "model", weights_only=True)
    expected = torch.load(tmp_path / "reference" / "model", weights_only=True)
    assert [k for k in expected if not torch.equal(resumed[k], expected[k])] == []


# --- components ---------------------------------------------------------------------------------------------


def test_sdk_validates_a_pipeline_that_converts_to_shards_and_trains_on_them():
    from azure.ai.ml import Input, dsl, load_component

    from conftest import REPO

    convert_step = load_component(source=REPO / "components" / "convert.yaml")
    train_step = load_component(source=REPO / "component.yaml")

    @dsl.pipeline(default_compute="gpu-cluster")
    def shards_pipeline(images, model):
        shards = convert_step(input_data=images, output_format="parquet", max_side=512)
        train = train_step(untrained_model=model, training_data=shards.outputs.image_directory,
                           validation_data=shards.outputs.image_directory)
        return {"trained_model": train.outputs.trained_model}

    job = shards_pipeline(Input(type="uri_folder", path="azureml:photos@latest"),
                          Input(type="uri_folder", path="azureml:resnet@latest"))
    result = job._validate()
    assert result.passed, result.error_messages
    assert "parquet" in convert_step.inputs["output_format"].enum and convert_step.inputs["max_side"].optional


@pytest.mark.slow
def test_the_components_convert_to_shards_and_train_on_the_folder(tmp_path):
    from conftest import REPO
    from test_component_runner import run_component

    photos = write_image_folder(tmp_path / "photos", CLASSES, size=(120, 90), suffix=".jpg")
    assert run_component(REPO / "components" / "convert.yaml",
                         {"input_data": str(photos), "output_format": "parquet", "max_side": "64"},
                         {"image_directory": str(tmp_path / "shards")}) == 0
    shard = pq.read_table(next((tmp_path / "shards" / "data").glob("*.parquet")))
    assert Image.open(io.BytesIO(shard.column("image")[0].as_py()["bytes"])).size == (64, 48)
    assert run_component(REPO / "component.yaml",
                         {"untrained_model": str(resnet18()), "training_data": str(tmp_path / "shards"),
                          "validation_data": str(tmp_path / "shards"), "epochs": "1", "image_size": "32",
                          "batch_size": "4", "num_workers": "0"},
                         {"trained_model": str(tmp_path / "trained"), "checkpoints": str(tmp_path / "ckpt")}) == 0
    assert (tmp_path / "trained" / "MLmodel").is_file()


@pytest.mark.slow
def test_the_benchmark_shim_delays_and_counts_opens_below_its_prefix_only(tmp_path):
    import shutil
    import subprocess
    import sys

    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed for benchmarks/parquet_shards.py")
    from conftest import REPO
    sys.path.insert(0, str(REPO / "benchmarks"))
    from parquet_shards import build_shim

    shim = build_shim(tmp_path)
    (tmp_path / "mount").mkdir()
    for name in ("a", "b"):
        (tmp_path / "mount" / name).write_text(name)
    (tmp_path / "elsewhere").write_text("x")
    probe = ("import time, sys; t = time.perf_counter()\n"
             "for p in sys.argv[1:]: open(p).read()\n"
             "print(time.perf_counter() - t)")
    env = {**os.environ, "LD_PRELOAD": str(shim), "SLOW_OPEN_PREFIX": str(tmp_path / "mount"),
           "SLOW_OPEN_US": "50000", "SLOW_OPEN_LOG": str(tmp_path / "log")}
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "mount" / "a"), str(tmp_path / "mount" / "b"),
                             str(tmp_path / "elsewhere")], env=env, capture_output=True, text=True, check=True)
    assert float(result.stdout) >= 0.1  # two delayed opens of 50 ms
    assert (tmp_path / "log").read_text() == "oo"  # counted; the file elsewhere was not


def test_looking_for_shards_stops_at_the_first_image_file(tmp_path, monkeypatch):
    import train_pytorch_model.shards as shards_module

    folder = write_image_folder(tmp_path / "big", {f"c{i}": 2 for i in range(5)})
    listed = []
    real_walk = os.walk
    monkeypatch.setattr(shards_module.os, "walk", lambda *a, **k: (listed.append(d) or d for d in real_walk(*a, **k)))
    assert shards_module.shard_files(folder, "Training", None) is None
    assert len(listed) == 2  # the root and the first class folder: a million images are not listed twice


def test_a_shard_set_without_validation_data_is_refused_by_name(tmp_path, capsys):
    write_shard(tmp_path / "s" / "train-00000-of-00002.parquet", good_rows(4), [0, 1, 0, 1])
    write_shard(tmp_path / "s" / "train-00001-of-00002.parquet", good_rows(4), [0, 1, 0, 1])
    code = main(["train", "--untrained-model", str(resnet18()), "--training-data", str(tmp_path / "s"),
                 "--trained-model", str(tmp_path / "t"), *FAST])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("ValidationSplitError: ") and "give --validation-data" in last


@pytest.mark.slow
def test_torchrun_two_processes_train_on_shards_and_validate_every_row_once(tmp_path):
    import csv
    import subprocess
    import sys

    from conftest import REPO, free_port
    from test_distributed import env, evaluate_saved

    train = tmp_path / "train"
    assert main(["convert", "--input", str(write_image_folder(tmp_path / "f", CLASSES)), "--image-directory",
                 str(train), "--to", "parquet", "--shard-rows", "6"]) == 0
    valid = hub_layout(tmp_path / "valid", hf_dataset(13, names=("ant", "bee", "cat"), seed=3), shards=2)
    out = tmp_path / "trained"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "train_pytorch_model", "train", "--untrained-model", str(resnet18()), "--training-data", str(train),
         "--validation-data", str(valid), "--trained-model", str(out), "--image-size", "32", "--num-workers", "0",
         "--batch-size", "3", "--epochs", "2"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((out / "training_info.json").read_text())["training"]
    assert info["world_size"] == 2
    with open(out / "metrics.csv") as handle:
        best = list(csv.DictReader(handle))[info["best_epoch"] - 1]
    loss, top1 = evaluate_saved(out, valid)  # the saved weights on all 13 rows, in one process
    assert float(best["valid_loss"]) == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert float(best["valid_top1"]) == pytest.approx(top1, abs=1e-9)
