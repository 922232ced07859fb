// pyturbo's C boundary: a few flat functions over llama.h and llama-turbo.h, bound from Python with cffi.
//
// Why a shim instead of binding llama.h directly: llama.h passes large structs by value (llama_model_params,
// llama_context_params) whose layout changes between versions; an ABI-mode cffi mirror of them corrupts memory
// silently when it drifts. Here every struct crossing the boundary is ours, small and stable, and everything that
// touches llama.cpp's structs is compiled against the very headers it runs with.
//
// Errors: functions return a negative value or NULL and leave a message in pt_last_error() (per thread). Every entry
// point catches every C++ exception (ggml-rpc throws for a dead server, patches/0002).
//
// The block between the cffi markers is read by src/pyturbo/_native.py as the cdef, after the one of llama-turbo.h
// (the prefill's result and timing record are the executor's own structs): plain C, no preprocessor.
#pragma once

#include "llama-turbo.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// cffi-begin
typedef struct pt_model   pt_model;
typedef struct pt_context pt_context;

typedef struct pt_model_info {
    int32_t n_layer;
    int32_t n_vocab;
    int32_t n_embd;
    int32_t n_ctx_train;
    int32_t has_vocab;
    int32_t n_stages;   // layer devices
} pt_model_info;

const char * pt_last_error(void);
// Starts llama.cpp's backends, once per process; the first call wins. cuda_devices_per_gpu > 1 makes the CUDA backend
// expose each GPU as that many devices, each with its own stream (GGML_CUDA_DEVICES, unless the environment already
// sets it). Every other function starts the backends with the default if this was not called first.
int32_t      pt_init(int32_t cuda_devices_per_gpu);
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

// devices: names of the devices to split the model over, in order; NULL: llama.cpp's default (every registered
// device), an empty list: none (CPU only).
// split_mode: 0 none, 1 layer, 2 row. tensor_split: n_tensor_split proportions, or NULL. input_on_first_device: the
// token embeddings on the first layer's device instead of the CPU (patches/0012). host_tensors: NULL, or a regular
// expression; the weights whose names it matches stay in host memory and run on the CPU (llama.cpp's
// --override-tensor PATTERN=CPU, e.g. "exps" for the experts of a mixture-of-experts model).
pt_model * pt_model_load(const char * path, int32_t n_gpu_layers, int32_t split_mode, int32_t main_gpu,
                         const float * tensor_split, int32_t n_tensor_split,
                         const char * const * devices, int32_t n_devices, int32_t input_on_first_device,
                         const char * host_tensors, int32_t use_mmap);
void       pt_model_free(pt_model * model);
int32_t    pt_model_get_info(pt_model * model, pt_model_info * info);
int32_t    pt_model_stage_names(pt_model * model, const char ** names, int32_t capacity);

// flash_attn: -1 auto, 0 off, 1 on. max_in_flight: 0 = the executor's default (pt_context_n_in_flight). host_staging,
// relay_rpc, rpc_wire (enum llama_turbo_wire): see llama_turbo_options. n_seq_max: the sequences (0 .. n_seq_max - 1)
// of the context, as llama-server's slots; kv_unified: they share the n_ctx KV cells (a token attends over the range
// of every sequence's cells), else each has n_ctx / n_seq_max cells of its own.
pt_context * pt_context_new(pt_model * model, uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch,
                            int32_t n_threads, int32_t flash_attn, int32_t max_in_flight, int32_t host_staging,
                            int32_t relay_rpc, int32_t rpc_wire, int32_t n_seq_max, int32_t kv_unified);
void         pt_context_free(pt_context * ctx);
int32_t      pt_context_n_past(pt_context * ctx, int32_t seq_id); // positions the sequence holds
int32_t      pt_context_is_dead(pt_context * ctx);
int32_t      pt_context_stock_overlaps(pt_context * ctx); // llama_turbo_stock_overlaps
int32_t      pt_context_n_in_flight(pt_context * ctx);    // llama_turbo_n_in_flight
// Clears the KV cache. Returns 0, or -1 when a device failed (the context is then dead).
int32_t      pt_context_reset(pt_context * ctx);

// Appends tokens to sequence seq_id, positions continuing the sequence, the last token's logits computed
// (llama_turbo_prefill: the executor cuts the prompt into the n_batch-sized llama_decode calls of the standard path,
// the first of first_ubatch tokens when it is > 0, so that the first ubatch has that many), on the pipelined path if
// `pipeline` (enum llama_turbo_pipeline) asks for it and it is safe, else the standard path. Returns result->status
// (enum llama_turbo_status); on failure or abort the KV cache is as it was before the call, and after
// LLAMA_TURBO_DEVICE_FAILED the context is dead.
int32_t pt_prefill(pt_context * ctx, int32_t seq_id, const int32_t * tokens, int32_t n_tokens, int32_t pipeline,
                   int32_t first_ubatch, llama_turbo_record_callback on_record, void * user_data,
                   struct llama_turbo_result * result);
// One plain llama_decode call: token i is appended to sequence seq_ids[i] (several sequences may take a step together,
// as llama-server's slots do). The logits of the tokens with want_logits[i] != 0 (every token when want_logits is
// NULL) are copied to `logits`, n_vocab floats per token in order (not while a capture is open, nor when logits is
// NULL). Returns result->status (LLAMA_TURBO_NO_KV_SLOT: no room; the cache is as before).
int32_t pt_decode(pt_context * ctx, int32_t n_tokens, const int32_t * tokens, const int32_t * seq_ids,
                  const int8_t * want_logits, float * logits, struct llama_turbo_result * result);
// Capture/replay around plain llama_decode calls (pt_decode): after pt_capture_begin, pt_decode's calls are queued
// (they return OK, computing nothing); pt_capture_replay decodes them as one series, pipelined if asked and safe,
// with the results the standard path gives for the same calls. Returns 0/-1, and result->status.
int32_t pt_capture_begin(pt_context * ctx);
int32_t pt_capture_replay(pt_context * ctx, int32_t pipeline, llama_turbo_record_callback on_record, void * user_data,
                          struct llama_turbo_result * result);
void    pt_capture_discard(pt_context * ctx); // drops what was queued (nothing when no capture is open)
// Interrupts a running pt_prefill from any thread; it returns with LLAMA_TURBO_ABORTED.
void    pt_request_abort(pt_context * ctx);
// Copies the logits of the last computed output row (n_vocab floats). Returns 0, or -1 if there is none.
int32_t pt_get_logits(pt_context * ctx, float * out);
// The serialized KV cache of a sequence (llama_state_seq_get_data): size, then data.
size_t  pt_state_size(pt_context * ctx, int32_t seq_id);
size_t  pt_state_get(pt_context * ctx, int32_t seq_id, uint8_t * dst, size_t size);

// ---- generation (src/capi/pt_generation.cpp) ----
// A llama.cpp sampler chain (llama_sampler_chain_init) built from these settings, in llama.cpp's usual order:
// logit bias, penalties, top-k, top-p, min-p, temperature, then a seeded draw; temperature <= 0 picks the most
// likely token after bias and penalties (llama's greedy sampler: the first maximum, as numpy's argmax).
typedef struct pt_sampler pt_sampler;

typedef struct pt_sampler_params {
    float    temperature;       // <= 0: greedy
    int32_t  top_k;             // <= 0: off
    float    top_p;             // >= 1: off
    float    min_p;             // <= 0: off
    uint32_t seed;
    int32_t  penalty_last_n;    // tokens the penalties look back over; 0: no penalties
    float    repeat_penalty;    // 1: off
    float    frequency_penalty; // 0: off
    float    presence_penalty;  // 0: off
} pt_sampler_params;

typedef struct pt_logit_bias {
    int32_t token;
    float   bias;
} pt_logit_bias;

pt_sampler * pt_sampler_new(pt_model * model, const pt_sampler_params * params, const pt_logit_bias * bias, int32_t n_bias);
void         pt_sampler_free(pt_sampler * sampler);
// Picks a token from n_vocab logits and records it in the sampler's history (penalties). Returns it, or -1.
int32_t      pt_sampler_sample(pt_sampler * sampler, const float * logits, int32_t n_vocab);
// Records tokens in the history without sampling (the prompt, for the penalties). Returns 0, or -1.
int32_t      pt_sampler_accept(pt_sampler * sampler, const int32_t * tokens, int32_t n_tokens);

// Drops every position >= n_keep from a sequence of the KV cache (reuse of a common prompt prefix). Returns 0, or
// -1 when the cache cannot be cut there (then reset it).
int32_t pt_context_truncate(pt_context * ctx, int32_t seq_id, int32_t n_keep);
// Makes dst_seq hold the first n_tokens positions of src_seq (and nothing else; a prompt prefix common to two
// sequences): in a unified KV cache the cells are shared, not copied; else src's cells are copied into dst's (on the
// next decode). Returns 0 or -1.
int32_t pt_context_copy_prefix(pt_context * ctx, int32_t src_seq, int32_t dst_seq, int32_t n_tokens);

// ---- vocabulary (src/capi/pt_vocab.cpp) ----
// llama_tokenize: returns the token count, or -(tokens needed) when capacity is too small (INT32_MIN: it failed).
// parse_special: text such as "<s>" becomes the special token (chat templates need it).
int32_t pt_tokenize_special(pt_model * model, const char * text, int32_t text_len, int32_t * tokens, int32_t capacity,
                            int32_t add_special, int32_t parse_special);
int32_t pt_token_is_eog(pt_model * model, int32_t token);   // 1: end of generation (EOS, EOT, ...), 0: not
int32_t pt_token_bos(pt_model * model);                     // -1 when the vocabulary has none
int32_t pt_token_eos(pt_model * model);
// A token's text as the vocabulary stores it ("<s>" for BOS). Returns its length (more than capacity: call again
// with that much), or -1.
int32_t pt_token_text(pt_model * model, int32_t token, char * buf, int32_t capacity);
// The GGUF's chat template (tokenizer.chat_template). Returns its length (more than capacity: call again with that
// much), 0 when the model has none, or -1.
int32_t pt_model_chat_template(pt_model * model, char * buf, int32_t capacity);
// llama_token_to_piece: a token's bytes as generated text; returns their length, or -(length) when capacity is short.
int32_t pt_token_to_piece(pt_model * model, int32_t token, char * buf, int32_t capacity);

// ---- RPC workers and memory (src/capi/pt_workers_memory.cpp) ----
// On failure these return -1 (or NULL) and leave a message in pt_last_error().

// RPC timeouts in seconds for the connection to endpoint (NULL: every endpoint without its own); <= 0 waits forever.
// connect_s bounds connecting and the handshake, io_s every later reply (a graph computation included). A worker that
// does not answer in time breaks the connection: the call fails as for a dead worker, naming it.
int32_t pt_rpc_set_timeouts(const char * endpoint, double connect_s, double io_s);
// 1: connected, 0: no connection, -1: broken (the worker closed it or did not answer in time, or it was disconnected).
// Sends nothing.
int32_t pt_rpc_connection_state(const char * endpoint);
// Bytes sent to endpoint's worker and received from it over this process's connection so far (0 without one).
int32_t pt_rpc_traffic(const char * endpoint, uint64_t * sent, uint64_t * received);
// From any thread: closes this process's connection to endpoint; whatever waits on that worker fails at once.
int32_t pt_rpc_disconnect(const char * endpoint);
// The shared secret of this process's RPC connections, as client and as worker (NULL or "": none). Takes effect for
// connections made after it; a worker with one serves only clients that prove they know it (patches/0010).
int32_t pt_rpc_set_secret(const char * secret);
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
                      const float * tensor_split, int32_t n_tensor_split, const char * const * devices, int32_t n_devices,
                      int32_t input_on_first_device, const char * host_tensors);
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
