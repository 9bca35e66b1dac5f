"""SYNTHETIC clinical notes: the embedded demo corpus (no real patient data).

Notes are assembled from sentence templates with exact character offsets: sections,
all four main entity types (problem, treatment, test, drug), the common modifiers
(negation, bodyloc, severity, course, temporal, uncertain, labvalue, strength, dosage,
route, frequency, form) and `hasAttr` relations. Each site has its own note style
(section headers, sentence mix) and label skew, as hospitals do. Deterministic by seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from fedmed_components.document import Document, Entity, Relation

PROBLEMS = ["chest pain", "shortness of breath", "fever", "cough", "nausea", "headache", "hypertension",
            "diabetes", "pneumonia", "edema", "rash", "abdominal pain", "anemia", "back pain", "dizziness"]
TESTS = ["chest x-ray", "CT scan", "ECG", "echocardiogram", "blood culture", "urinalysis", "hemoglobin",
         "creatinine", "potassium", "glucose", "white count", "MRI"]
DRUGS = ["aspirin", "metformin", "lisinopril", "insulin", "amoxicillin", "heparin", "furosemide",
         "atorvastatin", "albuterol", "prednisone", "omeprazole", "warfarin"]
TREATMENTS = ["physical therapy", "appendectomy", "dialysis", "cholecystectomy", "blood transfusion",
              "oxygen therapy", "wound care", "cardiac catheterization"]
BODYLOCS = ["left leg", "right arm", "lower back", "chest", "abdomen", "left knee", "neck", "both legs"]
SEVERITIES = ["mild", "moderate", "severe"]
COURSES = ["worsening", "improving", "stable", "resolved"]
TEMPORALS = ["yesterday", "two days ago", "last week", "since admission", "this morning"]
LABVALUES = {"hemoglobin": ["9.8", "12.1", "14.0"], "creatinine": ["1.2", "2.4", "0.9"], "potassium": ["3.1", "4.5", "5.6"],
             "glucose": ["110", "245", "89"], "white count": ["11.2", "6.5", "15.3"]}
IMAGING_RESULTS = ["normal", "unremarkable", "abnormal"]
STRENGTHS = ["10 mg", "20 mg", "500 mg", "81 mg", "40 mg", "5 mg"]
ROUTES = ["by mouth", "IV", "subcutaneously"]
FREQUENCIES = ["daily", "twice a day", "every 8 hours", "at bedtime"]
FORMS = ["tablet", "capsule", "injection"]

STYLES = {
    # style: (section headers, weights of sentence kinds: symptom, negated, test, lab, drug, treatment, uncertain)
    "discharge_summary": (["HOSPITAL COURSE:", "DISCHARGE MEDICATIONS:", "FOLLOW UP:"], [2, 1, 1, 2, 4, 2, 1]),
    "general_medicine": (["HISTORY OF PRESENT ILLNESS:", "REVIEW OF SYSTEMS:", "ASSESSMENT AND PLAN:"], [4, 3, 1, 1, 2, 1, 1]),
    "case_report": (["CASE PRESENTATION:", "INVESTIGATIONS:", "OUTCOME:"], [3, 1, 3, 3, 1, 2, 1]),
}
DEMO_STYLES = ("discharge_summary", "general_medicine", "case_report")


@dataclass
class _NoteBuilder:
    """Appends text and records entity spans at their exact offsets."""

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


def _symptom(b: _NoteBuilder, r: random.Random) -> None:
    b.add(r.choice(["The patient reports ", "She complains of ", "He has "]))
    sev = b.add(r.choice(SEVERITIES), "severity")
    b.add(" ")
    prob = b.add(r.choice(PROBLEMS), "problem")
    b.add(" in the ")
    loc = b.add(r.choice(BODYLOCS), "bodyloc")
    b.add(" starting ")
    when = b.add(r.choice(TEMPORALS), "temporal")
    b.add(".")
    b.link(prob, sev, loc, when)


def _negated(b: _NoteBuilder, r: random.Random) -> None:
    neg_word = r.choice(["denies", "no"])
    if neg_word == "denies":
        b.add("The patient ")
        neg = b.add("denies", "negation")
        b.add(" ")
    else:
        neg = b.add("No", "negation")
        b.add(" ")
    first = b.add(r.choice(PROBLEMS), "problem")
    b.add(" or ")
    second = b.add(r.choice(PROBLEMS), "problem")
    b.add(".")
    b.link(first, neg)
    b.link(second, neg)


def _test(b: _NoteBuilder, r: random.Random) -> None:
    b.add("The ")
    test = b.add(r.choice(["chest x-ray", "CT scan", "ECG", "echocardiogram", "MRI"]), "test")
    b.add(" ")
    when = b.add(r.choice(TEMPORALS), "temporal")
    b.add(" was ")
    b.add(r.choice(IMAGING_RESULTS))
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


def _drug(b: _NoteBuilder, r: random.Random) -> None:
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


def _treatment(b: _NoteBuilder, r: random.Random) -> None:
    b.add(r.choice(["She underwent ", "He received ", "The patient had "]))
    treat = b.add(r.choice(TREATMENTS), "treatment")
    b.add(" ")
    when = b.add(r.choice(TEMPORALS), "temporal")
    b.add(" and her ")
    prob = b.add(r.choice(PROBLEMS), "problem")
    b.add(" is ")
    course = b.add(r.choice(COURSES), "course")
    b.add(".")
    b.link(treat, when)
    b.link(prob, course)


def _uncertain(b: _NoteBuilder, r: random.Random) -> None:
    unc = b.add(r.choice(["Possible", "Suspected", "Rule out"]), "uncertain")
    b.add(" ")
    prob = b.add(r.choice(PROBLEMS), "problem")
    b.add(".")
    b.link(prob, unc)


SENTENCE_KINDS = [_symptom, _negated, _test, _lab, _drug, _treatment, _uncertain]


def _sentence(kind, r: random.Random) -> _NoteBuilder:
    b = _NoteBuilder()
    kind(b, r)
    return b


def generate_note(doc_id: str, site: str, style: str, r: random.Random, sentences_per_section: int = 3) -> Document:
    headers, weights = STYLES[style]
    note = _NoteBuilder()
    for header in headers:
        note.add(header + "\n")
        for _ in range(sentences_per_section):
            part = _sentence(r.choices(SENTENCE_KINDS, weights=weights)[0], r)
            offset = len(note.text)
            id_map = {}
            for ent in part.entities:
                new_id = f"T{len(note.entities) + 1}"
                id_map[ent.id] = new_id
                s, e = ent.spans[0]
                note.entities.append(Entity(id=new_id, type=ent.type, spans=[(s + offset, e + offset)], text=ent.text))
            note.relations += [Relation(type=rel.type, head=id_map[rel.head], tail=id_map[rel.tail]) for rel in part.relations]
            note.add(part.text + " ")
        note.text = note.text.rstrip(" ") + "\n\n"
    return Document(id=doc_id, site=site, text=note.text, entities=note.entities, relations=note.relations)


def generate_site_corpus(site: str, n_docs: int, seed: int, style: str) -> list[Document]:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {sorted(STYLES)}")
    r = random.Random(f"{seed}-{site}-{style}")
    return [generate_note(f"{site}-{i:03d}", site, style, r) for i in range(n_docs)]


def demo_corpus(n_sites: int = 3, docs_per_site: int = 12, seed: int = 0) -> dict[str, list[Document]]:
    """One corpus per site, keyed by style (cycled when there are more sites than styles)."""
    corpus = {}
    for i in range(n_sites):
        style = DEMO_STYLES[i % len(DEMO_STYLES)]
        key = style if i < len(DEMO_STYLES) else f"{style}-{i}"
        corpus[key] = generate_site_corpus(key, docs_per_site, seed, style)
    return corpus


def add_synth_parser(data_subparsers) -> None:
    p = data_subparsers.add_parser(
        "synth",
        help="write the SYNTHETIC demo corpus (one folder per site)",
        description="Write synthetic clinical notes (no real patient data) with per-site style and label skew.",
    )
    p.add_argument("out", help="output folder; one subfolder per site")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--docs-per-site", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["jsonl", "brat"], default="jsonl")
    p.set_defaults(func=_synth_command)


def _synth_command(args) -> int:
    from pathlib import Path

    from fedmed_components.document import write_jsonl

    out = Path(args.out)
    for site, docs in demo_corpus(args.sites, args.docs_per_site, args.seed).items():
        if args.format == "jsonl":
            write_jsonl(docs, out / site / "train.jsonl")
        else:
            from fedmed_components.brat import write_brat_dir

            write_brat_dir(docs, out / site)
        print(f"{site}: {len(docs)} synthetic notes -> {out / site}")
    return 0
