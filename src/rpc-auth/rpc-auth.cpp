#include "rpc-auth.h"

#include <cstring>
#include <fstream>
#include <vector>

namespace {

constexpr uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

void compress(uint32_t h[8], const uint8_t block[64]) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
        w[i] = (uint32_t) block[4*i] << 24 | (uint32_t) block[4*i + 1] << 16 | (uint32_t) block[4*i + 2] << 8 | block[4*i + 3];
    }
    for (int i = 16; i < 64; ++i) {
        const uint32_t s0 = rotr(w[i-15], 7) ^ rotr(w[i-15], 18) ^ (w[i-15] >> 3);
        const uint32_t s1 = rotr(w[i-2], 17) ^ rotr(w[i-2], 19) ^ (w[i-2] >> 10);
        w[i] = w[i-16] + s0 + w[i-7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
        const uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

} // namespace

void rpc_auth_sha256(const uint8_t * data, size_t size, uint8_t out[32]) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    size_t done = 0;
    for (; size - done >= 64; done += 64) {
        compress(h, data + done);
    }
    // the tail, the 0x80 marker and the message length in bits (big-endian) fill one or two last blocks
    uint8_t tail[128] = {};
    const size_t rest = size - done;
    memcpy(tail, data + done, rest);
    tail[rest] = 0x80;
    const size_t n_tail = rest + 1 + 8 <= 64 ? 64 : 128;
    const uint64_t bits = (uint64_t) size * 8;
    for (int i = 0; i < 8; ++i) {
        tail[n_tail - 1 - i] = (uint8_t) (bits >> (8 * i));
    }
    for (size_t off = 0; off < n_tail; off += 64) {
        compress(h, tail + off);
    }
    for (int i = 0; i < 8; ++i) {
        out[4*i] = (uint8_t) (h[i] >> 24); out[4*i + 1] = (uint8_t) (h[i] >> 16);
        out[4*i + 2] = (uint8_t) (h[i] >> 8); out[4*i + 3] = (uint8_t) h[i];
    }
}

void rpc_auth_hmac(const std::string & key, const uint8_t * msg, size_t size, uint8_t out[RPC_AUTH_MAC_SIZE]) {
    uint8_t k[64] = {};
    if (key.size() > 64) {
        rpc_auth_sha256((const uint8_t *) key.data(), key.size(), k);
    } else {
        memcpy(k, key.data(), key.size());
    }
    std::vector<uint8_t> inner(64 + size);
    for (int i = 0; i < 64; ++i) {
        inner[i] = k[i] ^ 0x36;
    }
    if (size > 0) {
        memcpy(inner.data() + 64, msg, size);
    }
    uint8_t outer[64 + 32];
    for (int i = 0; i < 64; ++i) {
        outer[i] = k[i] ^ 0x5c;
    }
    rpc_auth_sha256(inner.data(), inner.size(), outer + 64);
    rpc_auth_sha256(outer, sizeof(outer), out);
}

void rpc_auth_proof(const std::string & secret, const char * role, const uint8_t server_nonce[RPC_AUTH_NONCE_SIZE],
                    const uint8_t client_nonce[RPC_AUTH_NONCE_SIZE], uint8_t out[RPC_AUTH_MAC_SIZE]) {
    std::vector<uint8_t> msg(role, role + strlen(role) + 1);  // the terminating 0 separates the role from the nonces
    msg.insert(msg.end(), server_nonce, server_nonce + RPC_AUTH_NONCE_SIZE);
    msg.insert(msg.end(), client_nonce, client_nonce + RPC_AUTH_NONCE_SIZE);
    rpc_auth_hmac(secret, msg.data(), msg.size(), out);
}

bool rpc_auth_random(uint8_t * out, size_t size) {
    std::ifstream urandom("/dev/urandom", std::ios::binary);
    return urandom.read((char *) out, (std::streamsize) size).gcount() == (std::streamsize) size;
}

bool rpc_auth_equal(const uint8_t * a, const uint8_t * b, size_t size) {
    uint8_t diff = 0;
    for (size_t i = 0; i < size; ++i) {
        diff |= a[i] ^ b[i];
    }
    return diff == 0;
}
