"""Input: the embedded default corpus, the SentencePiece tokenizer and batch streams."""
