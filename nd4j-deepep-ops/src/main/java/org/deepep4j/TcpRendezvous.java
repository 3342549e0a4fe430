package org.deepep4j;

import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.net.SocketTimeoutException;
import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.security.MessageDigest;
import java.security.SecureRandom;
import java.time.Duration;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

/**
 * Processes meet at rank 0 over TCP, torchrun-style (MASTER_ADDR:MASTER_PORT). A joining rank proves it knows the
 * shared secret by answering rank 0's random challenge with HMAC-SHA256(secret, challenge || rank); a wrong answer is
 * refused and rank 0 keeps waiting for the real rank. Afterwards rank 0 relays all-gathers (a star: blobs are small).
 */
final class TcpRendezvous implements BlobExchange {
  private static final int MAGIC = 0x44455034;  // "DEP4"
  private static final int MAX_BLOB = 1 << 20;

  private final int rank;
  private final int size;
  private final Socket[] peers;  // rank 0: one socket per other rank; others: peers[0] is rank 0
  private final ServerSocket server;

  private TcpRendezvous(int rank, int size, Socket[] peers, ServerSocket server) {
    this.rank = rank;
    this.size = size;
    this.peers = peers;
    this.server = server;
  }

  static TcpRendezvous join(int rank, int size, String host, int port, String secret, Duration timeout) {
    if (size < 1) throw new IllegalArgumentException("WORLD_SIZE = " + size + ": must be >= 1");
    if (rank < 0 || rank >= size) throw new IllegalArgumentException("RANK = " + rank + ": must be in [0, WORLD_SIZE = " + size + ")");
    if (port < 1 || port > 65535) throw new IllegalArgumentException("MASTER_PORT = " + port + ": must be in [1, 65535]");
    if (secret == null || secret.isEmpty())
      throw new IllegalArgumentException("secret = empty: the rendezvous needs a shared secret (DEEPEP4J_SECRET) so strangers cannot join");
    long deadline = System.nanoTime() + timeout.toNanos();
    try {
      return rank == 0 ? host(size, host, port, secret, deadline, timeout) : client(rank, size, host, port, secret, deadline, timeout);
    } catch (IOException e) {
      throw new IllegalStateException("rank " + rank + ": rendezvous at " + host + ":" + port + " failed: " + e, e);
    }
  }

  private static TcpRendezvous host(int size, String host, int port, String secret, long deadline, Duration timeout) throws IOException {
    ServerSocket server = new ServerSocket();
    server.setReuseAddress(true);
    server.bind(new InetSocketAddress(host, port));
    Socket[] peers = new Socket[size];
    SecureRandom random = new SecureRandom();
    int joined = 1;
    try {
      while (joined < size) {
        int left = remainingMs(deadline);
        if (left <= 0) throw new EpTimeoutException(timeoutMessage(0, size, joined, timeout));
        server.setSoTimeout(left);
        Socket s;
        try {
          s = server.accept();
        } catch (SocketTimeoutException e) {
          throw new EpTimeoutException(timeoutMessage(0, size, joined, timeout));
        }
        s.setSoTimeout(Math.max(1, remainingMs(deadline)));
        s.setTcpNoDelay(true);
        try {
          DataInputStream in = new DataInputStream(s.getInputStream());
          DataOutputStream out = new DataOutputStream(s.getOutputStream());
          byte[] challenge = new byte[32];
          random.nextBytes(challenge);
          out.writeInt(MAGIC);
          out.writeInt(size);
          out.write(challenge);
          out.flush();
          int peerRank = in.readInt();
          byte[] proof = new byte[32];
          in.readFully(proof);
          String refusal = null;
          if (!MessageDigest.isEqual(proof, hmac(secret, challenge, peerRank))) refusal = "wrong secret";
          else if (peerRank < 1 || peerRank >= size) refusal = "rank " + peerRank + " is not in [1, " + size + ")";
          else if (peers[peerRank] != null) refusal = "rank " + peerRank + " has already joined";
          if (refusal != null) {
            out.writeBoolean(false);
            out.writeUTF(refusal);
            out.flush();
            s.close();
            continue;
          }
          out.writeBoolean(true);
          out.flush();
          peers[peerRank] = s;
          ++joined;
        } catch (IOException e) {
          s.close();  // a stranger that hung up; keep waiting for the real ranks
        }
      }
    } catch (RuntimeException | IOException e) {
      for (Socket p : peers) if (p != null) p.close();
      server.close();
      throw e;
    }
    return new TcpRendezvous(0, size, peers, server);
  }

  private static TcpRendezvous client(int rank, int size, String host, int port, String secret, long deadline, Duration timeout) throws IOException {
    Socket s = null;
    while (s == null) {
      try {
        Socket attempt = new Socket();
        attempt.connect(new InetSocketAddress(host, port), Math.max(1, remainingMs(deadline)));
        s = attempt;
      } catch (IOException e) {
        if (remainingMs(deadline) <= 0)
          throw new EpTimeoutException("rank " + rank + ": could not reach rank 0 at " + host + ":" + port + " within "
              + timeout.toMillis() + " ms (" + e.getMessage() + ")");
        try {
          Thread.sleep(50);
        } catch (InterruptedException ie) {
          Thread.currentThread().interrupt();
          throw new IllegalStateException("interrupted while joining the rendezvous", ie);
        }
      }
    }
    s.setSoTimeout(Math.max(1, remainingMs(deadline)));
    s.setTcpNoDelay(true);
    DataInputStream in = new DataInputStream(s.getInputStream());
    DataOutputStream out = new DataOutputStream(s.getOutputStream());
    if (in.readInt() != MAGIC) {
      s.close();
      throw new IllegalStateException("rank " + rank + ": " + host + ":" + port + " is not a deepep4j rendezvous");
    }
    int hostSize = in.readInt();
    byte[] challenge = new byte[32];
    in.readFully(challenge);
    if (hostSize != size) {
      s.close();
      throw new IllegalArgumentException("WORLD_SIZE = " + size + ": rank 0 has WORLD_SIZE = " + hostSize + "; all ranks must agree");
    }
    out.writeInt(rank);
    out.write(hmac(secret, challenge, rank));
    out.flush();
    if (!in.readBoolean()) {
      String why = in.readUTF();
      s.close();
      throw new IllegalStateException("rank " + rank + ": rendezvous at " + host + ":" + port + " refused this rank: " + why);
    }
    Socket[] peers = new Socket[size];
    peers[0] = s;
    return new TcpRendezvous(rank, size, peers, null);
  }

  @Override
  public synchronized byte[][] allGather(int rank, byte[] mine, Duration timeout) {
    if (rank != this.rank) throw new IllegalArgumentException("rank = " + rank + ": this process is rank " + this.rank);
    byte[][] all = new byte[size][];
    try {
      int ms = (int) Math.min(Integer.MAX_VALUE, timeout.toMillis());
      if (rank == 0) {
        all[0] = mine;
        for (int r = 1; r < size; ++r) {
          peers[r].setSoTimeout(ms);
          all[r] = readBlob(new DataInputStream(peers[r].getInputStream()));
        }
        for (int r = 1; r < size; ++r) {
          DataOutputStream out = new DataOutputStream(peers[r].getOutputStream());
          for (byte[] b : all) writeBlob(out, b);
          out.flush();
        }
      } else {
        peers[0].setSoTimeout(ms);
        DataOutputStream out = new DataOutputStream(peers[0].getOutputStream());
        writeBlob(out, mine);
        out.flush();
        DataInputStream in = new DataInputStream(peers[0].getInputStream());
        for (int r = 0; r < size; ++r) all[r] = readBlob(in);
      }
    } catch (SocketTimeoutException e) {
      throw new EpTimeoutException("rank " + rank + ": timed out after " + timeout.toMillis() + " ms in an all-gather of the TCP group");
    } catch (IOException e) {
      throw new IllegalStateException("rank " + rank + ": all-gather of the TCP group failed (a peer died?): " + e, e);
    }
    return all;
  }

  private static void writeBlob(DataOutputStream out, byte[] b) throws IOException {
    out.writeInt(b.length);
    out.write(b);
  }

  private static byte[] readBlob(DataInputStream in) throws IOException {
    int n = in.readInt();
    if (n < 0 || n > MAX_BLOB) throw new IOException("blob of " + n + " bytes: must be in [0, " + MAX_BLOB + "]");
    byte[] b = new byte[n];
    in.readFully(b);
    return b;
  }

  static byte[] hmac(String secret, byte[] challenge, int rank) {
    try {
      Mac mac = Mac.getInstance("HmacSHA256");
      mac.init(new SecretKeySpec(secret.getBytes(StandardCharsets.UTF_8), "HmacSHA256"));
      mac.update(challenge);
      mac.update(new byte[] {(byte) (rank >>> 24), (byte) (rank >>> 16), (byte) (rank >>> 8), (byte) rank});
      return mac.doFinal();
    } catch (GeneralSecurityException e) {
      throw new IllegalStateException("HmacSHA256 unavailable", e);
    }
  }

  private static int remainingMs(long deadline) {
    return (int) Math.max(0, Math.min(Integer.MAX_VALUE, (deadline - System.nanoTime()) / 1_000_000));
  }

  private static String timeoutMessage(int rank, int size, int joined, Duration timeout) {
    return "rank " + rank + ": timed out after " + timeout.toMillis() + " ms waiting for ranks to join (" + joined + " of "
        + size + " joined)";
  }

  @Override
  public void close() {
    for (Socket p : peers) {
      try {
        if (p != null) p.close();
      } catch (IOException ignored) {
        // closing: nothing to report
      }
    }
    try {
      if (server != null) server.close();
    } catch (IOException ignored) {
      // closing: nothing to report
    }
  }
}
