/*
 * deepep4j.h — the whole surface of the deepep4j native engine.
 *
 * Expert-parallel dispatch and combine for Mixture-of-Experts models.
 * One rank = one EP buffer. Ranks are threads of one process or separate processes; the same calls serve both.
 *
 * Life of a group of R ranks (every call below marked "collective" must be made by all R ranks):
 *   1. deepep4j_buffer_create(rank, R, &config, &buf)      allocate this rank's receive region
 *   2. deepep4j_buffer_export(buf, blob, ...)              small handle blob describing that region
 *      ... the caller exchanges the R blobs by any means (in memory, a socket, a file) ...
 *   3. deepep4j_buffer_connect(buf, blobs, lens)           collective: map every peer's region, check configs agree
 *   4. per step:
 *        deepep4j_get_dispatch_layout(...)                 local: tokens per rank / expert, token-in-rank mask
 *        deepep4j_notify_dispatch(...)  -> handle, M       collective: exchange counts, validate on every rank
 *        (caller allocates recv buffers of M rows)
 *        deepep4j_dispatch(buf, handle, ...)               collective: move token rows to the ranks that own their experts
 *        (local experts run on the M received rows)
 *        deepep4j_combine(buf, handle, ...)                collective: send rows back, reduce per original token in fp32
 *      backward reuses the handle ("cached mode"): grad of dispatch = combine, grad of combine = dispatch.
 *   5. deepep4j_handle_destroy / deepep4j_buffer_destroy
 *
 * Semantics (shared by every backend; the CPU backend is the reference):
 *   inputs per rank: x[N,H], topk_idx[N,K] int64 (-1 = no expert), topk_weights[N,K] fp32; E experts, rank r owns
 *   experts [r*E/R, (r+1)*E/R).
 *   dispatch output: rows grouped by source rank (0..R-1), inside a source in source-token order; a token is received
 *   once by each rank that owns at least one of its experts. recv_topk_idx holds local expert ids (expert - r*E/R) or -1
 *   where the expert lives elsewhere (or was -1); recv_topk_weights carries the weights unchanged (0 where idx is -1).
 *   combine: out[n] = sum over the ranks r that token n visited of s(r,n) * y_r[m(r,n)], accumulated in fp32, where
 *   s = 1 unweighted, or, when recv_topk_weights is given, s = sum of recv_topk_weights[m,k] over k with a local expert.
 *
 * Threading: calls on one buffer are not re-entrant; different buffers (ranks) may be driven from different threads.
 * Errors: every call returns a deepep4j_status; deepep4j_last_error() (thread-local) names the argument, value and rule.
 *   Validation errors of a collective call are exchanged so every rank of the step returns the same error; outputs are
 *   untouched when a call fails. Checks that only one rank can make (a NULL output or handle, a handle of another
 *   buffer, NULL blobs at connect) are exchanged too: the others return DEEPEP4J_ERR_PEER_ERROR naming that rank and
 *   its reason (not on the CUDA alltoall backend, whose peers are inside NCCL exchanges then: they time out).
 * Timeouts: every wait honours config.timeout_ms and ends in DEEPEP4J_ERR_TIMEOUT. A step that timed out is abandoned
 *   on every rank, one arriving late included (it is told DEEPEP4J_ERR_TIMEOUT, never OK), and the buffer is broken
 *   from then on: every later collective call (connect, notify_dispatch, dispatch, combine, fail_step) returns
 *   DEEPEP4J_ERR_STATE "the buffer is broken (...): destroy and recreate the group's buffers". Recovery is to destroy
 *   the buffers of every rank and create, export and connect new ones. Outputs of a call that timed out while moving
 *   rows are undefined. A failed connect breaks the buffer as well.
 */
#ifndef DEEPEP4J_H
#define DEEPEP4J_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define DEEPEP4J_API __declspec(dllexport)
#else
#define DEEPEP4J_API __attribute__((visibility("default")))
#endif

/* ---------------------------------------------------------------- status and errors */
typedef enum deepep4j_status {
  DEEPEP4J_OK = 0,
  DEEPEP4J_ERR_INVALID_ARGUMENT = 1, /* a bad value: the message names argument, value and rule */
  DEEPEP4J_ERR_PEER_MISMATCH = 2,    /* ranks disagree on config, shapes or dtypes */
  DEEPEP4J_ERR_PEER_ERROR = 3,       /* another rank of this step reported an error (its message is included) */
  DEEPEP4J_ERR_TIMEOUT = 4,          /* a peer never arrived or died mid-step */
  DEEPEP4J_ERR_OUT_OF_MEMORY = 5,    /* allocation failed; the message advises a smaller buffer */
  DEEPEP4J_ERR_UNAVAILABLE = 6,      /* the requested device/backend cannot run here (no CUDA, no NCCL, ...) */
  DEEPEP4J_ERR_STATE = 7,            /* call made in the wrong state (not connected, handle of another buffer, ...) */
  DEEPEP4J_ERR_INTERNAL = 8          /* CUDA/OS failure; the message carries the underlying error */
} deepep4j_status;

/* Last error message of the calling thread ("" if none). Valid until the next deepep4j call on this thread. */
DEEPEP4J_API const char* deepep4j_last_error(void);
/* Name of a status code, e.g. "DEEPEP4J_ERR_TIMEOUT". */
DEEPEP4J_API const char* deepep4j_status_name(int status);
/* Library version, e.g. "0.1.0". */
DEEPEP4J_API const char* deepep4j_version(void);
/* 1 if this build contains the CUDA backend and at least one CUDA device is visible, else 0. */
DEEPEP4J_API int deepep4j_cuda_available(void);
/* Number of visible CUDA devices (0 without the CUDA backend). */
DEEPEP4J_API int deepep4j_cuda_device_count(void);

/* ---------------------------------------------------------------- enums */
typedef enum deepep4j_dtype {
  DEEPEP4J_FLOAT32 = 0,
  DEEPEP4J_BFLOAT16 = 1,
  DEEPEP4J_FLOAT16 = 2,
  DEEPEP4J_FP8_E4M3 = 3, /* dispatch only; comes with fp32 scales [N, H/128] */
  DEEPEP4J_FLOAT64 = 4    /* MoE block (gradient checks in double precision); dispatch / combine carry its rows and
                             combine reduces them in fp64 */
} deepep4j_dtype;

typedef enum deepep4j_device {
  DEEPEP4J_DEVICE_CPU = 0, /* pointers are host memory; ranks are threads or processes */
  DEEPEP4J_DEVICE_CUDA = 1 /* pointers are device memory of config.device_id */
} deepep4j_device;

typedef enum deepep4j_backend {
  DEEPEP4J_BACKEND_DEEPEP = 0,  /* ring buffers in peer memory (NVLink on GPU, shared memory on CPU) */
  DEEPEP4J_BACKEND_ALLTOALL = 1 /* NCCL all-to-all (CUDA only); never chosen silently */
} deepep4j_backend;

/* ---------------------------------------------------------------- configuration */
typedef struct deepep4j_config {
  int64_t buffer_bytes;              /* this rank's receive region; split into R*channels rings */
  int32_t num_sms;                   /* even, >= 2; channels = num_sms/2 (a sender and a receiver each) */
  int32_t max_send_tokens_per_chunk; /* >= 1; a sender publishes at most this many tokens at a time */
  int32_t ring_tokens;               /* slots per (channel, peer) ring; >= max_send_tokens_per_chunk */
  int32_t timeout_ms;                /* > 0; every wait gives up after this long */
  int32_t device;                    /* deepep4j_device */
  int32_t device_id;                 /* CUDA ordinal for DEVICE_CUDA; ignored on CPU */
  int32_t backend;                   /* deepep4j_backend */
  int32_t num_threads;               /* CPU copy threads per rank; 0 = automatic */
  int32_t max_hidden_bytes;          /* largest token row (H * element size) the buffer must carry; 0 = checked at
                                        dispatch time instead of at creation */
  int32_t cuda_transfer;             /* deepep4j_cuda_transfer: how the CUDA deepep backend moves rows; all ranks
                                        must agree */
  int32_t ce_chunks;                 /* copy-engine copies per peer and step, in [1, 16]; all ranks must agree
                                        (senders and receivers cut a step into the same chunks) */
  int32_t cuda_trace;                /* 1: after each copy-engine step, and each SM ring step of a call that waits
                                        (stream_ordered = 0), one line on stderr with where its time went */
  int32_t cpu_direct;                /* CPU: 1 = ranks of one process copy rows directly (used when every rank
                                        allows it), 0 = every row goes through the rings */
  int32_t stream_ordered;            /* CUDA deepep backend: 1 = dispatch / combine / cached calls given a stream are
                                        queued on it and return without waiting for the GPU (see "Stream-ordered
                                        mode" below); 0 = every call completes before it returns. All ranks must
                                        agree. The CPU backend accepts both and always completes on return. */
  int32_t host_copy_threads;         /* threads a rank uses to copy host arrays to and from staging (queues, the MoE
                                        block's HOST memory), in [0, 64]; 0 = automatic: cores / ranks, at most 8 */
} deepep4j_config;

typedef enum deepep4j_cuda_transfer {
  DEEPEP4J_CUDA_TRANSFER_AUTO = 0,       /* copy engines when every rank's step fits its landing zones and moves
                                            >= 8 MiB to or from some peer, else the SM rings */
  DEEPEP4J_CUDA_TRANSFER_SM = 1,         /* always the SM ring kernels */
  DEEPEP4J_CUDA_TRANSFER_COPY_ENGINE = 2 /* copy engines; a step that does not fit fails naming buffer_bytes */
} deepep4j_cuda_transfer;

/* Fills defaults: 256 MiB buffer, 20 SMs, chunk 16 tokens, ring 128 tokens, 60 s timeout, CPU device 0, deepep, auto
   threads, max_hidden_bytes 0, cuda_transfer AUTO, ce_chunks 4, cuda_trace 0, cpu_direct 1, stream_ordered 0,
   host_copy_threads 0 (automatic). The environment gives other defaults for cuda_transfer .. stream_ordered (and
   only here; the library reads no environment elsewhere):
   DEEPEP4J_CUDA_TRANSFER = auto | sm | copy_engine, DEEPEP4J_CE_CHUNKS = n, DEEPEP4J_CUDA_TRACE = 1,
   DEEPEP4J_CPU_DIRECT = 0, DEEPEP4J_STREAM_ORDERED = 1. A value that is none of these makes the field invalid (-1), which buffer_create rejects
   naming the field. */
DEEPEP4J_API void deepep4j_config_init(deepep4j_config* config);

/* Recommended buffer_bytes: room for the full ring depth, config->ring_tokens slots in each of the num_ranks x
   num_sms/2 rings (each rounded up to 64 bytes), a slot being the larger of a dispatch and a combine slot of rows of
   `hidden` elements of `dtype` (fp8 rows are combined in bf16) with K = DEEPEP4J_MAX_TOPK. Ring depth is what makes
   transfers fast: pass a config with the ring_tokens you want and use the result as buffer_bytes. Not the minimum
   (see deepep4j_buffer_size_min). */
DEEPEP4J_API int deepep4j_buffer_size_hint(int64_t hidden, int32_t dtype, int32_t num_ranks,
                                           const deepep4j_config* config, int64_t* out_bytes);

/* Smallest buffer_bytes with which a step of rows of `hidden` elements of `dtype` and K = num_topk runs on num_ranks
   ranks under `config`: one chunk (max_send_tokens_per_chunk rows) in each ring, for its dispatch and for its combine
   in the same dtype (bf16 for fp8). A buffer 1 byte smaller fails that step with INVALID_ARGUMENT on every rank, and
   the message names this value. (The CUDA ring kernels need only one slot per ring and then send smaller chunks, so
   they also run with less; copy-engine transfers need room for a whole step per source.) */
DEEPEP4J_API int deepep4j_buffer_size_min(int64_t hidden, int32_t dtype, int32_t num_topk, int32_t num_ranks,
                                          const deepep4j_config* config, int64_t* out_bytes);

/* ---------------------------------------------------------------- buffer and peer memory */
typedef struct deepep4j_buffer deepep4j_buffer;
typedef struct deepep4j_handle deepep4j_handle;

/* Maximum size of an exported blob, in bytes. */
#define DEEPEP4J_MAX_BLOB_BYTES 512
/* Largest supported top-k (K). */
#define DEEPEP4J_MAX_TOPK 32
/* Largest supported number of ranks. */
#define DEEPEP4J_MAX_RANKS 64
/* fp8 scales cover this many channels each; H must be a multiple of it for fp8. */
#define DEEPEP4J_FP8_BLOCK 128

/* Allocates this rank's region (POSIX shared memory on CPU, device memory on CUDA). Fails with INVALID_ARGUMENT for a
   bad config (message names the field), OUT_OF_MEMORY when the region cannot be had, UNAVAILABLE when the device or
   backend cannot run (no silent fallback from deepep to alltoall or back). */
DEEPEP4J_API int deepep4j_buffer_create(int32_t rank, int32_t num_ranks, const deepep4j_config* config,
                                        deepep4j_buffer** out);

/* Writes this rank's blob (at most DEEPEP4J_MAX_BLOB_BYTES) to blob and its length to *len. */
DEEPEP4J_API int deepep4j_buffer_export(deepep4j_buffer* buf, void* blob, size_t capacity, size_t* len);

/* Collective. blobs[i] / lens[i] is rank i's exported blob (blobs[rank] may be this rank's own). Maps every peer's region
   (same process: direct pointers / CUDA peer access; other process: shm_open / CUDA IPC) and checks that all ranks
   agree on the config; a mismatch is PEER_MISMATCH on every rank. Waits at most timeout_ms for every peer. */
DEEPEP4J_API int deepep4j_buffer_connect(deepep4j_buffer* buf, const void* const* blobs, const size_t* lens);

/* Frees the region and unmaps peers. Safe on NULL. Handles of this buffer must be destroyed first. */
DEEPEP4J_API int deepep4j_buffer_destroy(deepep4j_buffer* buf);

DEEPEP4J_API int deepep4j_buffer_rank(const deepep4j_buffer* buf);
DEEPEP4J_API int deepep4j_buffer_num_ranks(const deepep4j_buffer* buf);
/* Copies the buffer's effective config (after defaults) to *out. */
DEEPEP4J_API int deepep4j_buffer_config(const deepep4j_buffer* buf, deepep4j_config* out);

/* ---------------------------------------------------------------- layout (local) */
/* topk_idx[N,K] int64 in [-1, E). Outputs (any may be NULL): num_tokens_per_rank[R] int32, num_tokens_per_expert[E]
   int32, is_token_in_rank[N,R] uint8 (1 if any of the token's experts lives on that rank). A token counts once per
   rank. On CUDA all pointers are device memory and the work is queued on `stream` (cudaStream_t, NULL = default). */
DEEPEP4J_API int deepep4j_get_dispatch_layout(deepep4j_buffer* buf, const int64_t* topk_idx, int64_t num_tokens,
                                              int32_t num_topk, int32_t num_experts, int32_t* num_tokens_per_rank,
                                              int32_t* num_tokens_per_expert, uint8_t* is_token_in_rank, void* stream);

/* ---------------------------------------------------------------- dispatch */
/* Collective. Validates the step on every rank (N >= 0, 1 <= K <= DEEPEP4J_MAX_TOPK, topk_idx in [-1,E), E % R == 0,
   H > 0 and H * element size a multiple of 16 bytes (rows move as 16-byte vectors), H % 128 == 0 for fp8, dtype
   supported by the backend), exchanges the per-rank counts, checks all ranks agree on
   (H, K, E, dtype) and creates a handle that holds the routing. *num_recv_tokens = M, the rows this rank will receive;
   num_recv_tokens_per_expert (may be NULL) gets [E/R] int32 host counts, one per local expert (a token counts once for
   each of its top-k entries on that expert). topk_idx is host memory on CPU, device memory on CUDA; the counts come back
   to the host (this call synchronises `stream`). */
DEEPEP4J_API int deepep4j_notify_dispatch(deepep4j_buffer* buf, const int64_t* topk_idx, int64_t num_tokens,
                                          int32_t num_topk, int32_t num_experts, int64_t hidden, int32_t dtype,
                                          deepep4j_handle** out_handle, int64_t* num_recv_tokens,
                                          int32_t* num_recv_tokens_per_expert, void* stream);

typedef struct deepep4j_dispatch_args {
  const void* x;                  /* [N,H] of the handle's dtype */
  const float* x_scales;          /* [N,H/128] fp32, fp8 only (else NULL) */
  const float* topk_weights;      /* [N,K] fp32 or NULL */
  void* recv_x;                   /* [M,H] */
  float* recv_x_scales;           /* [M,H/128], fp8 only */
  int64_t* recv_topk_idx;         /* [M,K] local expert ids or -1; may be NULL */
  float* recv_topk_weights;       /* [M,K]; may be NULL (must be NULL when topk_weights is NULL) */
  int64_t* recv_src_token;        /* [M] source token index on the source rank; may be NULL */
  int32_t* recv_src_rank;         /* [M] source rank; may be NULL */
} deepep4j_dispatch_args;

/* Collective. Moves the rows described by `handle`. Called with the handle of an earlier notify_dispatch+dispatch on
   new data of the same shape it is "cached mode" (no count exchange): that is the backward of combine. The handle's
   dtype may be overridden by `dtype` (-1 = the handle's) so backward can carry another precision. */
DEEPEP4J_API int deepep4j_dispatch(deepep4j_buffer* buf, deepep4j_handle* handle, int32_t dtype,
                                   const deepep4j_dispatch_args* args, void* stream);

/* ---------------------------------------------------------------- combine */
typedef struct deepep4j_combine_args {
  const void* y;                         /* [M,H] rows to send back, in the dispatch's receive order */
  const float* recv_topk_weights;        /* [M,K] or NULL: weighted combine (see semantics above) */
  const float* y_topk_weights;           /* [M,K] or NULL: values to return per (token, k); entries with a
                                            non-local expert must be 0 */
  void* out;                             /* [N,H], same dtype as y */
  float* out_topk_weights;               /* [N,K] or NULL: sum over ranks of y_topk_weights */
} deepep4j_combine_args;

/* Collective. dtype of y/out (FLOAT32, BFLOAT16 or FLOAT16). This is also the backward of dispatch. */
DEEPEP4J_API int deepep4j_combine(deepep4j_buffer* buf, deepep4j_handle* handle, int32_t dtype,
                                  const deepep4j_combine_args* args, void* stream);

/* ---------------------------------------------------------------- local failures in a collective */
/* Collective. A rank whose own checks failed before it could make the step's call (a binding's shape check, say)
   joins the step the other ranks are making with this failure, so every rank returns the same error instead of
   waiting for it: the others get DEEPEP4J_ERR_PEER_ERROR with "rank r reported ...: <message>". Returns `status`
   (which must not be DEEPEP4J_OK) with `message` as this rank's last error. On the CUDA alltoall backend the failure
   stays local (the peers time out). */
DEEPEP4J_API int deepep4j_fail_step(deepep4j_buffer* buf, int32_t status, const char* message);

/* ---------------------------------------------------------------- stream-ordered mode (config.stream_ordered = 1)
 * CUDA deepep backend, SM ring kernels (cuda_transfer auto means sm; copy_engine is refused at buffer_create: its
 * copies are queued by the host after the step's barrier). What changes, call by call:
 *   dispatch / combine (fresh or cached) with a non-NULL stream: the arguments are checked on the host, the step
 *     (barrier + ring kernel) is queued on `stream` behind this buffer's previous step (an event, no host wait) and
 *     the call returns. Outputs are valid for work queued on `stream` after the call. With stream = NULL the call
 *     completes before it returns, as with stream_ordered = 0.
 *   notify_dispatch still waits on the host for the counts (once per step, as DeepEP's normal mode);
 *     deepep4j_notify_dispatch_queued below does not.
 * When an error surfaces:
 *   - a check this rank makes on the host (a bad argument, a NULL handle, ...): at once, from that call, on that rank;
 *     the step is still queued with this failure, so the peers' kernels see it at the step's barrier and move nothing.
 *   - everything found on the device (a peer's failure: DEEPEP4J_ERR_PEER_ERROR naming the rank and its message; a
 *     peer that never came or died: DEEPEP4J_ERR_TIMEOUT, at the latest timeout_ms after the waiting kernel began;
 *     a queued notify's bad topk_idx or num_worst_tokens overflow): recorded in a host-mapped error word. Every step
 *     this rank queued after the failed one moves nothing, its outputs untouched and invalid. The error is returned by
 *     the first of: the next dispatch / combine / notify / fail_step call on this buffer that finds it recorded (it
 *     checks without waiting; notify waits for the stream and so finds every earlier step's error), or
 *     deepep4j_buffer_sync. Those calls name the failed step's rank and reason with today's words, prefixed
 *     "a queued step failed".
 *   - after an error of a queued step (a local failure of a queued dispatch / combine / fail_step, or anything
 *     found on the device) the buffer is broken (DEEPEP4J_ERR_STATE "... destroy and recreate"): peers may have queued
 *     later steps, so the group cannot agree where to resume. notify_dispatch's own argument errors (it waits for the
 *     exchange) stay recoverable as with stream_ordered = 0.
 *   - a CUDA graph: steps captured in it are ordered by the graph; launch it on the stream of this buffer's previous
 *     step (or after deepep4j_buffer_sync), and pass that stream to deepep4j_buffer_sync to learn its errors.
 * Ranks sharing one GPU in one process: each rank's spinning kernels must not sit ahead of another rank's work in one
 * hardware queue; give every rank its own stream and set CUDA_DEVICE_MAX_CONNECTIONS=32 (the driver maps streams
 * onto that many queues). And no rank's thread may need a CUDA call that another rank's thread blocks while it waits
 * for the device: measured on an H200 (driver 580), a thread inside cudaMemcpyAsync to pageable host memory, queued
 * behind a step that waits for a late peer, made the peer's cudaEventCreate wait until the step timed out (both
 * ranks then fail with DEEPEP4J_ERR_TIMEOUT). Create events and streams before the steps, and read results into
 * pinned memory (or wait with deepep4j_buffer_sync / deepep4j_comm_wait(buf, NULL) first). */

/* Waits on the host until this rank's queued steps (and `stream`'s work, when not NULL) are complete, at most
   timeout_ms + 1 s, and returns the first error any of them recorded (see above), else OK. Local (not collective). */
DEEPEP4J_API int deepep4j_buffer_sync(deepep4j_buffer* buf, void* stream);

/* Collective. Combine on the buffer's communication stream, so that work queued on `stream` after this call runs
   beside it: the combine waits (on the device) for everything queued on `stream` so far, then runs on the buffer's own
   stream. y and the other inputs must stay unchanged, and out must not be read, until deepep4j_comm_wait(buf, s) has
   ordered a stream s after it (or deepep4j_buffer_sync has returned). The next step of this buffer, on any stream,
   is ordered after it. On CUDA it needs stream_ordered = 1 (else DEEPEP4J_ERR_STATE on every rank); with stream =
   NULL, and on CPU, it completes on return. A peer may come late (up to timeout_ms); for ranks sharing one GPU in
   one process mind the rule on blocking CUDA calls of the stream-ordered mode section. */
DEEPEP4J_API int deepep4j_combine_async(deepep4j_buffer* buf, deepep4j_handle* handle, int32_t dtype,
                                        const deepep4j_combine_args* args, void* stream);

/* Local. Orders `stream` after every step queued on the buffer's communication stream so far (a device-side wait;
   the host does not block). Readers of an async combine's out queued on `stream` afterwards see it complete. */
DEEPEP4J_API int deepep4j_comm_wait(deepep4j_buffer* buf, void* stream);

/* Worst-case sized routing (DeepEP's num_worst_tokens): no host wait in notify, so notify -> dispatch -> experts ->
   combine can be captured into a CUDA graph and replayed. CUDA deepep backend with stream_ordered = 1 only (other
   backends return DEEPEP4J_ERR_UNAVAILABLE).
   deepep4j_handle_create_queued: local. A handle for steps of exactly num_tokens tokens of (num_topk, num_experts,
   hidden, dtype) on this buffer, receiving at most num_worst_tokens rows (>= 0); its device arrays are allocated here
   (outside any capture). deepep4j_handle_num_recv_tokens returns num_worst_tokens; the rows actually received are
   written on the device by each notify (below). deepep4j_handle_recv_counts_per_rank is refused (STATE) for it. */
DEEPEP4J_API int deepep4j_handle_create_queued(deepep4j_buffer* buf, int64_t num_tokens, int32_t num_topk,
                                               int32_t num_experts, int64_t hidden, int32_t dtype,
                                               int64_t num_worst_tokens, deepep4j_handle** out_handle);
/* Collective. Re-routes `handle` from topk_idx (device, [num_tokens, num_topk]) entirely on `stream` (non-NULL):
   plan, count exchange, receive offsets. num_recv_tokens (device int64, or NULL) gets M, the rows this rank
   receives; num_recv_tokens_per_expert (device int32 [E/R], or NULL) the per-local-expert counts. Then dispatch with
   this handle writes rows [0, M) of arrays sized num_worst_tokens and marks rows [M, num_worst_tokens) as padding:
   recv_topk_idx -1, recv_topk_weights 0, recv_src_token -1, recv_src_rank -1 (recv_x of padding rows untouched).
   A bad topk_idx entry or M > num_worst_tokens on a rank is found on the device: the step fails on every rank
   (INVALID_ARGUMENT on that rank, PEER_ERROR on the others), reported as any stream-ordered error. */
DEEPEP4J_API int deepep4j_notify_dispatch_queued(deepep4j_buffer* buf, deepep4j_handle* handle,
                                                 const int64_t* topk_idx, int64_t* num_recv_tokens,
                                                 int32_t* num_recv_tokens_per_expert, void* stream);

/* ---------------------------------------------------------------- handle */
DEEPEP4J_API int64_t deepep4j_handle_num_tokens(const deepep4j_handle* h);      /* N */
DEEPEP4J_API int64_t deepep4j_handle_num_recv_tokens(const deepep4j_handle* h); /* M */
DEEPEP4J_API int32_t deepep4j_handle_num_topk(const deepep4j_handle* h);        /* K */
DEEPEP4J_API int64_t deepep4j_handle_hidden(const deepep4j_handle* h);          /* H */
DEEPEP4J_API int32_t deepep4j_handle_num_experts(const deepep4j_handle* h);     /* E */
/* Rows received from each source rank, [R] int32 host. */
DEEPEP4J_API int deepep4j_handle_recv_counts_per_rank(const deepep4j_handle* h, int32_t* out);
DEEPEP4J_API int deepep4j_handle_destroy(deepep4j_handle* h);


/* ---------------------------------------------------------------- queues: device arrays and host staging */
/* A queue is one rank's ordered work on its buffer's device: a non-blocking CUDA stream of config.device_id and the
   pinned host memory through which host arrays are staged (async copies on that stream). Callers without a CUDA API
   of their own (Java) allocate device arrays here, move host arrays in and out, and pass deepep4j_queue_stream() as
   the `stream` of layout / notify / dispatch / combine, so every step of a rank is ordered on one stream that no
   other rank shares. On CPU the same calls work on host memory: allocations are host memory, copies are done before
   the call returns, the stream is NULL; so code written against queues runs (and is tested) without a GPU.
   A queue belongs to its buffer (which must outlive it) and, like the buffer, is driven by one thread at a time. */
typedef struct deepep4j_queue deepep4j_queue;

/* Creates a queue on buf's device. UNAVAILABLE when the buffer's device cannot run here. */
DEEPEP4J_API int deepep4j_queue_create(deepep4j_buffer* buf, deepep4j_queue** out);
/* Waits for the queue's work (at most the buffer's timeout_ms), then frees its stream and staging. Safe on NULL. */
DEEPEP4J_API int deepep4j_queue_destroy(deepep4j_queue* q);
/* The cudaStream_t of the queue (NULL on CPU, and for a NULL queue). */
DEEPEP4J_API void* deepep4j_queue_stream(const deepep4j_queue* q);

/* bytes >= 0 of memory of the queue's device (host memory on CPU), 256-byte aligned, contents undefined; *out = NULL
   for 0 bytes. On CUDA allocated in stream order (cudaMallocAsync on the queue's stream: no device-wide wait, which
   on a GPU shared by ranks could wait for a peer's spinning kernel). OUT_OF_MEMORY names the size. */
DEEPEP4J_API int deepep4j_device_alloc(deepep4j_queue* q, int64_t bytes, void** out);
/* Frees memory of deepep4j_device_alloc in stream order: it is reused only after the work queued before. NULL is a
   no-op. */
DEEPEP4J_API int deepep4j_device_free(deepep4j_queue* q, void* device);

/* Queues a copy of `bytes` from host memory (pageable or not) to device memory: the bytes go through the queue's pinned
   staging in chunks (the host copy of one chunk overlaps the transfer of the previous), so `host` may be reused as soon
   as the call returns. */
DEEPEP4J_API int deepep4j_copy_to_device(deepep4j_queue* q, void* device, const void* host, int64_t bytes);
/* Queues a copy of `bytes` from device memory to host memory through pinned staging. `host` holds the bytes once
   deepep4j_queue_synchronize has returned OK (not before); it must stay valid until then. */
DEEPEP4J_API int deepep4j_copy_to_host(deepep4j_queue* q, void* host, const void* device, int64_t bytes);
/* Waits for the queue's work, at most the buffer's timeout_ms (TIMEOUT names the queue's rank and device), and
   completes the copies to host queued since the last call. A failed kernel or copy is INTERNAL with the CUDA error;
   then the host arrays of the pending copies are untouched. */
DEEPEP4J_API int deepep4j_queue_synchronize(deepep4j_queue* q);

/* ---------------------------------------------------------------- MoE block */
/* The whole MoE block of one rank on its buffer's device: router (weights replicated on every rank) -> dispatch ->
   the rank's local SwiGLU experts as grouped GEMMs -> weighted combine; its backward (cached dispatch / combine) and the
   local experts' optimizer step. Expert weights, their gradients and optimizer state live in memory the block owns
   (device memory on CUDA) and stay there across steps; only activations, router weights and their gradients move.
   The CPU backend implements every call and is the reference.

   Semantics (the same as the Java MoELayer's CPU path):
     logits = x Wr [N,E]; scores = softmax(logits) per row, or sigmoid(logits);
     top-k: the K experts of largest (score + router_bias[e]), ties to the lower expert id, in descending order;
     gate[n,k] = scores[n, topk[n,k]]; weight[n,k] = gate / sum_k gate when normalize_topk, else gate;
     expert e (local to rank r): f_e(x) = (silu(x W1_e) * (x W3_e)) W2_e;
     y[n] = sum_k weight[n,k] * f_{topk[n,k]}(x[n])   (rows travel by dispatch/combine, reduced in fp32, fp64 for fp64);
     aux loss = coef * E * sum_e f_e * P_e, f_e = assignments of expert e / (N*K), P_e = mean over n of scores[n,e]
     (this rank's tokens only).
   forward and backward are collective: every rank of the buffer calls them, in the same order, with the same
   config (checked at create: PEER_MISMATCH names the field). */
typedef struct deepep4j_moe deepep4j_moe;

typedef enum deepep4j_score_function {
  DEEPEP4J_SCORE_SOFTMAX = 0,
  DEEPEP4J_SCORE_SIGMOID = 1
} deepep4j_score_function;

typedef enum deepep4j_moe_gemm {
  DEEPEP4J_MOE_GEMM_AUTO = 0,    /* per shape: one grouped call for many small experts, a per-expert loop for few
                                    large ones */
  DEEPEP4J_MOE_GEMM_GROUPED = 1, /* one cublasGemmGroupedBatchedEx per weight (CUDA) */
  DEEPEP4J_MOE_GEMM_LOOP = 2     /* one GEMM per local expert with rows */
} deepep4j_moe_gemm;

typedef struct deepep4j_moe_config {
  int64_t hidden;         /* H, as the buffer's payload rules require (H * element size a multiple of 16 bytes) */
  int64_t ffn;            /* F, per expert, >= 1 */
  int32_t num_experts;    /* E (global), divisible by the buffer's ranks */
  int32_t num_topk;       /* K, 1 <= K <= min(E, DEEPEP4J_MAX_TOPK) */
  int32_t dtype;          /* activations and expert weights: FLOAT32, BFLOAT16 (fp32 accumulate) or FLOAT64 */
  int32_t score_function; /* deepep4j_score_function */
  int32_t normalize_topk; /* 1: the K chosen scores are divided by their sum */
  int32_t gemm;           /* deepep4j_moe_gemm */
  double aux_loss_coef;   /* >= 0; 0 = no aux loss */
  int64_t max_tokens;     /* >= 1: the largest N of a forward; workspaces are sized for it */
} deepep4j_moe_config;

/* Defaults: H 0 and F 0 (must be set), E 0, K 0 (must be set), FLOAT32, softmax, normalize_topk 1, gemm AUTO, aux 0,
   max_tokens 4096. */
DEEPEP4J_API void deepep4j_moe_config_init(deepep4j_moe_config* config);

/* Collective (checks that every rank has the same config). The block belongs to `buf` (which must be connected and
   outlive it); weights start at zero: write them with deepep4j_moe_write. CUDA needs cuBLAS (libcublas.so, loaded at
   run time): UNAVAILABLE names the library and the version found or missing. */
DEEPEP4J_API int deepep4j_moe_create(deepep4j_buffer* buf, const deepep4j_moe_config* config, deepep4j_moe** out);
DEEPEP4J_API int deepep4j_moe_destroy(deepep4j_moe* moe); /* safe on NULL */

/* Tensors of the local experts. Each holds E/R experts x (W1 [H,F], W3 [H,F], W2 [F,H]), each matrix row-major,
   expert-major: the order of the MoELayer's parameters e<j>W1, e<j>W3, e<j>W2. count = E/R * 3 * H * F elements. */
typedef enum deepep4j_moe_tensor {
  DEEPEP4J_MOE_PARAMS = 0,
  DEEPEP4J_MOE_GRADS = 1,   /* gradients of the last backward (sums over tokens; not yet scaled) */
  DEEPEP4J_MOE_STATE_M = 2, /* optimizer state: Adam/AdamW first moment */
  DEEPEP4J_MOE_STATE_V = 3  /* optimizer state: Adam/AdamW second moment */
} deepep4j_moe_tensor;

/* Streams: forward / backward / step queue their work on `stream` (cudaStream_t); NULL means the block's own stream and
   the call returns with its work complete. */
/* Copies a tensor to / from host memory of host_dtype FLOAT32 or FLOAT64 (converted from / to the block's dtype).
   Waits for the block's queued work. Local (not collective). */
DEEPEP4J_API int deepep4j_moe_read(deepep4j_moe* moe, int32_t tensor, int32_t host_dtype, void* host, int64_t count);
DEEPEP4J_API int deepep4j_moe_write(deepep4j_moe* moe, int32_t tensor, int32_t host_dtype, const void* host,
                                    int64_t count);

/* Where the arrays of forward / backward args live. */
typedef enum deepep4j_memory {
  DEEPEP4J_MEMORY_DEVICE = 0, /* memory of the buffer's device (host memory on CPU) */
  DEEPEP4J_MEMORY_HOST = 1    /* host memory; on CUDA the block stages it through pinned memory with async copies */
} deepep4j_memory;

typedef struct deepep4j_moe_forward_args {
  int32_t memory;                 /* deepep4j_memory of x, router_weight, router_bias, replay_topk_idx, y, topk_* */
  const void* x;                  /* [N,H] of the block's dtype */
  const void* router_weight;      /* [H,E] of the block's dtype */
  const float* router_bias;       /* [E] selection bias (steers top-k only; no gradient), or NULL */
  const int64_t* replay_topk_idx; /* [N,K] recorded routing to reuse instead of a fresh top-k, or NULL */
  void* y;                        /* [N,H] output, block's dtype */
  int64_t* topk_idx;              /* [N,K] chosen global experts (for recording), or NULL */
  float* topk_weights;            /* [N,K] routing weights, or NULL */
  int32_t async_combine;          /* 1: return once the step is queued; y (and topk_*) are valid only after
                                     deepep4j_moe_wait. 0: complete on return. */
  int32_t* expert_load;           /* [E] host: this rank's assignments per global expert, or NULL */
  int32_t* recv_per_local_expert; /* [E/R] host: rows received per local expert, or NULL */
  double* aux_loss;               /* host: this rank's aux loss, or NULL */
} deepep4j_moe_forward_args;

/* Collective. 0 <= N <= max_tokens. The routing and activations, and copies of x and router_weight, are kept for the
   next backward. Outputs must not overlap any input of the call (also in backward). memory = DEVICE: outputs are ordered on `stream` either way. memory = HOST: async_combine = 0 returns
   with y / topk_* filled; 1 returns once the work is queued and deepep4j_moe_wait fills them. A bad argument on one rank
   is INVALID_ARGUMENT there and PEER_ERROR on the others; outputs stay untouched. */
DEEPEP4J_API int deepep4j_moe_forward(deepep4j_moe* moe, int64_t num_tokens, const deepep4j_moe_forward_args* args,
                                      void* stream);

/* Waits until the last forward's outputs are complete (async_combine). Returns the forward's error, if any. */
DEEPEP4J_API int deepep4j_moe_wait(deepep4j_moe* moe);

typedef struct deepep4j_moe_backward_args {
  int32_t memory;             /* deepep4j_memory of grad_y, grad_x, grad_router_weight */
  const void* grad_y;         /* [N,H] */
  void* grad_x;               /* [N,H] output: through experts, combine weights and router */
  void* grad_router_weight;   /* [H,E] output (overwritten) */
  double aux_loss_scale;      /* the aux loss's gradient is multiplied by this (DL4J: the minibatch size) */
  int32_t accumulate;         /* 0: the block's GRADS are overwritten; 1: added to */
} deepep4j_moe_backward_args;

/* Collective. Backward of the last forward, with its routing (cached dispatch / combine). */
DEEPEP4J_API int deepep4j_moe_backward(deepep4j_moe* moe, const deepep4j_moe_backward_args* args, void* stream);

/* What host-array staging (memory = HOST on a GPU) cost the block since create: bytes copied from the caller's
   arrays to the device and back, and the host time of those copies (caller's array <-> pinned memory, by
   config.host_copy_threads threads, including queueing the transfers of the inputs; not the wait for the device).
   All zero on the CPU device, where HOST arrays are used in place. */
typedef struct deepep4j_moe_staging {
  int64_t bytes_in;
  int64_t bytes_out;
  int64_t host_copy_ns;
} deepep4j_moe_staging;

/* Local. Fills *out with the block's staging totals. */
DEEPEP4J_API int deepep4j_moe_staging_stats(const deepep4j_moe* moe, deepep4j_moe_staging* out);

typedef enum deepep4j_optimizer_kind {
  DEEPEP4J_OPT_SGD = 0,
  DEEPEP4J_OPT_ADAM = 1,
  DEEPEP4J_OPT_ADAMW = 2
} deepep4j_optimizer_kind;

/* The update DL4J's updaters apply (its formulas, bias correction and epsilon placement; see the implementation's
   comment for each kind). */
typedef struct deepep4j_optimizer {
  int32_t kind;           /* deepep4j_optimizer_kind */
  double learning_rate;   /* the rate for this step (schedules are evaluated by the caller) */
  double beta1;           /* Adam/AdamW */
  double beta2;           /* Adam/AdamW */
  double epsilon;         /* Adam/AdamW */
  double weight_decay;    /* AdamW: decoupled weight decay coefficient */
  int64_t iteration;      /* 0-based step count (bias correction) */
  double grad_scale;      /* GRADS are multiplied by this first (DL4J: 1 / minibatch size) */
} deepep4j_optimizer;

/* DL4J's defaults for the kind (Adam: lr 1e-3, beta1 0.9, beta2 0.999, epsilon 1e-8), iteration 0, grad_scale 1. */
DEEPEP4J_API void deepep4j_optimizer_init(deepep4j_optimizer* opt, int32_t kind);

/* Local. Applies one update to PARAMS from GRADS (and STATE_M / STATE_V), queued on `stream`. */
DEEPEP4J_API int deepep4j_moe_step(deepep4j_moe* moe, const deepep4j_optimizer* opt, void* stream);

#ifdef __cplusplus
}
#endif
#endif /* DEEPEP4J_H */
