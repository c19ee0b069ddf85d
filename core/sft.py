"""SFT records: the one format every training example takes, and converters into it.

A record (``core/schemas/sft_record.schema.json``)::

    {"id": "gqa-n000120", "image": "images/n00012.png" | null,
     "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...],
     "source": "gqa_train", "meta": {...}}

In memory, ``image`` may also be a PIL image (GQA-ru ships its images inside the parquet
files); :func:`write_sft_jsonl` saves such images next to the JSONL file. Converters skip an
example whose image is known to be missing and count it; an image path that does not open is
skipped and counted later, by the data processor.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from core.exceptions import DataError
from core.jsonl import jsonl_values

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).parent / "schemas" / "sft_record.schema.json"
IN_MEMORY = "<in-memory>"
GQA_INSTRUCTION = "Ответь одним словом."
IMAGE_TAG = "<image>"


@lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


def _field(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(record)"


def validate_record(record: Any, *, file: str | Path = IN_MEMORY, row: int = 0) -> None:
    """Raise DataError naming the file, the row and the field if ``record`` is not an SFT record."""
    where = f"{file}, row {row}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: an SFT record must be a JSON object, but got "
                        f"{type(record).__name__}")
    checked = record
    if _is_pil(record.get("image")):
        checked = {**record, "image": "<in-memory image>"}
    errors = sorted(_validator().iter_errors(checked), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise DataError(f"{where}: field '{_field(err.absolute_path)}' {err.message}{more}. "
                        "See core/schemas/sft_record.schema.json.")
    turns = record["conversations"]
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise DataError(f"{where}: field 'conversations[{i}].from' must be '{expected}' "
                            f"(turns alternate, human first), but got '{turn['from']}'")
    if len(turns) % 2:
        raise DataError(f"{where}: field 'conversations' ends with a human turn "
                        f"(conversations[{len(turns) - 1}]); the last turn must be 'gpt'")


def validate_records(records: list[dict], *, file: str | Path = IN_MEMORY) -> None:
    for row, record in enumerate(records):
        validate_record(record, file=file, row=row)


def _is_pil(obj: Any) -> bool:
    return hasattr(obj, "convert") and hasattr(obj, "size") and not isinstance(obj, str)


def load_sft_jsonl(path: str | Path) -> list[dict]:
    """Read and validate a JSONL file of SFT records; relative image paths become absolute."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no SFT file at '{path}'")
    records = []
    for row, record in jsonl_values(path, unit="row", start=0):
        validate_record(record, file=path, row=row)
        if record["image"] is not None and not Path(record["image"]).is_absolute():
            record["image"] = str((path.parent / record["image"]).resolve())
        records.append(record)
    return records


def write_sft_jsonl(records: list[dict], path: str | Path, *,
                    image_dir: str | Path | None = None) -> Path:
    """Write records as JSONL; in-memory images are saved as PNG under ``image_dir``.

    ``image_dir`` defaults to ``<stem>_images`` next to the file; paths inside the file are
    relative to the file's folder when they can be.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir = Path(image_dir) if image_dir else path.parent / f"{path.stem}_images"
    saved: dict[int, str] = {}
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            out = dict(record)
            if _is_pil(record["image"]):
                key = id(record["image"])
                if key not in saved:
                    image_dir.mkdir(parents=True, exist_ok=True)
                    digest = hashlib.sha1(record["id"].encode()).hexdigest()[:12]
                    target = image_dir / f"{digest}.png"
                    record["image"].save(target)
                    saved[key] = _relative(target, path.parent)
                out["image"] = saved[key]
            fh.write(json.dumps(out, ensure_ascii=False) + "\n")
    return path


def _relative(target: Path, base: Path) -> str:
    try:
        return str(target.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(target.resolve())


def load_image(image: Any):
    """The record's image as RGB PIL, or None when the path is absent or unreadable."""
    if image is None:
        return None
    if _is_pil(image):
        return image.convert("RGB") if image.mode != "RGB" else image
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def record_turns(record: dict) -> list[tuple[str, str]]:
    """[(user, assistant), ...] with the ``<image>`` tag removed (the processor adds it first)."""
    conv = record["conversations"]
    return [(_strip_tag(conv[i]["value"]), conv[i + 1]["value"])
            for i in range(0, len(conv) - 1, 2)]


def _strip_tag(text: str) -> str:
    return text.replace(IMAGE_TAG, "").strip()


# ---------------------------------------------------------------- converters

def gqa_to_sft(example: dict, *, instruction: str = GQA_INSTRUCTION,
               full_answer: bool = False) -> dict | None:
    """A GQA-ru train question (``core.data.load_gqa`` row) as a one-turn SFT record.

    The prompt is the evaluation's (``"{question}\\nОтветь одним словом."``) and the answer the
    short gold answer (or ``fullAnswer``). The image is ``example["image"]`` or, for rows of
    ``core.data.load_gqa``, decoded from its lazy ``_image`` loader. None when it is missing.
    """
    image = example.get("image")
    if image is None and "_image" in example:
        from core.data import load_image as load_dataset_image

        image, _ = load_dataset_image(example)
    if image is None or not example.get("image_ok", True):
        return None
    prompt = f"{example['question']}\n{instruction}" if instruction else example["question"]
    answer = example["fullAnswer"] if full_answer else example["answer"]
    types = example.get("types") or {}
    return {"id": f"gqa-{example['id']}", "image": image,
            "conversations": [{"from": "human", "value": prompt},
                              {"from": "gpt", "value": str(answer)}],
            "source": "gqa_train",
            "meta": {"question_id": str(example["id"]), "imageId": example.get("imageId"),
                     "semantic_type": types.get("semantic"),
                     "detailed_type": types.get("detailed")}}


def llava_instruct_to_sft(record: dict, coco_dir: str | Path | None) -> dict:
    """A LLaVA-Instruct-ru record as an SFT record with its COCO image path.

    The image is looked up as ``coco_dir/<image>`` and then ``coco_dir/train2017/<name>``
    (the JSON names either form); the first candidate is kept when neither exists, so the
    processor skips and counts the example.
    """
    image = record.get("image")
    path = None
    if image:
        if coco_dir is None:
            candidates = [Path(image)]
        else:
            coco = Path(coco_dir)
            candidates = [coco / image, coco / "train2017" / Path(image).name]
        path = next((c for c in candidates if c.exists()), candidates[0])
    conv = [{"from": t["from"], "value": t["value"] if t["from"] == "gpt"
             else _strip_tag(t["value"])} for t in record["conversations"]]
    return {"id": f"llava-{record['id']}", "image": str(path) if path else None,
            "conversations": conv, "source": "llava_instruct",
            "meta": {"type": record.get("type")}}


def gqa_records(examples: Iterable[dict], *, stats: Counter | None = None,
                **kwargs) -> list[dict]:
    """Convert many GQA-ru examples; those without an image are counted as ``image_missing``."""
    out = []
    for ex in examples:
        rec = gqa_to_sft(ex, **kwargs)
        if rec is None:
            if stats is not None:
                stats["image_missing"] += 1
            continue
        out.append(rec)
    return out


def llava_instruct_records(records: Iterable[dict], coco_dir: str | Path | None) -> list[dict]:
    return [llava_instruct_to_sft(r, coco_dir) for r in records]


def data_fingerprint(records: list[dict]) -> str:
    """sha256 over ids, image references and conversations (in-memory images by size)."""
    h = hashlib.sha256()
    for r in records:
        img = r["image"]
        ref = f"pil:{img.size}" if _is_pil(img) else img
        h.update(json.dumps([r["id"], ref, r["conversations"]], ensure_ascii=False,
                            sort_keys=True).encode())
    return h.hexdigest()[:16]
