"""The weight group's bucket plan (align/rollout/collective.py), by hand: buckets hold at most the cap (a larger
weight alone), every entry starts 16-byte aligned, and pack -> unpack gives back every weight bit for bit in
bfloat16, float16, float32 and int64, so a bf16 policy reaches the server unchanged. The group itself (gloo between
the trainer and align serve's workers) is tested end to end in tests/vllm."""

import torch

from align.rollout.collective import bucket_bytes, dtype_name, pack, plan, unpack


def test_plan_caps_buckets_aligns_entries_and_sends_a_large_weight_alone():
    mib = 1 << 20
    specs = [("a", "float32", (100, 1024)), ("b", "bfloat16", (3,)), ("c", "float32", (300, 1024)),
             ("d", "float32", (10,)), ("e", "int64", (2, 2))]
    buckets = plan(specs, bucket_mb=1.0)
    assert [[e[0] for e in b] for b in buckets] == [["a", "b"], ["c"], ["d", "e"]]
    a, b = buckets[0]
    assert (a[3], a[4]) == (0, 409600) and (b[3], b[4]) == (409600, 6)  # 409600 is a multiple of 16
    assert buckets[1][0][4] == 1228800 > mib  # larger than the cap: alone
    d, e = buckets[2]
    assert (d[3], d[4], e[3], e[4]) == (0, 40, 48, 32)  # 40 -> next multiple of 16 is 48
    assert [bucket_bytes(b) for b in buckets] == [409606, 1228800, 80]
    assert all(bucket_bytes(b) <= mib for b in buckets if len(b) > 1)


def test_pack_then_unpack_gives_every_weight_back_bit_for_bit():
    torch.manual_seed(0)
    weights = {"w.bf16": torch.randn(7, 5, dtype=torch.bfloat16), "w.f16": torch.randn(3, dtype=torch.float16),
               "w.f32": torch.randn(4, 4)[:, ::2],  # not contiguous
               "w.i64": torch.arange(6).reshape(2, 3)}
    specs = [(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in weights.items()]
    got = {}
    for bucket in plan(specs, bucket_mb=64 / (1 << 20)):  # 64-byte buckets: several
        flat = pack(bucket, weights, torch.device("cpu"))
        assert flat.dtype == torch.uint8 and flat.numel() == bucket_bytes(bucket)
        got.update({n: t.clone() for n, t in unpack(bucket, flat)})
    assert len(plan(specs, bucket_mb=64 / (1 << 20))) == 3
    assert got.keys() == weights.keys()
    for name, t in weights.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t), name
