// Per-stage timing of a pipelined replay (the records of llama-turbo.h).
//
// On CUDA the times come from timing events on the backend's stream (patches/0005, found by name so that libllama
// need not link ggml-cuda): they say when the GPU itself started and finished, without the launch and wake-up latency
// of host clocks. Elsewhere (CPU, RPC) the host clock brackets the split.

#include "turbo.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

stage_clock::stage_clock(ggml_backend_t backend) : backend(backend) {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    if (!reg) {
        return;
    }
    auto event_new = (ggml_backend_event_t (*)(ggml_backend_dev_t)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_cuda_timing_event_new");
    elapsed_ms     = (bool (*)(ggml_backend_event_t, ggml_backend_event_t, float *)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_cuda_event_elapsed_ms");
    if (!event_new || !elapsed_ms) {
        return;
    }
    ref   = event_new(dev);
    start = event_new(dev);
    end   = event_new(dev);
    rebase();
}

void stage_clock::rebase() {
    if (ref) {
        // device times are offsets from this point, which the device reached just before the host read its clock
        ggml_backend_event_record(ref, backend);
        ggml_backend_event_synchronize(ref);
        t_ref_us = ggml_time_us();
    }
}

stage_clock::~stage_clock() {
    for (ggml_backend_event_t e : {ref, start, end}) {
        if (e) {
            ggml_backend_event_free(e);
        }
    }
}

void stage_clock::begin(llama_turbo_record & rec) {
    rec.t_start_us = ggml_time_us();
    if (ref) {
        ggml_backend_event_record(start, backend);
    }
}

void stage_clock::mark_end() {
    ggml_backend_event_record(end, backend);
}

void stage_clock::finish(llama_turbo_record & rec) {
    rec.t_end_us = ggml_time_us();
    rec.clock    = "host";
    float ms_start = 0.0f;
    float ms_end   = 0.0f;
    if (ref && elapsed_ms(ref, start, &ms_start) && elapsed_ms(ref, end, &ms_end)) {
        rec.t_start_us = t_ref_us + (int64_t) (1000.0 * ms_start);
        rec.t_end_us   = t_ref_us + (int64_t) (1000.0 * ms_end);
        rec.clock      = "cuda-event";
    }
}

const char * turbo_switch(const char * name) {
    return getenv(name);
}

// ---- host trace ---------------------------------------------------------------------------------------------------------

void turbo_trace::begin() {
    on = turbo_switch("LLAMA_TURBO_TRACE") != nullptr; // per replay: set before the stage threads start, read by them
    if (on) {
        std::lock_guard<std::mutex> lock(mtx);
        entries.clear();
        t0_us = ggml_time_us();
    }
}

void turbo_trace::mark(const char * what, int ubatch, const char * device) {
    if (on) {
        const int64_t t = ggml_time_us();
        std::lock_guard<std::mutex> lock(mtx);
        entries.push_back({t, what, ubatch, device});
    }
}

void turbo_trace::print() {
    if (!on) {
        return;
    }
    std::lock_guard<std::mutex> lock(mtx);
    std::stable_sort(entries.begin(), entries.end(), [](const entry & a, const entry & b) { return a.t_us < b.t_us; });
    for (const auto & e : entries) {
        fprintf(stderr, "turbo-trace %9.3f ms  %-22s ubatch %3d  %s\n", (e.t_us - t0_us) / 1000.0, e.what, e.ubatch, e.device);
    }
    entries.clear();
}
