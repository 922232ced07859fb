// Implementation of pyturbo_api.h. Every entry point runs its body through guarded(), which turns any C++ exception
// (ggml-rpc throws for a dead server, patches/0002) into the function's error value and pt_last_error().

#include "pt_internal.h"

#include "llama-turbo.h"
#include "llama.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-rpc.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <regex>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

thread_local std::string g_last_error;

// ---- log capture: llama.cpp's log lines go to a bounded queue that Python drains into `logging` -------------------

struct log_queue {
    std::mutex mtx;
    std::deque<std::pair<int, std::string>> lines;
    std::string partial;
    int partial_level = GGML_LOG_LEVEL_INFO;
    std::deque<std::string> recent_errors; // for error messages
};
log_queue g_log;

void log_callback(ggml_log_level level, const char * text, void * /*user*/) {
    std::lock_guard<std::mutex> lock(g_log.mtx);
    if (level != GGML_LOG_LEVEL_CONT) {
        g_log.partial_level = level;
    }
    g_log.partial += text;
    size_t nl;
    while ((nl = g_log.partial.find('\n')) != std::string::npos) {
        std::string line = g_log.partial.substr(0, nl);
        g_log.partial.erase(0, nl + 1);
        if (g_log.partial_level == GGML_LOG_LEVEL_ERROR) {
            g_log.recent_errors.push_back(line);
            if (g_log.recent_errors.size() > 8) {
                g_log.recent_errors.pop_front();
            }
        }
        g_log.lines.emplace_back(g_log.partial_level, std::move(line));
        if (g_log.lines.size() > 4096) {
            g_log.lines.pop_front();
        }
    }
}

// the last error lines llama.cpp logged since the previous call, to explain a failure
std::string take_recent_errors() {
    std::lock_guard<std::mutex> lock(g_log.mtx);
    std::string out;
    for (const auto & l : g_log.recent_errors) {
        out += (out.empty() ? "" : "; ") + l;
    }
    g_log.recent_errors.clear();
    return out;
}

void clear_recent_errors() {
    std::lock_guard<std::mutex> lock(g_log.mtx);
    g_log.recent_errors.clear();
}

void init_once(int32_t cuda_devices_per_gpu = 0) {
    static std::once_flag once;
    std::call_once(once, [cuda_devices_per_gpu] {
        llama_log_set(log_callback, nullptr);
        // ggml-cuda reads GGML_CUDA_DEVICES once, when its backend registers (in llama_backend_init). Whether the
        // user's own value wins is decided in Python (devices.decide_gpu_streams passes 0 then); setenv does not
        // overwrite it either way.
        if (cuda_devices_per_gpu > 1) {
            setenv("GGML_CUDA_DEVICES", std::to_string(cuda_devices_per_gpu).c_str(), 0);
        }
        llama_backend_init();
    });
}

// Frees llama.cpp's object behind handle, then the handle. With a dead RPC server the free may throw: what lived there
// is gone anyway, and the rest is freed.
template <typename H, typename F>
void free_handle(H * handle, const char * what, F && free_llama_object) {
    if (!handle) {
        return;
    }
    guarded<int32_t>(0, what, [&] {
        free_llama_object();
        return 0;
    });
    delete handle;
}

} // namespace

void pt_set_error(const std::string & msg) { g_last_error = msg; }

std::string pt_model_params(llama_model_params * mp, int32_t n_gpu_layers, int32_t split_mode, int32_t main_gpu,
                            const float * tensor_split, int32_t n_tensor_split, const char * const * devices,
                            int32_t n_devices, int32_t input_on_first_device, const char * host_tensors,
                            int32_t use_mmap, pt_model_arrays & arrays) {
    std::vector<ggml_backend_dev_t> & devs  = arrays.devs;
    std::vector<float>              & split = arrays.split;
    mp->n_gpu_layers = n_gpu_layers;
    mp->input_on_first_layer_device = input_on_first_device != 0;
    mp->split_mode   = (llama_split_mode) split_mode;
    mp->main_gpu     = main_gpu;
    mp->load_mode    = use_mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
    devs.clear();
    for (int32_t i = 0; devices && i < n_devices; ++i) { // NULL: llama.cpp's default; an empty list: CPU only
        devs.push_back(ggml_backend_dev_by_name(devices[i]));
        if (!devs.back()) {
            return std::string("no device named '") + devices[i] + "'";
        }
    }
    if (devices) {
        devs.push_back(nullptr);
        mp->devices = devs.data();
    }
    split.assign(llama_max_devices(), 0.0f);
    if (tensor_split && n_tensor_split > (int32_t) split.size()) {
        return "tensor_split has more entries than llama.cpp supports devices";
    }
    if (tensor_split && n_tensor_split > 0) {
        std::copy(tensor_split, tensor_split + n_tensor_split, split.begin());
        mp->tensor_split = split.data();
    }
    if (host_tensors && *host_tensors) { // llama.cpp's --override-tensor PATTERN=CPU
        try {
            std::regex check(host_tensors); // llama.cpp would throw the same error from inside the load
        } catch (const std::regex_error & e) {
            return std::string("host_tensors '") + host_tensors + "' is not a regular expression: " + e.what();
        }
        // pinned host memory where a GPU offers it: the GPU takes these weights over for the ops it runs (llama.cpp's
        // op offload) several times faster from it than from pageable memory, and asynchronously; the CPU reads it
        // as any host memory
        ggml_backend_buffer_type_t buft = ggml_backend_dev_buffer_type(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU && ggml_backend_dev_host_buffer_type(dev)) {
                buft = ggml_backend_dev_host_buffer_type(dev);
                break;
            }
        }
        arrays.overrides = {{host_tensors, buft}, {nullptr, nullptr}};
        mp->tensor_buft_overrides = arrays.overrides.data();
    }
    return "";
}

llama_context_params pt_context_params(uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch, int32_t n_threads,
                                       int32_t flash_attn, int32_t n_seq_max, int32_t kv_unified) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = n_ctx;
    cp.n_batch         = n_batch;
    cp.n_ubatch        = n_ubatch;
    cp.n_seq_max       = (uint32_t) std::max(1, n_seq_max);
    cp.kv_unified      = kv_unified != 0; // one cache for all sequences, or n_ctx / n_seq_max cells each
    cp.n_threads       = n_threads;
    cp.n_threads_batch = n_threads;
    cp.flash_attn_type = (llama_flash_attn_type) flash_attn;
    cp.no_perf         = true;
    return cp;
}

static bool abort_callback(void * data) {
    return static_cast<pt_context *>(data)->abort_requested.load();
}

extern "C" {

const char * pt_last_error(void) { return g_last_error.c_str(); }

int32_t pt_init(int32_t cuda_devices_per_gpu) {
    return guarded<int32_t>(-1, "starting llama.cpp's backends", [&] {
        init_once(cuda_devices_per_gpu);
        return 0;
    });
}

int32_t pt_has_cuda(void) { return PYTURBO_WITH_CUDA ? 1 : 0; }

int64_t pt_time_us(void) { return ggml_time_us(); }

int32_t pt_next_log(char * buf, int32_t capacity) {
    init_once();
    std::lock_guard<std::mutex> lock(g_log.mtx);
    if (g_log.lines.empty() || capacity <= 0) {
        return -1;
    }
    auto & front = g_log.lines.front();
    snprintf(buf, capacity, "%s", front.second.c_str());
    const int level = front.first;
    g_log.lines.pop_front();
    return level;
}

// ---- devices --------------------------------------------------------------------------------------------------------

static ggml_backend_dev_t device_at(int32_t i) {
    init_once();
    return i >= 0 && (size_t) i < ggml_backend_dev_count() ? ggml_backend_dev_get(i) : nullptr;
}

int32_t pt_device_count(void) {
    return guarded<int32_t>(0, "listing devices", [] {
        init_once();
        return (int32_t) ggml_backend_dev_count();
    });
}

const char * pt_device_name(int32_t i) {
    return guarded<const char *>("", "naming a device", [&] {
        ggml_backend_dev_t dev = device_at(i);
        return dev ? ggml_backend_dev_name(dev) : "";
    });
}

const char * pt_device_description(int32_t i) {
    return guarded<const char *>("", "describing a device", [&] {
        ggml_backend_dev_t dev = device_at(i);
        return dev ? ggml_backend_dev_description(dev) : "";
    });
}

int32_t pt_device_type(int32_t i) {
    return guarded<int32_t>(-1, "typing a device", [&] {
        ggml_backend_dev_t dev = device_at(i);
        return dev ? (int32_t) ggml_backend_dev_type(dev) : -1;
    });
}

int32_t pt_device_has_events(int32_t i) {
    return guarded<int32_t>(-1, "reading a device's properties", [&] {
        ggml_backend_dev_t dev = device_at(i);
        if (!dev) {
            return -1;
        }
        if (llama_turbo_dev_is_rpc(dev)) {
            return 0; // RPC devices have no events, and asking for their properties contacts the server
        }
        ggml_backend_dev_props props;
        ggml_backend_dev_get_props(dev, &props);
        return props.caps.events ? 1 : 0;
    });
}

// ---- RPC ------------------------------------------------------------------------------------------------------------

int32_t pt_rpc_add_server(const char * endpoint) {
    return guarded<int32_t>(-1, (std::string("cannot use RPC server ") + endpoint).c_str(), [&] {
        init_once();
        ggml_backend_reg_t reg = ggml_backend_rpc_add_server(endpoint);
        if (!reg) {
            return pt_fail(std::string("RPC server ") + endpoint + " reports no devices");
        }
        // registering twice would list the devices twice
        bool known = false;
        for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
            known = known || ggml_backend_reg_get(i) == reg;
        }
        if (!known) {
            ggml_backend_register(reg);
        }
        return (int32_t) ggml_backend_reg_dev_count(reg);
    });
}

// ---- models ---------------------------------------------------------------------------------------------------------

pt_model * pt_model_load(const char * path, int32_t n_gpu_layers, int32_t split_mode, int32_t main_gpu,
                         const float * tensor_split, int32_t n_tensor_split,
                         const char * const * devices, int32_t n_devices, int32_t input_on_first_device,
                         const char * host_tensors, int32_t use_mmap) {
    return guarded<pt_model *>(nullptr, (std::string("loading ") + path + " failed").c_str(), [&]() -> pt_model * {
        init_once();
        clear_recent_errors();
        llama_model_params mp = llama_model_default_params();
        pt_model_arrays arrays;
        const std::string bad = pt_model_params(&mp, n_gpu_layers, split_mode, main_gpu, tensor_split, n_tensor_split,
                                                devices, n_devices, input_on_first_device, host_tensors, use_mmap,
                                                arrays);
        if (!bad.empty()) {
            return pt_fail_null<pt_model>(bad);
        }
        llama_model * m = llama_model_load_from_file(path, mp);
        if (!m) {
            const std::string why = take_recent_errors();
            return pt_fail_null<pt_model>(std::string("llama.cpp could not load ") + path + (why.empty() ? "" : ": " + why));
        }
        return new pt_model{m};
    });
}

void pt_model_free(pt_model * model) {
    free_handle(model, "freeing the model", [&] { llama_model_free(model->model); });
}

int32_t pt_model_get_info(pt_model * model, pt_model_info * info) {
    return guarded<int32_t>(-1, "reading the model's info", [&] {
        const llama_vocab * vocab = llama_model_get_vocab(model->model);
        info->n_layer     = llama_model_n_layer(model->model);
        info->n_vocab     = llama_vocab_n_tokens(vocab);
        info->n_embd      = llama_model_n_embd(model->model);
        info->n_ctx_train = llama_model_n_ctx_train(model->model);
        info->has_vocab   = llama_vocab_type(vocab) != LLAMA_VOCAB_TYPE_NONE;
        info->n_stages    = llama_turbo_stage_names(model->model, nullptr, 0);
        return 0;
    });
}

int32_t pt_model_stage_names(pt_model * model, const char ** names, int32_t capacity) {
    return guarded<int32_t>(-1, "naming the stages", [&] { return llama_turbo_stage_names(model->model, names, capacity); });
}

// ---- contexts -------------------------------------------------------------------------------------------------------

pt_context * pt_context_new(pt_model * model, uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch,
                            int32_t n_threads, int32_t flash_attn, int32_t max_in_flight, int32_t host_staging,
                            int32_t relay_rpc, int32_t rpc_wire, int32_t n_seq_max, int32_t kv_unified) {
    return guarded<pt_context *>(nullptr, "creating the context failed", [&]() -> pt_context * {
        init_once();
        clear_recent_errors();
        const llama_context_params cp = pt_context_params(n_ctx, n_batch, n_ubatch, n_threads, flash_attn, n_seq_max,
                                                          kv_unified);
        llama_context * c = llama_init_from_model(model->model, cp);
        if (!c) {
            const std::string why = take_recent_errors();
            return pt_fail_null<pt_context>("llama.cpp could not create the context" + (why.empty() ? "" : ": " + why));
        }
        auto * ctx = new pt_context;
        ctx->owner = model;
        ctx->ctx   = c;
        if (n_threads > 1) {
            // Without a threadpool of its own, the CPU backend starts and joins n_threads threads for every graph it
            // computes, a cost per ubatch that grows with the core count even where the CPU only looks up the token
            // embeddings for GPUs, in llama.cpp's path and the pipeline's (bench/results/2026-11-26-gpu-balance.md)
            ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
            ctx->threadpool = ggml_threadpool_new(&tpp);
            if (ctx->threadpool) {
                llama_attach_threadpool(c, ctx->threadpool, ctx->threadpool);
            }
        }
        llama_set_abort_callback(c, abort_callback, ctx);
        const llama_turbo_options options = {max_in_flight, host_staging != 0, relay_rpc != 0, rpc_wire};
        llama_turbo_attach(c, &options);
        return ctx;
    });
}

void pt_context_free(pt_context * ctx) {
    free_handle(ctx, "freeing the context", [&] {
        llama_free(ctx->ctx);
        if (ctx->threadpool) {
            ggml_threadpool_free(ctx->threadpool); // after the context: nothing computes on it any more
        }
    });
}

int32_t pt_context_n_past(pt_context * ctx, int32_t seq_id) {
    return guarded<int32_t>(-1, "reading the KV cache", [&] {
        return llama_memory_seq_pos_max(llama_get_memory(ctx->ctx), seq_id) + 1;
    });
}

int32_t pt_context_is_dead(pt_context * ctx) { return ctx->dead ? 1 : 0; }

int32_t pt_context_stock_overlaps(pt_context * ctx) { return llama_turbo_stock_overlaps(ctx->ctx) ? 1 : 0; }
int32_t pt_context_n_in_flight(pt_context * ctx) { return llama_turbo_n_in_flight(ctx->ctx); }

int32_t pt_context_reset(pt_context * ctx) {
    if (ctx->dead) {
        return pt_fail(ctx->dead_reason);
    }
    const int32_t rc = guarded<int32_t>(-1, "clearing the KV cache", [&] {
        llama_memory_clear(llama_get_memory(ctx->ctx), true);
        return 0;
    });
    if (rc != 0) {
        ctx->mark_dead(g_last_error);
    }
    return rc;
}

void pt_request_abort(pt_context * ctx) { ctx->abort_requested = true; }

} // extern "C"

namespace {

// Runs a decode (body returns an enum llama_turbo_status, filling result->error when it has a reason) on a live
// context: exceptions become LLAMA_TURBO_DEVICE_FAILED, llama.cpp's logged errors are added to the message, and a
// device failure marks the context dead.
template <typename F>
int32_t run_decode(pt_context * ctx, const char * what, llama_turbo_result * result, F && body) {
    if (ctx->dead) {
        snprintf(result->error, sizeof(result->error), "%s", ctx->dead_reason.c_str());
        return result->status = LLAMA_TURBO_DEVICE_FAILED;
    }
    clear_recent_errors();
    ctx->abort_requested = false;
    const int32_t status = guarded<int32_t>(LLAMA_TURBO_DEVICE_FAILED, what, body);
    if (status == LLAMA_TURBO_OK) {
        return result->status = status;
    }
    std::string error = result->error[0] ? result->error : g_last_error;
    const std::string logged = take_recent_errors();
    if (!logged.empty() && status != LLAMA_TURBO_ABORTED) {
        error += " (llama.cpp: " + logged + ")";
    }
    if (status == LLAMA_TURBO_DEVICE_FAILED) {
        ctx->mark_dead(error);
    }
    snprintf(result->error, sizeof(result->error), "%s", error.c_str());
    return result->status = status;
}

bool seq_in_range(pt_context * ctx, int32_t seq_id) {
    return seq_id >= 0 && seq_id < (int32_t) llama_n_seq_max(ctx->ctx);
}

} // namespace

extern "C" {

int32_t pt_prefill(pt_context * ctx, int32_t seq_id, const int32_t * tokens, int32_t n_tokens, int32_t pipeline,
                   int32_t first_ubatch, llama_turbo_record_callback on_record, void * user_data,
                   llama_turbo_result * result) {
    *result = {};
    if (pipeline < LLAMA_TURBO_PIPELINE_OFF || pipeline > LLAMA_TURBO_PIPELINE_ON) {
        snprintf(result->error, sizeof(result->error), "unknown pipeline mode %d", pipeline);
        return result->status = LLAMA_TURBO_FAILED;
    }
    // the token count and the sequence are checked by llama_turbo_prefill, for every caller
    return run_decode(ctx, "prefill", result, [&] {
        return llama_turbo_prefill(ctx->ctx, tokens, n_tokens, seq_id, first_ubatch, (llama_turbo_pipeline) pipeline,
                                   on_record, user_data, result);
    });
}

int32_t pt_decode(pt_context * ctx, int32_t n_tokens, const int32_t * tokens, const int32_t * seq_ids,
                  const int8_t * want_logits, float * logits, llama_turbo_result * result) {
    *result = {};
    for (int32_t i = 0; i < n_tokens; ++i) {
        if (!seq_in_range(ctx, seq_ids[i])) {
            snprintf(result->error, sizeof(result->error), "token %d: no sequence %d in this context", i, seq_ids[i]);
            return result->status = LLAMA_TURBO_FAILED;
        }
    }
    if (n_tokens <= 0) {
        snprintf(result->error, sizeof(result->error), "no tokens");
        return result->status = LLAMA_TURBO_FAILED;
    }
    return run_decode(ctx, "decode", result, [&]() -> int32_t {
        // the batch in order of sequence (stable): with a KV cache split per sequence, llama.cpp puts tokens of
        // several sequences into one ubatch only where their ids increase by one from token to token, and would
        // otherwise compute one step of several sequences as several ubatches
        std::vector<int32_t> order(n_tokens);
        for (int32_t i = 0; i < n_tokens; ++i) {
            order[i] = i;
        }
        std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return seq_ids[a] < seq_ids[b]; });
        std::vector<llama_token>    toks(n_tokens);
        std::vector<llama_seq_id>   seqs(n_tokens);
        std::vector<llama_seq_id *> seq_ptrs(n_tokens);
        std::vector<int32_t>        n_seq(n_tokens, 1);
        std::vector<int8_t>         flags(n_tokens);
        for (int32_t j = 0; j < n_tokens; ++j) {
            toks[j]     = tokens[order[j]];
            seqs[j]     = seq_ids[order[j]];
            seq_ptrs[j] = &seqs[j];
            flags[j]    = want_logits ? (int8_t) (want_logits[order[j]] != 0) : 1;
        }
        llama_batch batch = {};
        batch.n_tokens = n_tokens;
        batch.token    = toks.data();
        batch.n_seq_id = n_seq.data();
        batch.seq_id   = seq_ptrs.data();
        batch.logits   = flags.data(); // pos: NULL, each token continues its sequence
        const int32_t status = llama_decode(ctx->ctx, batch);
        if (status != 0 || ctx->capturing || !logits) {
            return status < 0 ? (int32_t) LLAMA_TURBO_FAILED : status;
        }
        // rows in the caller's order of its flagged tokens
        const int32_t n_vocab = llama_vocab_n_tokens(vocab_of(ctx->owner));
        std::vector<int32_t> row_of(n_tokens, -1);
        for (int32_t i = 0, row = 0; i < n_tokens; ++i) {
            if (!want_logits || want_logits[i]) {
                row_of[i] = row++;
            }
        }
        for (int32_t j = 0; j < n_tokens; ++j) {
            if (flags[j]) {
                std::memcpy(logits + (size_t) row_of[order[j]] * n_vocab, llama_get_logits_ith(ctx->ctx, j),
                            sizeof(float) * n_vocab);
            }
        }
        return (int32_t) LLAMA_TURBO_OK;
    });
}

int32_t pt_capture_begin(pt_context * ctx) {
    if (ctx->dead) {
        return pt_fail(ctx->dead_reason);
    }
    if (ctx->capturing || llama_turbo_capture_begin(ctx->ctx) != 0) {
        return pt_fail("a capture is already open on this context");
    }
    ctx->capturing = true;
    return 0;
}

void pt_capture_discard(pt_context * ctx) {
    if (ctx->capturing) {
        llama_turbo_capture_discard(ctx->ctx);
        ctx->capturing = false;
    }
}

int32_t pt_capture_replay(pt_context * ctx, int32_t pipeline, llama_turbo_record_callback on_record, void * user_data,
                          llama_turbo_result * result) {
    *result = {};
    if (!ctx->capturing) {
        snprintf(result->error, sizeof(result->error), "no capture is open on this context");
        return result->status = LLAMA_TURBO_FAILED;
    }
    ctx->capturing = false;
    if (pipeline < LLAMA_TURBO_PIPELINE_OFF || pipeline > LLAMA_TURBO_PIPELINE_ON) {
        llama_turbo_capture_discard(ctx->ctx);
        snprintf(result->error, sizeof(result->error), "unknown pipeline mode %d", pipeline);
        return result->status = LLAMA_TURBO_FAILED;
    }
    return run_decode(ctx, "replay", result, [&] {
        return llama_turbo_replay(ctx->ctx, (llama_turbo_pipeline) pipeline, on_record, user_data, result);
    });
}

int32_t pt_get_logits(pt_context * ctx, float * out) {
    if (ctx->dead) {
        return pt_fail(ctx->dead_reason);
    }
    return guarded<int32_t>(-1, "reading logits failed", [&] {
        const float * logits = llama_get_logits_ith(ctx->ctx, -1);
        if (!logits) {
            return pt_fail("no logits are available");
        }
        const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx->ctx)));
        std::memcpy(out, logits, sizeof(float) * n_vocab);
        return 0;
    });
}

size_t pt_state_size(pt_context * ctx, int32_t seq_id) {
    if (ctx->dead) {
        pt_fail(ctx->dead_reason);
        return 0;
    }
    return guarded<size_t>(0, "sizing the KV cache", [&] { return llama_state_seq_get_size(ctx->ctx, seq_id); });
}

size_t pt_state_get(pt_context * ctx, int32_t seq_id, uint8_t * dst, size_t size) {
    if (ctx->dead) {
        pt_fail(ctx->dead_reason);
        return 0;
    }
    return guarded<size_t>(0, "reading the KV cache", [&] { return llama_state_seq_get_data(ctx->ctx, dst, size, seq_id); });
}

} // extern "C"

