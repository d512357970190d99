"""Users' own data: class folders and labels (zero-shot on their classes), retrieval over repeated captions,
text-side hard negatives, progress lines in logs."""

import io
import json

import numpy as np
import pytest
import yaml
from conftest import run_cli
from PIL import Image

from vlmedge.data import open_dataset
from vlmedge.errors import VlmedgeError

# Classes a user might have (none is a shapes colour x shape), each with its own look; names with _ - and spaces.
CLASSES = {"maple_leaf": (205, 80, 20), "sea-turtle": (20, 120, 190), "snow owl": (235, 235, 235),
           "moss": (60, 150, 40)}


def _photo(rng, colour, size):
    """A noisy photo-like image: the class colour as a large blob on a random background."""
    w, h = size
    img = rng.integers(0, 90, size=(h, w, 3)).astype(np.int16)
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    blob = ((yy - cy) / (0.3 * h)) ** 2 + ((xx - cx) / (0.3 * w)) ** 2 < 1
    img[blob] = np.asarray(colour) + rng.integers(-20, 20, size=(blob.sum(), 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """root/<class>/*.png|*.jpg as a user has them: mixed formats and sizes, a stray non-image file."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    rng = np.random.default_rng(0)
    for k, (name, colour) in enumerate(CLASSES.items()):
        (root / name).mkdir(parents=True)
        for i in range(16):
            im = _photo(rng, colour, (48 + 8 * (i % 3), 40 + 8 * (k % 2)))
            im.save(root / name / f"img_{i:03d}.{'png' if k % 2 else 'jpg'}")
    (root / "moss" / "notes.txt").write_text("not an image")
    return root


def test_class_folders_are_a_labelled_dataset_interleaved(class_folders):
    ds = open_dataset(str(class_folders), resolution=32)
    assert len(ds) == 64 and ds.images(range(3)).shape == (3, 32, 32, 3)
    assert sorted(set(ds.labels)) == sorted(CLASSES)
    assert ds.labels[:4] == sorted(CLASSES)  # one of each class in turn: any prefix is balanced
    assert ds.texts[0] == ["a photo of a maple leaf.", "a picture of a maple leaf.", "an image of a maple leaf.",
                           "a close-up photo of a maple leaf."]
    assert open_dataset(str(class_folders), resolution=32, count=8).labels.count("moss") == 2


def test_a_source_without_a_split_holds_out_a_tenth_that_training_never_reads(class_folders, tmp_path):
    import shutil

    train, test, every = (open_dataset(str(class_folders), s, resolution=32) for s in ("train", "test", "all"))
    assert set(train.names).isdisjoint(test.names) and set(train.names) | set(test.names) == set(every.names)
    assert 1 <= len(test) < len(train) and open_dataset(str(class_folders), "val", resolution=32).names == test.names
    assert test.measured == f"the held-out tenth of {class_folders} ({len(test)} of 64 images, chosen by file name; " \
                            "training never reads them)"
    assert train.measured == f"{class_folders} without its held-out tenth ({len(train)} of 64 images)"
    assert test.source_labels == sorted(CLASSES)  # zero-shot scores every class even where the slice lacks one
    # chosen by name: adding images moves none of the others between the splits
    grown = tmp_path / "grown"
    shutil.copytree(class_folders, grown)
    for i in range(16, 40):
        shutil.copy(class_folders / "moss" / "img_000.png", grown / "moss" / f"img_{i:03d}.png")
    assert set(test.names) <= set(open_dataset(str(grown), "test", resolution=32).names)
    # a folder with its own train/ and test/ uses them whole
    for split in ("train", "test"):
        shutil.copytree(class_folders, tmp_path / "own" / split)
    own = open_dataset(str(tmp_path / "own"), "test", resolution=32)
    assert len(own) == 64 and own.measured == f"{tmp_path / 'own' / 'test'} (64 images, its own test split)"


def test_metadata_label_column(tmp_path):
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 40), (30, 30, 200)).save(tmp_path / "b.png")
    rows = [{"file_name": "a.png", "label": "fire_truck"}, {"file_name": "b.png", "text": "a blue wall", "label": 7}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = open_dataset(str(tmp_path), resolution=32)
    assert ds.labels == ["fire_truck", "7"]
    assert ds.texts[0][0] == "a photo of a fire truck." and ds.texts[1] == ["a blue wall"]
    rows[1].pop("label")
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(VlmedgeError, match="1 of 2 records have no label"):
        open_dataset(str(tmp_path), resolution=32)


def test_distinct_text_recall_on_repeated_captions(class_folders):
    """An encoder that knows each image's class exactly: over every drawn caption, the top five texts of an image are
    copies of a few captions and R@5 cannot exceed R@1's reach; over the distinct captions every image finds one of
    its own at rank 1."""
    from vlmedge.families.dual_encoder.tasks import _retrieval

    class Oracle:  # a perfect class encoder (test input for the metric, not a stand-in for it)
        preprocess = staticmethod(lambda images: images)
        basis = np.eye(len(CLASSES))

        def encode_images(self, images):
            names = list(CLASSES)
            means = np.array([CLASSES[n] for n in names], dtype=float)
            centre = images[:, 12:20, 12:20].reshape(len(images), -1, 3).mean(1)
            return self.basis[np.argmin(((centre[:, None] - means[None]) ** 2).sum(-1), axis=1)]

        def encode_texts(self, texts):
            names = [n.replace("_", " ").replace("-", " ") for n in CLASSES]
            return self.basis[[next(k for k, n in enumerate(names) if n in t) for t in texts]]

    ds = open_dataset(str(class_folders), resolution=32)
    r = _retrieval(Oracle(), ds, seed=0)
    assert r["distinct_captions"] == 16  # 4 classes x 4 templates
    assert r["i2t_distinct_r1"] == 1.0
    assert r["i2t_r1"] < 0.5  # ties among identical embeddings: the identical caption is one of ~16 copies
    assert "i2t_true_r1" not in r  # a captioned set's match says "listed", not "true"


def test_zero_shot_classes_and_templates_errors(tmp_path, class_folders):
    from vlmedge.evaluate import EvalConfig
    from vlmedge.families.dual_encoder.tasks import user_classes

    classes = tmp_path / "classes.txt"
    classes.write_text("maple_leaf\nsea-turtle\n")
    with pytest.raises(VlmedgeError, match="label 'moss' .* not in the classes file"):
        user_classes(list(CLASSES), EvalConfig(data=str(class_folders), classes=str(classes)))
    with pytest.raises(VlmedgeError, match="needs exactly one"):
        EvalConfig(templates="a photo of a dog.|a {} photo of {}")
    with pytest.raises(VlmedgeError, match="cannot read"):
        EvalConfig(classes=str(tmp_path / "nope.txt"))
    with pytest.raises(VlmedgeError, match="not a file, and no"):
        EvalConfig(templates="a photo of a dog")
    (tmp_path / "templates.txt").write_text("# mine\na photo of a {}.\nan origami {}.\n")
    cfg = EvalConfig(templates=str(tmp_path / "templates.txt"))
    assert cfg.template_list() == ["a photo of a {}.", "an origami {}."]
    assert user_classes(["snow owl", "moss"], cfg)[1] == ("snow owl", ["a photo of a snow owl.",
                                                                     "an origami snow owl."])


def test_negative_captions_are_false_and_one_edit_away():
    from vlmedge.data.shapes import load_shapes, matches

    data = load_shapes("train", 300, 32)
    texts, specs = data.negative_captions(range(300), np.random.default_rng(0))
    assert not any(matches(data.objects[i], sp) for i, sp in enumerate(specs))
    for i, sp in enumerate(specs):
        objs = data.objects[i]
        if len(objs) == 2:  # the same two objects, the relation read backwards
            assert {sp[1][:2], sp[3][:2]} == {(o.colour, o.shape) for o in objs}
    assert len(set(texts)) > 100


def test_text_negatives_are_extra_columns_of_image_to_text_only():
    import torch
    import torch.nn.functional as F

    from vlmedge.losses import contrastive_loss

    g = torch.Generator().manual_seed(0)
    img, txt, neg = (F.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in range(3))
    scale = torch.tensor(2.0)
    plain = contrastive_loss(img, txt, scale)
    none_true = torch.zeros(6, 6)
    got = contrastive_loss(img, txt, scale, None, neg, none_true)
    logits = scale.exp() * img @ txt.T
    i2t = torch.cat([logits, scale.exp() * img @ neg.T], 1)
    want = (F.cross_entropy(i2t, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert torch.allclose(got, want) and got > plain
    # a "negative" that truly describes every image is masked out: the plain loss again
    assert torch.allclose(contrastive_loss(img, txt, scale, None, neg, torch.ones(6, 6)), plain)


def test_progress_prints_lines_about_every_tenth_when_not_a_terminal():
    from vlmedge._progress import Progress

    out = io.StringIO()
    with Progress("train", 50, stream=out, unit="samples") as bar:
        for i in range(50):
            bar.update(i + 1, loss=1.0 / (i + 1), rate=100.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("train: 5/50 (10%) loss 0.2000, 100 samples/s; elapsed")
    assert "ETA" in lines[0] and lines[-1].startswith("train: 50/50 (100%)") and "ETA" not in lines[-1]
    quiet = io.StringIO()
    with Progress("train", 50, stream=quiet, enabled=False) as bar:
        bar.update(50)
    assert quiet.getvalue() == ""


def test_budget_fixes_the_count_by_the_pace_of_the_first_items_and_says_so():
    """A check whose items take 50 ms each, with a 0.3 s budget: about 6 of 100 run (the two before `timed_from`
    on top), the bar's total follows, one line states the count and the setting that fixes it."""
    import time

    from vlmedge._progress import Budget, Progress, paced

    out = io.StringIO()
    items = list(range(100))
    budget = Budget(0.3, most=100, least=2, hint="parity_questions (--parity-questions)")
    with Progress("parity", len(items), stream=out, unit="questions") as bar:
        done = [k for k, _ in paced(items, budget, bar, timed_from=2) if time.sleep(0.05) is None]
    assert 2 + 2 <= len(done) <= 2 + 7 and done == list(range(len(done))) and bar.total == len(done)
    said = [line for line in out.getvalue().splitlines() if "budget" in line]
    assert len(said) == 1 and said[0].startswith(f"parity: {len(done)} questions (the first 2, then {len(done) - 2} at ")
    assert said[0].endswith("set parity_questions (--parity-questions) for more)")
    assert [k for k, _ in paced(items, 5, bar)] == [0, 1, 2, 3, 4]  # a count: exactly that many, nothing timed
    quiet = io.StringIO()
    fast = [k for k, _ in paced(items, Budget(60, most=30), Progress("x", 100, stream=quiet, after=5))]
    assert fast == list(range(30)) and quiet.getvalue() == ""  # quick: the most, in order; nothing to say


def test_compress_on_class_folders_gates_zero_shot_and_logs_progress(class_folders, tmp_path):
    """A user's labelled folders through train, export, INT8 with a zero-shot gate, stdout a pipe as in CI."""
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    recipe = {"name": "photos", "model": {"preset": "tiny"}, "data": {"source": str(class_folders)},
              "eval": {"classes": str(tmp_path / "classes.txt"), "templates": "a photo of a {}.|an image of a {}."},
              "stages": [{"train": {"steps": 40, "batch_size": 32, "lr": 0.002}}, {"export": {}},
                         {"quantize": {"mode": "dynamic"}}],
              "targets": ["cpu"], "measure": {"warmup": 1, "min_runs": 3, "min_seconds": 0.01, "throughput_batch": 2},
              "gates": ["zero_shot.top1 >= 0.5", "retention.zero_shot.top1 >= 0.9"]}
    path = tmp_path / "photos.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, out, err = run_cli("compress", str(path), "--out", str(tmp_path / "run"))
    assert code == 0, err[-2000:]
    assert "train: 4/40 (10%)" in out and "train: 40/40 (100%)" in out  # plain lines, not a live bar
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    final = report["steps"][-1]
    assert final["metrics"]["zero_shot.top1"] >= 0.5 and final["retention"]["zero_shot.top1"] >= 0.9
    held = open_dataset(str(class_folders), "test", resolution=32).measured  # every step measured the held-out tenth
    assert {s["measured"] for s in report["steps"]} == {held}
    assert f"measured on {held}" in (tmp_path / "run" / "report.md").read_text() and f"measured on {held}" in out
    export = next(p for p in (tmp_path / "run").iterdir() if "-export-" in p.name) / "onnx"
    assert json.loads((export / "zero_shot_labels.json").read_text()) == list(CLASSES)
    assert np.load(export / "zero_shot_text_embeds.npy").shape[0] == len(CLASSES)
    code, out, _ = run_cli("train", "--preset", "tiny", "--data", str(class_folders), "--steps", "3",
                           "--out", str(tmp_path / "quiet"), "--quiet")
    assert code == 0 and "train:" not in out


def _shards(folder, n_shards, per_shard, size=64, start=0):
    """WebDataset shards as `webdataset`'s ShardWriter writes them: key.jpg + key.txt per sample."""
    import tarfile

    rng = np.random.default_rng(start)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(start, start + n_shards):
        with tarfile.open(folder / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                buf = io.BytesIO()
                _photo(rng, list(CLASSES.values())[i % 4], (size, size)).save(buf, "JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"sample {s}-{i}".encode())):
                    info = tarfile.TarInfo(f"{s:06d}_{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def test_shards_are_indexed_not_held_in_memory(tmp_path):
    """20 shards open in the memory of their captions and offsets (tracemalloc counts numpy and Python alike); images
    are decoded when a batch asks, identical to decoding the member directly; brace patterns select shards."""
    import tarfile
    import tracemalloc

    from vlmedge.data import _decode

    folder = _shards(tmp_path / "shards", 20, 50)
    tracemalloc.start()
    ds = open_dataset(str(folder), resolution=48)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    decoded = len(ds) * 48 * 48 * 3
    assert len(ds) == 1000 and peak < decoded / 4, (peak, decoded)
    with tarfile.open(folder / "shard-000007.tar") as tar:
        direct = _decode(tar.extractfile("000007_00003.jpg").read(), 48)
    k = ds.texts.index(["sample 7-3"])
    assert np.array_equal(ds.images([k])[0], direct)
    some = open_dataset(str(folder / "shard-{000003..000005}.tar"), resolution=48)
    assert len(some) == 150 and {t[0].split("-")[0] for t in some.texts} == {"sample 3", "sample 4", "sample 5"}
    assert len(open_dataset(str(folder / "shard-{000003,000009}.tar"), resolution=48, count=60)) == 60
    with pytest.raises(VlmedgeError, match=r"shard-000020.tar not found \(80 of 81 missing\)"):
        open_dataset(str(folder / "shard-{000019..000099}.tar"), resolution=48)


def test_bad_shard_members_error_or_are_skipped(tmp_path):
    import tarfile

    folder = _shards(tmp_path / "shards", 1, 4)
    with tarfile.open(folder / "shard-000000.tar", "a") as tar:
        for name, data in (("junk.jpg", b"not a jpeg at all"), ("junk.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(VlmedgeError, match="junk.jpg: cannot decode image"):
        open_dataset(str(folder), resolution=32)
    ds = open_dataset(str(folder), resolution=32, skip_bad=True)
    assert len(ds) == 4 and ds.skipped == ["shard-000000.tar:junk"]
    # a body corrupted past its header: named when a batch reads it
    raw = bytearray((folder / "shard-000000.tar").read_bytes())
    _, offset, size = (int(v) for v in ds.where[2])
    raw[offset + 1024: offset + size] = b"\0" * (size - 1024)
    (folder / "shard-000000.tar").write_bytes(bytes(raw))
    broken = open_dataset(str(folder), resolution=32, skip_bad=True)
    assert broken.images([0, 1]).shape == (2, 32, 32, 3)
    with pytest.raises(VlmedgeError, match="000000_00002.jpg: cannot decode image"):
        broken.images([2])
