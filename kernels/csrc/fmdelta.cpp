// FM-Delta symbolisation + raw-bit packing, the multi-core CPU path of framework/compression/fmdelta_native.py.
// Plain C ABI called through ctypes (no torch headers: compiles in about a second on first use).
// Format (shared with the torch reference in fmdelta_ref.py):
//   key(b)   = b has sign bit ? ~b : b | sign          (order-preserving float bits -> unsigned)
//   d        = key(ft) - key(base) mod 2^W, read as signed
//   symbol   = 0 if d == 0 else 1 + neg * W + ((k + ctx) mod W), k = msb(|d|), ctx = (base >> shift) & mask
//   raw bits = the k bits of |d| below its leading one, LSB-first into 64-bit words; each block of `block` elements
//              starts on a fresh word; block_words[b] = words used by block b.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

// fn(t, b) for every block b, t = the calling thread's index. Threads claim blocks from a shared counter (not fixed
// shares), so a thread slowed down by another process on its core does not hold the others up.
template <class F>
void parallel_blocks(int64_t nblocks, int nthreads, F fn) {
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, nblocks));
  if (nt == 1) { for (int64_t b = 0; b < nblocks; ++b) fn(0, b); return; }
  std::atomic<int64_t> next{0};
  auto run = [&](int t) {
    for (int64_t b = next.fetch_add(1); b < nblocks; b = next.fetch_add(1)) fn(t, b);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < nt; ++t) pool.emplace_back(run, t);
  run(0);
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

struct BitReader {  // `in` may be unaligned (it points into a container record): words are loaded with memcpy
  const unsigned char* in; int64_t avail; uint64_t acc = 0; int left = 0; int64_t pos = 0; bool bad = false;
  inline uint64_t get(int k) {
    if (k == 0) return 0;
    uint64_t v;
    if (left >= k) {
      v = acc & ((uint64_t(1) << k) - 1);
      acc = (k == 64) ? 0 : acc >> k; left -= k;
      return v;
    }
    if (pos >= avail) { bad = true; return 0; }
    uint64_t w;
    std::memcpy(&w, in + 8 * pos++, 8);
    int need = k - left;
    v = acc | ((w & ((uint64_t(1) << need) - 1)) << left);
    acc = w >> need; left = 64 - need;
    return v;
  }
};

// One pass per element. Block b is coded into its own worst-case region of `words` (stride = ceil(block * W / 64) + 1
// words: the tails of a block take at most ceil(block * (W - 1) / 64) words, and the branch-free writer may store one
// word past the end of a block), starting on a fresh word; threads take blocks as they come (parallel_blocks); a final
// in-order memmove closes the gaps. Symbol counts are gathered in the same pass (4 interleaved sub-histograms per
// thread).
template <class U>
int64_t encode_t(const U* base, const U* ft, int64_t n, int shift, uint64_t mask, int64_t block, uint8_t* sym,
                 uint32_t* block_words, uint64_t* words, int64_t* counts, int nthreads) {
  constexpr int W = sizeof(U) * 8;
  const int64_t nblocks = (n + block - 1) / block;
  const int64_t maxw = (block * W + 63) / 64 + 1;  // stride of the per-block worst-case regions
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, nblocks));
  std::vector<std::vector<uint32_t>> hist(nt, std::vector<uint32_t>(4 * 256, 0));
  parallel_blocks(nblocks, nt, [&](int t, int64_t b) {
    uint64_t* const out = words + b * maxw;
    uint32_t* h = hist[t].data();
    const int64_t a = b * block, e = std::min(n, a + block);
    uint64_t acc = 0;
    int fill = 0;
    int64_t nw = 0;
    for (int64_t i = a; i < e; ++i) {
      const U p = base[i];
      const U d = U(to_key<U>(ft[i]) - to_key<U>(p));
      const int neg = (int)(d >> (W - 1));
      const U mag = neg ? U(U(0) - d) : d;
      const int k = msb<U>(U(mag | U(1)));
      const uint64_t v = (uint64_t)mag & ~(uint64_t(1) << k);  // 0 when d == 0 (k == 0)
      const int ctx = (int)((uint64_t(p) >> shift) & mask);
      const uint8_t s = d ? (uint8_t)(1 + neg * W + ((k + ctx) & (W - 1))) : 0;
      sym[i] = s;
      h[((i & 3) << 8) | s]++;
      // branch-free bit writer: store the current word every time, advance when it is full
      acc |= v << fill;
      out[nw] = acc;
      const int nf = fill + k;
      const bool spill = nf >= 64;
      const uint64_t rest = v >> ((64 - fill) & 63);  // only used when spill (then 1 <= fill <= 63)
      nw += spill;
      acc = spill ? rest : acc;
      fill = nf & 63;
    }
    if (fill) out[nw++] = acc;
    block_words[b] = (uint32_t)nw;
  });
  int64_t total = 0;
  for (int64_t b = 0; b < nblocks; ++b) {
    if (total != b * maxw && block_words[b]) std::memmove(words + total, words + b * maxw, (size_t)block_words[b] * 8);
    total += block_words[b];
  }
  for (int t = 0; t < nt; ++t)
    for (int j = 0; j < 4 * 256; ++j) counts[j & 255] += hist[t][j];
  return total;
}

template <class U>
int decode_t(const U* base, const uint8_t* sym, int64_t n, int shift, uint64_t mask, int64_t block,
             const unsigned char* words, const int64_t* block_off, const uint32_t* block_words, U* out, int nthreads) {
  constexpr int W = sizeof(U) * 8;
  int64_t nblocks = (n + block - 1) / block;
  std::vector<int> err(nblocks, 0);
  parallel_blocks(nblocks, nthreads, [&](int, int64_t b) {
    int64_t a = b * block, e = std::min(n, a + block);
    BitReader br{words + 8 * block_off[b], (int64_t)block_words[b]};
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

// Symbols, raw bits and symbol counts in one pass. `words` needs nblocks * (ceil(block * W / 64) + 1) words of room;
// returns the number of words used (blocks concatenated, each starting on a fresh word). counts[256] is accumulated.
int64_t fmd_encode(const void* base, const void* ft, int64_t n, int width, int shift, uint64_t mask, int64_t block,
                   uint8_t* sym, uint32_t* block_words, uint64_t* words, int64_t* counts, int nthreads) {
  if (width == 2) return encode_t<uint16_t>((const uint16_t*)base, (const uint16_t*)ft, n, shift, mask, block, sym, block_words, words, counts, nthreads);
  if (width == 4) return encode_t<uint32_t>((const uint32_t*)base, (const uint32_t*)ft, n, shift, mask, block, sym, block_words, words, counts, nthreads);
  return encode_t<uint64_t>((const uint64_t*)base, (const uint64_t*)ft, n, shift, mask, block, sym, block_words, words, counts, nthreads);
}

// 0 ok; 1 symbol out of range; 2 raw-bit stream length mismatch (corrupt payload)
int fmd_decode(const void* base, const uint8_t* sym, int64_t n, int width, int shift, uint64_t mask, int64_t block,
               const void* words, const int64_t* block_off, const uint32_t* block_words, void* out, int nthreads) {
  if (width == 2) return decode_t<uint16_t>((const uint16_t*)base, sym, n, shift, mask, block, (const unsigned char*)words, block_off, block_words, (uint16_t*)out, nthreads);
  if (width == 4) return decode_t<uint32_t>((const uint32_t*)base, sym, n, shift, mask, block, (const unsigned char*)words, block_off, block_words, (uint32_t*)out, nthreads);
  return decode_t<uint64_t>((const uint64_t*)base, sym, n, shift, mask, block, (const unsigned char*)words, block_off, block_words, (uint64_t*)out, nthreads);
}

}  // extern "C"
