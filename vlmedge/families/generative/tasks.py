"""Accuracy of any generative VLM: VQA accuracy (VQA v2's answer normalisation), per question type and on held-out
combinations, and captioning (BLEU-4 by sacrebleu, ROUGE-L by rouge-score, CIDEr by pycocoevalcap, caption-truth).

The evaluator needs only a `Generator`: `answer(image, question, max_new_tokens) -> str` (greedy; the image as
uint8 HWC, processed as the generator's model reads it). The PyTorch model (HF `generate`) and the ONNX Runtime
runtime both are one, so the artifact that ships is the one that is scored.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, Sequence

import numpy as np

from ..._progress import Progress, paced

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$|~:']")


class Generator(Protocol):
    def answer(self, image: np.ndarray, question: str, max_new_tokens: int) -> str: ...


def normalise_answer(text: str) -> str:
    """VQA v2's answer processing (its evaluation script): lower case, punctuation removed (a period only where it
    is not a decimal point), number words as digits, articles dropped, whitespace collapsed."""
    t = _PUNCT.sub(" ", text.lower().replace("\n", " ").replace("\t", " "))
    t = re.sub(r"(?<!\d)\.(?!\d)", " ", t)
    words = [_NUMBERS.get(w, w) for w in t.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA v2's accuracy of one answer: min(1, matching human answers / 3) when there are several annotators' answers
    (VQA v2 has ten), else 1 for a match with any accepted answer."""
    got = normalise_answer(prediction)
    hits = sum(normalise_answer(a) == got for a in answers)
    return min(1.0, hits / 3) if len(answers) >= 3 else float(hits > 0)


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 (sacrebleu, 0..1), mean ROUGE-L F (best reference) and CIDEr (pycocoevalcap's CIDEr-D-less
    pure-Python scorer) of generated captions against every true caption of each image."""
    import sacrebleu
    from pycocoevalcap.cider.cider import Cider
    from rouge_score import rouge_scorer

    width = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else r[0] for r in references] for k in range(width)]  # sacrebleu: equal counts
    bleu = sacrebleu.corpus_bleu(list(predictions), streams).score / 100
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = float(np.mean([max(scorer.score(ref, p)["rougeL"].fmeasure for ref in refs)
                           for p, refs in zip(predictions, references)]))
    tok = lambda s: " ".join(re.findall(r"\w+", s.lower()))  # noqa: E731  (PTB-style tokens without Java)
    cider, _ = Cider().compute_score({i: [tok(r) for r in refs] for i, refs in enumerate(references)},
                                     {i: [tok(p) or "empty"] for i, p in enumerate(predictions)})
    return {"bleu4": float(bleu), "rouge_l": rouge, "cider": float(cider)}


def evaluate_generator(generator: Generator, ds, items, max_new_tokens: int = 24, progress: bool = False,
                       count=None) -> dict[str, Any]:
    """VQA accuracy (all questions but captions; per type; on held-out combinations) and captioning metrics, on the
    first `count` of `items` (a number, a `_progress.Budget` of time; None: all); `questions` is how many."""
    answers: list[str] = []
    with Progress("eval", len(items), enabled=progress, unit="questions") as bar:
        for k, it in paced(items, len(items) if count is None else count, bar):
            answers.append(generator.answer(ds.images([it.index])[0], it.question, max_new_tokens))
            bar.update(k + 1)
    items = items[:len(answers)]
    vqa = [(it, vqa_score(a, it.answers)) for it, a in zip(items, answers) if it.type != "describe"]
    out: dict[str, Any] = {"questions": len(answers)}
    if vqa:
        types = sorted({it.type for it, _ in vqa})
        out["vqa"] = {"accuracy": float(np.mean([s for _, s in vqa])), "n": len(vqa),
                      **{f"type_{t}": float(np.mean([s for it, s in vqa if it.type == t])) for t in types}}
        held = [s for it, s in vqa if it.held_out]
        if held:
            out["vqa"]["held_out"] = float(np.mean(held))
            out["vqa"]["n_held_out"] = len(held)
    captions = [(it, a) for it, a in zip(items, answers) if it.type == "describe"]
    if captions:
        out["caption"] = {**caption_scores([a for _, a in captions], [it.answers for it, _ in captions]),
                          "n": len(captions)}
        truth = [ds.describe(a, it.index) for it, a in captions]
        if all(t is not None for t in truth):
            out["caption"]["truth"] = float(np.mean(truth))
    out["examples"] = [{"question": it.question, "answer": a, "expected": it.answers[0]}
                       for it, a in list(zip(items, answers))[:8]]
    return out
