// Shared by the files of src/capi (C++ only, not part of the cffi cdef): the handles behind pyturbo_api.h's opaque
// types, the per-thread error slot that pt_last_error() reads, guarded() that every entry point runs its body
// through, and llama.cpp's parameter structs built from our flat arguments (a memory plan must load a model exactly
// as pt_model_load does).
#pragma once

#include "pyturbo_api.h"
#include "llama.h"

#include <atomic>
#include <exception>
#include <string>
#include <vector>

struct pt_model {
    llama_model * model = nullptr;
};

struct pt_context {
    pt_model      * owner = nullptr;
    llama_context * ctx   = nullptr;
    ggml_threadpool * threadpool = nullptr; // the CPU backend's threads, kept for the context's life (see pt_context_new)
    std::atomic<bool> abort_requested{false};
    bool capturing = false; // pt_capture_begin .. pt_capture_replay: pt_decode's calls are queued, not computed
    bool dead = false;
    std::string dead_reason;

    void mark_dead(const std::string & why) {
        dead = true;
        dead_reason = "the context is unusable after a device failure: " + why;
    }
};

// The calling thread's last error (pt_last_error). Defined in pyturbo_api.cpp.
void pt_set_error(const std::string & msg);

// pt_set_error(msg), then `failed`: for entry points that return their failure value.
template <typename T>
T fail_with(const std::string & msg, T failed) {
    pt_set_error(msg);
    return failed;
}

inline const llama_vocab * vocab_of(pt_model * model) {
    return llama_model_get_vocab(model->model);
}

inline int32_t pt_fail(const std::string & msg) {
    pt_set_error(msg);
    return -1;
}

template <typename T>
T * pt_fail_null(const std::string & msg) {
    pt_set_error(msg);
    return nullptr;
}

// Runs body; any exception (ggml-rpc throws for a dead or silent server, patches/0002 and 0006) becomes on_error, with
// "<what>: <message>" in pt_last_error().
template <typename T, typename F>
T guarded(T on_error, const char * what, F && body) {
    try {
        return body();
    } catch (const std::exception & e) {
        pt_set_error(std::string(what) + ": " + e.what());
    } catch (...) {
        pt_set_error(std::string(what) + ": unknown C++ exception");
    }
    return on_error;
}

// The arrays a llama_model_params points to, kept alive while llama.cpp loads the model.
struct pt_model_arrays {
    std::vector<ggml_backend_dev_t>                   devs;
    std::vector<float>                                split;
    std::vector<llama_model_tensor_buft_override>     overrides;
};

// Fills *mp (from llama_model_default_params()) as pt_model_load documents its arguments; arrays keeps what mp points
// to. Returns "" or what is wrong with the arguments.
std::string pt_model_params(llama_model_params * mp, int32_t n_gpu_layers, int32_t split_mode, int32_t main_gpu,
                            const float * tensor_split, int32_t n_tensor_split, const char * const * devices,
                            int32_t n_devices, int32_t input_on_first_device, const char * host_tensors,
                            int32_t use_mmap, pt_model_arrays & arrays);

// llama_context_params as pt_context_new documents its arguments (n_seq_max sequences, no performance counters).
llama_context_params pt_context_params(uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch, int32_t n_threads,
                                       int32_t flash_attn, int32_t n_seq_max, int32_t kv_unified);
