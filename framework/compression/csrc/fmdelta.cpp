// FM-Delta symbolisation + raw-bit packing, the multi-core CPU path of framework/compression/fmdelta_native.py.
// Plain C ABI called through ctypes (no torch headers: compiles in about a second on first use).
// Format (shared with the torch reference in fmdelta_ref.py):
//   key(b)   = b has sign bit ? ~b : b | sign          (order-preserving float bits -> unsigned)
//   d        = key(ft) - key(base) mod 2^W, read as signed
//   symbol   = 0 if d == 0 else 1 + neg * W + ((k + ctx) mod W), k = msb(|d|), ctx = (base >> shift) & mask
//   raw bits = the k bits of |d| below its leading one, LSB-first into 64-bit words; each block of `block` elements
//              starts on a fresh word; block_words[b] = words used by block b.
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

template <class F>
void parallel_blocks(int64_t nblocks, int nthreads, F fn) {
  int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, nblocks));
  if (nt == 1) { for (int64_t b = 0; b < nblocks; ++b) fn(b); return; }
  std::vector<std::thread> pool;
  for (int t = 0; t < nt; ++t)
    pool.emplace_back([=] { for (int64_t b = t; b < nblocks; b += nt) fn(b); });
  for (auto& th : pool) th.join();
}

template <class U> inline U to_key(U b) {
  constexpr U sign = U(U(1) << (sizeof(U) * 8 - 1));
  return (b & sign) ? U(~b) : U(b | sign);
}
template <class U> inline U from_key(U k) {
  constexpr U sign = U(U(1) << (sizeof(U) * 8 - 1));
  return (k & sign) ? U(k & U(~sign)) : U(~k);
}
template <class U> inline int msb(U x) {
  return (int)(sizeof(unsigned long long) * 8 - 1) - __builtin_clzll((unsigned long long)x);
}

struct BitWriter {
  uint64_t* out; uint64_t acc = 0; int fill = 0; int64_t nw = 0;
  inline void put(uint64_t v, int k) {  // v < 2^k, k <= 63
    if (k == 0) return;
    acc |= v << fill;
    fill += k;
    if (fill >= 64) {
      if (out) out[nw] = acc;
      ++nw; fill -= 64;
      acc = fill ? (v >> (k - fill)) : 0;
    }
  }
  inline void flush() { if (fill) { if (out) out[nw] = acc; ++nw; acc = 0; fill = 0; } }
};

struct BitReader {
  const uint64_t* in; int64_t avail; uint64_t acc = 0; int left = 0; int64_t pos = 0; bool bad = false;
  inline uint64_t get(int k) {
    if (k == 0) return 0;
    uint64_t v;
    if (left >= k) {
      v = acc & ((uint64_t(1) << k) - 1);
      acc = (k == 64) ? 0 : acc >> k; left -= k;
      return v;
    }
    if (pos >= avail) { bad = true; return 0; }
    uint64_t w = in[pos++];
    int need = k - left;
    v = acc | ((w & ((uint64_t(1) << need) - 1)) << left);
    acc = w >> need; left = 64 - need;
    return v;
  }
};

template <class U>
void encode_t(const U* base, const U* ft, int64_t n, int shift, uint64_t mask, int64_t block, uint8_t* sym,
              uint32_t* block_words, uint64_t* words, const int64_t* block_off, int nthreads) {
  constexpr int W = sizeof(U) * 8;
  int64_t nblocks = (n + block - 1) / block;
  parallel_blocks(nblocks, nthreads, [&](int64_t b) {
    int64_t a = b * block, e = std::min(n, a + block);
    BitWriter bw{words ? words + block_off[b] : nullptr};
    int64_t bits = 0;
    for (int64_t i = a; i < e; ++i) {
      U p = base[i];
      U d = U(to_key<U>(ft[i]) - to_key<U>(p));
      if (d == 0) { if (!words) sym[i] = 0; continue; }
      int neg = (int)(d >> (W - 1));
      U mag = neg ? U(U(0) - d) : d;
      int k = msb<U>(mag);
      if (!words) {
        int ctx = (int)((uint64_t(p) >> shift) & mask);
        sym[i] = (uint8_t)(1 + neg * W + ((k + ctx) % W));
        bits += k;
      } else {
        bw.put((uint64_t)mag ^ (uint64_t(1) << k), k);
      }
    }
    bw.flush();
    if (!words) block_words[b] = (uint32_t)((bits + 63) / 64);
  });
}

template <class U>
int decode_t(const U* base, const uint8_t* sym, int64_t n, int shift, uint64_t mask, int64_t block,
             const uint64_t* words, const int64_t* block_off, const uint32_t* block_words, U* out, int nthreads) {
  constexpr int W = sizeof(U) * 8;
  int64_t nblocks = (n + block - 1) / block;
  std::vector<int> err(nblocks, 0);
  parallel_blocks(nblocks, nthreads, [&](int64_t b) {
    int64_t a = b * block, e = std::min(n, a + block);
    BitReader br{words + block_off[b], (int64_t)block_words[b]};
    for (int64_t i = a; i < e; ++i) {
      U p = base[i];
      int s = sym[i];
      if (s == 0) { out[i] = p; continue; }
      if (s > 2 * W) { err[b] = 1; return; }
      int neg = (s - 1) >= W;
      int t = (s - 1) - neg * W;
      int ctx = (int)((uint64_t(p) >> shift) & mask);
      int k = ((t - ctx) % W + W) % W;
      U mag = U((U(1) << k) | U(br.get(k)));
      U d = neg ? U(U(0) - mag) : mag;
      out[i] = from_key<U>(U(to_key<U>(p) + d));
    }
    if (br.bad || br.pos != (int64_t)block_words[b]) err[b] = 2;
  });
  for (int64_t b = 0; b < nblocks; ++b) if (err[b]) return err[b];
  return 0;
}

}  // namespace

extern "C" {

// words == nullptr: pass 1 (symbols + words per block); else pass 2 (raw bits at block_off[b] words).
void fmd_encode(const void* base, const void* ft, int64_t n, int width, int shift, uint64_t mask, int64_t block,
                uint8_t* sym, uint32_t* block_words, uint64_t* words, const int64_t* block_off, int nthreads) {
  if (width == 2) encode_t<uint16_t>((const uint16_t*)base, (const uint16_t*)ft, n, shift, mask, block, sym, block_words, words, block_off, nthreads);
  else if (width == 4) encode_t<uint32_t>((const uint32_t*)base, (const uint32_t*)ft, n, shift, mask, block, sym, block_words, words, block_off, nthreads);
  else encode_t<uint64_t>((const uint64_t*)base, (const uint64_t*)ft, n, shift, mask, block, sym, block_words, words, block_off, nthreads);
}

// 0 ok; 1 symbol out of range; 2 raw-bit stream length mismatch (corrupt payload)
int fmd_decode(const void* base, const uint8_t* sym, int64_t n, int width, int shift, uint64_t mask, int64_t block,
               const uint64_t* words, const int64_t* block_off, const uint32_t* block_words, void* out, int nthreads) {
  if (width == 2) return decode_t<uint16_t>((const uint16_t*)base, sym, n, shift, mask, block, words, block_off, block_words, (uint16_t*)out, nthreads);
  if (width == 4) return decode_t<uint32_t>((const uint32_t*)base, sym, n, shift, mask, block, words, block_off, block_words, (uint32_t*)out, nthreads);
  return decode_t<uint64_t>((const uint64_t*)base, sym, n, shift, mask, block, words, block_off, block_words, (uint64_t*)out, nthreads);
}

}  // extern "C"
