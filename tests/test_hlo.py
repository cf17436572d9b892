"""pretrain/plan/hlo.py: collective bytes and counts read from optimized HLO, checked against figures
worked out by hand, on a program compiled for the 8 faked CPU devices and on hand-written HLO."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from pretrain.plan import forecast, hlo
from pretrain.tpu import kinds

TWO_SLICES = [0] * 4 + [1] * 4  # devices 0-3 in slice 0, 4-7 in slice 1
ONE_SLICE = [0] * 8


def expect(ici=None, dcn=None, synchronous=True):
    """The full result for {kind: (count, bytes)} per link; every other kind 0. The collectives are
    all synchronous, or (synchronous=False) all scheduled to overlap other work."""
    out = {"ici": {}, "dcn": {}, "counts": {"ici": {}, "dcn": {}}, "sync": {"ici": {}, "dcn": {}}}
    for link, figures in (("ici", ici or {}), ("dcn", dcn or {})):
        for kind in hlo.KINDS:
            out["counts"][link][kind], out[link][kind] = figures.get(kind, (0, 0))
            out["sync"][link][kind] = out[link][kind] if synchronous else 0
    return out


@pytest.fixture(scope="module")
def program_hlo():
    """On a 2 x 4 mesh (mesh.devices.flat is the logical id order, so "x" pairs devices i and i + 4
    across the two halves and "y" groups 0-3 and 4-7 within them), per device: a psum over "y" of
    f32[16,32] (2048 B) in a 5-step loop, an all_gather over "x" of f32[4,8] into f32[8,8] (256 B), a
    psum_scatter over "y" of f32[8,16] (512 B in, 128 B out), a ppermute over "x" of f32[2,4] (32 B; XLA
    CPU would upcast a bf16 one to f32) and an all_to_all over "x" of s32[4,4] (64 B)."""
    mesh = jax.make_mesh((2, 4), ("x", "y"))

    def step(a, b, c, d, e):
        a = jax.lax.fori_loop(0, 5, lambda i, v: jax.lax.psum(v, "y") * 0.5, a)
        g = jax.lax.all_gather(b, "x", tiled=True)
        s = jax.lax.psum_scatter(c, "y", scatter_dimension=0, tiled=True)
        p = jax.lax.ppermute(e, "x", [(0, 1), (1, 0)])
        t = jax.lax.all_to_all(d, "x", 0, 0, tiled=True)
        return a, g, s, p, t

    # Some outputs differ across devices yet are declared replicated: only the HLO matters here.
    out_specs = (P(), P("x"), P(), P(), P())
    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(), out_specs=out_specs, check_vma=False))
    args = (jnp.ones((16, 32)), jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones((4, 4), jnp.int32), jnp.ones((2, 4)))
    return f.lower(*args).compile().as_text()


OVER_Y = {"all-reduce": (5, 5 * 2048), "reduce-scatter": (1, 512)}
OVER_X = {"all-gather": (1, 256), "collective-permute": (1, 32), "all-to-all": (1, 64)}


def test_compiled_program_on_one_slice(program_hlo):
    # XLA CPU splits the all-to-all into a variadic one over two s32[2,4] halves: 64 B all the same.
    assert hlo.collective_bytes(program_hlo, ONE_SLICE) == expect(ici=OVER_Y | OVER_X)


def test_compiled_program_split_by_slice(program_hlo):
    assert hlo.collective_bytes(program_hlo, TWO_SLICES) == expect(ici=OVER_Y, dcn=OVER_X)


def test_trip_count_derived_without_backend_config(program_hlo):
    """Without known_trip_count the count comes from the loop's compare, init and step (each wrapped
    in a fusion by XLA CPU)."""
    stripped = re.sub(r',?"known_trip_count":\{"n":"\d+"\}', "", program_hlo)
    assert stripped != program_hlo
    assert hlo.collective_bytes(stripped, ONE_SLICE) == expect(ici=OVER_Y | OVER_X)


def module(*computations: str) -> str:
    return "HloModule m, num_partitions=8\n\n" + "\n\n".join(computations)


ADD = """%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}"""


def test_replica_groups_explicit_iota_and_empty():
    text = module(ADD, """ENTRY %main (p: f32[1]) -> f32[1] {
  %p = f32[1]{0} parameter(0)
  %rows = f32[1]{0} all-reduce(%p), channel_id=1, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %pairs = f32[2]{0} all-reduce(%p), channel_id=2, replica_groups=[4,2]<=[8], use_global_device_ids=true, to_apply=%add
  %cols = f32[4]{0} all-reduce(%p), channel_id=3, replica_groups=[4,2]<=[2,4]T(1,0), use_global_device_ids=true, \
to_apply=%add
  %all = f64[4]{0:S(1)} all-reduce(%p), channel_id=4, replica_groups={}, to_apply=%add
  %half = bf16[4]{0} all-gather(%p), channel_id=5, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  ROOT %cross = bf16[8]{0} all-gather(%p), channel_id=6, replica_groups={{0,1,2,4},{3,5,6,7}}, dimensions={0}
}""")
    # [2,4]<=[8]: {0-3},{4-7}; [4,2]<=[8]: {0,1},{2,3},..; [4,2]<=[2,4]T(1,0): {0,4},{1,5},..; {}: all 8.
    assert hlo.collective_bytes(text, TWO_SLICES) == expect(
        ici={"all-reduce": (2, 4 + 8), "all-gather": (1, 8)},
        dcn={"all-reduce": (2, 16 + 32), "all-gather": (1, 16)},
    )
    assert hlo.collective_bytes(text, ONE_SLICE) == expect(ici={"all-reduce": (4, 60), "all-gather": (2, 24)})


def test_async_start_done_pairs_count_once_with_result_bytes():
    text = module(ADD, """ENTRY %main (p: f32[4,8]) -> f32[8,8] {
  %p = f32[4,8]{1,0} parameter(0)
  %ags = (f32[4,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%p), channel_id=1, replica_groups=[4,2]<=[8], \
dimensions={0}, use_global_device_ids=true
  %agd = f32[8,8]{1,0} all-gather-done(%ags)
  %cps = (f32[4,8]{1,0}, f32[4,8]{1,0}, u32[], u32[]) collective-permute-start(%p), channel_id=2, \
source_target_pairs={{0,4},{4,0}}
  %cpd = f32[4,8]{1,0} collective-permute-done(%cps)
  %ars = (f32[4,8]{1,0}, f32[2]{0}) all-reduce-start(%p, %p), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7}}, \
to_apply=%add
  %ard = (f32[4,8]{1,0}, f32[2]{0}) all-reduce-done(%ars)
  ROOT %out = f32[8,8]{1,0} copy(%agd)
}""")
    assert hlo.collective_bytes(text, TWO_SLICES) == expect(
        ici={"all-gather": (1, 256), "all-reduce": (1, 128 + 8)},
        dcn={"collective-permute": (1, 128)}, synchronous=False,
    )


def test_async_start_wrapping_reduce_scatter_and_all_to_all():
    text = module(ADD, """%wrapped_reduce_scatter (p0: f32[8,16]) -> f32[2,16] {
  %p0 = f32[8,16]{1,0} parameter(0)
  ROOT %rs = f32[2,16]{1,0} reduce-scatter(%p0), channel_id=1, replica_groups=[2,4]<=[8], use_global_device_ids=true, \
dimensions={0}, to_apply=%add
}""", """%wrapped_all_to_all (p0: s32[4,4]) -> s32[4,4] {
  %p0 = s32[4,4]{1,0} parameter(0)
  ROOT %a2a = s32[4,4]{1,0} all-to-all(%p0), channel_id=2, replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={0}
}""", """ENTRY %main (p: f32[8,16], q: s32[4,4]) -> f32[2,16] {
  %p = f32[8,16]{1,0} parameter(0)
  %q = s32[4,4]{1,0} parameter(1)
  %rs-start = ((f32[8,16]{1,0}), f32[2,16]{1,0}, u32[]) async-start(%p), calls=%wrapped_reduce_scatter
  %a2a-start = ((s32[4,4]{1,0}), s32[4,4]{1,0}, u32[]) async-start(%q), calls=%wrapped_all_to_all
  %a2a-done = s32[4,4]{1,0} async-done(%a2a-start), calls=%wrapped_all_to_all
  ROOT %rs-done = f32[2,16]{1,0} async-done(%rs-start), calls=%wrapped_reduce_scatter
}""")
    assert hlo.collective_bytes(text, TWO_SLICES) == expect(
        ici={"reduce-scatter": (1, 512)}, dcn={"all-to-all": (1, 64)}, synchronous=False)


# An inner loop of 4 steps (an all-reduce of f32[8], 32 B) inside an outer loop of 3 steps (the inner
# loop, then an all-gather into f32[8], 32 B); both count i from 0 while i < bound, stepping by 1.
NESTED = module(ADD, """%inner_cond (s: (s32[], f32[8])) -> pred[] {
  %s = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}""", """%inner_body (s: (s32[], f32[8])) -> (s32[], f32[8]) {
  %s = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %x = f32[8]{0} get-tuple-element(%s), index=1
  %y = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8]{0}) tuple(%next, %y)
}""", """%outer_cond (s: (s32[], f32[8])) -> pred[] {
  %s = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}""", """%outer_body (s: (s32[], f32[8])) -> (s32[], f32[8]) {
  %s = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %x = f32[8]{0} get-tuple-element(%s), index=1
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %x)
  %loop = (s32[], f32[8]{0}) while(%init), condition=%inner_cond, body=%inner_body, \
backend_config={"known_trip_count":{"n":"4"}}
  %z = f32[8]{0} get-tuple-element(%loop), index=1
  %h = f32[4]{0} slice(%z), slice={[0:4]}
  %y = f32[8]{0} all-gather(%h), channel_id=2, replica_groups=[4,2]<=[8], dimensions={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8]{0}) tuple(%next, %y)
}""", """ENTRY %main (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %p)
  %loop = (s32[], f32[8]{0}) while(%init), condition=%outer_cond, body=%outer_body, \
backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[8]{0} get-tuple-element(%loop), index=1
}""")
NESTED_FIGURES = {"all-reduce": (12, 12 * 32), "all-gather": (3, 3 * 32)}


def test_nested_loops_multiply_trip_counts():
    assert hlo.collective_bytes(NESTED, ONE_SLICE) == expect(ici=NESTED_FIGURES)


def test_trip_counts_derived_else_once():
    derived = re.sub(r", backend_config=\{.*\}", "", NESTED)
    assert "known_trip_count" not in derived
    assert hlo.collective_bytes(derived, ONE_SLICE) == expect(ici=NESTED_FIGURES)
    # i <= 3 from 0 runs 4 times too.
    less_equal = derived.replace("constant(4)\n  ROOT %lt = pred[] compare(%i, %n), direction=LT",
                                 "constant(3)\n  ROOT %lt = pred[] compare(%i, %n), direction=LE")
    assert less_equal != derived
    assert hlo.collective_bytes(less_equal, ONE_SLICE) == expect(ici=NESTED_FIGURES)
    # A counter that is multiplied, not stepped: the inner loop's count is unknown, so it counts once.
    inner_step = "all-reduce(%x), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add\n  %one = s32[] constant(1)\n"
    unknown = derived.replace(inner_step + "  %next = s32[] add", inner_step + "  %next = s32[] multiply")
    assert unknown != derived
    assert hlo.collective_bytes(unknown, ONE_SLICE) == expect(ici={"all-reduce": (3, 3 * 32), "all-gather": (3, 96)})


def test_loop_condition_runs_once_more_than_body():
    check = "  %v = s32[] all-reduce(%i), channel_id=3, replica_groups={}, to_apply=%add\n"
    in_condition = NESTED.replace("constant(3)\n", "constant(3)\n" + check)  # the outer loop's condition
    assert in_condition != NESTED
    assert hlo.collective_bytes(in_condition, ONE_SLICE) == expect(
        ici={"all-reduce": (12 + 4, 12 * 32 + 4 * 4), "all-gather": (3, 3 * 32)})


def test_calls_and_conditional_branches_add_up():
    text = module("""%permute (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %y = f32[4]{0} collective-permute(%x), channel_id=1, source_target_pairs={{0,1},{1,0}}
}""", """%identity (x: f32[4]) -> f32[4] {
  ROOT %x = f32[4]{0} parameter(0)
}""", """ENTRY %main (b: s32[], p: f32[4]) -> f32[4] {
  %b = s32[] parameter(0)
  %p = f32[4]{0} parameter(1)
  %c1 = f32[4]{0} call(%p), to_apply=%permute
  %c2 = f32[4]{0} call(%c1), to_apply=%permute
  ROOT %c3 = f32[4]{0} conditional(%b, %c2, %c2), branch_computations={%permute, %identity}
}""")
    assert hlo.collective_bytes(text, TWO_SLICES) == expect(ici={"collective-permute": (3, 48)})


# Windowed einsums: XLA:TPU's loops that pass weight shards around a ring (all-gather) or partial sums
# (reduce-scatter) with collective-permutes while each step's matmul runs. The gather's loop takes a
# first shard sent before it starts; the bidirectional scatter sends its last partial sum after it
# (here, as XLA often does, after an asynchronous copy between memory spaces).
# Each permute moves bf16[4,8] (64 B); each loop runs 3 times.
WINDOWED = module("""%wide.windowed_dot_general_body_ag.1 (s: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %s = (s32[], bf16[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %x = bf16[4,8]{1,0} get-tuple-element(%s), index=1
  %cps = (bf16[4,8]{1,0}, bf16[4,8]{1,0}, u32[], u32[]) collective-permute-start(%x), channel_id=1, \
source_target_pairs={{0,1},{1,2},{2,3},{3,4},{4,5},{5,6},{6,7},{7,0}}
  %cpd = bf16[4,8]{1,0} collective-permute-done(%cps)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[4,8]{1,0}) tuple(%next, %cpd)
}""", """%wide.windowed_dot_general_body_rs.2.clone (s: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %s = (s32[], bf16[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %x = bf16[4,8]{1,0} get-tuple-element(%s), index=1
  %y = bf16[4,8]{1,0} collective-permute(%x), channel_id=2, source_target_pairs={{0,7},{1,0},{2,1},{3,2},{4,3},\
{5,4},{6,5},{7,6}}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[4,8]{1,0}) tuple(%next, %y)
}""", """%cond (s: (s32[], bf16[4,8])) -> pred[] {
  %s = (s32[], bf16[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}""", """ENTRY %main (p: bf16[4,8]) -> bf16[4,8] {
  %p = bf16[4,8]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %first-start = (bf16[4,8]{1,0}, bf16[4,8]{1,0}, u32[], u32[]) collective-permute-start(%p), channel_id=3, \
source_target_pairs={{0,1},{1,2},{2,3},{3,4},{4,5},{5,6},{6,7},{7,0}}
  %first = bf16[4,8]{1,0} collective-permute-done(%first-start)
  %init = (s32[], bf16[4,8]{1,0}) tuple(%zero, %first)
  %ag = (s32[], bf16[4,8]{1,0}) while(%init), condition=%cond, body=%wide.windowed_dot_general_body_ag.1
  %gathered = bf16[4,8]{1,0} get-tuple-element(%ag), index=1
  %init2 = (s32[], bf16[4,8]{1,0}) tuple(%zero, %gathered)
  %rs = (s32[], bf16[4,8]{1,0}) while(%init2), condition=%cond, body=%wide.windowed_dot_general_body_rs.2.clone
  %partial = bf16[4,8]{1,0} get-tuple-element(%rs), index=1
  %to-hbm = (bf16[4,8]{1,0:S(1)}, bf16[4,8]{1,0}, u32[]) copy-start(%partial)
  %moved = bf16[4,8]{1,0} copy-done(%to-hbm)
  %last = bf16[4,8]{1,0} collective-permute(%moved), channel_id=4, source_target_pairs={{0,7},{1,0},{2,1},{3,2},\
{4,3},{5,4},{6,5},{7,6}}
  ROOT %other = bf16[4,8]{1,0} collective-permute(%last), channel_id=5, source_target_pairs={{0,4},{4,0}}
}""")


def test_windowed_einsum_permutes_count_as_the_gather_or_scatter_they_implement():
    # A permute that neither runs in such a loop nor feeds or follows one stays a permute.
    want = expect(ici={"all-gather": (1 + 3, 4 * 64), "reduce-scatter": (3 + 1, 4 * 64), "collective-permute": (1, 64)},
                  synchronous=False)
    # Synchronous: the loop's last partial sum sent after it, and the other permute; not those in the loops.
    want["sync"]["ici"] |= {"reduce-scatter": 64, "collective-permute": 64}
    assert hlo.collective_bytes(WINDOWED, ONE_SLICE) == want


def test_matmul_flops_of_a_dot_in_a_scanned_loop():
    """x [8,16] times each of 5 stacked [16,16] weights in a scan (a while loop), then by [16,4]:
    2 x 8 x 16 x 16 FLOPs per step, 2 x 8 x 4 x 16 after."""

    def f(x, ws, v):
        x, _ = jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)
        return x @ v

    args = jnp.ones((8, 16)), jnp.ones((5, 16, 16)), jnp.ones((16, 4))
    text = jax.jit(f).lower(*args).compile().as_text()
    assert re.search(r"\bwhile\(", text) and re.search(r"\bdot\(", text)
    assert hlo.matmul_flops(text) == 5 * 2 * 8 * 16 * 16 + 2 * 8 * 4 * 16


def test_matmul_flops_of_convolutions_and_batched_dots():
    text = module("""%body (s: (s32[], f32[2,3,5], f32[2,5,7])) -> (s32[], f32[2,3,5], f32[2,5,7]) {
  %s = (s32[], f32[2,3,5]{2,1,0}, f32[2,5,7]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %a = f32[2,3,5]{2,1,0} get-tuple-element(%s), index=1
  %b = f32[2,5,7]{2,1,0} get-tuple-element(%s), index=2
  %d = f32[2,3,7]{2,1,0} dot(%a, %b), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, \
rhs_contracting_dims={1}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[2,3,5]{2,1,0}, f32[2,5,7]{2,1,0}) tuple(%next, %a, %b)
}""", """%cond (s: (s32[], f32[2,3,5], f32[2,5,7])) -> pred[] {
  %s = (s32[], f32[2,3,5]{2,1,0}, f32[2,5,7]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}""", """%fused_conv (p0: f32[1,10,8], p1: f32[3,4,6]) -> f32[1,8,6] {
  %p0 = f32[1,10,8]{2,1,0} parameter(0)
  %p1 = f32[3,4,6]{2,1,0} parameter(1)
  ROOT %conv = f32[1,8,6]{2,1,0} convolution(%p0, %p1), window={size=3}, dim_labels=b0f_0io->b0f, \
feature_group_count=2
}""", """ENTRY %main (a: f32[2,3,5], b: f32[2,5,7], x: f32[1,10,8], k: f32[3,4,6], h: f32[2,1,6], w: f32[3,6,4]) \
-> f32[2,3,4] {
  %a = f32[2,3,5]{2,1,0} parameter(0)
  %b = f32[2,5,7]{2,1,0} parameter(1)
  %x = f32[1,10,8]{2,1,0} parameter(2)
  %k = f32[3,4,6]{2,1,0} parameter(3)
  %h = f32[2,1,6]{2,1,0} parameter(4)
  %w = f32[3,6,4]{2,1,0} parameter(5)
  %zero = s32[] constant(0)
  %init = (s32[], f32[2,3,5]{2,1,0}, f32[2,5,7]{2,1,0}) tuple(%zero, %a, %b)
  %loop = (s32[], f32[2,3,5]{2,1,0}, f32[2,5,7]{2,1,0}) while(%init), condition=%cond, body=%body
  %grouped = f32[1,8,6]{2,1,0} fusion(%x, %k), kind=kOutput, calls=%fused_conv
  %strided = f32[1,5,6]{2,1,0} convolution(%x, %k), window={size=3 stride=2 pad=1_1}, dim_labels=b0f_0io->b0f, \
feature_group_count=2
  ROOT %padded = f32[2,3,4]{2,1,0} convolution(%h, %w), window={size=3 pad=2_2 rhs_reversal=1}, \
dim_labels=b0f_0io->b0f
}""")
    dot = 4 * 2 * (2 * 3 * 7) * 5  # 4 loop steps; each output sums over the contracting 5
    # 8 input features in 2 groups: each output sums 4 features x 3 taps ...
    grouped = 2 * (1 * 8 * 6) * 4 * 3
    # ... and with stride 2 and padding 1, the 5 outputs x 3 taps hold 14 pairs on input (the first misses 1).
    strided = 2 * (1 * 6) * 4 * 14
    # The TPU's matmul as a convolution: the kernel's 3 positions slide over one input position padded by
    # 2 on each side, so each output meets input at one tap only: 6 products, not 18.
    padded = 2 * (2 * 3 * 4) * 6
    assert hlo.matmul_flops(text) == dot + grouped + strided + padded


def test_sparsecore_computations_and_tuple_element_operands():
    """Newer TPU HLO ends some computations with `}, execution_thread=...` and may name a tuple's element
    as an operand, `%t#1`: here a reduce-scatter of that element, f32[8,16] (512 B)."""
    text = module(ADD, """%offloaded (x: f32[4]) -> f32[4] {
  ROOT %x = f32[4]{0} parameter(0)
}, execution_thread="sparsecore\"""", """ENTRY %main (p: f32[4], q: f32[8,16]) -> f32[2,16] {
  %p = f32[4]{0} parameter(0)
  %q = f32[8,16]{1,0} parameter(1)
  %t = (f32[4]{0}, f32[8,16]{1,0}) tuple(%p, %q)
  %s = ((f32[4]{0}), f32[4]{0}, u32[]) async-start(%t#0), async_execution_thread="sparsecore", calls=%offloaded
  %d = f32[4]{0} async-done(%s)
  ROOT %rs = f32[2,16]{1,0} reduce-scatter(%t#1), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, \
to_apply=%add
}""")
    assert hlo.collective_bytes(text, ONE_SLICE) == expect(ici={"reduce-scatter": (1, 512)})


# One loop of 3 steps. Per step: a fusion that slices one [8,16] f32 row block (512 B) out of a stacked
# f32[32,8,16] and adds another (512 B) with the step index (4 B), writing 512 B: 1540 B; a fused dot
# [8,16] x [16,4] (2 x 8 x 4 x 16 FLOPs; 512 + 256 B in, 128 B out); an in-place update of one block
# of the stacked array (512 B in, the index 4 B, 512 B written: 1028 B); an offload of one block to
# host memory and a fetch of one back (512 B in HBM and 512 B in host memory each); an add of two
# arrays held in on-chip memory S(1) (no HBM traffic); a synchronous all-reduce of f32[8] (32 B); an
# all-gather started and done (f32[64], 256 B) beside the rest.
OPS = module(ADD, """%sliced (p0: f32[32,8,16], p1: s32[], p2: f32[8,16]) -> f32[8,16] {
  %p0 = f32[32,8,16]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,8,16]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,8,16}
  %r = f32[8,16]{1,0} bitcast(%ds)
  %p2 = f32[8,16]{1,0} parameter(2)
  ROOT %add = f32[8,16]{1,0} add(%r, %p2)
}""", """%matmul (a: f32[8,16], b: f32[16,4]) -> f32[8,4] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,4]{1,0} parameter(1)
  ROOT %d = f32[8,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}""", """%update (p0: f32[32,8,16], p1: f32[1,8,16], p2: s32[]) -> f32[32,8,16] {
  %p0 = f32[32,8,16]{2,1,0} parameter(0)
  %p1 = f32[1,8,16]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[32,8,16]{2,1,0} dynamic-update-slice(%p0, %p1, %p2, %z, %z)
}""", """%cond (s: (s32[], f32[32,8,16], f32[8,16])) -> pred[] {
  %s = (s32[], f32[32,8,16]{2,1,0}, f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}""", """%body (s: (s32[], f32[32,8,16], f32[8,16])) -> (s32[], f32[32,8,16], f32[8,16]) {
  %s = (s32[], f32[32,8,16]{2,1,0}, f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %stack = f32[32,8,16]{2,1,0} get-tuple-element(%s), index=1
  %x = f32[8,16]{1,0} get-tuple-element(%s), index=2
  %y = f32[8,16]{1,0} fusion(%stack, %i, %x), kind=kLoop, calls=%sliced
  %w = f32[16,4]{1,0} constant({...})
  %m = f32[8,4]{1,0} fusion(%y, %w), kind=kOutput, calls=%matmul
  %block = f32[1,8,16]{2,1,0} bitcast(%y)
  %stack2 = f32[32,8,16]{2,1,0} fusion(%stack, %block, %i), kind=kLoop, calls=%update
  %host = f32[32,8,16]{2,1,0:S(5)} custom-call(), custom_call_target="AllocateBuffer"
  %z = s32[] constant(0)
  %off = ((f32[32,8,16]{2,1,0:S(5)}, f32[1,8,16]{2,1,0}, s32[], s32[], s32[]), f32[32,8,16]{2,1,0:S(5)}, u32[]) \
dynamic-update-slice-start(%host, %block, %i, %z, %z)
  %offd = f32[32,8,16]{2,1,0:S(5)} dynamic-update-slice-done(%off)
  %back = ((f32[32,8,16]{2,1,0:S(5)}, s32[], s32[], s32[]), f32[1,8,16]{2,1,0}, u32[]) \
dynamic-slice-start(%offd, %i, %z, %z), dynamic_slice_sizes={1,8,16}
  %backd = f32[1,8,16]{2,1,0} dynamic-slice-done(%back)
  %v1 = f32[8,16]{1,0:S(1)} copy(%x)
  %v2 = f32[8,16]{1,0:S(1)} add(%v1, %v1)
  %r = f32[8]{0} slice(%x), slice={[0:1], [0:8]}
  %ar = f32[8]{0} all-reduce(%r), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %ags = (f32[8]{0}, f32[64]{0}) all-gather-start(%ar), channel_id=2, replica_groups={}, dimensions={0}
  %agd = f32[64]{0} all-gather-done(%ags)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[32,8,16]{2,1,0}, f32[8,16]{1,0}) tuple(%next, %stack2, %y)
}""", """ENTRY %main (p: f32[32,8,16], q: f32[8,16]) -> f32[8,16] {
  %p = f32[32,8,16]{2,1,0} parameter(0)
  %q = f32[8,16]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[32,8,16]{2,1,0}, f32[8,16]{1,0}) tuple(%zero, %p, %q)
  %loop = (s32[], f32[32,8,16]{2,1,0}, f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, \
backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=2
}""")


# Per loop step (name: FLOPs, HBM bytes, host bytes); offloads and fetches read their 3 indices
# (12 B), a slice of f32[8,16] reads only its 32 B; the loop's condition (its compare of two s32
# into a pred, 9 B) runs 4 times.
OPS_PER_STEP = {
    "y": (0, 1540, 0), "m": (2 * 8 * 4 * 16, 512 + 256 + 128, 0), "stack2": (0, 1028, 0),
    "off": (0, 524, 512), "back": (0, 524, 512), "r": (0, 64, 0), "v1": (0, 512, 0), "v2": (0, 0, 0),
    "next": (0, 12, 0),
}


def test_op_costs_count_what_each_op_reads_and_writes():
    expected = {name: hlo.OpCost(*(3 * x for x in figures)) for name, figures in OPS_PER_STEP.items()}
    assert hlo.op_costs(OPS) == expected | {"lt": hlo.OpCost(0, 4 * 9, 0)}


def test_forecast_overlaps_async_collectives_and_offloading_with_compute():
    """Round figures: 1,000 FLOP/s, 100 B/s of HBM, 10 B/s per ICI link (2 torus dimensions: 20 B/s),
    50 B/s to host memory; everything sustained at half its peak (500 FLOP/s, 50 B/s of HBM)."""
    kind = dataclasses.replace(kinds.KINDS["v5e"], peak_bf16_flops=1000.0, hbm_bytes_per_s=100.0,
                               ici_link_bytes_per_s=10.0, host_bytes_per_s=50.0)
    f = forecast.forecast(OPS, ONE_SLICE, kind, attention_flops=300.0, sustained=0.5)
    # Every op is HBM-bound at these rates, the fused dot too (1,024 FLOPs take 2 s, its 896 B 18 s).
    assert f.memory_s == pytest.approx((3 * sum(b for _, b, _ in OPS_PER_STEP.values()) + 4 * 9) / 50)
    assert f.matmul_s == pytest.approx(300 / 500)  # splash's FLOPs
    assert f.compute_s == pytest.approx(f.matmul_s + f.memory_s)
    assert f.sync_s == pytest.approx(3 * 2 * 32 / 20)  # the all-reduce's 32 B cross the links twice
    assert f.ici_s == pytest.approx(3 * 256 / 20)
    assert f.host_s == pytest.approx(3 * 1024 / 50)
    assert f.step_s == pytest.approx(f.compute_s + f.sync_s)
    assert f.bound_by == "compute"
    # With ICI a hundred times slower, the all-gather outlasts the compute it overlaps.
    slow = forecast.forecast(OPS, ONE_SLICE, dataclasses.replace(kind, ici_link_bytes_per_s=0.1), 300.0, 0.5)
    assert slow.bound_by == "ICI" and slow.step_s == pytest.approx(3 * 256 / 0.2 + 3 * 2 * 32 / 0.2)


def test_a_slice_taken_in_a_nested_fusion_reads_only_the_slice():
    """A layer's slice of a stacked f32[32,8,16] (saved inputs, weights) taken by a fusion nested in
    the op's fusion: the op reads 512 B of it, not the 16 KiB stack; the other operand (512 B) and the
    result (512 B) whole."""
    text = module("""%take (p0: f32[32,8,16], p1: s32[]) -> f32[8,16] {
  %p0 = f32[32,8,16]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,8,16]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,8,16}
  ROOT %r = f32[8,16]{1,0} bitcast(%ds)
}""", """%outer (q0: f32[32,8,16], q1: s32[], q2: f32[8,16]) -> f32[8,16] {
  %q0 = f32[32,8,16]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %q2 = f32[8,16]{1,0} parameter(2)
  %layer = f32[8,16]{1,0} fusion(%q0, %q1), kind=kLoop, calls=%take
  ROOT %sum = f32[8,16]{1,0} add(%layer, %q2)
}""", """ENTRY %main (p: f32[32,8,16], i: s32[], x: f32[8,16]) -> f32[8,16] {
  %p = f32[32,8,16]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %x = f32[8,16]{1,0} parameter(2)
  ROOT %y = f32[8,16]{1,0} fusion(%p, %i, %x), kind=kLoop, calls=%outer
}""")
    assert hlo.op_costs(text) == {"y": hlo.OpCost(0, 512 + 4 + 512 + 512, 0)}
