import numpy as np

from data import corpus, pipeline, tokenizer


def epoch(pieces, **kw):
    """Every batch of one epoch, stacked: dict of [rows, seq_len]."""
    batches = list(pipeline.text_pipeline(pieces, seq_len=16, batch_size=2, seed=3, num_epochs=1, **kw))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


DOCS = [list(np.random.default_rng(0).integers(4, 100, n)) for n in (3, 40, 9, 1, 17, 12, 5, 30)]  # 40 > seq_len


def test_packing_keeps_every_token_once_and_restarts_segments():
    rows = epoch(pipeline.split_documents(DOCS, 16))
    assert rows["inputs"].shape[1] == 16
    real = rows["segment_ids"] > 0
    # Every document token is a target exactly once, each document ends with EOS; BOS is only an input.
    targets = rows["targets"][real]
    assert sorted(targets[targets > 3]) == sorted(t for d in DOCS for t in d)
    assert (targets == tokenizer.EOS_ID).sum() == len(DOCS)
    assert (rows["inputs"][real] == tokenizer.BOS_ID).sum() == len(DOCS)
    for r in range(len(rows["inputs"])):
        seg, pos = rows["segment_ids"][r], rows["positions"][r]
        for s in set(seg[seg > 0]):
            assert list(pos[seg == s]) == list(range((seg == s).sum()))  # positions restart per piece
        same = (seg[1:] == seg[:-1]) & (seg[1:] > 0)  # within a piece, each target is the next input
        assert np.all(rows["targets"][r][:-1][same] == rows["inputs"][r][1:][same])


def test_processes_read_disjoint_slices_that_cover_the_data():
    docs = [list(range(start, start + n)) for start, n in ((4, 20), (30, 7), (40, 33), (80, 3), (90, 11))]
    pieces = pipeline.split_documents(docs, 16)  # every token id occurs once in the data
    parts = [epoch(pieces, process_index=i, process_count=2) for i in range(2)]
    read = [set(p["targets"][(p["segment_ids"] > 0) & (p["targets"] > 3)].tolist()) for p in parts]
    assert read[0] and read[1] and not read[0] & read[1]
    assert read[0] | read[1] == {t for d in docs for t in d}


def test_iterator_state_resumes_exactly():
    pieces = pipeline.split_documents(DOCS * 5, 16)
    it = iter(pipeline.text_pipeline(pieces, seq_len=16, batch_size=2, seed=0))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]
    resumed = iter(pipeline.text_pipeline(pieces, seq_len=16, batch_size=2, seed=0))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_tokenizer_round_trips_code_and_has_fixed_special_ids(tmp_path):
    train, val = corpus.stdlib_documents(1_000_000, val_fraction=0.2)
    assert train and val and not set(train) & set(val)
    sp = tokenizer.train(train, 512, tmp_path)
    sample = "def f(x):\n\tif x:\n        return 'é'  # ünïcode\n"
    assert sp.decode(sp.encode(sample)) == sample
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.vocab_size() == 512
