"""The kernel census of compiled programs, on hand-written optimised HLO of both platforms, and
libtpu's out-of-memory refusals read as plans."""

from jax_adapter.plan.census import census

GPU = r'''HloModule jit_f, entry_computation_layout={(f32[8,16]{1,0})->f32[8,16]{1,0}}

%fused_gather (p0: f32[8,16], p1: s32[8,1]) -> f32[8,16] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = s32[8,1]{1,0} parameter(1)
  ROOT %gather.1 = f32[8,16]{1,0} gather(%p0, %p1), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,16}
}

%body (arg: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %arg = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%arg), index=1
  %mm = (f32[8,16]{1,0}, s8[4]{0}) custom-call(%x, %x), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(f)/dot_general"}
  %y = f32[8,16]{1,0} get-tuple-element(%mm), index=0
  %k = f32[8,16]{1,0} custom-call(%y), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/jvp(msda_forward)/pallas_call"}
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %k)
}

%cond (arg.1: (s32[], f32[8,16])) -> pred[] {
  %arg.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%arg.1), index=0
  %c = s32[] constant(3)
  ROOT %lt = pred[] compare(%i.1, %c), direction=LT
}

ENTRY %main (x.1: f32[8,16]) -> f32[8,16] {
  %x.1 = f32[8,16]{1,0} parameter(0)
  %idx = s32[8,1]{1,0} constant({...})
  %g = f32[8,16]{1,0} fusion(%x.1, %idx), kind=kLoop, calls=%fused_gather
  %att = (f32[8,16]{1,0}, u8[0]{0}) custom-call(%g, %g, %g), custom_call_target="__cudnn$fmhaSoftmax"
  %a = f32[8,16]{1,0} get-tuple-element(%att), index=0
  %z = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%z, %a)
  %w = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %out = f32[8,16]{1,0} get-tuple-element(%w), index=1
  %conv = (f32[8,16]{1,0}, u8[0]{0}) custom-call(%out, %out), custom_call_target="__cudnn$convForward"
  %s = f32[8,16]{1,0} scatter(%x.1, %idx, %out), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%cond
  %ar = f32[8,16]{1,0} all-reduce(%s), replica_groups={}, to_apply=%cond
  ROOT %r = f32[8,16]{1,0} copy(%ar)
}
'''

TPU = r'''HloModule jit_core

ENTRY %main.1 (a.1: bf16[1024,2048], b.1: bf16[2048,1024]) -> bf16[1024,1024] {
  %a.1 = bf16[1024,2048]{1,0:T(8,128)(2,1)} parameter(0)
  %b.1 = bf16[2048,1024]{1,0:T(8,128)(2,1)} parameter(1)
  %cs = (bf16[1024,2048]{1,0:T(8,128)(2,1)}, u32[]) copy-start(%a.1)
  %cd = bf16[1024,2048]{1,0:T(8,128)(2,1)} copy-done(%cs)
  ROOT %k.1 = bf16[1024,1024]{1,0:T(8,128)(2,1)} custom-call(%cd, %b.1), custom_call_target="tpu_custom_call", metadata={op_name="jit(core)/msda_tpu_forward/pallas_call"}
}
'''


def test_gpu_program():
    c = census(GPU)
    # the loop body's two launches, the fused gather, cuDNN attention and conv, the loop's
    # compare, the scatter, the all-reduce and the copy
    assert c["families"] == {"collective": 1, "cublas": 1, "cudnn_attention": 1, "cudnn_conv": 1,
                             "pallas_triton": 1, "xla_fusion": 1, "xla_other": 3}
    assert c["kernels"] == 9
    assert c["pallas_kernels"] == {"msda_forward": 1}
    assert c["gathers"] == {"standalone": 0, "fused": 1}
    assert c["scatters"] == {"standalone": 1, "fused": 0}
    assert c["loops"] == [3]


def test_tpu_program():
    c = census(TPU)
    assert c["families"] == {"async_start": 1, "mosaic": 1}
    assert c["kernels"] == 1  # the DMA is not a kernel
    assert c["pallas_kernels"] == {"msda_tpu_forward": 1}
    assert c["gathers"] == {"standalone": 0, "fused": 0} and c["loops"] == []


def test_empty_text():
    assert census("")["kernels"] == 0


def test_libtpu_out_of_memory_refusals_are_read():
    from jax_adapter.plan.programs import out_of_memory

    m = out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                      "temporaries (16.94G) exceeds available HBM (15.75G).")
    assert m["peak"] == m["temporaries"] == int(16.94 * (1 << 30)) and "temporaries" in m["reported_by"]
    m = out_of_memory("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
                      "hbm. Used 20.51G of 15.75G hbm. Exceeded hbm capacity by 4.76G.")
    assert m["peak"] == int(20.51 * (1 << 30)) and m["temporaries"] is None
    # VMEM (a kernel's block) and anything else are errors, not plans
    assert out_of_memory("Ran out of memory in memory space vmem. Used 256.00M of 128.00M vmem.") is None
    assert out_of_memory("INTERNAL: something else") is None
