"""Questions and answers over images: shapes' generated VQA, and the formats users have (VQA v2, image folders).

A VQA dataset has the image interface of the caption datasets (``len``, ``images(indices)``, ``neighbours``) and

* ``training_captions(indices, rng)`` -> ([(question, answer)], [question type]): one question drawn anew per image
  at every step (what the one training loop draws);
* ``eval_items(count, seed)`` -> fixed `Item`s (image index, question, every accepted answer, type, held-out flag);
* ``references(index)`` -> every true caption of an image (captioning metrics score against all of them);
* ``describe(text, index)`` -> whether a generated caption states only what is true of the image, or None where the
  data cannot tell (only shapes can).

On shapes every question type is drawn from several templates, deterministically per (seed, index); the held-out
colour x shape combinations never appear in the train split (`shapes.HELD_OUT`), so questions about them measure
composition. Question types: colour, shape, size, count, position, relation, yes/no and describe (a caption).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ...data import (checked_text, inside_root, is_shapes, load_pairs, measured, metadata_records, open_dataset, shown,
                     split_source, user_items)
from ...data.shapes import COLOURS, HELD_OUT, SHAPES, Obj, caption, matches, relation, where_words, with_articles
from ...errors import VlmedgeError

QUESTION_TYPES = ("colour", "shape", "size", "count", "position", "relation", "yes/no", "describe")
DESCRIBE = ("describe the image.", "what is in the picture?", "write a caption for this image.")
_RELATION_ANSWER = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}


@dataclass(frozen=True)
class Item:
    """One evaluation question: the image, the question, every accepted answer, its type and whether the image holds
    a colour x shape combination never seen in training."""

    index: int
    question: str
    answers: tuple[str, ...]
    type: str
    held_out: bool = False


def _name(o: Obj, rng: np.random.Generator) -> str:
    """'the red circle', or a quarter of the time 'the circle' (a lone object needs no colour to be named)."""
    return str(rng.choice([f"the {o.colour} {o.shape}", f"the {o.shape}"])) if rng.random() < 0.5 \
        else f"the {o.colour} {o.shape}"


def shapes_question(objs: Sequence[Obj], kind: str, rng: np.random.Generator) -> tuple[str, str]:
    """A question of type `kind` about these objects and its answer (single-object types ask about the first)."""
    o = objs[0]
    if kind == "colour":
        q = str(rng.choice(["what colour is the {s}?", "what is the colour of the {s}?", "which colour is the {s}?"]))
        if len(objs) == 2 and objs[1].shape == o.shape:
            return f"what colour is the {o.shape} {where_words(o)}?", o.colour
        return q.format(s=o.shape), o.colour
    if kind == "shape":
        if len(objs) == 2 and objs[1].colour == o.colour:
            return f"what shape is the {o.colour} object {where_words(o)}?", o.shape
        q = str(rng.choice(["what shape is the {c} object?", "which shape is {c}?", "what is the {c} shape?"]))
        return q.format(c=o.colour), o.shape
    if kind == "size":
        return str(rng.choice(["is the {c} {s} small or large?", "what size is the {c} {s}?"])).format(
            c=o.colour, s=o.shape), o.size
    if kind == "count":
        q = str(rng.choice(["how many objects are there?", "how many shapes are in the image?",
                            "how many things can you see?"]))
        return q, "one" if len(objs) == 1 else "two"
    if kind == "position":
        q = str(rng.choice(["where is {n}?", "in which part of the image is {n}?"]))
        return q.format(n=_name(o, rng) if len(objs) == 1 else f"the {o.colour} {o.shape}"), o.position
    if kind == "relation":
        a, b = objs
        q = str(rng.choice(["where is the {c1} {s1} relative to the {c2} {s2}?",
                            "is the {c1} {s1} left of, right of, above or below the {c2} {s2}?"]))
        return q.format(c1=a.colour, s1=a.shape, c2=b.colour, s2=b.shape), _RELATION_ANSWER[relation(a, b)]
    if kind == "yes/no":
        true = rng.random() < 0.5
        colour, shape = o.colour, o.shape
        if not true:
            present = {(x.colour, x.shape) for x in objs}
            while (colour, shape) in present:
                if rng.random() < 0.5:
                    colour = str(rng.choice(list(COLOURS)))
                else:
                    shape = str(rng.choice(SHAPES))
        q = str(rng.choice(["is there a {c} {s}?", "is there a {c} {s} in the image?", "do you see a {c} {s}?"]))
        return with_articles(q.format(c=colour, s=shape)), "yes" if true else "no"
    if kind == "describe":
        return str(rng.choice(DESCRIBE)), caption(objs, rng)[0]
    raise ValueError(kind)


TYPE_WEIGHTS = {"relation": 3.0}
"""How much more often a type is asked in training than the others. Relations are asked of two-object images only
(30 % of them), so at an even mix they were 4 % of the questions. (Weighting yes/no 3x as well, measured on
vqa-small: yes/no 0.55 -> 0.67, relation 0.54 -> 0.40, overall 0.790 -> 0.777; not kept.)"""


def _types_for(objs: Sequence[Obj]) -> tuple[tuple[str, ...], np.ndarray]:
    types = QUESTION_TYPES if len(objs) == 2 else tuple(t for t in QUESTION_TYPES if t != "relation")
    weights = np.array([TYPE_WEIGHTS.get(t, 1.0) for t in types])
    return types, weights / weights.sum()


class ShapesVQA:
    """shapes with questions: every image can be asked every type that applies to it."""

    def __init__(self, base):
        self.base = base  # a data.ShapesDataset
        self.objects = base.data.objects
        self.measured = base.measured

    def __len__(self) -> int:
        return len(self.base)

    def images(self, indices):
        return self.base.images(indices)

    def neighbours(self, index, rng):
        return self.base.neighbours(index, rng)

    def captions(self, indices, rng):
        return self.base.captions(indices, rng)

    def training_captions(self, indices, rng):
        pairs, kinds = [], []
        for i in indices:
            objs = self.objects[i]
            types, p = _types_for(objs)
            kind = str(rng.choice(types, p=p))
            pairs.append(shapes_question(objs, kind, rng))
            kinds.append(kind)
        return pairs, kinds

    def eval_items(self, count: int, seed: int = 0) -> list[Item]:
        """`count` questions, the types in turn (relation only on two-object images), fixed per (seed, index)."""
        items: list[Item] = []
        pairs = [i for i, o in enumerate(self.objects) if len(o) == 2]
        for k in range(count):
            kind = QUESTION_TYPES[k % len(QUESTION_TYPES)]
            rng = np.random.default_rng([seed, k, 5])
            index = int(pairs[k // len(QUESTION_TYPES) % len(pairs)]) if kind == "relation" and pairs \
                else k % len(self)
            objs = self.objects[index]
            if kind == "relation" and len(objs) != 2:
                continue
            q, a = shapes_question(objs, kind, rng)
            answers = tuple(self.references(index)) if kind == "describe" else (a,)
            items.append(Item(index, q, answers, kind, any((o.colour, o.shape) in HELD_OUT for o in objs)))
        return items

    def references(self, index: int) -> list[str]:
        """Every caption the templates can write for the image (both orders of a pair)."""
        out: set[str] = set()
        objs = self.objects[index]
        for s in range(64):
            out.add(caption(objs, np.random.default_rng([s, 99]))[0])
        return sorted(out)

    def describe(self, text: str, index: int) -> bool | None:
        spec = parse_caption(text)
        return spec is not None and matches(self.objects[index], spec)


_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_OBJ = rf"(?:(small|large) )?({_COLOUR}) ({_SHAPE})|(?:(small|large) )?({_SHAPE}) coloured ({_COLOUR})"
_REL = "|".join(_RELATION_ANSWER)


def parse_caption(text: str):
    """A caption's claim as a shapes spec (what `shapes.matches` checks), or None when it is not one of the shapes
    caption forms: one object with its colour, shape and optionally size and position; or two objects and the
    relation between them."""
    t = " ".join(text.lower().replace(".", " ").split())
    objs = [(m.group(3) or m.group(5), m.group(2) or m.group(6), m.group(1) or m.group(4))
            for m in re.finditer(_OBJ, t)]
    objs = [(c, s, z) for s, c, z in objs]
    rel = re.search(_REL, t)
    if len(objs) == 2 and rel:
        return ("two", objs[0], rel.group(0), objs[1])
    if len(objs) != 1 or rel:
        return None
    where = re.search(r"(?:on the|in the) (top left|top right|bottom left|bottom right|top|bottom|left|right|center)",
                      t)
    c, s, z = objs[0]
    return ("one", c, s, z, where.group(1) if where else None)


# --- users' data --------------------------------------------------------------------------------------------------

class UserVQA:
    """Images with questions and answers (VQA v2 JSON pair or an image folder's metadata.jsonl), or captions (COCO,
    WebDataset, metadata `text`) asked as "describe the image"."""

    def __init__(self, pictures, rows: list[list[tuple[str, tuple[str, ...], str]]], captions: bool):
        """`pictures`: the loaded dataset whose `images(indices)` gives each row's image (decoded in memory, or
        shards read per batch)."""
        self.pictures, self.rows, self.is_captions = pictures, rows, captions
        self.measured, self.skipped = pictures.measured, pictures.skipped

    def __len__(self) -> int:
        return len(self.rows)

    def images(self, indices):
        return self.pictures.images(indices)

    def captions(self, indices, rng):
        return [self.rows[i][rng.integers(len(self.rows[i]))][1][0] for i in indices]

    def training_captions(self, indices, rng):
        pairs, kinds = [], []
        for i in indices:
            q, answers, kind = self.rows[i][rng.integers(len(self.rows[i]))]
            pairs.append((q, answers[rng.integers(len(answers))]))
            kinds.append(kind)
        return pairs, kinds

    def eval_items(self, count: int, seed: int = 0) -> list[Item]:
        """Every question of each image (an image's captions are one describe item scored against all of them)."""
        items: list[Item] = []
        for i, rows in enumerate(self.rows):
            questions = [(q, answers, kind) for q, answers, kind in rows if kind != "describe"]
            if len(questions) < len(rows):
                items.append(Item(i, DESCRIBE[0], tuple(self.references(i)), "describe"))
            items += [Item(i, q, answers, kind) for q, answers, kind in questions]
        return items[:count]

    def references(self, index: int) -> list[str]:
        return [a for q, answers, kind in self.rows[index] if kind == "describe" for a in answers]

    def describe(self, text: str, index: int) -> bool | None:
        return None


def _text(value, where: str, what: str) -> str:
    return checked_text(value, where, what).strip()


def _id(value, where: str, what: str):
    """A question or image id: an integer or a non-empty string (JSON lists, objects, booleans and floats are not
    ids)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise VlmedgeError(f"{where}: {what} {shown(value)} is not an id (an integer or a string)")
    return value


def _vqa_v2(questions_path: Path, annotations_path: Path, root: Path) -> list[tuple[Path, list, str]]:
    """VQA v2's pair: questions (`questions`: image_id, question, question_id) and annotations (`annotations`:
    question_id, answers [{answer}], answer_type / question_type)."""
    def load(path: Path, key: str) -> list:
        try:
            data = json.loads(path.read_text())
            rows = data[key]
        except UnicodeDecodeError as e:
            raise VlmedgeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except RecursionError:
            raise VlmedgeError(f"{path}: JSON nested too deeply to be a VQA v2 {key} file") from None
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise VlmedgeError(f"{path}: not a VQA v2 {key} file (a JSON object with {key!r}): {e}") from None
        if not isinstance(rows, list):
            raise VlmedgeError(f"{path}: {key!r} is not a list")
        return rows

    questions, seen = {}, {}
    for k, q in enumerate(load(questions_path, "questions")):
        where = f"{questions_path}: questions[{k}]"
        if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= set(q):
            raise VlmedgeError(f"{where}: needs question_id, image_id and question")
        qid = _id(q["question_id"], where, "question_id")
        if qid in questions:  # which image would its answers belong to?
            raise VlmedgeError(f"{where}: question_id {qid!r} is also questions[{seen[qid]}]; ids must be unique")
        questions[qid], seen[qid] = (_id(q["image_id"], where, "image_id"), _text(q["question"], where, "question")), k
    by_image: dict = {}
    answered: dict = {}
    for k, a in enumerate(load(annotations_path, "annotations")):
        where = f"{annotations_path}: annotations[{k}]"
        if not isinstance(a, dict) or "question_id" not in a or "answers" not in a:
            raise VlmedgeError(f"{where}: needs question_id and answers")
        if _id(a["question_id"], where, "question_id") in answered:
            raise VlmedgeError(f"{where}: question_id {a['question_id']!r} is also annotations"
                               f"[{answered[a['question_id']]}]; one annotation per question")
        answered[a["question_id"]] = k
        if a["question_id"] not in questions:
            raise VlmedgeError(f"{where}: question_id {a['question_id']!r} is not among the questions of "
                               f"{questions_path}")
        if not isinstance(a["answers"], list) or not a["answers"]:
            raise VlmedgeError(f"{where}: answers must be a non-empty list")
        answers = tuple(_text(x.get("answer") if isinstance(x, dict) else x, f"{where}.answers[{j}]", "answer")
                        for j, x in enumerate(a["answers"]))
        image_id, question = questions[a["question_id"]]
        kind = str(a.get("answer_type") or a.get("question_type") or "other")
        by_image.setdefault(image_id, []).append((question, answers, kind))
    out = []
    for image_id, rows in by_image.items():
        name = str(image_id)
        if isinstance(image_id, int):  # COCO's file names end in the 12-digit id (COCO_train2014_000000000001.jpg)
            exact = f"COCO_{image_id:012d}.jpg"
            found = [exact] if (root / exact).is_file() else sorted(p.name for p in root.glob(f"*{image_id:012d}.*"))
            name = found[0] if found else exact
        out.append((inside_root(root, name, str(annotations_path)), rows, name))
    return out


def _metadata_rows(root: Path) -> tuple[list[tuple[Path, list, str]], bool]:
    """An image folder's metadata.jsonl rows with `question` + `answer` (a string or a list), or `text` captions."""
    meta = root / "metadata.jsonl"
    items, captions = {}, True
    for where, rec, name in metadata_records(meta):
        if "question" in rec:
            answer = rec.get("answer")
            answers = answer if isinstance(answer, list) and answer else [answer]
            row = (_text(rec["question"], where, "question"),
                   tuple(_text(a, where, "answer") for a in answers),
                   _text(rec.get("question_type", "other"), where, "question_type"))
            captions = False
        elif "text" in rec:
            texts = rec["text"] if isinstance(rec["text"], list) else [rec["text"]]
            row = (DESCRIBE[0], tuple(_text(t, where, "caption") for t in texts), "describe")
        else:
            raise VlmedgeError(f"{where}: expected question and answer (or text for a caption)")
        items.setdefault(name, (inside_root(root, name, where), [], name))[1].append(row)
    if not items:
        raise VlmedgeError(f"{meta}: no records")
    return list(items.values()), captions


def open_vqa(source: str, split: str = "all", *, resolution: int, count: int | None = None, skip_bad: bool = False,
             seed: int = 0, progress: bool = False):
    """A VQA dataset by its source: shapes[:COUNT], a VQA v2 pair (`questions.json+annotations.json` or a folder
    holding `*questions*.json` and `*annotations*.json` beside the images), an image folder with metadata.jsonl
    (question/answer or text rows), or any caption source of `open_dataset` (COCO .json, .tar shards) asked as
    "describe the image"."""
    if is_shapes(source):
        return ShapesVQA(open_dataset(source, split, resolution=resolution, count=count, seed=seed,
                                      progress=progress))
    read, sliced = split_source(source, split)
    if "+" in read and read.endswith(".json"):
        q, a = (Path(p) for p in read.split("+", 1))
        items, captions = _vqa_v2(q, a, q.parent / "images" if (q.parent / "images").is_dir() else q.parent), False
    else:
        path = Path(read)
        qs, ans = (sorted(path.glob(f"*{k}*.json")) if path.is_dir() else [] for k in ("questions", "annotations"))
        if len(qs) > 1 or len(ans) > 1:
            raise VlmedgeError(f"{read}: holds {len(qs)} question files and {len(ans)} annotation files "
                               f"({', '.join(p.name for p in qs + ans)}); give one pair as "
                               "QUESTIONS.json+ANNOTATIONS.json")
        if qs and ans:
            root = path / "images" if (path / "images").is_dir() else path
            items, captions = _vqa_v2(qs[0], ans[0], root), False
        elif path.is_dir() and (path / "metadata.jsonl").is_file():
            items, captions = _metadata_rows(path)
        else:
            ds = open_dataset(source, split, resolution=resolution, count=count, skip_bad=skip_bad)
            rows = [[(DESCRIBE[0], tuple(t), "describe")] for t in ds.texts]
            return UserVQA(ds, rows, True)
    loaded = load_pairs(user_items(items, split if sliced else "all", count), resolution, skip_bad)
    loaded.measured = measured(read, split, sliced, len(loaded), len(items))
    return UserVQA(loaded, loaded.texts, captions)
