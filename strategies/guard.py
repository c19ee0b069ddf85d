"""Leakage guard: no training record may show an evaluation image or an evaluation question.

Every path that trains goes through it: ``loop train`` (:func:`screen`), the SFT data builders
of the strategies and HPO trials (:func:`leak_reason` per candidate record, then
:func:`check_records`), and ``Workbench.train`` (:func:`screen` again, whatever the caller).

``ctx.protected`` (:func:`protected_keys`) holds the keys of every evaluation split (dev and
final of both benchmarks):

- ``images``: GQA-ru ``imageId``s and ``px:`` perceptual signatures (:func:`image_digest`) of
  every GQA-ru and MMBench-ru evaluation image;
- ``questions``: normalized question texts (:func:`normalize_question`: case, ё/е, punctuation
  and spacing do not matter); ``question_ids``: GQA-ru question ids;
- ``items``: key -> the evaluation item it belongs to, for the messages.

**Images** are compared by a perceptual signature (``strategies.image_signature``), so
resized and re-encoded copies of an evaluation image are caught too. The guard signs every image
itself: a record's own ``meta.image_digest`` is never believed (a resized evaluation image
carrying another scene's digest would pass); only files this process signed, or wrote from an
image it signed, and that are unchanged since, skip the decoding.

**Template questions** such as "Сколько фигур на картинке?" are asked about thousands of
different images; sharing one with an evaluation item leaks nothing, because the answer
depends on the image, which is checked. Such texts (asked on at least ``TEMPLATE_MIN_IMAGES``
distinct training images, :func:`template_questions`) are passed as ``allowed_questions``;
every other protected question is refused.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from core.exceptions import DataError
from strategies.image_signature import DIGEST_PREFIX, ImageIndex, image_digest

log = logging.getLogger(__name__)

TEMPLATE_MIN_IMAGES = 3
_IMAGE_TAG = "<image>"


class LeakageError(DataError):
    """A training record shares an image or a question with an evaluation split."""


def normalize_question(text: str) -> str:
    """Casefold, ё→е, ``<image>`` and punctuation removed, whitespace collapsed."""
    text = unicodedata.normalize("NFC", text.replace(_IMAGE_TAG, " ")).casefold().replace("ё", "е")
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(text.split())


def _item(ex: dict) -> str:
    if ex["benchmark"] == "gqa_ru":
        return f"GQA-ru image {ex['imageId']}"
    return f"MMBench-ru question {int(ex['index']) % 1_000_000}"


def protected_keys(examples: Iterable[dict], *, digests: bool = False) -> dict:
    """``{"images", "questions", "question_ids", "items"}`` of evaluation records
    (``core.data`` loaders' format). With ``digests`` every distinct image is decoded once and
    its perceptual signature added."""
    from core.data import load_image

    images: set[str] = set()
    questions: set[str] = set()
    question_ids: set[str] = set()
    items: dict[str, str] = {}
    seen: set[str] = set()
    for ex in examples:
        item = _item(ex)
        text = normalize_question(str(ex["question"]))
        questions.add(text)
        items.setdefault(text, f"{item}, question {ex['id']} «{ex['question']}»")
        if ex["benchmark"] == "gqa_ru":
            images.add(str(ex["imageId"]))
            question_ids.add(str(ex["id"]))
            items[str(ex["imageId"])] = item
            items[str(ex["id"])] = f"{item}, question {ex['id']}"
        if digests and item not in seen:
            seen.add(item)
            img, ok = load_image(ex)
            digest = image_digest(img) if ok else None
            if digest:
                images.add(digest)
                items.setdefault(digest, item)
    return {"images": images, "questions": questions, "question_ids": question_ids,
            "items": items}


@dataclass(frozen=True)
class Protected:
    """``ctx.protected`` in the forms the checks compare (build it once with :func:`prepare`)."""

    images: frozenset[str]
    """imageIds and image file names/stems."""
    index: ImageIndex
    """Perceptual signatures of the evaluation images."""
    questions: frozenset[str]
    question_ids: frozenset[str] = frozenset()
    items: dict[str, str] = field(default_factory=dict)


def prepare(protected: dict | Protected) -> Protected:
    """Normalize the question texts of ``ctx.protected`` and index its image signatures."""
    if isinstance(protected, Protected):
        return protected
    items = dict(protected.get("items") or {})
    questions = set()
    ids = {str(q) for q in protected.get("question_ids") or ()}
    for key in protected.get("questions") or ():
        ids.add(str(key))  # a question id given among the texts is matched as given
        key = str(key)
        text = key.split(":", 1)[1] if key.startswith(("mmbench:", "gqa:")) else key
        questions.add(normalize_question(text))
        items.setdefault(normalize_question(text), items.get(key, f"evaluation question «{key}»"))
    keys = {str(k) for k in protected.get("images") or ()}
    sigs = {k: items.get(k, "an evaluation image") for k in keys if k.startswith(DIGEST_PREFIX)}
    return Protected(images=frozenset(keys - set(sigs)), index=ImageIndex(sigs),
                     questions=frozenset(questions - {""}),
                     question_ids=frozenset(ids),
                     items=items)


def template_questions(pool: Iterable[dict], min_images: int = TEMPLATE_MIN_IMAGES) -> set[str]:
    """Normalized questions asked about at least ``min_images`` distinct training images."""
    owners: dict[str, set[str]] = defaultdict(set)
    for ex in pool:
        owners[normalize_question(str(ex["question"]))].add(str(ex.get("imageId")))
    return {q for q, imgs in owners.items() if len(imgs) >= min_images}


def record_templates(records: Iterable[dict], min_images: int = TEMPLATE_MIN_IMAGES) -> set[str]:
    """:func:`template_questions` of SFT records (their questions and image references)."""
    owners: dict[str, set[str]] = defaultdict(set)
    for r in records:
        meta = r.get("meta") or {}
        image = r.get("image")
        ref = str(meta.get("imageId") or (image if isinstance(image, str) else id(image)))
        for q in _questions(r)[0]:
            owners[q].add(ref)
    return {q for q, imgs in owners.items() if len(imgs) >= min_images}


@dataclass(frozen=True)
class Leak:
    kind: str
    """image | question | question_id"""
    key: str
    item: str
    """The evaluation item it matches, in words."""

    def reason(self) -> str:
        what = {"image": "its image", "question": f"its question «{self.key}»",
                "question_id": f"its question id '{self.key}'"}[self.kind]
        return f"{what} matches {self.item} of an evaluation split"


def _image_keys(record: dict) -> set[str]:
    keys = set()
    meta = record.get("meta") or {}
    if meta.get("imageId"):
        keys.add(str(meta["imageId"]))
    image = record.get("image")
    if isinstance(image, str):
        keys |= {image, Path(image).name, Path(image).stem}
    return keys


def _signature(record: dict, cache: dict) -> str | None:
    image = record.get("image")
    if image is None:
        return None
    # Computed here, never read from the record: ``meta.image_digest`` is whatever the file
    # says, and a resized evaluation image with another scene's digest would pass.
    ref = image if isinstance(image, str) else id(image)
    if ref not in cache:
        cache[ref] = image_digest(image)
    return cache[ref]


def _questions(record: dict) -> tuple[set[str], set[str]]:
    """(normalized question texts, question ids) of a record."""
    meta = record.get("meta") or {}
    texts = [str(meta.get("question") or "")]
    for turn in record["conversations"]:
        if turn["from"] == "human":
            texts += re.split(r"\n+", turn["value"])
    ids = {str(meta["question_id"])} if meta.get("question_id") else set()
    return {q for q in (normalize_question(t) for t in texts) if q}, ids


def find_leak(record: dict, protected: dict | Protected, *,
              allowed_questions: set[str] | frozenset = frozenset(),
              _cache: dict | None = None) -> Leak | None:
    """The first way ``record`` shows evaluation data, or None."""
    prot = prepare(protected)
    hit = sorted(_image_keys(record) & prot.images)
    if hit:
        return Leak("image", hit[0], prot.items.get(hit[0], f"evaluation image {hit[0]}"))
    if len(prot.index):
        signature = _signature(record, {} if _cache is None else _cache)
        item = prot.index.match(signature) if signature else None
        if item:
            return Leak("image", "pixels", item)
    texts, ids = _questions(record)
    hit = sorted(ids & prot.question_ids)
    if hit:
        return Leak("question_id", hit[0], prot.items.get(hit[0], "an evaluation question"))
    hit = sorted((texts & prot.questions) - set(allowed_questions))
    if hit:
        return Leak("question", hit[0], prot.items.get(hit[0], "an evaluation question"))
    return None


def leak_reason(record: dict, protected: dict | Protected, *,
                allowed_questions: set[str] | frozenset = frozenset(),
                _cache: dict | None = None) -> str | None:
    """Why ``record`` leaks evaluation data, or None when it does not."""
    leak = find_leak(record, protected, allowed_questions=allowed_questions, _cache=_cache)
    return leak.reason() if leak else None


def check_records(records: list[dict], protected: dict | Protected, *,
                  allowed_questions: set[str] | frozenset = frozenset()) -> None:
    """Raise ``LeakageError`` naming the first record that leaks evaluation data."""
    cache: dict = {}
    prot = prepare(protected)
    for row, record in enumerate(records):
        reason = leak_reason(record, prot, allowed_questions=allowed_questions, _cache=cache)
        if reason:
            raise LeakageError(
                f"training record '{record['id']}' (row {row}, source {record.get('source')}) "
                f"is refused: {reason}. Training data must never come from GQA-ru testdev or "
                "MMBench-ru; remove the record or fix the data source.")


def screen(records: list[dict], protected: dict | Protected, *, source: str = "training data",
           allowed_questions: set[str] | frozenset | None = None) -> tuple[list[dict], dict]:
    """Drop every record that leaks evaluation data; (kept records, what was refused).

    Questions asked on ``TEMPLATE_MIN_IMAGES`` images of ``records`` are allowed, and so are
    ``allowed_questions`` (e.g. the templates of the whole GQA-ru train pool). Raises
    ``LeakageError`` naming ``source``, the first record and the evaluation item it matches
    when every record is refused.
    """
    prot = prepare(protected)
    allowed = record_templates(records) | set(allowed_questions or ())
    cache: dict = {}
    kept, kinds, first = [], Counter(), []
    for row, record in enumerate(records):
        leak = find_leak(record, prot, allowed_questions=allowed, _cache=cache)
        if leak is None:
            kept.append(record)
            continue
        kinds[leak.kind] += 1
        if len(first) < 5:
            first.append({"record": record["id"], "row": row, "reason": leak.reason()})
    report = {"checked": len(records), "refused": len(records) - len(kept),
              "by_kind": dict(kinds), "first": first}
    if records and not kept:
        f = first[0]
        raise LeakageError(
            f"every one of the {len(records)} training records of {source} is refused by the "
            f"leakage guard; the first, '{f['record']}' (row {f['row']}): {f['reason']}. "
            "Training data must never come from GQA-ru testdev or MMBench-ru; use GQA-ru "
            "train_balanced, LLaVA-Instruct-ru or data built from them.")
    if kinds:
        log.warning("leakage guard: refused %d of %d records of %s (%s); first: '%s' (%s)",
                    report["refused"], len(records), source,
                    ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items())),
                    first[0]["record"], first[0]["reason"])
    else:
        log.info("leakage guard: all %d records of %s pass", len(records), source)
    return kept, report
