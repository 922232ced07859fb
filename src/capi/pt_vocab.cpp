// The "vocabulary" part of pyturbo_api.h: tokenizing, detokenizing, special tokens and the chat template.
// Every entry point catches all C++ exceptions and reports through pt_last_error(), as pyturbo_api.cpp does.

#include "pt_internal.h"

#include "llama.h"

#include <climits>
#include <cstring>
#include <exception>
#include <string>

namespace {

// Copies text into buf when it fits; returns its length either way (the caller retries with that capacity).
int32_t copy_out(const char * text, char * buf, int32_t capacity) {
    const size_t n = std::strlen(text);
    if (n <= (size_t) capacity && buf) {
        std::memcpy(buf, text, n);
    }
    return (int32_t) n;
}

} // namespace

extern "C" {

int32_t pt_tokenize_special(pt_model * model, const char * text, int32_t text_len, int32_t * tokens, int32_t capacity,
                            int32_t add_special, int32_t parse_special) {
    // llama_tokenize returns -(tokens needed) when capacity is too small; INT32_MIN only on overflow
    return guarded<int32_t>(INT32_MIN, "tokenizing", [&]() {
        return llama_tokenize(vocab_of(model), text, text_len, tokens, capacity, add_special != 0, parse_special != 0);
    });
}

int32_t pt_token_is_eog(pt_model * model, int32_t token) {
    return guarded<int32_t>(-1, "checking for end of generation", [&]() {
        return llama_vocab_is_eog(vocab_of(model), token) ? 1 : 0;
    });
}

int32_t pt_token_bos(pt_model * model) {
    return guarded<int32_t>(-1, "reading the BOS token", [&]() { return (int32_t) llama_vocab_bos(vocab_of(model)); });
}

int32_t pt_token_eos(pt_model * model) {
    return guarded<int32_t>(-1, "reading the EOS token", [&]() { return (int32_t) llama_vocab_eos(vocab_of(model)); });
}

int32_t pt_token_text(pt_model * model, int32_t token, char * buf, int32_t capacity) {
    return guarded<int32_t>(-1, "reading a token's text", [&]() -> int32_t {
        const llama_vocab * vocab = vocab_of(model);
        if (token < 0 || token >= llama_vocab_n_tokens(vocab)) {
            return fail_with<int32_t>("token " + std::to_string(token) + " is outside the vocabulary", -1);
        }
        return copy_out(llama_vocab_get_text(vocab, token), buf, capacity);
    });
}

int32_t pt_model_chat_template(pt_model * model, char * buf, int32_t capacity) {
    return guarded<int32_t>(-1, "reading the chat template", [&]() -> int32_t {
        const char * tmpl = llama_model_chat_template(model->model, nullptr);
        return tmpl ? copy_out(tmpl, buf, capacity) : 0;
    });
}

int32_t pt_token_to_piece(pt_model * model, int32_t token, char * buf, int32_t capacity) {
    return guarded<int32_t>(0, "detokenizing", [&] {
        return llama_token_to_piece(llama_model_get_vocab(model->model), token, buf, capacity, 0, false);
    });
}

} // extern "C"
