"""Corpus mappings as YAML / JSON files: the built-in ones, a user's, and bad ones.

A bad file is an InputError naming the file and the line; `fedmed` prints it as one
line, no traceback (the rules of test_cli_errors.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmed_components.cli import main
from fedmed_components.data.corpora import MappingReport, load_corpus
from fedmed_components.data.document import InputError
from fedmed_components.data.schema import (
    BUILTIN_MAPPINGS,
    ENTITY_TYPES,
    MAPPINGS,
    MAPPINGS_FOLDER,
    RELATION_TYPES,
    CorpusMapping,
    RelationRule,
    get_mapping,
    load_mapping_file,
)

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the built-in mappings

# A frozen copy of the Python definitions the files replaced (schema.py before the
# mappings became files): the files must say exactly the same.
_FROZEN_MACCROBAT_TYPES = {
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
_FROZEN_PHEE_TYPES = {
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
_ALL_TYPES = (
    "problem",
    "treatment",
    "test",
    "drug",
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
FROZEN = {
    "kiwi": CorpusMapping(
        name="kiwi",
        type_map={t: t for t in _ALL_TYPES},
        relation_map={t: RelationRule(t) for t in ("hasAttr", "hasTemporal")},
    ),
    "maccrobat": CorpusMapping(
        name="maccrobat",
        type_map=_FROZEN_MACCROBAT_TYPES,
        relation_map={"MODIFY": RelationRule("hasAttr", swap_arguments=True)},
        negation_attributes=frozenset({("POLARITY", "NEG")}),
        annotated_types=frozenset(_FROZEN_MACCROBAT_TYPES.values()),
        annotated_relations=frozenset({"hasAttr"}),
    ),
    "phee": CorpusMapping(
        name="phee",
        type_map=_FROZEN_PHEE_TYPES,
        annotated_types=frozenset(_FROZEN_PHEE_TYPES.values()),
        annotated_relations=frozenset(),
    ),
}


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_builtin_mapping_files_equal_the_former_python_definitions(name):
    assert get_mapping(name) == FROZEN[name]
    assert load_mapping_file(MAPPINGS_FOLDER / f"{name}.yaml") == FROZEN[name]
    assert FROZEN["kiwi"].annotated_types == frozenset(ENTITY_TYPES)  # the frozen copy is today's schema
    assert FROZEN["kiwi"].annotated_relations == frozenset(RELATION_TYPES)


def test_builtin_mappings_are_loaded_by_name_and_shipped_as_package_data():
    assert tuple(sorted(MAPPINGS)) == BUILTIN_MAPPINGS
    assert sorted(p.stem for p in MAPPINGS_FOLDER.glob("*.yaml")) == sorted(BUILTIN_MAPPINGS)
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [pattern for pattern in package_data["fedmed_components.data"]]
    assert any(Path("mappings/kiwi.yaml").match(p) for p in shipped), shipped


# ---------------------------------------------------------------- a user's mapping file

USER_YAML = """\
# a hospital's own BRAT types
entities:
  Sign_symptom: problem
  Lab_value: labvalue
  Test_name: test
  Body_part: bodyloc
relations:
  VALUE_OF: {type: hasAttr, main: Arg2}   # written labvalue -> test
  LOCATED: {type: hasAttr, main: Arg1}
negation: {attribute: Negation, values: ["true", "NEG"]}  # any attribute but `Negated`, which BRAT readers set themselves
annotated: [problem, labvalue, test, bodyloc, negation]
"""

USER_JSON = {
    "entities": {"Sign_symptom": "problem", "Lab_value": "labvalue", "Test_name": "test", "Body_part": "bodyloc"},
    "relations": {"VALUE_OF": {"type": "hasAttr", "main": "Arg2"}, "LOCATED": {"type": "hasAttr", "main": "Arg1"}},
    "negation": {"attribute": "Negation", "values": ["true", "NEG"]},
    "annotated": ["problem", "labvalue", "test", "bodyloc", "negation"],
}

NOTE = "No cough. Glucose 140 in blood. Chest clear."
ANN = "\n".join(
    [
        "T1\tSign_symptom 3 8\tcough",
        "T2\tTest_name 10 17\tGlucose",
        "T3\tLab_value 18 21\t140",
        "T4\tBody_part 25 30\tblood",
        "T5\tAnatomy 32 37\tChest",  # maps nowhere: dropped and counted
        "R1\tVALUE_OF Arg1:T3 Arg2:T2",  # main is Arg2: becomes test -> labvalue
        "R2\tLOCATED Arg1:T2 Arg2:T4",
        "R3\tLOCATED Arg1:T1 Arg2:T5",  # its argument T5 was dropped
        "R4\tCAUSES Arg1:T1 Arg2:T2",  # no counterpart
        "A1\tNegation T1 NEG",
        "A2\tNegation T2 MAYBE",
    ]
)


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "brat"
    folder.mkdir()
    (folder / "n1.txt").write_text(NOTE, encoding="utf-8")
    (folder / "n1.ann").write_text(ANN + "\n", encoding="utf-8")
    return folder


def user_file(tmp_path, kind: str) -> Path:
    path = tmp_path / f"hospital_a.{kind}"
    path.write_text(USER_YAML if kind == "yaml" else json.dumps(USER_JSON, indent=2), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_user_mapping_file_reads_a_brat_corpus(tmp_path, corpus, kind):
    mapping = get_mapping(user_file(tmp_path, kind))
    assert mapping.name == "hospital_a"
    assert mapping.relation_rule("VALUE_OF") == RelationRule("hasAttr", swap_arguments=True)
    assert mapping.annotated_types == {"problem", "labvalue", "test", "bodyloc", "negation"}
    assert mapping.annotated_relations == {"hasAttr"}  # the mapped ones by default
    report = MappingReport()
    (doc,) = load_corpus(corpus, str(tmp_path / f"hospital_a.{kind}"), mapping_report=report)
    assert {e.id: e.type for e in doc.entities} == {"T1": "problem", "T2": "test", "T3": "labvalue", "T4": "bodyloc"}
    assert [(r.type, r.head, r.tail) for r in doc.relations] == [("hasAttr", "T2", "T3"), ("hasAttr", "T2", "T4")]
    assert doc.entity("T1").negated is True and doc.entity("T2").negated is None
    assert report.mapping == "hospital_a"
    assert report.dropped_entities == {"Anatomy": 1}
    assert report.dropped_relations == {"LOCATED: an argument's type was dropped": 1, "CAUSES: no Kiwi counterpart": 1}
    assert report.swapped_relations == 1 and report.negated_entities == 1


def test_user_mapping_file_through_data_stats(tmp_path, corpus, capsys):
    path = user_file(tmp_path, "yaml")
    assert main(["data", "stats", str(corpus), "--mapping", str(path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["spans_per_type"] == {"problem": 1, "test": 1, "labvalue": 1, "bodyloc": 1}
    assert stats["relations_per_type"] == {"hasAttr test -> labvalue": 1, "hasAttr test -> bodyloc": 1}
    assert stats["negated_spans"] == 1
    assert stats["mapping"]["mapping"] == "hospital_a" and stats["mapping"]["dropped_entities"] == {"Anatomy": 1}


def test_user_mapping_file_through_split_names_the_site_after_the_file(tmp_path, corpus, capsys):
    path = user_file(tmp_path, "json")
    assert main(["data", "split", str(corpus), str(tmp_path / "sites"), "--by", "corpus", "--mapping", str(path)]) == 0
    manifest = json.loads((tmp_path / "sites" / "manifest.json").read_text())
    assert (tmp_path / "sites" / "hospital_a" / "train.jsonl").exists()
    assert "hospital_a" in json.dumps(manifest)


def test_negation_without_values_is_a_binary_attribute_and_kiwi_names_stay_exact(tmp_path):
    path = tmp_path / "m.yml"
    path.write_text("entities: {No: problem, 'true': drug}\nnegation: {attribute: Neg}\n", encoding="utf-8")
    m = get_mapping(path)
    assert m.type_map == {"No": "problem", "true": "drug"}  # YAML's booleans stay the names written
    assert m.marks_negated("Neg", None) and not m.marks_negated("Neg", "true")
    assert m.annotated_relations == frozenset() and m.relation_map == {}


def test_an_unknown_name_is_still_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="known: kiwi, maccrobat, phee"):
        get_mapping("i2b2")
    assert get_mapping("PHEE") is MAPPINGS["phee"]


# ---------------------------------------------------------------- bad mapping files

BAD_YAML = {
    "unknown top-level key": ("entities:\n  Drug: drug\nrelation:\n  X: {type: hasAttr}\n", 3, "unknown key 'relation'"),
    "unknown schema type": (
        "entities:\n  Drug: drug\n  Symptom: problm\n",
        3,
        "unknown schema entity type 'problm'; did you mean 'problem'?",
    ),
    "unknown relation type": ("entities: {Drug: drug}\nrelations:\n  R: {type: has_attr}\n", 3, "unknown schema relation type 'has_attr'"),
    "bad main": ("entities: {Drug: drug}\nrelations:\n  MODIFY:\n    type: hasAttr\n    main: Arg3\n", 5, "unknown main argument 'Arg3'"),
    "unknown annotated type": ("entities: {Drug: drug}\nannotated:\n  - drug\n  - lab\n", 4, "unknown schema type 'lab'"),
    "unknown negation key": ("entities: {Drug: drug}\nnegation:\n  attribute: P\n  value: NEG\n", 4, "unknown key 'value' in negation"),
    "a key twice": ("entities:\n  Drug: drug\n  Drug: problem\n", 3, "entities.Drug is given twice"),
    "malformed YAML": ("entities:\n  Drug: drug\n  Dose: [dosage\nrelations: {}\n", 4, "not valid YAML"),
    "bad indentation": ("entities:\n  Drug: drug\n Dose: dosage\n", 3, "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_yaml_mapping_names_file_and_line(tmp_path, case):
    text, line, says = BAD_YAML[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as err:
        get_mapping(path)
    assert err.value.path == str(path) and err.value.line == line, str(err.value)
    assert says in err.value.reason and "\n" not in str(err.value)


BAD_JSON = {
    "unknown top-level key": ('{\n  "entities": {"Drug": "drug"},\n  "annotations": ["drug"]\n}\n', 3, "unknown key 'annotations'"),
    "unknown schema type": (
        '{\n  "entities": {\n    "Drug": "drug",\n    "Sym": "problm"\n  }\n}\n',
        4,
        "unknown schema entity type 'problm'",
    ),
    "bad main": (
        '{"entities": {"Drug": "drug"},\n "relations": {\n  "MODIFY": {"type": "hasAttr",\n             "main": "Arg0"}}}\n',
        4,
        "unknown main argument 'Arg0'",
    ),
    "entities text in a value is not taken for the key": (
        '{"annotated": ["entities"],\n "entities": {"Drug": "drug", "X": "nope"}}',
        2,
        "unknown schema entity type 'nope'",
    ),
    "malformed JSON": ('{\n  "entities": {\n    "Drug": "drug",\n  }\n}\n', 4, "not valid JSON"),
    "a key twice": ('{"entities": {"Drug": "drug",\n "Drug": "problem"}}', 2, "entities.Drug is given twice"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_json_mapping_names_file_and_line(tmp_path, case):
    text, line, says = BAD_JSON[case]
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as err:
        get_mapping(str(path))
    assert err.value.path == str(path) and err.value.line == line, str(err.value)
    assert says in err.value.reason and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "the file is empty"),
        ("relations: {}\n", "no `entities:` table"),
        ("- drug\n", "the file must be a mapping"),
        ("entities: {}\n", "entities maps no source type"),
    ],
)
def test_mapping_without_entities_is_refused(tmp_path, text, says):
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=says):
        get_mapping(path)


def test_missing_mapping_file(tmp_path):
    with pytest.raises(InputError, match="no such mapping file"):
        get_mapping(str(tmp_path / "nope.yaml"))


def one_error_line(rc: int, err: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fedmed: error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["data", "stats", "{corpus}"],
        ["data", "convert", "{corpus}", "{tmp}/out.jsonl"],
        ["data", "split", "{corpus}", "{tmp}/sites", "--by", "iid"],
        ["eval", "--gold", "{corpus}", "--pred", "{corpus}"],
    ],
)
@pytest.mark.parametrize("case", ["unknown schema type", "malformed YAML"])
def test_the_cli_prints_a_bad_mapping_file_as_one_line(tmp_path, corpus, capsys, command, case):
    text, line, says = BAD_YAML[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    argv = [a.format(corpus=corpus, tmp=tmp_path) for a in command] + ["--mapping", str(path)]
    error = one_error_line(main(argv), capsys.readouterr().err)
    assert f"{path}:{line}: corpus mapping: " in error and says in error
    assert "--lenient-input" not in error  # a mapping file is not an input item to skip
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "sites").exists()


def test_the_cli_refuses_an_unknown_mapping_name(corpus, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "stats", str(corpus), "--mapping", "i2b2"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "argument --mapping" in err and "kiwi, maccrobat, phee" in err


def test_a_mapping_file_works_for_the_site_data_and_an_experiment_source(tmp_path, corpus):
    """model/site.py and runs/experiment take a mapping through get_mapping: a path works there too."""
    from fedmed_components.model.site import load_site_data
    from fedmed_components.runs.experiment.data import DataSource

    path = str(user_file(tmp_path, "yaml"))
    site = load_site_data(corpus, mapping=path)
    assert {e.type for d in site.train for e in d.entities} == {"problem", "test", "labvalue", "bodyloc"}
    assert site.types == {"problem", "labvalue", "test", "bodyloc", "negation"}
    source = DataSource(name="hospital_a", path=str(corpus), mapping=path)
    assert source.annotated_types() == ["problem", "test", "bodyloc", "labvalue", "negation"]
    assert source.annotated_relations() == ["hasAttr"]


@pytest.mark.parametrize("argv", [["data", "stats", "--help"], ["data", "split", "--help"], ["eval", "--help"]])
def test_help_says_a_mapping_may_be_a_file(capsys, argv):
    with pytest.raises(SystemExit):
        main(argv)
    out = " ".join(capsys.readouterr().out.split())
    assert "YAML / JSON mapping file" in out and "--lenient-input" in out
