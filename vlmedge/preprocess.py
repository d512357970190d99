"""How raw RGB images become pixel values: one record, saved with every model folder and every export.

Two forms. The CLIP/SigLIP form gives one square image per input (shortest side + centre crop, or squashed). The
SmolVLM form (`longest_edge` set) is Idefics3's processor as transformers implements it: the longest edge resized to
`longest_edge`, then either the whole image squashed to one `image_size` tile, or (`splitting`) resized up to a grid
of `image_size` tiles, cut into them, with the whole image squashed to one more tile after them (the global image).
Resizing is PIL's, as in transformers' PIL processors, so pixel values agree with theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IDEFICS3 = ("Idefics3ImageProcessor", "SmolVLMImageProcessor")
SPLITTING = ("on", "off", "as-folder")
"""The image-splitting settings: tiles, one global image, or as the model's processor config says."""
MAX_IMAGE_SIZE = 4096
"""Idefics3's bound on the longest edge after its first resize."""


class Frames(NamedTuple):
    """One image as the vision encoder reads it: `pixel_values` (frames, 3, H, W), and the tile grid (`rows` x `cols`
    tiles before the global image; 0 x 0 when the image is one frame)."""

    pixel_values: Any
    rows: int
    cols: int


@dataclass
class Preprocess:
    """How raw RGB images become pixel values; recorded with every model and every export."""

    image_size: int
    image_mean: list[float]
    image_std: list[float]
    resize: int | None = None  # shortest side before the centre crop; defaults to image_size
    squash: bool = False
    """Resize the whole image to image_size x image_size (SigLIP's processor) instead of shortest side + crop."""
    longest_edge: int | None = None
    """SmolVLM's processor (Idefics3's `size`): the longest edge an image is resized to first; `image_size` is then
    its `max_image_size`, the side of a tile."""
    splitting: bool = False
    """SmolVLM's `do_image_splitting`: the image cut into tiles, plus the global image."""
    resample: int = 3
    """PIL's filter (3 bicubic: CLIP's; 1 Lanczos: SmolVLM's)."""

    def __post_init__(self):
        for key in ("image_size", "longest_edge", "resize"):
            value = getattr(self, key)
            if value is not None and (type(value) is not int or not 0 < value <= MAX_IMAGE_SIZE):
                raise ValueError(f"{key} = {value!r}; expected a positive integer up to {MAX_IMAGE_SIZE}")
        if self.resample not in (0, 1, 2, 3, 4, 5):
            raise ValueError(f"resample = {self.resample!r} is not a PIL filter (0-5)")

    @property
    def tiles(self) -> bool:
        """SmolVLM's processor (the form that can split an image into tiles)."""
        return self.longest_edge is not None

    def with_splitting(self, setting: str) -> "Preprocess":
        """This processing with splitting `on`, `off` or `as-folder` (unchanged); only SmolVLM's form splits."""
        if setting == "as-folder":
            return self
        if setting not in SPLITTING:
            raise ValueError(f"image splitting {setting!r}; expected one of {', '.join(SPLITTING)}")
        if setting == "on" and not self.tiles:
            raise ValueError("image splitting needs SmolVLM's image processor (max_image_size and size.longest_edge); "
                             "this model's preprocessing gives one square image")
        return replace(self, splitting=setting == "on")

    def to_hf(self) -> dict[str, Any]:
        common = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                  "image_mean": self.image_mean, "image_std": self.image_std, "resample": self.resample,
                  "do_convert_rgb": True}
        if self.tiles:
            return {"image_processor_type": "Idefics3ImageProcessor", **common, "do_pad": True,
                    "do_image_splitting": self.splitting, "size": {"longest_edge": self.longest_edge},
                    "max_image_size": {"longest_edge": self.image_size}}
        if self.squash:
            return {"image_processor_type": "SiglipImageProcessor", **common,
                    "size": {"height": self.image_size, "width": self.image_size}}
        return {"image_processor_type": "CLIPImageProcessor", **common,
                "size": {"shortest_edge": self.resize or self.image_size}, "do_center_crop": True,
                "crop_size": {"height": self.image_size, "width": self.image_size}}

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], fallback_size: int) -> "Preprocess":
        size = cfg.get("size")
        if "max_image_size" in cfg or cfg.get("image_processor_type") in IDEFICS3:
            tile, first = cfg.get("max_image_size", {"longest_edge": fallback_size}), size or {"longest_edge": 1456}
            if not (isinstance(tile, dict) and "longest_edge" in tile and isinstance(first, dict)
                    and "longest_edge" in first):
                raise ValueError("max_image_size and size must be {\"longest_edge\": N} objects")
            return cls(tile["longest_edge"], list(cfg.get("image_mean", [0.5] * 3)),
                       list(cfg.get("image_std", [0.5] * 3)), longest_edge=first["longest_edge"],
                       splitting=bool(cfg.get("do_image_splitting", True)), resample=int(cfg.get("resample", 1)))
        mean, std = list(cfg.get("image_mean", CLIP_MEAN)), list(cfg.get("image_std", CLIP_STD))
        if isinstance(size, dict) and "height" in size and not cfg.get("do_center_crop", False):
            return cls(int(size["height"]), mean, std, squash=True)  # SigLIP: resize to the square, no crop
        crop = cfg.get("crop_size", fallback_size)
        crop = crop.get("height", fallback_size) if isinstance(crop, dict) else int(crop)
        size = size if size is not None else crop
        size = (size.get("shortest_edge") or size.get("height") or crop) if isinstance(size, dict) else int(size)
        return cls(int(crop), mean, std, int(size))

    def __call__(self, images):
        """uint8 NHWC (or a list of PIL images) -> float32 NCHW pixel values, one frame per image (SmolVLM's form:
        the image as its processor gives it with splitting off, whatever `splitting` says; `frames` splits)."""
        return self.normalise(resize_crop(images, self.resize or self.image_size, self.image_size,
                                          squash=self.squash, longest_edge=self.longest_edge, resample=self.resample))

    def frames(self, image) -> Frames:
        """One image (uint8 HWC or PIL) as the vision encoder reads it: with `splitting`, its tiles and then the
        global image, as Idefics3's processor cuts them; otherwise one frame."""
        import numpy as np

        if not (self.tiles and self.splitting):
            return Frames(self([image]), 0, 0)
        im = _resized(_rgb(image), self.longest_edge, self.resample)
        tile = self.image_size
        w, h = im.size  # up to whole tiles, the aspect ratio kept as Idefics3 rounds it
        if w >= h:
            w = math.ceil(w / tile) * tile
            h = math.ceil(int(w / (im.size[0] / im.size[1])) / tile) * tile
        else:
            h = math.ceil(h / tile) * tile
            w = math.ceil(int(h * (im.size[0] / im.size[1])) / tile) * tile
        im = _resize(im, w, h, self.resample)
        if w <= tile and h <= tile:
            return Frames(self.normalise(np.asarray(im)[None]), 0, 0)
        rows, cols = h // tile, w // tile
        arr = np.asarray(im)
        parts = [arr[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
        parts.append(np.asarray(_resize(im, tile, tile, self.resample)))
        return Frames(self.normalise(np.stack(parts)), rows, cols)

    def normalise(self, arr):
        """uint8 NHWC -> float32 NCHW: rescaled to 0..1 and normalised by the mean and std."""
        import numpy as np

        x = (arr.astype(np.float64) / 255.0).astype(np.float32)
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _rgb(image):
    import numpy as np
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    return im.convert("RGB")


def _resize(im, w: int, h: int, resample: int):
    return im if im.size == (w, h) else im.resize((w, h), resample)


def _resized(im, longest_edge: int, resample: int):
    """Idefics3's first resize: the longest edge to `longest_edge` (the other rounded up to an even size), both
    within MAX_IMAGE_SIZE."""
    w, h = im.size
    aspect = w / h
    if w >= h:
        w, h = longest_edge, int(longest_edge / aspect)
        h += h % 2
    else:
        h, w = longest_edge, int(longest_edge * aspect)
        w += w % 2
    if w >= h and w > MAX_IMAGE_SIZE:
        w, h = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / (w / h))
    elif h > w and h > MAX_IMAGE_SIZE:
        h, w = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * (w / h))
    return _resize(im, max(w, 1), max(h, 1), resample)


def resize_crop(images, short_side: int, crop: int, squash: bool = False, longest_edge: int | None = None,
                resample: int = 3):
    """Images at `crop` x `crop`: the shortest side resized to `short_side` and the centre cropped, or (`squash`)
    the whole image resized to the square, or (`longest_edge`) SmolVLM's global image: the longest edge resized to
    it, then the whole image to the square."""
    import numpy as np

    identity = longest_edge in (None, crop)
    if identity and isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:3] == (crop, crop):
        return images  # already at the model's resolution (the shapes dataset renders there)
    out = []
    for im in images:
        im = _rgb(im)
        if longest_edge is not None:
            im = _resize(_resized(im, longest_edge, resample), crop, crop, resample)
        elif squash:
            im = _resize(im, crop, crop, resample)
        else:
            w, h = im.size
            scale = short_side / min(w, h)
            im = _resize(im, max(crop, round(w * scale)), max(crop, round(h * scale)), resample)
            w, h = im.size
            left, top = (w - crop) // 2, (h - crop) // 2
            im = im.crop((left, top, left + crop, top + crop))
        out.append(np.asarray(im, dtype=np.uint8))
    return np.stack(out)
