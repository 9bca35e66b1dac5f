"""Clinical notes in and out: the Document model, the entity schema and corpus mappings,
the BRAT / BioC / JSONL readers and writers, site partitions, synthetic notes, sentences."""
