package org.deepep4j;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

/**
 * The ranks of one expert-parallel group: threads of this JVM ({@link #inProcess}) or processes that met through a
 * TCP rendezvous ({@link #fromEnvironment}, {@link #tcp}). A group makes {@link EpBuffer}s, one per rank.
 */
public final class EpGroup implements AutoCloseable {
  private final int size;
  private final int processRank;  // -1: every rank lives in this JVM
  private final BlobExchange exchange;
  private final Duration timeout;
  private volatile boolean closed;

  private EpGroup(int size, int processRank, BlobExchange exchange, Duration timeout) {
    this.size = size;
    this.processRank = processRank;
    this.exchange = exchange;
    this.timeout = timeout;
  }

  /** {@code ranks} ranks as threads of this JVM; each rank's thread makes that rank's calls. */
  public static EpGroup inProcess(int ranks) {
    if (ranks < 1 || ranks > 64) throw new IllegalArgumentException("ranks = " + ranks + ": must be in [1, 64]");
    return new EpGroup(ranks, -1, new InProcessExchange(ranks), Duration.ofSeconds(60));
  }

  /**
   * This process as one rank of a multi-process group, from torchrun's variables: RANK, WORLD_SIZE, MASTER_ADDR
   * (default 127.0.0.1), MASTER_PORT, plus DEEPEP4J_SECRET (shared secret) and DEEPEP4J_TIMEOUT_MS (default 60000).
   */
  public static EpGroup fromEnvironment() {
    return fromEnvironment(System.getenv());
  }

  public static EpGroup fromEnvironment(Map<String, String> env) {
    int rank = intVar(env, "RANK", null);
    int world = intVar(env, "WORLD_SIZE", null);
    String addr = env.getOrDefault("MASTER_ADDR", "127.0.0.1");
    int port = intVar(env, "MASTER_PORT", null);
    String secret = env.get("DEEPEP4J_SECRET");
    int timeoutMs = intVar(env, "DEEPEP4J_TIMEOUT_MS", "60000");
    return tcp(rank, world, addr, port, secret, Duration.ofMillis(timeoutMs));
  }

  /** This process as rank {@code rank} of {@code worldSize}, meeting at {@code host:port} (rank 0 listens there). */
  public static EpGroup tcp(int rank, int worldSize, String host, int port, String secret, Duration timeout) {
    if (timeout == null || timeout.isNegative() || timeout.isZero())
      throw new IllegalArgumentException("timeout = " + timeout + ": must be positive");
    TcpRendezvous r = TcpRendezvous.join(rank, worldSize, host, port, secret, timeout);
    return new EpGroup(worldSize, rank, r, timeout);
  }

  private static int intVar(Map<String, String> env, String name, String dflt) {
    String v = env.getOrDefault(name, dflt);
    if (v == null) throw new IllegalArgumentException(name + " = unset: required for a multi-process group (torchrun convention)");
    try {
      return Integer.parseInt(v.trim());
    } catch (NumberFormatException e) {
      throw new IllegalArgumentException(name + " = '" + v + "': must be an integer");
    }
  }

  public int size() { return size; }

  /** True when every rank is a thread of this JVM. */
  public boolean isInProcess() { return processRank < 0; }

  /** This process's rank in a multi-process group. */
  public int processRank() {
    if (processRank < 0) throw new IllegalStateException("processRank: an in-process group has all ranks in this JVM");
    return processRank;
  }

  /**
   * Creates rank {@code rank}'s buffer and connects it to its peers: collective, so every rank makes this call (in
   * process: from its own thread).
   */
  public EpBuffer buffer(int rank, EpConfig config) {
    requireOpen("buffer");
    if (rank < 0 || rank >= size) throw new IllegalArgumentException("rank = " + rank + ": must be in [0, " + size + ")");
    if (processRank >= 0 && rank != processRank)
      throw new IllegalArgumentException("rank = " + rank + ": this process is rank " + processRank + " of the TCP group");
    return EpBuffer.create(this, rank, config == null ? EpConfig.defaults() : config);
  }

  /** Collective: every rank's bytes, in rank order. For small metadata (handles, counts). */
  public byte[][] allGather(int rank, byte[] mine) {
    requireOpen("allGather");
    return exchange.allGather(rank, mine, timeout);
  }

  byte[][] allGather(int rank, byte[] mine, Duration t) {
    requireOpen("allGather");
    return exchange.allGather(rank, mine, t);
  }

  /** Whether {@link #close()} was called: then no call but close works. */
  public boolean isClosed() { return closed; }

  /** Fails naming the call when the group is closed. */
  public void requireOpen(String call) {
    if (closed)
      throw new IllegalStateException(call + ": this EpGroup of " + size + " ranks is closed; make a new group");
  }

  /** A task run by each rank's thread. */
  @FunctionalInterface
  public interface RankTask<T> {
    T run(int rank) throws Exception;
  }

  /**
   * Runs {@code task} on one thread per rank (in-process groups), waits at most {@code timeout} for all, and returns
   * their results in rank order; the first failure is rethrown after the others finished or timed out.
   */
  public <T> List<T> runOnAllRanks(RankTask<T> task, Duration timeout) {
    requireOpen("runOnAllRanks");
    if (!isInProcess()) throw new IllegalStateException("runOnAllRanks: only for in-process groups; this process is one rank");
    ExecutorService pool = Executors.newFixedThreadPool(size, r -> {
      Thread t = new Thread(r, "deepep4j-rank");
      t.setDaemon(true);
      return t;
    });
    try {
      List<Future<T>> futures = new ArrayList<>();
      for (int r = 0; r < size; ++r) {
        final int rank = r;
        futures.add(pool.submit(() -> {
          Thread.currentThread().setName("deepep4j-rank-" + rank);
          return task.run(rank);
        }));
      }
      long deadline = System.nanoTime() + timeout.toNanos();
      List<T> results = new ArrayList<>();
      RuntimeException first = null;
      for (int r = 0; r < size; ++r) {
        try {
          results.add(futures.get(r).get(Math.max(0, deadline - System.nanoTime()), TimeUnit.NANOSECONDS));
        } catch (ExecutionException e) {
          Throwable c = e.getCause();
          if (first == null) first = c instanceof RuntimeException ? (RuntimeException) c : new IllegalStateException("rank " + r + " failed: " + c, c);
          results.add(null);
        } catch (TimeoutException e) {
          if (first == null) first = new EpTimeoutException("rank " + r + " did not finish within " + timeout.toMillis() + " ms");
          results.add(null);
        } catch (InterruptedException e) {
          Thread.currentThread().interrupt();
          throw new IllegalStateException("interrupted while waiting for the ranks", e);
        }
      }
      if (first != null) throw first;
      return results;
    } finally {
      pool.shutdownNow();
    }
  }

  /** Closes the group: its rendezvous ends, and buffer / allGather / runOnAllRanks refuse from now on. Idempotent. */
  @Override
  public void close() {
    closed = true;
    exchange.close();
  }
}
