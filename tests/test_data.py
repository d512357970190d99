import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlmedge.data import open_dataset
from vlmedge.data.shapes import HELD_OUT, load_shapes, matches, relation, swapped_caption
from vlmedge.errors import VlmedgeError


def test_shapes_is_deterministic_and_prefix_stable():
    a = load_shapes("train", 40, 32)
    b = load_shapes("train", 20, 32)
    assert np.array_equal(a.images[:20], b.images)
    assert a.objects[:20] == b.objects
    c = load_shapes("val", 20, 32)
    assert not np.array_equal(a.images[:20], c.images)


def test_held_out_combinations_never_in_train():
    data = load_shapes("train", 600, 32)
    seen = {(o.colour, o.shape) for objs in data.objects for o in objs}
    assert not seen & HELD_OUT
    test = load_shapes("test", 600, 32, single_object=True)
    assert {(o[0].colour, o[0].shape) for o in test.objects} & HELD_OUT


def test_captions_match_their_image_and_not_a_swap():
    data = load_shapes("train", 200, 32)
    rng = np.random.default_rng(0)
    texts, specs = data.training_captions(range(200), rng)
    m = data.match(range(200), specs)
    assert np.diag(m).all()
    assert m.mean() < 0.2  # captions are specific
    two = [i for i, o in enumerate(data.objects) if len(o) == 2]
    assert two
    objs = data.objects[two[0]]
    true, false = swapped_caption(objs, "relation", rng)
    assert true != false
    a, b = objs
    assert not matches(objs, ("two", (b.colour, b.shape, None), relation(a, b), (a.colour, a.shape, None)))


def test_positions_and_relations_are_unambiguous():
    """Objects sit inside grid cells (never on a border between two position words); two objects share a row or a
    column, so exactly one relation holds."""
    data = load_shapes("train", 400, 32)
    for objs in data.objects:
        for o in objs:
            for v in (o.x, o.y):
                assert min(abs(v * 3 - k) for k in (1, 2)) > 0.2
        if len(objs) == 2:
            a, b = objs
            same_col, same_row = a.cell[0] == b.cell[0], a.cell[1] == b.cell[1]
            assert same_col != same_row
            assert relation(a, b) in (("above", "below") if same_col else ("to the left of", "to the right of"))


def test_hard_negative_neighbours_differ_in_one_thing():
    from vlmedge.data import ShapesDataset

    ds = ShapesDataset(load_shapes("train", 2000, 32))
    rng = np.random.default_rng(0)
    kinds = set()
    for i in range(300):
        a, b = ds.data.objects[i], ds.data.objects[ds.neighbours(i, rng)]
        if len(a) == 1:
            assert len(b) == 1
            diff = [k for k in ("colour", "shape", "position") if getattr(a[0], k) != getattr(b[0], k)]
            assert diff and ("colour" in diff) + ("shape" in diff) <= 1, (a, b)
            kinds.add("position" if diff == ["position"] else "attribute")
        elif len(b) == 2 and {(o.colour, o.shape) for o in a} == {(o.colour, o.shape) for o in b}:
            assert relation(*a) != relation(*(b if (b[0].colour, b[0].shape) == (a[0].colour, a[0].shape) else b[::-1]))
            kinds.add("relation")  # (a pair with no other arrangement in the data gets a random image)
    assert kinds == {"position", "attribute", "relation"}


def _png(color=(255, 0, 0), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_imagefolder_coco_and_webdataset(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png((80 * i, 0, 0)))
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"})
                                                     for i in range(3)))
    ds = open_dataset(str(folder), resolution=16)
    assert len(ds) == 3 and ds.images([0, 1]).shape == (2, 16, 16, 3)
    assert ds.captions([2], np.random.default_rng(0)) == ["image 2"]

    coco = {"images": [{"id": 7, "file_name": "1.png"}],
            "annotations": [{"image_id": 7, "caption": "a"}, {"image_id": 7, "caption": "b"}]}
    (folder / "captions.json").write_text(json.dumps(coco))
    ds = open_dataset(str(folder / "captions.json"), resolution=16)
    assert len(ds) == 1 and set(ds.texts[0]) == {"a", "b"}

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, data in (("s0.png", _png()), ("s0.txt", b"a red square"), ("s1.png", _png((0, 0, 255))),
                          ("s1.txt", b"a blue square")):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = open_dataset(str(shard), resolution=16)
    assert len(ds) == 2 and ds.texts[1] == ["a blue square"]


def test_bad_images_error_or_are_skipped(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": n, "text": n}) for n in ("ok.png", "broken.png", "missing.png")))
    with pytest.raises(VlmedgeError, match="broken.png"):
        open_dataset(str(tmp_path), resolution=16)
    ds = open_dataset(str(tmp_path), resolution=16, skip_bad=True)
    assert len(ds) == 1 and sorted(ds.skipped) == ["broken.png", "missing.png"]


def test_paths_outside_the_root_are_refused(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "../etc/passwd", "text": "x"}))
    with pytest.raises(VlmedgeError, match="outside the dataset root"):
        open_dataset(str(tmp_path), resolution=16)
    shard = tmp_path / "evil.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(VlmedgeError, match="outside"):
        open_dataset(str(shard), resolution=16)


def test_unknown_source_is_a_clear_error():
    with pytest.raises(VlmedgeError, match="data source not found"):
        open_dataset("no/such/dir", resolution=16)
