package org.deepep4j.natives;

import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.IntPointer;
import org.bytedeco.javacpp.Loader;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.javacpp.PointerPointer;
import org.bytedeco.javacpp.SizeTPointer;
import org.bytedeco.javacpp.annotation.Cast;
import org.bytedeco.javacpp.annotation.Name;
import org.bytedeco.javacpp.annotation.Opaque;
import org.bytedeco.javacpp.annotation.Platform;

/**
 * JavaCPP bindings over {@code deepep4j.h}, the native engine's whole surface. Array arguments are raw addresses
 * ({@code long}) so a call costs no Pointer allocation; the Java API in {@code org.deepep4j} is the supported entry.
 * The JNI glue links libdeepep4j.so, which JavaCPP loads first from the libnd4j-kernels jar (same resource folder).
 */
@Platform(include = "deepep4j.h", link = "deepep4j")
public final class DeepEp4jNative {
  static {
    NativeLoader.load();
  }

  private DeepEp4jNative() {}

  public static final int DEEPEP4J_OK = 0;
  public static final int DEEPEP4J_ERR_INVALID_ARGUMENT = 1;
  public static final int DEEPEP4J_ERR_PEER_MISMATCH = 2;
  public static final int DEEPEP4J_ERR_PEER_ERROR = 3;
  public static final int DEEPEP4J_ERR_TIMEOUT = 4;
  public static final int DEEPEP4J_ERR_OUT_OF_MEMORY = 5;
  public static final int DEEPEP4J_ERR_UNAVAILABLE = 6;
  public static final int DEEPEP4J_ERR_STATE = 7;
  public static final int DEEPEP4J_ERR_INTERNAL = 8;

  public static final int DEEPEP4J_FLOAT32 = 0;
  public static final int DEEPEP4J_BFLOAT16 = 1;
  public static final int DEEPEP4J_FLOAT16 = 2;
  public static final int DEEPEP4J_FP8_E4M3 = 3;

  public static final int DEEPEP4J_DEVICE_CPU = 0;
  public static final int DEEPEP4J_DEVICE_CUDA = 1;
  public static final int DEEPEP4J_BACKEND_DEEPEP = 0;
  public static final int DEEPEP4J_BACKEND_ALLTOALL = 1;
  public static final int DEEPEP4J_CUDA_TRANSFER_AUTO = 0;
  public static final int DEEPEP4J_CUDA_TRANSFER_SM = 1;
  public static final int DEEPEP4J_CUDA_TRANSFER_COPY_ENGINE = 2;
  public static final int DEEPEP4J_MAX_BLOB_BYTES = 512;
  public static final int DEEPEP4J_MAX_TOPK = 32;

  @Opaque @Name("deepep4j_buffer")
  public static class Buffer extends Pointer {
    public Buffer() { super((Pointer) null); }
    public Buffer(Pointer p) { super(p); }
  }

  @Opaque @Name("deepep4j_handle")
  public static class Handle extends Pointer {
    public Handle() { super((Pointer) null); }
    public Handle(Pointer p) { super(p); }
  }

  @Name("deepep4j_config")
  public static class Config extends Pointer {
    static { NativeLoader.load(); }
    public Config() { allocate(); }
    private native void allocate();
    public native long buffer_bytes(); public native Config buffer_bytes(long v);
    public native int num_sms(); public native Config num_sms(int v);
    public native int max_send_tokens_per_chunk(); public native Config max_send_tokens_per_chunk(int v);
    public native int ring_tokens(); public native Config ring_tokens(int v);
    public native int timeout_ms(); public native Config timeout_ms(int v);
    public native int device(); public native Config device(int v);
    public native int device_id(); public native Config device_id(int v);
    public native int backend(); public native Config backend(int v);
    public native int num_threads(); public native Config num_threads(int v);
    public native int max_hidden_bytes(); public native Config max_hidden_bytes(int v);
    public native int cuda_transfer(); public native Config cuda_transfer(int v);
    public native int ce_chunks(); public native Config ce_chunks(int v);
    public native int cuda_trace(); public native Config cuda_trace(int v);
    public native int cpu_direct(); public native Config cpu_direct(int v);
    public native int stream_ordered(); public native Config stream_ordered(int v);
    public native int host_copy_threads(); public native Config host_copy_threads(int v);
  }

  @Name("deepep4j_dispatch_args")
  public static class DispatchArgs extends Pointer {
    static { NativeLoader.load(); }
    public DispatchArgs() { allocate(); }
    private native void allocate();
    public native @Cast("const void*") long x();
    public native DispatchArgs x(@Cast("const void*") long v);
    public native @Cast("const float*") long x_scales();
    public native DispatchArgs x_scales(@Cast("const float*") long v);
    public native @Cast("const float*") long topk_weights();
    public native DispatchArgs topk_weights(@Cast("const float*") long v);
    public native @Cast("void*") long recv_x();
    public native DispatchArgs recv_x(@Cast("void*") long v);
    public native @Cast("float*") long recv_x_scales();
    public native DispatchArgs recv_x_scales(@Cast("float*") long v);
    public native @Cast("int64_t*") long recv_topk_idx();
    public native DispatchArgs recv_topk_idx(@Cast("int64_t*") long v);
    public native @Cast("float*") long recv_topk_weights();
    public native DispatchArgs recv_topk_weights(@Cast("float*") long v);
    public native @Cast("int64_t*") long recv_src_token();
    public native DispatchArgs recv_src_token(@Cast("int64_t*") long v);
    public native @Cast("int32_t*") long recv_src_rank();
    public native DispatchArgs recv_src_rank(@Cast("int32_t*") long v);
  }

  @Name("deepep4j_combine_args")
  public static class CombineArgs extends Pointer {
    static { NativeLoader.load(); }
    public CombineArgs() { allocate(); }
    private native void allocate();
    public native @Cast("const void*") long y();
    public native CombineArgs y(@Cast("const void*") long v);
    public native @Cast("const float*") long recv_topk_weights();
    public native CombineArgs recv_topk_weights(@Cast("const float*") long v);
    public native @Cast("const float*") long y_topk_weights();
    public native CombineArgs y_topk_weights(@Cast("const float*") long v);
    public native @Cast("void*") long out();
    public native CombineArgs out(@Cast("void*") long v);
    public native @Cast("float*") long out_topk_weights();
    public native CombineArgs out_topk_weights(@Cast("float*") long v);
  }

  public static native @Cast("const char*") BytePointer deepep4j_last_error();
  public static native @Cast("const char*") BytePointer deepep4j_status_name(int status);
  public static native @Cast("const char*") BytePointer deepep4j_version();
  public static native int deepep4j_cuda_available();
  public static native int deepep4j_cuda_device_count();

  public static native void deepep4j_config_init(Config config);
  public static native int deepep4j_buffer_size_hint(long hidden, int dtype, int numRanks, Config config,
                                                     @Cast("int64_t*") LongPointer outBytes);

  public static native int deepep4j_buffer_create(int rank, int numRanks, Config config,
                                                  @Cast("deepep4j_buffer**") PointerPointer out);
  public static native int deepep4j_buffer_export(Buffer buf, Pointer blob, @Cast("size_t") long capacity,
                                                  SizeTPointer len);
  public static native int deepep4j_buffer_connect(Buffer buf, @Cast("const void* const*") PointerPointer blobs,
                                                   @Cast("const size_t*") SizeTPointer lens);
  public static native int deepep4j_buffer_destroy(Buffer buf);

  public static native int deepep4j_get_dispatch_layout(Buffer buf, @Cast("const int64_t*") long topkIdx,
                                                        long numTokens, int numTopk, int numExperts,
                                                        @Cast("int32_t*") long perRank, @Cast("int32_t*") long perExpert,
                                                        @Cast("uint8_t*") long inRank, @Cast("void*") long stream);

  public static native int deepep4j_notify_dispatch(Buffer buf, @Cast("const int64_t*") long topkIdx, long numTokens,
                                                    int numTopk, int numExperts, long hidden, int dtype,
                                                    @Cast("deepep4j_handle**") PointerPointer outHandle,
                                                    @Cast("int64_t*") LongPointer numRecv,
                                                    @Cast("int32_t*") IntPointer perLocalExpert,
                                                    @Cast("void*") long stream);
  public static native int deepep4j_dispatch(Buffer buf, Handle handle, int dtype, DispatchArgs args,
                                             @Cast("void*") long stream);
  public static native int deepep4j_combine(Buffer buf, Handle handle, int dtype, CombineArgs args,
                                            @Cast("void*") long stream);

  public static native int deepep4j_fail_step(Buffer buf, int status, String message);
  public static native int deepep4j_buffer_sync(Buffer buf, @Cast("void*") long stream);

  public static native long deepep4j_handle_num_tokens(Handle h);
  public static native long deepep4j_handle_num_recv_tokens(Handle h);
  public static native int deepep4j_handle_num_topk(Handle h);
  public static native long deepep4j_handle_hidden(Handle h);
  public static native int deepep4j_handle_num_experts(Handle h);
  public static native int deepep4j_handle_recv_counts_per_rank(Handle h, @Cast("int32_t*") IntPointer out);
  public static native int deepep4j_handle_destroy(Handle h);

  // ------------------------------------------------------------------------------------------- queues
  @Opaque @Name("deepep4j_queue")
  public static class Queue extends Pointer {
    public Queue() { super((Pointer) null); }
    public Queue(Pointer p) { super(p); }
  }

  public static native int deepep4j_queue_create(Buffer buf, @Cast("deepep4j_queue**") PointerPointer out);
  public static native int deepep4j_queue_destroy(Queue q);
  public static native @Cast("intptr_t") long deepep4j_queue_stream(Queue q);
  public static native int deepep4j_device_alloc(Queue q, long bytes, @Cast("void**") LongPointer out);
  public static native int deepep4j_device_free(Queue q, @Cast("void*") long device);
  public static native int deepep4j_copy_to_device(Queue q, @Cast("void*") long device, @Cast("const void*") long host,
                                                   long bytes);
  public static native int deepep4j_copy_to_host(Queue q, @Cast("void*") long host, @Cast("const void*") long device,
                                                 long bytes);
  public static native int deepep4j_queue_synchronize(Queue q);

  // ------------------------------------------------------------------------------------------- MoE block
  public static final int DEEPEP4J_FLOAT64 = 4;
  public static final int DEEPEP4J_SCORE_SOFTMAX = 0;
  public static final int DEEPEP4J_SCORE_SIGMOID = 1;
  public static final int DEEPEP4J_MOE_GEMM_AUTO = 0;
  public static final int DEEPEP4J_MOE_GEMM_GROUPED = 1;
  public static final int DEEPEP4J_MOE_GEMM_LOOP = 2;
  public static final int DEEPEP4J_MOE_PARAMS = 0;
  public static final int DEEPEP4J_MOE_GRADS = 1;
  public static final int DEEPEP4J_MOE_STATE_M = 2;
  public static final int DEEPEP4J_MOE_STATE_V = 3;
  public static final int DEEPEP4J_MEMORY_DEVICE = 0;
  public static final int DEEPEP4J_MEMORY_HOST = 1;
  public static final int DEEPEP4J_OPT_SGD = 0;
  public static final int DEEPEP4J_OPT_ADAM = 1;
  public static final int DEEPEP4J_OPT_ADAMW = 2;

  @Opaque @Name("deepep4j_moe")
  public static class Moe extends Pointer {
    public Moe() { super((Pointer) null); }
    public Moe(Pointer p) { super(p); }
  }

  @Name("deepep4j_moe_config")
  public static class MoeConfig extends Pointer {
    static { NativeLoader.load(); }
    public MoeConfig() { allocate(); }
    private native void allocate();
    public native long hidden(); public native MoeConfig hidden(long v);
    public native long ffn(); public native MoeConfig ffn(long v);
    public native int num_experts(); public native MoeConfig num_experts(int v);
    public native int num_topk(); public native MoeConfig num_topk(int v);
    public native int dtype(); public native MoeConfig dtype(int v);
    public native int score_function(); public native MoeConfig score_function(int v);
    public native int normalize_topk(); public native MoeConfig normalize_topk(int v);
    public native int gemm(); public native MoeConfig gemm(int v);
    public native double aux_loss_coef(); public native MoeConfig aux_loss_coef(double v);
    public native long max_tokens(); public native MoeConfig max_tokens(long v);
  }

  @Name("deepep4j_moe_forward_args")
  public static class MoeForwardArgs extends Pointer {
    static { NativeLoader.load(); }
    public MoeForwardArgs() { allocate(); }
    private native void allocate();
    public native int memory(); public native MoeForwardArgs memory(int v);
    public native @Cast("const void*") long x(); public native MoeForwardArgs x(@Cast("const void*") long v);
    public native @Cast("const void*") long router_weight();
    public native MoeForwardArgs router_weight(@Cast("const void*") long v);
    public native @Cast("const float*") long router_bias();
    public native MoeForwardArgs router_bias(@Cast("const float*") long v);
    public native @Cast("const int64_t*") long replay_topk_idx();
    public native MoeForwardArgs replay_topk_idx(@Cast("const int64_t*") long v);
    public native @Cast("void*") long y(); public native MoeForwardArgs y(@Cast("void*") long v);
    public native @Cast("int64_t*") long topk_idx(); public native MoeForwardArgs topk_idx(@Cast("int64_t*") long v);
    public native @Cast("float*") long topk_weights(); public native MoeForwardArgs topk_weights(@Cast("float*") long v);
    public native int async_combine(); public native MoeForwardArgs async_combine(int v);
    public native @Cast("int32_t*") long expert_load(); public native MoeForwardArgs expert_load(@Cast("int32_t*") long v);
    public native @Cast("int32_t*") long recv_per_local_expert();
    public native MoeForwardArgs recv_per_local_expert(@Cast("int32_t*") long v);
    public native @Cast("double*") long aux_loss(); public native MoeForwardArgs aux_loss(@Cast("double*") long v);
  }

  @Name("deepep4j_moe_backward_args")
  public static class MoeBackwardArgs extends Pointer {
    static { NativeLoader.load(); }
    public MoeBackwardArgs() { allocate(); }
    private native void allocate();
    public native int memory(); public native MoeBackwardArgs memory(int v);
    public native @Cast("const void*") long grad_y(); public native MoeBackwardArgs grad_y(@Cast("const void*") long v);
    public native @Cast("void*") long grad_x(); public native MoeBackwardArgs grad_x(@Cast("void*") long v);
    public native @Cast("void*") long grad_router_weight();
    public native MoeBackwardArgs grad_router_weight(@Cast("void*") long v);
    public native double aux_loss_scale(); public native MoeBackwardArgs aux_loss_scale(double v);
    public native int accumulate(); public native MoeBackwardArgs accumulate(int v);
  }

  @Name("deepep4j_optimizer")
  public static class Optimizer extends Pointer {
    static { NativeLoader.load(); }
    public Optimizer() { allocate(); }
    private native void allocate();
    public native int kind(); public native Optimizer kind(int v);
    public native double learning_rate(); public native Optimizer learning_rate(double v);
    public native double beta1(); public native Optimizer beta1(double v);
    public native double beta2(); public native Optimizer beta2(double v);
    public native double epsilon(); public native Optimizer epsilon(double v);
    public native double weight_decay(); public native Optimizer weight_decay(double v);
    public native long iteration(); public native Optimizer iteration(long v);
    public native double grad_scale(); public native Optimizer grad_scale(double v);
  }

  public static native void deepep4j_moe_config_init(MoeConfig config);
  public static native int deepep4j_moe_create(Buffer buf, MoeConfig config, @Cast("deepep4j_moe**") PointerPointer out);
  public static native int deepep4j_moe_destroy(Moe moe);
  public static native int deepep4j_moe_read(Moe moe, int tensor, int hostDtype, @Cast("void*") long host, long count);
  public static native int deepep4j_moe_write(Moe moe, int tensor, int hostDtype, @Cast("const void*") long host,
                                              long count);
  public static native int deepep4j_moe_forward(Moe moe, long numTokens, MoeForwardArgs args, @Cast("void*") long stream);
  public static native int deepep4j_moe_wait(Moe moe);
  public static native int deepep4j_moe_backward(Moe moe, MoeBackwardArgs args, @Cast("void*") long stream);
  @Name("deepep4j_moe_staging")
  public static class MoeStaging extends Pointer {
    static { NativeLoader.load(); }
    public MoeStaging() { allocate(); }
    private native void allocate();
    public native long bytes_in(); public native MoeStaging bytes_in(long v);
    public native long bytes_out(); public native MoeStaging bytes_out(long v);
    public native long host_copy_ns(); public native MoeStaging host_copy_ns(long v);
  }

  public static native int deepep4j_moe_staging_stats(Moe moe, MoeStaging out);
  public static native void deepep4j_optimizer_init(Optimizer opt, int kind);
  public static native int deepep4j_moe_step(Moe moe, Optimizer opt, @Cast("void*") long stream);

  /** Forces the class (and so the JNI library) to load; throws {@link UnsatisfiedLinkError} with a clear message. */
  public static void ensureLoaded() {}
}
