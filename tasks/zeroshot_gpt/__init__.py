"""Zero-shot GPT evaluation: WikiText perplexity (WIKITEXT103) and LAMBADA cloze accuracy."""
