"""The BIO label set of the token-classification baseline: two heads' worth of tags
(main entities, then modifiers) in one label space, as the encoder's config declares it."""

from fedmed_components.data.schema import MAIN_TYPES, MODIFIER_TYPES


def _tags(types: tuple[str, ...]) -> list[str]:
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


MAIN_TAGS = _tags(MAIN_TYPES)
MODIFIER_TAGS = _tags(MODIFIER_TYPES)
NUM_MAIN = len(MAIN_TAGS)
NUM_LABELS = NUM_MAIN + len(MODIFIER_TAGS)
ID2LABEL = {i: f"main/{t}" for i, t in enumerate(MAIN_TAGS)} | {NUM_MAIN + i: f"modifier/{t}" for i, t in enumerate(MODIFIER_TAGS)}
