package org.deepep4j;

import java.time.Duration;
import java.util.Arrays;
import org.bytedeco.javacpp.IntPointer;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.javacpp.PointerPointer;
import org.deepep4j.natives.DeepEp4jNative;
import org.deepep4j.natives.DeepEp4jNative.Buffer;
import org.deepep4j.natives.DeepEp4jNative.CombineArgs;
import org.deepep4j.natives.DeepEp4jNative.DispatchArgs;
import org.deepep4j.natives.DeepEp4jNative.Handle;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/**
 * Per-call cost of the Java API + JNI for a tiny step (1 rank, 4 tokens, hidden 16, top-2 of 4 experts), where the
 * engine's own work is negligible. Warm-up, then 7 timed rounds; prints the median and the best round in us/call.
 * "prepareDispatch + dispatchPrepared(outputs given)" minus "native only: notify + dispatch + destroy" is the
 * Java + JNI overhead; the other API rows add ND4J's allocation of the output arrays.
 * Run: MAVEN_OPTS=-Dorg.bytedeco.javacpp.maxphysicalbytes=0 mvn -o -q -pl nd4j-deepep-ops test-compile exec:java -Dexec.classpathScope=test
 *      -Dexec.mainClass=org.deepep4j.DispatchOverheadBenchmark
 */
public final class DispatchOverheadBenchmark {
  interface Step {
    void run();
  }

  static void measure(String name, int calls, Step s) {
    for (int i = 0; i < calls * 2; ++i) s.run();
    double[] us = new double[7];
    for (int r = 0; r < us.length; ++r) {
      long t0 = System.nanoTime();
      for (int i = 0; i < calls; ++i) s.run();
      us[r] = (System.nanoTime() - t0) / 1e3 / calls;
    }
    Arrays.sort(us);
    System.out.printf("%-52s median %7.2f us/call   best %7.2f us/call%n", name, us[us.length / 2], us[0]);
  }

  public static void main(String[] args) {
    int calls = args.length > 0 ? Integer.parseInt(args[0]) : 20000;
    EpConfig cfg = EpConfig.builder().bufferSizeGb(1.0 / 64).numSms(2).threads(Integer.getInteger("threads", 0)).timeout(Duration.ofSeconds(10)).build();
    try (EpGroup group = EpGroup.inProcess(1); EpBuffer buf = group.buffer(0, cfg)) {
      INDArray x = Nd4j.rand(DataType.FLOAT, 4, 16);
      INDArray idx = Nd4j.createFromArray(new long[][] {{0, 1}, {2, 3}, {1, -1}, {3, 0}});
      INDArray w = Nd4j.rand(DataType.FLOAT, 4, 2);
      measure("JNI baseline (deepep4j_version)", calls, () -> DeepEp4jNative.deepep4j_version());
      measure("ND4J: Nd4j.createUninitialized(FLOAT, 4, 16)", calls, () -> Nd4j.createUninitialized(DataType.FLOAT, 4, 16));
      measure("ND4J: NativeArrays.create(FLOAT, 4, 16)", calls, () -> NativeArrays.create(DataType.FLOAT, 4, 16));
      measure("JavaCPP: new IntPointer(2).close()", calls, () -> new IntPointer(2).close());
      measure("dispatch(x, topkIdx, null, 4) + handle.close", calls, () -> buf.dispatch(x, idx, null, 4).handle().close());
      measure("dispatch(x, topkIdx, w, 4) + handle.close", calls, () -> buf.dispatch(x, idx, w, 4).handle().close());
      EpDispatchResult d = buf.dispatch(x, idx, w, 4);
      INDArray rx = d.recvX().dup(), ri = d.recvTopkIdx().dup();
      measure("prepareDispatch + dispatchPrepared(outputs given)", calls,
          () -> buf.dispatchPrepared(buf.prepareDispatch(x, idx, null, 4), x, null, rx, ri, null).handle().close());
      measure("dispatch(x, cachedHandle)", calls, () -> buf.dispatch(x, d.handle()));
      measure("combine(y, handle)", calls, () -> buf.combine(d.recvX(), d.handle()));
      measure("combine(y, handle, recvTopkWeights)", calls, () -> buf.combine(d.recvX(), d.handle(), d.recvTopkWeights()));
      // The same steps straight through the bindings, outputs preallocated: the engine's own share of the cost.
      Buffer nb = buf.nativeBuffer();
      INDArray recvX = Nd4j.create(DataType.FLOAT, d.handle().numRecvTokens(), 16);
      INDArray recvIdx = Nd4j.create(DataType.LONG, d.handle().numRecvTokens(), 2);
      INDArray out = Nd4j.create(DataType.FLOAT, 4, 16);
      try (PointerPointer<Pointer> h = new PointerPointer<>(1); LongPointer m = new LongPointer(1); IntPointer pe = new IntPointer(4);
           DispatchArgs da = new DispatchArgs(); CombineArgs ca = new CombineArgs()) {
        da.x(NativeArrays.address(x)).recv_x(NativeArrays.address(recvX)).recv_topk_idx(NativeArrays.address(recvIdx));
        ca.y(NativeArrays.address(recvX)).out(NativeArrays.address(out));
        measure("native only: notify + dispatch + destroy", calls, () -> {
          DeepEp4jNative.deepep4j_notify_dispatch(nb, NativeArrays.address(idx), 4, 2, 4, 16, DeepEp4jNative.DEEPEP4J_FLOAT32, h, m, pe, 0L);
          Handle hh = new Handle(h.get(0));
          DeepEp4jNative.deepep4j_dispatch(nb, hh, DeepEp4jNative.DEEPEP4J_FLOAT32, da, 0L);
          DeepEp4jNative.deepep4j_handle_destroy(hh);
        });
        Handle cached = new Handle(d.handle().nativeHandle());
        measure("native only: cached dispatch", calls, () -> DeepEp4jNative.deepep4j_dispatch(nb, cached, DeepEp4jNative.DEEPEP4J_FLOAT32, da, 0L));
        measure("native only: combine", calls, () -> DeepEp4jNative.deepep4j_combine(nb, cached, DeepEp4jNative.DEEPEP4J_FLOAT32, ca, 0L));
      }
      d.handle().close();
    }
  }
}
