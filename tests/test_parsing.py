"""Model output back to offsets: exact, sloppy and hostile outputs."""

from fedmed_components.parsing import parse_modifiers, parse_ner
from fedmed_components.prompts import modifier_answer, ner_answer

S = "Denies chest pain; chest x-ray shows no chest pain source."


def test_exact_answer_round_trips():
    spans = [("problem", 7, 17), ("test", 19, 30)]
    assert parse_ner(ner_answer(S, spans), S).spans == spans


def test_repeated_mentions_map_to_the_right_occurrence():
    second = S.index("chest pain", 20)
    out = S[:second] + '<span class="problem">chest pain</span>' + S[second + 10:]
    assert parse_ner(out, S).spans == [("problem", second, second + 10)]
    # paraphrased output: position estimated from where the model put it
    out = "denies chest pain; x-ray shows no <span class=\"problem\">chest pain</span> source."
    assert parse_ner(out, S).spans == [("problem", second, second + 10)]


def test_unknown_class_unclosed_tag_and_hallucination_are_dropped_and_reported():
    out = ('Denies <span class="problem">chest pain</span>; <span class="organ">chest</span> x-ray '
           'shows <span class="problem">kidney stones</span> <span class="test">no chest')
    r = parse_ner(out, S)
    assert r.spans == [("problem", 7, 17)]
    assert any("unknown class" in p for p in r.problems)
    assert any("not in the sentence" in p for p in r.problems)
    assert any("unclosed" in p for p in r.problems)
    assert not r.failed


def test_chatty_prefix_and_case_insensitive_tags():
    out = 'Sure! Here is the output: Denies <SPAN CLASS="problem">chest pain</SPAN>; chest x-ray shows no chest pain source.'
    assert parse_ner(out, S).spans == [("problem", 7, 17)]


def test_nothing_alignable_is_a_parse_failure():
    r = parse_ner('<span class="problem">appendicitis</span>', S)
    assert r.failed and r.spans == []
    assert not parse_ner(S, S).failed  # no tags at all: a valid empty answer


def test_json_variant():
    spans = [("negation", 0, 6)]
    assert parse_modifiers(modifier_answer(S, ("problem", 7, 17), spans, output_format="json"), S, output_format="json").spans == spans
    assert parse_modifiers("not json at all", S, output_format="json").failed
