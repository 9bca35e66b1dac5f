"""The information-extraction task, free of torch: prompts and training examples, the
model-output parser, the n2c2 strict/lenient metrics and their bootstrap intervals."""
