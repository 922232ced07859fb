// Capture, the path decision and replay: the entry points of llama-turbo.h. Start reading here.
//
// How a replay runs
//   1. Capture: while a capture is open, llama_decode() hands its batch to capture(), which copies it and returns 0.
//      A prompt handed to llama_turbo_prefill() is captured as one batch that knows the calls its caller would make.
//   2. Decide (decide_path): the standard path unless the caller asked for the pipeline and it is safe (one sequence,
//      causal attention, no embeddings or eval callbacks, a layer split over at least two devices, at least two
//      ubatches). The reason for the standard path is reported. Whether it is useful is the caller's decision.
//   3. Decode, one of two ways, both through llama_context::decode so that batch validation, KV slots and output
//      bookkeeping are llama.cpp's own:
//      - standard (decode_calls): the calls the caller made (or would have made), one after the other, checking for an
//        abort between them;
//      - pipelined (decode_pipelined): the same calls, cut into calls of one ubatch where that changes nothing, with
//        the executor active, so that every ubatch goes to submit() (turbo-slots.cpp), which builds its graph in a
//        scheduler slot of its own and returns without waiting; the stage threads (turbo-stages.cpp) run the splits
//        of the ubatches in flight.
//      plan_calls() is the one place where batches are cut into calls, for both paths.
//   4. Roll back: on failure or abort every position the replay added to the KV cache is removed again, so the caller
//      sees the context as it was before.

#include "turbo.h"

#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>

turbo_batch::turbo_batch(const llama_batch & batch) {
    const int32_t n = batch.n_tokens;
    token.assign(batch.token, batch.token + n);
    if (batch.pos) {
        pos.assign(batch.pos, batch.pos + n);
    }
    if (batch.logits) {
        logits.assign(batch.logits, batch.logits + n);
    }
    if (batch.n_seq_id && batch.seq_id) {
        n_seq_id.assign(batch.n_seq_id, batch.n_seq_id + n);
        for (int32_t i = 0; i < n; ++i) {
            seq_id_flat.insert(seq_id_flat.end(), batch.seq_id[i], batch.seq_id[i] + batch.n_seq_id[i]);
        }
    }
    call_lengths = {n};
}

turbo_batch::turbo_batch(const llama_token * tokens, int32_t n_tokens, llama_pos pos0, llama_seq_id seq,
                         int32_t first_call, int32_t n_batch)
    : token(tokens, tokens + n_tokens), pos(n_tokens), n_seq_id(n_tokens, 1), seq_id_flat(n_tokens, seq),
      logits(n_tokens, 0) {
    for (int32_t i = 0; i < n_tokens; ++i) {
        pos[i] = pos0 + i;
    }
    logits[n_tokens - 1] = 1;
    for (int32_t i0 = 0; i0 < n_tokens; ) {
        const int32_t len = std::min(i0 == 0 && first_call > 0 ? std::min(first_call, n_batch) : n_batch, n_tokens - i0);
        call_lengths.push_back(len);
        i0 += len;
    }
}

llama_batch turbo_batch::view() {
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

// The devices that compute the layers, in chain order: each layer's device, and after it any other device that holds
// some of the layer's weights (llama_model_params::tensor_buft_overrides: the experts of a mixture-of-experts model
// kept in host memory run on the CPU, between the layer's attention and the next layer on its device).
std::vector<ggml_backend_dev_t> turbo_layer_devices(const llama_model & model) {
    const int n_layer = (int) model.hparams.n_layer();
    std::vector<std::vector<ggml_backend_dev_t>> weight_devices(n_layer);
    for (const auto & [name, tensor] : model.tensors_by_name) {
        int il = -1;
        if (tensor->buffer && sscanf(name.c_str(), "blk.%d.", &il) == 1 && il >= 0 && il < n_layer) {
            weight_devices[il].push_back(ggml_backend_buft_get_device(ggml_backend_buffer_get_type(tensor->buffer)));
        }
    }
    std::vector<ggml_backend_dev_t> devs;
    auto add = [&](ggml_backend_dev_t dev) {
        if (dev && std::find(devs.begin(), devs.end(), dev) == devs.end()) {
            devs.push_back(dev);
        }
    };
    for (int il = 0; il < n_layer; ++il) {
        add(model.dev_layer(il));
        for (ggml_backend_dev_t dev : weight_devices[il]) {
            add(dev);
        }
    }
    return devs;
}

const char * turbo_device_name(ggml_backend_t backend) {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    return dev ? ggml_backend_dev_name(dev) : ggml_backend_name(backend);
}

llama_turbo::llama_turbo(llama_context & lctx, const llama_turbo_options & options)
    : lctx(lctx), options(options), stage_devices(turbo_layer_devices(lctx.model)) {
    for (ggml_backend_t backend : lctx.backend_ptrs) {
        backend_traits t;
        ggml_backend_dev_t dev = ggml_backend_get_device(backend);
        t.rpc = llama_turbo_dev_is_rpc(dev);
        if (t.rpc) {
            t.endpoint = ggml_backend_dev_description(dev); // ggml-rpc describes its devices by their server
        }
        if (dev && !t.rpc) { // asking an RPC device for its properties is a round trip to its server
            ggml_backend_dev_props props;
            ggml_backend_dev_get_props(dev, &props);
            t.gpu      = props.type == GGML_BACKEND_DEVICE_TYPE_GPU;
            t.events   = props.caps.events;
            t.async_io = props.caps.async && t.gpu;
            if (t.gpu && props.caps.host_buffer && !pinned_buft) {
                pinned_buft = ggml_backend_dev_host_buffer_type(dev);
            }
        }
        traits.push_back(t);
    }
    if (ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC")) {
        rpc_peer.reachable = (decltype(rpc_peer.reachable)) ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_peer_reachable");
        rpc_peer.push      = (decltype(rpc_peer.push)) ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_push_tensor");
        rpc_peer.await     = (decltype(rpc_peer.await)) ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_await_tensor");
    }
    if (options.host_staging) {
        LLAMA_LOG_INFO("%s: every transfer between devices is staged through host memory (host_staging)\n", __func__);
    }
}

// ---- 1. capture -------------------------------------------------------------------------------------------------------

void llama_turbo::begin_capture() {
    captured.clear();
    capture_open = true;
}

int32_t llama_turbo::capture(const llama_batch & batch) {
    if (batch.n_tokens <= 0) {
        LLAMA_LOG_ERROR("%s: n_tokens == 0\n", __func__);
        return -1;
    }
    if (batch.embd) {
        LLAMA_LOG_ERROR("%s: only token batches can be captured\n", __func__);
        return -1;
    }
    captured.emplace_back(batch);
    return 0;
}

// ---- 2. decide ----------------------------------------------------------------------------------------------------------

// The KV caches whose ubatches may be in flight together. A plain cache, and the sliding-window pair (GPT-OSS,
// Gemma): every ubatch's cells are chosen when it is submitted, and a later ubatch writes its cells of a layer only
// after the earlier ones have read that layer (the stages run the ubatches in order), so a cell a later ubatch takes
// over from a token that fell out of its window still holds that token while an earlier ubatch needs it.
// Recurrent and hybrid memories keep one state per sequence that every ubatch updates in turn: not those.
static bool kv_cache_pipelines(llama_memory_i * memory) {
    return dynamic_cast<llama_kv_cache *>(memory) != nullptr || dynamic_cast<llama_kv_cache_iswa *>(memory) != nullptr;
}

// Why these batches take the standard path, or "" to pipeline them. Also fills r.n_ubatches and the sequences touched.
std::string llama_turbo::decide_path(llama_turbo_pipeline pipeline, const std::vector<turbo_batch> & batches,
                                     std::set<llama_seq_id> & seqs, llama_turbo_result & r) const {
    int64_t n_ubatches = 0;
    bool multi_seq = false;
    for (const auto & b : batches) {
        if (b.n_seq_id.empty()) {
            seqs.insert(0);
        } else {
            for (int32_t n : b.n_seq_id) {
                multi_seq = multi_seq || n != 1;
            }
            seqs.insert(b.seq_id_flat.begin(), b.seq_id_flat.end());
        }
        for (int32_t n : b.call_lengths) {
            n_ubatches += (n + lctx.cparams.n_ubatch - 1) / lctx.cparams.n_ubatch;
        }
    }
    r.n_ubatches = (int32_t) n_ubatches;

    const auto & cp = lctx.cparams;
    if (pipeline == LLAMA_TURBO_PIPELINE_OFF)              return "pipeline not requested";
    if (batches.empty())                                  return "nothing was captured";
    if (multi_seq || seqs.size() != 1)                    return "more than one sequence";
    if (!cp.causal_attn)                                  return "non-causal attention";
    if (cp.embeddings || cp.embeddings_nextn)             return "embeddings output requested";
    if (std::find(cp.embeddings_layer_inp.begin(), cp.embeddings_layer_inp.end(), true) != cp.embeddings_layer_inp.end())
                                                          return "layer-input embeddings requested";
    if (cp.cb_eval)                                       return "an eval callback is set";
    if (!lctx.sampling.samplers.empty())                  return "backend samplers are attached";
    if (!kv_cache_pipelines(lctx.memory.get()))           return "the model's memory is not a KV cache the pipeline knows";
    if (lctx.model.split_mode() != LLAMA_SPLIT_MODE_LAYER) return "split mode is not layer";
    if (r.n_stages < 2)                                   return "the model's layers are on a single device";
    if (n_ubatches < 2)                                   return "fewer than two ubatches";
    return "";
}

// ---- 3. decode ----------------------------------------------------------------------------------------------------------

// The llama_decode calls of a replay. The standard path makes the calls the caller made (or, for a prompt, would
// have made). The pipelined path cuts each of those further into calls of one ubatch, up to the ubatch that holds the
// call's first output (all of them when the call has none): the cuts fall on llama.cpp's own ubatch boundaries, and
// every output stays in the call's last piece (a decode call's outputs replace the previous call's), so llama.cpp
// computes the same ubatches. One ubatch per
// call lets llama.cpp's per-call bookkeeping, which takes time in proportion to the call's tokens, run while the stages
// work on the ubatches before, instead of delaying the first one.
std::vector<turbo_call> llama_turbo::plan_calls(const std::vector<turbo_batch> & batches, bool one_ubatch_per_call) const {
    const int32_t n_ubatch = (int32_t) lctx.cparams.n_ubatch;
    std::vector<turbo_call> calls;
    for (int32_t b = 0; b < (int32_t) batches.size(); ++b) {
        const turbo_batch & batch = batches[b];
        int32_t i0 = 0;
        for (int32_t len : batch.call_lengths) {
            const int32_t end = i0 + len;
            if (one_ubatch_per_call) {
                int32_t first_output = end - 1; // without output flags llama.cpp outputs the last token
                if (!batch.logits.empty()) {
                    first_output = (int32_t) (std::find_if(batch.logits.begin() + i0, batch.logits.begin() + end,
                                                           [](int8_t l) { return l != 0; }) - batch.logits.begin());
                }
                for (; i0 + n_ubatch <= first_output; i0 += n_ubatch) {
                    calls.push_back({b, i0, n_ubatch});
                }
            }
            if (i0 < end) {
                calls.push_back({b, i0, end - i0});
            }
            i0 = end;
        }
    }
    return calls;
}

// Makes the calls of plan_calls(), checking for an abort before each.
int32_t llama_turbo::decode_calls(std::vector<turbo_batch> & batches, bool one_ubatch_per_call) {
    std::vector<llama_batch> views;
    for (auto & b : batches) {
        views.push_back(b.view());
    }
    for (const turbo_call & call : plan_calls(batches, one_ubatch_per_call)) {
        if (lctx.abort_callback && lctx.abort_callback(lctx.abort_callback_data)) {
            return LLAMA_TURBO_ABORTED;
        }
        llama_batch part = views[call.batch];
        part.n_tokens = call.n;
        part.token += call.i0;
        part.pos    = part.pos ? part.pos + call.i0 : nullptr;
        part.logits = part.logits ? part.logits + call.i0 : nullptr;
        if (part.n_seq_id) {
            part.n_seq_id += call.i0;
            part.seq_id   += call.i0;
        }
        trace.mark("decode call", one_ubatch_per_call ? n_submitted : -1); // the ubatch it will submit
        const int32_t status = lctx.decode(part);
        if (status != 0) {
            return status;
        }
    }
    return LLAMA_TURBO_OK;
}

int32_t llama_turbo::decode_pipelined(std::vector<turbo_batch> & batches) {
    n_submitted = 0;
    n_outputs_pending = 0;
    prev_split_backends.clear();
    replay_sizes.clear();
    const int32_t n_ubatch = (int32_t) lctx.cparams.n_ubatch;
    for (const turbo_call & call : plan_calls(batches, true)) {
        for (int32_t i = 0; i < call.n; i += n_ubatch) {
            replay_sizes.push_back((uint32_t) std::min(n_ubatch, call.n - i));
        }
    }

    lctx.set_compute_threads(true);
    start_replay();
    trace.mark("stage threads ready");
    replaying = true;

    int32_t status = LLAMA_TURBO_FAILED;
    try {
        status = decode_calls(batches, true); // with the executor active, every ubatch goes to submit()
    } catch (const std::exception & e) {
        // the stage threads must be stopped before this unwinds: record the failure and fall through
        std::lock_guard<std::mutex> lock(mtx);
        failed = device_failed = true;
        error = e.what();
    }
    ggml_status ret;
    wait_host([&] { return all_idle(); }, ret);
    trace.mark("all idle");
    {
        std::lock_guard<std::mutex> lock(mtx);
        host_submitting = false; // a failed submit may have left it set: the idle stage threads must not spin
    }
    replaying = false;
    flush_records();
    release_slots();

    // decode() reports what it saw; a failure or abort may also have come after its last ubatch was queued
    if (aborted) {
        return LLAMA_TURBO_ABORTED;
    }
    return status == 0 && failed ? LLAMA_TURBO_FAILED : status;
}

// ---- the whole replay ---------------------------------------------------------------------------------------------------

int32_t llama_turbo::replay(llama_turbo_pipeline pipeline, llama_turbo_result & r) {
    capture_open = false;
    std::vector<turbo_batch> batches = std::move(captured);
    captured.clear();

    r = {};
    r.t_start_us = ggml_time_us();
    trace.begin();
    r.n_stages   = (int32_t) stage_devices.size();
    error.clear();
    device_failed = false;
    t_first_submit_us = t_first_queued_us = host_submit_us = 0;

    std::set<llama_seq_id> seqs;
    std::string reason = decide_path(pipeline, batches, seqs, r);
    if (reason.empty()) {
        reason = prepare_slots(r);
    }
    trace.mark("path decided");

    // where each sequence ends now: on failure, everything from there on is removed again
    std::map<llama_seq_id, llama_pos> seq_end;
    for (llama_seq_id s : seqs) {
        seq_end[s] = lctx.memory ? lctx.memory->seq_pos_max(s) + 1 : 0;
    }

    int32_t status = LLAMA_TURBO_OK;
    try {
        r.path = reason.empty() ? LLAMA_TURBO_PATH_PIPELINED : LLAMA_TURBO_PATH_STANDARD;
        snprintf(r.fallback_reason, sizeof(r.fallback_reason), "%s", reason.c_str());
        status = reason.empty() ? decode_pipelined(batches) : decode_calls(batches, false);
        r.t_first_submit_us = t_first_submit_us;
        r.t_first_queued_us = t_first_queued_us;
        r.host_submit_us    = host_submit_us;
        if (reason.empty()) {
            snprintf(r.transfers, sizeof(r.transfers), "%s", transfers.c_str());
        }
        // decode returns with the last ubatch possibly still queued on an asynchronous device (CUDA): the replay ends
        // when it is done, or its timing would leave out the tail
        lctx.synchronize();
    } catch (const std::exception & e) {
        // a device failed inside llama.cpp's own path (ggml-rpc throws when a server dies during decode)
        device_failed = true;
        error = e.what();
    }
    if (device_failed) {
        status = LLAMA_TURBO_DEVICE_FAILED;
    } else if (status < 0) {
        status = LLAMA_TURBO_FAILED;
    }

    if (status != LLAMA_TURBO_OK && lctx.memory) {
        try {
            for (const auto & [s, p0] : seq_end) {
                lctx.memory->seq_rm(s, p0, -1);
            }
        } catch (const std::exception & e) {
            status = LLAMA_TURBO_DEVICE_FAILED;
            error += std::string(error.empty() ? "" : "; ") + "rolling back the KV cache: " + e.what();
        }
    }
    r.status   = status;
    r.t_end_us = ggml_time_us();
    trace.mark("replay end");
    trace.print();
    if (status != LLAMA_TURBO_OK) {
        snprintf(r.error, sizeof(r.error), "%s", !error.empty() ? error.c_str() :
                 status == LLAMA_TURBO_ABORTED ? "aborted" : status == LLAMA_TURBO_NO_KV_SLOT ? "no room in the KV cache" :
                 "decode failed");
    }
    return status;
}

// ---- C API --------------------------------------------------------------------------------------------------------------

static llama_turbo * turbo_of(llama_context * ctx) {
    return static_cast<llama_turbo *>(ctx->executor.get());
}

int32_t llama_turbo_attach(llama_context * ctx, const llama_turbo_options * options) {
    if (ctx->executor) {
        return -1;
    }
    ctx->executor.reset(new llama_turbo(*ctx, options ? *options : llama_turbo_options{0, false}));
    return 0;
}

int32_t llama_turbo_capture_begin(llama_context * ctx) {
    llama_turbo * t = turbo_of(ctx);
    if (!t || t->capture_open) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, t ? "a capture is already open" : "no executor attached");
        return -1;
    }
    t->begin_capture();
    return 0;
}

int32_t llama_turbo_replay(llama_context * ctx, llama_turbo_pipeline pipeline, llama_turbo_record_callback on_record,
                           void * user_data, llama_turbo_result * result) {
    llama_turbo_result local;
    llama_turbo_result & r = result ? *result : local;
    llama_turbo * t = turbo_of(ctx);
    if (!t || !t->capture_open) {
        r = {};
        r.status = LLAMA_TURBO_FAILED;
        snprintf(r.error, sizeof(r.error), "%s", t ? "no capture is open" : "no executor attached");
        return r.status;
    }
    t->record_cb      = on_record;
    t->record_cb_data = user_data;
    const int32_t status = t->replay(pipeline, r);
    t->record_cb      = nullptr;
    t->record_cb_data = nullptr;
    return status;
}

int32_t llama_turbo_prefill(llama_context * ctx, const llama_token * tokens, int32_t n_tokens, llama_seq_id seq_id,
                            int32_t first_call, llama_turbo_pipeline pipeline, llama_turbo_record_callback on_record,
                            void * user_data, llama_turbo_result * result) {
    llama_turbo_result local;
    llama_turbo_result & r = result ? *result : local;
    llama_turbo * t = turbo_of(ctx);
    const char * refused = !t ? "no executor attached" : t->capture_open ? "a capture is open" :
                           n_tokens <= 0 ? "no tokens" : seq_id < 0 || seq_id >= (llama_seq_id) ctx->n_seq_max() ?
                           "seq_id is outside the context's sequences" : nullptr;
    if (refused) {
        r = {};
        r.status = LLAMA_TURBO_FAILED;
        snprintf(r.error, sizeof(r.error), "%s", refused);
        return r.status;
    }
    llama_memory_t mem = ctx->get_memory();
    const llama_pos pos0 = mem ? mem->seq_pos_max(seq_id) + 1 : 0;
    t->begin_capture();
    t->capture_prompt(turbo_batch(tokens, n_tokens, pos0, seq_id, first_call, (int32_t) ctx->n_batch()));
    return llama_turbo_replay(ctx, pipeline, on_record, user_data, result);
}

void llama_turbo_capture_discard(llama_context * ctx) {
    if (llama_turbo * t = turbo_of(ctx)) {
        t->capture_open = false;
        t->captured.clear();
    }
}

int32_t llama_turbo_stage_names(const llama_model * model, const char ** names, int32_t capacity) {
    const auto devs = turbo_layer_devices(*model);
    for (int32_t i = 0; i < (int32_t) devs.size() && i < capacity; ++i) {
        names[i] = ggml_backend_dev_name(devs[i]);
    }
    return (int32_t) devs.size();
}

bool llama_turbo_stock_overlaps(const llama_context * ctx) {
    return llama_turbo::stock_overlaps(*ctx);
}

bool llama_turbo_dev_is_rpc(ggml_backend_dev_t dev) {
    return dev && strcmp(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)), "RPC") == 0;
}
