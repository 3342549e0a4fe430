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

  public static native long deepep4j_handle_num_tokens(Handle h);
  public static native long deepep4j_handle_num_recv_tokens(Handle h);
  public static native int deepep4j_handle_num_topk(Handle h);
  public static native long deepep4j_handle_hidden(Handle h);
  public static native int deepep4j_handle_num_experts(Handle h);
  public static native int deepep4j_handle_recv_counts_per_rank(Handle h, @Cast("int32_t*") IntPointer out);
  public static native int deepep4j_handle_destroy(Handle h);

  /** Forces the class (and so the JNI library) to load; throws {@link UnsatisfiedLinkError} with a clear message. */
  public static void ensureLoaded() {}
}
