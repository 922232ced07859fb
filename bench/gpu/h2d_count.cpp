// Counts the host-to-device copies a process makes through the CUDA runtime, by the kind of host memory they read:
// an LD_PRELOAD library, no debugger and no change to llama.cpp (issue 24: with gpt-oss-20b's experts in host memory,
// which memory do the expert copies read, in how many pieces, and how many bytes per ubatch?).
//
//   g++ -O2 -shared -fPIC -I/usr/local/cuda/include -o /tmp/h2d_count.so bench/gpu/h2d_count.cpp -ldl
//   H2D_COUNT_MIN=1000000 LD_PRELOAD=/tmp/h2d_count.so python3 ...     # a report on stderr at exit
//
// The program may also call h2d_count_report(label) and h2d_count_reset() (Python: ctypes.CDLL(None)) to report the
// copies of one step, e.g. one prefill.
//
// Wraps cudaMemcpyAsync (and its per-thread-stream twin): every call of kind cudaMemcpyHostToDevice (or
// cudaMemcpyDefault from host memory) of at least H2D_COUNT_MIN bytes (default 1 MB) is counted under the source's
// cudaPointerGetAttributes type: "pinned" (cudaMemoryTypeHost: cudaMallocHost / cudaHostRegister) or "pageable"
// (cudaMemoryTypeUnregistered), with a histogram of sizes. The host time spent inside the calls is summed too: a
// copy from pageable memory returns only once the runtime has staged it, a copy from pinned memory at once.
// The real functions are looked up in the libcudart the process loaded (llama.cpp's ggml-cuda links it
// dynamically and pyturbo loads that with RTLD_LOCAL, so RTLD_NEXT would not find it).
#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <link.h>
#include <mutex>

namespace {

typedef cudaError_t (*memcpy_async_t)(void *, const void *, size_t, cudaMemcpyKind, cudaStream_t);
typedef cudaError_t (*attrs_t)(cudaPointerAttributes *, const void *);
typedef cudaError_t (*last_error_t)(void);

struct counter {
    std::atomic<long long> calls{0}, bytes{0}, host_ns{0};
    std::atomic<long long> hist[8] = {}; // < 1, < 4, < 16, < 64, < 256, < 1024 MB, larger, (unused)
};

counter g_pinned, g_pageable, g_other;
std::atomic<long long> g_small_calls{0}, g_small_bytes{0};
size_t g_min = 1000000;
void * g_cudart = nullptr;
std::once_flag g_once;
memcpy_async_t g_real = nullptr, g_real_ptsz = nullptr;
attrs_t g_attrs = nullptr;
last_error_t g_last_error = nullptr;

int find_cudart(struct dl_phdr_info * info, size_t, void * out) {
    if (info->dlpi_name && strstr(info->dlpi_name, "libcudart.so")) {
        *(void **) out = dlopen(info->dlpi_name, RTLD_NOW | RTLD_NOLOAD);
        return *(void **) out != nullptr;
    }
    return 0;
}

void report(const char * when) {
    auto line = [](const char * name, const counter & c) {
        fprintf(stderr, "h2d_count   %-8s %8lld calls %10.3f GB  host time in the calls %8.3f s  sizes (MB) <1:%lld <4:%lld "
                "<16:%lld <64:%lld <256:%lld <1024:%lld >=1024:%lld\n", name, c.calls.load(), c.bytes.load() / 1e9,
                c.host_ns.load() / 1e9, c.hist[0].load(), c.hist[1].load(), c.hist[2].load(), c.hist[3].load(),
                c.hist[4].load(), c.hist[5].load(), c.hist[6].load());
    };
    fprintf(stderr, "h2d_count %s: host-to-device cudaMemcpyAsync calls of >= %zu bytes (%lld smaller ones, %.3f GB)\n",
            when, g_min, g_small_calls.load(), g_small_bytes.load() / 1e9);
    line("pinned", g_pinned);
    line("pageable", g_pageable);
    line("other", g_other);
}

void init() {
    if (const char * m = getenv("H2D_COUNT_MIN")) {
        g_min = strtoull(m, nullptr, 10);
    }
    dl_iterate_phdr(find_cudart, &g_cudart);
    if (!g_cudart) {
        g_cudart = dlopen("libcudart.so", RTLD_NOW | RTLD_NOLOAD);
    }
    if (g_cudart) {
        g_real      = (memcpy_async_t) dlsym(g_cudart, "cudaMemcpyAsync");
        g_real_ptsz = (memcpy_async_t) dlsym(g_cudart, "cudaMemcpyAsync_ptsz");
        g_attrs     = (attrs_t) dlsym(g_cudart, "cudaPointerGetAttributes");
        g_last_error = (last_error_t) dlsym(g_cudart, "cudaGetLastError");
    }
    if (!g_real) { // not found by name: whatever the dynamic linker finds next
        g_real = (memcpy_async_t) dlsym(RTLD_NEXT, "cudaMemcpyAsync");
    }
    fprintf(stderr, "h2d_count: libcudart %s, cudaMemcpyAsync %s\n", g_cudart ? "found" : "NOT FOUND",
            g_real ? "wrapped" : "NOT FOUND");
}

cudaError_t counted(memcpy_async_t real, void * dst, const void * src, size_t n, cudaMemcpyKind kind, cudaStream_t s) {
    auto t0 = std::chrono::steady_clock::now();
    cudaError_t err = real(dst, src, n, kind, s);
    long long ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
    cudaPointerAttributes a{};
    bool host_src = kind == cudaMemcpyHostToDevice;
    cudaMemoryType type = cudaMemoryTypeUnregistered;
    if (g_attrs && (kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDefault)) {
        if (g_attrs(&a, src) == cudaSuccess) {
            type = a.type;
            host_src = host_src || a.type == cudaMemoryTypeHost || a.type == cudaMemoryTypeUnregistered;
        } else if (g_last_error) {
            g_last_error(); // leave no error behind for the caller's next cudaGetLastError
        }
    }
    if (!host_src || err != cudaSuccess) {
        return err;
    }
    if (n < g_min) {
        g_small_calls++;
        g_small_bytes += n;
        return err;
    }
    counter & c = type == cudaMemoryTypeHost ? g_pinned : type == cudaMemoryTypeUnregistered ? g_pageable : g_other;
    c.calls++;
    c.bytes += n;
    c.host_ns += ns;
    int b = 0;
    for (size_t lim = 1000000; b < 6 && n >= lim; lim *= 4) {
        ++b;
    }
    c.hist[b]++;
    return err;
}

struct reporter {
    ~reporter() { report("at exit"); }
} g_reporter;

void reset(counter & c) {
    c.calls = 0;
    c.bytes = 0;
    c.host_ns = 0;
    for (auto & h : c.hist) {
        h = 0;
    }
}

} // namespace

extern "C" {

void h2d_count_report(const char * label) { report(label ? label : ""); }

void h2d_count_reset(void) {
    reset(g_pinned);
    reset(g_pageable);
    reset(g_other);
    g_small_calls = 0;
    g_small_bytes = 0;
}

cudaError_t cudaMemcpyAsync(void * dst, const void * src, size_t n, cudaMemcpyKind kind, cudaStream_t s) {
    std::call_once(g_once, init);
    return counted(g_real, dst, src, n, kind, s);
}

cudaError_t cudaMemcpyAsync_ptsz(void * dst, const void * src, size_t n, cudaMemcpyKind kind, cudaStream_t s) {
    std::call_once(g_once, init);
    return counted(g_real_ptsz ? g_real_ptsz : g_real, dst, src, n, kind, s);
}

}
