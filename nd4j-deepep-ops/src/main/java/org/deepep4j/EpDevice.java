package org.deepep4j;

/** Where a buffer's memory and copies live ({@link EpConfig.Builder#device}). */
public enum EpDevice {
  /** Host memory (POSIX shared memory between processes); INDArrays of ND4J's CPU backend go in without copies. */
  CPU,
  /** A CUDA device: the engine's GPU path, driven through the C API (ND4J 1.0.0-M2.1 has no CUDA build for Hopper). */
  CUDA
}
