"""SentencePiece tokenizer: trained on a corpus, or loaded from a .model file.

Settings suit source code as well as prose: no normalisation (newlines and indentation
survive), byte fallback (no unknown tokens), no dummy prefix space, and fixed ids for the
special tokens. With these settings the Hugging Face conversion of a BPE model (Llama's
tokenizer class, add_prefix_space=False) gives exactly the same ids.
"""

import io
import os

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data.records import DataError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
VERSION = 2  # of the settings below; part of the cache key of prepared corpora


def train(texts, vocab_size: int, model_type: str = "bpe") -> bytes:
    """The serialized model: `vocab_size` pieces learnt from these texts."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(line for t in texts for line in t.splitlines(keepends=True) if line.strip()),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_by_whitespace=False,
            add_dummy_prefix=False,
            user_defined_symbols=["\n", "\t"],
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            max_sentence_length=1 << 16,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. a vocabulary the corpus cannot fill
        raise DataError(
            f"cannot train a {vocab_size}-piece tokenizer on this corpus ({str(e).strip()}); "
            "lower the vocab size or add text"
        ) from None
    return model.getvalue()


def load(model: bytes, name: str) -> spm.SentencePieceProcessor:
    """A processor for serialized model bytes; `name` is the file they came from, for errors."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(model)
    except (RuntimeError, OSError):
        raise DataError(f"{name} is not a SentencePiece model; pass a .model file written by SentencePiece") from None
    specials = (sp.pad_id(), sp.bos_id(), sp.eos_id())
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise DataError(f"{name} has no BOS/EOS pieces (pad, bos, eos ids are {specials}); train it with bos_id and eos_id set")
    return sp


def settings(model: bytes) -> dict:
    """What a converter to another tokenizer library needs to know: model type and prefix space."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    return {
        "model_type": sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower(),
        "add_dummy_prefix": proto.normalizer_spec.add_dummy_prefix,
    }
