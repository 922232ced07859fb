// The "generation" part of pyturbo_api.h: llama.cpp's own sampler chain, and cutting the KV cache back to a reusable
// prompt prefix (the prompt cache). The vocabulary (tokenizer, special tokens, chat template) is pt_vocab.cpp.
// Every entry point catches all C++ exceptions and reports through pt_last_error(), as pyturbo_api.cpp does.

#include "pt_internal.h"

#include "llama.h"

#include <climits>
#include <cstring>
#include <memory>
#include <exception>
#include <string>
#include <vector>

struct pt_sampler {
    llama_sampler * chain = nullptr;
    int32_t n_vocab = 0;
    std::vector<llama_token_data> candidates; // reused by every sample: no allocation per token
};

extern "C" {

pt_sampler * pt_sampler_new(pt_model * model, const pt_sampler_params * params, const pt_logit_bias * bias, int32_t n_bias) {
    return guarded<pt_sampler *>(nullptr, "creating the sampler", [&]() -> pt_sampler * {
        const int32_t n_vocab = llama_vocab_n_tokens(vocab_of(model));
        std::vector<llama_logit_bias> biases;
        for (int32_t i = 0; i < n_bias; ++i) {
            if (bias[i].token < 0 || bias[i].token >= n_vocab) {
                return fail_with<pt_sampler *>("logit_bias names token " + std::to_string(bias[i].token) +
                                               ", outside the vocabulary [0, " + std::to_string(n_vocab) + ")", nullptr);
            }
            biases.push_back({bias[i].token, bias[i].bias});
        }
        const pt_sampler_params & p = *params;
        llama_sampler_chain_params cp = llama_sampler_chain_default_params();
        cp.no_perf = true;
        std::unique_ptr<pt_sampler, void (*)(pt_sampler *)> s(new pt_sampler, pt_sampler_free);
        s->chain = llama_sampler_chain_init(cp);
        s->n_vocab = n_vocab;
        if (!biases.empty()) {
            llama_sampler_chain_add(s->chain, llama_sampler_init_logit_bias(n_vocab, (int32_t) biases.size(), biases.data()));
        }
        const bool penalized = p.repeat_penalty != 1.0f || p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f;
        if (p.penalty_last_n != 0 && penalized) {
            llama_sampler_chain_add(s->chain, llama_sampler_init_penalties(
                n_vocab, p.penalty_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty));
        }
        if (p.temperature <= 0.0f) {
            llama_sampler_chain_add(s->chain, llama_sampler_init_greedy());
            return s.release();
        }
        if (p.top_k > 0) {
            llama_sampler_chain_add(s->chain, llama_sampler_init_top_k(p.top_k));
        }
        if (p.top_p < 1.0f) {
            llama_sampler_chain_add(s->chain, llama_sampler_init_top_p(p.top_p, 1));
        }
        if (p.min_p > 0.0f) {
            llama_sampler_chain_add(s->chain, llama_sampler_init_min_p(p.min_p, 1));
        }
        llama_sampler_chain_add(s->chain, llama_sampler_init_temp(p.temperature));
        llama_sampler_chain_add(s->chain, llama_sampler_init_dist(p.seed));
        return s.release();
    });
}

void pt_sampler_free(pt_sampler * sampler) {
    if (sampler) {
        llama_sampler_free(sampler->chain);
        delete sampler;
    }
}

int32_t pt_sampler_sample(pt_sampler * sampler, const float * logits, int32_t n_vocab) {
    return guarded<int32_t>(-1, "sampling", [&]() -> int32_t {
        if (n_vocab != sampler->n_vocab) {
            return fail_with<int32_t>("sampling needs " + std::to_string(sampler->n_vocab) + " logits, got " +
                                      std::to_string(n_vocab), -1);
        }
        auto & cur = sampler->candidates;
        cur.resize(n_vocab);
        for (int32_t i = 0; i < n_vocab; ++i) {
            cur[i] = llama_token_data{i, logits[i], 0.0f};
        }
        llama_token_data_array arr = {cur.data(), cur.size(), -1, false};
        llama_sampler_apply(sampler->chain, &arr);
        if (arr.selected < 0 || (size_t) arr.selected >= arr.size) {
            return fail_with<int32_t>("the sampler chain selected no token", -1);
        }
        const llama_token token = arr.data[arr.selected].id;
        llama_sampler_accept(sampler->chain, token);
        return token;
    });
}

int32_t pt_sampler_accept(pt_sampler * sampler, const int32_t * tokens, int32_t n_tokens) {
    return guarded<int32_t>(-1, "recording tokens in the sampler", [&]() -> int32_t {
        for (int32_t i = 0; i < n_tokens; ++i) {
            llama_sampler_accept(sampler->chain, tokens[i]);
        }
        return 0;
    });
}

int32_t pt_context_truncate(pt_context * ctx, int32_t seq_id, int32_t n_keep) {
    return guarded<int32_t>(-1, "truncating the KV cache", [&]() -> int32_t {
        if (n_keep < 0) {
            return fail_with<int32_t>("n_keep must be >= 0, not " + std::to_string(n_keep), -1);
        }
        if (!llama_memory_seq_rm(llama_get_memory(ctx->ctx), seq_id, n_keep, -1)) {
            return fail_with<int32_t>("this model's memory cannot drop positions from " + std::to_string(n_keep) +
                                      " on (a recurrent model?); reset the context instead", -1);
        }
        return 0;
    });
}

int32_t pt_context_copy_prefix(pt_context * ctx, int32_t src_seq, int32_t dst_seq, int32_t n_tokens) {
    return guarded<int32_t>(-1, "sharing a prompt prefix between sequences", [&]() -> int32_t {
        llama_memory_t mem = llama_get_memory(ctx->ctx);
        if (llama_memory_seq_pos_max(mem, src_seq) + 1 < n_tokens) {
            return fail_with<int32_t>("sequence " + std::to_string(src_seq) + " holds fewer than " +
                                      std::to_string(n_tokens) + " positions", -1);
        }
        // the whole sequence, then the tail removed: between the streams of a split cache llama.cpp copies whole
        // streams only (and asserts on a range); in a unified cache the cells become shared, nothing is copied
        llama_memory_seq_rm(mem, dst_seq, -1, -1);
        llama_memory_seq_cp(mem, src_seq, dst_seq, -1, -1);
        llama_memory_seq_rm(mem, dst_seq, n_tokens, -1);
        return 0;
    });
}

} // extern "C"
