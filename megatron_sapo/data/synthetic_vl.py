"""Built-in verifiable image tasks for the vision-language CPU demo: generated from a seed, no files.

"tiny-count": a 32 x 32 picture of 1 to 4 coloured squares on a dark background, and the
question "How many squares?"; the answer is the digit. Choices:

* The picture size is a multiple of the tiny processor's patch (4) times its merge (2), so it
  is never resized: the trainer and the rollout engine see the same pixels, and each picture
  is 16 image tokens.
* Squares are 4-6 pixels wide (at least one patch) and never touch (one pixel of background
  between them), so the count is unambiguous in the pixels.
* The problem set is finite and enumerated like the text tasks': 300 distinct scenes per count
  (a scene is its background and its set of squares; duplicates are drawn again, so no picture
  sits in two splits), split three ways by the same seeded shuffle as ``synthetic``.
* Scored by the "math" verifier (the response's last number must equal the count) rather than
  "exact_match": the demo starts from a random model (its image cold start only reaches chance
  level, see examples/tiny_cpu_vl/sapo.toml), which must be able to earn a reward by writing
  the right digit anywhere last in its response.

Only the split's pictures are drawn (with Pillow, imported when drawing), so loading the
config, which checks the task name, stays cheap.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

from megatron_sapo.data.records import IMAGE_PLACEHOLDER, PromptRecord
from megatron_sapo.data.synthetic import Split, split_items

IMAGE_SIZE = 32
COUNTS: tuple[int, ...] = (1, 2, 3, 4)
SCENES_PER_COUNT = 300
SQUARE_SIDES: tuple[int, ...] = (4, 5, 6)
COLOURS: tuple[tuple[int, int, int], ...] = ((230, 50, 50), (60, 200, 80), (70, 110, 250), (240, 220, 60),
                                             (245, 245, 245))
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (40, 40, 60), (30, 60, 40))

Square = tuple[int, int, int, int]
"""(left, top, side, colour index)."""


@dataclass(frozen=True)
class CountingScene:
    """Squares on a background; the answer is how many."""

    background: int
    """Index into BACKGROUNDS."""
    squares: tuple[Square, ...]
    """Sorted, so two scenes with the same squares are equal."""

    @property
    def answer(self) -> str:
        return str(len(self.squares))

    def png(self) -> bytes:
        """The scene drawn at IMAGE_SIZE x IMAGE_SIZE, as a PNG file (lossless)."""
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(image)
        for left, top, side, colour in self.squares:
            draw.rectangle((left, top, left + side - 1, top + side - 1), fill=COLOURS[colour])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


def _apart(a: Square, b: Square) -> bool:
    """At least one pixel of background between the two squares."""
    (ax, ay, a_side, _), (bx, by, b_side, _) = a, b
    return ax + a_side < bx or bx + b_side < ax or ay + a_side < by or by + b_side < ay


def _draw_scene(rng: random.Random, count: int) -> CountingScene:
    while True:  # rejection sampling; four small squares fit a 32 x 32 picture easily
        squares: list[Square] = []
        for _ in range(50):
            side = rng.choice(SQUARE_SIDES)
            square = (rng.randrange(IMAGE_SIZE - side + 1), rng.randrange(IMAGE_SIZE - side + 1), side,
                      rng.randrange(len(COLOURS)))
            if all(_apart(square, other) for other in squares):
                squares.append(square)
                if len(squares) == count:
                    return CountingScene(background=rng.randrange(len(BACKGROUNDS)), squares=tuple(sorted(squares)))


def counting_scenes() -> list[CountingScene]:
    """SCENES_PER_COUNT distinct scenes for every count, in a fixed order (count by count)."""
    scenes: list[CountingScene] = []
    for count in COUNTS:
        rng, seen = random.Random(f"tiny-count/{count}"), set()
        while len(seen) < SCENES_PER_COUNT:
            scene = _draw_scene(rng, count)
            if scene not in seen:
                seen.add(scene)
                scenes.append(scene)
    return scenes


@dataclass(frozen=True)
class ImageTask:
    """A finite, enumerated set of pictures with one question, split three ways by a seeded shuffle
    (the same splitting as the text tasks)."""

    name: str
    enumerate_scenes: Callable[[], Sequence[CountingScene]]
    """All scenes, in a fixed order."""
    question: str
    """The prompt; ``<image>`` marks where the picture goes."""
    val_fraction: float = 0.2
    sft_fraction: float = 0.2
    reward: str = "math"
    """Registry name of the task's verifier."""
    has_images: ClassVar[bool] = True

    def split_scenes(self, split: Split, seed: int) -> list[tuple[int, CountingScene]]:
        """(position in the enumeration, scene) of one split, in a seeded order."""
        return split_items(list(enumerate(self.enumerate_scenes())), split, seed, self.val_fraction,
                           self.sft_fraction, self.name)

    def records(self, split: Split, seed: int) -> list[PromptRecord]:
        return [PromptRecord(index=i, prompt=self.question, answer=scene.answer,
                             source=f"{self.name}[{split}] scene {number}", images=(scene.png(),))
                for i, (number, scene) in enumerate(self.split_scenes(split, seed))]


IMAGE_TASKS: dict[str, ImageTask] = {
    task.name: task for task in (
        ImageTask("tiny-count", counting_scenes, question=f"{IMAGE_PLACEHOLDER}How many squares?"),
    )
}
