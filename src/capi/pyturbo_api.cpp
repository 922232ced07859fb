// Implementation of pyturbo_api.h. Every entry point catches C++ exceptions (ggml-rpc throws for a dead server
// with patches/0002) and turns them into a return code and pt_last_error().

#include "pyturbo_api.h"

#include "llama-turbo.h"
#include "llama.h"

#include "ggml-backend.h"
#include "ggml-rpc.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
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

void init_once() {
    static std::once_flag once;
    std::call_once(once, [] {
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
    });
}

int32_t fail(const std::string & msg) {
    g_last_error = msg;
    return -1;
}

template <typename T>
T * fail_null(const std::string & msg) {
    g_last_error = msg;
    return nullptr;
}

} // namespace

struct pt_model {
    llama_model * model = nullptr;
};

struct pt_context {
    pt_model      * owner = nullptr;
    llama_context * ctx   = nullptr;
    std::atomic<bool> abort_requested{false};
    bool dead = false;
    std::string dead_reason;
};

static bool abort_callback(void * data) {
    return static_cast<pt_context *>(data)->abort_requested.load();
}

extern "C" {

const char * pt_last_error(void) { return g_last_error.c_str(); }

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

int32_t pt_device_count(void) {
    init_once();
    return (int32_t) ggml_backend_dev_count();
}

const char * pt_device_name(int32_t i) {
    init_once();
    return i >= 0 && (size_t) i < ggml_backend_dev_count() ? ggml_backend_dev_name(ggml_backend_dev_get(i)) : "";
}

int32_t pt_device_type(int32_t i) {
    init_once();
    return i >= 0 && (size_t) i < ggml_backend_dev_count() ? (int32_t) ggml_backend_dev_type(ggml_backend_dev_get(i)) : -1;
}

int32_t pt_device_has_events(int32_t i) {
    init_once();
    if (i < 0 || (size_t) i >= ggml_backend_dev_count()) {
        return -1;
    }
    ggml_backend_dev_t dev = ggml_backend_dev_get(i);
    if (strcmp(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)), "RPC") == 0) {
        return 0; // RPC devices have no events, and asking for their properties contacts the server
    }
    try {
        ggml_backend_dev_props props;
        ggml_backend_dev_get_props(dev, &props);
        return props.caps.events ? 1 : 0;
    } catch (const std::exception &) {
        return -1;
    }
}

const char * pt_device_description(int32_t i) {
    init_once();
    return i >= 0 && (size_t) i < ggml_backend_dev_count() ? ggml_backend_dev_description(ggml_backend_dev_get(i)) : "";
}

int32_t pt_rpc_add_server(const char * endpoint) {
    init_once();
    try {
        ggml_backend_reg_t reg = ggml_backend_rpc_add_server(endpoint);
        if (!reg) {
            return fail(std::string("RPC server ") + endpoint + " reports no devices");
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
    } catch (const std::exception & e) {
        return fail(std::string("cannot use RPC server ") + endpoint + ": " + e.what());
    }
}

int32_t pt_rpc_serve(const char * endpoint, int32_t n_threads, const char * device) {
    init_once();
    ggml_backend_dev_t dev = nullptr;
    if (device && device[0]) {
        dev = ggml_backend_dev_by_name(device);
    } else {
        dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    }
    if (!dev) {
        return fail(std::string("no local device named '") + (device ? device : "") + "'");
    }
    try {
        ggml_backend_rpc_start_server(endpoint, nullptr, (size_t) std::max(1, n_threads), 1, &dev);
    } catch (const std::exception & e) {
        return fail(std::string("RPC server on ") + endpoint + " failed: " + e.what());
    }
    return 0;
}

pt_model * pt_model_load(const char * path, int32_t n_gpu_layers, int32_t split_mode, int32_t main_gpu,
                         const float * tensor_split, int32_t n_tensor_split,
                         const char * const * devices, int32_t n_devices, int32_t use_mmap) {
    init_once();
    clear_recent_errors();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = n_gpu_layers;
    mp.split_mode   = (llama_split_mode) split_mode;
    mp.main_gpu     = main_gpu;
    mp.load_mode    = use_mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;

    std::vector<ggml_backend_dev_t> devs;
    if (devices) { // an empty list means: no offload devices (CPU only)
        for (int32_t i = 0; i < n_devices; ++i) {
            ggml_backend_dev_t d = ggml_backend_dev_by_name(devices[i]);
            if (!d) {
                return fail_null<pt_model>(std::string("no device named '") + devices[i] + "'");
            }
            devs.push_back(d);
        }
        devs.push_back(nullptr);
        mp.devices = devs.data();
    }
    std::vector<float> split(llama_max_devices(), 0.0f);
    if (tensor_split && n_tensor_split > 0) {
        if ((size_t) n_tensor_split > split.size()) {
            return fail_null<pt_model>("tensor_split has more entries than llama.cpp supports devices");
        }
        std::copy(tensor_split, tensor_split + n_tensor_split, split.begin());
        mp.tensor_split = split.data();
    }
    try {
        llama_model * m = llama_model_load_from_file(path, mp);
        if (!m) {
            const std::string why = take_recent_errors();
            return fail_null<pt_model>(std::string("llama.cpp could not load ") + path + (why.empty() ? "" : ": " + why));
        }
        return new pt_model{m};
    } catch (const std::exception & e) {
        return fail_null<pt_model>(std::string("loading ") + path + " failed: " + e.what());
    }
}

void pt_model_free(pt_model * model) {
    if (!model) {
        return;
    }
    try {
        llama_model_free(model->model);
    } catch (const std::exception &) {
        // a dead RPC server: its buffers are gone anyway
    }
    delete model;
}

int32_t pt_model_get_info(pt_model * model, pt_model_info * info) {
    const llama_vocab * vocab = llama_model_get_vocab(model->model);
    info->n_layer     = llama_model_n_layer(model->model);
    info->n_vocab     = llama_vocab_n_tokens(vocab);
    info->n_embd      = llama_model_n_embd(model->model);
    info->n_ctx_train = llama_model_n_ctx_train(model->model);
    info->has_vocab   = llama_vocab_type(vocab) != LLAMA_VOCAB_TYPE_NONE;
    info->n_stages    = llama_turbo_stage_names(model->model, nullptr, 0);
    return 0;
}

int32_t pt_model_stage_names(pt_model * model, const char ** names, int32_t capacity) {
    return llama_turbo_stage_names(model->model, names, capacity);
}

int32_t pt_tokenize(pt_model * model, const char * text, int32_t text_len, int32_t * tokens, int32_t capacity, int32_t add_special) {
    const llama_vocab * vocab = llama_model_get_vocab(model->model);
    return llama_tokenize(vocab, text, text_len, tokens, capacity, add_special != 0, false);
}

int32_t pt_token_to_piece(pt_model * model, int32_t token, char * buf, int32_t capacity) {
    const llama_vocab * vocab = llama_model_get_vocab(model->model);
    return llama_token_to_piece(vocab, token, buf, capacity, 0, false);
}

pt_context * pt_context_new(pt_model * model, uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch,
                            int32_t n_threads, int32_t flash_attn, int32_t max_in_flight) {
    init_once();
    clear_recent_errors();
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = n_ctx;
    cp.n_batch         = n_batch;
    cp.n_ubatch        = n_ubatch;
    cp.n_seq_max       = 1;
    cp.n_threads       = n_threads;
    cp.n_threads_batch = n_threads;
    cp.flash_attn_type = (llama_flash_attn_type) flash_attn;
    cp.no_perf         = true;
    try {
        llama_context * c = llama_init_from_model(model->model, cp);
        if (!c) {
            const std::string why = take_recent_errors();
            return fail_null<pt_context>("llama.cpp could not create the context" + (why.empty() ? "" : ": " + why));
        }
        auto * ctx = new pt_context;
        ctx->owner = model;
        ctx->ctx   = c;
        llama_set_abort_callback(c, abort_callback, ctx);
        llama_turbo_set_max_in_flight(c, max_in_flight);
        return ctx;
    } catch (const std::exception & e) {
        return fail_null<pt_context>(std::string("creating the context failed: ") + e.what());
    }
}

void pt_context_free(pt_context * ctx) {
    if (!ctx) {
        return;
    }
    try {
        llama_free(ctx->ctx);
    } catch (const std::exception &) {
        // a dead RPC server: nothing left to free there
    }
    delete ctx;
}

int32_t pt_context_n_past(pt_context * ctx) {
    return llama_memory_seq_pos_max(llama_get_memory(ctx->ctx), 0) + 1;
}

int32_t pt_context_is_dead(pt_context * ctx) { return ctx->dead ? 1 : 0; }

void pt_context_reset(pt_context * ctx) {
    try {
        llama_memory_clear(llama_get_memory(ctx->ctx), true);
    } catch (const std::exception & e) {
        // clearing writes to every device's KV buffer: a dead RPC server throws here; the next call reports it
        ctx->dead = true;
        ctx->dead_reason = std::string("the context is unusable after a device failure: ") + e.what();
    }
}

void pt_request_abort(pt_context * ctx) { ctx->abort_requested = true; }

namespace {

struct record_forward {
    pt_record_callback cb;
    void * user;
};

void forward_record(const llama_turbo_record * r, void * data) {
    auto * fw = static_cast<record_forward *>(data);
    pt_record out = {r->ubatch, r->pos0, r->n_tokens, r->stage, r->device, r->t_start_us, r->t_end_us, r->clock};
    fw->cb(&out, fw->user);
}

// The batches of one prefill: n_batch tokens each, positions continuing the sequence, logits for the last token only.
struct prefill_batches {
    std::vector<llama_pos>      pos;
    std::vector<int32_t>        n_seq_id;
    std::vector<llama_seq_id>   seq_zero;
    std::vector<llama_seq_id *> seq_id;
    std::vector<int8_t>         logits;

    prefill_batches(int32_t n_tokens, llama_pos p0)
        : pos(n_tokens), n_seq_id(n_tokens, 1), seq_zero(1, 0), seq_id(n_tokens, seq_zero.data()), logits(n_tokens, 0) {
        for (int32_t i = 0; i < n_tokens; ++i) {
            pos[i] = p0 + i;
        }
        logits[n_tokens - 1] = 1;
    }

    llama_batch chunk(const int32_t * tokens, int32_t i0, int32_t n) {
        llama_batch b = {};
        b.n_tokens = n;
        b.token    = const_cast<int32_t *>(tokens) + i0;
        b.pos      = pos.data() + i0;
        b.n_seq_id = n_seq_id.data() + i0;
        b.seq_id   = seq_id.data() + i0;
        b.logits   = logits.data() + i0;
        return b;
    }
};

} // namespace

int32_t pt_prefill(pt_context * ctx, const int32_t * tokens, int32_t n_tokens, int32_t pipeline,
                   pt_record_callback on_record, void * user_data, pt_prefill_result * result) {
    *result = {};
    if (ctx->dead) {
        snprintf(result->error, sizeof(result->error), "%s", ctx->dead_reason.c_str());
        return result->status = -1;
    }
    if (n_tokens <= 0) {
        snprintf(result->error, sizeof(result->error), "no tokens");
        return result->status = -1;
    }
    clear_recent_errors();
    ctx->abort_requested = false;

    llama_context * c = ctx->ctx;
    const llama_pos p0 = pt_context_n_past(ctx);
    const int32_t n_batch = (int32_t) llama_n_batch(c);
    prefill_batches batches(n_tokens, p0);
    record_forward fw = {on_record, user_data};

    int32_t status = 0;
    bool device_failed = false;
    std::string error;
    result->t_start_us = ggml_time_us();
    try {
        if (pipeline) {
            llama_turbo_set_record_callback(c, on_record ? forward_record : nullptr, &fw);
            llama_turbo_capture_begin(c);
            for (int32_t i0 = 0; i0 < n_tokens && status == 0; i0 += n_batch) {
                status = llama_decode(c, batches.chunk(tokens, i0, std::min(n_batch, n_tokens - i0)));
            }
            if (status != 0) {
                llama_turbo_capture_discard(c);
            } else {
                llama_turbo_result tr = {};
                status = llama_turbo_replay(c, &tr);
                result->pipelined   = tr.path == LLAMA_TURBO_PATH_PIPELINED;
                result->n_batches   = tr.n_batches;
                result->n_ubatches  = tr.n_ubatches;
                result->n_stages    = tr.n_stages;
                result->n_in_flight = tr.n_in_flight;
                result->extra_bytes = tr.extra_bytes;
                snprintf(result->fallback_reason, sizeof(result->fallback_reason), "%s", tr.fallback_reason);
                if (status != 0) {
                    error = tr.error;
                }
                device_failed = tr.device_failed;
            }
            llama_turbo_set_record_callback(c, nullptr, nullptr);
        } else {
            for (int32_t i0 = 0; i0 < n_tokens && status == 0; i0 += n_batch) {
                if (ctx->abort_requested) {
                    status = 2;
                    break;
                }
                status = llama_decode(c, batches.chunk(tokens, i0, std::min(n_batch, n_tokens - i0)));
            }
            result->n_batches = (n_tokens + n_batch - 1) / n_batch;
            result->n_ubatches = (n_tokens + (int32_t) llama_n_ubatch(c) - 1) / (int32_t) llama_n_ubatch(c);
            if (status != 0) {
                llama_memory_seq_rm(llama_get_memory(c), 0, p0, -1);
            }
        }
        // llama_decode returns with the last ubatch possibly still queued on an asynchronous device (CUDA): the
        // prefill ends when it is done, or timings would leave out its tail
        llama_synchronize(c);
    } catch (const std::exception & e) {
        // a device failed inside llama.cpp's own path (for example an RPC server died during llama_decode)
        llama_turbo_set_record_callback(c, nullptr, nullptr);
        status = -1;
        device_failed = true;
        error = e.what();
    }
    result->t_end_us = ggml_time_us();

    if (status != 0) {
        const std::string logged = take_recent_errors();
        if (error.empty()) {
            error = status == 2 ? "aborted" : "llama_decode failed with status " + std::to_string(status);
        }
        if (!logged.empty() && status != 2) {
            error += " (llama.cpp: " + logged + ")";
        }
        if (device_failed) {
            ctx->dead = true;
            ctx->dead_reason = "the context is unusable after a device failure: " + error;
        }
        snprintf(result->error, sizeof(result->error), "%s", error.c_str());
    }
    result->status = status;
    return status;
}

int32_t pt_get_logits(pt_context * ctx, float * out) {
    try {
        const float * logits = llama_get_logits_ith(ctx->ctx, -1);
        if (!logits) {
            return fail("no logits are available");
        }
        const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx->ctx)));
        std::memcpy(out, logits, sizeof(float) * n_vocab);
        return 0;
    } catch (const std::exception & e) {
        return fail(std::string("reading logits failed: ") + e.what());
    }
}

size_t pt_state_size(pt_context * ctx) {
    try {
        return llama_state_seq_get_size(ctx->ctx, 0);
    } catch (const std::exception & e) {
        g_last_error = e.what();
        return 0;
    }
}

size_t pt_state_get(pt_context * ctx, uint8_t * dst, size_t size) {
    try {
        return llama_state_seq_get_data(ctx->ctx, dst, size, 0);
    } catch (const std::exception & e) {
        g_last_error = e.what();
        return 0;
    }
}

} // extern "C"

// For the other files of this library (src/capi/pt_sampling.cpp), which cannot see the structs or the error slot.
llama_model   * pt_internal_model(pt_model * model) { return model->model; }
llama_context * pt_internal_context(pt_context * ctx) { return ctx->ctx; }
void            pt_internal_set_error(const std::string & msg) { g_last_error = msg; }
