"""Corpus preparation: raw files -> ArrayRecord shards + manifest. The per-document functions (documents),
the local driver (local), and output directories written whole (output)."""
