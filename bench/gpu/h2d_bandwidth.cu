// Host-to-device copy rate of this machine's GPU, from pinned and from pageable host memory (issue 24: with the experts
// of gpt-oss-20b in host memory both of pyturbo's paths moved ~10 GB per ubatch at ~8 GB/s, pinned or not).
//
//   nvcc -O2 -arch=sm_90 -o /tmp/h2d bench/gpu/h2d_bandwidth.cu && /tmp/h2d [stream_gb]
//
// Prints one line per measurement (GB/s = 1e9 bytes per second, timed with CUDA events, median of 5 after a warm-up):
//   single   one cudaMemcpyAsync of each size, 1 MB .. 512 MB, from the same host buffer (pinned: cudaMallocHost;
//            registered: malloc + cudaHostRegister; pageable: malloc, every page touched first), and device-to-host
//   slices   96 copies of one expert slice (4,406,400 B: a 2880x2880 MXFP4 matrix of one expert) at consecutive
//            offsets, on 1 stream, and spread over 4 streams (pyturbo's stream devices) at once
//   stream   stream_gb (default 4) GB of host memory copied once in 141 MB pieces (one layer's 32 experts of one
//            matrix), as a ubatch's expert copies read it: nothing of it in a CPU cache
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); exit(1); } } while (0)

static const size_t MB = 1000 * 1000;
static const size_t SLICE = 4406400;            // 2880 * 2880 / 32 blocks * 17 bytes (MXFP4)
static const size_t LAYER_PIECE = 32 * SLICE;   // one expert matrix of one layer, all 32 experts

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

// one timed round: fn queues copies on the streams; returns seconds from the first stream's start to all streams' end
template <class F>
static double timed(std::vector<cudaStream_t> & streams, F fn) {
    cudaEvent_t start, stop;
    CK(cudaEventCreate(&start));
    CK(cudaEventCreate(&stop));
    CK(cudaDeviceSynchronize());
    CK(cudaEventRecord(start, streams[0]));
    for (size_t i = 1; i < streams.size(); ++i) {
        CK(cudaStreamWaitEvent(streams[i], start, 0));
    }
    fn();
    std::vector<cudaEvent_t> ends(streams.size());
    for (size_t i = 0; i < streams.size(); ++i) {
        CK(cudaEventCreate(&ends[i]));
        CK(cudaEventRecord(ends[i], streams[i]));
        CK(cudaStreamWaitEvent(streams[0], ends[i], 0));
    }
    CK(cudaEventRecord(stop, streams[0]));
    CK(cudaEventSynchronize(stop));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, start, stop));
    for (auto e : ends) CK(cudaEventDestroy(e));
    CK(cudaEventDestroy(start));
    CK(cudaEventDestroy(stop));
    return ms / 1e3;
}

template <class F>
static double rate(std::vector<cudaStream_t> & streams, size_t bytes, F fn, int reps = 5) {
    timed(streams, fn); // warm-up
    std::vector<double> r;
    for (int i = 0; i < reps; ++i) {
        r.push_back(bytes / timed(streams, fn) / 1e9);
    }
    return median(r);
}

int main(int argc, char ** argv) {
    const size_t stream_bytes = (size_t) ((argc > 1 ? atof(argv[1]) : 4.0) * 1e9) / LAYER_PIECE * LAYER_PIECE;
    int dev = 0;
    CK(cudaSetDevice(dev));
    cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, dev));
    printf("device %s, PCI %04x:%02x:%02x, copy engines %d, unifiedAddressing %d, pageableMemoryAccess %d, "
           "hostRegisterSupported %d, canMapHostMemory %d\n", p.name, p.pciDomainID, p.pciBusID, p.pciDeviceID,
           p.asyncEngineCount, p.unifiedAddressing, p.pageableMemoryAccess, p.hostRegisterSupported, p.canMapHostMemory);
    fflush(stdout);

    std::vector<cudaStream_t> one(1), four(4);
    CK(cudaStreamCreateWithFlags(&one[0], cudaStreamNonBlocking));
    for (auto & s : four) CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

    const size_t max_single = 512 * MB;
    const size_t buf = std::max(max_single, 96 * SLICE);
    void * d = nullptr;
    CK(cudaMalloc(&d, std::max(buf, LAYER_PIECE)));

    void * pinned = nullptr;
    auto t0 = std::chrono::steady_clock::now();
    CK(cudaMallocHost(&pinned, buf));
    memset(pinned, 1, buf);
    void * pageable = malloc(buf);
    memset(pageable, 1, buf);
    void * registered = malloc(buf);
    memset(registered, 1, buf);
    const bool reg_ok = cudaHostRegister(registered, buf, cudaHostRegisterPortable) == cudaSuccess;
    (void) cudaGetLastError();
    printf("host buffers of %zu MB ready in %.2f s (cudaHostRegister %s)\n", buf / MB,
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), reg_ok ? "ok" : "FAILED");
    fflush(stdout);

    struct src { const char * name; void * ptr; };
    std::vector<src> srcs = {{"pinned", pinned}, {"pageable", pageable}};
    if (reg_ok) srcs.push_back({"registered", registered});

    for (size_t size = 1 * MB; size <= max_single; size *= 2) {
        for (auto & s : srcs) {
            double gbs = rate(one, size, [&] { CK(cudaMemcpyAsync(d, s.ptr, size, cudaMemcpyHostToDevice, one[0])); });
            printf("single  h2d %-10s %4zu MB  %6.2f GB/s\n", s.name, size / MB, gbs);
        }
        double d2h = rate(one, size, [&] { CK(cudaMemcpyAsync(pinned, d, size, cudaMemcpyDeviceToHost, one[0])); });
        printf("single  d2h %-10s %4zu MB  %6.2f GB/s\n", "pinned", size / MB, d2h);
        fflush(stdout);
    }

    for (auto & s : srcs) {
        double g1 = rate(one, 96 * SLICE, [&] {
            for (int i = 0; i < 96; ++i) {
                CK(cudaMemcpyAsync((char *) d + i * SLICE, (char *) s.ptr + i * SLICE, SLICE, cudaMemcpyHostToDevice, one[0]));
            }
        });
        double g4 = rate(four, 96 * SLICE, [&] {
            for (int i = 0; i < 96; ++i) {
                CK(cudaMemcpyAsync((char *) d + i * SLICE, (char *) s.ptr + i * SLICE, SLICE, cudaMemcpyHostToDevice, four[i % 4]));
            }
        });
        printf("slices  h2d %-10s 96 x %zu B  1 stream %6.2f GB/s, 4 streams %6.2f GB/s\n", s.name, SLICE, g1, g4);
        fflush(stdout);
    }
    CK(cudaFreeHost(pinned));
    if (reg_ok) CK(cudaHostUnregister(registered));
    free(registered);
    free(pageable);

    // streaming through a large buffer, as one ubatch's expert copies do
    for (int kind = 0; kind < 2; ++kind) {
        void * big = nullptr;
        t0 = std::chrono::steady_clock::now();
        if (kind == 0) {
            if (cudaMallocHost(&big, stream_bytes) != cudaSuccess) {
                (void) cudaGetLastError();
                printf("stream  cudaMallocHost of %zu MB FAILED\n", stream_bytes / MB);
                continue;
            }
        } else {
            big = malloc(stream_bytes);
        }
        memset(big, 1, stream_bytes);
        double alloc_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const size_t n = stream_bytes / LAYER_PIECE;
        for (int ns : {1, 4}) {
            auto & streams = ns == 1 ? one : four;
            std::vector<double> r;
            for (int rep = 0; rep < 3; ++rep) {
                double s = timed(streams, [&] {
                    for (size_t i = 0; i < n; ++i) {
                        CK(cudaMemcpyAsync(d, (char *) big + i * LAYER_PIECE, LAYER_PIECE, cudaMemcpyHostToDevice,
                                           streams[i % streams.size()]));
                    }
                });
                r.push_back(stream_bytes / s / 1e9);
            }
            printf("stream  h2d %-10s %zu MB in %zu x %zu MB pieces, %d stream(s): %6.2f GB/s (min %.2f, max %.2f; "
                   "allocated and filled in %.2f s)\n", kind == 0 ? "pinned" : "pageable", stream_bytes / MB, n,
                   LAYER_PIECE / MB, ns, median(r), *std::min_element(r.begin(), r.end()),
                   *std::max_element(r.begin(), r.end()), alloc_s);
            fflush(stdout);
        }
        if (kind == 0) CK(cudaFreeHost(big)); else free(big);
    }
    CK(cudaFree(d));
    return 0;
}
