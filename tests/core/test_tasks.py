import pytest
import torch

from x2edit.task_classifier import LLMTaskClassifier, TaskClassifier
from x2edit.tasks import TASK_NAMES, TASKS, get_task, task_id

EXPECTED = ["subject_deletion", "subject_addition", "style_change", "background_change", "color_change",
            "material_change", "action_change", "subject_replacement", "portrait_retouch", "text_change",
            "tone_transform", "camera_move", "implicit_change", "low_level", "subject_driven"]


def test_taxonomy_names_and_stable_ids():
    assert list(TASK_NAMES) == EXPECTED  # ids are positions: never reorder
    assert [t.id for t in TASKS] == list(range(15))
    assert all(t.description and len(t.examples) >= 5 for t in TASKS)
    assert get_task("color_change").id == 4 == task_id(4) == task_id("color_change")


@pytest.mark.parametrize("bad", ["recolor", "", 15, -1, None, True])
def test_unknown_task_is_refused_with_the_valid_names(bad):
    with pytest.raises(ValueError, match="unknown task"):
        get_task(bad)


@pytest.fixture(scope="module")
def classifier():
    return TaskClassifier()  # the real all-MiniLM-L6-v2, offline


# Paraphrases that appear nowhere in the taxonomy's examples.
HELD_OUT = [("please erase the small green circle", "subject_deletion"),
            ("make the whole picture look like an oil painting", "style_change"),
            ("swap the backdrop for a desert", "background_change"),
            ("color the square pink", "color_change"),
            ("make the ball look wooden", "material_change"),
            ("replace the square with a circle", "subject_replacement"),
            ("change the letter A to Z", "text_change"),
            ("zoom into the center", "camera_move"),
            ("remove the blur", "low_level")]


def test_default_classifier_on_unseen_paraphrases(classifier):
    predicted = classifier.predict([t for t, _ in HELD_OUT])
    assert predicted == [task for _, task in HELD_OUT]


def test_fit_moves_prototypes_and_save_load_round_trips(classifier, tmp_path):
    clf = TaskClassifier(classifier.encoder, classifier.prototypes.clone())
    phrase = "quux the frobnicator"
    clf.fit([phrase, "frobnicate the quux"], ["camera_move", "camera_move"], method="mean")
    assert clf.predict([phrase]) == ["camera_move"]
    clf.save(tmp_path / "clf.safetensors")
    loaded = TaskClassifier.load(tmp_path / "clf.safetensors", encoder=classifier.encoder)
    assert torch.equal(loaded.prototypes, clf.prototypes)
    with pytest.raises(ValueError, match="labels"):
        clf.fit(["a"], [])


def test_probe_fits_every_task_and_round_trips(classifier, tmp_path):
    """fit's softmax probe learns the labelled instructions (here: each task's taxonomy examples, all
    15 tasks) and keeps the unseen paraphrases right; the bias is saved and loaded with the rows."""
    from x2edit.tasks import TASKS

    texts = [e for t in TASKS for e in t.examples]
    labels = [t.name for t in TASKS for _ in t.examples]
    clf = TaskClassifier(classifier.encoder, classifier.prototypes.clone()).fit(texts, labels)
    assert clf.predict(texts) == labels
    assert clf.predict([t for t, _ in HELD_OUT]) == [task for _, task in HELD_OUT]
    assert clf.bias.abs().sum() > 0
    clf.save(tmp_path / "clf.safetensors")
    loaded = TaskClassifier.load(tmp_path / "clf.safetensors", encoder=classifier.encoder)
    assert torch.equal(loaded.bias, clf.bias) and torch.equal(loaded.prototypes, clf.prototypes)
    with pytest.raises(ValueError, match="needs examples of every task"):
        clf.fit(texts[:3], labels[:3])
    with pytest.raises(ValueError, match="'probe', 'mlp' or 'mean'"):
        clf.fit(texts, labels, method="svm")


def test_mlp_learns_shape_world_instructions_deterministically_and_round_trips(classifier, tmp_path):
    """The MLP router the embedded model ships: fitted on training-split instructions, it routes held-out
    ones (new phrasings half of the time) better than the linear probe fitted on the same data. On these 600
    instructions it reaches 0.825 (the probe 0.79); the bundle fits it on 6000 (its accuracy is in the report)."""
    from x2edit.data_pipeline.shapeworld import ShapeWorld
    from x2edit.tasks import TASKS

    world = ShapeWorld(32)
    train = [world.sample(seed=i) for i in range(600)]
    texts = [p.instruction for p in train] + [e for t in TASKS for e in t.examples]
    labels = [p.task for p in train] + [t.name for t in TASKS for _ in t.examples]
    held = list(world.eval_pairs(n_per_task=8))

    def accuracy(clf):
        return sum(a == p.task for a, p in zip(clf.predict([p.instruction for p in held]), held)) / len(held)

    fit = lambda method: TaskClassifier(classifier.encoder).fit(texts, labels, method=method)  # noqa: E731
    mlp, again, probe = fit("mlp"), fit("mlp"), fit("probe")
    assert torch.equal(mlp.scores(texts[:5]), again.scores(texts[:5]))  # seeded: the same fit, the same router
    assert accuracy(mlp) > accuracy(probe) and accuracy(mlp) > 0.8
    mlp.save(tmp_path / "mlp.safetensors")
    loaded = TaskClassifier.load(tmp_path / "mlp.safetensors", encoder=classifier.encoder)
    assert torch.equal(loaded.scores(texts[:5]), mlp.scores(texts[:5]))
    probe.save(tmp_path / "probe.safetensors")  # a linear file stays linear
    assert TaskClassifier.load(tmp_path / "probe.safetensors", encoder=classifier.encoder).hidden is None


def test_llm_answer_parsing():
    assert LLMTaskClassifier.parse("The task is: Color Change.") == "color_change"
    assert LLMTaskClassifier.parse("subject_addition, not subject_deletion") == "subject_addition"
    assert LLMTaskClassifier.parse("I am not sure") is None
