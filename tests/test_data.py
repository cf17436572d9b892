import numpy as np

from data import corpus, text, tokenizer


def test_packing_keeps_every_token_once_and_restarts_segments():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(4, 100, n)) for n in (3, 40, 9, 1, 17)]  # 40 > seq_len: split, not dropped
    rows = text.pack(docs, seq_len=16)
    assert rows["inputs"].shape[1] == 16
    real = rows["segment_ids"] > 0
    # Every document token appears once as a target, followed by EOS; BOS only as an input.
    targets = rows["targets"][real]
    assert sorted(targets[targets > 3]) == sorted(t for d in docs for t in d)
    assert (targets == tokenizer.EOS_ID).sum() == len(docs)
    for r in range(len(rows["inputs"])):
        seg, pos = rows["segment_ids"][r], rows["positions"][r]
        for s in set(seg[seg > 0]):
            assert list(pos[seg == s]) == list(range((seg == s).sum()))  # positions restart per piece
        # Within a piece, each target is the next input.
        same = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
        assert np.all(rows["targets"][r][:-1][same] == rows["inputs"][r][1:][same])


def test_batches_split_the_global_batch_between_processes():
    rows = text.pack([list(range(4, 4 + n)) for n in range(5, 60)], seq_len=8)
    whole = next(iter(text.Batches(rows, 8, seed=1)))
    parts = [next(iter(text.Batches(rows, 8, seed=1, process_index=i, process_count=2))) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), whole["inputs"])


def test_tokenizer_round_trips_code_and_has_fixed_special_ids(tmp_path):
    train, val = corpus.stdlib_documents(1_000_000, val_fraction=0.2)
    assert train and val and not set(train) & set(val)
    sp = tokenizer.train(train, 512, tmp_path)
    sample = "def f(x):\n\tif x:\n        return 'é'  # ünïcode\n"
    assert sp.decode(sp.encode(sample)) == sample
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.vocab_size() == 512
