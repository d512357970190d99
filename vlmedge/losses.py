"""Losses more than one model family trains with: the contrastive loss of two embedding towers (InfoNCE, or
SigLIP's pairwise sigmoid), the affinity-mimicking and feature-mimicry distillation losses, and the weights of
distillation every family's student takes (`DistillLosses`). Shared code: it names no family; a family adds its own
losses in its package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import VlmedgeError


def contrastive_loss(image_emb, text_emb, logit_scale, match=None, negatives=None, negative_match=None,
                     logit_bias=None):
    """Symmetric InfoNCE (CLIP's loss): each image's own caption is its target and vice versa.

    `match[i, j]` (optional) says caption j also truthfully describes image i; such pairs are left out of both
    softmaxes, so a duplicate ("a red circle" twice in a batch) is not pushed apart as a negative. (Spreading the
    targets over all matches instead rewarded captions that match many images and collapsed the image tower: its
    embeddings became identical and the loss stalled just under log(batch).)

    `negatives` (optional, with `negative_match[i, k]`: negative k truly describes image i after all) are extra
    captions in the image->text softmax only (NegCLIP's text-side hard negatives).

    With `logit_bias` (SigLIP) the loss is SigLIP's instead: every image-caption pair is a binary decision,
    -log sigmoid(z * (t * cos + b)) with z = +1 for the own caption and -1 otherwise, summed over captions (the
    negatives included) and averaged over images; pairs `match` marks as also true are left out.
    """
    import torch
    import torch.nn.functional as F

    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    if logit_bias is not None:
        return _sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias, match, negatives, negative_match)
    logits = logit_scale.exp() * image_emb @ text_emb.t()
    labels = torch.arange(len(logits), device=logits.device)
    if match is not None:
        eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill((match.to(logits.device) > 0) & ~eye, float("-inf"))
    i2t = logits
    if negatives is not None and len(negatives):
        extra = logit_scale.exp() * image_emb @ F.normalize(negatives, dim=-1).t()
        i2t = torch.cat([logits, extra.masked_fill(negative_match.to(extra.device) > 0, float("-inf"))], dim=1)
    return (F.cross_entropy(i2t, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias, match, negatives, negative_match):
    import torch
    import torch.nn.functional as F

    n = len(image_emb)
    eye = torch.eye(n, device=image_emb.device)
    texts, labels = text_emb, 2 * eye - 1
    skip = (match.to(eye.device) > 0).float() * (1 - eye) if match is not None else torch.zeros_like(eye)
    if negatives is not None and len(negatives):
        texts = torch.cat([text_emb, F.normalize(negatives, dim=-1)])
        labels = torch.cat([labels, -torch.ones(n, len(negatives), device=eye.device)], dim=1)
        skip = torch.cat([skip, (negative_match.to(eye.device) > 0).float()], dim=1)
    logits = logit_scale.exp() * image_emb @ texts.t() + logit_bias
    return -(F.logsigmoid(labels * logits) * (1 - skip)).sum() / n


@dataclass
class DistillLosses:
    """Weights of the distillation losses (teacher -> student); the student's own loss is one of them. A family's
    own losses are its `options` (weights named in their `WEIGHTS`)."""

    contrastive: float = 1.0
    """The student's own loss on the batch (its family's training loss: InfoNCE for two towers)."""
    affinity: float = 1.0
    """KL between teacher and student image->text and text->image similarity distributions (TinyCLIP)."""
    feature: float = 1.0
    """1 - cosine between student and teacher embeddings, both towers (feature mimicry, CLIP-KD)."""
    options: Any = None
    """The student's family's own loss weights (`Family.options["distill"]`, weights named in its `WEIGHTS`)."""

    WEIGHTS = ("contrastive", "affinity", "feature")

    def validate(self) -> None:
        for k in self.WEIGHTS:
            if getattr(self, k) < 0:
                raise VlmedgeError(f"distill: {k}={getattr(self, k)} must be >= 0")
        own = [getattr(self.options, k) for k in getattr(self.options, "WEIGHTS", ())]
        if sum(getattr(self, k) for k in self.WEIGHTS) + sum(own) <= 0:
            raise VlmedgeError("distill: all loss weights are 0; nothing to learn")


def affinity_loss(s_logits, t_logits):
    """KL between the teacher's and the student's image->text and text->image similarity distributions over a
    batch (TinyCLIP's affinity mimicking), from their logit matrices."""
    import torch.nn.functional as F

    kl = lambda s, t: F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True,  # noqa: E731
                               reduction="batchmean")
    return (kl(s_logits, t_logits) + kl(s_logits.t(), t_logits.t())) / 2


def distillation_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale, match, w: DistillLosses, negatives=(None, None),
                      s_bias=None):
    """Weighted sum of contrastive, affinity-mimicking and feature-mimicry losses; returns (total, parts).
    `negatives` (embeddings, match) and `s_bias` (a SigLIP student's) go to the student's own contrastive loss."""
    import torch.nn.functional as F

    s_img, s_txt = F.normalize(s_img, dim=-1), F.normalize(s_txt, dim=-1)
    t_img, t_txt = F.normalize(t_img, dim=-1), F.normalize(t_txt, dim=-1)
    parts = {}
    if w.contrastive:
        parts["contrastive"] = contrastive_loss(s_img, s_txt, s_scale, match, *negatives, logit_bias=s_bias)
    if w.affinity:
        parts["affinity"] = affinity_loss(s_scale.exp() * s_img @ s_txt.t(), t_scale.exp() * t_img @ t_txt.t())
    if w.feature:
        if s_img.shape[-1] != t_img.shape[-1]:
            raise VlmedgeError(f"distill: feature mimicry needs equal embedding sizes (student {s_img.shape[-1]}, "
                               f"teacher {t_img.shape[-1]}); set feature weight to 0")
        parts["feature"] = ((1 - (s_img * t_img).sum(-1)).mean() + (1 - (s_txt * t_txt).sum(-1)).mean()) / 2
    total = sum(getattr(w, k) * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}
