"""How raw RGB images become pixel values: one record, saved with every model folder and every export."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class Preprocess:
    """How raw RGB images become pixel values; recorded with every model and every export."""

    image_size: int
    image_mean: list[float]
    image_std: list[float]
    resize: int | None = None  # shortest side before the centre crop; defaults to image_size
    squash: bool = False
    """Resize the whole image to image_size x image_size (SigLIP's processor) instead of shortest side + crop."""

    def to_hf(self) -> dict[str, Any]:
        common = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                  "image_mean": self.image_mean, "image_std": self.image_std, "resample": 3, "do_convert_rgb": True}
        if self.squash:
            return {"image_processor_type": "SiglipImageProcessor", **common,
                    "size": {"height": self.image_size, "width": self.image_size}}
        return {"image_processor_type": "CLIPImageProcessor", **common,
                "size": {"shortest_edge": self.resize or self.image_size}, "do_center_crop": True,
                "crop_size": {"height": self.image_size, "width": self.image_size}}

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], fallback_size: int) -> "Preprocess":
        size = cfg.get("size")
        mean, std = list(cfg.get("image_mean", CLIP_MEAN)), list(cfg.get("image_std", CLIP_STD))
        if isinstance(size, dict) and "height" in size and not cfg.get("do_center_crop", False):
            return cls(int(size["height"]), mean, std, squash=True)  # SigLIP: resize to the square, no crop
        crop = cfg.get("crop_size", fallback_size)
        crop = crop.get("height", fallback_size) if isinstance(crop, dict) else int(crop)
        size = size if size is not None else crop
        size = (size.get("shortest_edge") or size.get("height") or crop) if isinstance(size, dict) else int(size)
        return cls(int(crop), mean, std, int(size))

    def __call__(self, images):
        """uint8 NHWC (or a list of PIL images) -> float32 NCHW pixel values."""
        import numpy as np

        arr = resize_crop(images, self.resize or self.image_size, self.image_size, squash=self.squash)
        x = arr.astype(np.float32) / 255.0
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def resize_crop(images, short_side: int, crop: int, squash: bool = False):
    """Images at `crop` x `crop`: the shortest side resized to `short_side` and the centre cropped, or (`squash`)
    the whole image resized to the square."""
    import numpy as np
    from PIL import Image

    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1] == crop and images.shape[2] == crop:
        return images  # already at the model's resolution (the shapes dataset renders there)
    out = []
    for im in images:
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8))
        im = im.convert("RGB")
        if squash:
            out.append(np.asarray(im.resize((crop, crop), Image.BICUBIC), dtype=np.uint8))
            continue
        w, h = im.size
        scale = short_side / min(w, h)
        im = im.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - crop) // 2, (h - crop) // 2
        out.append(np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.uint8))
    return np.stack(out)
