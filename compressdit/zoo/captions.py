"""Caption templates and class synonyms for the text-conditioned Fashion-MNIST references."""

from __future__ import annotations

from compressdit.zoo.data import CLASS_NAMES

CLASS_SYNONYMS = (
    ("t-shirt", "top", "tee"),
    ("trouser", "pair of trousers", "pair of pants"),
    ("pullover", "sweater", "jumper"),
    ("dress", "summer dress", "long dress"),
    ("coat", "jacket", "winter coat"),
    ("sandal", "summer sandal", "open sandal"),
    ("shirt", "button-up shirt", "blouse"),
    ("sneaker", "running shoe", "trainer"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "leather boot"),
)
TEMPLATES = (
    "a photo of a {}",
    "a {}, product shot",
    "a {} on a plain background",
    "a grayscale picture of a {}",
    "{}",
    "a small image of a {}",
    "catalogue photo: {}",
    "an item of clothing: a {}",
)
assert len(CLASS_SYNONYMS) == len(CLASS_NAMES)


def training_captions() -> tuple[list[str], list[int]]:
    """Every (template, synonym) caption with its class id."""
    captions, labels = [], []
    for label, names in enumerate(CLASS_SYNONYMS):
        for name in names:
            for template in TEMPLATES:
                captions.append(template.format(name))
                labels.append(label)
    return captions, labels


def evaluation_captions() -> tuple[list[str], list[int]]:
    """One plain caption per class, used for class accuracy of text-conditioned samples."""
    return [f"a photo of a {names[0]}" for names in CLASS_SYNONYMS], list(range(len(CLASS_SYNONYMS)))
