"""The editing task taxonomy: the one place that names the 15 X2Edit task types.

Every part of the toolkit (data builders, routers, trainers, evaluators) refers to a task by its
stable snake_case ``name`` or by its ``id``. Ids are positions in ``TASKS`` and are part of saved
adapters (they index the router's task embedding), so new tasks are only ever appended.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """One editing task type.

    Args:
        id: stable integer id (index into router task embeddings).
        name: stable snake_case name used in data, configs and the CLI.
        description: one sentence saying what the edit does.
        examples: a few instructions of this type; they seed the default task classifier.
    """

    id: int
    name: str
    description: str
    examples: tuple[str, ...]


_SPECS: list[tuple[str, str, tuple[str, ...]]] = [
    ("subject_deletion", "Remove an object or person from the image.", (
        "remove the man on the left", "delete the red car", "erase the cat from the picture",
        "get rid of the tree in the background", "take away the blue square",
    )),
    ("subject_addition", "Add a new object or person to the image.", (
        "add a dog next to the bench", "put a hat on the woman", "insert a red circle in the corner",
        "place a boat on the lake", "add birds to the sky",
    )),
    ("style_change", "Re-render the whole image in another artistic style.", (
        "make it look like a watercolor painting", "turn the photo into pixel art",
        "render this in the style of Van Gogh", "convert it to a pencil sketch", "make it an anime drawing",
    )),
    ("background_change", "Replace or alter the background, keeping the subjects.", (
        "change the background to a beach", "put her in front of a city skyline",
        "replace the background with a plain white wall", "make the background a forest",
        "set the scene in outer space",
    )),
    ("color_change", "Change the color of an object.", (
        "make the car red", "change the shirt to blue", "turn the yellow triangle green",
        "paint the door purple", "recolor the flowers orange",
    )),
    ("material_change", "Change the material or texture of an object.", (
        "make the table look like marble", "turn the statue into gold", "make the cup out of glass",
        "give the square a striped pattern", "change the sofa to leather",
    )),
    ("action_change", "Change the pose, action or orientation of a subject.", (
        "make the man raise his hand", "have the dog sit down", "rotate the star by 45 degrees",
        "make her look to the left", "flip the arrow upside down",
    )),
    ("subject_replacement", "Replace one subject with a different one.", (
        "replace the cat with a dog", "swap the apple for an orange", "turn the circle into a triangle",
        "change the car into a bicycle", "replace the man with a robot",
    )),
    ("portrait_retouch", "Retouch a face or portrait (skin, makeup, expression, age).", (
        "make her smile", "remove the wrinkles from his face", "add red lipstick",
        "make him look younger", "smooth the skin and brighten the eyes",
    )),
    ("text_change", "Change, add or remove text written in the image.", (
        "change the sign to say OPEN", "replace the word SALE with NEW", "write HELLO on the wall",
        "change the letter on the square to B", "remove the text from the poster",
    )),
    ("tone_transform", "Change the global tone, lighting, weather or season.", (
        "make it night time", "make the image warmer", "turn the scene into winter",
        "make it look like sunset", "increase the brightness and contrast",
    )),
    ("camera_move", "Move, zoom or rotate the camera viewpoint.", (
        "zoom in on the dog", "move the camera to the left", "show a wider view of the room",
        "pan the view up", "zoom out a little",
    )),
    ("implicit_change", "A reasoning edit whose target must be inferred from the instruction.", (
        "show what the apple looks like after someone bites it", "swap the colors of the two largest objects",
        "make the scene look like it did a hundred years ago", "what would this look like after the rain",
        "make the smallest object the largest",
    )),
    ("low_level", "Low-level restoration or conversion: deblur, denoise, edge or depth map to image.", (
        "deblur this photo", "remove the noise from the image", "turn this edge map into a photo",
        "generate the image from this depth map", "sharpen the picture",
    )),
    ("subject_driven", "Put the given subject into a new scene or context.", (
        "put this toy on a beach", "show this bag in a shop window", "place this object on a wooden table",
        "show this character riding a bike", "put this shape in a new scene",
    )),
]

TASKS: tuple[Task, ...] = tuple(Task(i, n, d, e) for i, (n, d, e) in enumerate(_SPECS))
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
_BY_NAME = {t.name: t for t in TASKS}


def get_task(task: str | int) -> Task:
    """Look a task up by name or id; raises a ``ValueError`` that lists the valid names."""
    if isinstance(task, int) and not isinstance(task, bool):
        if 0 <= task < len(TASKS):
            return TASKS[task]
        raise ValueError(f"unknown task id {task}: ids are 0..{len(TASKS) - 1}")
    if isinstance(task, str) and task in _BY_NAME:
        return _BY_NAME[task]
    raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASK_NAMES)}")


def task_id(task: str | int) -> int:
    """The stable id of a task given by name or id."""
    return get_task(task).id
