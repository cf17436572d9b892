"""What a text dataset's manifest says of each split, added up the same way by either driver
(data/prepare/local.py in one pass, data/prepare/beam.py file by file and then combined).

The tokens digest of a split is the sum of its records' SHA-256 (read as integers) modulo 2^256:
it names the records and their contents, and, unlike a hash of their concatenation, does not
depend on how the work was split or in what order the parts were added up (a sum, not XOR, under
which two identical records would cancel)."""

import dataclasses
import hashlib

import numpy as np

from data.prepare.documents import SPLITS, unigram_entropy

DIGEST_MODULUS = 2**256


@dataclasses.dataclass
class SplitTotals:
    """One split's counts, tokens digest and unigram counts, over any share of its documents."""

    vocab_size: int
    documents: int = 0
    records: int = 0
    tokens: int = 0
    split_documents: int = 0
    digest: int = 0
    counts: np.ndarray | None = None

    def add(self, ids: np.ndarray, pieces: list[np.ndarray]):
        """A kept document: its token ids and the pieces it was cut into."""
        if self.counts is None:
            self.counts = np.zeros(self.vocab_size, np.int64)
        self.documents += 1
        self.records += len(pieces)
        self.tokens += len(ids) + 2  # BOS and EOS
        self.split_documents += len(pieces) > 1
        self.digest = (self.digest + sum(record_digest(p.tobytes()) for p in pieces)) % DIGEST_MODULUS
        self.counts += np.bincount(ids, minlength=self.vocab_size)

    def merge(self, other: "SplitTotals") -> "SplitTotals":
        counts = [c for c in (self.counts, other.counts) if c is not None]
        return SplitTotals(self.vocab_size, self.documents + other.documents, self.records + other.records,
                           self.tokens + other.tokens, self.split_documents + other.split_documents,
                           (self.digest + other.digest) % DIGEST_MODULUS, sum(counts) if counts else None)

    def entry(self, shards: list[str]) -> dict:
        counts = self.counts if self.counts is not None else np.zeros(self.vocab_size, np.int64)
        return {"shards": shards, "documents": self.documents, "records": self.records, "tokens": self.tokens,
                "split_documents": self.split_documents, "tokens_digest": f"{self.digest:064x}",
                "unigram_entropy_nats": unigram_entropy(counts)}


def record_digest(record: bytes) -> int:
    return int.from_bytes(hashlib.sha256(record).digest(), "big")


def text_manifest(tok, seq_len: int, input_files: int, duplicates: int, totals: dict[str, SplitTotals],
                  shards: dict[str, list[str]]) -> dict:
    return {
        "kind": "text",
        "tokenizer_kind": tok.kind,
        "tokenizer_sha256": tok.sha256(),
        "vocab_size": tok.vocab_size,
        "special_ids": {"pad": tok.pad_id, "bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id},
        "seq_len": seq_len,
        "input_files": input_files,
        "duplicate_documents": duplicates,
        "files": sorted(tok.files),
        "splits": {s: totals[s].entry(shards[s]) for s in SPLITS},
    }
