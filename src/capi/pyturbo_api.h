// pyturbo's C boundary: a few flat functions over llama.h and llama-turbo.h, bound from Python with cffi.
//
// Why a shim instead of binding llama.h directly: llama.h passes large structs by value (llama_model_params,
// llama_context_params) whose layout changes between versions; an ABI-mode cffi mirror of them corrupts memory
// silently when it drifts. Here every struct crossing the boundary is ours, small and stable, and everything that
// touches llama.cpp's structs is compiled against the very headers it runs with.
//
// Errors: functions return a negative value or NULL and leave a message in pt_last_error() (per thread). No function
// lets a C++ exception or an abort escape for a condition the caller can cause.
//
// The block between the cffi markers is read by src/pyturbo/_native.py as the cdef: plain C, no preprocessor.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// cffi-begin
typedef struct pt_model   pt_model;
typedef struct pt_context pt_context;

// One (ubatch, stage) of a pipelined prefill (mirrors llama_turbo_record).
typedef struct pt_record {
    int32_t      ubatch;
    int32_t      pos0;
    int32_t      n_tokens;
    int32_t      stage;
    const char * device;
    int64_t      t_start_us;
    int64_t      t_end_us;
    const char * clock;      // "cuda-event" or "host" (see llama_turbo_record)
} pt_record;

typedef void (*pt_record_callback)(const pt_record * record, void * user_data);

typedef struct pt_prefill_result {
    int32_t  status;               // 0 ok, 2 aborted, other: failed (see error)
    int32_t  pipelined;            // 1 if the pipelined path ran
    char     fallback_reason[160]; // why the standard path ran although the pipeline was asked for
    char     error[512];
    int32_t  n_batches;
    int32_t  n_ubatches;
    int32_t  n_stages;
    int32_t  n_in_flight;
    uint64_t extra_bytes;
    int64_t  t_start_us;
    int64_t  t_end_us;
} pt_prefill_result;

typedef struct pt_model_info {
    int32_t n_layer;
    int32_t n_vocab;
    int32_t n_embd;
    int32_t n_ctx_train;
    int32_t has_vocab;
    int32_t n_stages;   // layer devices
} pt_model_info;

const char * pt_last_error(void);
int32_t      pt_has_cuda(void);
int64_t      pt_time_us(void);

// llama.cpp's log, kept in a bounded queue: pt_next_log copies the oldest line into buf and returns its level
// (ggml_log_level), or -1 when the queue is empty.
int32_t pt_next_log(char * buf, int32_t capacity);

int32_t      pt_device_count(void);
const char * pt_device_name(int32_t i);
const char * pt_device_description(int32_t i);
int32_t      pt_device_type(int32_t i);   // ggml_backend_dev_type: 0 CPU, 1 GPU, 2 integrated GPU, 3 accelerator
int32_t      pt_device_has_events(int32_t i); // 1: the device orders work with events (llama.cpp's own pipeline
                                              // parallelism needs them; a CUDA build without peer copies has none)

// Registers the devices of a llama.cpp RPC server ("host:port"). Returns how many it has, or -1.
int32_t pt_rpc_add_server(const char * endpoint);
// Serves llama.cpp RPC on endpoint with the named local device ("" = CPU) until the process ends. Returns -1 on error.
int32_t pt_rpc_serve(const char * endpoint, int32_t n_threads, const char * device);

// devices: names of the devices to split the model over, in order; NULL: llama.cpp's default (every registered
// device), an empty list: none (CPU only).
// split_mode: 0 none, 1 layer, 2 row. tensor_split: n_tensor_split proportions, or NULL.
pt_model * pt_model_load(const char * path, int32_t n_gpu_layers, int32_t split_mode, int32_t main_gpu,
                         const float * tensor_split, int32_t n_tensor_split,
                         const char * const * devices, int32_t n_devices, int32_t use_mmap);
void       pt_model_free(pt_model * model);
int32_t    pt_model_get_info(pt_model * model, pt_model_info * info);
int32_t    pt_model_stage_names(pt_model * model, const char ** names, int32_t capacity);
int32_t    pt_tokenize(pt_model * model, const char * text, int32_t text_len, int32_t * tokens, int32_t capacity, int32_t add_special);
int32_t    pt_token_to_piece(pt_model * model, int32_t token, char * buf, int32_t capacity);

// flash_attn: -1 auto, 0 off, 1 on. max_in_flight: 0 = one per stage plus one.
pt_context * pt_context_new(pt_model * model, uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch,
                            int32_t n_threads, int32_t flash_attn, int32_t max_in_flight);
void         pt_context_free(pt_context * ctx);
int32_t      pt_context_n_past(pt_context * ctx);
int32_t      pt_context_is_dead(pt_context * ctx);
void         pt_context_reset(pt_context * ctx);

// Appends tokens to sequence 0 in n_batch-sized llama_decode calls; the last token's logits are computed.
// pipeline: capture the calls and replay them pipelined (the dispatcher may still choose the standard path).
// On failure or abort, the KV cache is left as it was before the call.
int32_t pt_prefill(pt_context * ctx, const int32_t * tokens, int32_t n_tokens, int32_t pipeline,
                   pt_record_callback on_record, void * user_data, pt_prefill_result * result);
// Interrupts a running pt_prefill from any thread; it returns with status 2.
void    pt_request_abort(pt_context * ctx);
// Copies the logits of the last computed output row (n_vocab floats). Returns 0, or -1 if there is none.
int32_t pt_get_logits(pt_context * ctx, float * out);
// The serialized KV cache of sequence 0 (llama_state_seq_get_data): size, then data.
size_t  pt_state_size(pt_context * ctx);
size_t  pt_state_get(pt_context * ctx, uint8_t * dst, size_t size);

// ---- timeouts, memory and workers ----
// (src/capi/pt_faults.cpp) These functions catch everything; on failure they return -1 (or NULL) and leave a message
// in pt_faults_last_error() (per thread).
const char * pt_faults_last_error(void);

// RPC timeouts in seconds for the connection to endpoint (NULL: every endpoint without its own); <= 0 waits forever.
// connect_s bounds connecting and the handshake, io_s every later reply (a graph computation included). A worker that
// does not answer in time breaks the connection: the call fails as for a dead worker, naming it.
int32_t pt_rpc_set_timeouts(const char * endpoint, double connect_s, double io_s);
// 1: connected, 0: no connection, -1: broken (the worker closed it or did not answer in time, or it was disconnected).
// Sends nothing.
int32_t pt_rpc_connection_state(const char * endpoint);
// From any thread: closes this process's connection to endpoint; whatever waits on that worker fails at once.
int32_t pt_rpc_disconnect(const char * endpoint);
// Serves llama.cpp RPC with the named local device ("" = CPU) on a TCP socket the caller bound and made listen (so
// its port is known first); takes the socket. Returns -1 when serving fails, and does not return otherwise.
int32_t pt_rpc_serve_socket(int32_t listen_fd, int32_t n_threads, const char * device);

// Free and total bytes of a device as its backend reports them (an RPC device asks its worker). 0 or -1.
int32_t pt_device_memory(const char * device, uint64_t * free, uint64_t * total);

// Memory plans: a model loaded with llama.cpp's no_alloc (metadata only; no device allocates anything), with
// pt_model_load's arguments, tells what a context would allocate on each device before it is created.
typedef struct pt_plan pt_plan;
typedef struct pt_memory_need {
    char     device[64];   // a device name; "CPU" stands for every host buffer
    uint64_t model;        // bytes of weights
    uint64_t context;      // KV cache
    uint64_t compute;      // compute buffers
} pt_memory_need;
pt_plan * pt_plan_new(const char * path, int32_t n_gpu_layers, int32_t split_mode, int32_t main_gpu,
                      const float * tensor_split, int32_t n_tensor_split, const char * const * devices, int32_t n_devices);
void      pt_plan_free(pt_plan * plan);
// Fills up to capacity needs for a context with these parameters (pt_context_new's) and returns how many devices
// there are, or -1.
int32_t   pt_plan_needs(pt_plan * plan, uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch, int32_t flash_attn,
                        pt_memory_need * needs, int32_t capacity);
// A lower bound of the KV cache's bytes per token of context, all devices (0 when there is no simple one): checked
// before planning, since a plan for a huge n_ctx would itself take host memory in proportion.
int64_t   pt_plan_kv_bytes_per_token(pt_plan * plan);
// cffi-end

#ifdef __cplusplus
}
#endif
