"""Leakage guard: no training record may show an evaluation image or an evaluation question.

``ctx.protected`` holds the keys of every evaluation split (dev and final of both benchmarks):

- ``images``: GQA-ru ``imageId``s, and optionally ``px:...`` pixel digests
  (:func:`image_digest`) of GQA-ru and MMBench-ru images, which also catch the same picture
  under another name (a COCO file in LLaVA-Instruct-ru that MMBench-ru reuses);
- ``questions``: question texts (any form: they are normalized here, and a ``mmbench:`` or
  ``gqa:`` prefix is dropped) and question ids (GQA-ru ``id``s, matched as given).

:func:`protected_keys` builds both sets from evaluation records. A record's image keys are its
``meta.imageId``, its image path and file name, and (when the protected set holds digests) its
pixel digest; its questions are ``meta.question``, every line of every human turn (normalized)
and ``meta.question_id``.

Template questions such as "Сколько фигур на картинке?" are asked about thousands of
different images; sharing one with an evaluation item leaks nothing, because the answer
depends on the image, which is checked. Builders pass such texts (asked on at least
``TEMPLATE_MIN_IMAGES`` distinct training images, :func:`template_questions`) as
``allowed_questions``; every other protected question is refused.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from core.exceptions import DataError

TEMPLATE_MIN_IMAGES = 3
DIGEST_PREFIX = "px:"
_IMAGE_TAG = "<image>"


class LeakageError(DataError):
    """A training record shares an image or a question with an evaluation split."""


def normalize_question(text: str) -> str:
    """Casefold, ё→е, ``<image>`` and punctuation removed, whitespace collapsed."""
    text = unicodedata.normalize("NFC", text.replace(_IMAGE_TAG, " ")).casefold().replace("ё", "е")
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(text.split())


def image_digest(image) -> str | None:
    """``px:`` + sha1 of the image as 32x32 RGB pixels; None when it cannot be read."""
    from core.sft import load_image

    img = load_image(image)
    if img is None:
        return None
    thumb = img.convert("RGB").resize((32, 32))
    return DIGEST_PREFIX + hashlib.sha1(thumb.tobytes()).hexdigest()[:20]


def protected_keys(examples: Iterable[dict], *, digests: bool = False) -> dict[str, set[str]]:
    """``{"images", "questions"}`` of evaluation records (``core.data`` loaders' format).

    With ``digests`` every distinct image is decoded once and its pixel digest added.
    """
    from core.data import load_image

    images: set[str] = set()
    questions: set[str] = set()
    seen: set[str] = set()
    for ex in examples:
        questions.add(normalize_question(str(ex["question"])))
        unit = (f"gqa:{ex['imageId']}" if ex["benchmark"] == "gqa_ru"
                else f"mmb:{int(ex['index']) % 1_000_000}")
        if ex["benchmark"] == "gqa_ru":
            images.add(str(ex["imageId"]))
        if digests and unit not in seen:
            seen.add(unit)
            img, ok = load_image(ex)
            digest = image_digest(img) if ok else None
            if digest:
                images.add(digest)
    return {"images": images, "questions": questions}


@dataclass(frozen=True)
class Protected:
    """``ctx.protected`` in the forms the checks compare (build it once with :func:`prepare`)."""

    images: frozenset[str]
    questions: frozenset[str]
    digests: bool
    """Whether ``images`` holds pixel digests (then records' images are digested too)."""


def prepare(protected: dict[str, set[str]] | Protected) -> Protected:
    """Normalize the question texts of ``ctx.protected``; ids and images stay as given."""
    if isinstance(protected, Protected):
        return protected
    questions = set()
    for key in protected.get("questions") or ():
        key = str(key)
        text = key.split(":", 1)[1] if key.startswith(("mmbench:", "gqa:")) else key
        questions |= {key, normalize_question(text)}
    images = frozenset(str(k) for k in protected.get("images") or ())
    return Protected(images=images, questions=frozenset(questions - {""}),
                     digests=any(k.startswith(DIGEST_PREFIX) for k in images))


def template_questions(pool: Iterable[dict], min_images: int = TEMPLATE_MIN_IMAGES) -> set[str]:
    """Normalized questions asked about at least ``min_images`` distinct training images."""
    owners: dict[str, set[str]] = defaultdict(set)
    for ex in pool:
        owners[normalize_question(str(ex["question"]))].add(str(ex.get("imageId")))
    return {q for q, imgs in owners.items() if len(imgs) >= min_images}


def _image_keys(record: dict, with_digest: bool, cache: dict) -> set[str]:
    keys = set()
    meta = record.get("meta") or {}
    if meta.get("imageId"):
        keys.add(str(meta["imageId"]))
    image = record.get("image")
    if isinstance(image, str):
        keys |= {image, Path(image).name}
    if with_digest and image is not None:
        ref = image if isinstance(image, str) else id(image)
        if ref not in cache:
            cache[ref] = meta.get("image_digest") or image_digest(image)
        if cache[ref]:
            keys.add(cache[ref])
    return keys


def _questions(record: dict) -> tuple[set[str], set[str]]:
    """(normalized question texts, question ids) of a record."""
    meta = record.get("meta") or {}
    texts = [str(meta.get("question") or "")]
    for turn in record["conversations"]:
        if turn["from"] == "human":
            texts += re.split(r"\n+", turn["value"])
    ids = {str(meta["question_id"])} if meta.get("question_id") else set()
    return {q for q in (normalize_question(t) for t in texts) if q}, ids


def leak_reason(record: dict, protected: dict[str, set[str]] | Protected, *,
                allowed_questions: set[str] | frozenset = frozenset(),
                _cache: dict | None = None) -> str | None:
    """Why ``record`` leaks evaluation data, or None when it does not.

    Pass ``prepare(protected)`` when checking many records: it normalizes the texts once.
    """
    prot = prepare(protected)
    hit = _image_keys(record, prot.digests, {} if _cache is None else _cache) & prot.images
    if hit:
        return f"its image {sorted(hit)[0]!r} is in an evaluation split"
    texts, ids = _questions(record)
    if ids & prot.questions:
        return f"its question id {sorted(ids & prot.questions)[0]!r} is in an evaluation split"
    hit = (texts & prot.questions) - set(allowed_questions)
    if hit:
        return f"its question {sorted(hit)[0]!r} is in an evaluation split"
    return None


def check_records(records: list[dict], protected: dict[str, set[str]] | Protected, *,
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
