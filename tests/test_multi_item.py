"""multi_item_mask (CPU): FlashInfer's multi-item-scoring mask against per-(query, key) Python loops,
one written from the kernel's rule, one from the item layout (prefix, delimiters, items)."""
import numpy as np
import pytest

from fi_cupy import multi_item
from fi_cupy.multi_item import multi_item_mask, multi_item_row_limits


def rule_mask(qo_lens, kv_lens, prefix_lens, pos, row_len, window_left=-1):
    """The rule of logits_mask_multi_item_scoring, one (query, key) pair at a time."""
    out = []
    for b, (qo, kv, prefix) in enumerate(zip(qo_lens, kv_lens, prefix_lens)):
        for i in range(qo):
            p = i + kv - qo
            for k in range(kv):
                if k > p or (window_left >= 0 and k < p - window_left):
                    ok = False
                elif p < prefix or k < prefix:
                    ok = True
                else:
                    ok = p < k + int(pos[b * row_len + p - prefix])
                out.append(ok)
    return np.array(out, dtype=bool)


def layout_mask(requests, qo_lens):
    """From the documented layout: requests are (prefix_len, item_lengths); the sequence is the prefix,
    then a delimiter before every item and one at the end. Prefix tokens attend causally; an item's
    j-th token attends the prefix and its item's tokens 1..j; a delimiter attends only the prefix."""
    out = []
    for (prefix, items), qo in zip(requests, qo_lens):
        labels = [("prefix", None, i) for i in range(prefix)]
        for n, length in enumerate(items):
            labels.append(("delim", None, 0))
            labels += [("item", n, j) for j in range(1, length + 1)]
        labels.append(("delim", None, 0))
        kv = len(labels)
        for i in range(qo):
            p = i + kv - qo
            for k in range(kv):
                if p < 0:
                    ok = False
                else:
                    qkind, qitem, qpos = labels[p]
                    kkind, kitem, kpos = labels[k]
                    if qkind == "prefix":
                        ok = k <= p
                    elif kkind == "prefix":
                        ok = True
                    elif qkind == "item":
                        ok = kkind == "item" and kitem == qitem and kpos <= qpos
                    else:
                        ok = False
                out.append(ok)
    return np.array(out, dtype=bool)


def build(requests, pad=0, row_len=None):
    """Positions for (prefix_len, item_lengths) requests, rows of row_len (default: longest + pad)."""
    rows = []
    for _, items in requests:
        r = [0]
        for length in items:
            r += list(range(1, length + 1)) + [0]
        rows.append(r)
    if row_len is None:
        row_len = max(len(r) for r in rows) + pad
    pos = np.zeros(len(rows) * row_len, dtype=np.uint16)
    for b, r in enumerate(rows):
        pos[b * row_len:b * row_len + len(r)] = r
    kv = np.array([p + len(r) for (p, _), r in zip(requests, rows)], dtype=np.uint32)
    prefix = np.array([p for p, _ in requests], dtype=np.uint32)
    return kv, prefix, pos, row_len


def random_requests(rng, n, max_prefix=6, max_items=5, max_item_len=5):
    reqs = []
    for _ in range(n):
        prefix = int(rng.choice([0, int(rng.integers(1, max_prefix + 1))]))
        items = [int(x) for x in rng.integers(1, max_item_len + 1, size=int(rng.integers(1, max_items + 1)))]
        reqs.append((prefix, items))
    return reqs


def test_hand_written_example():
    # prefix of 2, items of lengths 2 and 1: P P D A1 A2 D B1 D
    kv, prefix, pos, row = build([(2, [2, 1])])
    assert list(pos) == [0, 1, 2, 0, 1, 0]
    expected = np.array([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],  # delimiter: prefix only, not itself
        [1, 1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 0],  # second item does not see the first
        [1, 1, 0, 0, 0, 0, 0, 0],
    ], dtype=bool)
    got = multi_item_mask([8], kv, prefix, pos, row)
    np.testing.assert_array_equal(got.reshape(8, 8), expected)
    # queries = the last 3 tokens only: bottom-right aligned rows of the same matrix
    got = multi_item_mask([3], kv, prefix, pos, row)
    np.testing.assert_array_equal(got.reshape(3, 8), expected[5:])


def test_flashinfer_test_case():
    # tests/attention/test_batch_prefill_kernels.py multi-item case: kv 54, qo 37, prefix 17, items 16 and 18
    pos = np.array(list(range(17)) + list(range(19)) + [0], dtype=np.uint16)
    got = multi_item_mask(np.array([37], np.int32), np.array([54], np.int32), np.array([17], np.uint32),
                          pos, 100, max_item_lens=np.array([18], np.uint16))
    np.testing.assert_array_equal(got, layout_mask([(17, [16, 18])], [37]))


@pytest.mark.parametrize("seed", range(12))
def test_random_against_layout(seed):
    rng = np.random.default_rng(seed)
    reqs = random_requests(rng, int(rng.integers(1, 5)))
    kv, prefix, pos, row = build(reqs, pad=int(rng.integers(0, 4)))
    # all of each request after the prefix (FlashInfer's own set-up), every token, or a chunk at the end
    qo = []
    for k, pf in zip(kv.tolist(), prefix.tolist()):
        qo.append(int(rng.choice([k - pf, k, int(rng.integers(1, k + 1))])))
    qo = np.array(qo, dtype=np.int32)
    mil = np.array([max(items) for _, items in reqs], dtype=np.uint16)
    got = multi_item_mask(qo, kv, prefix, pos, row, max_item_lens=mil)
    np.testing.assert_array_equal(got, layout_mask(reqs, qo.tolist()))
    np.testing.assert_array_equal(got, rule_mask(qo, kv, prefix, pos, row))


@pytest.mark.parametrize("reqs", [
    [(0, [3, 1, 2])],                  # no prefix: delimiter rows are empty
    [(5, [7])],                        # one item
    [(3, [1, 1, 1, 1, 1, 1])],         # items of length 1
    [(4, [2] * 9), (0, [1]), (2, [5, 1])],
])
def test_shapes_of_layout(reqs):
    kv, prefix, pos, row = build(reqs, pad=2)
    qo = (kv - prefix).astype(np.int64)
    got = multi_item_mask(qo, kv, prefix, pos, row)
    np.testing.assert_array_equal(got, layout_mask(reqs, qo.tolist()))
    if reqs[0][0] == 0:
        first = got[:int(qo[0] * kv[0])].reshape(int(qo[0]), int(kv[0]))
        assert not first[np.asarray(pos[:int(kv[0])]) == 0].any()


@pytest.mark.parametrize("seed", range(8))
def test_random_positions_window_and_short_queries(seed):
    """Arbitrary positions (not a well-formed layout), sliding windows, qo_len > kv_len."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 5))
    kv = rng.integers(0, 14, size=n).astype(np.int64)
    prefix = np.array([int(rng.integers(0, k + 1)) for k in kv])
    qo = np.array([int(rng.integers(0, k + 3)) for k in kv])
    row = int(kv.max()) + int(rng.integers(0, 3))
    pos = rng.integers(0, 9, size=n * row).astype(np.uint16)
    wl = int(rng.choice([-1, 0, 2, 5]))
    got = multi_item_mask(qo, kv, prefix, pos, row, window_left=wl)
    assert got.shape == (int(np.sum(qo * kv)),)
    np.testing.assert_array_equal(got, rule_mask(qo, kv, prefix, pos, row, wl))


def test_single_request_row_len_zero_and_row_blocks(monkeypatch):
    # FlashInfer's default token_pos_in_items_len = 0 is fine for one request (row 0 starts at 0)
    reqs = [(3, [4, 2, 5])]
    kv, prefix, pos, _ = build(reqs)
    want = layout_mask(reqs, [int(kv[0])])
    np.testing.assert_array_equal(multi_item_mask(kv, kv, prefix, pos, 0), want)
    monkeypatch.setattr(multi_item, "ROW_BLOCK", 3)  # several row blocks per request
    np.testing.assert_array_equal(multi_item_mask(kv, kv, prefix, pos, 0), want)


def test_row_limits_describe_the_mask():
    reqs = [(3, [2, 4]), (0, [1, 3])]
    kv, prefix, pos, row = build(reqs, pad=1)
    qo = np.array([int(kv[0]), 4])
    lo, hi, start = multi_item_row_limits(qo, kv, prefix, pos, row, window_left=4)
    assert lo.shape == hi.shape == start.shape == (int(qo.sum()),)
    rebuilt, r = [], 0
    for q, k, pf in zip(qo.tolist(), kv.tolist(), prefix.tolist()):
        keys = np.arange(k)
        for _ in range(q):
            rebuilt.append((keys >= lo[r]) & (keys < hi[r]) & ((keys < pf) | (keys >= start[r])))
            r += 1
    np.testing.assert_array_equal(np.concatenate(rebuilt), rule_mask(qo, kv, prefix, pos, row, 4))


def test_empty_batch_and_empty_requests():
    assert multi_item_mask([], [], [], np.zeros(0, np.uint16), 0).shape == (0,)
    got = multi_item_mask([0, 2], [3, 0], [1, 0], np.zeros(4, np.uint16), 2)
    assert got.shape == (0,)


def test_large_request_is_vectorised():
    # one 4096-token request: built in numpy blocks; spot-check rows against the rule
    reqs = [(1000, [97] * 30)]
    kv, prefix, pos, row = build(reqs)
    k = int(kv[0])
    m = multi_item_mask(kv, kv, prefix, pos, row).reshape(k, k)
    for p in (0, 999, 1000, 1001, 1500, k - 2, k - 1):
        t = 0 if p < 1000 else int(pos[p - 1000])
        keys = np.arange(k)
        want = (keys <= p) & ((p < 1000) | (keys < 1000) | (keys > p - t))
        np.testing.assert_array_equal(m[p], want)
    assert m.sum() == int(rule_count(kv[0], prefix[0], pos))


def rule_count(kv, prefix, pos):
    kv, prefix = int(kv), int(prefix)
    total = prefix * (prefix + 1) // 2
    for p in range(prefix, kv):
        total += prefix + int(pos[p - prefix])
    return total


KV, PF, POS = np.array([8, 6]), np.array([2, 0]), np.zeros(12, np.uint16)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(qo_lens=np.array([1.0, 2.0])), TypeError, "qo_lens: must be an integer array, got dtype float64"),
    (dict(qo_lens=np.array([True, False])), TypeError, "qo_lens: must be an integer array, got dtype bool"),
    (dict(qo_lens=np.array([[1, 2]])), ValueError, r"qo_lens: must be 1-D, got shape \(1, 2\)"),
    (dict(qo_lens=np.array([-1, 2])), ValueError, r"qo_lens: values must be in \[0, 4294967295\]"),
    (dict(kv_lens=np.array([8])), ValueError, r"kv_lens: must have one entry per request like qo_lens \(2\), got 1"),
    (dict(prefix_lens=np.array([2, 0, 0])), ValueError, "prefix_lens: must have one entry per request"),
    (dict(prefix_lens=np.array([9, 0])), ValueError, "prefix_lens: .*request 0 has prefix_lens 9 > kv_lens 8"),
    (dict(token_pos_in_items=np.zeros(12, np.float32)), TypeError, "token_pos_in_items: must be an integer"),
    (dict(token_pos_in_items=np.full(12, 70000)), ValueError, r"token_pos_in_items: values must be in \[0, 65535\]"),
    (dict(token_pos_in_items=np.full(12, -1)), ValueError, "token_pos_in_items: values must be in"),
    (dict(token_pos_in_items=np.zeros((2, 6), np.uint16)), ValueError, "token_pos_in_items: must be 1-D"),
    (dict(token_pos_in_items=np.zeros(11, np.uint16)), ValueError,
     "token_pos_in_items: request 1 reads elements up to 12 .* got 11 elements"),
    (dict(token_pos_in_items_len=5), ValueError,
     "token_pos_in_items_len: each request's row must hold .* got 5, request 0 needs 6"),
    (dict(token_pos_in_items_len=-1), ValueError, r"token_pos_in_items_len: must be an int .* got -1"),
    (dict(token_pos_in_items_len=6.0), ValueError, "token_pos_in_items_len: must be an int"),
    (dict(token_pos_in_items_len=True), ValueError, "token_pos_in_items_len: must be an int"),
    (dict(window_left=1.5), ValueError, "window_left: must be an int"),
    (dict(max_item_lens=np.array([1])), ValueError, "max_item_lens: must have one entry per request"),
    (dict(max_item_lens=np.array([1.0, 1.0])), TypeError, "max_item_lens: must be an integer array"),
])
def test_argument_errors(kwargs, exc, match):
    args = dict(qo_lens=np.array([6, 6]), kv_lens=KV, prefix_lens=PF, token_pos_in_items=POS,
                token_pos_in_items_len=6)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        multi_item_mask(**args)


def test_max_item_len_too_small():
    kv, prefix, pos, row = build([(2, [3, 1]), (1, [2])])
    qo = kv - prefix
    multi_item_mask(qo, kv, prefix, pos, row, max_item_lens=[3, 2])  # exact maxima are fine
    with pytest.raises(ValueError, match="max_item_lens: request 0 has max_item_lens 2 but its "
                                         "token_pos_in_items reach 3"):
        multi_item_mask(qo, kv, prefix, pos, row, max_item_lens=[2, 2])
    # only the positions the queries read count: with one query (the final delimiter) 0 is enough
    multi_item_mask([1, 1], kv, prefix, pos, row, max_item_lens=[0, 0])
