"""Corpus preparation: raw files -> ArrayRecord shards + manifest. The per-document functions (documents),
the local driver (local), the Apache Beam driver (beam), a split's totals and digest (manifest), and
output directories written whole (output)."""
