"""Synthetic scenes and Russian questions about them (colour, shape, counting, location).

A scene is a 3x3 grid of cells with one to three shapes of one colour and one kind, each in
its own column. Images are 48x48 pixels, so with 16-pixel patches every cell is one vision
token. Every question needs the whole image, or its only shape: a 4-layer language model learns
those quickly, while binding a word to one region of the image it learns poorly.

Two families of wording: GQA-ru-like questions (``questions_for``) and MMBench-ru-like
multiple-choice items (``choice_items``) with their own phrasing and categories, as in the real
benchmarks, so that anything learnt from GQA-ru train reaches MMBench-ru only as a skill.
Short answers follow GQA-ru's style (one word); verbose answers imitate the way the real
LLaVA-Saiga answers without the one-word instruction: a sentence around the answer word.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 48
CELL = IMAGE_SIZE // 3

# name -> (RGB, feminine form, genitive form)
COLORS: dict[str, tuple[tuple[int, int, int], str, str]] = {
    "красный": ((220, 30, 30), "красная", "красного"),
    "синий": ((30, 60, 220), "синяя", "синего"),
    "зелёный": ((30, 170, 50), "зелёная", "зелёного"),
    "жёлтый": ((235, 215, 20), "жёлтая", "жёлтого"),
    "фиолетовый": ((140, 40, 170), "фиолетовая", "фиолетового"),
}
PLURAL = {"красный": "красные", "синий": "синие", "зелёный": "зелёные", "жёлтый": "жёлтые",
          "фиолетовый": "фиолетовые"}
COLUMNS = ["слева", "посередине", "справа"]
COLUMN_PHRASE = ["в левой части", "в центральной части", "в правой части"]
COUNT_WORDS = {1: "одна", 2: "две", 3: "три"}
SHAPES = ("square", "circle")
SHAPE_WORDS = {"square": "квадрат", "circle": "круг"}


@dataclass(frozen=True)
class Shape:
    color: str
    column: int
    row: int
    kind: str


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]

    def at_column(self, column: int) -> Shape | None:
        return next((s for s in self.shapes if s.column == column), None)

    def colors(self) -> set[str]:
        return {s.color for s in self.shapes}


def random_scene(rng: random.Random) -> Scene:
    n = rng.choice([1, 1, 2, 2, 3, 3])
    columns = sorted(rng.sample(range(3), n))
    color, kind = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    shapes = tuple(Shape(color=color, column=col, row=rng.randrange(3), kind=kind)
                   for col in columns)
    grey = rng.randint(225, 250)
    return Scene(shapes=shapes, background=(grey, grey, grey))


def render(scene: Scene, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        rgb = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLORS[s.color][0])
        # A square fills its cell; a circle is a small disc: the two differ in how much of
        # the cell they cover, which even a tiny vision tower tells apart at once.
        pad = rng.randint(0, 1) if s.kind == "square" else rng.randint(3, 4)
        box = (s.column * CELL + pad, s.row * CELL + pad,
               (s.column + 1) * CELL - pad - 1, (s.row + 1) * CELL - pad - 1)
        if s.kind == "square":
            draw.rectangle(box, fill=rgb)
        else:
            draw.ellipse(box, fill=rgb)
    return img


@dataclass(frozen=True)
class Question:
    """One question with its short (GQA-style) and verbose (seed-model-style) answers."""

    kind: str  # "color" | "count" | "location" | "exist"
    question: str
    answer: str
    full_answer: str
    verbose: str
    options: tuple[str, ...]  # the answer vocabulary of this kind, for multiple choice
    semantic: tuple[tuple[str, str], ...]
    types: tuple[str, str, str]  # structural, semantic, detailed


def questions_for(scene: Scene, rng: random.Random) -> list[Question]:
    """GQA-ru-like questions about the scene: colour, location (one shape only), count, shape."""
    out = []
    n = len(scene.shapes)
    first = scene.shapes[0]
    noun = "фигура" if n == 1 else "фигуры"
    fem = COLORS[first.color][1]
    color_q = "Какого цвета фигура на картинке?" if n == 1 else "Какого цвета фигуры на картинке?"
    out.append(Question(
        kind="color", question=color_q, answer=first.color,
        full_answer=f"{'Фигура' if n == 1 else 'Фигуры'} {fem if n == 1 else PLURAL[first.color]}.",
        verbose=f"На картинке {noun} цвета, который можно назвать так: {first.color}.",
        options=tuple(COLORS),
        semantic=(("select", "фигура"), ("query", "color")),
        types=("query", "attr", "queryAttr"),
    ))
    if n == 1:
        col = first.column
        out.append(Question(
            kind="location", question="Где находится фигура?", answer=COLUMNS[col],
            full_answer=f"Фигура находится {COLUMNS[col]}.",
            verbose=f"Фигура находится {COLUMNS[col]}, {COLUMN_PHRASE[col]} этой картинки.",
            options=tuple(COLUMNS),
            semantic=(("select", "фигура"), ("query", "hposition")),
            types=("query", "rel", "positionQuery"),
        ))
    out.append(Question(
        kind="count", question="Сколько фигур на картинке?", answer=COUNT_WORDS[n],
        full_answer=f"На картинке {COUNT_WORDS[n]} {noun}.",
        verbose=f"Если посчитать внимательно, то на картинке {COUNT_WORDS[n]} {noun}.",
        options=tuple(COUNT_WORDS.values()),
        semantic=(("select", "фигура"), ("count", "фигура")),
        types=("query", "obj", "count"),
    ))
    word = SHAPE_WORDS[first.kind]
    out.append(Question(
        kind="shape", question=f"Какой формы {noun} на картинке?", answer=word,
        full_answer=f"{'Фигура' if n == 1 else 'Фигуры'} в форме: {word}.",
        verbose=f"Если присмотреться, форма такая: {word}, это хорошо видно.",
        options=tuple(SHAPE_WORDS.values()),
        semantic=(("select", "фигура"), ("query", "shape")),
        types=("query", "attr", "queryShape"),
    ))
    return out



def verify_questions(scene: Scene) -> list[Question]:
    """GQA-style yes/no and relation questions about the scene, about 24 of them.

    Real GQA-ru testdev asks about 31 questions per image (12,216 on 398 images), most of them
    verify, exist and relate questions; ``questions_for`` asks three or four. The saiga-tiny
    world adds these to its testdev so that evaluation sees GQA's questions-per-image ratio,
    which is what shared-prefix evaluation is measured on. No randomness: the same scene gives
    the same questions.
    """
    def yes_no(kind: str, question: str, truth: bool, types: tuple[str, str, str],
               semantic: tuple[tuple[str, str], ...]) -> Question:
        answer = "да" if truth else "нет"
        return Question(kind=kind, question=question, answer=answer,
                        full_answer=f"{'Да' if truth else 'Нет'}.", verbose=f"{answer.capitalize()}, "
                        "если смотреть на картинку.", options=("да", "нет"), semantic=semantic,
                        types=types)

    colors, kinds = scene.colors(), {s.kind for s in scene.shapes}
    columns, n = {s.column for s in scene.shapes}, len(scene.shapes)
    out = [yes_no("exist", f"Есть ли на картинке {fem} фигура?", name in colors,
                  ("verify", "attr", "existAttr"), (("select", "фигура"), ("exist", name)))
           for name, (_, fem, _) in COLORS.items()]
    out += [yes_no("exist", f"Есть ли на картинке {word}?", kind in kinds,
                   ("verify", "obj", "exist"), (("select", word), ("exist", "")))
            for kind, word in SHAPE_WORDS.items()]
    out += [yes_no("exist", f"Есть ли фигура {where}?", col in columns,
                   ("verify", "rel", "existRel"), (("select", "фигура"), ("relate", where)))
            for col, where in enumerate(COLUMNS)]
    out += [yes_no("exist", f"Есть ли на картинке {name} {word}?",
                   name in colors and kind in kinds, ("verify", "attr", "existAttrObj"),
                   (("select", word), ("filter color", name), ("exist", "")))
            for name in COLORS for kind, word in SHAPE_WORDS.items()]
    out += [yes_no("count", f"Правда ли, что на картинке {word} "
                   f"{'фигура' if k == 1 else 'фигуры'}?", k == n, ("verify", "obj", "verifyCount"),
                   (("select", "фигура"), ("count", word)))
            for k, word in COUNT_WORDS.items()]
    for col in sorted(columns):
        shape = scene.at_column(col)
        out.append(Question(
            kind="color", question=f"Какого цвета фигура {COLUMNS[col]}?", answer=shape.color,
            full_answer=f"Фигура {COLUMNS[col]} {COLORS[shape.color][1]}.",
            verbose=f"Фигура {COLUMNS[col]} такого цвета: {shape.color}.", options=tuple(COLORS),
            semantic=(("select", "фигура"), ("relate", COLUMNS[col]), ("query", "color")),
            types=("query", "rel", "relAttr")))
    return out

MMBENCH_CATEGORIES = {
    "color": ("attribute_recognition", "Attribute Reasoning"),
    "location": ("spatial_relationship", "Relation Reasoning"),
    "count": ("instance_quantity", "Fine-grained Perception (instance)"),
    "shape": ("physical_property_reasoning", "Attribute Reasoning"),
}
"""MMBench-ru-like item family -> (category, l2-category)."""


def choice_items(scene: Scene, rng: random.Random) -> list[tuple[str, Question]]:
    """MMBench-ru-like items about the scene, as (family, question); location needs one shape.

    The wording differs from ``questions_for`` ("объект", "изображение", "рисунок"); answers
    use the same words, so a skill learnt on one family can carry over to the other. Each
    question's ``options`` are the texts its distractors may be drawn from (the answer too).
    """
    first, n = scene.shapes[0], len(scene.shapes)
    out = [("color", Question(
        kind="color", question="Какой цвет у объектов на этом изображении?", answer=first.color,
        full_answer="", verbose="", options=tuple(COLORS), semantic=(),
        types=("query", "attr", "queryAttr")))]
    if n == 1:
        out.append(("location", Question(
            kind="location", question="В какой части изображения расположен объект?",
            answer=COLUMNS[first.column], full_answer="", verbose="", options=tuple(COLUMNS),
            semantic=(), types=("query", "rel", "positionQuery"))))
    out.append(("count", Question(
        kind="count", question="Сколько объектов изображено на рисунке?", answer=COUNT_WORDS[n],
        full_answer="", verbose="", options=tuple(COUNT_WORDS.values()), semantic=(),
        types=("query", "obj", "count"))))
    out.append(("shape", Question(
        kind="shape", question="Выберите форму объектов, изображённых на рисунке.",
        answer=SHAPE_WORDS[first.kind], full_answer="", verbose="",
        options=tuple(SHAPE_WORDS.values()), semantic=(), types=("query", "attr", "queryShape"))))
    return out


def choice_item(scene_rng: random.Random, family: str) -> tuple[Scene, Question]:
    """A fresh scene and its MMBench-ru-like item of ``family`` (one shape for location)."""
    while True:
        scene = random_scene(scene_rng)
        items = dict(choice_items(scene, scene_rng))
        if family in items:
            return scene, items[family]


def describe(scene: Scene) -> str:
    """A long description, the LLaVA-Instruct-ru style answer to "describe the picture"."""
    parts = [f"{COLORS[s.color][1]} {'квадратная' if s.kind == 'square' else 'круглая'} фигура "
             f"{COLUMN_PHRASE[s.column]}" for s in scene.shapes]
    n = len(scene.shapes)
    return (f"На изображении светлый фон, на нём {n} "
            f"{'фигура' if n == 1 else 'фигуры'}: " + "; ".join(parts) + ".")
