from pathlib import Path

import pytest

from fedmed_components.data.schema import (
    ENTITY_TYPES,
    MAIN_TYPES,
    MAPPINGS,
    MODIFIER_TYPES,
    RELATION_TYPES,
    fits_schema,
    get_mapping,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the project")


def test_kiwi_schema_has_4_main_16_modifier_types_and_two_relations():
    assert MAIN_TYPES == ("problem", "treatment", "test", "drug")
    assert len(MODIFIER_TYPES) == 16 and not set(MAIN_TYPES) & set(MODIFIER_TYPES)
    assert {"bodyloc", "labvalue", "negation", "reference_range", "uncertain"} <= set(MODIFIER_TYPES)
    assert RELATION_TYPES == ("hasAttr", "hasTemporal")
    assert ENTITY_TYPES == MAIN_TYPES + MODIFIER_TYPES


def test_relations_point_from_main_entity_to_modifier():
    assert fits_schema("problem", "negation")
    assert not fits_schema("negation", "problem")
    assert not fits_schema("problem", "test")


def test_get_mapping_by_name_and_unknown_name():
    assert set(MAPPINGS) == {"kiwi", "maccrobat", "phee"}
    assert get_mapping("MACCROBAT") is MAPPINGS["maccrobat"]
    assert get_mapping(MAPPINGS["phee"]) is MAPPINGS["phee"]
    with pytest.raises(ValueError, match="known: kiwi, maccrobat, phee"):
        get_mapping("i2b2")


def test_kiwi_mapping_is_exact_identity():
    kiwi = get_mapping("kiwi")
    assert all(kiwi.kiwi_type(t) == t for t in ENTITY_TYPES)
    assert kiwi.kiwi_type("Severity") is None  # another corpus's type is never taken by accident
    assert kiwi.relation_rule("hasTemporal").kiwi_type == "hasTemporal"
    assert kiwi.annotated_types == frozenset(ENTITY_TYPES)


def test_maccrobat_mapping_follows_the_data_readme():
    m = get_mapping("maccrobat")
    expected = {
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
    assert m.type_map == expected
    assert m.kiwi_type("Detailed_description") is None
    rule = m.relation_rule("MODIFY")
    assert rule.kiwi_type == "hasAttr" and rule.swap_arguments
    assert m.relation_rule("BEFORE") is None
    assert m.marks_negated("POLARITY", "NEG") and not m.marks_negated("POLARITY", "MAYBE_NEG")
    assert "negation" not in m.annotated_types  # no negation-cue spans in MACCROBAT
    assert m.annotated_relations == {"hasAttr"}


def test_phee_is_a_partial_schema_site():
    m = get_mapping("phee")
    assert m.type_map == {
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
    assert "test" not in m.annotated_types and "labvalue" not in m.annotated_types
    assert m.annotated_types == frozenset(m.type_map.values())
    assert m.annotated_relations == frozenset()


@needs_data
def test_kiwi_mapping_covers_every_type_used_in_mtsamples():
    used = set()
    for ann in (DATA / "mtsamples_kiwi" / "train").glob("*.ann"):
        for line in ann.read_text(encoding="utf-8").splitlines():
            if line.startswith("T"):
                used.add(line.split("\t")[1].split(" ")[0])
            elif line.startswith("R"):
                used.add(line.split("\t")[1].split(" ")[0])
    kiwi = get_mapping("kiwi")
    unmapped = {t for t in used if kiwi.kiwi_type(t) is None and kiwi.relation_rule(t) is None}
    assert unmapped == set()
