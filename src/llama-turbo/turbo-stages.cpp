// The stage pipeline: one thread per backend of the context runs that backend's split of every ubatch in flight.
//
//   1. Readiness: split i of ubatch k may run once split i-1 of ubatch k is done (the activations it needs) and split i
//      of ubatch k-1 is done (the KV cache of the same layers). So device s works on ubatch k while device s+1 works
//      on ubatch k-1. Among ready splits a thread takes the lowest ubatch.
//   2. Transfers: a tensor that leaves or enters an RPC device is staged through host memory by the thread that
//      produced it, right after its split, and written to the consumer's input copy by the consumer's thread; between
//      devices of this process (CUDA to CUDA, or host memory) the consumer copies it directly. No thread ever waits
//      for work queued on another thread's device, which is what limits the stock scheduler (one host thread
//      synchronizes the source device before every copy it cannot do asynchronously).
//   3. Completion: the thread that runs a ubatch's last split reads its deferred outputs (logits) and frees the slot.
//   4. Failure: a split that fails or throws (ggml-rpc throws for a dead server, patches/0002) stops the replay: nothing
//      new starts, running splits finish, and the host thread unwinds (turbo-replay.cpp rolls the KV cache back).

#include "turbo.h"

#include "llama-impl.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#ifdef __linux__
#include <sched.h>
#endif

static bool in_host_memory(const ggml_tensor * t) {
    ggml_backend_buffer_t buf = t->view_src ? t->view_src->buffer : t->buffer;
    return buf && ggml_backend_buffer_is_host(buf);
}

static int usable_cores() {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        return CPU_COUNT(&set);
    }
#endif
    return (int) std::thread::hardware_concurrency();
}

bool llama_turbo::spin_wanted() const {
    if (const char * env = turbo_switch("LLAMA_TURBO_SPIN")) { // "0" or "1": off or on whatever the layout (measurements, tests)
        return strcmp(env, "0") != 0;
    }
    bool gpus = false;
    for (const auto & t : traits) {
        gpus = gpus || t.gpu;
    }
    // a core for every stage thread and the host's, and as many again for everything else
    return gpus && usable_cores() >= 2 * ((int) lctx.backend_ptrs.size() + 1);
}

bool llama_turbo::work_near(int thread) const {
    if (host_submitting) {
        return true;
    }
    for (const auto & s : slots) {
        if (s.busy && s.running && s.n_done + 1 < (int) s.splits.size() && s.splits[s.n_done + 1].thread == thread) {
            return true;
        }
    }
    return false;
}

// Called with the lock held, after the caller found nothing to do; returns with it held. Not near: sleeps until a
// notify. Near: spins until another thread makes progress (notify) or SPIN_LIMIT passed. The caller re-checks both
// its work and whether it is still near.
void llama_turbo::wait_or_spin(std::unique_lock<std::mutex> & lock, bool near) {
    if (!near) {
        cv.wait(lock);
        return;
    }
    constexpr auto SPIN_LIMIT = std::chrono::milliseconds(20);
    const uint64_t seen = progress.load(std::memory_order_acquire);
    lock.unlock();
    const auto t_end = std::chrono::steady_clock::now() + SPIN_LIMIT;
    for (int i = 1; progress.load(std::memory_order_acquire) == seen; ++i) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ __volatile__("yield");
#endif
        if (i % 1024 == 0 && std::chrono::steady_clock::now() > t_end) {
            break;
        }
    }
    lock.lock();
}

bool llama_turbo::completion_near() const {
    for (const auto & s : slots) {
        if (s.busy && s.running && s.n_done + 1 == (int) s.splits.size()) {
            return true;
        }
    }
    return false;
}

// The stage threads outlive a replay: starting and joining them is on the critical path of every prefill (a new
// thread, and one that sleeps, is slow to wake on server CPUs; bench/results/2026-11-26-gpu-host-time.md).
void llama_turbo::start_replay() {
    {
        std::lock_guard<std::mutex> lock(mtx);
        failed = aborted = false;   // host_submitting was cleared as the previous replay ended
        spin = spin_wanted();
        replay_id++;
    }
    if (stage_threads.empty()) {
        for (size_t t = 0; t < lctx.backend_ptrs.size(); ++t) {
            stage_threads.emplace_back([this, t] { stage_thread_loop((int) t); });
        }
    }
    notify();
}

void llama_turbo::stop_stage_threads() {
    {
        std::lock_guard<std::mutex> lock(mtx);
        stopping = true;
    }
    notify();
    for (auto & t : stage_threads) {
        t.join();
    }
    stage_threads.clear();
}

const slot * llama_turbo::find_task(int task) const {
    if (task < 0) {
        return nullptr;
    }
    const slot & s = slots[task % slots.size()];
    return s.busy && s.task == task ? &s : nullptr;
}

bool llama_turbo::ready(const slot & s) const {
    if (!s.busy || s.running || s.n_done >= (int) s.splits.size()) {
        return false;
    }
    const slot * prev = find_task(s.task - 1);
    if (!prev) {
        return true;
    }
    return !s.barrier && prev->n_done > s.n_done;
}

// under mtx: the lowest ubatch whose next split runs on this thread and is ready
slot * llama_turbo::pick(int thread) {
    slot * best = nullptr;
    for (auto & s : slots) {
        if (ready(s) && s.splits[s.n_done].thread == thread && (!best || s.task < best->task)) {
            best = &s;
        }
    }
    return best;
}

void llama_turbo::stage_thread_loop(int thread) {
    stage_clock clock(lctx.backend_ptrs[thread]);
    std::unique_lock<std::mutex> lock(mtx);
    int clock_replay = replay_id;
    while (true) {
        slot * s = nullptr;
        auto have = [&] { return stopping || failed || aborted || (s = pick(thread)) != nullptr; };
        while (!have()) {
            wait_or_spin(lock, spin && work_near(thread));
        }
        if (stopping) {
            return;
        }
        if (!s) {
            // failed or aborted: nothing more starts in this replay; wait for the next one
            cv.wait(lock, [&] { return stopping || !(failed || aborted); });
            continue;
        }
        if (clock_replay != replay_id) {
            clock_replay = replay_id;
            lock.unlock();
            clock.rebase();
            lock.lock();
            continue; // pick again: the state may have changed meanwhile
        }
        const int i = s->n_done;
        s->running = true;
        notify(); // the thread of the next split may start spinning
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
            notify();
            continue;
        }
        if (st != GGML_STATUS_SUCCESS) {
            failed = true;
            device_failed = device_failed || !err.empty();
            error = std::string("stage ") + turbo_device_name(s->splits[i].backend) + ": " +
                    (err.empty() ? "graph compute failed with status " + std::to_string((int) st) : err);
            LLAMA_LOG_ERROR("%s: %s\n", __func__, error.c_str());
            notify();
            continue;
        }
        records.push_back(rec);
        s->n_done++;
        if (s->n_done == (int) s->splits.size()) {
            finish(*s, lock);
        }
        notify();
    }
}

// under mtx, last split done: read the deferred outputs (more may arrive while reading), then free the slot
void llama_turbo::finish(slot & s, std::unique_lock<std::mutex> & lock) {
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

ggml_status llama_turbo::run_split(slot & s, int i, stage_clock & clock, llama_turbo_record & rec) {
    split_plan & sp = s.splits[i];
    rec.ubatch     = s.task;
    rec.pos0       = s.pos0;
    rec.n_tokens   = s.n_tokens;
    rec.stage      = sp.stage;
    rec.device     = turbo_device_name(sp.backend);
    clock.begin(rec);
    trace.mark("split begin", s.task, rec.device);

    bool prefetched;
    {
        std::lock_guard<std::mutex> lock(mtx);
        prefetched = sp.prefetched;
    }
    for (const auto & in : sp.inputs) {
        if (in.prefetch && prefetched) {
            continue;
        } else if (in.pushed >= 0) {
            // the server waits for the bytes from the producer's server before it computes
            rpc_peer.await(in.dst, s.pushes[in.pushed].id);
        } else if (in.staged >= 0 && traits[sp.thread].async_io) {
            // queued on this device's stream ahead of the split's compute: the host does not wait for the transfer
            ggml_backend_tensor_set_async(sp.backend, in.dst, s.staging[in.staged], 0, ggml_nbytes(in.dst));
        } else if (in.staged >= 0) {
            ggml_backend_tensor_set(in.dst, s.staging[in.staged], 0, ggml_nbytes(in.dst));
        } else if (traits[sp.thread].async_io && in.src->data && in_host_memory(in.src)) {
            // a graph input or CPU result of this slot (the embeddings, the mask): its memory stays untouched until
            // the ubatch is done, and llama.cpp gives the CPU pinned memory when a GPU is present, so this is DMA
            ggml_backend_tensor_set_async(sp.backend, in.dst, in.src->data, 0, ggml_nbytes(in.dst));
        } else {
            ggml_backend_tensor_copy(in.src, in.dst);
        }
    }
    trace.mark("inputs queued", s.task, rec.device);
    const ggml_status st = ggml_backend_sched_split_compute_async(s.sched.get(), i);
    if (st != GGML_STATUS_SUCCESS) {
        return st;
    }
    for (int idx : sp.push_out) {
        // queued right behind the computation: the server sends the result while it goes on with its next split
        const ggml_type wire = options.rpc_wire == LLAMA_TURBO_WIRE_F16  ? GGML_TYPE_F16  :
                               options.rpc_wire == LLAMA_TURBO_WIRE_BF16 ? GGML_TYPE_BF16 : s.pushes[idx].src->type;
        s.pushes[idx].id = rpc_peer.push(s.pushes[idx].src, s.pushes[idx].dst, wire);
    }
    if (traits[sp.thread].rpc) {
        prefetch_next(s, sp.backend);
    }
    trace.mark("split launched", s.task, rec.device);
    if (clock.on_device()) {
        // CUDA: the reads of staged outputs are ordered on the backend's stream; queue them before the end mark so
        // that the stage's time includes them
        for (int idx : sp.stage_out) {
            ggml_backend_tensor_get_async(sp.backend, s.staging_src[idx], s.staging[idx], 0, ggml_nbytes(s.staging_src[idx]));
        }
        clock.mark_end();
        ggml_backend_synchronize(sp.backend);
    } else {
        ggml_backend_synchronize(sp.backend);
        for (int idx : sp.stage_out) {
            ggml_backend_tensor_get(s.staging_src[idx], s.staging[idx], 0, ggml_nbytes(s.staging_src[idx]));
        }
        if (sp.stage_out.empty() && sp.fence) {
            // for an RPC backend, synchronize returns once the work is sent; a read returns once the server has done
            // it, so the stage's end time is the device's, not the host's
            uint8_t probe[16];
            ggml_backend_tensor_get(sp.fence, probe, 0, std::min(sizeof(probe), ggml_nbytes(sp.fence)));
        }
    }
    trace.mark("split done", s.task, rec.device);
    clock.finish(rec);
    return GGML_STATUS_SUCCESS;
}

// After allocation: which backend runs each split, and how each input reaches it.
void llama_turbo::plan_splits(slot & s) {
    ggml_backend_sched_t sched = s.sched.get();
    const int n_splits = ggml_backend_sched_get_n_splits(sched);
    s.splits.assign(n_splits, {});
    s.staging_src.clear();
    s.pushes.clear();
    std::map<ggml_tensor *, int> staged_index;

    for (int i = 0; i < n_splits; ++i) {
        split_plan & sp = s.splits[i];
        sp.backend = ggml_backend_sched_get_split_backend(sched, i);
        sp.thread  = (int) (std::find(lctx.backend_ptrs.begin(), lctx.backend_ptrs.end(), sp.backend) - lctx.backend_ptrs.begin());
        auto it    = std::find(stage_devices.begin(), stage_devices.end(), ggml_backend_get_device(sp.backend));
        sp.stage   = it == stage_devices.end() ? -1 : (int) (it - stage_devices.begin());
        GGML_ASSERT(sp.thread < (int) lctx.backend_ptrs.size());

        // the fence: the last non-empty result of the split, when it lives on a device (see run_split)
        ggml_cgraph * graph = ggml_backend_sched_get_split_graph(sched, i);
        sp.fence = nullptr;
        for (int n = ggml_graph_n_nodes(graph) - 1; n >= 0; --n) {
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
            const bool src_in_host_memory = in_host_memory(src);
            ggml_backend_t src_backend = ggml_backend_sched_get_tensor_backend(sched, src);
            const int src_thread = (int) (std::find(lctx.backend_ptrs.begin(), lctx.backend_ptrs.end(), src_backend) - lctx.backend_ptrs.begin());
            const backend_traits * from = src_thread < (int) traits.size() ? &traits[src_thread] : nullptr;
            const backend_traits & to   = traits[sp.thread];
            // GPUs without events are those of a build without peer copies: they cannot copy to each other
            const bool gpus_without_peer_copy = from && from->gpu && to.gpu && src_backend != sp.backend &&
                                                !(from->events && to.events);
            const bool through_host = !from || from->rpc || to.rpc || gpus_without_peer_copy || options.host_staging;
            // the last earlier split on the source's backend: it computed src (unless src is a graph input)
            int producer = -1;
            for (int p = i - 1; p >= 0; --p) {
                if (s.splits[p].backend == src_backend) {
                    producer = p;
                    break;
                }
            }
            int pushed = -1;
            // from host memory to an RPC server: the next ubatch's copy can cross the link while the server computes
            // this one (prefetch_next). A graph input is set when the ubatch is submitted, a CPU split's result once
            // that split has run. Every server that needs a graph input (the KQ mask) gets it from this process:
            // ggml-rpc sends repetitive data as runs (patches/0013), a mask in a few KB.
            const bool prefetch = src_in_host_memory && to.rpc && !options.relay_rpc;
            if (prefetch && !(src->flags & GGML_TENSOR_FLAG_INPUT)) {
                sp.prefetch_after = std::max(sp.prefetch_after, producer);
            }
            // host memory, or two devices of this process that copy to each other (CUDA to CUDA with peer copies): the
            // consumer copies directly, the producer has finished and the slot's memory stays untouched until it is
            // done. Otherwise the producer's thread stages it, or has its server send it to the consumer's server.
            if (!src_in_host_memory && through_host) {
                if (producer >= 0 && from->rpc && to.rpc && servers_copy(src_thread, sp.thread)) {
                    pushed = (int) s.pushes.size();
                    s.pushes.push_back({src, dst});
                    s.splits[producer].push_out.push_back(pushed);
                } else if (producer >= 0) {
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
            sp.inputs.push_back({src, dst, staged, pushed, prefetch});
        }
    }
    allocate_staging(s);
}

// Called by an RPC stage thread right after it queued a split's computation: the inputs from host memory of the next
// ubatch's split on the same server are queued behind it when they exist, so they cross the link while the server
// computes (its commands run in order, and the next ubatch has its own buffers); else that split sends them itself
// when it starts. Queued any earlier, they would delay this computation, which waits behind them on the connection.
void llama_turbo::prefetch_next(const slot & s, ggml_backend_t backend) {
    std::vector<std::pair<ggml_tensor *, ggml_tensor *>> sends;
    {
        std::lock_guard<std::mutex> lock(mtx);
        slot * next = const_cast<slot *>(find_task(s.task + 1));
        if (!next) {
            return;
        }
        for (int j = next->n_done; j < (int) next->splits.size(); ++j) {
            split_plan & sp = next->splits[j];
            if (sp.backend != backend) {
                continue;
            }
            if (sp.prefetched || (next->running && j == next->n_done) || sp.prefetch_after >= next->n_done) {
                return; // done already, running, or its inputs are not computed yet
            }
            for (const auto & in : sp.inputs) {
                if (in.prefetch) {
                    sends.emplace_back(in.src, in.dst);
                }
            }
            sp.prefetched = !sends.empty();
            break;
        }
    }
    for (const auto & [src, dst] : sends) {
        ggml_backend_tensor_set_async(backend, dst, src->data, 0, ggml_nbytes(dst));
    }
}

// Whether the servers of two RPC stage threads send tensors to each other (asked once per pair and context: a round
// trip to each); `transfers` says how the latest plan moves them, and why not directly.
bool llama_turbo::servers_copy(int from_thread, int to_thread) {
    auto checked = server_copy_checked.find({from_thread, to_thread});
    if (checked == server_copy_checked.end()) {
        std::string why;
        if (options.relay_rpc) {
            why = "relayed as asked";
        } else if (!rpc_peer.reachable || !rpc_peer.push || !rpc_peer.await) {
            why = "this build's ggml-rpc has no server-to-server copies";
        } else {
            char buf[256] = "";
            if (!rpc_peer.reachable(traits[from_thread].endpoint.c_str(), traits[to_thread].endpoint.c_str(), buf, sizeof(buf))) {
                why = buf;
            }
        }
        if (!why.empty()) {
            LLAMA_LOG_WARN("%s: tensors from %s to %s go through this process: %s\n", __func__,
                           traits[from_thread].endpoint.c_str(), traits[to_thread].endpoint.c_str(), why.c_str());
        }
        checked = server_copy_checked.emplace(std::make_pair(from_thread, to_thread), why).first;
    }
    const std::string & why = checked->second;
    if (!why.empty()) {
        transfers = "through this process: " + why;
    } else if (transfers.empty()) {
        transfers = "server-to-server";
    }
    return why.empty();
}

// Under no lock: the slot is not in flight (submit() waited for it), so nothing reads or writes its staging memory.
void llama_turbo::allocate_staging(slot & s) {
    const size_t align = 256;
    std::vector<size_t> offsets;
    size_t total = 0;
    for (ggml_tensor * t : s.staging_src) {
        offsets.push_back(total);
        total += GGML_PAD(ggml_nbytes(t), align);
    }
    uint8_t * base = nullptr;
    if (pinned_buft && total > 0) {
        if (!s.staging_pinned || ggml_backend_buffer_get_size(s.staging_pinned.get()) < total) {
            s.staging_pinned.reset(ggml_backend_buft_alloc_buffer(pinned_buft, total));
        }
        base = s.staging_pinned ? (uint8_t *) ggml_backend_buffer_get_base(s.staging_pinned.get()) : nullptr;
    }
    if (!base) { // no GPU here, or pinned memory ran out
        s.staging_pageable.resize(std::max(total, s.staging_pageable.size()));
        base = s.staging_pageable.data();
    }
    s.staging.clear();
    for (size_t off : offsets) {
        s.staging.push_back(base + off);
    }
}

bool llama_turbo::all_idle() const {
    for (const auto & s : slots) {
        if (s.running || (s.busy && !failed && !aborted)) {
            return false;
        }
    }
    return true;
}

void llama_turbo::flush_records() {
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
