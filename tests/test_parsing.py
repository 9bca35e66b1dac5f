"""Model output back to offsets: exact, sloppy and hostile outputs; the MTSamples round trip."""

import json
from collections import Counter
from pathlib import Path

import pytest

from fedmed_components.data.schema import MAIN_TYPES
from fedmed_components.task.parsing import parse_modifiers, parse_ner
from fedmed_components.task.prompts import document_examples, modifier_answer, ner_answer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SENTENCE = "He has chest pain and fever, and chest pain again."
S = "Denies chest pain; chest x-ray shows no chest pain source."


def test_exact_copy_gives_exact_offsets():
    out = 'He has <span class="problem">chest pain</span> and <span class="problem">fever</span>, and chest pain again.'
    result = parse_ner(out, SENTENCE)
    assert result.spans == [("problem", 7, 17), ("problem", 22, 27)]
    assert not result.failed and result.problems == []
    spans = [("problem", 7, 17), ("test", 19, 30)]
    assert parse_ner(ner_answer(S, spans), S).spans == spans


def test_repeated_mention_maps_to_the_tagged_occurrence():
    out = 'He has chest pain and fever, and <span class="problem">chest pain</span> again.'
    assert parse_ner(out, SENTENCE).spans == [("problem", 33, 43)]
    # also when the model's copy drifts (a word dropped, case changed)
    out = 'He chest pain and fever, and <span class="problem">chest pain</span> again.'
    assert parse_ner(out, SENTENCE).spans == [("problem", 33, 43)]
    second = S.index("chest pain", 20)
    out = 'denies chest pain; x-ray shows no <span class="problem">chest pain</span> source.'
    assert parse_ner(out, S).spans == [("problem", second, second + 10)]


def test_chatty_prefix_and_suffix_are_ignored():
    out = (
        'Sure! Here is the annotated sentence:\n\nHe has <span class="problem">chest pain</span> and fever, '
        "and chest pain again.\n\nLet me know if you need more."
    )
    result = parse_ner(out, SENTENCE)
    assert result.spans == [("problem", 7, 17)] and not result.failed
    fenced = '```html\nHe has chest pain and <span class="problem">fever</span>, and chest pain again.\n```'
    assert parse_ner(fenced, SENTENCE).spans == [("problem", 22, 27)]
    shouting = 'Sure! Here is the output: Denies <SPAN CLASS="problem">chest pain</SPAN>; chest x-ray shows no chest pain source.'
    assert parse_ner(shouting, S).spans == [("problem", 7, 17)]


def test_unclosed_tag_is_dropped_and_reported():
    out = 'He has <span class="problem">chest pain</span> and <span class="problem">fever, and chest pain again.'
    result = parse_ner(out, SENTENCE)
    assert result.spans == [("problem", 7, 17)] and not result.failed
    assert any("unclosed" in p for p in result.problems)


def test_missing_slash_closes_the_open_span():
    result = parse_ner('He has <span class="problem">chest pain<span> and fever, and chest pain again.', SENTENCE)
    assert result.spans == [("problem", 7, 17)]


def test_stray_closing_tag_and_nested_tags():
    out = 'He has </span><span class="problem"><span class="problem">chest</span> pain</span> and fever, and chest pain again.'
    result = parse_ner(out, SENTENCE)
    assert result.spans == [("problem", 7, 12), ("problem", 7, 17)]
    assert "closing tag without an opening tag" in result.problems


def test_unknown_classes_are_dropped_and_counted():
    out = 'He has <span class="symptom">chest pain</span> and <span class="Problem">fever</span>, and chest pain again.'
    result = parse_ner(out, SENTENCE)
    assert result.spans == [("problem", 22, 27)]
    assert result.problems == ["unknown class 'symptom'"]
    only_unknown = parse_ner('He has <span class="symptom">chest pain</span>.', SENTENCE)
    assert only_unknown.spans == [] and only_unknown.failed


def test_hallucinated_text_is_dropped():
    out = 'He has <span class="problem">chest pain</span> and <span class="problem">headache</span>.'
    result = parse_ner(out, SENTENCE)
    assert result.spans == [("problem", 7, 17)]
    assert result.problems == ["not in the sentence: 'headache'"]
    nothing = parse_ner('<span class="problem">headache</span>', SENTENCE)
    assert nothing.failed and nothing.spans == []


def test_everything_wrong_at_once_keeps_what_is_right():
    out = (
        'Denies <span class="problem">chest pain</span>; <span class="organ">chest</span> x-ray '
        'shows <span class="problem">kidney stones</span> <span class="test">no chest'
    )
    r = parse_ner(out, S)
    assert r.spans == [("problem", 7, 17)] and not r.failed
    for expected in ("unknown class", "not in the sentence", "unclosed"):
        assert any(expected in p for p in r.problems)


def test_case_and_whitespace_differences_still_align():
    out = 'He has <span class="problem">Chest  Pain</span> and fever.'
    assert parse_ner(out, SENTENCE).spans == [("problem", 7, 17)]


def test_no_entities_is_not_a_failure_but_empty_output_is():
    assert not parse_ner(SENTENCE, SENTENCE).failed
    assert parse_ner("", SENTENCE).failed
    assert parse_ner("[]", SENTENCE, output_format="json").failed is False


def test_main_marker_copied_back_is_not_an_answer():
    out = '<span class="negation">No</span> fever or <main class="problem">cough</main>.'
    result = parse_modifiers(out, "No fever or cough.")
    assert result.spans == [("negation", 0, 2)] and result.problems == []
    assert parse_modifiers(out, "No fever or cough.", allowed_types=("severity",)).failed


def test_a_cue_is_not_found_inside_a_longer_word():
    out = '<span class="negation">no</span> known allergies.'
    assert parse_modifiers(out, "He has no known allergies.").spans == [("negation", 7, 9)]


def test_json_variant():
    out = (
        'Here you go: [{"type": "problem", "text": "chest pain"}, {"type": "problem", "text": "chest pain"}, '
        '{"type": "x", "text": "fever"}]'
    )
    result = parse_ner(out, SENTENCE, output_format="json")
    assert result.spans == [("problem", 7, 17), ("problem", 33, 43)]
    assert result.problems == ["unknown class 'x'"]
    fenced = '```json\n{"entities": [{"type": "problem", "text": "fever"}]}\n```'
    assert parse_ner(fenced, SENTENCE, output_format="json").spans == [("problem", 22, 27)]
    broken = parse_ner('[{"type": "problem", "text": "fever"', SENTENCE, output_format="json")
    assert broken.failed and broken.problems == ["no JSON list in the output"]
    assert parse_ner('[{"type": "problem"}, "fever"]', SENTENCE, output_format="json").failed
    assert parse_modifiers("not json at all", S, output_format="json").failed
    spans = [("negation", 0, 6)]
    answer = modifier_answer(S, ("problem", 7, 17), spans, output_format="json")
    assert parse_modifiers(answer, S, output_format="json").spans == spans


def test_json_modifiers_go_to_the_occurrence_near_their_main_entity():
    sentence = "Aspirin 81 mg p.o. daily, Diovan 160 mg p.o. daily."
    out = json.dumps([{"type": "strength", "text": "160 mg"}, {"type": "route", "text": "p.o."}, {"type": "frequency", "text": "daily"}])
    result = parse_modifiers(out, sentence, output_format="json", main=("drug", 26, 32))
    assert result.spans == [("strength", 33, 39), ("route", 40, 44), ("frequency", 45, 50)]
    answer = ner_answer(sentence, [("drug", 0, 7), ("drug", 26, 32)], output_format="json")
    assert parse_ner(answer, sentence, output_format="json").spans == [("drug", 0, 7), ("drug", 26, 32)]


def test_unknown_format_is_refused():
    with pytest.raises(ValueError):
        parse_ner("x", "x", output_format="xml")


# ---------------------------------------------------------------- MTSamples round trip


@pytest.fixture(scope="module")
def mtsamples():
    folder = SHARED_DATA / "mtsamples_kiwi" / "train"
    if not folder.is_dir():
        pytest.skip("../shared/data/mtsamples_kiwi is not beside the project")
    from fedmed_components.data.corpora import load_corpus

    with pytest.warns(UserWarning, match="malformed line"):  # the one known defect, skipped
        docs = load_corpus(folder, mapping="kiwi", lenient=True)
    assert len(docs) == 96
    return docs


def _parsed_note(doc, output_format, stats):
    """Note-offset spans the parser recovers from the gold answers: NER, and per main entity."""
    ner, modifiers = set(), {}
    for ex in document_examples(doc, output_format=output_format, stats=stats):
        shift = ex.sentence_start
        if ex.task == "ner":
            ner |= {(t, s + shift, e + shift) for t, s, e in parse_ner(ex.answer, ex.sentence, output_format).spans}
        else:
            spans = parse_modifiers(ex.answer, ex.sentence, output_format, main=ex.main).spans
            key = (ex.main[0], ex.main[1] + shift, ex.main[2] + shift)
            modifiers.setdefault(key, set()).update((t, s + shift, e + shift) for t, s, e in spans)
    return ner, modifiers


def _round_trip(docs, output_format):
    """Gold -> answer -> parser, counted against every gold main entity and relation."""
    found, lost, stats = Counter(), [], Counter()
    for doc in docs:
        ner, modifiers = _parsed_note(doc, output_format, stats)
        by_id = {e.id: e for e in doc.entities}
        for ent in doc.entities:
            if ent.type in MAIN_TYPES:
                ok = (ent.type, ent.start, ent.end) in ner
                found["ner"] += ok
                found["ner_total"] += 1
                lost += [] if ok else [("ner", doc.id, ent.type, ent.text)]
        for rel in doc.relations:
            head, tail = by_id[rel.head], by_id[rel.tail]
            ok = (tail.type, tail.start, tail.end) in modifiers.get((head.type, head.start, head.end), set())
            found["modifier"] += ok
            found["modifier_total"] += 1
            lost += [] if ok else [("modifier", doc.id, f"{head.text!r} -> {tail.type}", tail.text)]
    return found, lost, stats


@pytest.mark.parametrize("output_format", ["html", "json"])
def test_gold_answers_parse_back_to_the_gold_spans_on_mtsamples(mtsamples, output_format):
    found, lost, stats = _round_trip(mtsamples, output_format)
    rates = {task: found[task] / found[f"{task}_total"] for task in ("ner", "modifier")}
    print(
        f"\n{output_format}: NER {found['ner']}/{found['ner_total']} = {rates['ner']:.4%}, "
        f"modifiers {found['modifier']}/{found['modifier_total']} = {rates['modifier']:.4%}; "
        f"not expressible: {dict(stats)}"
    )
    for item in lost[:25]:
        print("  lost:", item)
    # What sentence-level answers cannot express: 15 relations whose modifier sits in
    # another sentence than its main entity ("Zoloft. He takes these once a day."),
    # one of them the annotation whose span crosses a line break ("140. \n5"). JSON
    # answers also lose a few repeated cue words whose position a list does not carry
    # ("no history of X, no history of Y"). No main entity overlaps another here.
    assert rates["ner"] >= 0.995 and rates["modifier"] >= 0.995
