"""Load GQA-ru, MMBench-ru and LLaVA-Instruct-ru from the hub or from local folders.

Every loader takes the hub id (``deepvk/GQA-ru`` ...) or a local folder with the same layout
(the demo writes such folders). Records keep the dataset's own columns and gain ``id``,
``benchmark`` and a lazy image: ``load_image(example)`` returns ``(PIL image | None, image_ok)``,
so that an absent or unreadable image is counted, never a crash. Each record is validated
against a JSON Schema in ``core/schemas``; a bad one raises ``DataError`` naming the file or
config, the row and the field.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from core.exceptions import DataError, UserError

log = logging.getLogger(__name__)

GQA_ID = "deepvk/GQA-ru"
MMBENCH_ID = "deepvk/MMBench-ru"
INSTRUCT_ID = "deepvk/LLaVA-Instruct-ru"
INSTRUCT_FILES = {"train": "llava_instruct_ru_train.json", "val": "llava_instruct_ru_val.json"}
LOCAL_NAMES = {GQA_ID: "GQA-ru", MMBENCH_ID: "MMBench-ru", INSTRUCT_ID: "LLaVA-Instruct-ru"}
SCHEMA_DIR = Path(__file__).parent / "schemas"


@dataclass(frozen=True)
class DataSources:
    """Where each dataset comes from: a hub id or a local folder."""

    gqa: str = GQA_ID
    mmbench: str = MMBENCH_ID
    instruct: str = INSTRUCT_ID
    coco_dir: str | None = None

    @classmethod
    def from_dir(cls, data_dir: str | Path, coco_dir: str | Path | None = None) -> DataSources:
        root = Path(data_dir)
        if not root.is_dir():
            raise UserError(f"--data-dir '{data_dir}' is not a folder")
        return cls(**{field: str(root / LOCAL_NAMES[hub]) for field, hub in
                      (("gqa", GQA_ID), ("mmbench", MMBENCH_ID), ("instruct", INSTRUCT_ID))},
                   coco_dir=str(coco_dir) if coco_dir else None)


# ---------------------------------------------------------------- validation


@cache
def _validator(name: str):
    from jsonschema import Draft202012Validator

    schema = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
    return Draft202012Validator(schema)


def validate(record: dict, schema: str, where: str, row: int) -> None:
    """Raise DataError naming ``where``, the row and the field if ``record`` is invalid."""
    errors = sorted(_validator(schema).iter_errors(record), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        field = ".".join(str(p) for p in e.path) or (
            e.message.split("'")[1] if e.validator == "required" else "<record>")
        raise DataError(f"{where}, row {row}, field '{field}': {e.message}")


def is_missing(value: Any) -> bool:
    """None, NaN and the string "nan" all mean "no value" in the MMBench files."""
    return (value is None or (isinstance(value, float) and math.isnan(value))
            or (isinstance(value, str) and value.strip().lower() in ("", "nan")))


def isna(value: Any) -> bool:
    """``pd.isna`` for the values a dataset row holds: None or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


MMB_OPTION_LETTERS = "ABCDE"
"""The option columns lmms-eval's ``mmbench_doc_to_text`` puts in the prompt when present."""


def mmbench_prompt_options(row: dict) -> dict[str, str]:
    """The options lmms-eval's prompt shows for a MMBench row, raw, in letter order.

    ``create_options_prompt`` keeps a column A-E when the row has it and its value is truthy,
    not NaN and not the string "nan": an empty text is left out, a text of spaces is shown, and
    nothing is stripped.
    """
    return {k: str(row[k]) for k in MMB_OPTION_LETTERS
            if k in row and row[k] and not isna(row[k]) and row[k] != "nan"}


# ---------------------------------------------------------------- images


def to_rgb(value: Any):
    """Decode an image value (PIL, bytes, {'bytes','path'} or a path) to RGB, EXIF-upright."""
    from PIL import Image, ImageOps

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        value = Image.open(io.BytesIO(value))
    elif isinstance(value, str | Path):
        value = Image.open(value)
    value.load()
    value = ImageOps.exif_transpose(value)
    if value.mode in ("RGBA", "LA", "P"):
        rgba = value.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[-1])
        return background
    return value.convert("RGB")


def load_image(example: dict):
    """``(image, True)``, or ``(None, False)`` when the image is absent or unreadable."""
    loader: Callable[[], Any] | None = example.get("_image")
    if loader is None:
        return None, False
    try:
        raw = loader()
        if raw is None:
            return None, False
        return to_rgb(raw), True
    except Exception as exc:  # any decoding failure is a missing image, counted by the caller
        log.debug("image of %s unreadable: %s", example.get("id"), exc)
        return None, False


# ---------------------------------------------------------------- hub or folder


def _load_hf(source: str, config: str | None, split: str):
    import datasets

    local = Path(source).is_dir()
    try:
        if local:
            # The folder's README names the files of each config. Loading them through the
            # parquet builder with absolute paths keys the cache by those files; loading the
            # folder itself keys it by the folder's name, so two folders called GQA-ru would
            # share one cache entry.
            files = datasets.load_dataset_builder(source, config).config.data_files
            return datasets.load_dataset("parquet", data_files=dict(files), split=split)
        return datasets.load_dataset(source, config, split=split)
    except Exception as exc:
        if local:
            raise DataError(f"cannot read '{source}' (config {config}, split {split}): {exc}") from None
        raise UserError(
            f"cannot load the dataset '{source}' (config {config}, split {split}): it is not a "
            f"local folder and the hub is not reachable ({type(exc).__name__}). Download it where "
            f"there is network (`huggingface-cli download {source} --repo-type dataset "
            f"--local-dir DIR/{LOCAL_NAMES.get(source, source.split('/')[-1])}`) and pass "
            f"`--data-dir DIR`.") from None


def load_gqa(source: str = GQA_ID, split: str = "testdev") -> list[dict]:
    """GQA-ru questions of ``split`` ("testdev" or "train"), joined with their images."""
    qconfig, iconfig = f"{split}_balanced_instructions", f"{split}_balanced_images"
    questions = _load_hf(source, qconfig, split)
    images = _load_hf(source, iconfig, split)
    where = f"{source} [{qconfig}]"
    missing = [c for c in ("id", "image") if c not in images.column_names]
    if missing:
        raise DataError(f"{source} [{iconfig}]: the images config has no column "
                        f"{' or '.join(repr(c) for c in missing)} (it has "
                        f"{', '.join(images.column_names) or 'none'}); GQA-ru images are joined "
                        "on imageId = id")
    row_of = {str(image_id): i for i, image_id in enumerate(images["id"])}
    image_col = images.select_columns(["image"])

    loaders: dict[int | None, Any] = {}

    def loader(i: int | None):
        # one loader per image: evaluation decodes an image once for all its questions
        if i not in loaders:
            loaders[i] = (lambda: None) if i is None else (lambda: image_col[i]["image"])
        return loaders[i]

    records = []
    for i, rec in enumerate(questions.to_list()):
        validate(rec, "gqa_question.schema.json", where, i)
        rec["id"] = str(rec["id"])
        rec["benchmark"] = "gqa_ru"
        rec["_image"] = loader(row_of.get(str(rec["imageId"])))
        records.append(rec)
    records = drop_duplicates(records, where, "question id")
    log.info("GQA-ru %s: %d questions on %d images from %s", split, len(records), len(row_of), source)
    return records


def load_mmbench(source: str = MMBENCH_ID, split: str = "dev") -> list[dict]:
    """MMBench-ru rows with the prompt's ``options`` (``mmbench_prompt_options``) and the image.

    Option texts and the hint stay as the file has them (a NaN hint becomes None): the prompt
    is built from the raw fields, as lmms-eval builds it.
    """
    ds = _load_hf(source, None, split)
    where = f"{source} [split {split}]"
    image_col = ds.select_columns(["image"]) if "image" in ds.column_names else None
    table = ds.remove_columns(["image"]) if image_col is not None else ds
    records = []
    for i, rec in enumerate(table.to_list()):
        validate(rec, "mmbench_row.schema.json", where, i)
        options = mmbench_prompt_options(rec)
        if len(options) < 2:
            raise DataError(f"{where}, row {i}, field 'A'..'D': fewer than two options")
        if rec["answer"] not in options:
            raise DataError(f"{where}, row {i}, field 'answer': '{rec['answer']}' is not one of "
                            f"the options {sorted(options)}")
        rec["hint"] = None if isna(rec.get("hint")) else rec["hint"]  # raw, as the prompt uses it
        rec["options"] = options
        rec["id"] = str(rec["index"])
        rec["benchmark"] = "mmbench_ru"
        rec["_image"] = (lambda j=i: image_col[j]["image"]) if image_col is not None else (lambda: None)
        records.append(rec)
    records = drop_duplicates(records, where, "index", same_image=lambda a, b: _same_pixels(
        image_col, a, b))
    log.info("MMBench-ru %s: %d rows from %s", split, len(records), source)
    return records


def drop_duplicates(records: list[dict], where: str, name: str,
                    same_image: Callable[[int, int], bool] | None = None) -> list[dict]:
    """Each id once: identical copies of a row are dropped (and reported), differing rows that
    share an id are refused, so that no question is counted or scored twice.

    Raises:
        DataError: naming the dataset, the id and the rows, when the copies differ.
    """
    first: dict[str, int] = {}
    kept, dropped = [], []
    for i, rec in enumerate(records):
        j = first.setdefault(rec["id"], i)
        if j == i:
            kept.append(rec)
            continue
        a, b = _public_fields(records[j]), _public_fields(rec)
        fields = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)
                        and not (is_missing(a.get(k)) and is_missing(b.get(k))))
        if not fields and same_image is not None and not same_image(j, i):
            fields = ["image"]
        if fields:
            raise DataError(f"{where}: {name} '{rec['id']}' is used by rows {j} and {i}, which "
                            f"differ in {', '.join(repr(f) for f in fields)}; each question "
                            f"needs its own {name}. Remove or renumber one of the rows.")
        dropped.append((rec["id"], j, i))
    if dropped:
        log.warning("%s: %d duplicated row(s) dropped, identical copies of an earlier row "
                    "(%s); each question is counted and scored once", where, len(dropped),
                    "; ".join(f"{name} '{k}': row {i} repeats row {j}" for k, j, i in dropped))
    return kept


def _public_fields(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def _same_pixels(image_col, i: int, j: int) -> bool:
    if image_col is None:
        return True
    a, b = image_col[i]["image"], image_col[j]["image"]
    if a is None or b is None:
        return a is b
    return a.size == b.size and a.tobytes() == b.tobytes()


def load_llava_instruct(source: str = INSTRUCT_ID, coco_dir: str | None = None,
                        part: str = "train") -> list[dict]:
    """LLaVA-Instruct-ru conversations; images come from the user's COCO folder."""
    path = _instruct_file(source, part)
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records")
    coco = Path(coco_dir) if coco_dir else None
    records = []
    for i, rec in enumerate(rows):
        validate(rec, "llava_instruct.schema.json", str(path), i)
        rec["id"] = str(rec["id"])
        image = rec.get("image")
        rec["_image"] = _coco_loader(coco, image)
        records.append(rec)
    if coco is None:
        log.warning("no --coco-dir: the %d LLaVA-Instruct-ru conversations have no images and "
                    "will be skipped for training", len(records))
    return records


def _coco_loader(coco: Path | None, image: str | None):
    if coco is None or not image:
        return lambda: None
    candidates = [coco / image, coco / Path(image).name]
    return lambda: next((p for p in candidates if p.exists()), candidates[0])


def _instruct_file(source: str, part: str) -> str:
    name = INSTRUCT_FILES[part]
    if Path(source).is_dir():
        path = Path(source) / name
        if not path.exists():
            raise UserError(f"'{path}' does not exist: the LLaVA-Instruct-ru folder must hold {name}")
        return str(path)
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(source, name, repo_type="dataset")
    except Exception as exc:
        raise UserError(
            f"cannot load '{name}' of the dataset '{source}': the hub is not reachable "
            f"({type(exc).__name__}). Download it where there is network and pass "
            f"`--data-dir DIR` with DIR/LLaVA-Instruct-ru/{name}.") from None


def load_benchmark(benchmark: str, sources: DataSources) -> list[dict]:
    """All evaluation records of a benchmark: GQA-ru testdev or MMBench-ru dev."""
    if benchmark == "gqa_ru":
        return load_gqa(sources.gqa, "testdev")
    if benchmark == "mmbench_ru":
        return load_mmbench(sources.mmbench, "dev")
    raise UserError(f"--benchmark must be one of gqa_ru, mmbench_ru, but got '{benchmark}'")
