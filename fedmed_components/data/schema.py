"""The Kiwi / Fed-MedLoRA annotation schema and how each source corpus maps onto it.

One source of truth for entity and relation type names. Every other module (prompts,
metrics, partitioning, readers) imports the names from here.

A `CorpusMapping` says how one corpus's BRAT types become Kiwi types. Corpora that
annotate only part of the schema (PHEE has no tests or lab values, MACCROBAT no
negation-cue spans) list what they do annotate in `annotated_types`: a site must never
be trained or scored as if the types it does not annotate were absent from its notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAIN_TYPES: tuple[str, ...] = ("problem", "treatment", "test", "drug")

MODIFIER_TYPES: tuple[str, ...] = (
    "bodyloc",
    "condition",
    "course",
    "dosage",
    "duration",
    "form",
    "frequency",
    "labvalue",
    "negation",
    "reference_range",
    "route",
    "severity",
    "strength",
    "subject",
    "temporal",
    "uncertain",
)

ENTITY_TYPES: tuple[str, ...] = MAIN_TYPES + MODIFIER_TYPES

# Both link a main entity (head, BRAT Arg1) to one of its modifiers (tail, Arg2).
RELATION_TYPES: tuple[str, ...] = ("hasAttr", "hasTemporal")


def is_main_type(entity_type: str) -> bool:
    return entity_type in MAIN_TYPES


def is_modifier_type(entity_type: str) -> bool:
    return entity_type in MODIFIER_TYPES


def fits_schema(head_type: str, tail_type: str) -> bool:
    """A Kiwi relation always points from a main entity to a modifier."""
    return is_main_type(head_type) and is_modifier_type(tail_type)


@dataclass(frozen=True)
class RelationRule:
    """How one source relation type becomes a Kiwi relation."""

    kiwi_type: str
    # MACCROBAT writes MODIFY as modifier -> main; Kiwi wants main -> modifier.
    swap_arguments: bool = False


@dataclass(frozen=True)
class CorpusMapping:
    """How one corpus's source annotation maps onto the Kiwi schema."""

    name: str
    # source entity type -> Kiwi entity type; source types not listed are dropped.
    type_map: dict[str, str]
    # source relation type -> rule; relation types not listed have no Kiwi counterpart.
    relation_map: dict[str, RelationRule] = field(default_factory=dict)
    # (attribute name, value) pairs that mark the annotated entity negated; value None
    # matches a binary attribute (`A1 Negated T3`).
    negation_attributes: frozenset[tuple[str, str | None]] = frozenset()
    # Kiwi entity types this corpus annotates at all (partial-schema sites).
    annotated_types: frozenset[str] = frozenset(ENTITY_TYPES)
    # Kiwi relation types this corpus annotates; empty: do not score or train relations.
    annotated_relations: frozenset[str] = frozenset(RELATION_TYPES)

    def kiwi_type(self, source_type: str) -> str | None:
        """The Kiwi type for a source entity type, or None when it has no counterpart."""
        return self.type_map.get(source_type)

    def relation_rule(self, source_type: str) -> RelationRule | None:
        return self.relation_map.get(source_type)

    def marks_negated(self, name: str, value: str | None) -> bool:
        return (name, value) in self.negation_attributes


# The Kiwi BRAT files (mtsamples_kiwi) spell the types exactly as the schema does, in
# lower case; matching is exact so that another corpus's `Severity` or `Dosage` is never
# taken for a Kiwi type by accident.
KIWI = CorpusMapping(
    name="kiwi",
    type_map={t: t for t in ENTITY_TYPES},
    relation_map={t: RelationRule(t) for t in RELATION_TYPES},
)

_MACCROBAT_TYPES = {
    "Sign_symptom": "problem",
    "Disease_disorder": "problem",
    "Diagnostic_procedure": "test",
    "Lab_value": "labvalue",
    "Medication": "drug",
    "Therapeutic_procedure": "treatment",
    "Dosage": "dosage",
    "Administration": "route",
    "Frequency": "frequency",
    "Duration": "duration",
    "Severity": "severity",
    "Biological_structure": "bodyloc",
    "Date": "temporal",
    "Time": "temporal",
}

MACCROBAT = CorpusMapping(
    name="maccrobat",
    type_map=_MACCROBAT_TYPES,
    relation_map={"MODIFY": RelationRule("hasAttr", swap_arguments=True)},
    negation_attributes=frozenset({("POLARITY", "NEG")}),
    annotated_types=frozenset(_MACCROBAT_TYPES.values()),
    annotated_relations=frozenset({"hasAttr"}),
)

_PHEE_TYPES = {
    "Drug": "drug",
    "Effect": "problem",
    "Treat-Disorder": "problem",
    "Sub-Disorder": "problem",
    "Dosage": "dosage",
    "Route": "route",
    "Freq": "frequency",
    "Duration": "duration",
    "Negation_cue": "negation",
    "Severity_cue": "severity",
    "Speculation_cue": "uncertain",
}

# PHEE's relations (has, has_cue, ...) link event triggers and arguments, not a main
# entity to its modifiers: no Kiwi counterpart, and no relation scoring for the site.
PHEE = CorpusMapping(
    name="phee",
    type_map=_PHEE_TYPES,
    annotated_types=frozenset(_PHEE_TYPES.values()),
    annotated_relations=frozenset(),
)

MAPPINGS: dict[str, CorpusMapping] = {m.name: m for m in (KIWI, MACCROBAT, PHEE)}


def get_mapping(name: str | CorpusMapping) -> CorpusMapping:
    if isinstance(name, CorpusMapping):
        return name
    try:
        return MAPPINGS[name.lower()]
    except KeyError:
        known = ", ".join(sorted(MAPPINGS))
        raise ValueError(f"unknown corpus mapping {name!r} (known: {known})") from None
