// Intra-prompt pipelined prefill for llama.cpp contexts whose model is split layer-wise over several devices.
//
// Capture/replay: after llama_turbo_capture_begin(), llama_decode() queues its batch instead of decoding it and
// returns 0. llama_turbo_replay() then decodes everything queued, on one of two paths: pipelined (several ubatches in
// flight, device s working on ubatch k while device s+1 works on ubatch k-1) or standard (llama.cpp's own decode, one
// batch after the other). Which one is decided per replay from what was asked (enum llama_turbo_pipeline) and what is
// safe (llama_turbo_result::fallback_reason says why the standard path ran). Either way the results
// (logits, KV cache) are the ones the standard path gives for the same sequence of llama_decode calls.
//
// This is pyturbo's code, compiled into libllama (CMakeLists.txt) through the executor hook that patches/0003 adds to
// llama_context. The files of this folder: turbo-replay.cpp (capture, the path decision, replay: start here),
// turbo-slots.cpp (one scheduler per ubatch in flight), turbo-stages.cpp (stage threads, split planning, staging),
// turbo-clock.cpp (per-stage timing), turbo.h (the executor's state, shared by those files).
#pragma once

#include "llama.h"

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The block between the cffi markers is also read by pyturbo's Python binding (src/pyturbo/_native.py) as part of
// its cdef: plain C, no preprocessor.
// cffi-begin
// How a replay ended. The first three are llama_decode's own codes.
enum llama_turbo_status {
    LLAMA_TURBO_OK            =  0,
    LLAMA_TURBO_NO_KV_SLOT    =  1,  // the KV cache has no room for the batch
    LLAMA_TURBO_ABORTED       =  2,  // the context's abort callback asked to stop
    LLAMA_TURBO_FAILED        = -1,  // see llama_turbo_result::error
    LLAMA_TURBO_DEVICE_FAILED = -2,  // a device (for example an RPC server) failed: the context is no longer usable
};

// What the caller asks of a replay. Whether pipelining is *useful* on a layout is decided by the caller (pyturbo's
// Python policy, from measurements); the executor decides whether it is *safe*.
enum llama_turbo_pipeline {
    LLAMA_TURBO_PIPELINE_OFF = 0,  // the standard path
    LLAMA_TURBO_PIPELINE_ON  = 1,  // pipelined wherever it is safe
};

// The path a replay took.
enum llama_turbo_path {
    LLAMA_TURBO_PATH_STANDARD  = 0,
    LLAMA_TURBO_PATH_PIPELINED = 1,
};

// One (ubatch, stage) of a pipelined replay. Times are on the ggml_time_us() scale; they bracket the stage's work from
// the start of its input transfer to its completion on the device. clock says how they were taken: "cuda-event"
// (timing events on the GPU's stream, mapped onto the host scale) or "host" (host clock around the stage's work;
// the stage thread waits for the device, and for an RPC device reads back a result, before it stops the clock).
struct llama_turbo_record {
    int32_t      ubatch;     // index of the ubatch within the replay
    int32_t      pos0;       // position of its first token
    int32_t      n_tokens;
    int32_t      stage;      // index among the layer devices (llama_turbo_stage_names), -1 for other work
    const char * device;     // backend device that ran it
    int64_t      t_start_us;
    int64_t      t_end_us;
    const char * clock;      // "cuda-event" or "host"
};

typedef void (*llama_turbo_record_callback)(const struct llama_turbo_record * record, void * user_data);

struct llama_turbo_result {
    int32_t  status;               // enum llama_turbo_status
    int32_t  path;                 // enum llama_turbo_path
    char     fallback_reason[192]; // why the standard path ran ("" when pipelined)
    char     error[512];           // what failed, when status is not LLAMA_TURBO_OK
    int32_t  n_ubatches;
    int32_t  n_stages;             // layer devices of the model
    int32_t  n_in_flight;          // ubatches that could be in flight at once (pipelined path)
    uint64_t slot_buffer_bytes;    // compute buffers of all in-flight slots, all devices together (pipelined path)
    int64_t  t_start_us;
    int64_t  t_end_us;             // after the last ubatch has completed on every device
    // where the host's time goes (pipelined path; 0 otherwise), on the same clock:
    int64_t  t_first_submit_us;    // the first ubatch reached the executor (llama.cpp's batch and KV bookkeeping done)
    int64_t  t_first_queued_us;    // its graph was built, allocated, given its inputs and handed to the stage threads
    int64_t  host_submit_us;       // the host's time building and handing over the graphs of all ubatches (not
                                   // counting its waits for a free slot)
    char     transfers[256];       // how tensors went between RPC servers on the pipelined path: "server-to-server",
                                   // "through this process", with the reason when not directly ("" when none did)
};
// cffi-end

// How activations travel between RPC servers that copy to each other (llama_turbo_options::rpc_wire).
enum llama_turbo_wire {
    LLAMA_TURBO_WIRE_EXACT = 0,  // as computed (F32): bit-identical results
    LLAMA_TURBO_WIRE_F16   = 1,  // half the bytes, rounded to F16 on the way (results within a tolerance)
    LLAMA_TURBO_WIRE_BF16  = 2,  // half the bytes, rounded to BF16
};

// Settings of a context's executor, fixed when it is attached.
struct llama_turbo_options {
    int32_t max_in_flight;  // most ubatches in flight at once (each holds its own compute buffers); 0: stages + 1
    bool    host_staging;   // stage every transfer between devices through host memory (the path of GPUs that cannot
                            // copy to each other; tests force it with this)
    bool    relay_rpc;      // tensors between RPC servers go through this process even where the servers could send
                            // them to each other (the comparison the direct copies are measured against)
    int32_t rpc_wire;       // enum llama_turbo_wire: the format of server-to-server copies
};

// Installs the executor on ctx (once; a second call returns -1).
LLAMA_API int32_t llama_turbo_attach(struct llama_context * ctx, const struct llama_turbo_options * options);

// Queue the following llama_decode calls of this context. Returns 0, or -1 if none is attached or a capture is open.
LLAMA_API int32_t llama_turbo_capture_begin(struct llama_context * ctx);

// Decode what was captured since llama_turbo_capture_begin() and end the capture. Returns result->status.
// On failure or abort, every position the replay added to the KV cache is removed again. Never throws.
LLAMA_API int32_t llama_turbo_replay(struct llama_context * ctx, enum llama_turbo_pipeline pipeline,
                                     llama_turbo_record_callback on_record, void * user_data,
                                     struct llama_turbo_result * result);

// Append a prompt to sequence seq_id (positions continue the sequence; the last token's logits are computed), as the
// llama_decode calls a caller would make of it, n_batch tokens each (the first of first_call tokens when first_call > 0,
// so that the first ubatch has that many), replayed as one series: the same as llama_turbo_capture_begin(), those
// calls, then llama_turbo_replay(), without building the calls' batches. Returns result->status.
LLAMA_API int32_t llama_turbo_prefill(struct llama_context * ctx, const llama_token * tokens, int32_t n_tokens,
                                      llama_seq_id seq_id, int32_t first_call, enum llama_turbo_pipeline pipeline,
                                      llama_turbo_record_callback on_record, void * user_data,
                                      struct llama_turbo_result * result);

// Drop a capture without decoding it.
LLAMA_API void llama_turbo_capture_discard(struct llama_context * ctx);

// Names of the layer devices in chain order, as used by llama_turbo_record::stage. Returns the count.
LLAMA_API int32_t llama_turbo_stage_names(const struct llama_model * model, const char ** names, int32_t capacity);

// Whether llama.cpp's own pipeline parallelism is on for ctx (every device has events and async copies): then its
// standard path already overlaps the ubatches of a prompt over the devices, to some degree.
LLAMA_API bool llama_turbo_stock_overlaps(const struct llama_context * ctx);

// How many ubatches the pipelined path keeps in flight on ctx (each with its own compute buffers): the options'
// max_in_flight, or the layer devices + 1. -1 without an executor.
LLAMA_API int32_t llama_turbo_n_in_flight(const struct llama_context * ctx);

// Whether dev is a device of a llama.cpp RPC server (its work runs on another process, asking it anything is a
// network round trip).
LLAMA_API bool llama_turbo_dev_is_rpc(ggml_backend_dev_t dev);

#ifdef __cplusplus
}
#endif
