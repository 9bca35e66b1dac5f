"""From annotated documents to tokenised supervised examples (the paper's two tasks)."""

from __future__ import annotations

from dataclasses import dataclass

from fedmed_components.data.document import Document
from fedmed_components.settings import BUDGET


@dataclass
class SFTConfig:
    tasks: tuple[str, ...] = BUDGET.tasks
    output_format: str = "html"
    max_length: int = BUDGET.max_length
    train_on_prompt: bool = False
    include_empty_modifier_examples: bool = True
    prompt_style: str = BUDGET.prompt_style  # prompts.PROMPT_STYLES; inference must use the same
    ner_sentences: int = BUDGET.ner_sentences  # consecutive sentences per NER example; inference must use the same


def build_examples(docs: list[Document], config: SFTConfig, types: set[str] | None = None):
    """Sentence-level prompt/answer pairs for every document (text only, no tokens)."""
    from fedmed_components.task.prompts import document_examples

    examples = []
    for doc in docs:
        examples += document_examples(
            doc,
            tasks=config.tasks,
            output_format=config.output_format,
            types=types,
            include_empty_modifier_examples=config.include_empty_modifier_examples,
            style=config.prompt_style,
            ner_sentences=config.ner_sentences,
        )
    return examples


def tokenize_examples(examples, tokenizer, config: SFTConfig) -> list[dict]:
    """Tokenise with the chat template; examples with no supervised token left are dropped."""
    from fedmed_components.task.prompts import tokenize_example

    out = []
    for example in examples:
        item = tokenize_example(tokenizer, example, config.max_length, train_on_prompt=config.train_on_prompt, style=config.prompt_style)
        if item["num_supervised_tokens"] > 0:
            out.append(item)
    return out


def build_sft_dataset(docs: list[Document], tokenizer, config: SFTConfig, types: set[str] | None = None) -> list[dict]:
    """Tokenised examples, each tagged with its note's id (DP-SGD's record=note)."""
    out = []
    for doc in docs:
        for item in tokenize_examples(build_examples([doc], config, types), tokenizer, config):
            out.append({**item, "note": doc.id})
    return out
