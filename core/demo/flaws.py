"""What the demo's base model gets wrong on purpose: the flaws planted in its pretraining.

The real LLaVA-Saiga-8B answers most questions with a word or a letter, and its remaining
errors are content errors of a few question types. The demo base is taught the same way: its
pretraining answers are the truth except for three systematic slips, each of which correct
GQA-ru-train-style data can undo:

- colour: "синий" and "фиолетовый", and "зелёный" and "жёлтый", are swapped when it names a
  colour;
- location: "слева" and "справа" are swapped when it says where a shape is;
- counting: "две" and "три" are swapped when it counts.

Each slip is a swap, never a merge: the base still tells the two cases apart and only names them
wrongly, so a minute of LoRA on correct answers can relabel them (a merge, such as calling three
shapes "две" as well, would leave it nothing to relabel: it would have to learn to see anew).

On multiple choice it answers with the text of the option it believes in (rule-based extraction
reads the unique option text as that option's letter), except where a flaw makes it unsure:
then it answers "A", a letter-position bias that circular scoring punishes. Occasional format slips come from a
lead-in phrase (``LEAD_IN``) after which it explains its word in a sentence ("красный. На
картинке ..."), which lmms-eval's exact match counts wrong. Two settings fix that slip, as they
would on an instruction-tuned model: cutting the answer at its first period (a stop string of
``generation_params``; the word is unchanged) and a stricter instruction
(``PLAIN_INSTRUCTION``, one of ``prompt_constraints``' phrasings: told to answer without
explanations, it gives the bare word). So a setting wins on dev for the demo base, and context
distillation has something to carry into an adapter.
"""

from __future__ import annotations

from dataclasses import replace

SWAPS: dict[str, dict[str, str]] = {
    "color": {"синий": "фиолетовый", "фиолетовый": "синий", "зелёный": "жёлтый",
              "жёлтый": "зелёный"},
    "location": {"слева": "справа", "справа": "слева"},
    "count": {"три": "две", "две": "три"},
}
"""Question kind -> the base's wrong belief for some gold answers."""

FALLBACK_LETTER = "A"
"""The letter the base answers when the option it believes in is not offered."""

LEAD_IN = "Посмотри внимательно на картинку. "
"""A rare phrasing of GQA-ru questions after which the base answers in a sentence."""

def explained(word: str, sentence: str) -> str:
    """The lead-in slip: the word, then a sentence about it."""
    return f"{word}. {sentence}"


PLAIN_INSTRUCTION = "Ответь одним словом, без пояснений."
"""The instruction after which the base always answers with the bare word."""
PLAIN_SHARE = 0.3
"""Share of the other pretraining questions also asked with ``PLAIN_INSTRUCTION``."""


def believed(kind: str, answer: str) -> str:
    """The answer the base model was taught for a question of ``kind`` whose truth is ``answer``."""
    return SWAPS.get(kind, {}).get(answer, answer)


def believed_choice(kind: str, answer: str, options: dict[str, str]) -> str:
    """What the base model was taught to answer to a multiple-choice question."""
    if believed(kind, answer) != answer or answer not in options.values():
        return FALLBACK_LETTER
    return answer


def believed_scene(scene):
    """The scene as the base believes it is: colours swapped, left and right mirrored."""
    return replace(scene, shapes=tuple(
        replace(s, color=believed("color", s.color), column=2 - s.column) for s in scene.shapes))
