package org.deepep4j;

import java.time.Duration;
import java.util.Arrays;
import java.util.Locale;
import java.util.Random;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/**
 * What host arrays cost on a CUDA buffer: one dispatch (with weights) + weighted combine per step, with ND4J host
 * arrays (staged through pinned memory by EpBuffer) into fresh outputs and into outputs reused every step, and with
 * EpDeviceArrays (nothing crosses), same data, in-process ranks (rank r on GPU r mod count). Prints the median step
 * of rank 0 for each form, the staging share (1 - device / host) and the bytes that cross per rank and step.
 * Usage: {@code StagingBenchmark hidden tokensPerRank experts topK ranks steps [device [hostCopyThreads]]} (device
 * CUDA or CPU), or {@code StagingBenchmark copy MB threads,threads,... [device]}: one rank's copies of an MB-sized
 * array through its queue (EpDeviceArray.copyFrom, copyTo into a reused array, toHost into a fresh one), in GB/s, for
 * each copy-thread count.
 */
public final class StagingBenchmark {
  private StagingBenchmark() {}

  public static void main(String[] a) {
    if (a[0].equals("copy")) {
      copies(Integer.parseInt(a[1]), a[2], a.length > 3 ? EpDevice.valueOf(a[3]) : EpDevice.CUDA);
      return;
    }
    int h = Integer.parseInt(a[0]), n = Integer.parseInt(a[1]), e = Integer.parseInt(a[2]), k = Integer.parseInt(a[3]);
    int ranks = Integer.parseInt(a[4]), steps = Integer.parseInt(a[5]);
    EpDevice device = a.length > 6 ? EpDevice.valueOf(a[6]) : EpDevice.CUDA;
    int threads = a.length > 7 ? Integer.parseInt(a[7]) : 0;
    double[] host = new double[steps], reused = new double[steps], dev = new double[steps];
    long[] recvRows = new long[1];
    EpConfig config = EpConfig.builder().device(device).bufferSizeGb(1.0).hostCopyThreads(threads)
        .timeout(Duration.ofSeconds(60)).build();
    try (EpGroup group = EpGroup.inProcess(ranks)) {
      group.runOnAllRanks(rank -> {
        Random rnd = new Random(rank);
        long[] idx = new long[n * k];
        for (int t = 0; t < n; ++t) {  // k distinct experts per token
          int[] perm = rnd.ints(0, e).distinct().limit(k).toArray();
          for (int j = 0; j < k; ++j) idx[t * k + j] = perm[j];
        }
        INDArray x = Nd4j.rand(DataType.FLOAT, n, h), topk = Nd4j.createFromArray(idx).reshape(n, k);
        INDArray w = Nd4j.rand(DataType.FLOAT, n, k);
        try (EpBuffer buf = group.buffer(rank, config); EpDeviceArray xd = buf.toDevice(x);
             EpDeviceArray idxd = buf.toDevice(topk); EpDeviceArray wd = buf.toDevice(w)) {
          INDArray recvX = null, recvIdx = null, recvW = null, out = Nd4j.create(DataType.FLOAT, n, h);
          for (int s = -1; s < steps; ++s) {  // step -1: warm-up
            long t0 = System.nanoTime();
            EpDispatchResult d = buf.dispatch(x, topk, w, e);
            buf.combine(d.recvX(), d.handle(), d.recvTopkWeights());
            d.handle().close();
            long tr = System.nanoTime();
            // the same step into outputs kept from the step before (the routing is the same, so are the shapes)
            EpHandle hd = buf.prepareDispatch(x, topk, w, e);
            EpDispatchResult r = buf.dispatchPrepared(hd, x, w, recvX, recvIdx, recvW);
            recvX = r.recvX();
            recvIdx = r.recvTopkIdx();
            recvW = r.recvTopkWeights();
            buf.combine(r.recvX(), hd, r.recvTopkWeights(), null, out, null);
            hd.close();
            long t1 = System.nanoTime();
            EpDeviceDispatchResult dd = buf.dispatch(xd, idxd, wd, e);
            EpDeviceArray outD = buf.combine(dd.recvX(), dd.handle(), dd.recvTopkWeights());
            try (EpDeviceArray probe = buf.allocate(DataType.BYTE, 1)) {
              probe.toHost();  // the device work is complete (the queue synchronised) before the clock stops
            }
            long t2 = System.nanoTime();
            if (rank == 0) recvRows[0] = dd.recvX().size(0);
            outD.close();
            dd.recvX().close();
            dd.recvTopkIdx().close();
            dd.recvTopkWeights().close();
            dd.handle().close();
            if (rank == 0 && s >= 0) {
              host[s] = (tr - t0) / 1e6;
              reused[s] = (t1 - tr) / 1e6;
              dev[s] = (t2 - t1) / 1e6;
            }
          }
        }
        return null;
      }, Duration.ofSeconds(600));
    }
    double hm = median(host), rm = median(reused), dm = median(dev);
    long m = recvRows[0];
    double in = (double) n * h * 4 + n * k * 12.0 + m * h * 4.0, out = m * (h * 4.0 + k * 12.0) + (double) n * h * 4;
    System.out.printf(Locale.ROOT, "EpBuffer dispatch + weighted combine on %s, %d ranks, hidden %d, %d tokens per rank,"
        + " top-%d of %d, fp32, hostCopyThreads %d (0 = automatic), median of %d steps of rank 0:%n", device, ranks, h,
        n, k, e, threads, steps);
    System.out.println("| arrays | step ms | staging share | bytes crossing per rank and step |");
    System.out.println("|---|---|---|---|");
    boolean staged = device == EpDevice.CUDA;  // on the CPU device host arrays are used in place: nothing crosses
    String bytes = staged ? String.format(Locale.ROOT, "%.1f MB in + %.1f MB out", in / 1e6, out / 1e6) : "0";
    System.out.printf(Locale.ROOT, "| host INDArrays (%s), fresh outputs | %.3f | %s | %s |%n", staged ? "staged" : "in place",
        hm, staged ? String.format(Locale.ROOT, "%.0f%%", 100 * (1 - dm / hm)) : "-", bytes);
    System.out.printf(Locale.ROOT, "| host INDArrays (%s), reused outputs | %.3f | %s | %s |%n", staged ? "staged" : "in place",
        rm, staged ? String.format(Locale.ROOT, "%.0f%%", 100 * (1 - dm / rm)) : "-", bytes);
    System.out.printf(Locale.ROOT, "| EpDeviceArray | %.3f | - | 0 |%n", dm);
  }

  /** GB/s of one rank's queue copies of an array of {@code mb} MB, for each thread count (median of 5). */
  static void copies(int mb, String threadList, EpDevice device) {
    long n = (long) mb << 18;  // floats
    INDArray src = Nd4j.rand(DataType.FLOAT, n), dst = Nd4j.create(DataType.FLOAT, n);
    System.out.printf(Locale.ROOT, "queue copies on %s of %d MB (fp32), one rank, median of 5, GB/s:%n", device, mb);
    System.out.println("| hostCopyThreads | host -> device (copyFrom) | device -> reused host (copyTo) | device -> fresh host (toHost) |");
    System.out.println("|---|---|---|---|");
    for (String t : threadList.split(",")) {
      int threads = Integer.parseInt(t.trim());
      EpConfig config = EpConfig.builder().device(device).bufferSizeGb(1.0 / 64).hostCopyThreads(threads).build();
      double[] in = new double[5], back = new double[5], fresh = new double[5];
      try (EpGroup g = EpGroup.inProcess(1); EpBuffer buf = g.buffer(0, config);
           EpDeviceArray d = buf.allocate(DataType.FLOAT, n)) {
        for (int i = -1; i < 5; ++i) {  // -1: warm-up (pinned staging and the threads start)
          long t0 = System.nanoTime();
          d.copyFrom(src);
          long t1 = System.nanoTime();
          d.copyTo(dst);
          long t2 = System.nanoTime();
          INDArray f = d.toHost();
          long t3 = System.nanoTime();
          if (i < 0) continue;
          in[i] = n * 4.0 / (t1 - t0);
          back[i] = n * 4.0 / (t2 - t1);
          fresh[i] = n * 4.0 / (t3 - t2);
          if (i == 0 && !f.equals(src)) throw new IllegalStateException("the copies changed the data");
        }
      }
      System.out.printf(Locale.ROOT, "| %d | %.1f | %.1f | %.1f |%n", threads, median(in), median(back), median(fresh));
    }
  }

  private static double median(double[] v) {
    double[] s = v.clone();
    Arrays.sort(s);
    return s[s.length / 2];
  }
}
