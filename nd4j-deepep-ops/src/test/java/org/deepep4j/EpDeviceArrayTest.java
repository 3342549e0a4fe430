package org.deepep4j;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import java.util.concurrent.atomic.AtomicReference;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/** Device arrays on the CPU device (host memory, the engine's CPU queue): the same API as on a GPU, tested in CI. */
class EpDeviceArrayTest {

  @ParameterizedTest
  @ValueSource(ints = {1, 2})
  void deviceArraysGiveWhatHostArraysGive(int ranks) {
    RoundTripCase.Result host = RoundTripCase.run(ranks, EpDevice.CPU, false);
    RoundTripCase.Result device = RoundTripCase.run(ranks, EpDevice.CPU, true);
    RoundTripCase.assertSame(host, device, 0.0, "CPU device arrays vs CPU host arrays, " + ranks + " ranks");
  }

  @Test
  void copiesInAndOutKeepTypeShapeAndValues() {
    try (EpGroup group = EpGroup.inProcess(1); EpBuffer buf = group.buffer(0, EpBufferTest.SMALL)) {
      INDArray a = Nd4j.rand(DataType.FLOAT, 5, 7);
      try (EpDeviceArray d = buf.toDevice(a)) {
        assertEquals(DataType.FLOAT, d.dataType());
        assertArrayEquals(new long[] {5, 7}, d.shape());
        assertEquals(140, d.bytes());
        assertEquals(a, d.toHost());
        d.copyFrom(Nd4j.ones(DataType.DOUBLE, 5, 7));  // cast on the host
        assertEquals(Nd4j.ones(DataType.FLOAT, 5, 7), d.toHost());
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> d.copyFrom(Nd4j.ones(7, 5)));
        assertTrue(e.getMessage().contains("host shape = [7, 5]") && e.getMessage().contains("[5, 7]"), e.getMessage());
        // a view with strides goes as a dense copy
        INDArray t = Nd4j.rand(DataType.FLOAT, 7, 5).transpose();
        d.copyFrom(t);
        assertEquals(t, d.toHost());
      }
      try (EpDeviceArray empty = buf.allocate(DataType.LONG, 0, 3)) {
        assertEquals(0, empty.length());
        assertArrayEquals(new long[] {0, 3}, empty.toHost().shape());
      }
      IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> buf.allocate(DataType.FLOAT, 2, -1));
      assertTrue(e.getMessage().contains("shape = [2, -1]"), e.getMessage());
    }
  }

  @Test
  void closedArraysAreRefusedByName() {
    try (EpGroup group = EpGroup.inProcess(1); EpBuffer buf = group.buffer(0, EpBufferTest.SMALL)) {
      EpDeviceArray x = buf.toDevice(Nd4j.rand(DataType.FLOAT, 4, 8));
      EpDeviceArray idx = buf.toDevice(Nd4j.zeros(DataType.LONG, 4, 1));
      x.close();
      x.close();  // twice is fine
      IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> buf.dispatch(x, idx, null, 2));
      assertTrue(e.getMessage().contains("x: device array already closed"), e.getMessage());
      assertThrows(IllegalStateException.class, x::toHost);
      idx.close();
    }
  }

  @Test
  void closingTheBufferFreesItsArrays() {
    EpDeviceArray kept;
    try (EpGroup group = EpGroup.inProcess(1); EpBuffer buf = group.buffer(0, EpBufferTest.SMALL)) {
      kept = buf.allocate(DataType.FLOAT, 16, 16);
    }
    assertTrue(kept.isClosed());
  }

  /** Rank 0 passes an array of rank 1's buffer: an error naming both on rank 0, a peer error on rank 1, no wait. */
  @Test
  void anArrayOfAnotherRankFailsTheStepOnEveryRank() {
    AtomicReference<EpDeviceArray> ofRank1 = new AtomicReference<>();
    java.util.concurrent.CyclicBarrier made = new java.util.concurrent.CyclicBarrier(2);
    RuntimeException[] seen = new RuntimeException[2];
    try (EpGroup group = EpGroup.inProcess(2)) {
      group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, EpBufferTest.SMALL)) {
          EpDeviceArray x = buf.toDevice(Nd4j.rand(DataType.FLOAT, 3, 8));
          EpDeviceArray idx = buf.toDevice(Nd4j.zeros(DataType.LONG, 3, 1));
          if (rank == 1) ofRank1.set(x);
          made.await();
          try {
            buf.dispatch(rank == 0 ? ofRank1.get() : x, idx, null, 2);
          } catch (RuntimeException e) {
            seen[rank] = e;
          }
          made.await();  // rank 1's array stays open until rank 0 has looked at it
        }
        return null;
      }, Duration.ofSeconds(60));
    }
    assertTrue(seen[0] instanceof IllegalArgumentException
        && seen[0].getMessage().contains("x: a device array of rank 1's buffer, not of rank 0's"), String.valueOf(seen[0]));
    assertTrue(seen[1] instanceof EpPeerException && seen[1].getMessage().contains("rank 0"), String.valueOf(seen[1]));
  }

  @Test
  void deviceArraysMustHaveTheEngineTypes() {
    try (EpGroup group = EpGroup.inProcess(1); EpBuffer buf = group.buffer(0, EpBufferTest.SMALL)) {
      try (EpDeviceArray x = buf.toDevice(Nd4j.rand(DataType.FLOAT, 4, 8));
           EpDeviceArray idx = buf.toDevice(Nd4j.zeros(DataType.INT, 4, 1))) {
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> buf.dispatch(x, idx, null, 2));
        assertTrue(e.getMessage().contains("topkIdx dtype = INT: a device array must be LONG"), e.getMessage());
      }
    }
  }
}
