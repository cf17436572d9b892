"""`pretrain sample` for the language model: a prompt in, generated ids and text out."""

import jax
import numpy as np

from data import tokenizer as tokenizer_lib
from data.prepare import TOKENIZER_FILE
from models.generate import generate
from pretrain.config import ConfigError
from pretrain.export import load_model


def sample_text(path: str, prompt: str, *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                step: int | None = None) -> dict:
    """{"prompt_ids": BOS + the tokenised prompt, "ids": the generated ids (up to and including the
    first EOS), "text": the generated text} from a checkpoint or an exported directory."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={max_new_tokens} must be at least 1")
    if temperature < 0:
        raise ConfigError(f"--temperature={temperature} must be >= 0 (0: greedy)")
    model, tokenizer = load_model(path, step)
    if tokenizer is None:
        raise ConfigError(f"{path} has no {TOKENIZER_FILE} next to the weights; sampling needs the model's tokenizer")
    sp = tokenizer_lib.load(tokenizer, TOKENIZER_FILE)
    prompt_ids = [sp.bos_id()] + sp.encode(prompt)
    limit = model.cfg.max_seq_len
    if len(prompt_ids) + max_new_tokens > limit:
        raise ConfigError(f"the prompt ({len(prompt_ids)} tokens) plus --max-new-tokens={max_new_tokens} exceed the "
                          f"model's max_seq_len={limit}; shorten one of them")
    ids = generate(model, np.array([prompt_ids], np.int32), jax.random.key(seed), temperature,
                   max_new_tokens=max_new_tokens, num_valid=sp.get_piece_size())
    ids = [int(i) for i in np.asarray(ids[0])]
    if sp.eos_id() in ids:
        ids = ids[: ids.index(sp.eos_id()) + 1]
    # Decoding prompt and continuation together keeps the space between them where the tokenizer puts it.
    before, whole = sp.decode(prompt_ids), sp.decode(prompt_ids + ids)
    text = whole[len(before):] if whole.startswith(before) else sp.decode(ids)
    return {"prompt_ids": prompt_ids, "ids": ids, "text": text}
