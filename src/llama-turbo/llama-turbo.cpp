// Pipelined prefill: the executor behind llama-turbo.h.
//
// How a replay runs
//   1. The host thread (the caller of llama_turbo_replay) decodes the captured batches with llama_context::decode,
//      unchanged, except that each ubatch goes to submit(): it waits for a free slot, applies the KV metadata of the
//      ubatch, builds its graph in the slot's own scheduler, sets its inputs and publishes it. It does not wait for
//      the ubatch to be computed.
//   2. Every backend has a stage thread. A split (the part of a graph that runs on one backend) of ubatch k is run by
//      its backend's thread once split i-1 of ubatch k is done (the activations it needs) and split i of ubatch k-1 is
//      done (the KV cache of the same layers). So device s works on ubatch k while device s+1 works on ubatch k-1.
//   3. A tensor that leaves an RPC device is staged through host memory by the thread that produced it, right after
//      its split, and written to the consumer's input copy by the consumer's thread; between devices of this process
//      (CUDA to CUDA, or host memory) the consumer copies it directly. No thread ever waits for work queued on
//      another thread's device, which is what limits the stock scheduler (a single host thread synchronizes the
//      source device before every copy it cannot do asynchronously).
//
// Why one scheduler per slot: every ubatch in flight needs its own compute buffers and input copies. A slot is
// reused only when its previous ubatch is completely done, so buffers are never shared between ubatches in flight.
// The extra memory is slots x the context's worst-case compute buffers, reserved up front and reported.

#include "llama-turbo.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-backend.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

// A llama_decode() call queued during capture, with the batch's arrays copied.
struct captured_batch {
    std::vector<llama_token>  token;
    std::vector<llama_pos>    pos;
    std::vector<int32_t>      n_seq_id;
    std::vector<llama_seq_id> seq_id_flat;
    std::vector<int8_t>       logits;

    std::vector<llama_seq_id *> seq_id_ptrs; // rebuilt by view()

    llama_batch view() {
        llama_batch b = {};
        b.n_tokens = (int32_t) token.size();
        b.token    = token.data();
        b.pos      = pos.empty() ? nullptr : pos.data();
        b.logits   = logits.empty() ? nullptr : logits.data();
        if (!n_seq_id.empty()) {
            seq_id_ptrs.clear();
            size_t off = 0;
            for (int32_t n : n_seq_id) {
                seq_id_ptrs.push_back(seq_id_flat.data() + off);
                off += n;
            }
            b.n_seq_id = n_seq_id.data();
            b.seq_id   = seq_id_ptrs.data();
        }
        return b;
    }
};

// An input of a split: src (computed earlier or a graph input) must be copied into dst on the split's backend.
struct split_input {
    ggml_tensor * src;
    ggml_tensor * dst;
    int           staged; // index into slot::staging, or -1 to copy src directly (host memory or persistent data)
};

struct split_plan {
    ggml_backend_t           backend;
    int                      worker;    // index of the stage thread (= backend index of the context)
    int                      stage;     // index among the layer devices, -1 for other work
    std::vector<split_input> inputs;
    std::vector<int>         stage_out; // staging entries this split fills right after it ran
    ggml_tensor *            fence;     // read after the split when nothing is staged: see run_split
};

struct deferred_output {
    ggml_tensor * t;
    float       * dst;
    size_t        nbytes;
};

// One ubatch in flight and the scheduler that holds its graph.
struct slot {
    ggml_backend_sched_ptr sched;
    llm_graph_result_ptr   res;

    bool    busy     = false;
    int     task     = -1;     // index of the ubatch within the replay
    int32_t pos0     = 0;
    int32_t n_tokens = 0;
    bool    barrier  = false;  // splits differ from the previous ubatch's: wait for it to finish completely
    int     n_done   = 0;      // splits completed
    bool    running  = false;  // a stage thread is running split n_done

    std::vector<split_plan>           splits;
    std::vector<ggml_tensor *>        staging_src;
    std::vector<std::vector<uint8_t>> staging;
    std::vector<deferred_output>      outputs;
};

const char * device_name(ggml_backend_t backend) {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    return dev ? ggml_backend_dev_name(dev) : ggml_backend_name(backend);
}

// an RPC device's operations are queued to its server in order, so another thread must not read from it while its own
// stage thread may have queued the next ubatch's work there
bool is_rpc(ggml_backend_dev_t dev) {
    return dev && strcmp(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)), "RPC") == 0;
}

// When a stage thread's splits ran. On CUDA the times come from timing events on the backend's stream (patches/0005,
// found by name so that libllama need not link ggml-cuda): they say when the GPU itself started and finished, without
// the launch and wake-up latency of host clocks. Elsewhere (CPU, RPC) the host clock brackets the split. A stage
// thread runs one split at a time, so one clock (three events) per thread is enough.
class stage_clock {
public:
    explicit stage_clock(ggml_backend_t backend) : backend(backend) {
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
        // device times are offsets from this point, which the device reached just before the host read its clock
        ggml_backend_event_record(ref, backend);
        ggml_backend_event_synchronize(ref);
        t_ref_us = ggml_time_us();
    }

    ~stage_clock() {
        for (ggml_backend_event_t e : {ref, start, end}) {
            if (e) {
                ggml_backend_event_free(e);
            }
        }
    }

    stage_clock(const stage_clock &) = delete;
    stage_clock & operator=(const stage_clock &) = delete;

    // before the split's first input transfer
    void begin(llama_turbo_record & rec) {
        rec.t_start_us = ggml_time_us();
        if (ref) {
            ggml_backend_event_record(start, backend);
        }
    }

    // whether the device keeps its own time: then the split's last work must be queued before mark_end()
    bool on_device() const {
        return ref != nullptr;
    }

    // after the split's last work was queued on the device (only when on_device())
    void mark_end() {
        ggml_backend_event_record(end, backend);
    }

    // once the device has finished the split
    void finish(llama_turbo_record & rec) {
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

private:
    ggml_backend_t       backend;
    ggml_backend_event_t ref   = nullptr;
    ggml_backend_event_t start = nullptr;
    ggml_backend_event_t end   = nullptr;
    bool (*elapsed_ms)(ggml_backend_event_t, ggml_backend_event_t, float *) = nullptr;
    int64_t              t_ref_us = 0;
};

std::vector<ggml_backend_dev_t> layer_devices(const llama_model & model) {
    std::vector<ggml_backend_dev_t> devs;
    for (int il = 0; il < (int) model.hparams.n_layer(); ++il) {
        ggml_backend_dev_t dev = model.dev_layer(il);
        if (std::find(devs.begin(), devs.end(), dev) == devs.end()) {
            devs.push_back(dev);
        }
    }
    return devs;
}

} // namespace

struct llama_turbo : llama_ubatch_executor {
    explicit llama_turbo(llama_context & lctx) : lctx(lctx) {}
    ~llama_turbo() override { stop_workers(); }

    // Swaps a slot's scheduler into the context while a graph is built or reserved, so that everything that consults
    // lctx.sched then (graph_params, the build callback's backend pinning, graph_reserve) uses the slot's.
    struct sched_swap {
        llama_context & lctx;
        ggml_backend_sched_ptr & other;
        sched_swap(llama_context & lctx, ggml_backend_sched_ptr & other) : lctx(lctx), other(other) { swap_sched(lctx, other); }
        ~sched_swap() { swap_sched(lctx, other); }
    };
    static void swap_sched(llama_context & lctx, ggml_backend_sched_ptr & other) { std::swap(lctx.sched, other); }

    // ---- executor hooks (called from llama_context) ----------------------------------------------------------------

    bool active() const override { return replaying; }
    bool capturing() const override { return capture_open; }

    int32_t capture(const llama_batch & batch) override {
        if (batch.n_tokens <= 0) {
            LLAMA_LOG_ERROR("%s: n_tokens == 0\n", __func__);
            return -1;
        }
        if (batch.embd) {
            LLAMA_LOG_ERROR("%s: only token batches can be captured\n", __func__);
            return -1;
        }
        captured_batch cb;
        const int32_t n = batch.n_tokens;
        cb.token.assign(batch.token, batch.token + n);
        if (batch.pos) {
            cb.pos.assign(batch.pos, batch.pos + n);
        }
        if (batch.logits) {
            cb.logits.assign(batch.logits, batch.logits + n);
        }
        if (batch.n_seq_id && batch.seq_id) {
            cb.n_seq_id.assign(batch.n_seq_id, batch.n_seq_id + n);
            for (int32_t i = 0; i < n; ++i) {
                cb.seq_id_flat.insert(cb.seq_id_flat.end(), batch.seq_id[i], batch.seq_id[i] + batch.n_seq_id[i]);
            }
        }
        captured.push_back(std::move(cb));
        return 0;
    }

    llm_graph_result * submit(const llama_ubatch & ubatch, llm_graph_type gtype, llama_memory_context_i * mctx, ggml_status & ret) override {
        const int k = n_submitted;
        slot & s = slots[k % slots.size()];

        if (!wait_host([&] { return !s.busy; }, ret)) {
            return nullptr;
        }
        if (mctx && !mctx->apply()) {
            LLAMA_LOG_ERROR("%s: failed to apply memory context\n", __func__);
            ret = GGML_STATUS_FAILED;
            return nullptr;
        }

        {
            sched_swap swap(lctx, s.sched);
            s.res->reset();
            ggml_backend_sched_reset(lctx.sched.get());
            ggml_cgraph * gf = lctx.model.build_graph(lctx.graph_params(s.res.get(), ubatch, mctx, gtype));
            if (!gf) {
                LLAMA_LOG_ERROR("%s: failed to build the graph\n", __func__);
                ret = GGML_STATUS_FAILED;
                return nullptr;
            }
            if (!ggml_backend_sched_alloc_graph(lctx.sched.get(), gf)) {
                LLAMA_LOG_ERROR("%s: failed to allocate the graph\n", __func__);
                ret = GGML_STATUS_ALLOC_FAILED;
                return nullptr;
            }
            s.res->set_inputs(&ubatch);
        }

        plan_splits(s);

        std::vector<ggml_backend_t> backends_now;
        for (const auto & sp : s.splits) {
            backends_now.push_back(sp.backend);
        }

        {
            std::lock_guard<std::mutex> lock(mtx);
            s.busy     = true;
            s.task     = k;
            s.pos0     = ubatch.pos ? ubatch.pos[0] : 0;
            s.n_tokens = (int32_t) ubatch.n_tokens;
            s.barrier  = k > 0 && backends_now != prev_split_backends;
            s.n_done   = 0;
            s.running  = false;
            s.outputs.clear();
        }
        prev_split_backends = std::move(backends_now);
        n_submitted++;
        cv.notify_all();

        ret = GGML_STATUS_SUCCESS;
        return s.res.get();
    }

    void defer_output(const llm_graph_result * res, ggml_tensor * t, float * dst, size_t nbytes) override {
        std::unique_lock<std::mutex> lock(mtx);
        for (auto & s : slots) {
            if (s.res.get() != res) {
                continue;
            }
            if (s.busy) {
                s.outputs.push_back({t, dst, nbytes});
                n_outputs_pending++;
                return;
            }
            break; // already computed: read it here
        }
        lock.unlock();
        ggml_backend_tensor_get(t, dst, 0, nbytes);
    }

    void wait_outputs() override {
        if (!replaying) {
            return;
        }
        ggml_status ret;
        wait_host([&] { return n_outputs_pending == 0; }, ret);
    }

    // ---- replay ----------------------------------------------------------------------------------------------------

    int32_t replay(llama_turbo_result & r) {
        capture_open = false;
        std::vector<captured_batch> batches = std::move(captured);
        captured.clear();

        r = {};
        r.t_start_us = ggml_time_us();
        r.n_batches  = (int32_t) batches.size();
        r.n_stages   = (int32_t) layer_devices(lctx.model).size();

        std::set<llama_seq_id> seqs;
        std::string reason = dispatch(batches, seqs, r);

        // where each sequence ends now: on failure, everything from there on is removed again
        std::map<llama_seq_id, llama_pos> seq_end;
        for (llama_seq_id s : seqs) {
            seq_end[s] = lctx.memory ? lctx.memory->seq_pos_max(s) + 1 : 0;
        }

        if (reason.empty()) {
            reason = prepare_slots(r);
        }

        int32_t status = 0;
        if (!reason.empty()) {
            r.path = LLAMA_TURBO_PATH_STANDARD;
            snprintf(r.fallback_reason, sizeof(r.fallback_reason), "%s", reason.c_str());
            for (auto & b : batches) {
                status = lctx.decode(b.view());
                if (status != 0) {
                    break;
                }
            }
        } else {
            r.path = LLAMA_TURBO_PATH_PIPELINED;
            status = run_pipelined(batches);
        }

        if (status != 0 && lctx.memory) {
            for (const auto & [s, p0] : seq_end) {
                lctx.memory->seq_rm(s, p0, -1);
            }
        }
        r.status = status;
        r.t_end_us = ggml_time_us();
        if (status != 0) {
            snprintf(r.error, sizeof(r.error), "%s", error.empty() ? (status == 2 ? "aborted" : "decode failed") : error.c_str());
        }
        r.device_failed = device_failed;
        return status;
    }

    // Why these batches cannot be pipelined, or "" if they can.
    std::string dispatch(std::vector<captured_batch> & batches, std::set<llama_seq_id> & seqs, llama_turbo_result & r) {
        int64_t n_ubatches = 0;
        bool multi_seq = false;
        for (auto & b : batches) {
            if (b.n_seq_id.empty()) {
                seqs.insert(0);
            } else {
                for (size_t i = 0; i < b.n_seq_id.size(); ++i) {
                    multi_seq = multi_seq || b.n_seq_id[i] != 1;
                }
                seqs.insert(b.seq_id_flat.begin(), b.seq_id_flat.end());
            }
            n_ubatches += (b.token.size() + lctx.cparams.n_ubatch - 1) / lctx.cparams.n_ubatch;
        }
        r.n_ubatches = (int32_t) n_ubatches;

        const auto & cp = lctx.cparams;
        if (batches.empty())                                  return "nothing was captured";
        if (multi_seq || seqs.size() != 1)                    return "more than one sequence";
        if (!cp.causal_attn)                                  return "non-causal attention";
        if (cp.embeddings || cp.embeddings_nextn)             return "embeddings output requested";
        if (std::find(cp.embeddings_layer_inp.begin(), cp.embeddings_layer_inp.end(), true) != cp.embeddings_layer_inp.end())
                                                              return "layer-input embeddings requested";
        if (cp.cb_eval)                                       return "an eval callback is set";
        if (!lctx.sampling.samplers.empty())                  return "backend samplers are attached";
        if (!dynamic_cast<llama_kv_cache *>(lctx.memory.get())) return "the model's memory is not a plain KV cache";
        if (lctx.model.split_mode() != LLAMA_SPLIT_MODE_LAYER) return "split mode is not layer";
        if (r.n_stages < 2)                                   return "the model's layers are on a single device";
        if (n_ubatches < 2)                                   return "fewer than two ubatches";
        if (all_local_gpus() && cp.pipeline_parallel && !getenv_flag("PYTURBO_PIPELINE_LOCAL_GPUS")) {
            // measured on two H100s and on one split into stream devices (bench/results/2026-11-25-*): with events
            // and async copies between its GPUs (cparams.pipeline_parallel), llama.cpp already overlaps these
            // stages and the pipeline is on par at best. Without them (a build without peer copies) it does not.
            return "all stages are GPUs of this process and llama.cpp's pipeline parallelism already overlaps them "
                   "(set PYTURBO_PIPELINE_LOCAL_GPUS=1 to pipeline anyway)";
        }
        return "";
    }

    bool all_local_gpus() const {
        for (ggml_backend_dev_t dev : layer_devices(lctx.model)) {
            if (is_rpc(dev) || ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_GPU) {
                return false;
            }
        }
        return true;
    }

    static bool getenv_flag(const char * name) {
        const char * v = getenv(name);
        return v && v[0] && strcmp(v, "0") != 0;
    }

    // One scheduler per ubatch in flight, each reserved for the context's worst-case ubatch graph.
    std::string prepare_slots(llama_turbo_result & r) {
        // not capped by this replay's ubatch count: slots are reserved once and kept for the next replays
        r.n_in_flight = max_in_flight > 0 ? max_in_flight : r.n_stages + 1;
        if ((int) slots.size() != r.n_in_flight) {
            slots.clear();
            slots.resize(r.n_in_flight);
            auto & cp = lctx.cparams;
            const uint32_t n_tokens  = std::min(cp.n_ctx, cp.n_ubatch);
            const uint32_t n_outputs = std::min(n_tokens, cp.n_outputs_max);
            const size_t   max_nodes = lctx.graph_max_nodes(n_tokens);
            for (auto & s : slots) {
                s.sched.reset(ggml_backend_sched_new(lctx.backend_ptrs.data(), lctx.backend_buft.data(),
                        (int) lctx.backend_ptrs.size(), max_nodes, false, cp.op_offload));
                s.res.reset(new llm_graph_result(max_nodes));
                auto mctx = lctx.memory->init_full();
                sched_swap swap(lctx, s.sched);
                if (!mctx || !lctx.graph_reserve(n_tokens, cp.n_seq_max, n_outputs, mctx.get())) {
                    slots.clear();
                    return "could not allocate compute buffers for " + std::to_string(r.n_in_flight) + " ubatches in flight";
                }
            }
        }
        r.extra_bytes = 0;
        for (auto & s : slots) {
            for (ggml_backend_t b : lctx.backend_ptrs) {
                r.extra_bytes += ggml_backend_sched_get_buffer_size(s.sched.get(), b);
            }
        }
        return "";
    }

    int32_t run_pipelined(std::vector<captured_batch> & batches) {
        error.clear();
        device_failed = false;
        failed = aborted = false;
        n_submitted = 0;
        n_outputs_pending = 0;
        prev_split_backends.clear();
        stage_devices = layer_devices(lctx.model);

        lctx.set_compute_threads(true);
        start_workers();
        replaying = true;

        int32_t status = 0;
        for (auto & b : batches) {
            status = lctx.decode(b.view());
            if (status != 0) {
                break;
            }
        }
        ggml_status ret;
        wait_host([&] { return all_idle(); }, ret);
        replaying = false;
        stop_workers();
        flush_records();
        // after a failure or an abort some ubatches never finished: their slots are free again (nothing runs now)
        for (auto & s : slots) {
            s.busy = false;
            s.outputs.clear();
        }

        // decode() reports what it saw; a failure or abort may also have come after its last ubatch was queued
        if (aborted) {
            return 2;
        }
        return status == 0 && failed ? -3 : status;
    }

    // ---- the stage threads -----------------------------------------------------------------------------------------

    void start_workers() {
        stopping = false;
        for (size_t w = 0; w < lctx.backend_ptrs.size(); ++w) {
            workers.emplace_back([this, w] { worker_loop((int) w); });
        }
    }

    void stop_workers() {
        {
            std::lock_guard<std::mutex> lock(mtx);
            stopping = true;
        }
        cv.notify_all();
        for (auto & t : workers) {
            t.join();
        }
        workers.clear();
    }

    const slot * find_task(int task) const {
        if (task < 0) {
            return nullptr;
        }
        const slot & s = slots[task % slots.size()];
        return s.busy && s.task == task ? &s : nullptr;
    }

    // the next split of s may run: its own previous split is done (n_done) and the previous ubatch has finished the
    // same split, which wrote the KV cache of the layers this one reads
    bool ready(const slot & s) const {
        if (!s.busy || s.running || s.n_done >= (int) s.splits.size()) {
            return false;
        }
        const slot * prev = find_task(s.task - 1);
        if (!prev) {
            return true;
        }
        return !s.barrier && prev->n_done > s.n_done;
    }

    // under mtx: the lowest ubatch whose next split runs on this worker and is ready
    slot * pick(int worker) {
        slot * best = nullptr;
        for (auto & s : slots) {
            if (ready(s) && s.splits[s.n_done].worker == worker && (!best || s.task < best->task)) {
                best = &s;
            }
        }
        return best;
    }

    void worker_loop(int worker) {
        stage_clock clock(lctx.backend_ptrs[worker]);
        std::unique_lock<std::mutex> lock(mtx);
        while (true) {
            slot * s = nullptr;
            cv.wait(lock, [&] { return stopping || failed || aborted || (s = pick(worker)) != nullptr; });
            if (!s) {
                if (stopping) {
                    return;
                }
                // failed or aborted: nothing more starts; wait to be stopped
                cv.wait(lock, [&] { return stopping; });
                return;
            }
            const int i = s->n_done;
            s->running = true;
            lock.unlock();

            llama_turbo_record rec = {};
            std::string err;
            ggml_status st = GGML_STATUS_FAILED;
            try {
                st = run_split(*s, i, clock, rec);
            } catch (const std::exception & e) {
                err = e.what(); // a device failed (ggml-rpc throws when a server dies)
            }

            lock.lock();
            s->running = false;
            if (st == GGML_STATUS_ABORTED) { // the CPU backend polls the context's abort callback too
                aborted = true;
                cv.notify_all();
                continue;
            }
            if (st != GGML_STATUS_SUCCESS) {
                failed = true;
                device_failed = device_failed || !err.empty();
                error = std::string("stage ") + device_name(s->splits[i].backend) + ": " +
                        (err.empty() ? "graph compute failed with status " + std::to_string((int) st) : err);
                LLAMA_LOG_ERROR("%s: %s\n", __func__, error.c_str());
                cv.notify_all();
                continue;
            }
            records.push_back(rec);
            s->n_done++;
            if (s->n_done == (int) s->splits.size()) {
                finish(*s, lock);
            }
            cv.notify_all();
        }
    }

    // under mtx, last split done: read the deferred outputs (more may arrive while reading), then free the slot
    void finish(slot & s, std::unique_lock<std::mutex> & lock) {
        while (!s.outputs.empty()) {
            std::vector<deferred_output> outs;
            outs.swap(s.outputs);
            lock.unlock();
            std::string err;
            try {
                for (const auto & o : outs) {
                    ggml_backend_tensor_get(o.t, o.dst, 0, o.nbytes);
                }
            } catch (const std::exception & e) {
                err = e.what(); // a stage thread must not let it escape: that would terminate the process
            }
            lock.lock();
            n_outputs_pending -= (int) outs.size();
            if (!err.empty()) {
                failed = device_failed = true;
                error = "reading outputs: " + err;
                return;
            }
        }
        s.busy = false;
    }

    ggml_status run_split(slot & s, int i, stage_clock & clock, llama_turbo_record & rec) {
        split_plan & sp = s.splits[i];
        rec.ubatch     = s.task;
        rec.pos0       = s.pos0;
        rec.n_tokens   = s.n_tokens;
        rec.stage      = sp.stage;
        rec.device     = device_name(sp.backend);
        clock.begin(rec);

        for (const auto & in : sp.inputs) {
            if (in.staged >= 0) {
                ggml_backend_tensor_set(in.dst, s.staging[in.staged].data(), 0, ggml_nbytes(in.dst));
            } else {
                ggml_backend_tensor_copy(in.src, in.dst);
            }
        }
        const ggml_status st = ggml_backend_sched_split_compute_async(s.sched.get(), i);
        if (st != GGML_STATUS_SUCCESS) {
            return st;
        }
        if (clock.on_device()) {
            // CUDA: the reads of staged outputs are ordered on the backend's stream; queue them before the end mark
            // so that the stage's time includes them
            for (int idx : sp.stage_out) {
                ggml_backend_tensor_get_async(sp.backend, s.staging_src[idx], s.staging[idx].data(), 0, s.staging[idx].size());
            }
            clock.mark_end();
            ggml_backend_synchronize(sp.backend);
        } else {
            ggml_backend_synchronize(sp.backend);
            for (int idx : sp.stage_out) {
                ggml_backend_tensor_get(s.staging_src[idx], s.staging[idx].data(), 0, s.staging[idx].size());
            }
            if (sp.stage_out.empty() && sp.fence) {
                // for an RPC backend, synchronize returns once the work is sent; a read returns once the server has
                // done it, so the stage's end time is the device's, not the host's
                uint8_t probe[16];
                ggml_backend_tensor_get(sp.fence, probe, 0, std::min(sizeof(probe), ggml_nbytes(sp.fence)));
            }
        }
        clock.finish(rec);
        return GGML_STATUS_SUCCESS;
    }

    // After allocation: which backend runs each split, and how each input reaches it.
    void plan_splits(slot & s) {
        const bool force_host_staging = getenv_flag("PYTURBO_PIPELINE_HOST_STAGING");
        ggml_backend_sched_t sched = s.sched.get();
        const int n_splits = ggml_backend_sched_get_n_splits(sched);
        s.splits.assign(n_splits, {});
        s.staging_src.clear();
        std::map<ggml_tensor *, int> staged_index;

        for (int i = 0; i < n_splits; ++i) {
            split_plan & sp = s.splits[i];
            sp.backend = ggml_backend_sched_get_split_backend(sched, i);
            sp.worker  = (int) (std::find(lctx.backend_ptrs.begin(), lctx.backend_ptrs.end(), sp.backend) - lctx.backend_ptrs.begin());
            auto it    = std::find(stage_devices.begin(), stage_devices.end(), ggml_backend_get_device(sp.backend));
            sp.stage   = it == stage_devices.end() ? -1 : (int) (it - stage_devices.begin());
            GGML_ASSERT(sp.worker < (int) lctx.backend_ptrs.size());

            // the fence: the last non-empty result of the split, when it lives on a device (see run_split)
            ggml_cgraph * graph = ggml_backend_sched_get_split_graph(sched, i);
            sp.fence = nullptr;
            for (int n = ggml_graph_n_nodes(graph) - 1; n >= 0 && !sp.fence; --n) {
                ggml_tensor * t = ggml_graph_node(graph, n);
                if (t->buffer && ggml_nbytes(t) > 0) {
                    sp.fence = ggml_backend_buffer_is_host(t->buffer) ? nullptr : t;
                    break;
                }
            }

            const int n_inputs = ggml_backend_sched_get_split_n_inputs(sched, i);
            for (int j = 0; j < n_inputs; ++j) {
                ggml_tensor * src = ggml_backend_sched_get_split_input(sched, i, j);
                ggml_tensor * dst = ggml_backend_sched_get_split_input_copy(sched, i, j);
                int staged = -1;
                ggml_backend_buffer_t buf = src->view_src ? src->view_src->buffer : src->buffer;
                ggml_backend_t src_backend = ggml_backend_sched_get_tensor_backend(sched, src);
                // PYTURBO_PIPELINE_HOST_STAGING=1 stages between local GPUs too: the path of GPUs that cannot copy
                // to each other, which tests force with it
                const bool through_host = !src_backend || is_rpc(ggml_backend_get_device(src_backend)) ||
                                          is_rpc(ggml_backend_get_device(sp.backend)) || force_host_staging;
                // host memory, or two devices of this process (CUDA to CUDA: a device-to-device copy): the consumer
                // copies directly, the producer has finished and the slot's memory stays untouched until it is done
                if (!(buf && ggml_backend_buffer_is_host(buf)) && through_host) {
                    // the last earlier split on the source's backend has computed it: that thread stages it
                    int producer = -1;
                    for (int p = i - 1; p >= 0; --p) {
                        if (s.splits[p].backend == src_backend) {
                            producer = p;
                            break;
                        }
                    }
                    if (producer >= 0) {
                        auto found = staged_index.find(src);
                        if (found == staged_index.end()) {
                            staged = (int) s.staging_src.size();
                            staged_index[src] = staged;
                            s.staging_src.push_back(src);
                            s.splits[producer].stage_out.push_back(staged);
                        } else {
                            staged = found->second;
                        }
                    }
                }
                sp.inputs.push_back({src, dst, staged});
            }
        }
        s.staging.resize(s.staging_src.size());
        for (size_t idx = 0; idx < s.staging_src.size(); ++idx) {
            s.staging[idx].resize(ggml_nbytes(s.staging_src[idx]));
        }
    }

    // ---- the host thread's waits -----------------------------------------------------------------------------------

    bool all_idle() const {
        for (const auto & s : slots) {
            if (s.running || (s.busy && !failed && !aborted)) {
                return false;
            }
        }
        return true;
    }

    // Wait for cond while delivering timing records and polling the context's abort callback. Returns false (with
    // ret set) if the replay failed or was aborted: then nothing new starts and the caller unwinds.
    template <typename Cond>
    bool wait_host(Cond cond, ggml_status & ret) {
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
            cv.wait_for(lock, std::chrono::milliseconds(2));
            if (!records.empty() || lctx.abort_callback) {
                lock.unlock();
                flush_records();
                const bool abort = lctx.abort_callback && lctx.abort_callback(lctx.abort_callback_data);
                lock.lock();
                if (abort) {
                    aborted = true;
                    cv.notify_all();
                }
            }
        }
        lock.unlock();
        flush_records();
        return true;
    }

    void flush_records() {
        std::vector<llama_turbo_record> out;
        {
            std::lock_guard<std::mutex> lock(mtx);
            out.swap(records);
        }
        if (record_cb) {
            for (const auto & rec : out) {
                record_cb(&rec, record_cb_data);
            }
        }
    }

    // ---- state -----------------------------------------------------------------------------------------------------

    llama_context & lctx;

    bool capture_open = false;
    bool replaying    = false;
    std::vector<captured_batch> captured;

    int32_t max_in_flight = 0;
    llama_turbo_record_callback record_cb = nullptr;
    void * record_cb_data = nullptr;

    std::vector<slot>               slots;
    std::vector<ggml_backend_dev_t> stage_devices;
    std::vector<ggml_backend_t>     prev_split_backends;
    int                             n_submitted = 0;

    // shared with the stage threads, under mtx
    std::mutex                      mtx;
    std::condition_variable         cv;
    std::vector<std::thread>        workers;
    std::vector<llama_turbo_record> records;
    int         n_outputs_pending = 0;
    bool        stopping      = false;
    bool        failed        = false;
    bool        aborted       = false;
    bool        device_failed = false;
    std::string error;
};

static llama_turbo & turbo_of(llama_context * ctx) {
    if (!ctx->executor) {
        ctx->executor.reset(new llama_turbo(*ctx));
    }
    return static_cast<llama_turbo &>(*ctx->executor);
}

int32_t llama_turbo_capture_begin(llama_context * ctx) {
    llama_turbo & t = turbo_of(ctx);
    if (t.capture_open) {
        LLAMA_LOG_ERROR("%s: a capture is already open\n", __func__);
        return -1;
    }
    t.captured.clear();
    t.capture_open = true;
    return 0;
}

int32_t llama_turbo_replay(llama_context * ctx, llama_turbo_result * result) {
    llama_turbo_result local;
    llama_turbo_result & r = result ? *result : local;
    llama_turbo & t = turbo_of(ctx);
    if (!t.capture_open) {
        r = {};
        r.status = -1;
        snprintf(r.error, sizeof(r.error), "no capture is open");
        return -1;
    }
    return t.replay(r);
}

void llama_turbo_capture_discard(llama_context * ctx) {
    llama_turbo & t = turbo_of(ctx);
    t.capture_open = false;
    t.captured.clear();
}

void llama_turbo_set_record_callback(llama_context * ctx, llama_turbo_record_callback callback, void * user_data) {
    llama_turbo & t = turbo_of(ctx);
    t.record_cb      = callback;
    t.record_cb_data = user_data;
}

void llama_turbo_set_max_in_flight(llama_context * ctx, int32_t n) {
    turbo_of(ctx).max_in_flight = std::max(0, n);
}

int32_t llama_turbo_stage_names(const llama_model * model, const char ** names, int32_t capacity) {
    const auto devs = layer_devices(*model);
    for (int32_t i = 0; i < (int32_t) devs.size() && i < capacity; ++i) {
        names[i] = ggml_backend_dev_name(devs[i]);
    }
    return (int32_t) devs.size();
}
