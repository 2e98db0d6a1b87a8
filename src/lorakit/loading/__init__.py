"""Loading what a run works on: Hugging Face models and tokenizers, the bundled models, and data rows."""
