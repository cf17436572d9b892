"""SentencePiece tokenizer: trained on a corpus once and cached, or loaded from a .model file.

Settings suit source code as well as prose: no normalisation (newlines and indentation
survive), byte fallback (no unknown tokens), and fixed ids for the special tokens.
"""

import hashlib
import io
import os
import tempfile
from pathlib import Path

import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def train(texts: list[str], vocab_size: int, cache_dir: Path) -> spm.SentencePieceProcessor:
    """A BPE model of `vocab_size` pieces for these texts, cached by content and size."""
    key = hashlib.sha256()
    for t in texts:
        key.update(hashlib.sha256(t.encode()).digest())
    path = Path(cache_dir).expanduser() / "tokenizers" / f"bpe{vocab_size}-{key.hexdigest()[:16]}.model"
    if not path.exists():
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(line for t in texts for line in t.splitlines(keepends=True) if line.strip()),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_by_whitespace=False,
            user_defined_symbols=["\n", "\t", "    "],
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            max_sentence_length=1 << 16,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: concurrent runs never read a half-written model.
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
            f.write(model.getvalue())
        os.replace(f.name, path)
    return spm.SentencePieceProcessor(model_file=str(path))
