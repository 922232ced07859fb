// The "RPC workers and memory" part of pyturbo_api.h: RPC timeouts and disconnection (patches/0006), serving on a
// socket the caller bound (patches/0007), device memory, and memory plans: what a model or a context would allocate
// on each device, learned from llama.cpp's own no_alloc mode without allocating it. Every function catches everything.

#include "pt_internal.h"

#include "llama-ext.h"
#include "llama.h"

#include "ggml-backend.h"
#include "ggml-rpc.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <string>
#include <vector>

namespace {

int to_ms(double seconds) {
    return seconds > 0 ? (int) std::lround(std::min(seconds, 2e6) * 1000.0) : 0;
}

} // namespace

struct pt_plan {
    llama_model * model = nullptr;
};

extern "C" {

int32_t pt_rpc_set_timeouts(const char * endpoint, double connect_s, double io_s) {
    return guarded<int32_t>(-1, "setting RPC timeouts", [&] {
        ggml_backend_rpc_set_timeouts(endpoint, to_ms(connect_s), to_ms(io_s));
        return 0;
    });
}

int32_t pt_rpc_set_secret(const char * secret) {
    return guarded<int32_t>(-1, "setting the RPC secret", [&] {
        ggml_backend_rpc_set_auth_secret(secret);
        return 0;
    });
}

int32_t pt_rpc_traffic(const char * endpoint, uint64_t * sent, uint64_t * received) {
    return guarded<int32_t>(-1, "reading RPC traffic", [&] {
        ggml_backend_rpc_traffic(endpoint, sent, received);
        return 0;
    });
}

int32_t pt_rpc_connection_state(const char * endpoint) {
    return guarded<int32_t>(-1, "checking the RPC connection", [&] { return (int32_t) ggml_backend_rpc_connection_state(endpoint); });
}

int32_t pt_rpc_disconnect(const char * endpoint) {
    return guarded<int32_t>(-1, "closing the RPC connection", [&] {
        ggml_backend_rpc_disconnect(endpoint);
        return 0;
    });
}

int32_t pt_rpc_serve_socket(int32_t listen_fd, int32_t n_threads, const char * device) {
    return guarded<int32_t>(-1, "serving RPC", [&] {
        pt_device_count(); // initializes the backends and the log capture
        ggml_backend_dev_t dev = device && device[0] ? ggml_backend_dev_by_name(device)
                                                     : ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (!dev) {
            return pt_fail(std::string("no local device named '") + (device ? device : "") + "'");
        }
        ggml_backend_rpc_start_server_on_socket(listen_fd, nullptr, (size_t) std::max(1, n_threads), 1, &dev);
        return pt_fail("the RPC server stopped (see its output above)"); // it returns only when it fails
    });
}

int32_t pt_device_memory(const char * device, uint64_t * free, uint64_t * total) {
    return guarded<int32_t>(-1, device, [&] {
        ggml_backend_dev_t dev = ggml_backend_dev_by_name(device);
        if (!dev) {
            return pt_fail(std::string("no device named '") + device + "'");
        }
        size_t f = 0, t = 0;
        ggml_backend_dev_memory(dev, &f, &t);
        *free  = f;
        *total = t;
        return 0;
    });
}

pt_plan * pt_plan_new(const char * path, int32_t n_gpu_layers, int32_t split_mode, int32_t main_gpu,
                      const float * tensor_split, int32_t n_tensor_split, const char * const * devices, int32_t n_devices,
                      int32_t input_on_first_device, const char * host_tensors) {
    pt_plan * plan = nullptr;
    guarded<int32_t>(-1, "planning the model's memory", [&] {
        pt_device_count(); // initializes the backends and the log capture
        pt_model_arrays arrays;
        llama_model_params mp = llama_model_default_params();
        const std::string bad = pt_model_params(&mp, n_gpu_layers, split_mode, main_gpu, tensor_split, n_tensor_split,
                                                devices, n_devices, input_on_first_device, host_tensors,
                                                /*use_mmap=*/0, arrays);
        if (!bad.empty()) {
            return pt_fail(bad);
        }
        mp.no_alloc = true; // metadata only: llama.cpp computes every buffer's size and allocates none
        llama_model * m = llama_model_load_from_file(path, mp);
        if (!m) {
            return pt_fail(std::string("llama.cpp could not read ") + path);
        }
        plan = new pt_plan{m};
        return 0;
    });
    return plan;
}

void pt_plan_free(pt_plan * plan) {
    guarded<int32_t>(-1, "freeing a memory plan", [&] {
        if (plan) {
            llama_model_free(plan->model);
            delete plan;
        }
        return 0;
    });
}

int32_t pt_plan_needs(pt_plan * plan, uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch, int32_t flash_attn,
                      pt_memory_need * needs, int32_t capacity) {
    return guarded<int32_t>(-1, "planning the context's memory", [&] {
        llama_context * c = llama_init_from_model(plan->model, pt_context_params(n_ctx, n_batch, n_ubatch, 1, flash_attn, 1, 1));
        if (!c) {
            return pt_fail("llama.cpp could not plan a context with these parameters");
        }
        // per device ("CPU" for every host buffer type: they all take host memory)
        std::map<std::string, llama_memory_breakdown_data> by_device;
        for (const auto & [buft, mb] : llama_get_memory_breakdown(c)) {
            ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
            auto & d = by_device[ggml_backend_buft_is_host(buft) || !dev ? "CPU" : ggml_backend_dev_name(dev)];
            d.model   += mb.model;
            d.context += mb.context;
            d.compute += mb.compute;
        }
        llama_free(c);
        int32_t n = 0;
        for (const auto & [name, mb] : by_device) {
            if (n < capacity) {
                snprintf(needs[n].device, sizeof(needs[n].device), "%s", name.c_str());
                needs[n].model   = mb.model;
                needs[n].context = mb.context;
                needs[n].compute = mb.compute;
            }
            ++n;
        }
        return n;
    });
}

int64_t pt_plan_kv_bytes_per_token(pt_plan * plan) {
    try {
        const llama_model * m = plan->model;
        const int64_t n_head = llama_model_n_head(m);
        if (n_head <= 0 || llama_model_n_swa(m) > 0 || llama_model_is_recurrent(m) || llama_model_is_hybrid(m)) {
            return 0; // sliding-window or recurrent memory does not grow with n_ctx alone: no simple bound
        }
        // K and V of every layer, F16 (pt_context_new leaves llama.cpp's default cache type)
        return (int64_t) llama_model_n_layer(m) * 2 * llama_model_n_head_kv(m) * (llama_model_n_embd(m) / n_head) * 2;
    } catch (...) {
        return 0; // no bound: the plan itself is checked
    }
}

} // extern "C"
