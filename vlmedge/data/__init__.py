"""Datasets: the built-in `shapes` generator and the formats users already have.

`open_dataset(source, ...)` returns an object with

* ``len(ds)``; ``ds.images(indices)`` -> uint8 NHWC at the model's resolution;
* ``ds.captions(indices, rng)`` -> one caption per index (drawn anew each time where there are several);
* ``ds.training_captions(indices, rng)`` -> (captions, specs) and ``ds.match(indices, specs)`` -> a matrix saying
  which caption truthfully describes which image (so duplicates are not treated as negatives);
* ``ds.neighbours(index, rng)`` (optional) -> an index whose caption differs in one attribute (hard negatives).

A dataset with class labels (``ds.labels``, one per image, or None) also serves zero-shot classification.

Splits: ``shapes`` draws each split (train, val, test) with its own seed. A user's source is split by
`split_source`: a folder with ``train/`` and ``val/`` (or ``validation/``, ``test/``) subfolders uses its own split;
any other source keeps a deterministic held-out tenth, chosen by each item's name (`held_out`), that split
``train`` never yields and ``val``/``test`` yield alone; ``all`` is the whole source. ``ds.measured`` says which
images a split holds, for every evaluation record.

Sources: ``shapes`` (optionally ``shapes:COUNT``), an image folder with ``metadata.jsonl`` (``file_name`` and
``text`` and/or ``label``), a class-folder tree (``root/<class>/*.jpg``, torchvision's ImageFolder layout; captions
from `CAPTION_TEMPLATES`), a COCO captions JSON, or WebDataset ``.tar`` shards (one file, a folder of them, or a
brace pattern ``shard-{000..099}.tar``; indexed and read per batch, not held in memory: `ShardDataset`).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._progress import LARGE, Progress
from ..errors import VlmedgeError
from ..preprocess import resize_crop
from .shapes import COLOURS, SHAPES, ShapesData, load_shapes, relation

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000; a larger image is refused before it is decoded (a decompression bomb)
MAX_CAPTION_CHARS = 2000
CAPTION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.")
"""Captions of a labelled image without text (class folders, metadata.jsonl rows with only a label)."""


def class_name(label: str) -> str:
    """A label as words for a prompt: folder names write spaces as _ or -."""
    return label.replace("_", " ").replace("-", " ").strip()


def checked_text(value, where: str, what: str = "caption") -> str:
    """A caption (or a question or answer: `what`) as given, or a one-line error naming where it is: empty, null,
    non-text or overlong texts are not data. One limit for every family's texts."""
    if not isinstance(value, str) or not value.strip():
        raise VlmedgeError(f"{where}: {what} {shown(value)} is empty or not text")
    if len(value) > MAX_CAPTION_CHARS:
        raise VlmedgeError(f"{where}: {what} of {len(value)} characters; at most {MAX_CAPTION_CHARS}")
    return value


def shown(value, limit: int = 60) -> str:
    """A value as it appears in an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class ShapesDataset:
    """`ShapesData` with the dataset interface and attribute-level hard negatives."""

    match_is_content = True
    """`match` says whether a caption truly describes an image (not only whether it is one of its listed captions)."""

    def __init__(self, data: ShapesData):
        self.data = data
        self._by_combo: dict[tuple[str, str], list[int]] = {}
        self._by_pair: dict[frozenset, list[int]] = {}
        for i, objs in enumerate(data.objects):
            if len(objs) == 1:
                self._by_combo.setdefault((objs[0].colour, objs[0].shape), []).append(i)
            else:
                self._by_pair.setdefault(frozenset((o.colour, o.shape) for o in objs), []).append(i)

    def __len__(self) -> int:
        return len(self.data)

    def images(self, indices: Sequence[int]) -> np.ndarray:
        return self.data.images[np.asarray(indices)]

    def captions(self, indices, rng):
        return self.data.captions(indices, rng)

    def training_captions(self, indices, rng):
        return self.data.training_captions(indices, rng)

    def match(self, indices, specs):
        return self.data.match(indices, specs)

    def negative_captions(self, indices, rng):
        return self.data.negative_captions(indices, rng)

    def neighbours(self, index: int, rng: np.random.Generator) -> int:
        """An image whose true caption differs from `index`'s in one thing: hard-negative mining.

        One object: another colour or another shape (everything else drawn at random), or the same colour and shape
        at another position. Two objects: the same two objects in another spatial relation.
        """
        objs = self.data.objects[index]
        if len(objs) == 2:
            pool = self._by_pair.get(frozenset((o.colour, o.shape) for o in objs), [])
            rel = relation(*objs)
            others = [j for j in pool if relation(*self._ordered(objs, self.data.objects[j])) != rel]
            if others:
                return int(others[rng.integers(len(others))])
            return int(rng.integers(len(self)))
        o = objs[0]
        for _ in range(8):
            kind = rng.integers(3)
            if kind == 0:
                combo = (str(rng.choice([c for c in COLOURS if c != o.colour])), o.shape)
            elif kind == 1:
                combo = (o.colour, str(rng.choice([s for s in SHAPES if s != o.shape])))
            else:
                combo = (o.colour, o.shape)
            pool = self._by_combo.get(combo)
            if not pool:
                continue
            j = int(pool[rng.integers(len(pool))])
            other = self.data.objects[j][0]
            if kind < 2 or other.position != o.position:
                return j
        return int(rng.integers(len(self)))

    @staticmethod
    def _ordered(reference, objs):
        """`objs` in the order of `reference`'s (colour, shape)s."""
        return objs if (objs[0].colour, objs[0].shape) == (reference[0].colour, reference[0].shape) else objs[::-1]


class _Captioned:
    """Captions (`texts`: one or more per image) and the caption side of the dataset interface."""

    texts: list[list[str]]
    total = 0
    """Items in the whole source, before its split."""
    measured = ""
    """Which images this split holds (`open_dataset`)."""

    def __len__(self) -> int:
        return len(self.texts)

    def captions(self, indices, rng):
        return [self.texts[i][rng.integers(len(self.texts[i]))] for i in indices]

    def training_captions(self, indices, rng):
        texts = self.captions(indices, rng)
        return texts, [t.strip().lower() for t in texts]

    def match(self, indices, specs):
        own = [{t.strip().lower() for t in self.texts[i]} for i in indices]
        return np.array([[sp in o for sp in specs] for o in own], dtype=np.float32)


@dataclass
class PairsDataset(_Captioned):
    """Images (decoded, resized and cropped once, held in memory) with one or more captions each."""

    images_array: np.ndarray
    texts: list[list[str]]
    names: list[str]
    skipped: list[str] = field(default_factory=list)
    labels: list[str] | None = None
    """One class label per image where the source has them (a label column, class folders)."""
    source_labels: list[str] | None = None
    """Every label of the whole source, sorted (a split may lack some): the classes zero-shot scores over."""

    def images(self, indices):
        return self.images_array[np.asarray(indices)]


class ShardDataset(_Captioned):
    """WebDataset `.tar` shards indexed, not loaded: each sample's image is a (shard, offset, size) and is read and
    decoded when a batch asks for it, so memory holds the captions and three integers per sample whatever the size
    of the shard set. Batches stay random-access (step-seeded, resumable, hard-negative neighbours), which a
    sequential reader such as the `webdataset` library's pipeline does not give."""

    def __init__(self, shards: list[Path], where: np.ndarray, texts: list[list[str]], names: list[str],
                 skipped: list[str], resolution: int):
        self.shards, self.where, self.texts, self.names = shards, where, texts, names
        self.skipped, self.resolution, self.labels = skipped, resolution, None
        self._files: dict[int, Any] = {}

    def _read(self, i: int) -> bytes:
        shard, offset, size = (int(v) for v in self.where[i])
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.shards[shard], "rb")
        f.seek(offset)
        return f.read(size)

    def images(self, indices):
        out = []
        for i in np.asarray(indices).reshape(-1):
            try:
                out.append(_decode(self._read(int(i)), self.resolution))
            except (OSError, ValueError) as e:
                raise VlmedgeError(f"{self.names[i]}: cannot decode image ({e}); its header read, its data did not "
                                   "(a truncated or corrupt file)") from None
        return np.stack(out)

    def __del__(self):
        for f in getattr(self, "_files", {}).values():
            f.close()


DEFAULT_SOURCE = "shapes"
"""The data every command and recipe uses unless told otherwise: the built-in synthetic shapes."""


def shapes_count(source: str) -> int | None:
    """COUNT of a `shapes:COUNT` source (None for plain `shapes`); an error for any other `shapes...` spelling.
    Every command and the recipe loader check a source with it, so `shapes:abc` fails the same way everywhere."""
    if source == "shapes":
        return None
    try:
        n = int(source.split(":", 1)[1])
    except ValueError:
        n = 0
    if n < 1:
        raise VlmedgeError(f"data source {source!r}: expected shapes or shapes:COUNT (a positive integer)")
    return n


def is_shapes(source: str) -> bool:
    return source == "shapes" or source.startswith("shapes:")


SPLITS = ("train", "val", "test", "all")
HELD_OUT_FRACTION = 0.1
"""The fraction of a user's source without a split of its own that training never reads and evaluation measures."""
OWN_SPLITS = {"train": ("train",), "val": ("val", "validation", "test"), "test": ("test", "val", "validation")}


def held_out(name: str) -> bool:
    """Whether an item (by its name within the source: a file name, `class/file`, `shard.tar:key`) is in the
    held-out tenth: a hash of the name, so the split does not move when items are added, removed or reordered."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") < HELD_OUT_FRACTION * 2 ** 32


def split_source(source: str, split: str) -> tuple[str, bool]:
    """(the source to read for `split`, whether to keep only its held-out tenth (val, test) or the rest (train)):
    a folder's own `train/` and `val/`/`test/` subfolders where it has them, else the source itself, split by
    `held_out`."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; expected one of {', '.join(SPLITS)}")
    path = Path(source)
    if split != "all" and path.is_dir() and (path / "train").is_dir():
        own = next((path / d for d in OWN_SPLITS[split] if (path / d).is_dir()), None)
        if own is not None:
            return str(own), False
    return source, split != "all"


def _keep(names: Sequence[str], split: str) -> list[bool]:
    """Per item, whether `split` ("train", "val", "test") holds it. The held-out slice of a source too small to
    have one (every name hashed out of it) is its first item, so that evaluation always has an image to measure."""
    out = [held_out(n) for n in names]
    if names and not any(out):
        out[0] = True
    return out if split != "train" else [not k for k in out]


def measured(source: str, split: str, sliced: bool, kept: int, total: int) -> str:
    """What a dataset's split holds, as evaluation records and tables name it."""
    if is_shapes(source):
        return f"{source}, {split} split ({kept} images, drawn with the {split} seed)"
    if not sliced:
        return f"{source} ({kept} images{'' if split == 'all' else ', its own ' + split + ' split'})"
    if split == "train":
        return f"{source} without its held-out tenth ({kept} of {total} images)"
    return (f"the held-out tenth of {source} ({kept} of {total} images, chosen by file name; training never reads "
            "them)")


def open_dataset(source: str, split: str = "all", *, resolution: int, count: int | None = None,
                 skip_bad: bool = False, single_object: bool = False, seed: int = 0, progress: bool = False):
    """Open a dataset by its source string and split (see the module docstring); `ds.measured` says what it holds."""
    if is_shapes(source):
        n = shapes_count(source) or count
        ds = ShapesDataset(load_shapes("train" if split == "all" else split, n or 20000, resolution, seed=seed,
                                       single_object=single_object, progress=progress))
        ds.measured = measured(source, split, False, len(ds), len(ds))
        return ds
    read, sliced = split_source(source, split)
    ds = _open_user(read, split if sliced else "all", resolution, count, skip_bad, progress)
    ds.measured = measured(read, split, sliced, len(ds), ds.total)
    return ds


def user_items(items: list[tuple], split: str, count: int | None) -> list[tuple]:
    """(path, payload, name, ...) items of a user's source: those `split` holds ("all": every one), the first
    `count` of them."""
    if split != "all":
        items = [it for it, keep in zip(items, _keep([it[2] for it in items], split)) if keep]
    return items[:count] if count else items


def _open_user(source: str, split: str, resolution: int, count: int | None, skip_bad: bool, progress: bool):
    path = Path(source)
    if "{" in source and source.endswith(".tar"):
        return _load_webdataset(source, resolution, count, skip_bad, progress, split)
    if not path.exists():
        raise VlmedgeError(f"data source not found: {source} (expected 'shapes', an image folder with "
                           "metadata.jsonl, a COCO captions .json or WebDataset .tar shards)")
    if path.is_dir() and (path / "metadata.jsonl").is_file():
        items = _imagefolder_items(path)
    elif path.is_dir() and _class_folders(path):
        items = _class_folder_items(path)
    elif path.suffix == ".json":
        items = _coco_items(path)
    elif path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar"))):
        return _load_webdataset(source, resolution, count, skip_bad, progress, split)
    else:
        raise VlmedgeError(f"{source}: unrecognised dataset (no metadata.jsonl, no class folders of images, not a "
                           ".json or .tar)")
    ds = load_pairs(user_items(items, split, count), resolution, skip_bad, progress)
    ds.total = len(items)
    if ds.labels is not None:
        ds.source_labels = sorted({it[3] for it in items})
    return ds


def inside_root(root: Path, name: str, where: str) -> Path:
    """`root/name`, refusing names that leave the dataset root (absolute paths, `..`, links outside)."""
    candidate = (root / name).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise VlmedgeError(f"{where}: {name!r} points outside the dataset root {root}")
    return candidate


def _label(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise VlmedgeError(f"{where}: label {value!r} is empty or not a string or integer")
    return str(value).strip()


def _templated(label: str) -> list[str]:
    return [t.format(class_name(label)) for t in CAPTION_TEMPLATES]


def metadata_records(meta: Path):
    """(where, record, file_name) per non-empty line of an image folder's metadata.jsonl (`where`: file:line); a
    one-line error naming the line for text that is not UTF-8, a line that is not a JSON object, a missing file_name
    or one that is not a string."""
    try:
        text = meta.read_text()
    except UnicodeDecodeError as e:
        raise VlmedgeError(f"{meta}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{meta}:{lineno}"
        try:
            rec = json.loads(line)
            name = rec["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise VlmedgeError(f"{where}: expected a JSON object with file_name ({e})") from None
        except RecursionError:
            raise VlmedgeError(f"{where}: JSON nested too deeply") from None
        if not isinstance(name, str) or not name.strip():
            raise VlmedgeError(f"{where}: file_name {shown(name)} is not a file name (a string)")
        yield where, rec, name


def _imagefolder_items(root: Path) -> list[tuple]:
    """(path, captions, name[, label]) per metadata.jsonl record; a record with a label and no text is captioned
    from `CAPTION_TEMPLATES`."""
    meta = root / "metadata.jsonl"
    items = []
    for where, rec, name in metadata_records(meta):
        if "text" not in rec and "label" not in rec:
            raise VlmedgeError(f"{where}: expected a JSON object with file_name and text or label ('text')")
        label = _label(rec["label"], where) if "label" in rec else None
        text = rec.get("text", _templated(label) if label else None)
        texts = text if isinstance(text, list) else [text]
        if not texts:
            raise VlmedgeError(f"{where}: no caption")
        items.append((inside_root(root, name, where), [checked_text(t, where) for t in texts], name, label))
    if not items:
        raise VlmedgeError(f"{meta}: no records")
    labelled = sum(it[3] is not None for it in items)
    if 0 < labelled < len(items):
        first = next(i for i, it in enumerate(items) if it[3] is None)
        raise VlmedgeError(f"{meta}: {len(items) - labelled} of {len(items)} records have no label (e.g. "
                           f"{items[first][2]!r}); label every record or none")
    return items if labelled else [it[:3] for it in items]


def _class_folders(root: Path) -> list[Path]:
    """Subfolders of `root` holding images (the ImageFolder layout), sorted by name; hidden folders skipped."""
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir() if f.is_file()))


def _class_folder_items(root: Path) -> list[tuple]:
    """`root/<class>/<image>`: the class is the label, captions come from templates. Items interleave the classes
    (one of each in turn, files sorted), so any prefix (`count`) holds every class in proportion."""
    per_class = []
    for d in _class_folders(root):
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        per_class.append([(inside_root(root, f"{d.name}/{f.name}", str(root)), _templated(d.name), f"{d.name}/{f.name}",
                           d.name) for f in files])
    return [group[k] for k in range(max(map(len, per_class))) for group in per_class if k < len(group)]


def _coco_items(path: Path) -> list[tuple[Path, list[str], str]]:
    try:
        coco = json.loads(path.read_text())
        images = {im["id"]: im["file_name"] for im in coco["images"]}
        annotations = coco["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise VlmedgeError(f"{path}: not a COCO captions file (images, annotations with image_id/caption): {e}") \
            from None
    texts: dict[int, list[str]] = {}
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise VlmedgeError(f"{path}: annotations[{k}] needs image_id and caption, got {str(ann)[:80]}")
        texts.setdefault(ann["image_id"], []).append(checked_text(ann["caption"], f"{path}: annotations[{k}]"))
    dangling = [i for i in texts if i not in images]
    if dangling and len(dangling) == len(texts):
        raise VlmedgeError(f"{path}: no annotation's image_id is among the images' ids (e.g. {dangling[0]!r})")
    if dangling:
        import sys

        print(f"warning: {path}: {len(dangling)} image_id(s) with captions but no image entry (e.g. "
              f"{dangling[0]!r}); their captions are skipped", file=sys.stderr)
    root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    return [(inside_root(root, images[i], str(path)), caps, images[i]) for i, caps in texts.items() if i in images]


def _decode(data: bytes | Path, resolution: int | None):
    """An image resized and cropped to `resolution`, or with `resolution` None only its header read and checked.
    Raises OSError or ValueError for what is not an image or is too large (checked from the header)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:  # checked from the header, before decoding
                raise ValueError(f"{im.width} x {im.height} pixels, more than the {MAX_IMAGE_PIXELS} allowed")
            if resolution is None:
                return None
            im.load()
            return resize_crop([im], resolution, resolution)[0]
    except Image.DecompressionBombError as e:  # PIL's own limit (not an OSError): skippable like any bad image
        raise ValueError(str(e)) from None


def load_pairs(items, resolution: int, skip_bad: bool, progress: bool = False) -> PairsDataset:
    """Items are (path, captions, name) or (path, captions, name, label)."""
    images, texts, names, labels, skipped = [], [], [], [], []
    with Progress("decoding images", len(items), enabled=progress and len(items) >= LARGE, unit="images") as bar:
        for k, (path, caps, name, *label) in enumerate(items):
            try:
                images.append(_decode(path, resolution))
            except (OSError, ValueError) as e:
                if not skip_bad:
                    raise VlmedgeError(f"{path}: cannot read image ({type(e).__name__}: {e}); "
                                       "use --skip-bad to skip and count such files") from None
                skipped.append(name)
                continue
            finally:
                bar.update(k + 1)
            texts.append(caps)
            names.append(name)
            labels += label
    if not images:
        where = f" ({items[0][0].parent})" if items else ""
        raise VlmedgeError(f"dataset{where} has no readable images ({len(skipped)} skipped as unreadable)")
    return PairsDataset(np.stack(images), texts, names, skipped, labels if labels else None)


def expand_shards(pattern: str) -> list[Path]:
    """`shard-{000000..000099}.tar` (zero-padded numeric ranges) and `{a,b}` alternatives, as WebDataset writes
    shard sets; every expanded name must exist."""
    import re

    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [Path(pattern)]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        a, b = numeric.groups()
        if int(b) < int(a):
            raise VlmedgeError(f"{pattern}: range {{{body}}} runs backwards")
        choices = [str(k).zfill(len(a)) for k in range(int(a), int(b) + 1)]
    else:
        choices = body.split(",")
    return [p for c in choices for p in expand_shards(head + c + tail)]


def _shard_list(source: str) -> list[Path]:
    path = Path(source)
    shards = expand_shards(source) if "{" in source else [path] if path.is_file() else sorted(path.glob("*.tar"))
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise VlmedgeError(f"{source}: shard {missing[0]} not found ({len(missing)} of {len(shards)} missing)")
    return shards


def _load_webdataset(source: str, resolution: int, count: int | None, skip_bad: bool,
                     progress: bool = False, split: str = "all") -> ShardDataset:
    """Index shards: one pass over the tar headers (image data is skipped by seeking; only each image's first
    bytes are read, to check it opens), captions read. Samples are `key.<image ext>` + `key.txt` pairs; `split`
    keeps those it holds (`held_out` of `shard.tar:key`; a held-out slice that would be empty is the first
    sample)."""
    shards = _shard_list(source)
    where, texts, names, skipped = [], [], [], []
    total, first = 0, None
    with Progress("indexing shards", len(shards), enabled=progress and len(shards) > 1, unit="shards") as bar:
        for k, shard in enumerate(shards):
            groups: dict[str, dict[str, Any]] = {}
            try:
                with tarfile.open(shard) as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        name = member.name
                        if name.startswith("/") or ".." in Path(name).parts:
                            raise VlmedgeError(f"{shard}: member {name!r} points outside the shard")
                        stem, _, ext = name.partition(".")
                        ext = ext.lower()
                        if ext == "txt":
                            f = tar.extractfile(member)
                            groups.setdefault(stem, {})[ext] = f.read() if f else b""
                        elif f".{ext}" in IMAGE_SUFFIXES:
                            groups.setdefault(stem, {})[ext] = (member.offset_data, member.size)
            except tarfile.TarError as e:
                raise VlmedgeError(f"{shard}: not a readable tar file ({e})") from None
            with open(shard, "rb") as f:
                for stem, parts in groups.items():
                    image_ext = next((e for e in parts if e != "txt"), None)
                    if image_ext is None or "txt" not in parts:
                        continue
                    caption = checked_text(parts["txt"].decode("utf-8", "replace").strip(), f"{shard}: {stem}.txt")
                    offset, size = parts[image_ext]
                    f.seek(offset)
                    try:
                        _decode(f.read(min(size, 65536)), None)  # the header: is it an image, of an allowed size
                    except (OSError, ValueError) as e:
                        if not skip_bad:
                            raise VlmedgeError(f"{shard}: {stem}.{image_ext}: cannot decode image ({e}); "
                                               "use --skip-bad to skip and count such files") from None
                        skipped.append(f"{shard.name}:{stem}")
                        continue
                    total += 1
                    sample = ((k, offset, size), [caption], f"{shard}:{stem}.{image_ext}")
                    if split != "all" and held_out(f"{shard.name}:{stem}") != (split != "train"):
                        first = first or sample
                        continue
                    where.append(sample[0])
                    texts.append(sample[1])
                    names.append(sample[2])
                    if count and len(texts) >= count:
                        break
            bar.update(k + 1)
            if count and len(texts) >= count:
                break
    if not texts and first and split not in ("train", "all"):
        where, texts, names = [first[0]], [first[1]], [first[2]]
    if not texts:
        raise VlmedgeError(f"{source}: no image + .txt pairs found in {len(shards)} shard(s)")
    ds = ShardDataset(shards, np.asarray(where, dtype=np.int64), texts, names, skipped, resolution)
    ds.total = total
    return ds
