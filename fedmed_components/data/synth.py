"""SYNTHETIC clinical notes: the embedded demo corpus. No real patient data.

Every note is assembled here from a few dozen terms and a handful of short sentence
patterns, with exact character offsets: section headers on their own lines, all four
main entity types (problem, treatment, test, drug), the common modifiers (negation,
bodyloc, severity, course, temporal, uncertain, labvalue, strength, dosage, form,
route, frequency) and `hasAttr` relations from each main entity to its modifiers.
The patterns are deliberately regular so that a small model fine-tuned on a CPU for a
few minutes can learn them.

Sites differ as hospitals do: each has a note style (its own section headers) and a
label skew (its own mix of sentence kinds: a discharge-summary site writes mostly
medications, a case-report site mostly tests and labs). Output is deterministic for a
given (site, style, seed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from fedmed_components.data.document import Document, Entity, Relation

PROBLEMS = [
    "chest pain",
    "shortness of breath",
    "fever",
    "cough",
    "nausea",
    "headache",
    "hypertension",
    "diabetes",
    "pneumonia",
    "anemia",
    "dizziness",
    "vomiting",
    "chills",
    "fatigue",
    "sepsis",
]
LOCAL_PROBLEMS = ["pain", "swelling", "numbness", "weakness", "tenderness", "rash"]
BODYLOCS = ["left leg", "right arm", "lower back", "abdomen", "left knee", "neck", "right hip", "both feet"]
TESTS = ["chest x-ray", "CT scan", "ECG", "echocardiogram", "MRI", "ultrasound"]
LABVALUES = {
    "hemoglobin": ["9.8", "12.1", "14.0"],
    "creatinine": ["1.2", "2.4", "0.9"],
    "potassium": ["3.1", "4.5", "5.6"],
    "glucose": ["110", "245", "89"],
    "white count": ["11.2", "6.5", "15.3"],
}
IMAGING_RESULTS = ["normal", "unremarkable", "abnormal"]
FINDINGS = [("", "pneumonia"), ("", "edema"), ("a ", "fracture"), ("an ", "effusion"), ("a ", "mass")]
DRUGS = [
    "aspirin",
    "metformin",
    "lisinopril",
    "amoxicillin",
    "furosemide",
    "atorvastatin",
    "prednisone",
    "omeprazole",
    "warfarin",
    "metoprolol",
]
INJECTED_DRUGS = ["insulin", "heparin", "ceftriaxone", "vancomycin"]
TREATMENTS = [
    "physical therapy",
    "appendectomy",
    "dialysis",
    "cholecystectomy",
    "blood transfusion",
    "oxygen therapy",
    "wound care",
    "cardiac catheterization",
]
SEVERITIES = ["mild", "moderate", "severe"]
COURSES = ["worsening", "improving", "stable", "resolved"]
TEMPORALS = ["yesterday", "two days ago", "last week", "since admission", "this morning"]
STRENGTHS = ["10 mg", "20 mg", "40 mg", "81 mg", "500 mg", "5 mg"]
DOSAGES = ["one tablet", "two tablets", "1 tablet", "2 tablets"]
FORMS = ["tablet", "capsule"]
ROUTES = ["by mouth", "orally"]
INJECTION_ROUTES = ["IV", "subcutaneously"]
FREQUENCIES = ["daily", "twice a day", "every 8 hours", "at bedtime"]
UNCERTAIN = ["Possible", "Suspected", "Rule out"]


@dataclass
class _NoteBuilder:
    """Appends text and records each entity at its exact offsets."""

    text: str = ""
    entities: list[Entity] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)

    def add(self, piece: str, etype: str | None = None) -> str | None:
        start = len(self.text)
        self.text += piece
        if etype is None:
            return None
        ent_id = f"T{len(self.entities) + 1}"
        self.entities.append(Entity(id=ent_id, type=etype, spans=[(start, len(self.text))], text=piece))
        return ent_id

    def link(self, head: str, *tails: str) -> None:
        self.relations += [Relation(type="hasAttr", head=head, tail=t) for t in tails]


# ------------------------------------------------------------------ sentence kinds
# Each writes one sentence of <= ~15 words and links it up.


def _symptom(b: _NoteBuilder, r: random.Random) -> None:
    b.add(r.choice(["The patient reports ", "She complains of ", "He has "]))
    severity = b.add(r.choice(SEVERITIES), "severity")
    b.add(" ")
    problem = b.add(r.choice(LOCAL_PROBLEMS), "problem")
    b.add(" in the ")
    place = b.add(r.choice(BODYLOCS), "bodyloc")
    b.add(" since ")
    when = b.add(r.choice(TEMPORALS[:3]), "temporal")
    b.add(".")
    b.link(problem, severity, place, when)


def _negated(b: _NoteBuilder, r: random.Random) -> None:
    first, second = r.sample(PROBLEMS, 2)
    if r.random() < 0.5:
        b.add("The patient ")
        cue = b.add("denies", "negation")
        b.add(" ")
    else:
        cue = b.add("No", "negation")
        b.add(" ")
    one = b.add(first, "problem")
    b.add(" or ")
    two = b.add(second, "problem")
    b.add(".")
    b.link(one, cue)
    b.link(two, cue)


def _imaging(b: _NoteBuilder, r: random.Random) -> None:
    b.add("The ")
    test = b.add(r.choice(TESTS), "test")
    b.add(" ")
    when = b.add(r.choice(TEMPORALS), "temporal")
    if r.random() < 0.5:
        b.add(f" was {r.choice(IMAGING_RESULTS)}.")
    else:
        article, finding = r.choice(FINDINGS)
        b.add(f" showed {article}")
        b.add(finding, "problem")
        b.add(".")
    b.link(test, when)


def _lab(b: _NoteBuilder, r: random.Random) -> None:
    name = r.choice(sorted(LABVALUES))
    b.add(r.choice(["Her ", "His ", "The "]))
    test = b.add(name, "test")
    b.add(" was ")
    value = b.add(r.choice(LABVALUES[name]), "labvalue")
    b.add(".")
    b.link(test, value)


def _oral_drug(b: _NoteBuilder, r: random.Random) -> None:
    b.add(r.choice(["Started ", "Continue ", "Discharged on "]))
    drug = b.add(r.choice(DRUGS), "drug")
    b.add(" ")
    strength = b.add(r.choice(STRENGTHS), "strength")
    b.add(" ")
    form = b.add(r.choice(FORMS), "form")
    b.add(" ")
    route = b.add(r.choice(ROUTES), "route")
    b.add(" ")
    freq = b.add(r.choice(FREQUENCIES), "frequency")
    b.add(".")
    b.link(drug, strength, form, route, freq)


def _dosed_drug(b: _NoteBuilder, r: random.Random) -> None:
    b.add("Take ")
    dose = b.add(r.choice(DOSAGES), "dosage")
    b.add(" of ")
    drug = b.add(r.choice(DRUGS), "drug")
    b.add(" ")
    freq = b.add(r.choice(FREQUENCIES), "frequency")
    b.add(".")
    b.link(drug, dose, freq)


def _injected_drug(b: _NoteBuilder, r: random.Random) -> None:
    b.add(r.choice(["She was given ", "He was given ", "Received "]))
    drug = b.add(r.choice(INJECTED_DRUGS), "drug")
    b.add(" ")
    route = b.add(r.choice(INJECTION_ROUTES), "route")
    b.add(" ")
    when = b.add(r.choice(TEMPORALS), "temporal")
    b.add(".")
    b.link(drug, route, when)


def _treatment(b: _NoteBuilder, r: random.Random) -> None:
    b.add(r.choice(["She underwent ", "He received ", "The patient had "]))
    treatment = b.add(r.choice(TREATMENTS), "treatment")
    b.add(" ")
    when = b.add(r.choice(TEMPORALS), "temporal")
    b.add(" and the ")
    problem = b.add(r.choice(PROBLEMS), "problem")
    b.add(" is ")
    course = b.add(r.choice(COURSES), "course")
    b.add(".")
    b.link(treatment, when)
    b.link(problem, course)


def _uncertain(b: _NoteBuilder, r: random.Random) -> None:
    cue = b.add(r.choice(UNCERTAIN), "uncertain")
    b.add(" ")
    problem = b.add(r.choice(PROBLEMS), "problem")
    b.add(".")
    b.link(problem, cue)


SENTENCE_KINDS = {
    "symptom": _symptom,
    "negated": _negated,
    "imaging": _imaging,
    "lab": _lab,
    "oral_drug": _oral_drug,
    "dosed_drug": _dosed_drug,
    "injected_drug": _injected_drug,
    "treatment": _treatment,
    "uncertain": _uncertain,
}

# style -> (section headers, weight of each sentence kind): the site's label skew.
STYLES: dict[str, tuple[list[str], dict[str, int]]] = {
    "discharge_summary": (
        ["HOSPITAL COURSE:", "DISCHARGE MEDICATIONS:", "FOLLOW UP:"],
        dict(symptom=1, negated=1, imaging=1, lab=1, oral_drug=4, dosed_drug=3, injected_drug=2, treatment=3, uncertain=1),
    ),
    "general_medicine": (
        ["HISTORY OF PRESENT ILLNESS:", "REVIEW OF SYSTEMS:", "MEDICATIONS:", "ASSESSMENT AND PLAN:"],
        dict(symptom=4, negated=4, imaging=1, lab=1, oral_drug=2, dosed_drug=1, injected_drug=0, treatment=1, uncertain=2),
    ),
    "case_report": (
        ["CASE PRESENTATION:", "INVESTIGATIONS:", "TREATMENT:", "OUTCOME:"],
        dict(symptom=2, negated=1, imaging=4, lab=4, oral_drug=1, dosed_drug=0, injected_drug=2, treatment=2, uncertain=1),
    ),
}
DEMO_STYLES = ("discharge_summary", "general_medicine", "case_report")


def _append_sentence(note: _NoteBuilder, part: _NoteBuilder) -> None:
    """Copy one sentence into the note, shifting offsets and renumbering ids."""
    offset, ids = len(note.text), {}
    for ent in part.entities:
        ids[ent.id] = f"T{len(note.entities) + 1}"
        ((start, end),) = ent.spans
        note.entities.append(Entity(id=ids[ent.id], type=ent.type, spans=[(start + offset, end + offset)], text=ent.text))
    note.relations += [Relation(type=rel.type, head=ids[rel.head], tail=ids[rel.tail]) for rel in part.relations]
    note.text += part.text


def generate_note(doc_id: str, site: str, style: str, r: random.Random, sentences_per_section: tuple[int, int] = (2, 3)) -> Document:
    """One note: each section header on its own line, then a few sentences of the style's mix."""
    headers, weights = STYLES[style]
    kinds = [SENTENCE_KINDS[k] for k in weights]
    note = _NoteBuilder()
    for header in headers:
        note.add(header + "\n")
        for i in range(r.randint(*sentences_per_section)):
            part = _NoteBuilder()
            r.choices(kinds, weights=list(weights.values()))[0](part, r)
            note.add(" " if i else "")
            _append_sentence(note, part)
        note.add("\n\n")
    return Document(id=doc_id, site=site, text=note.text.rstrip("\n") + "\n", entities=note.entities, relations=note.relations)


def generate_site_corpus(site: str, n_docs: int, seed: int, style: str) -> list[Document]:
    """`n_docs` synthetic notes of one site in one style; ids are `<site>-000`, ..."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {sorted(STYLES)}")
    r = random.Random(f"{seed}-{site}-{style}")  # str seeds hash stably across runs
    return [generate_note(f"{site}-{i:03d}", site, style, r) for i in range(n_docs)]


def site_style(index: int) -> str:
    """The note style of the index-th site (0-based; styles cycle)."""
    return DEMO_STYLES[index % len(DEMO_STYLES)]


def demo_corpus(n_sites: int = 3, docs_per_site: int = 12, seed: int = 0) -> dict[str, list[Document]]:
    """One corpus per site, keyed by the site's style ("case_report", ...); a fourth site
    and on repeat a style under "<style>-<n>". Callers map keys to FLARE site names."""
    if n_sites < 1 or docs_per_site < 0:
        raise ValueError("need at least one site and a non-negative number of notes")
    corpus = {}
    for i in range(n_sites):
        style = site_style(i)
        site = style if i < len(DEMO_STYLES) else f"{style}-{i + 1}"
        corpus[site] = generate_site_corpus(site, docs_per_site, seed, style)
    return corpus


# ------------------------------------------------------------------ CLI


def add_synth_parser(data_subparsers) -> None:
    p = data_subparsers.add_parser(
        "synth",
        help="write the SYNTHETIC demo corpus (one folder per site)",
        description=(
            "Write synthetic clinical notes (no real patient data), one folder per site, named "
            "after the site's note style (" + ", ".join(DEMO_STYLES) + ", then repeated with a "
            "number); each style has its own section headers and label skew."
        ),
        epilog="example: fedmed data synth demo_data --sites 3 --docs-per-site 20 --format brat",
    )
    p.add_argument("out", metavar="OUT", help="output folder; one subfolder per site")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default: 3)")
    p.add_argument("--docs-per-site", type=int, default=12, help="notes per site (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--format",
        choices=["jsonl", "brat"],
        default="jsonl",
        help="jsonl: <site>/train.jsonl; brat: <site>/<id>.txt + .ann (default: jsonl)",
    )
    p.set_defaults(func=_synth_command)


def _synth_command(args) -> int:
    from fedmed_components.data.document import InputError, write_jsonl

    if args.sites < 1 or args.docs_per_site < 1:
        raise InputError(None, None, "--sites and --docs-per-site must be at least 1")
    out = Path(args.out)
    for site, docs in demo_corpus(args.sites, args.docs_per_site, args.seed).items():
        if args.format == "jsonl":
            write_jsonl(docs, out / site / "train.jsonl")
        else:
            from fedmed_components.data.brat import write_brat_dir

            write_brat_dir(docs, out / site)
        print(f"{site}: {len(docs)} synthetic notes -> {out / site}")
    return 0
