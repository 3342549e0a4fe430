package org.deepep4j;

/** How tokens travel between ranks. Chosen explicitly: one never falls back to the other. */
public enum EpDispatch {
  /** Ring buffers in peer memory (shared memory on CPU, NVLink on GPU): the fast path. */
  DEEPEP,
  /** NCCL all-to-all (CUDA only): the standard, slower path with identical results. */
  ALLTOALL
}
