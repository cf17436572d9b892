"""Input: the embedded default corpus, tokenizers (SentencePiece or Hugging Face) and batch streams."""
