// Intra-prompt pipelined prefill for llama.cpp contexts whose model is split layer-wise over several devices.
//
// Capture/replay: after llama_turbo_capture_begin(), llama_decode() queues its batch instead of decoding it and
// returns 0. llama_turbo_replay() then decodes everything queued, keeping several ubatches in flight so that device
// s works on ubatch k while device s+1 works on ubatch k-1. Batches that cannot be pipelined safely (see
// llama_turbo_result::fallback_reason) are decoded on the standard path instead. Results (logits, KV cache) are the
// ones the standard path gives for the same sequence of llama_decode calls.
//
// This file is pyturbo's; it is compiled into libllama (CMakeLists.txt) and uses the executor hook that
// patches/0003 adds to llama_context.
#pragma once

#include "llama.h"

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// One (ubatch, stage) of a pipelined replay. Times are on the ggml_time_us() scale; they bracket the stage's work from
// the start of its input transfer to its completion on the device. clock says how they were taken: "cuda-event"
// (timing events on the GPU's stream, mapped onto the host scale) or "host" (host clock around the stage's work;
// the stage thread waits for the device, and for an RPC device reads back a result, before it stops the clock).
struct llama_turbo_record {
    int32_t      ubatch;     // index of the ubatch within the replay
    int32_t      pos0;       // position of its first token
    int32_t      n_tokens;
    int32_t      stage;      // index among the layer devices (llama_turbo_result::stage_names), -1 for other work
    const char * device;     // backend device that ran it
    int64_t      t_start_us;
    int64_t      t_end_us;
    const char * clock;      // "cuda-event" or "host"
};

typedef void (*llama_turbo_record_callback)(const struct llama_turbo_record * record, void * user_data);

enum llama_turbo_path {
    LLAMA_TURBO_PATH_STANDARD  = 0,
    LLAMA_TURBO_PATH_PIPELINED = 1,
};

#define LLAMA_TURBO_MAX_STAGES 64

struct llama_turbo_result {
    int32_t  status;               // as llama_decode: 0 ok, 1 no KV slot, 2 aborted, < 0 error
    int32_t  path;                 // enum llama_turbo_path
    char     fallback_reason[160]; // why the standard path ran ("" when pipelined)
    char     error[256];           // what failed, when status != 0
    int32_t  n_batches;            // captured llama_decode calls
    int32_t  n_ubatches;
    int32_t  n_stages;             // layer devices of the model
    int32_t  n_in_flight;          // ubatches that could be in flight at once
    uint64_t extra_bytes;          // compute buffers of the in-flight graphs, all devices together
    int64_t  t_start_us;
    int64_t  t_end_us;
    bool     device_failed;        // a device (for example an RPC server) failed: the context is not usable
};

// Queue the following llama_decode calls of this context. Returns 0, or -1 if a capture is already open.
LLAMA_API int32_t llama_turbo_capture_begin(struct llama_context * ctx);

// Decode what was captured since llama_turbo_capture_begin() and end the capture. Returns result->status.
// On failure or abort, every position the replay added to the KV cache is removed again.
LLAMA_API int32_t llama_turbo_replay(struct llama_context * ctx, struct llama_turbo_result * result);

// Drop a capture without decoding it.
LLAMA_API void llama_turbo_capture_discard(struct llama_context * ctx);

// Called on the replaying thread for every (ubatch, stage) as it completes. NULL to remove.
LLAMA_API void llama_turbo_set_record_callback(struct llama_context * ctx, llama_turbo_record_callback callback, void * user_data);

// Most ubatches in flight at once (each holds its own compute buffers). 0: one per stage, plus one.
LLAMA_API void llama_turbo_set_max_in_flight(struct llama_context * ctx, int32_t n);

// Names of the layer devices in chain order, as used by llama_turbo_record::stage. Returns the count.
LLAMA_API int32_t llama_turbo_stage_names(const struct llama_model * model, const char ** names, int32_t capacity);

#ifdef __cplusplus
}
#endif
