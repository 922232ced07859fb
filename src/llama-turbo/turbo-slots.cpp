// Scheduler slots: one ggml scheduler per ubatch in flight.
//
// "Slot" here (and in slot_buffer_bytes) is a ubatch in flight's scheduler and buffers. The server's "slot" is
// llama-server's: a sequence of the context serving one request at a time (pyturbo.batching).
//
// Why one scheduler per slot: every ubatch in flight needs its own compute buffers and input copies. A slot is reused
// only when its previous ubatch is completely done, so buffers are never shared between ubatches in flight. The extra
// memory is slots x the context's worst-case compute buffers, reserved once (not sized by the current prompt, so that
// the next replays need no re-reservation) and reported as llama_turbo_result::slot_buffer_bytes.

#include "turbo.h"

#include "llama-impl.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

// The ubatches kept in flight: max_in_flight when given, else one per stage plus one, so that the next ubatch is set up
// while every stage works. Decided here only: pyturbo sizes its memory check with it (llama_turbo_n_in_flight).
int32_t llama_turbo::n_in_flight() const {
    return options.max_in_flight > 0 ? options.max_in_flight : (int32_t) stage_devices.size() + 1;
}

int32_t llama_turbo_n_in_flight(const llama_context * ctx) {
    const auto * t = static_cast<const llama_turbo *>(ctx->executor.get());
    return t ? t->n_in_flight() : -1;
}

std::string llama_turbo::prepare_slots(llama_turbo_result & r) {
    r.n_in_flight = n_in_flight();
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
    r.slot_buffer_bytes = 0;
    for (auto & s : slots) {
        for (ggml_backend_t b : lctx.backend_ptrs) {
            r.slot_buffer_bytes += ggml_backend_sched_get_buffer_size(s.sched.get(), b);
        }
    }
    return "";
}

// A round trip to an RPC server waits for the work queued on its connection, so one made while ubatches are in
// flight drains the pipeline before the next ubatch is submitted. ggml-rpc asks a server for the allocation size of
// some ops (flash attention, matmuls) once per output shape, so a ubatch of a size not seen before (a prompt's shorter
// last ubatch) asks when its graph is allocated: the last ubatch of a first 1500-token prompt (476 tokens) waited
// ~0.7 s for it on 4 CPU workers. So as a replay's first ubatch is submitted, while nothing runs, the graphs of the
// replay's other ubatch sizes are built and sized, not allocated, in a scheduler of their own: those questions are
// asked now, at idle servers, and the answers are cached for the process. (graph_reserve also drops llama.cpp's own
// previous graph, which its next standard decode rebuilds. The other such round trip, a new buffer's base address,
// ggml-rpc asks at allocation: patches/0014.)
void llama_turbo::presize_shapes(const llama_ubatch & first, const llama_memory_context_i * mctx) {
    presized.insert(first.n_tokens); // its own graph asks now
    for (uint32_t n : replay_sizes) {
        if (!presized.insert(n).second) {
            continue;
        }
        auto & cp = lctx.cparams;
        if (!probe_sched) {
            probe_sched.reset(ggml_backend_sched_new(lctx.backend_ptrs.data(), lctx.backend_buft.data(),
                    (int) lctx.backend_ptrs.size(), lctx.graph_max_nodes(cp.n_ubatch), false, cp.op_offload));
        }
        std::vector<size_t> sizes(lctx.backend_ptrs.size());
        sched_swap swap(lctx, probe_sched);
        // one sequence, one output: the real ubatch's attention and matmul shapes (the sizes depend on its tokens)
        if (!lctx.graph_reserve(n, 1, 1, mctx, /*split_only =*/ true, sizes.data())) {
            LLAMA_LOG_WARN("%s: could not size the graph of a ubatch of %u tokens ahead\n", __func__, n);
        }
        trace.mark("graph presized", (int) n);
    }
}

// after a replay, also a failed or aborted one (nothing runs any more): every slot is free for the next
void llama_turbo::release_slots() {
    for (auto & s : slots) {
        s.busy = false;
        s.outputs.clear();
    }
}

// The host thread's part of a ubatch: wait for a free slot, apply the KV metadata, build the graph in the slot's own
// scheduler, set its inputs and publish it to the stage threads. It does not wait for the ubatch to be computed.
llm_graph_result * llama_turbo::submit(const llama_ubatch & ubatch, llm_graph_type gtype, llama_memory_context_i * mctx, ggml_status & ret) {
    const int k = n_submitted;
    slot & s = slots[k % slots.size()];

    if (!wait_host([&] { return !s.busy; }, ret)) {
        return nullptr;
    }
    {
        std::lock_guard<std::mutex> lock(mtx);
        host_submitting = true;
    }
    notify(); // the thread of the ubatch's first split may start spinning
    const int64_t t_submit_us = ggml_time_us();
    if (k == 0) {
        t_first_submit_us = t_submit_us;
    }
    trace.mark("submit", k);
    if (mctx && !mctx->apply()) {
        LLAMA_LOG_ERROR("%s: failed to apply memory context\n", __func__);
        ret = GGML_STATUS_FAILED;
        return nullptr;
    }
    if (k == 0) {
        presize_shapes(ubatch, mctx); // nothing is in flight yet
    }

    // Graph reuse, as llama.cpp's own decode does it: where this ubatch's graph has the shape of the one the slot
    // built last (same tokens, same KV length: in a prompt from an empty cache, ubatch k of every prompt lands in
    // slot k % slots with the same shape as the previous prompt's), only the inputs are set: building and allocating
    // a graph is host work, and the first ubatch's is on the critical path before any device starts.
    bool reuse = false;
    {
        sched_swap swap(lctx, s.sched); // until the end of this block s.sched is the context's own: see below
        const auto gparams = lctx.graph_params(s.res.get(), ubatch, mctx, gtype);
        reuse = !lctx.graph_reuse_disable && s.graph_allocated && s.res->can_reuse(gparams);
        if (!reuse) {
            s.graph_allocated = false;
            s.res->reset();
            ggml_backend_sched_reset(lctx.sched.get());
            ggml_cgraph * gf = lctx.model.build_graph(gparams);
            if (!gf) {
                LLAMA_LOG_ERROR("%s: failed to build the graph\n", __func__);
                ret = GGML_STATUS_FAILED;
                return nullptr;
            }
            place_host_weight_ops(lctx.sched.get(), gf);
            if (!ggml_backend_sched_alloc_graph(lctx.sched.get(), gf)) {
                LLAMA_LOG_ERROR("%s: failed to allocate the graph\n", __func__);
                ret = GGML_STATUS_ALLOC_FAILED;
                return nullptr;
            }
        }
        trace.mark(reuse ? "graph reused" : "graph built", k);
        s.res->set_inputs(&ubatch);
    }
    trace.mark("inputs set", k);
    if (!reuse) {
        plan_splits(s);
        s.graph_allocated = true;
    }

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
        for (auto & sp : s.splits) {
            sp.prefetched = false;
        }
        s.outputs.clear();
        host_submitting = false;
    }
    prev_split_backends = std::move(backends_now);
    n_submitted++;
    notify();
    const int64_t t_queued_us = ggml_time_us();
    if (k == 0) {
        t_first_queued_us = t_queued_us;
    }
    host_submit_us += t_queued_us - t_submit_us;
    trace.mark("queued", k);

    ret = GGML_STATUS_SUCCESS;
    return s.res.get();
}

// The logits of a ubatch still in flight are read by the stage thread that completes it (finish()); those of one
// already done are read here.
void llama_turbo::defer_output(const llm_graph_result * res, ggml_tensor * t, float * dst, size_t nbytes) {
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
        break;
    }
    lock.unlock();
    ggml_backend_tensor_get(t, dst, 0, nbytes);
}

void llama_turbo::wait_outputs() {
    if (!replaying) {
        return;
    }
    ggml_status ret;
    wait_host([&] { return n_outputs_pending == 0; }, ret);
}

// Weights kept in host memory (Model(host_tensors=...): the experts) are copied to a GPU for each ubatch where the op
// is big enough for that to pay (llama.cpp's op offload), and llama.cpp's scheduler hands every such op to the first
// GPU that takes it. On the pipeline's chain that makes the first stage copy and compute every layer's experts while
// the others wait; run each one on its layer's own device instead, so every stage copies and computes its own layers'
// experts on its own stream. The kernels are the same, so are the results.
void llama_turbo::place_host_weight_ops(ggml_backend_sched_t sched, ggml_cgraph * gf) const {
    if (!lctx.cparams.op_offload) {
        return;
    }
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        const ggml_tensor * weight = nullptr;
        for (const ggml_tensor * src : node->src) {
            if (src && src->buffer && ggml_backend_buffer_get_usage(src->buffer) == GGML_BACKEND_BUFFER_USAGE_WEIGHTS &&
                ggml_backend_buffer_is_host(src->buffer)) {
                weight = src;
                break;
            }
        }
        const char * dash = weight ? strrchr(node->name, '-') : nullptr;
        int il = -1;
        if (!dash || sscanf(dash + 1, "%d", &il) != 1 || il < 0 || il >= (int) lctx.model.hparams.n_layer()) {
            continue;
        }
        ggml_backend_dev_t dev = lctx.model.dev_layer(il);
        for (size_t b = 0; b < lctx.backend_ptrs.size(); ++b) {
            ggml_backend_t backend = lctx.backend_ptrs[b];
            if (traits[b].gpu && ggml_backend_get_device(backend) == dev && ggml_backend_supports_op(backend, node) &&
                ggml_backend_offload_op(backend, node)) {
                ggml_backend_sched_set_tensor_backend(sched, node, backend);
                break;
            }
        }
    }
}
