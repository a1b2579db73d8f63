// Interleaved rANS (32-bit state, 16-bit renormalisation words) for the CPU path of kernels/ans.py.
// Plain C ABI, called through ctypes: no torch headers, so it compiles in about a second on first use.
// Layout (shared with the torch reference and the Triton kernels): symbol i belongs to lane i % lanes at step
// i / lanes; each lane's words are stored in decode order; a lane's decoder starts at its final state and must end at
// exactly ANS_L having consumed exactly its words (this is the integrity check of the decoder).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr uint32_t ANS_L = 1u << 16;
constexpr int64_t GROUP = 32;  // lanes interleaved by one thread: independent dependency chains for ILP

// fn(a, b) over lane ranges. Threads claim chunks of lane groups from a shared counter (not fixed shares), so a
// thread slowed down by another process on its core does not hold the others up: more threads are never slower.
template <class F>
void parallel_lanes(int64_t lanes, int nthreads, F fn) {
  const int64_t groups = (lanes + GROUP - 1) / GROUP;
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, groups));
  if (nt == 1) { fn(0, lanes); return; }
  const int64_t chunk = 1;  // one group of lanes (~0.5 ms): a preempted thread holds the others up the least
  std::atomic<int64_t> next{0};
  auto run = [&] {
    for (;;) {
      const int64_t g = next.fetch_add(chunk);
      if (g >= groups) break;
      fn(g * GROUP, std::min(lanes, (g + chunk) * GROUP));
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < nt; ++t) pool.emplace_back(run);
  run();
  for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

// counts[256] += histogram of sym[0..n)
void ans_histogram(const uint8_t* sym, int64_t n, int64_t* counts, int nthreads) {
  int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, n / (1 << 20) + 1));
  std::vector<std::vector<int64_t>> part(nt, std::vector<int64_t>(4 * 256, 0));
  auto work = [&](int t) {
    int64_t a = n * t / nt, b = n * (t + 1) / nt;
    int64_t* h = part[t].data();
    int64_t i = a;
    for (; i + 4 <= b; i += 4) {
      h[sym[i]]++; h[256 + sym[i + 1]]++; h[512 + sym[i + 2]]++; h[768 + sym[i + 3]]++;
    }
    for (; i < b; ++i) h[sym[i]]++;
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < nt; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  for (int t = 0; t < nt; ++t)
    for (int k = 0; k < 4 * 256; ++k) counts[k & 255] += part[t][k];
}

// Encode. Lane j writes its words backwards into scratch[j*T, (j+1)*T) (T = symbols per lane, rounded up) and
// reports how many in nwords[j]; the caller compacts. Returns 0, or -(1 + i) when symbol i has frequency 0.
int64_t ans_encode(const uint8_t* sym, int64_t n, int64_t lanes, const uint32_t* freq, const uint32_t* cum,
                   int prob_bits, uint16_t* scratch, int64_t* nwords, uint32_t* final_states, int nthreads) {
  const int64_t T = (n + lanes - 1) / lanes;
  // x / f through a 64x64->128 multiply with a per-symbol reciprocal (exact for x < 2^32, f < 2^16; f == 1: shift 0)
  uint64_t rcp[256];
  uint32_t sh[256], xmax[256];
  for (int s = 0; s < 256; ++s) {
    uint32_t f = freq[s];
    if (f <= 1) { rcp[s] = 1; sh[s] = 0; } else { rcp[s] = ~0ull / f + 1; sh[s] = 64; }
    xmax[s] = (uint32_t)std::min<uint64_t>(0xffffffffull, ((uint64_t)(ANS_L >> prob_bits) << 16) * f);
  }
  std::atomic<int64_t> bad{-1};
  auto work = [&](int64_t la, int64_t lb) {
    int64_t first_bad = -1;
    for (int64_t g0 = la; g0 < lb; g0 += GROUP) {
      const int64_t gs = std::min(GROUP, lb - g0);
      uint32_t x[GROUP];
      uint16_t* p[GROUP];
      for (int64_t g = 0; g < gs; ++g) { x[g] = ANS_L; p[g] = scratch + (g0 + g) * T + T; }
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t base = t * lanes + g0;
        const int64_t cnt = std::min(gs, n - base);
        const uint8_t* sp = sym + base;
        for (int64_t g = 0; g < cnt; ++g) {
          const uint32_t s = sp[g], f = freq[s];
          if (f == 0) { first_bad = base + g; break; }
          uint32_t xv = x[g];
          const bool out = xv >= xmax[s];
          p[g][-1] = (uint16_t)xv;
          p[g] -= out;
          xv = out ? (xv >> 16) : xv;
          const uint64_t q = (uint64_t)(((unsigned __int128)xv * rcp[s]) >> sh[s]);
          x[g] = (uint32_t)((q << prob_bits) + (xv - q * f) + cum[s]);
        }
        if (first_bad >= 0) break;
      }
      for (int64_t g = 0; g < gs; ++g) {
        final_states[g0 + g] = x[g];
        nwords[g0 + g] = scratch + (g0 + g) * T + T - p[g];
      }
      if (first_bad >= 0) break;
    }
    if (first_bad >= 0) bad.store(first_bad);
  };
  parallel_lanes(lanes, nthreads, work);
  const int64_t b = bad.load();
  return b >= 0 ? -(1 + b) : 0;
}

// Copy lane j's words scratch[j*T + T - nwords[j], (j+1)*T) to out[offsets[j], offsets[j+1]).
void ans_compact(const uint16_t* scratch, int64_t T, int64_t lanes, const int64_t* offsets, uint16_t* out,
                 int nthreads) {
  parallel_lanes(lanes, nthreads, [&](int64_t a, int64_t b) {
    for (int64_t j = a; j < b; ++j) {
      const int64_t c = offsets[j + 1] - offsets[j];
      std::memcpy(out + offsets[j], scratch + j * T + T - c, (size_t)c * 2);
    }
  });
}

// Decode. `words` must hold offsets[lanes] + 1 entries (one pad word, so the branch-free read never leaves it);
// `slot_sym` may be null (the slot table is then built from freq/cum).
// Returns 0, or -(1 + j) for the first lane j whose stream is inconsistent (over/under-run or wrong end state).
int64_t ans_decode(const uint16_t* words, const int64_t* offsets, const uint32_t* final_states, int64_t n,
                   int64_t lanes, const uint8_t* slot_sym, const uint32_t* freq, const uint32_t* cum, int prob_bits,
                   uint8_t* out, int nthreads) {
  const int64_t T = (n + lanes - 1) / lanes;
  const uint32_t mask = (1u << prob_bits) - 1;
  const int64_t total = offsets[lanes];
  // slot -> symbol (built here from freq/cum when slot_sym is null), then per slot: freq (17 bits max) and
  // slot - cum (16 bits) packed in 64 bits
  std::vector<uint8_t> sym_of((size_t)mask + 1, 0);
  if (slot_sym != nullptr) {
    std::memcpy(sym_of.data(), slot_sym, (size_t)mask + 1);
  } else {
    for (int s = 0; s < 256; ++s)
      for (uint64_t sl = cum[s]; sl < (uint64_t)cum[s] + freq[s] && sl <= mask; ++sl) sym_of[sl] = (uint8_t)s;
  }
  const uint8_t* ss = sym_of.data();
  std::vector<uint64_t> tab((size_t)mask + 1);
  for (uint32_t sl = 0; sl <= mask; ++sl) {
    const uint8_t s = ss[sl];
    tab[sl] = ((uint64_t)freq[s] << 32) | (uint64_t)(sl - cum[s]);
  }
  std::vector<uint8_t> badlane((size_t)lanes > 0 ? (size_t)lanes : 1, 0);
  auto work = [&](int64_t la, int64_t lb) {
    for (int64_t g0 = la; g0 < lb; g0 += GROUP) {
      const int64_t gs = std::min(GROUP, lb - g0);
      uint32_t x[GROUP];
      int64_t p[GROUP];
      for (int64_t g = 0; g < gs; ++g) { x[g] = final_states[g0 + g]; p[g] = offsets[g0 + g]; }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t base = t * lanes + g0;
        const int64_t cnt = std::min(gs, n - base);
        uint8_t* op = out + base;
        for (int64_t g = 0; g < cnt; ++g) {
          uint32_t xv = x[g];
          const uint32_t sl = xv & mask;
          const uint64_t e = tab[sl];
          op[g] = ss[sl];
          xv = (uint32_t)(e >> 32) * (xv >> prob_bits) + (uint32_t)e;
          const bool in = xv < ANS_L;
          const int64_t q = p[g] < total ? p[g] : total;
          const uint32_t w = words[q];
          xv = in ? ((xv << 16) | w) : xv;
          p[g] += in;
          x[g] = xv;
        }
      }
      for (int64_t g = 0; g < gs; ++g)
        if (x[g] != ANS_L || p[g] != offsets[g0 + g + 1]) badlane[g0 + g] = 1;
    }
  };
  parallel_lanes(lanes, nthreads, work);
  for (int64_t j = 0; j < lanes; ++j) if (badlane[j]) return -(1 + j);
  return 0;
}

}  // extern "C"
