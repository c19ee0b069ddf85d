"""Synthetic scenes and Russian questions about them (colour, counting, location, yes/no).

A scene is a 3x3 grid of cells; each of the three columns holds at most one coloured shape.
Images are 48x48 pixels, so with 16-pixel patches every cell is one vision token.
Short answers follow GQA-ru's style (one word); verbose answers imitate the way the real
LLaVA-Saiga answers: a whole sentence around the answer word, so exact match fails although
the model knows the word (multiple-choice prompts get a description of the scene instead).
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
COLUMNS = ["слева", "посередине", "справа"]
COLUMN_PHRASE = ["в левой части", "в центральной части", "в правой части"]
COUNT_WORDS = {1: "одна", 2: "две", 3: "три"}
SHAPES = ("square", "circle")


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
    n = rng.choice([1, 2, 2, 3, 3])
    columns = sorted(rng.sample(range(3), n))
    colors = rng.sample(sorted(COLORS), n)
    shapes = tuple(
        Shape(color=c, column=col, row=rng.randrange(3), kind=rng.choice(SHAPES))
        for c, col in zip(colors, columns)
    )
    grey = rng.randint(225, 250)
    return Scene(shapes=shapes, background=(grey, grey, grey))


def render(scene: Scene, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        rgb = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLORS[s.color][0])
        pad = rng.randint(1, 3)
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
    """All question kinds that make sense for the scene, in a fixed order."""
    out = []
    shape = rng.choice(scene.shapes)
    col = COLUMNS[shape.column]
    fem = COLORS[shape.color][1]
    out.append(Question(
        kind="color",
        question=f"Какого цвета фигура {col}?",
        answer=shape.color,
        full_answer=f"Фигура {col} {fem}.",
        verbose=f"Цвет фигуры {col} — {shape.color}, это хорошо видно на картинке.",
        options=tuple(COLORS),
        semantic=(("select", "фигура"), ("filter hposition", col), ("query", "color")),
        types=("query", "attr", "queryAttr"),
    ))
    target = rng.choice(scene.shapes)
    tfem = COLORS[target.color][1]
    out.append(Question(
        kind="location",
        question=f"Где находится {tfem} фигура?",
        answer=COLUMNS[target.column],
        full_answer=f"{tfem.capitalize()} фигура находится {COLUMNS[target.column]}.",
        verbose=(f"{tfem.capitalize()} фигура находится {COLUMNS[target.column]}, "
                 f"{COLUMN_PHRASE[target.column]} этой картинки."),
        options=tuple(COLUMNS),
        semantic=(("select", "фигура"), ("filter color", target.color), ("query", "hposition")),
        types=("query", "rel", "positionQuery"),
    ))
    n = len(scene.shapes)
    noun = "фигура" if n == 1 else "фигуры"
    out.append(Question(
        kind="count",
        question="Сколько фигур на картинке?",
        answer=COUNT_WORDS[n],
        full_answer=f"На картинке {COUNT_WORDS[n]} {noun}.",
        verbose=f"Если посчитать внимательно, то на картинке {COUNT_WORDS[n]} {noun} разного цвета.",
        options=tuple(COUNT_WORDS.values()),
        semantic=(("select", "фигура"), ("count", "фигура")),
        types=("query", "obj", "count"),
    ))
    present = rng.random() < 0.5
    color = (rng.choice(sorted(scene.colors())) if present
             else rng.choice(sorted(set(COLORS) - scene.colors())))
    cfem = COLORS[color][1]
    out.append(Question(
        kind="exist",
        question=f"Есть ли на картинке {cfem} фигура?",
        answer="да" if present else "нет",
        full_answer=f"{'Да' if present else 'Нет'}, {cfem} фигура {'есть' if present else 'отсутствует'}.",
        verbose=(f"Да, на этой картинке действительно можно увидеть {cfem} фигуру." if present
                 else f"Нет, на этой картинке {COLORS[color][2]} цвета фигуры не видно."),
        options=("да", "нет"),
        semantic=(("select", "фигура"), ("filter color", color), ("exist", "?")),
        types=("verify", "obj", "existAttr"),
    ))
    return out


def describe(scene: Scene) -> str:
    """A long description, the LLaVA-Instruct-ru style answer to "describe the picture"."""
    parts = [f"{COLORS[s.color][1]} {'квадратная' if s.kind == 'square' else 'круглая'} фигура "
             f"{COLUMN_PHRASE[s.column]}" for s in scene.shapes]
    n = len(scene.shapes)
    return (f"На изображении светлый фон, на нём {n} "
            f"{'фигура' if n == 1 else 'фигуры'}: " + "; ".join(parts) + ".")
