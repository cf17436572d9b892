"""Tokenizers of two kinds behind one interface (`Tokenizer`):

- SentencePiece (`tokenizer.model`): trained here on a corpus, or brought. The settings used for
  training suit source code as well as prose: no normalisation (newlines and indentation survive),
  byte fallback (no unknown tokens), no dummy prefix space. With these settings the Hugging Face
  conversion of a BPE model (Llama's tokenizer class, add_prefix_space=False) gives the same ids.
- Hugging Face (`tokenizer.json` of the `tokenizers` library, plus the `tokenizer_config.json` that
  names its special tokens): what Llama 3 ships (byte-level BPE, `<|begin_of_text|>` and friends).

A tokenizer travels as its files, unchanged, from a prepared dataset to a run to an export (and
from an imported Hugging Face directory to a run); its BOS, EOS and padding ids are its own.
"""

import hashlib
import io
import json
import os

import sentencepiece as spm
import tokenizers
from etils import epath
from sentencepiece import sentencepiece_model_pb2

from data.records import DataError

SENTENCEPIECE_FILE, HF_FILE, HF_CONFIG_FILE = "tokenizer.model", "tokenizer.json", "tokenizer_config.json"
# The ids SentencePiece training assigns (a brought model keeps its own).
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
VERSION = 2  # of the training settings; part of the cache key of prepared corpora


class Tokenizer:
    """Text <-> ids, whatever the kind. `files` are the files that make it up, by name, as they came;
    ids of `encode` carry no BOS/EOS (the data pipeline and sampling add them); pad_id and unk_id are
    -1 where the tokenizer has none."""

    kind: str
    main_file: str  # the one that decides the ids
    files: dict[str, bytes]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    vocab_size: int

    def encode(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Text of the ids, special tokens left out."""
        raise NotImplementedError

    def token(self, i: int) -> str:
        raise NotImplementedError

    def sha256(self) -> str:
        return hashlib.sha256(self.files[self.main_file]).hexdigest()

    def same_ids(self, other: "Tokenizer") -> bool:
        """Whether both give any text the same ids, BOS and EOS included (chat templates may differ)."""
        return (self.sha256(), self.bos_id, self.eos_id) == (other.sha256(), other.bos_id, other.eos_id)

    def write(self, directory: epath.Path):
        for name, content in self.files.items():
            (epath.Path(directory) / name).write_bytes(content)


class SentencePiece(Tokenizer):
    kind, main_file = "sentencepiece", SENTENCEPIECE_FILE

    def __init__(self, model: bytes, name: str = SENTENCEPIECE_FILE):
        """`name`: the file the bytes came from, for errors."""
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load_from_serialized_proto(model)
        except (RuntimeError, OSError):
            raise DataError(f"{name} is not a SentencePiece model; pass a .model file written by SentencePiece "
                            f"or a Hugging Face {HF_FILE}") from None
        self.files = {SENTENCEPIECE_FILE: model}
        sp = self.sp
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()
        self.vocab_size = sp.get_piece_size()
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(f"{name} has no BOS/EOS pieces (pad, bos, eos ids are {self.pad_id, self.bos_id, self.eos_id}); "
                            "train it with bos_id and eos_id set")

    def encode(self, texts):
        return self.sp.encode(texts)

    def decode(self, ids):
        return self.sp.decode(ids)

    def token(self, i):
        return self.sp.id_to_piece(i)

    def settings(self) -> dict:
        """What a converter to another tokenizer library needs to know: model type and prefix space."""
        proto = sentencepiece_model_pb2.ModelProto.FromString(self.files[SENTENCEPIECE_FILE])
        return {
            "model_type": sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower(),
            "add_dummy_prefix": proto.normalizer_spec.add_dummy_prefix,
        }


def _token_name(value) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken written as a dict."""
    return value.get("content") if isinstance(value, dict) else value


class HuggingFace(Tokenizer):
    kind, main_file = "huggingface", HF_FILE

    def __init__(self, files: dict[str, bytes], where: str):
        """files: tokenizer.json and tokenizer_config.json; `where`: the directory they came from, for errors."""
        if HF_CONFIG_FILE not in files:
            raise DataError(f"{where} has {HF_FILE} but no {HF_CONFIG_FILE} beside it to name its bos_token and eos_token; "
                            "add one (transformers' save_pretrained writes it)")
        try:
            self.tok = tokenizers.Tokenizer.from_str(files[HF_FILE].decode())
            config = json.loads(files[HF_CONFIG_FILE])
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception, json a ValueError
            raise DataError(f"{where}: {HF_FILE} or {HF_CONFIG_FILE} is not a Hugging Face tokenizer ({str(e)[:100]}); "
                            "pass the files transformers' save_pretrained writes") from None
        self.files = {HF_FILE: files[HF_FILE], HF_CONFIG_FILE: files[HF_CONFIG_FILE]}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        ids = {}
        for role in ("bos", "eos", "pad", "unk"):
            name = _token_name(config.get(f"{role}_token"))
            ids[role] = -1 if name is None else self.tok.token_to_id(name)
            if ids[role] is None or (role in ("bos", "eos") and ids[role] < 0):
                raise DataError(f"{where}/{HF_CONFIG_FILE}: {role}_token {name!r} is not a token of {HF_FILE}; "
                                f"set {role}_token to one of its special tokens")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = ids["bos"], ids["eos"], ids["pad"], ids["unk"]

    def encode(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def token(self, i):
        return self.tok.id_to_token(i)


def from_files(files: dict[str, bytes], where: str) -> Tokenizer:
    """The tokenizer these files make up (a Hugging Face tokenizer.json wins over a tokenizer.model
    where a directory holds both: it is what transformers reads)."""
    if HF_FILE in files:
        return HuggingFace(files, where)
    return SentencePiece(files[SENTENCEPIECE_FILE], f"{where}/{SENTENCEPIECE_FILE}")


def read(directory) -> Tokenizer | None:
    """The tokenizer kept in a directory (a run, a prepared dataset, a Hugging Face model), or None."""
    directory = epath.Path(directory)
    files = {name: (directory / name).read_bytes() for name in (SENTENCEPIECE_FILE, HF_FILE, HF_CONFIG_FILE)
             if (directory / name).exists()}
    return from_files(files, str(directory)) if HF_FILE in files or SENTENCEPIECE_FILE in files else None


def load(path: str) -> Tokenizer:
    """`--tokenizer PATH`: a SentencePiece .model file, a Hugging Face tokenizer.json (with its
    tokenizer_config.json beside it), or a directory holding either (such as a Llama checkpoint)."""
    path = epath.Path(path)
    if path.is_dir():
        found = read(path)
        if found is None:
            raise DataError(f"{path} holds neither {HF_FILE} nor {SENTENCEPIECE_FILE}; point --tokenizer at a tokenizer")
        return found
    if not path.is_file():
        raise DataError(f"tokenizer {path} does not exist; pass a SentencePiece .model file, a {HF_FILE} "
                        "or a directory holding one")
    if path.suffix == ".json":
        config = path.parent / HF_CONFIG_FILE
        files = {HF_FILE: path.read_bytes(), **({HF_CONFIG_FILE: config.read_bytes()} if config.exists() else {})}
        return HuggingFace(files, str(path.parent))
    return SentencePiece(path.read_bytes(), str(path))


def train(texts, vocab_size: int, model_type: str = "bpe") -> SentencePiece:
    """A SentencePiece model of `vocab_size` pieces learnt from these texts."""
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
    return SentencePiece(model.getvalue())
