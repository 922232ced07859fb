// Shared-secret authentication for llama.cpp RPC connections (used by patches/0010): HMAC-SHA256 over nonces, so the
// secret itself never crosses the network. Compiled into ggml-rpc by our CMakeLists.txt.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

constexpr size_t RPC_AUTH_NONCE_SIZE = 32;
constexpr size_t RPC_AUTH_MAC_SIZE   = 32;

// SHA-256 of data (FIPS 180-4).
void rpc_auth_sha256(const uint8_t * data, size_t size, uint8_t out[32]);

// HMAC-SHA256 (RFC 2104) of msg under key.
void rpc_auth_hmac(const std::string & key, const uint8_t * msg, size_t size, uint8_t out[RPC_AUTH_MAC_SIZE]);

// The proof one side sends: HMAC(secret, role | server nonce | client nonce). The role ("client" / "server") keeps a
// proof from being reflected back as the other side's.
void rpc_auth_proof(const std::string & secret, const char * role, const uint8_t server_nonce[RPC_AUTH_NONCE_SIZE],
                    const uint8_t client_nonce[RPC_AUTH_NONCE_SIZE], uint8_t out[RPC_AUTH_MAC_SIZE]);

// Fills out with bytes from the kernel's random source; false if it cannot be read.
bool rpc_auth_random(uint8_t * out, size_t size);

// Compares in time that does not depend on where the inputs differ.
bool rpc_auth_equal(const uint8_t * a, const uint8_t * b, size_t size);
