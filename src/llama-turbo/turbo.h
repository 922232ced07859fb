// The executor's state, shared by the files of src/llama-turbo/ (see llama-turbo.h for the map). Internal to libllama.
#pragma once

#include "llama-turbo.h"

#include "llama-context.h"
#include "llama-graph.h"

#include "ggml-backend.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

// A llama_decode() call queued during capture, with the batch's arrays copied.
struct turbo_batch {
    std::vector<llama_token>  token;
    std::vector<llama_pos>    pos;
    std::vector<int32_t>      n_seq_id;
    std::vector<llama_seq_id> seq_id_flat;
    std::vector<int8_t>       logits;
    // The llama_decode calls the standard path makes of this batch, as lengths: a captured call is one call; a prompt
    // (llama_turbo_prefill) is the calls its caller would have made, n_batch tokens each, the first of first_call.
    std::vector<int32_t>      call_lengths;

    std::vector<llama_seq_id *> seq_id_ptrs; // rebuilt by view()

    explicit turbo_batch(const llama_batch & batch);  // a captured llama_decode call
    turbo_batch(const llama_token * tokens, int32_t n_tokens, llama_pos pos0, llama_seq_id seq, int32_t first_call,
                int32_t n_batch);                     // a prompt: consecutive positions, the last token's logits
    llama_batch view();
};

// One llama_decode call of a replay: tokens [i0, i0 + n) of batches[batch].
struct turbo_call {
    int32_t batch;
    int32_t i0;
    int32_t n;
};

// An input of a split: src (computed earlier or a graph input) must be copied into dst on the split's backend.
struct split_input {
    ggml_tensor * src;
    ggml_tensor * dst;
    int           staged;      // index into slot::staging, or -1 to copy src directly (host memory or persistent data)
    int           pushed = -1; // index into slot::pushes: src's server sends it to dst's server itself
    bool          prefetch = false; // from host memory to an RPC server: may be sent ahead (see prefetch_next)
};

// A tensor that one RPC server sends to another directly (patches/0011), instead of through this process.
struct server_copy {
    ggml_tensor * src;
    ggml_tensor * dst;
    uint64_t      id = 0;  // the transfer, set by the producer's thread when it queues the push
};

// One split (the part of a graph that runs on one backend) of a ubatch, as its stage thread runs it.
struct split_plan {
    ggml_backend_t           backend;
    int                      thread;    // index of the stage thread (= backend index of the context)
    int                      stage;     // index among the layer devices, -1 for other work
    std::vector<split_input> inputs;
    std::vector<int>         stage_out; // staging entries this split fills right after it ran
    std::vector<int>         push_out;  // server copies this split sends once its computation is queued
    int                      prefetch_after = -1; // its prefetch inputs exist once this split has run (-1: graph
                                                  // inputs only, set when the ubatch is submitted)
    bool                     prefetched = false;  // they were sent ahead (under mtx; reset when the slot is reused)
    ggml_tensor *            fence;     // read after the split when nothing is staged: see run_split
};

// Logits of a ubatch, read into the context's output buffer once the ubatch is computed.
struct deferred_output {
    ggml_tensor * t;
    float       * dst;
    size_t        nbytes;
};

// One ubatch in flight and the scheduler that holds its graph.
struct slot {
    ggml_backend_sched_ptr sched;
    llm_graph_result_ptr   res;
    bool graph_allocated = false; // res holds a graph allocated in sched (and splits its plan): it may be reused

    bool    busy     = false;
    int     task     = -1;     // index of the ubatch within the replay
    int32_t pos0     = 0;
    int32_t n_tokens = 0;
    bool    barrier  = false;  // splits differ from the previous ubatch's: wait for it to finish completely
    int     n_done   = 0;      // splits completed
    bool    running  = false;  // a stage thread is running split n_done

    std::vector<split_plan>      splits;
    std::vector<deferred_output> outputs;
    std::vector<server_copy>     pushes;

    // Host copies of the tensors that cross between devices through host memory (split_input::staged): pinned memory
    // where a GPU can provide it, so that the producer's read and the consumer's write are asynchronous DMA on their
    // streams; else pageable memory. Sized for the largest ubatch seen, kept between ubatches.
    std::vector<ggml_tensor *>  staging_src;
    std::vector<uint8_t *>      staging;       // where staging_src[i] is kept
    ggml_backend_buffer_ptr     staging_pinned;
    std::vector<uint8_t>        staging_pageable;
};

// What the executor needs to know of each backend of the context (index = stage thread), asked once.
struct backend_traits {
    bool rpc      = false;  // a device of an RPC server: transfers go through host memory
    bool gpu      = false;
    bool events   = false;  // orders work with events; a CUDA build without peer copies has none (nor peer copies)
    bool async_io = false;  // tensor_set_async/get_async are queued on the device's stream
    std::string endpoint;   // an RPC device's server (host:port)
};

// ggml-rpc's server-to-server copies (patches/0011), looked up in its registry: none in a build without RPC.
struct rpc_peer_functions {
    bool     (*reachable)(const char * src_endpoint, const char * dst_endpoint, char * why, size_t why_size) = nullptr;
    uint64_t (*push)(const ggml_tensor * src, const ggml_tensor * dst, ggml_type wire_type) = nullptr;
    void     (*await)(const ggml_tensor * dst, uint64_t id) = nullptr;
};

// When a stage thread's splits ran: timing events on the device where it has them (CUDA), else the host clock.
// A stage thread runs one split at a time, so one clock per thread is enough. See turbo-clock.cpp.
class stage_clock {
public:
    explicit stage_clock(ggml_backend_t backend);
    ~stage_clock();
    stage_clock(const stage_clock &) = delete;
    stage_clock & operator=(const stage_clock &) = delete;

    void rebase();                             // a new reference point (per replay: elapsed times are floats in ms)
    void begin(llama_turbo_record & rec);     // before the split's first input transfer
    bool on_device() const { return ref != nullptr; } // then the split's last work must be queued before mark_end()
    void mark_end();                           // after the split's last work was queued (only when on_device())
    void finish(llama_turbo_record & rec);     // once the device has finished the split

private:
    ggml_backend_t       backend;
    ggml_backend_event_t ref   = nullptr;
    ggml_backend_event_t start = nullptr;
    ggml_backend_event_t end   = nullptr;
    bool (*elapsed_ms)(ggml_backend_event_t, ggml_backend_event_t, float *) = nullptr;
    int64_t              t_ref_us = 0;
};

// Host checkpoints of a replay (which thread did what, when), printed to stderr at the replay's end when the
// environment has LLAMA_TURBO_TRACE as the replay starts: where the host's time goes before and between the devices' work, which the
// per-stage records do not show (bench/gpu/host_time.py). Off, a mark costs a branch. See turbo-clock.cpp.
class turbo_trace {
public:
    void begin();
    void mark(const char * what, int ubatch = -1, const char * device = "");
    void print();

private:
    struct entry {
        int64_t      t_us;
        const char * what;
        int          ubatch;
        const char * device;
    };
    bool               on = false;
    int64_t            t0_us = 0;
    std::mutex         mtx;
    std::vector<entry> entries;
};

std::vector<ggml_backend_dev_t> turbo_layer_devices(const llama_model & model);
// The executor's diagnostic switches from the environment (LLAMA_TURBO_SPIN, LLAMA_TURBO_TRACE; listed with pyturbo's
// other switches in src/pyturbo/settings.py), read as each pipelined replay starts: nullptr when unset.
const char * turbo_switch(const char * name);
const char * turbo_device_name(ggml_backend_t backend);

struct llama_turbo : llama_ubatch_executor {
    llama_turbo(llama_context & lctx, const llama_turbo_options & options);
    ~llama_turbo() override { stop_stage_threads(); }  // the stage threads live as long as the executor

    // ---- executor hooks, called from llama_context (patches/0003) --------------------------------------------------
    bool    active() const override { return replaying; }
    bool    capturing() const override { return capture_open; }
    int32_t capture(const llama_batch & batch) override;                                   // turbo-replay.cpp
    llm_graph_result * submit(const llama_ubatch & ubatch, llm_graph_type gtype, llama_memory_context_i * mctx,
                              ggml_status & ret) override;                                 // turbo-slots.cpp
    void defer_output(const llm_graph_result * res, ggml_tensor * t, float * dst, size_t nbytes) override;
    void wait_outputs() override;

    // ---- turbo-replay.cpp: one replay -------------------------------------------------------------------------------
    void    begin_capture();
    void    capture_prompt(turbo_batch && prompt) { captured.push_back(std::move(prompt)); }
    int32_t replay(llama_turbo_pipeline pipeline, llama_turbo_result & r);
    std::string decide_path(llama_turbo_pipeline pipeline, const std::vector<turbo_batch> & batches,
                            std::set<llama_seq_id> & seqs, llama_turbo_result & r) const;
    std::vector<turbo_call> plan_calls(const std::vector<turbo_batch> & batches, bool one_ubatch_per_call) const;
    int32_t decode_calls(std::vector<turbo_batch> & batches, bool one_ubatch_per_call);
    int32_t decode_pipelined(std::vector<turbo_batch> & batches);
    static bool stock_overlaps(const llama_context & lctx) { return lctx.cparams.pipeline_parallel; }

    // ---- turbo-slots.cpp: schedulers of the ubatches in flight -------------------------------------------------------
    int32_t n_in_flight() const;     // how many slots: the one place the default is decided
    std::string prepare_slots(llama_turbo_result & r);
    void presize_shapes(const llama_ubatch & first, const llama_memory_context_i * mctx);
    void place_host_weight_ops(ggml_backend_sched_t sched, ggml_cgraph * gf) const;
    void release_slots();

    // ---- turbo-stages.cpp: stage threads, readiness, split planning, staging -----------------------------------------
    void start_replay();             // starts the stage threads on the first pipelined replay, wakes them for each
    void stop_stage_threads();
    void stage_thread_loop(int thread);
    const slot * find_task(int task) const;
    bool   ready(const slot & s) const;
    slot * pick(int thread);
    void   finish(slot & s, std::unique_lock<std::mutex> & lock);
    ggml_status run_split(slot & s, int i, stage_clock & clock, llama_turbo_record & rec);
    void   plan_splits(slot & s);
    void   prefetch_next(const slot & s, ggml_backend_t backend);
    bool   servers_copy(int from_thread, int to_thread);
    void   allocate_staging(slot & s);
    bool   all_idle() const;
    template <typename Cond> bool wait_host(Cond cond, ggml_status & ret);
    void   flush_records();

    // Waiting: a thread sleeps on cv until its work is near, then spins until it is there (when `spin`). Waking a
    // sleeping thread is slow on a server CPU (an idle core has to leave its sleep state), and every hand-over between
    // stages waits for it (bench/results/2026-11-26-gpu-host-time.md); a spinning thread sees the hand-over at once.
    // Spinning costs a core while it lasts, so it is on only where the devices are GPUs (the host's threads then only
    // launch work) and the cores are plenty.
    bool spin_wanted() const;
    bool work_near(int thread) const;        // under mtx: this thread's next split can become ready at any moment
    bool completion_near() const;            // under mtx: a ubatch's last split is running
    void   wait_or_spin(std::unique_lock<std::mutex> & lock, bool near);
    void   notify() { progress.fetch_add(1, std::memory_order_release); cv.notify_all(); }

    // Swaps a slot's scheduler into the context while a graph is built or reserved, so that everything that consults
    // lctx.sched then (graph_params, the build callback's backend pinning, graph_reserve) uses the slot's.
    struct sched_swap {
        llama_context & lctx;
        ggml_backend_sched_ptr & other;
        sched_swap(llama_context & lctx, ggml_backend_sched_ptr & other) : lctx(lctx), other(other) { std::swap(lctx.sched, other); }
        ~sched_swap() { std::swap(lctx.sched, other); }
    };

    // ---- state -------------------------------------------------------------------------------------------------------
    llama_context &                       lctx;
    const llama_turbo_options             options;
    const std::vector<ggml_backend_dev_t> stage_devices; // the model's layer devices in chain order (fixed)

    bool capture_open = false;
    bool replaying    = false;
    std::vector<turbo_batch> captured;

    turbo_trace trace;

    llama_turbo_record_callback record_cb = nullptr; // set for the duration of one replay
    void * record_cb_data = nullptr;

    std::vector<backend_traits>     traits;
    rpc_peer_functions              rpc_peer;
    std::map<std::pair<int, int>, std::string> server_copy_checked; // (from, to thread) -> "" or why not directly
    std::string                     transfers;              // how tensors went between RPC servers (the result's)
    ggml_backend_buffer_type_t      pinned_buft = nullptr; // a GPU's pinned host memory, for staging (nullptr: none)
    std::vector<slot>               slots;
    std::vector<uint32_t>           replay_sizes;  // the ubatch sizes of the replay running (presize_shapes)
    std::set<uint32_t>              presized;      // ubatch sizes whose graphs were sized ahead once
    ggml_backend_sched_ptr          probe_sched;   // a scheduler that only sizes graphs (no buffers)
    std::vector<ggml_backend_t>     prev_split_backends;
    int                             n_submitted = 0;
    int64_t t_first_submit_us = 0, t_first_queued_us = 0, host_submit_us = 0; // see llama_turbo_result

    // shared with the stage threads, under mtx
    std::mutex                      mtx;
    std::condition_variable         cv;
    std::vector<std::thread>        stage_threads;
    std::vector<llama_turbo_record> records;
    std::atomic<uint64_t>           progress{0};    // bumped by notify(): spinning threads watch it without mtx
    bool        spin            = false;            // set per replay (spin_wanted)
    bool        host_submitting = false;            // the host is building a ubatch's graph: its first split is near
    int         n_outputs_pending = 0;
    int         replay_id     = 0;   // counts the pipelined replays: a stage thread rebases its clock on a new one
    bool        stopping      = false;
    bool        failed        = false;
    bool        aborted       = false;
    bool        device_failed = false;
    std::string error;
};

// Wait for cond while delivering timing records and polling the context's abort callback. Returns false (with ret
// set) if the replay failed or was aborted: then nothing new starts and the caller unwinds.
template <typename Cond>
bool llama_turbo::wait_host(Cond cond, ggml_status & ret) {
    std::unique_lock<std::mutex> lock(mtx);
    while (true) {
        if (failed || aborted) {
            // let splits that are running finish before the caller touches the KV cache
            cv.wait(lock, [&] { return all_idle(); });
            ret = aborted ? GGML_STATUS_ABORTED : GGML_STATUS_FAILED;
            return false;
        }
        if (cond()) {
            ret = GGML_STATUS_SUCCESS;
            break;
        }
        if (spin && completion_near()) {
            wait_or_spin(lock, true); // returns at the next progress; the loop re-checks
        } else {
            cv.wait_for(lock, std::chrono::milliseconds(2));
        }
        if (!records.empty() || lctx.abort_callback) {
            lock.unlock();
            flush_records();
            const bool abort = lctx.abort_callback && lctx.abort_callback(lctx.abort_callback_data);
            lock.lock();
            if (abort) {
                aborted = true;
                notify();
            }
        }
    }
    lock.unlock();
    flush_records();
    return true;
}
