// Tensor-core split kernel of the fused decode attention (internal; launched by attention_split.cu for float16 and
// bfloat16 queries, docs/attention.md §2.1).
//
// One block of kSplitWarps warps per (split, KV head x head chunk, sequence), as the SIMT split kernel; each warp
// takes 16-token tiles in turn and runs both products on mma.sync m16n8k16 (fp16 operands, fp32 accumulation):
//
//   scores, chunks of up to 4 query heads ("token rows"):
//           S^T (16 tokens x 8) = K (16 tokens x 16 coordinates) x Q^T (16 coordinates x 8 columns), column 2 j
//           holding head j's fp16 query values, column 2 j + 1 their fp16 remainders;
//   scores, chunks of 8 heads ("head rows"):
//           S (16 x 8 tokens) = Q (16 x 16 coordinates: rows 0-7 the 8 heads' fp16 values, 8-15 their remainders)
//           x K^T, two n-tiles (tokens 0-7 and 8-15 of the tile);
//   values  O^T (16 x 8) += V^T (16 coordinates x 16 tokens) x P^T (16 tokens x 8 heads), P / 16 coordinate tiles;
//   both over P / 16 coordinate steps.
//
// Lane (g, r) = (lane / 4, lane % 4). The reduction index of the score product may be any permutation of the
// coordinates (the query fragments use the same one), so lane (g, r) takes the contiguous quarter
// [r P / 4, (r + 1) P / 4) of the key codes of tokens g and 8 + g (token rows: its A rows g, g + 8; head rows: its
// B column g in the two n-tiles): step s, k-slots 2r, 2r + 1 <-> coordinates r P / 4 + 4 s + 0, 1 and k-slots
// 2r + 8, 2r + 9 <-> r P / 4 + 4 s + 2, 3. Its key operand registers are then pairs of adjacent coordinates, read as
// one field of the bit-plane words from a pair table (half2 entries of two centroids).
// - Token rows: the score accumulator of lane (g, r) holds head r at tokens g and 8 + g, its value and remainder
//   columns side by side (summed in fp32). The 16 rows are all tokens, so a tile takes P / 8 score products for
//   GQA 4 where head rows (half of them padding) take P / 4; the softmax weights go to the value product's B
//   operand (lane (g, r): head g at tokens 2r, 2r + 1, 8 + 2r, 9 + 2r) by two shuffles and two byte permutes.
// - Head rows: the score accumulator of lane (g, r) holds head g at tokens 2r, 2r + 1 (and 8 + 2r, 9 + 2r in the
//   second n-tile): exactly the B operand of the value product, so the weights never leave the registers. For 8
//   heads this beats token rows (two n-tiles of 4 heads: the same products, more shuffles; measured 5 % slower).
//
// Numerics: queries are scaled per head by a power of two to |q| < 1 and split into an fp16 value and its fp16
// remainder (token rows: two B columns; head rows: A rows 8-15, otherwise padding: the split costs no extra product).
// Key centroids likewise: head rows read their fp16 remainders from a second pair table (same address plus an
// offset) into a second product with the same query operand; token rows take them as A rows 8 + g of the product
// whose rows g are the centroids, from a paired table (one 64-bit load per pair, mma_scores). Either way the scores
// carry ~22-bit operands; they are
// accumulated in fp32 and multiplied by the key norm and the power of two in fp32. Value centroids and the softmax
// weights are fp16. Value norms are folded into the weights as p * n_t * 2^-E, with 2^E a running power-of-two bound
// of the value norms seen (rescaled lazily like the softmax maximum), so the fp16 weights stay <= 2^9 for any norm;
// the accumulator is multiplied by 2^E at the end. Online softmax as in the SIMT kernel (base 2, lazy rescale by
// kRescaleThreshold).
#pragma once

#include "attention_kernels.cuh"
#include "mma.cuh"

namespace rotorquant {
namespace cuda {
namespace attention {

constexpr int kMmaHeads = 8;     // query heads per block: the n of the value product
constexpr int kTileTokens = 16;  // tokens per warp tile: the k of the value product
constexpr int kNoScale = -100000;

// 2^e as a float (0 below the float range), exact.
__device__ __forceinline__ float power_of_two(int e) { return e < -149 ? 0.0f : ldexpf(1.0f, e); }

// The smallest e with 2^e > v for a finite v > 0.
__device__ __forceinline__ int exponent_bound(float v) {
  return static_cast<int>((__float_as_uint(v) >> 23) & 0xFFu) - 126;
}

// Bits [pos, pos + width) of word moved to [dest, dest + width), the rest zero (positions compile-time after unrolling).
__device__ __forceinline__ unsigned place_field(unsigned word, int pos, int width, int dest) {
  const unsigned mask = ((1u << width) - 1u) << dest;
  return (pos >= dest ? (word >> (pos - dest)) : (word << (dest - pos))) & mask;
}

// Plane geometry of Bits = 2, 3, 4 (docs/format.md §3): plane 0 of width W0 (the index >> 1 at 3 bits), at 3 bits a
// 1-bit plane 1 (the index & 1) after plane 0's P W0 / 8 bytes.
template <int Bits>
struct Planes {
  static constexpr int W0 = Bits == 3 ? 2 : Bits;
  static constexpr bool kSecond = Bits == 3;
  static constexpr int kPairBits = Bits == 3 ? 6 : 2 * Bits;  // pair-table index bits
};

// The bit-plane words of N consecutive coordinates starting at coordinate `first` (N a multiple of 8): plane 0 in
// w0[], plane 1 (3 bits) in w1[]; zero when !valid.
template <int Bytes>
struct WordCount {
  static constexpr int value = Bytes <= 4 ? 1 : Bytes / 4;
};

template <int Bytes>
__device__ __forceinline__ void load_words(const std::uint8_t* p, unsigned (&w)[WordCount<Bytes>::value]) {
  if constexpr (Bytes == 1) {
    w[0] = __ldg(p);
  } else if constexpr (Bytes == 2) {
    w[0] = __ldg(reinterpret_cast<const unsigned short*>(p));
  } else if constexpr (Bytes == 4) {
    w[0] = __ldg(reinterpret_cast<const unsigned*>(p));
  } else if constexpr (Bytes == 8) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x;
    w[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < Bytes / 16; ++i) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
      w[4 * i] = v.x;
      w[4 * i + 1] = v.y;
      w[4 * i + 2] = v.z;
      w[4 * i + 3] = v.w;
    }
  }
}

// The same words from a staged tile in shared memory (aligned like the global row: 4-, 8- or 16-byte loads).
template <int Bytes>
__device__ __forceinline__ void load_words_shared(const std::uint8_t* p, unsigned (&w)[WordCount<Bytes>::value]) {
  if constexpr (Bytes == 1) {
    w[0] = *p;
  } else if constexpr (Bytes == 2) {
    w[0] = *reinterpret_cast<const unsigned short*>(p);
  } else if constexpr (Bytes == 4) {
    w[0] = *reinterpret_cast<const unsigned*>(p);
  } else if constexpr (Bytes == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x;
    w[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < Bytes / 16; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = v.x;
      w[4 * i + 1] = v.y;
      w[4 * i + 2] = v.z;
      w[4 * i + 3] = v.w;
    }
  }
}

template <int Bits, int P, int N>
struct CodeSlice {
  static constexpr int kBytes0 = N * Planes<Bits>::W0 / 8;
  static constexpr int kBytes1 = Planes<Bits>::kSecond ? N / 8 : 1;
  unsigned w0[WordCount<kBytes0>::value];
  unsigned w1[WordCount<kBytes1>::value];

  __device__ __forceinline__ void load(const std::uint8_t* code, int first, bool valid) {
    if (valid) {
      load_words<kBytes0>(code + first * Planes<Bits>::W0 / 8, w0);
      if constexpr (Planes<Bits>::kSecond) load_words<kBytes1>(code + P / 4 + first / 8, w1);
    } else {
#pragma unroll
      for (int i = 0; i < WordCount<kBytes0>::value; ++i) w0[i] = 0u;
    }
    if (!Planes<Bits>::kSecond || !valid) {
#pragma unroll
      for (int i = 0; i < WordCount<kBytes1>::value; ++i) w1[i] = 0u;
    }
  }

  // From a code row staged in shared memory.
  __device__ __forceinline__ void load_shared(const std::uint8_t* code, int first) {
    load_words_shared<kBytes0>(code + first * Planes<Bits>::W0 / 8, w0);
    if constexpr (Planes<Bits>::kSecond) {
      load_words_shared<kBytes1>(code + P / 4 + first / 8, w1);
    } else {
#pragma unroll
      for (int i = 0; i < WordCount<kBytes1>::value; ++i) w1[i] = 0u;
    }
  }
};

// Bank-private copies of the pair tables. A warp's 32 lanes look up data-dependent entries; with one copy, two lanes
// reading different entries of one bank serialize (ncu, B = 32, 8K tokens: 2.15 shared wavefronts per lookup at
// K3/V3, 3.2 at K4/V4, the L1/shared pipe 87-95 % busy: the kernel's limit). Entry e of copy c sits at word e C + c
// and lane l reads copy l % C:
// - 3 bits (64 entries): C = 32, every lane its own bank, one wavefront per lookup;
// - 4 bits (256 entries): C = 8, lanes l, l + 8, l + 16, l + 24 share 4 banks (bank 8 (e % 4) + l % 8);
// - 2 bits (16 entries): C = 1, the entries already sit in distinct banks.
// Every table takes at most kTableSlot bytes (64 x 32 x 4 = 256 x 8 x 4 = 8192) and starts at a multiple of it, so
// a table's address ORed with a field's shifted bits and the lane's copy offset is the entry's address (no add).
template <int Bits>
struct PairCopies {
  static constexpr int kLog2 = Bits == 2 ? 0 : Bits == 3 ? 5 : 3;
  static constexpr int value = 1 << kLog2;
};
constexpr int kTableSlot = 8192;
constexpr int kKeyLowOffset = kTableSlot, kValueOffset = 2 * kTableSlot, kTableBytes = 3 * kTableSlot;

// The 3-bit key table is byte-addressed instead (see pair_bytes, byte_entry): entries kByteEntryBytes apart, so one
// byte permute turns a pair's 6-bit field into the entry's address. It fills the two slots of the OR-addressed key
// tables (16 KB). Entry t holds 32 bank-private copies of the pair's fp16 centroids and of their fp16 remainders:
// - split (head rows): the values at words [64 t, 64 t + 32), the remainders kByteLowOffset bytes on; lane l reads
//   word l of each (one wavefront per 32-bit load);
// - paired (token rows, KeyPairs): lane l's value and remainder side by side at 256 t + 8 l, one 64-bit load for
//   both (two wavefronts, as the two 32-bit loads were), straight into an A-operand register pair of the score product
//   (mma_scores: remainder rows).
template <int Bits>
struct ByteTable {
  static constexpr bool value = Bits == 3;
};
constexpr int kByteEntryBytes = 256, kByteLowOffset = 128;

// Whether the score product reads its key pairs from a paired table (value and remainder side by side, one 64-bit
// load): token rows with 3-bit keys (the byte-addressed table) or 2-bit keys (16 entries of 8 bytes, one copy). The
// 4-bit table would need 16 KB aligned to 16 KB for its OR addressing.
template <int KB, bool TokenRows>
struct PairedKeys {
  static constexpr bool value = TokenRows && (KB == 3 || KB == 2);
};

// K3/V3 (CompactLayout): the 3-bit value table is byte-addressed too, entry t's 32 copies at [256 t, 256 t + 128) of
// the 16 KB after the key table. Its other halves ("holes", 64 x 128 bytes) hold the query fragments and the slot
// mbarriers, and nothing needs a multiple of 8 KB any more (the OR-addressed tables did), so the
// 7 KB of padding before the tables go too: tables, slots and all fit 5 blocks per SM at d = 128 (SplitMmaShared).
// With the value table OR-addressed (8 KB), a byte-addressed one cost the staging and measured 4 % slower (H100).
template <int KB, int VB>
struct CompactLayout {
  static constexpr bool value = ByteTable<KB>::value && ByteTable<VB>::value;
};
constexpr int kHoleBytes = 128, kHoles = 64;
// The query fragments (the score product's query operand) of a lane and k-step: token rows: B {pair 2 s, pair 2 s + 1}
// of one column (8 bytes); head rows: A {hi(pair 2 s), lo(pair 2 s), hi(pair 2 s + 1), lo(pair 2 s + 1)} (16 bytes).
// A step's 32 fragments lie side by side, or in the CompactLayout's holes (128 / kFragmentLaneBytes per hole, holes
// 256 bytes apart). kFragmentStepBytes: the stride between the steps of one lane; fragment_offset: lane l's fragment
// of step 0, from the first fragment (or hole).
template <bool TokenRows>
constexpr int kFragmentLaneBytes = TokenRows ? 8 : 16;
template <int KB, int VB, bool TokenRows>
constexpr int kFragmentStepBytes = CompactLayout<KB, VB>::value
                                       ? 32 * kFragmentLaneBytes<TokenRows> / kHoleBytes * kByteEntryBytes
                                       : 32 * kFragmentLaneBytes<TokenRows>;
template <int KB, int VB, bool TokenRows>
__device__ __forceinline__ int fragment_offset(int lane) {
  constexpr int F = kFragmentLaneBytes<TokenRows>;
  if constexpr (CompactLayout<KB, VB>::value) {
    return kByteEntryBytes * (lane / (kHoleBytes / F)) + F * (lane % (kHoleBytes / F));
  } else {
    return F * lane;
  }
}

// The query head whose scores lane (g, r) holds (token rows: r; head rows: g), and the lanes that share it: the xor
// distances [kFirstXor, kEndXor) of a reduction over them (token rows: the 8 lanes of column r; head rows: the quad),
// and `first`: the lane of them with the other index 0.
template <bool TokenRows>
struct OwnHead {
  static constexpr int kFirstXor = TokenRows ? 4 : 1, kEndXor = TokenRows ? 32 : 4;
  __device__ __forceinline__ static int head(int g, int r) { return TokenRows ? r : g; }
  __device__ __forceinline__ static bool first(int g, int r) { return (TokenRows ? g : r) == 0; }
};

// Shared address in the pair table at `table` (its base ORed with the lane's copy offset) of the pair field `pair`
// (the coordinates 2 pair, 2 pair + 1 of plane words laid out like a code slice, or the token-interleaved words of
// two slices): plane-0 field of 2 W0 bits, plane-1 field of 2.
// EntryLog2: log2 of an entry's bytes (4, or 8 for the paired key table of 2-bit keys).
template <int Bits, int N0, int N1, int EntryLog2 = 2>
__device__ __forceinline__ unsigned pair_address(unsigned table, const unsigned (&w0)[N0], const unsigned (&w1)[N1],
                                                 int pair) {
  constexpr int W0 = Planes<Bits>::W0;
  constexpr int kEntryShift = EntryLog2 + PairCopies<Bits>::kLog2;
  const int bit0 = 2 * W0 * pair;
  unsigned address = table | place_field(w0[bit0 >> 5], bit0 & 31, 2 * W0, kEntryShift);
  if constexpr (Planes<Bits>::kSecond) {
    const int bit1 = 2 * pair;
    address |= place_field(w1[bit1 >> 5], bit1 & 31, 2, kEntryShift + 2 * W0);
  }
  return address;
}

// The 6-bit pair fields of 16 pairs of 3-bit codes as 4 words of one byte per pair: lo / hi hold the plane-0 fields
// (4 bits) of pairs 0-7 / 8-15 as nibbles, p1 the plane-1 fields (2 bits) of pairs 0-15. Word c, byte k = pair
// c + 4 k: its nibble in bits 0-3 and its plane-1 field in bits 4-5 (the pair-table index of pair_indices<3>), plus
// `bias` (byte_bias: the table's address bits 8-15 in every byte). About 5 instructions per word (4 pairs), where
// assembling a field at its lookup takes two shifts and two mask-ors.
__device__ __forceinline__ void pair_bytes(unsigned lo, unsigned hi, unsigned p1, unsigned bias, unsigned (&t)[4]) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    // pairs c, c + 4 of lo and of hi: nibble c % 2 of bytes c / 2 and c / 2 + 2
    const unsigned x = __byte_perm(lo, hi, (c / 2) | ((c / 2 + 2) << 4) | ((c / 2 + 4) << 8) | ((c / 2 + 6) << 12));
    const unsigned nibbles = ((c & 1) ? x >> 4 : x) & 0x0F0F0F0Fu;
    // pair c + 4 k's plane-1 field: bits 2 c + 8 k of p1, moved to bit 4 of byte k
    const unsigned second = c < 3 ? p1 << (4 - 2 * c) : p1 >> 2;
    t[c] = nibbles + (second & 0x30303030u) + bias;
  }
}

// A byte-addressed table at shared address `table` (a multiple of kByteEntryBytes) is read at table + lane's copy offset
// + 256 e (+ kByteLowOffset). The pair field e <= 63 is added to the table's address bits 8-15 in advance (the bias in
// every byte of the pair_bytes words), so a byte permute that puts the biased byte over bits 8-15 of `lane_address`
// (table + 4 lane) yields the entry's whole address: no add per lookup. This needs the table's bits 8-15 plus 63 to
// stay below 256, i.e. the table not to cross a multiple of 64 KB (byte_table_fits).
__device__ __forceinline__ unsigned byte_bias(unsigned table) { return __byte_perm(table, 0u, 0x1111); }

__device__ __forceinline__ bool byte_table_fits(unsigned table) { return ((table >> 8) & 0xFFu) + 63u <= 0xFFu; }

// Whether the byte-addressed tables fit when `reserved` bytes precede the dynamic shared memory (the kernel has no
// static shared memory, so its tables start at the first multiple of kTableSlot after them, or of kByteEntryBytes in
// the CompactLayout): within one 64 KB window (byte_table_fits).
__host__ __device__ constexpr bool byte_table_fits_after(int reserved) {
  return ((reserved + kTableSlot - 1) / kTableSlot * kTableSlot) % 65536 + 64 * kByteEntryBytes <= 65536 &&
         ((reserved + kByteEntryBytes - 1) / kByteEntryBytes * kByteEntryBytes) % 65536 + 2 * 64 * kByteEntryBytes <=
             65536;  // CompactLayout: the key and value tables side by side from the first multiple of 256
}
static_assert(byte_table_fits_after(1024), "sm_80 - sm_90 reserve 1 KB of shared memory per block");

// Shared address of pair j (0-15) of biased pair_bytes words t in the table of `lane_address`.
__device__ __forceinline__ unsigned byte_entry(const unsigned (&t)[4], int j, unsigned lane_address) {
  return __byte_perm(t[j & 3], lane_address, 0x7604 | ((j >> 2) << 4));
}

// Two 1-bit planes of 16 coordinates (bits 0-15 of a and b: token a's and b's plane-1 bits) as the p1 word of
// pair_bytes for token pairs: field j < 8 = (a, b) at coordinate 2 j, field 8 + j = (a, b) at coordinate 2 j + 1.
__device__ __forceinline__ unsigned token_pair_bits(unsigned a, unsigned b) {
  const unsigned sa = (a | (a << 15)) & 0x55555555u, sb = (b | (b << 15)) & 0x55555555u;
  return sa | (sb << 1);
}

__device__ __forceinline__ unsigned shared_word(unsigned shared_address) {
  unsigned value;
  asm("ld.shared.u32 %0, [%1];" : "=r"(value) : "r"(shared_address));
  return value;
}

// A paired table entry: {fp16 centroids, fp16 remainders} (8-byte aligned).
__device__ __forceinline__ uint2 shared_pair(unsigned shared_address) {
  uint2 v;
  asm("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(shared_address));
  return v;
}

__device__ __forceinline__ unsigned shared_word_key_low(unsigned shared_address) {
  static_assert(kKeyLowOffset == 8192, "the immediate offset of the load below is kKeyLowOffset");
  unsigned value;
  asm("ld.shared.u32 %0, [%1+8192];" : "=r"(value) : "r"(shared_address));
  return value;
}

// Field-wise interleave of the plane words of two tokens a, b (fields of width w): even[] holds, at the field of
// coordinate c (c even), the pair (a_c, b_c); odd[] the pair (a_{c+1}, b_{c+1}) at the same place.
template <int W, int N>
__device__ __forceinline__ void interleave_tokens(const unsigned (&a)[N], const unsigned (&b)[N], unsigned (&even)[N],
                                                  unsigned (&odd)[N]) {
  constexpr unsigned M = W == 1 ? 0x55555555u : W == 2 ? 0x33333333u : 0x0F0F0F0Fu;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    even[i] = (a[i] & M) | ((b[i] & M) << W);
    odd[i] = ((a[i] >> W) & M) | (b[i] & (M << W));
  }
}

// Pair table entry t: the fp16 centroids of the two indices of pair field t (low half: the first coordinate / token).
template <int Bits>
__device__ __forceinline__ void pair_indices(int t, int& first, int& second) {
  if (Bits == 3) {
    first = ((t & 3) << 1) | ((t >> 4) & 1);
    second = (((t >> 2) & 3) << 1) | ((t >> 5) & 1);
  } else {
    first = t & ((1 << Bits) - 1);
    second = t >> Bits;
  }
}

// low = true: the fp16 remainders c - fp16(c) of the two centroids instead.
template <int Bits>
__device__ __forceinline__ unsigned pair_table_value(const float* centroids, int t, bool low) {
  int first, second;
  pair_indices<Bits>(t, first, second);
  const float c0 = centroids[first], c1 = centroids[second];
  if (!low) return pack_half2(c0, c1);
  return pack_half2(c0 - __half2float(__float2half_rn(c0)), c1 - __half2float(__float2half_rn(c1)));
}

// Writes the pair table of `Bits` (centroid values, or their fp16 remainders when low) with its bank-private copies
// to the shared table at `table` (16-byte aligned), the block's threads together.
template <int Bits>
__device__ __forceinline__ void fill_pair_table(unsigned* table, const float* centroids, bool low) {
  constexpr int kEntries = 1 << Planes<Bits>::kPairBits, kCopies = PairCopies<Bits>::value;
  static_assert(kEntries * kCopies * 4 <= kTableSlot, "a pair table with its copies fills at most one slot");
  if constexpr (kCopies >= 4) {  // 4 copies of one entry per 16-byte store; each entry computed once
    for (int t = threadIdx.x; t < kEntries; t += blockDim.x) {
      const unsigned v = pair_table_value<Bits>(centroids, t, low);
#pragma unroll
      for (int q = 0; q < kCopies / 4; ++q) {
        reinterpret_cast<uint4*>(table)[t * (kCopies / 4) + q] = make_uint4(v, v, v, v);
      }
    }
  } else {
    for (int i = threadIdx.x; i < kEntries * kCopies; i += blockDim.x) {
      table[i] = pair_table_value<Bits>(centroids, i / kCopies, low);
    }
  }
}

// Writes the byte-addressed 3-bit key table at `table` (16-byte aligned), the block's threads together: entry t's
// copies of its value, then of its fp16 remainders (Paired: value and remainder side by side, per copy).
// Two threads per entry (halves of its 16-byte stores), each entry's values computed once per thread.
template <bool Paired>
__device__ __forceinline__ void fill_byte_pair_table(unsigned* table, const float* centroids) {
  constexpr int kQuads = kByteEntryBytes / 16;  // 16-byte stores per entry
  static_assert(64 * kByteEntryBytes == 2 * kTableSlot, "a byte-addressed table fills two slots");
  for (int i = threadIdx.x; i < 64 * 2; i += blockDim.x) {
    const int t = i >> 1, half = i & 1;
    uint4* const quads = reinterpret_cast<uint4*>(table) + t * kQuads + half * (kQuads / 2);
    uint4 quad;
    if constexpr (Paired) {
      const unsigned v = pair_table_value<3>(centroids, t, false), low = pair_table_value<3>(centroids, t, true);
      quad = make_uint4(v, low, v, low);
    } else {  // the first half of the entry holds the values, the second their remainders
      const unsigned v = pair_table_value<3>(centroids, t, half == 1);
      quad = make_uint4(v, v, v, v);
    }
#pragma unroll
    for (int q = 0; q < kQuads / 2; ++q) quads[q] = quad;
  }
}

// Writes the byte-addressed 3-bit value table at `table` (16-byte aligned): entry t's copies at [256 t, 256 t + 128);
// the holes between them are not written (they hold the query fragments, written before or after).
__device__ __forceinline__ void fill_byte_value_table(unsigned* table, const float* centroids) {
  constexpr int kQuads = kHoleBytes / 16, kStride = kByteEntryBytes / 16;
  for (int i = threadIdx.x; i < 64 * 2; i += blockDim.x) {  // two threads per entry, as fill_byte_pair_table
    const int t = i >> 1, half = i & 1;
    const unsigned v = pair_table_value<3>(centroids, t, false);
    uint4* const quads = reinterpret_cast<uint4*>(table) + t * kStride + half * (kQuads / 2);
#pragma unroll
    for (int q = 0; q < kQuads / 2; ++q) quads[q] = make_uint4(v, v, v, v);
  }
}

// The pair tables of split_mma_kernel<P, KB, VB, TokenRows> at `tables` (a multiple of kTableSlot, kTableBytes;
// CompactLayout: of kByteEntryBytes, 32 KB).
template <int KB, int VB, bool TokenRows>
__device__ __forceinline__ void fill_pair_tables(unsigned* tables, const float* centroids) {
  if constexpr (CompactLayout<KB, VB>::value) {
    fill_byte_pair_table<TokenRows>(tables, centroids);
    fill_byte_value_table(tables + kValueOffset / 4, centroids + kTableSize);
    return;
  }
  if constexpr (ByteTable<KB>::value) {
    fill_byte_pair_table<TokenRows>(tables, centroids);
  } else if constexpr (PairedKeys<KB, TokenRows>::value) {
    static_assert(PairCopies<KB>::value == 1, "one copy of the paired 2-bit table");
    for (int i = threadIdx.x; i < 1 << Planes<KB>::kPairBits; i += blockDim.x) {
      reinterpret_cast<uint2*>(tables)[i] =
          make_uint2(pair_table_value<KB>(centroids, i, false), pair_table_value<KB>(centroids, i, true));
    }
  } else {
    fill_pair_table<KB>(tables, centroids, false);
    fill_pair_table<KB>(tables + kKeyLowOffset / 4, centroids, true);
  }
  fill_pair_table<VB>(tables + kValueOffset / 4, centroids + kTableSize, false);
}

template <int P>
struct MmaShape {
  static constexpr int kSteps = P / 16;       // k-steps of the score product = m-tiles of the value product
  static constexpr int kKeyCoords = P / 4;    // key coordinates per lane (one token)
  static constexpr int kValueCoords = P / 8;  // value coordinates per lane (four tokens)
  static constexpr int kMinBlocks = P <= 128 ? 5 : 2;  // H100, B = 32: 5 blocks 4-12% faster than 4
};

// A tile's bytes: index bytes per row, and a staged tile's layout in its slot: the 16 key rows, the 16 value rows,
// 16 fp16 key norms, 16 fp16 value norms.
template <int P, int KB, int VB>
struct TileBytes {
  static constexpr int kKeyBytes = P * KB / 8, kValueBytes = P * VB / 8;  // index bytes (padded_dim == dim, mse)
  static constexpr int kStagedKeys = 0, kStagedValues = kTileTokens * kKeyBytes;
  static constexpr int kStagedKeyNorms = kStagedValues + kTileTokens * kValueBytes;
  static constexpr int kStagedValueNorms = kStagedKeyNorms + 2 * kTileTokens;
  static constexpr int kStagedBytes = kStagedValueNorms + 2 * kTileTokens;
};

// One warp tile's loads: key slices of tokens g and 8 + g, value slices of tokens 2r, 2r + 1, 8 + 2r, 9 + 2r, and the
// norms of the tokens whose scores the lane holds: token rows: g and 8 + g; head rows: 2r, 2r + 1, 8 + 2r, 9 + 2r.
template <int P, int KB, int VB, bool TokenRows>
struct MmaTile : TileBytes<P, KB, VB> {
  using Bytes = TileBytes<P, KB, VB>;
  using Bytes::kKeyBytes, Bytes::kValueBytes, Bytes::kStagedValues, Bytes::kStagedKeyNorms, Bytes::kStagedValueNorms;
  static constexpr int kNorms = TokenRows ? 2 : 4;
  CodeSlice<KB, P, MmaShape<P>::kKeyCoords> key[2];
  CodeSlice<VB, P, MmaShape<P>::kValueCoords> value[4];
  float key_norm[kNorms], value_norm[kNorms];  // value_norm 0 and key_norm -inf for invalid tokens

  // Norm n of the lane (see above) is token norm_token(n, g, r) of the tile.
  __device__ __forceinline__ static int norm_token(int n, int g, int r) {
    return TokenRows ? g + 8 * n : 2 * r + (n & 1) + 8 * (n >> 1);
  }

  // A staged tile's key words (before the score product), then the rest (load_staged_rest: after it, so that the
  // value words and norms take no registers while the key lookups are in flight).
  __device__ __forceinline__ void load_staged_keys(const std::uint8_t* stage, int g, int r) {
    key[0].load_shared(stage + g * kKeyBytes, r * MmaShape<P>::kKeyCoords);
    key[1].load_shared(stage + (8 + g) * kKeyBytes, r * MmaShape<P>::kKeyCoords);
  }
  __device__ __forceinline__ void load_staged_rest(const std::uint8_t* stage, int g, int r) {
    const int rows[4] = {2 * r, 2 * r + 1, 8 + 2 * r, 9 + 2 * r};
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      value[u].load_shared(stage + kStagedValues + rows[u] * kValueBytes, g * MmaShape<P>::kValueCoords);
    }
    if constexpr (TokenRows) {
      const __half* kn = reinterpret_cast<const __half*>(stage + kStagedKeyNorms);
      const __half* vn = reinterpret_cast<const __half*>(stage + kStagedValueNorms);
#pragma unroll
      for (int n = 0; n < kNorms; ++n) {
        key_norm[n] = __half2float(kn[norm_token(n, g, r)]);
        value_norm[n] = __half2float(vn[norm_token(n, g, r)]);
      }
    } else {  // tokens 2r, 2r + 1 (and 8 + 2r, 9 + 2r) are adjacent: one 4-byte load per pair
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float2 k2 = __half22float2(reinterpret_cast<const __half2*>(stage + kStagedKeyNorms)[r + 4 * half]);
        const float2 v2 = __half22float2(reinterpret_cast<const __half2*>(stage + kStagedValueNorms)[r + 4 * half]);
        key_norm[2 * half] = k2.x;
        key_norm[2 * half + 1] = k2.y;
        value_norm[2 * half] = v2.x;
        value_norm[2 * half + 1] = v2.y;
      }
    }
  }

  __device__ __forceinline__ void load(const KernelArgs& a, int b, int h, int base, int end, int g, int r) {
    // A whole tile without a mask whose 16 rows are consecutive (contiguous layout, or pages of >= 16 tokens: a tile
    // starts at a multiple of 16): one row computation, unpredicated loads. Otherwise token by token.
    if (base + kTileTokens <= end && !a.code_mask && (!a.block_table || a.block_shift >= 4)) {
      const std::int64_t row0 = code_row(a, b, h, base);
      key[0].load(a.key_indices + (row0 + g) * kKeyBytes, r * MmaShape<P>::kKeyCoords, true);
      key[1].load(a.key_indices + (row0 + 8 + g) * kKeyBytes, r * MmaShape<P>::kKeyCoords, true);
      const std::int64_t rows[4] = {row0 + 2 * r, row0 + 2 * r + 1, row0 + 8 + 2 * r, row0 + 9 + 2 * r};
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        value[u].load(a.value_indices + rows[u] * kValueBytes, g * MmaShape<P>::kValueCoords, true);
      }
      if constexpr (!TokenRows) {
        // tokens 2r, 2r + 1 (and 8 + 2r, 9 + 2r) are adjacent: one 4-byte load per pair when aligned
        const __half* kn = reinterpret_cast<const __half*>(a.key_norms) + rows[0];
        const __half* vn = reinterpret_cast<const __half*>(a.value_norms) + rows[0];
        const std::uintptr_t bits = reinterpret_cast<std::uintptr_t>(kn) | reinterpret_cast<std::uintptr_t>(vn);
        if (a.norm_bytes == 2 && (bits & 3u) == 0) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const float2 k2 = __half22float2(__ldg(reinterpret_cast<const __half2*>(kn + 8 * half)));
            const float2 v2 = __half22float2(__ldg(reinterpret_cast<const __half2*>(vn + 8 * half)));
            key_norm[2 * half] = k2.x;
            key_norm[2 * half + 1] = k2.y;
            value_norm[2 * half] = v2.x;
            value_norm[2 * half + 1] = v2.y;
          }
          return;
        }
      }
#pragma unroll
      for (int n = 0; n < kNorms; ++n) {
        const std::int64_t row = row0 + norm_token(n, g, r);
        key_norm[n] = load_norm(a.key_norms, row, a.norm_bytes);
        value_norm[n] = load_norm(a.value_norms, row, a.norm_bytes);
      }
      return;
    }
    // the norms with the key rows (token rows) or the value rows (head rows) of their tokens
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int t = base + 8 * half + g;
      const bool in_range = t < end;
      const std::int64_t row = in_range ? code_row(a, b, h, t) : 0;
      key[half].load(a.key_indices + row * kKeyBytes, r * MmaShape<P>::kKeyCoords, in_range);
      if constexpr (TokenRows) {
        const bool valid = in_range && (!a.code_mask || __ldg(a.code_mask + b * a.code_mask_stride + t) != 0);
        key_norm[half] = valid ? load_norm(a.key_norms, row, a.norm_bytes) : -INFINITY;
        value_norm[half] = valid ? load_norm(a.value_norms, row, a.norm_bytes) : 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int t = base + 2 * r + (u & 1) + 8 * (u >> 1);
      bool valid = t < end;
      if (valid && a.code_mask) valid = __ldg(a.code_mask + b * a.code_mask_stride + t) != 0;
      const std::int64_t row = valid ? code_row(a, b, h, t) : 0;
      value[u].load(a.value_indices + row * kValueBytes, g * MmaShape<P>::kValueCoords, valid);
      if constexpr (!TokenRows) {
        key_norm[u] = valid ? load_norm(a.key_norms, row, a.norm_bytes) : -INFINITY;
        value_norm[u] = valid ? load_norm(a.value_norms, row, a.norm_bytes) : 0.0f;
      }
    }
  }
};

// Running state of one warp: softmax maximum of the lane's own head (token rows: head r; head rows: head g; m_own,
// with its partial sum l_own) and of the accumulator's heads 2r, 2r + 1 (m_a, m_b: copies of other lanes' m_own,
// updated identically), the value-norm exponent E and the accumulator O^T (coordinate rows, head columns).
template <int P>
struct MmaState {
  float m_own, m_a, m_b, l_own;
  int value_exponent;
  float inverse_value_scale;
  float value_limit;  // 2^E (0 while E is kNoScale or 2^E subnormal): a norm v >= value_limit may raise E
  float acc[MmaShape<P>::kSteps][4];
};

// Shared addresses of a tile's key pair entries (the lane's tokens g and 8 + g): from OR-addressed tables, the pair
// field is assembled from the plane words at each lookup (pair_address); `table` carries the lane's copy offset.
template <int P, int KB, bool TokenRows, bool Byte = ByteTable<KB>::value>
struct KeyLookup {
  using Slice = CodeSlice<KB, P, MmaShape<P>::kKeyCoords>;
  static constexpr bool kPaired = PairedKeys<KB, TokenRows>::value;
  const Slice (&key)[2];
  unsigned table;
  __device__ __forceinline__ KeyLookup(const Slice (&k)[2], unsigned t, int) : key(k), table(t) {}
  __device__ __forceinline__ unsigned address(int token, int pair) const {
    constexpr int N0 = WordCount<Slice::kBytes0>::value, N1 = WordCount<Slice::kBytes1>::value;
    return pair_address<KB, N0, N1, kPaired ? 3 : 2>(table, key[token].w0, key[token].w1, pair);
  }
  __device__ __forceinline__ static unsigned remainder(unsigned address) {
    static_assert(!kPaired, "the paired table is read by pair()");
    return shared_word_key_low(address);
  }
  __device__ __forceinline__ static uint2 pair(unsigned address) {
    static_assert(kPaired, "the split tables are read by shared_word() and remainder()");
    return shared_pair(address);
  }
};

// From a byte-addressed table (3 bits) at `table`: the fields are rearranged once per tile into biased pair_bytes
// words, and a lookup is one byte permute. Token rows read the paired layout (value and remainder in one 64-bit
// load, `pair`), head rows the split one.
template <int P, int KB, bool TokenRows>
struct KeyLookup<P, KB, TokenRows, true> {
  using Slice = CodeSlice<KB, P, MmaShape<P>::kKeyCoords>;
  static constexpr int kGroups = (MmaShape<P>::kKeyCoords / 2 + 15) / 16;  // groups of 16 pairs
  static constexpr int N0 = WordCount<Slice::kBytes0>::value;
  unsigned bytes[2][kGroups][4];
  unsigned lane_address;
  __device__ __forceinline__ KeyLookup(const Slice (&key)[2], unsigned table, int lane)
      : lane_address(table + ((lane & 31) << (TokenRows ? 3 : 2))) {
    const unsigned bias = byte_bias(table);
#pragma unroll
    for (int token = 0; token < 2; ++token) {
#pragma unroll
      for (int group = 0; group < kGroups; ++group) {
        const unsigned hi = 2 * group + 1 < N0 ? key[token].w0[2 * group + 1] : 0u;
        pair_bytes(key[token].w0[2 * group], hi, key[token].w1[group], bias, bytes[token][group]);
      }
    }
  }
  __device__ __forceinline__ unsigned address(int token, int pair) const {
    return byte_entry(bytes[token][pair >> 4], pair & 15, lane_address);
  }
  __device__ __forceinline__ static unsigned remainder(unsigned address) {
    static_assert(!TokenRows, "the paired layout is read by pair()");
    return shared_word(address + kByteLowOffset);
  }
  // paired layout: {the pair's fp16 centroids, their fp16 remainders}
  __device__ __forceinline__ static uint2 pair(unsigned address) {
    static_assert(TokenRows, "the split layout is read by shared_word() and remainder()");
    return shared_pair(address);
  }
};

// Shared addresses of a tile's value pair entries: token pair u (tokens 2r, 2r + 1 or 8 + 2r, 9 + 2r) at the lane's
// local coordinate 2 i (even) or 2 i + 1 (odd), in the OR-addressed value table (`table` carries the lane's copy
// offset). 2 and 4 bits: the two tokens' plane words interleaved field by field, one field per lookup.
template <int P, int VB, bool Bytes = Planes<VB>::kSecond, bool ByteAddressed = false>
struct ValueLookup {
  using Slice = CodeSlice<VB, P, MmaShape<P>::kValueCoords>;
  static constexpr int N0 = WordCount<Slice::kBytes0>::value;
  unsigned even0[2][N0], odd0[2][N0];
  unsigned table;
  __device__ __forceinline__ ValueLookup(const Slice (&value)[4], unsigned t, int) : table(t) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      interleave_tokens<Planes<VB>::W0, N0>(value[2 * u].w0, value[2 * u + 1].w0, even0[u], odd0[u]);
    }
  }
  __device__ __forceinline__ unsigned address(int u, int i, bool odd) const {
    // pair field i of the interleaved words = the lane's local coordinate 2 i (even) / 2 i + 1 (odd); no plane 1
    const unsigned no_plane[1] = {0u};
    return pair_address<VB>(table, odd ? odd0[u] : even0[u], no_plane, i);
  }
};

// 3 bits: per token pair, 16 coordinates at a time, the nibbles of the plane-0 interleave and the interleaved
// plane-1 bits (token_pair_bits) as pair_bytes words (coordinate 2 i + o of a group is its pair 8 o + i), so a lookup
// moves one 6-bit field instead of a 4- and a 2-bit one: from the OR-addressed table (`table` carries the lane's copy
// offset) a shift and a mask-or; from the byte-addressed one (ByteAddressed, CompactLayout: `table` is its base) one
// byte permute, as for the keys.
template <int P, int VB, bool ByteAddressed>
struct ValueLookup<P, VB, true, ByteAddressed> {
  using Slice = CodeSlice<VB, P, MmaShape<P>::kValueCoords>;
  static constexpr int kGroups = (MmaShape<P>::kValueCoords + 15) / 16;  // groups of 16 coordinates
  static constexpr int N0 = WordCount<Slice::kBytes0>::value;
  unsigned bytes[2][kGroups][4];
  unsigned table;  // ByteAddressed: the lane's address in the table (table + 4 lane)
  __device__ __forceinline__ ValueLookup(const Slice (&value)[4], unsigned t, int lane)
      : table(ByteAddressed ? t + ((lane & 31) << 2) : t) {
    static_assert(N0 == kGroups, "one plane-0 word per 16 coordinates");
    const unsigned bias = ByteAddressed ? byte_bias(t) : 0u;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      unsigned even[N0], odd[N0];
      interleave_tokens<2, N0>(value[2 * u].w0, value[2 * u + 1].w0, even, odd);
#pragma unroll
      for (int group = 0; group < kGroups; ++group) {
        const int word = group / 2, shift = 16 * (group % 2);
        const unsigned a = (value[2 * u].w1[word] >> shift) & 0xFFFFu;
        const unsigned b = (value[2 * u + 1].w1[word] >> shift) & 0xFFFFu;
        pair_bytes(even[group], odd[group], token_pair_bits(a, b), bias, bytes[u][group]);
      }
    }
  }
  __device__ __forceinline__ unsigned address(int u, int i, bool odd) const {
    const int j = (i & 7) + (odd ? 8 : 0);
    if constexpr (ByteAddressed) return byte_entry(bytes[u][i >> 3], j, table);
    return table | place_field(bytes[u][i >> 3][j & 3], 8 * (j >> 2), 6, 2 + PairCopies<VB>::kLog2);
  }
};

// Token rows: the query fragments of the score product (its B operand, 8 bytes per k-step) in registers for the whole
// tile loop, loaded once from shared memory after warp 0 wrote them: 2 P / 16 registers, which token rows have to
// spare at d = 128 (no spills with 3- or 2-bit keys, ~20 bytes with 4-bit keys), instead of one 64-bit shared load
// (two wavefronts) per k-step and tile. Head rows (16 bytes per k-step) keep reading them from shared memory.
template <int P>
struct QueryRegisters {
  uint2 q[MmaShape<P>::kSteps];
};

// The scores of a tile and its softmax bookkeeping up to the weights: the value product's B operand p01 (head g at
// tokens 2r, 2r + 1) and p23 (8 + 2r, 9 + 2r) as half2, weights p n_v 2^-E. Token rows: lane (g, r) scores head r.
template <int P, int KB, int VB, bool TokenRows, bool Staged>
__device__ __forceinline__ void mma_scores(MmaTile<P, KB, VB, TokenRows>& tile, const std::uint8_t* staged,
                                           const unsigned char* query_fragments, const QueryRegisters<P>& qr,
                                           float query_scale, unsigned key_table, int lane, MmaState<P>& st,
                                           unsigned& p01, unsigned& p23) {
  constexpr int S = MmaShape<P>::kSteps;
  constexpr int N = MmaTile<P, KB, VB, TokenRows>::kNorms;  // scores per lane
  const int g = lane >> 2, r = lane & 3;
  const KeyLookup<P, KB, TokenRows> keys(tile.key, key_table, lane);
  float sc[N];
  if constexpr (PairedKeys<KB, TokenRows>::value) {
    // Remainder rows: one product per token row half. A row g: token g's fp16 centroids, row 8 + g: their fp16
    // remainders, at pairs 2 s (k-slots 2r, 2r + 1) and 2 s + 1 (2r + 8, 2r + 9): each {row g, row 8 + g} register
    // pair is one 64-bit load of the paired table (half the loads of separate value and remainder products, the same
    // number of products). s0: token g, s1: token 8 + g; c0 + c1 + c2 + c3 = (k_hi + k_lo)(q_hi + q_lo) of head r.
    float s0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const uint2 k00 = keys.pair(keys.address(0, 2 * s)), k01 = keys.pair(keys.address(0, 2 * s + 1));
      const uint2 k10 = keys.pair(keys.address(1, 2 * s)), k11 = keys.pair(keys.address(1, 2 * s + 1));
      const uint2 q = qr.q[s];
      mma_16816(s0, k00.x, k00.y, k01.x, k01.y, q.x, q.y);
      mma_16816(s1, k10.x, k10.y, k11.x, k11.y, q.x, q.y);
    }
    if constexpr (Staged) tile.load_staged_rest(staged, g, r);  // value words and both norms
    sc[0] = (s0[0] + s0[1]) + (s0[2] + s0[3]);
    sc[1] = (s1[0] + s1[1]) + (s1[2] + s1[3]);
  } else if constexpr (TokenRows) {
    // c0, c1 = token g, head r's value and remainder columns; c2, c3 = token 8 + g. The centroid and remainder
    // products accumulate in separate registers (two dependency chains instead of one).
    float s0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int s = 0; s < S; ++s) {
      // A rows g, 8 + g: tokens g and 8 + g at pairs 2 s (k-slots 2r, 2r + 1) and 2 s + 1 (2r + 8, 2r + 9)
      const unsigned e00 = keys.address(0, 2 * s), e01 = keys.address(0, 2 * s + 1);
      const unsigned e10 = keys.address(1, 2 * s), e11 = keys.address(1, 2 * s + 1);
      const uint2 q = qr.q[s];
      mma_16816(s0, shared_word(e00), shared_word(e10), shared_word(e01), shared_word(e11), q.x, q.y);
      mma_16816(s1, keys.remainder(e00), keys.remainder(e10), keys.remainder(e01), keys.remainder(e11), q.x, q.y);
    }
    if constexpr (Staged) tile.load_staged_rest(staged, g, r);  // value words and both norms
#pragma unroll
    for (int n = 0; n < 2; ++n) sc[n] = (s0[2 * n] + s0[2 * n + 1]) + (s1[2 * n] + s1[2 * n + 1]);
  } else {
    // head g at tokens 2r, 2r + 1 (n-tile 0) and 8 + 2r, 9 + 2r (n-tile 1)
    float s0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float t0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, t1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const unsigned e00 = keys.address(0, 2 * s), e01 = keys.address(0, 2 * s + 1);
      const unsigned e10 = keys.address(1, 2 * s), e11 = keys.address(1, 2 * s + 1);
      // A rows 0-7: the queries' fp16 values, rows 8-15: their fp16 remainders; B: the keys' fp16 centroids, then
      // their remainders (same A registers). C rows 0-7 + rows 8-15 = (q_hi + q_lo)(k_hi + k_lo) = q k to fp32.
      const uint4 q = *reinterpret_cast<const uint4*>(query_fragments + s * kFragmentStepBytes<KB, VB, false>);
      mma_16816(s0, q.x, q.y, q.z, q.w, shared_word(e00), shared_word(e01));
      mma_16816(s1, q.x, q.y, q.z, q.w, shared_word(e10), shared_word(e11));
      mma_16816(t0, q.x, q.y, q.z, q.w, keys.remainder(e00), keys.remainder(e01));
      mma_16816(t1, q.x, q.y, q.z, q.w, keys.remainder(e10), keys.remainder(e11));
    }
    if constexpr (Staged) tile.load_staged_rest(staged, g, r);
    sc[0] = (s0[0] + s0[2]) + (t0[0] + t0[2]);
    sc[1] = (s0[1] + s0[3]) + (t0[1] + t0[3]);
    sc[2] = (s1[0] + s1[2]) + (t1[0] + t1[2]);
    sc[3] = (s1[1] + s1[3]) + (t1[1] + t1[3]);
  }
#pragma unroll
  for (int n = 0; n < N; ++n) {
    sc[n] = tile.key_norm[n] == -INFINITY ? -INFINITY : sc[n] * (tile.key_norm[n] * query_scale);
  }

  // Lazy rescaling leaves most tiles' maxima and value scale as they are: the running maximum moves only when a score
  // exceeds it by more than kRescaleThreshold, the value scale only when a norm reaches 2^E. So each lane checks its
  // own scores and norms against them, and only when a lane of the warp finds one does the warp reduce the tile's
  // maxima and update (the same decisions as reducing on every tile: no lane over the limits means no head's tile
  // maximum over them). Most tiles then take a vote instead of the seven shuffles of the reductions.
  const float* const vn = tile.value_norm;
  float lane_max = fmaxf(sc[0], sc[1]), lane_value_max = fmaxf(vn[0], vn[1]);
  if constexpr (N == 4) {
    lane_max = fmaxf(lane_max, fmaxf(sc[N - 2], sc[N - 1]));
    lane_value_max = fmaxf(lane_value_max, fmaxf(vn[N - 2], vn[N - 1]));
  }
  if (__any_sync(kFullMask, lane_max > st.m_own + kRescaleThreshold ||
                                (lane_value_max > 0.0f && lane_value_max >= st.value_limit))) {
    // the tile maximum of the lane's own head over its 16 tokens (token rows: the 8 lanes of column r; head rows:
    // the quad), and of the accumulator heads 2r, 2r + 1 from their lanes (token rows: heads 4-7 are padding, lanes
    // r = 2, 3 take heads 0 and 1's maxima for their padding columns), and of the value norms
    float tile_max = lane_max, value_max = lane_value_max;
    using Own = OwnHead<TokenRows>;
#pragma unroll
    for (int x = Own::kFirstXor; x < Own::kEndXor; x *= 2) {
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, x));
    }
    const int lane_a = TokenRows ? 4 * g + ((2 * r) & 3) : 8 * r, lane_b = lane_a + (TokenRows ? 1 : 4);
    const float max_a = __shfl_sync(kFullMask, tile_max, lane_a), max_b = __shfl_sync(kFullMask, tile_max, lane_b);
#pragma unroll
    for (int x = Own::kFirstXor; x < Own::kEndXor; x *= 2) {
      value_max = fmaxf(value_max, __shfl_xor_sync(kFullMask, value_max, x));
    }
    // value_max is warp-uniform: the tile's 16 tokens

    if (tile_max > st.m_own + kRescaleThreshold) {
      st.l_own *= fast_exp2(st.m_own - tile_max);  // 0 while m_own is -inf
      st.m_own = tile_max;
    }
    float correction_a = 1.0f, correction_b = 1.0f;
    if (max_a > st.m_a + kRescaleThreshold) {
      correction_a = fast_exp2(st.m_a - max_a);
      st.m_a = max_a;
    }
    if (max_b > st.m_b + kRescaleThreshold) {
      correction_b = fast_exp2(st.m_b - max_b);
      st.m_b = max_b;
    }
    if (value_max > 0.0f) {
      const int e = exponent_bound(value_max);
      if (e > st.value_exponent) {  // warp-uniform
        const float shrink = st.value_exponent == kNoScale ? 0.0f : power_of_two(st.value_exponent - e);
        correction_a *= shrink;
        correction_b *= shrink;
        st.value_exponent = e;
        st.inverse_value_scale = power_of_two(-e);
        // e > E exactly when a norm v >= 2^E, for 2^E normal; below that, every positive norm takes this path
        st.value_limit = e < -125 ? 0.0f : power_of_two(e);
      }
    }
    if (__any_sync(kFullMask, correction_a != 1.0f || correction_b != 1.0f)) {
#pragma unroll
      for (int i = 0; i < S; ++i) {
        st.acc[i][0] *= correction_a;
        st.acc[i][1] *= correction_b;
        st.acc[i][2] *= correction_a;
        st.acc[i][3] *= correction_b;
      }
    }
  }
  float w[N];
#pragma unroll
  for (int n = 0; n < N; ++n) {
    const float p = st.m_own == -INFINITY ? 0.0f : fast_exp2(sc[n] - st.m_own);
    st.l_own += p;
    w[n] = p * (tile.value_norm[n] * st.inverse_value_scale);
  }
  if constexpr (TokenRows) {
    // head r at tokens g, 8 + g as one half2; lane (g, r) takes head g % 4's from lanes (2r, g % 4) (tokens 2r,
    // 8 + 2r) and (2r + 1, g % 4) (tokens 2r + 1, 9 + 2r); columns g >= 4 are padding
    const unsigned packed = pack_half2(w[0], w[1]);
    const int source = 8 * r + (g & 3);
    const unsigned x = __shfl_sync(kFullMask, packed, source), y = __shfl_sync(kFullMask, packed, source + 4);
    p01 = __byte_perm(x, y, 0x5410);
    p23 = __byte_perm(x, y, 0x7632);
  } else {
    p01 = pack_half2(w[0], w[1]);
    p23 = pack_half2(w[2], w[3]);
  }
}

template <int P, int KB, int VB, bool TokenRows, bool Staged>
__device__ __forceinline__ void mma_tile_step(MmaTile<P, KB, VB, TokenRows>& tile, const std::uint8_t* staged,
                                              const unsigned char* query_fragments, const QueryRegisters<P>& qr,
                                              float query_scale, unsigned key_table, unsigned value_table, int lane,
                                              MmaState<P>& st) {
  constexpr int S = MmaShape<P>::kSteps;
  unsigned p01, p23;
  mma_scores<P, KB, VB, TokenRows, Staged>(tile, staged, query_fragments, qr, query_scale, key_table, lane, st, p01,
                                           p23);
  // value product: A = V^T (rows: this lane's coordinates 2i, 2i + 1 of its slice; k: the tokens)
  const ValueLookup<P, VB, Planes<VB>::kSecond, CompactLayout<KB, VB>::value> values(tile.value, value_table, lane);
#pragma unroll
  for (int i = 0; i < S; ++i) {
    const unsigned a0 = shared_word(values.address(0, i, false)), a1 = shared_word(values.address(0, i, true));
    const unsigned a2 = shared_word(values.address(1, i, false)), a3 = shared_word(values.address(1, i, true));
    mma_16816(st.acc[i], a0, a1, a2, a3, p01, p23);
  }
}

// ---- tile staging (sm_90 bulk copies) ----------------------------------------------------------------
// A warp's tiles come through a ring of two shared-memory slots: while it computes tile k, tile k + 1 is in flight
// as bulk asynchronous copies (cp.async.bulk, one per array: key rows, value rows, key norms, value norms) that
// complete on the slot's mbarrier; one elected lane refills the slot with tile k + 2 once tile k's words are consumed.
// The global-load latency then overlaps the previous tile's work without prefetch registers. A tile is staged when it is
// whole, unmasked, contiguous (contiguous layout or pages of >= 16 tokens), has fp16 norms and 16-byte aligned
// sources; otherwise the warp loads it directly (MmaTile::load) as before.
__device__ __forceinline__ void barrier_init(unsigned barrier) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(barrier));
}

// The transaction count and the four bulk copies of one staged tile in one asm statement (slot offsets and sizes as
// immediates). Issued in an elect_one_sync() branch with warp-uniform operands (split_mma_kernel), so ptxas takes
// them from uniform registers without an elect loop per copy.
template <int KeyBytes, int ValueBytes, int ValuesAt, int KeyNormsAt, int ValueNormsAt, int TotalBytes>
__device__ __forceinline__ void bulk_copy_tile(unsigned slot, unsigned barrier, const void* keys, const void* values,
                                               const void* key_norms, const void* value_norms) {
  asm volatile(
      "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%1], %6;\n\t"
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%2], %7, [%1];\n\t"
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0+%8], [%3], %9, [%1];\n\t"
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0+%10], [%4], %12, [%1];\n\t"
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0+%11], [%5], %12, [%1];" ::"r"(slot),
      "r"(barrier), "l"(keys), "l"(values), "l"(key_norms), "l"(value_norms), "n"(TotalBytes), "n"(KeyBytes),
      "n"(ValuesAt), "n"(ValueBytes), "n"(KeyNormsAt), "n"(ValueNormsAt), "n"(2 * kTileTokens)
      : "memory");
}

__device__ __forceinline__ void barrier_wait(unsigned barrier, unsigned parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_again:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_again;\n"
      "}\n" ::"r"(barrier), "r"(parity) : "memory");
}

// Dynamic shared memory of split_mma_kernel<P, KB, VB>: the pair tables at a multiple of kTableSlot (so up to
// kTableSlot - 16 bytes of padding before them), the per-warp accumulators of the block merge aliased onto the tables
// (dead by then), the query fragments, softmax statistics and slot mbarriers ("misc") in the padding
// when they fit there, else after the tables, and the staging slots after both. The padding is known only on the
// device; on H100 the dynamic window starts 1 KB into the block's shared memory, so it is kExpectedPadding. kBytes
// reserves, by preference: the worst-case padding with the slots (kFull), else the expected padding with them (kLean:
// the kernel stages only when the slots fit behind the padding it finds), else the worst case without slots (kWorst,
// never staged); whichever fits MmaShape<P>::kMinBlocks blocks per multiprocessor (228 KB, 1 KB reserved per block).
// d = 128: K2/V2, K2/V3, K3/V2, K2/V4 and K4/V2 stage (kLean), K4/V3 and K3/V4 with one slot in the padding
// (kPaddingSlots), K4/V4 with two when the score product has token rows (its query fragments take 2 KB of the padding
// instead of 4), K3/V3 in the CompactLayout; K4/V4 with head rows does not stage.
//
// CompactLayout (K3/V3): the two byte-addressed tables (32 KB) at a multiple of kByteEntryBytes (padding <= 240
// bytes, 0 on H100), the query fragments in the value table's holes (fragment_offset, kFragmentStepBytes: 2 or 4
// holes per k-step), then the slot mbarriers (one hole) when a hole is left, the block
// merge's accumulators over the key table and its statistics behind them (both after the tile loop), anything that
// does not fit there ("outside": d = 256) after the tables, then the slots: 32 + 12.5 KB at d = 128, 5 blocks per SM.
template <int P, int KB, int VB, bool TokenRows>
struct SplitMmaShared {
  static constexpr bool kCompact = CompactLayout<KB, VB>::value;
  static constexpr int kAccumulatorBytes = kSplitWarps * kMmaHeads * P * 4;
  static constexpr int kTables = kCompact ? 2 * 64 * kByteEntryBytes : kTableBytes;
  static constexpr int kRegionBytes = kAccumulatorBytes > kTables ? kAccumulatorBytes : kTables;
  static constexpr int kFragmentBytes = MmaShape<P>::kSteps * 32 * kFragmentLaneBytes<TokenRows>;
  static constexpr int kStatisticsBytes = 2 * kSplitWarps * kMmaHeads * 4;
  static constexpr int kBarrierBytes = 2 * kSplitWarps * 8;
  // OR-addressed layout: misc
  static constexpr int kBarrierOffset = kFragmentBytes + kStatisticsBytes;
  static constexpr int kMiscBytes = kBarrierOffset + kBarrierBytes;
  // CompactLayout: holes and outside
  static constexpr int kFragmentHoles = kFragmentBytes / kHoleBytes;
  static constexpr bool kSlotMiscInHoles = kFragmentHoles + 1 <= kHoles;
  static constexpr bool kStatisticsInRegion = kAccumulatorBytes + kStatisticsBytes <= kRegionBytes;
  static constexpr int kOutsideBytes = (kSlotMiscInHoles ? 0 : kBarrierBytes) +
                                       (kStatisticsInRegion ? 0 : kStatisticsBytes);
  static_assert(!kCompact || (kFragmentHoles <= kHoles && kBarrierBytes <= kHoleBytes),
                "the query fragments and mbarriers fit the holes");

  static constexpr int kSlotBytes = (TileBytes<P, KB, VB>::kStagedBytes + 15) / 16 * 16;
  static constexpr int kExpectedPadding = kCompact ? 0 : kTableSlot - 1024;
  static constexpr int kBudget = 228 * 1024 / MmaShape<P>::kMinBlocks - 1024;
  // OR-addressed layout: when all the slots after the tables do not fit the budget, the fewest (1 or 2) that make
  // them fit go into the padding behind misc when they fit there (d = 128: K4/V3, K3/V4 one, K4/V4 with token rows
  // two): the second slots of the last warps (slot_address).
  static constexpr bool SlotsFit(int n) {
    return kMiscBytes + n * kSlotBytes <= kExpectedPadding &&
           kExpectedPadding + kRegionBytes + (2 * kSplitWarps - n) * kSlotBytes <= kBudget;
  }
  static constexpr int kPaddingSlots = kCompact || SlotsFit(0) ? 0 : SlotsFit(1) ? 1 : SlotsFit(2) ? 2 : 0;
  static constexpr int kStageBytes = (2 * kSplitWarps - kPaddingSlots) * kSlotBytes;  // after the tables
  static constexpr int kMaxPadding = kCompact ? kByteEntryBytes - 16 : kTableSlot - 16;
  static constexpr int kFixed = kCompact ? kRegionBytes + kOutsideBytes : kRegionBytes + kMiscBytes;
  static constexpr int kWorst = kMaxPadding + kFixed;
  static constexpr int kFull = kWorst + kStageBytes;
  static constexpr int kLean =
      kCompact ? kExpectedPadding + kFixed + kStageBytes
               : kExpectedPadding + kRegionBytes + (kMiscBytes <= kExpectedPadding ? 0 : kMiscBytes) + kStageBytes;
  static constexpr int kBytes = kFull <= kBudget ? kFull : kLean <= kBudget && kLean >= kWorst ? kLean : kWorst;
  static constexpr bool kStaged = kBytes != kWorst;
};

// Whether a warp's whole tiles of sequence b, KV head h can be staged (warp-uniform, once per warp): no mask, fp16
// norms, rows contiguous within a tile, 16-byte aligned sources. Contiguous rows of one (b, h) advance by whole
// tiles (16 rows, a multiple of 16 bytes), and paged rows start at multiples of 16 within 16-row aligned pages, so the
// first tile's alignment is every tile's.
template <int P, int KB, int VB>
__device__ __forceinline__ bool tiles_stageable(const KernelArgs& a, int b, int h, int first) {
  using Tile = TileBytes<P, KB, VB>;
  if (a.code_mask || (a.block_table && a.block_shift < 4) || a.norm_bytes != 2) return false;
  const std::int64_t row0 = a.block_table ? 0 : code_row(a, b, h, first);
  const std::uintptr_t alignment = reinterpret_cast<std::uintptr_t>(a.key_indices + row0 * Tile::kKeyBytes) |
                                   reinterpret_cast<std::uintptr_t>(a.value_indices + row0 * Tile::kValueBytes) |
                                   reinterpret_cast<std::uintptr_t>(a.key_norms + row0 * 2) |
                                   reinterpret_cast<std::uintptr_t>(a.value_norms + row0 * 2);
  return (alignment & 15u) == 0;
}

// The addresses of a tile's four arrays at its first row (global memory).
struct TileSources {
  const std::uint8_t* keys;
  const std::uint8_t* values;
  const std::uint8_t* key_norms;
  const std::uint8_t* value_norms;
};

template <int P, int KB, int VB>
__device__ __forceinline__ TileSources tile_sources(const KernelArgs& a, int b, int h, int base) {
  using Tile = TileBytes<P, KB, VB>;
  const std::int64_t row0 = code_row(a, b, h, base);
  return {a.key_indices + row0 * Tile::kKeyBytes, a.value_indices + row0 * Tile::kValueBytes, a.key_norms + row0 * 2,
          a.value_norms + row0 * 2};
}

// One lane (elect_one_sync) issues the bulk copies of the tile at `sources` into the slot at shared address `slot`.
template <int P, int KB, int VB>
__device__ __forceinline__ void stage_tile(const TileSources& sources, unsigned slot, unsigned barrier) {
  using Tile = TileBytes<P, KB, VB>;
  static_assert(Tile::kStagedKeys == 0 && Tile::kStagedValueNorms == Tile::kStagedKeyNorms + 2 * kTileTokens,
                "bulk_copy_tile's slot layout");
  bulk_copy_tile<kTileTokens * Tile::kKeyBytes, kTileTokens * Tile::kValueBytes, Tile::kStagedValues,
                 Tile::kStagedKeyNorms, Tile::kStagedValueNorms, Tile::kStagedBytes>(
      slot, barrier, sources.keys, sources.values, sources.key_norms, sources.value_norms);
}

// Contiguous layout: brings the tile at `sources` into L2 (cp.async.bulk.prefetch, one lane), where the kernel may not
// read it yet (before griddepcontrol.wait: the previous kernel may still write the call's inputs; L2 is the point of
// coherence, so a line prefetched early is still updated by those writes).
template <int P, int KB, int VB>
__device__ __forceinline__ void prefetch_tile(const TileSources& sources) {
  using Tile = TileBytes<P, KB, VB>;
  asm volatile(
      "cp.async.bulk.prefetch.L2.global [%0], %4;\n\t"
      "cp.async.bulk.prefetch.L2.global [%1], %5;\n\t"
      "cp.async.bulk.prefetch.L2.global [%2], %6;\n\t"
      "cp.async.bulk.prefetch.L2.global [%3], %6;" ::"l"(sources.keys),
      "l"(sources.values), "l"(sources.key_norms), "l"(sources.value_norms), "n"(kTileTokens * Tile::kKeyBytes),
      "n"(kTileTokens * Tile::kValueBytes), "n"(2 * kTileTokens)
      : "memory");
}

// Contiguous layout: the sources of a warp's next tile to stage, advanced by the warps' tile stride per copy. Kept
// warp-uniform (it derives from the kernel arguments, the block index, the broadcast warp index and the broadcast
// length only), so ptxas holds it in uniform registers and the copies take it without moving it there. Advanced as
// addresses (integers): past the last tile, and from the empty cursor of a paged layout, it is never dereferenced.
template <int P, int KB, int VB>
__device__ __forceinline__ void advance_sources(TileSources& sources) {
  using Tile = TileBytes<P, KB, VB>;
  constexpr std::uintptr_t kRows = kSplitWarps * kTileTokens;
  const auto advance = [](const std::uint8_t*& p, std::uintptr_t bytes) {
    p = reinterpret_cast<const std::uint8_t*>(reinterpret_cast<std::uintptr_t>(p) + bytes);
  };
  advance(sources.keys, kRows * Tile::kKeyBytes);
  advance(sources.values, kRows * Tile::kValueBytes);
  advance(sources.key_norms, kRows * 2);
  advance(sources.value_norms, kRows * 2);
}

// One lane of a converged warp (elect.sync): ptxas knows that exactly one thread runs the branch, so the bulk copies
// inside take their operands as they are (uniform registers, or one move each) instead of an elect loop per copy
// that serves every active lane in turn.
__device__ __forceinline__ bool elect_one_sync() {
  unsigned elected;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "elect.sync _|p, 0xffffffff;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(elected));
  return elected != 0u;
}

// ---- the query rotation inside the split kernel (KernelArgs::fused_rotation) ----------------------------

// Identity, hadamard, planar and quat keys with 8-byte aligned float16 / bfloat16 queries: the split kernel rotates
// the queries itself, and the host launches prepare only when a full-precision window needs its q_raw (the split
// kernel then does not wait for it before its tiles). Warp w rotates the chunk's heads w and w + 4 (token rows: heads
// 0-3 only), lane l holding the quads l + 32 c (coordinates 4 (l + 32 c) .. + 3), with prepare_queries_kernel's
// operations in its order (butterfly strides ascending, the same roundings), so q_rot is prepare's bit for bit; the
// fragments and power-of-two scales are then those of the prepared path. The raw loads are issued before the pair
// tables are filled (RawQueries), so their latency overlaps the fill.
template <int P, bool TokenRows>
struct RawQueries {
  static constexpr int kQuads = P / 4;                       // quads of one head
  static constexpr int kLaneQuads = (kQuads + 31) / 32;      // quads per lane (d = 64: lanes 16-31 hold none)
  static constexpr int kHeads = TokenRows ? 4 : kMmaHeads;   // heads a chunk can hold
  static constexpr int kWarpHeads = kHeads / kSplitWarps;    // heads per warp
  uint2 raw[kWarpHeads][kLaneQuads];  // 4 half / bfloat16 values per quad

  __device__ __forceinline__ void load(const KernelArgs& a, int b, int hq0, int nh, int warp, int lane) {
#pragma unroll
    for (int c = 0; c < kLaneQuads; ++c) {
      const int quad = lane + 32 * c;
      const bool lane_quad = quad < kQuads;
#pragma unroll
      for (int k = 0; k < kWarpHeads; ++k) {
        const int hh = warp + kSplitWarps * k;
        const std::int64_t row = static_cast<std::int64_t>(b) * a.q_heads + hq0 + hh;
        raw[k][c] = hh < nh && lane_quad ? __ldg(reinterpret_cast<const uint2*>(
                                               static_cast<const std::uint16_t*>(a.queries) + row * P) + quad)
                                         : make_uint2(0u, 0u);
      }
    }
  }
};

__device__ __forceinline__ float query_value(unsigned bits, int dtype) {  // a half / bfloat16 in the low 16 bits
  const unsigned short u = static_cast<unsigned short>(bits & 0xFFFFu);
  return dtype == kF16 ? __half2float(__ushort_as_half(u)) : __bfloat162float(__ushort_as_bfloat16(u));
}

// One k x k block (k = 2, 4, row-major at `block`) applied to v[0 .. k) as prepare's chain: out_i = fmaf(B[i][k-1],
// v[k-1], ... fmaf(B[i][0], v[0], 0)).
template <int K>
__device__ __forceinline__ void rotate_block(const float* block, float* v) {
  float out[K];
#pragma unroll
  for (int i = 0; i < K; ++i) {
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) acc = fmaf(__ldg(block + i * K + k), v[k], acc);
    out[i] = acc;
  }
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = out[i];
}

// Rotates the warp's heads and writes their fragments (as the prepared path's warp 0 does) and scales[head] (the
// prepared path's query_scale of that head); the caller's __syncthreads() publishes both.
template <int P, int KB, int VB, bool TokenRows>
__device__ __forceinline__ void rotate_query_fragments(const KernelArgs& a, const RawQueries<P, TokenRows>& q, int h,
                                                       int nh, int warp, int lane, unsigned char* fragments,
                                                       float* scales) {
  using Raw = RawQueries<P, TokenRows>;
  constexpr int QL = Raw::kLaneQuads;
  constexpr int kStepQuads = P / 16;  // quads of one quarter r of a head: one per k-step
#pragma unroll
  for (int k = 0; k < Raw::kWarpHeads; ++k) {
    const int hh = warp + kSplitWarps * k;
    float v[QL][4];
#pragma unroll
    for (int c = 0; c < QL; ++c) {
      const int quad = lane + 32 * c;
      v[c][0] = query_value(q.raw[k][c].x, a.queries_dtype);
      v[c][1] = query_value(q.raw[k][c].x >> 16, a.queries_dtype);
      v[c][2] = query_value(q.raw[k][c].y, a.queries_dtype);
      v[c][3] = query_value(q.raw[k][c].y >> 16, a.queries_dtype);
      if (a.key_scales && quad < Raw::kQuads) {
#pragma unroll
        for (int t = 0; t < 4; ++t) v[c][t] *= __ldg(a.key_scales + h * P + 4 * quad + t);
      }
    }
    if (a.kind == kHadamard) {
#pragma unroll
      for (int c = 0; c < QL; ++c) {
        // the signs of the lane's quad (d = 64: lanes 16-31 read quad lane - 16's, for zeros); loaded here, not with
        // the raw queries: held across the table fill they cost the K2/V2 kernel 20 bytes of spills in its tile loop
        const float4 sign = __ldg(reinterpret_cast<const float4*>(a.key_rotation + h * a.key_rotation_floats) +
                                  (lane + 32 * c) % Raw::kQuads);
        v[c][0] *= sign.x;
        v[c][1] *= sign.y;
        v[c][2] *= sign.z;
        v[c][3] *= sign.w;
#pragma unroll
        for (int stride = 1; stride < 4; stride <<= 1) {  // strides 1, 2: inside the quad
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            if ((t & stride) == 0) {
              const float x = v[c][t], y = v[c][t + stride];
              v[c][t] = __fadd_rn(x, y);
              v[c][t + stride] = __fsub_rn(x, y);
            }
          }
        }
      }
#pragma unroll
      for (int x = 1; x < 32 && x < Raw::kQuads; x <<= 1) {  // strides 4 .. 64: across lanes
#pragma unroll
        for (int c = 0; c < QL; ++c)
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            const float partner = __shfl_xor_sync(kFullMask, v[c][t], x);
            v[c][t] = (lane & x) ? __fsub_rn(partner, v[c][t]) : __fadd_rn(v[c][t], partner);
          }
      }
      if constexpr (QL == 2) {  // stride 128 (d = 256): between the lane's two quads
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          const float x = v[0][t], y = v[1][t];
          v[0][t] = __fadd_rn(x, y);
          v[1][t] = __fsub_rn(x, y);
        }
      }
#pragma unroll
      for (int c = 0; c < QL; ++c)
#pragma unroll
        for (int t = 0; t < 4; ++t) v[c][t] *= a.hadamard_scale;
    } else if (a.kind == kPlanar || a.kind == kQuat) {
      const float* rotation = a.key_rotation + h * a.key_rotation_floats;
#pragma unroll
      for (int c = 0; c < QL; ++c) {
        const int quad = lane + 32 * c;
        if (quad < Raw::kQuads) {
          if (a.kind == kPlanar) {
            rotate_block<2>(rotation + 4 * (2 * quad), v[c]);
            rotate_block<2>(rotation + 4 * (2 * quad + 1), v[c] + 2);
          } else {
            rotate_block<4>(rotation + 16 * quad, v[c]);
          }
        }
      }
    }
    float largest = 0.0f;
#pragma unroll
    for (int c = 0; c < QL; ++c)
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        v[c][t] *= a.scale_log2;
        largest = fmaxf(largest, fabsf(v[c][t]));
      }
#pragma unroll
    for (int x = 16; x > 0; x >>= 1) largest = fmaxf(largest, __shfl_xor_sync(kFullMask, largest, x));
    float query_scale = 1.0f, shrink = 1.0f;
    if (largest > 0.0f) {
      const int e = exponent_bound(largest);
      query_scale = power_of_two(e);
      shrink = power_of_two(-e);
    }
#pragma unroll
    for (int c = 0; c < QL; ++c) {
      const int quad = lane + 32 * c;
      if (quad < Raw::kQuads) {
        const int r = quad / kStepQuads, step = quad - r * kStepQuads;
        unsigned hi[2], lo[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float x0 = v[c][2 * half] * shrink, x1 = v[c][2 * half + 1] * shrink;
          const __half h0 = __float2half_rn(x0), h1 = __float2half_rn(x1);
          hi[half] = pack_half2(__half2float(h0), __half2float(h1));
          lo[half] = pack_half2(x0 - __half2float(h0), x1 - __half2float(h1));
        }
        const int offset = step * kFragmentStepBytes<KB, VB, TokenRows>;
        if constexpr (TokenRows) {
          *reinterpret_cast<uint2*>(fragments + fragment_offset<KB, VB, true>(8 * hh + r) + offset) =
              make_uint2(hi[0], hi[1]);
          *reinterpret_cast<uint2*>(fragments + fragment_offset<KB, VB, true>(8 * hh + r + 4) + offset) =
              make_uint2(lo[0], lo[1]);
        } else {
          *reinterpret_cast<uint4*>(fragments + fragment_offset<KB, VB, false>(4 * hh + r) + offset) =
              make_uint4(hi[0], lo[0], hi[1], lo[1]);
        }
      }
    }
    if (lane == 0) scales[hh] = query_scale;
  }
}

template <int P, int KB, int VB, bool TokenRows>
__global__ void __launch_bounds__(kSplitWarps * 32, MmaShape<P>::kMinBlocks) split_mma_kernel(KernelArgs a) {
  constexpr int S = MmaShape<P>::kSteps;
  constexpr int G = kMmaHeads;
  using Shared = SplitMmaShared<P, KB, VB, TokenRows>;
  using Tile = MmaTile<P, KB, VB, TokenRows>;
  static_assert(Tile::kStagedKeyNorms % 16 == 0 && Tile::kStagedValues % 16 == 0,
                "bulk copies need 16-byte aligned destinations");
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const unsigned shared_base = static_cast<unsigned>(__cvta_generic_to_shared(shared_bytes));
  // multiple of 16
  const unsigned padding = (0u - shared_base) & (Shared::kCompact ? kByteEntryBytes - 1 : kTableSlot - 1);
  unsigned char* const region = shared_bytes + padding;
  unsigned* const pair_tables = reinterpret_cast<unsigned*>(region);
  auto shared_acc = reinterpret_cast<float (*)[G][P]>(region);  // after the tile loop only
  // the warp index broadcast from lane 0: warp-uniform to the compiler too (uniform registers for the staging)
  const int lane = threadIdx.x & 31, warp = __shfl_sync(kFullMask, threadIdx.x >> 5, 0);
  unsigned char* fragments;  // the first query fragment (or hole)
  unsigned char *statistics, *barrier_bytes;
  unsigned stage_offset;
  if constexpr (Shared::kCompact) {
    unsigned char* const holes = region + kValueOffset + kHoleBytes;  // hole k at holes + 256 k
    unsigned char* const outside = region + Shared::kRegionBytes;
    fragments = holes;
    barrier_bytes = Shared::kSlotMiscInHoles ? holes + kByteEntryBytes * Shared::kFragmentHoles : outside;
    statistics = Shared::kStatisticsInRegion
                     ? region + Shared::kAccumulatorBytes
                     : outside + (Shared::kSlotMiscInHoles ? 0 : Shared::kBarrierBytes);
    stage_offset = padding + Shared::kRegionBytes + Shared::kOutsideBytes;
  } else {
    const bool misc_in_padding = padding >= Shared::kMiscBytes;
    unsigned char* const misc = misc_in_padding ? shared_bytes : region + Shared::kRegionBytes;
    fragments = misc;
    statistics = misc + Shared::kFragmentBytes;
    barrier_bytes = misc + Shared::kBarrierOffset;
    stage_offset = padding + Shared::kRegionBytes + (misc_in_padding ? 0 : Shared::kMiscBytes);
  }
  // block-uniform; with a slot in the padding, the padding found must hold misc and that slot too
  const bool staging = Shared::kStaged && stage_offset + Shared::kStageBytes <= Shared::kBytes &&
                       (Shared::kPaddingSlots == 0 ||
                        padding >= Shared::kMiscBytes + Shared::kPaddingSlots * Shared::kSlotBytes);
  auto shared_m = reinterpret_cast<float (*)[G]>(statistics);
  auto shared_l = reinterpret_cast<float (*)[G]>(statistics + kSplitWarps * G * 4);

  const int g = lane >> 2, r = lane & 3;
  const int b = blockIdx.z;
  const int h = blockIdx.y / a.head_chunks, chunk = blockIdx.y - h * a.head_chunks;
  const int split = blockIdx.x;
  const int hq0 = h * a.group + chunk * a.chunk_heads;
  const int nh = min(a.chunk_heads, a.group - chunk * a.chunk_heads);
  // The call's inputs this prologue reads: the sequence's length and (fused rotation) the raw queries. Without prepare
  // this kernel is a programmatic dependent of whatever kernel precedes it in the stream (attention_split.cu): the pair
  // tables and the mbarriers (shared memory and the constant centroids) are set up while that kernel ends, and the
  // inputs, which it may have written, are read after griddepcontrol.wait; global memory is written only long after
  // it (the workspace may be the previous call's, which that call's combine may still read). With prepare (launched
  // plainly, so every earlier kernel is complete) the inputs are read first and their latency overlaps the table fill.
  const bool after_previous = !prepare_launched(a);
  int loaded_length = 0;
  RawQueries<P, TokenRows> raw_queries;
  const auto load_inputs = [&] {
    loaded_length = a.code_lengths ? min(__ldg(a.code_lengths + blockIdx.z), a.max_code_length) : 0;
    if (a.fused_rotation) raw_queries.load(a, b, hq0, nh, warp, lane);
  };
  if (!after_previous) load_inputs();
  fill_pair_tables<KB, VB, TokenRows>(pair_tables, a.centroids);
  // OR-addressed tables: the base ORed with the lane's copy offset; byte-addressed ones: the base alone
  const unsigned lane_bits = threadIdx.x & 31;
  const unsigned key_table = ByteTable<KB>::value ? shared_base + padding
                                                  : (shared_base + padding) |
                                                        ((lane_bits & (PairCopies<KB>::value - 1)) << 2);
  const unsigned value_table =
      Shared::kCompact ? shared_base + padding + kValueOffset
                       : (shared_base + padding + kValueOffset) | ((lane_bits & (PairCopies<VB>::value - 1)) << 2);
  // The byte-addressed tables sit 8 KB (kTableSlot; CompactLayout: 1 KB) into the block's shared memory where 1 KB is
  // reserved before the dynamic window (sm_80 - sm_90), far from a 64 KB boundary; the host checks the reserved size
  // (DeviceDecodeAttention), this is the device's own guard against a silent wrong address.
  if (ByteTable<KB>::value && !byte_table_fits(key_table)) __trap();
  if (Shared::kCompact && !byte_table_fits(value_table)) __trap();
  // this warp's two mbarriers
  const unsigned barriers = static_cast<unsigned>(__cvta_generic_to_shared(barrier_bytes)) + 16 * warp;
  // this warp's two staging slots (shared addresses): slot s of warp w at position s kSplitWarps + w after the tables,
  // except the second slots of the last kPaddingSlots warps, which lie behind misc in the padding
  constexpr int kFirstInPadding = kSplitWarps - Shared::kPaddingSlots;
  const unsigned slot_base = shared_base + stage_offset + warp * Shared::kSlotBytes;
  const auto slot_address = [&](int s) -> unsigned {
    if constexpr (Shared::kPaddingSlots > 0) {
      if (s == 1 && warp >= kFirstInPadding) {
        return shared_base + Shared::kMiscBytes + (warp - kFirstInPadding) * Shared::kSlotBytes;
      }
    }
    return slot_base + s * kSplitWarps * Shared::kSlotBytes;
  };
  if (staging) {
    if (lane == 0) {
      barrier_init(barriers);
      barrier_init(barriers + 8);
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
  }
  if (after_previous) {
    // the warp's first two tiles (rows below max_code_length are addressable: DecodeAttentionArgs) into L2 meanwhile
    const int first = split * a.tokens_per_split + warp * kTileTokens;
    const int bound = min(split * a.tokens_per_split + a.tokens_per_split, a.max_code_length);
    if (staging && !a.block_table && tiles_stageable<P, KB, VB>(a, b, h, first) && elect_one_sync()) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int base = first + s * kSplitWarps * kTileTokens;
        if (base + kTileTokens <= bound) prefetch_tile<P, KB, VB>(tile_sources<P, KB, VB>(a, b, h, base));
      }
    }
    grid_dependency_wait();
    load_inputs();
  }

  // Query fragments. Lane (g, r) reads head g's coordinates [r P / 4, (r + 1) P / 4), scaled by 2^-e to |q| < 1, and
  // warp 0 writes them to shared memory (every warp of the block uses the same ones; one 8- or 16-byte read per step
  // instead of P / 4 registers): token rows: head g is B column 2 g (fp16 values) and 2 g + 1 (their fp16
  // remainders), per k-step {pair 2 s, pair 2 s + 1} of lanes (2 g, r) and (2 g + 1, r); head rows: per k-step the
  // lane's own A quad {hi(pair 2 s), lo(pair 2 s), hi(pair 2 s + 1), lo(pair 2 s + 1)}.
  const unsigned char* const query_fragments = fragments + fragment_offset<KB, VB, TokenRows>(lane);
  float query_scale = 1.0f;  // of the lane's own head (token rows: head r, head rows: head g)
  // fused rotation: the heads' scales, published by the barrier below (prologue only: statistics when they do not lie
  // over the tables, else the barrier hole's second half)
  static_assert(!(Shared::kCompact && Shared::kStatisticsInRegion) ||
                    (Shared::kSlotMiscInHoles && Shared::kBarrierBytes + kMmaHeads * 4 <= kHoleBytes),
                "the fused rotation's scales fit next to the mbarriers");
  float* const scales = reinterpret_cast<float*>(
      Shared::kCompact && Shared::kStatisticsInRegion ? barrier_bytes + Shared::kBarrierBytes : statistics);
  if (a.fused_rotation) {
    rotate_query_fragments<P, KB, VB, TokenRows>(a, raw_queries, h, nh, warp, lane, fragments, scales);
  } else {
    // launched as a programmatic dependent of prepare_queries_kernel: everything above overlaps it; its q_rot is read
    // below
    grid_dependency_wait();
    float q[P / 4];
    const float* row = a.q_rot + (static_cast<std::int64_t>(b) * a.q_heads + hq0 + (g < nh ? g : 0)) * P +
                       r * (P / 4);
    float largest = 0.0f;
#pragma unroll
    for (int c4 = 0; c4 < P / 16; ++c4) {
      const float4 v = g < nh ? *reinterpret_cast<const float4*>(row + 4 * c4) : make_float4(0.f, 0.f, 0.f, 0.f);
      q[4 * c4] = v.x;
      q[4 * c4 + 1] = v.y;
      q[4 * c4 + 2] = v.z;
      q[4 * c4 + 3] = v.w;
      largest = fmaxf(largest, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    }
    largest = fmaxf(largest, __shfl_xor_sync(kFullMask, largest, 1));
    largest = fmaxf(largest, __shfl_xor_sync(kFullMask, largest, 2));
    float shrink = 1.0f;
    if (largest > 0.0f) {
      const int e = exponent_bound(largest);
      query_scale = power_of_two(e);
      shrink = power_of_two(-e);
    }
    if constexpr (TokenRows) query_scale = __shfl_sync(kFullMask, query_scale, 4 * r);  // head r's, from lane (r, 0)
    if (warp == 0 && (!TokenRows || g < 4)) {
      unsigned char* const hi_fragment =
          fragments + fragment_offset<KB, VB, TokenRows>(TokenRows ? 8 * g + r : lane);  // lane (2 g, r) or own
      unsigned char* const lo_fragment = fragments + fragment_offset<KB, VB, TokenRows>(8 * g + r + 4);
#pragma unroll
      for (int step = 0; step < S; ++step) {
        unsigned hi[2], lo[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float x0 = q[4 * step + 2 * half] * shrink, x1 = q[4 * step + 2 * half + 1] * shrink;
          const __half h0 = __float2half_rn(x0), h1 = __float2half_rn(x1);
          hi[half] = pack_half2(__half2float(h0), __half2float(h1));
          lo[half] = pack_half2(x0 - __half2float(h0), x1 - __half2float(h1));
        }
        const int offset = step * kFragmentStepBytes<KB, VB, TokenRows>;
        if constexpr (TokenRows) {
          *reinterpret_cast<uint2*>(hi_fragment + offset) = make_uint2(hi[0], hi[1]);
          *reinterpret_cast<uint2*>(lo_fragment + offset) = make_uint2(lo[0], lo[1]);
        } else {
          *reinterpret_cast<uint4*>(hi_fragment + offset) = make_uint4(hi[0], lo[0], hi[1], lo[1]);
        }
      }
    }
  }
  __syncthreads();
  if (a.fused_rotation) query_scale = scales[TokenRows ? r : g];

  QueryRegisters<P> qr;  // token rows (below); unused with head rows
  if constexpr (TokenRows) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      qr.q[s] = *reinterpret_cast<const uint2*>(query_fragments + s * kFragmentStepBytes<KB, VB, true>);
    }
  }
  MmaState<P> st;
  st.m_own = st.m_a = st.m_b = -INFINITY;
  st.l_own = 0.0f;
  st.value_exponent = kNoScale;
  st.inverse_value_scale = 0.0f;
  st.value_limit = 0.0f;
#pragma unroll
  for (int i = 0; i < S; ++i) st.acc[i][0] = st.acc[i][1] = st.acc[i][2] = st.acc[i][3] = 0.0f;

  // broadcast: warp-uniform to the compiler, so is the tile loop (and the staging state in it)
  const int length = __shfl_sync(kFullMask, loaded_length, 0);
  const int begin = split * a.tokens_per_split;
  const int end = min(begin + a.tokens_per_split, length);
  constexpr int kStride = kSplitWarps * kTileTokens;
  // One tile at a time: measured on H100 (B = 32, 32K, K3/V3) 13% faster than keeping the next tile's loads in
  // flight, which costs ~40 registers and so one block per SM (4 vs 3 blocks of 4 warps); the latency is hidden by
  // more warps instead (5 blocks per SM at d <= 128, 96 registers).
  if (staging) {
    // ring of two slots: tile k in slot k & 1; staged_bits bit s: slot s holds a staged tile, parity_bits bit s: the
    // parity of slot s's next mbarrier phase
    const int first = begin + warp * kTileTokens;
    const bool stageable = tiles_stageable<P, KB, VB>(a, b, h, first);
    unsigned staged_bits = 0u, parity_bits = 0u;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int base = first + s * kStride;
      if (stageable && base + kTileTokens <= end) {
        if (elect_one_sync()) {
          stage_tile<P, KB, VB>(tile_sources<P, KB, VB>(a, b, h, base), slot_address(s), barriers + 8 * s);
        }
        staged_bits |= 1u << s;
      }
    }
    // contiguous layout: the sources of the next copy (paged layouts read the block table per copy)
    TileSources sources = a.block_table ? TileSources{} : tile_sources<P, KB, VB>(a, b, h, first + 2 * kStride);
    int slot = 0;
    for (int base = first; base < end; base += kStride, slot ^= 1) {
      Tile tile;
      const std::uint8_t* staged = nullptr;
      if (staged_bits & (1u << slot)) {
        barrier_wait(barriers + 8 * slot, (parity_bits >> slot) & 1u);
        parity_bits ^= 1u << slot;
        staged = shared_bytes + (slot_address(slot) - shared_base);
        tile.load_staged_keys(staged, g, r);
        mma_tile_step<P, KB, VB, TokenRows, true>(tile, staged, query_fragments, qr, query_scale, key_table,
                                                  value_table, lane, st);
      } else {
        tile.load(a, b, h, base, end, g, r);
        mma_tile_step<P, KB, VB, TokenRows, false>(tile, nullptr, query_fragments, qr, query_scale, key_table,
                                                   value_table, lane, st);
      }
      // the slot's words are consumed (every lane's reads precede the elected lane's next bulk copy into it)
      staged_bits &= ~(1u << slot);
      const int next = base + 2 * kStride;
      if (stageable && next + kTileTokens <= end) {
        __syncwarp();
        if (elect_one_sync()) {
          asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
          if (a.block_table) {
            stage_tile<P, KB, VB>(tile_sources<P, KB, VB>(a, b, h, next), slot_address(slot), barriers + 8 * slot);
          } else {
            stage_tile<P, KB, VB>(sources, slot_address(slot), barriers + 8 * slot);
          }
        }
        advance_sources<P, KB, VB>(sources);
        staged_bits |= 1u << slot;
      }
    }
  } else {
    for (int base = begin + warp * kTileTokens; base < end; base += kStride) {
      Tile tile;
      tile.load(a, b, h, base, end, g, r);
      mma_tile_step<P, KB, VB, TokenRows, false>(tile, nullptr, query_fragments, qr, query_scale, key_table,
                                                 value_table, lane, st);
    }
  }

  // With the fused rotation and a full-precision window this kernel never waited for prepare: it does here, so that
  // prepare (the window's q_raw) is complete when this grid is (a no-op otherwise: done, or not a dependent launch).
  grid_dependency_wait();
  grid_dependents_launch();  // the combine launch may be scheduled (it waits for this grid's partials)

  // the own head's sum over its lanes (token rows: column r's 8 lanes; head rows: the quad); the accumulator
  // columns (heads 2r, 2r + 1) times 2^E
  using Own = OwnHead<TokenRows>;
#pragma unroll
  for (int x = Own::kFirstXor; x < Own::kEndXor; x *= 2) st.l_own += __shfl_xor_sync(kFullMask, st.l_own, x);
  __syncthreads();  // shared_acc overwrites the pair tables: every warp is past its last tile
  if (Own::first(g, r)) {
    shared_m[warp][Own::head(g, r)] = st.m_own;
    shared_l[warp][Own::head(g, r)] = st.l_own;
  }
  const float value_scale = st.value_exponent == kNoScale ? 0.0f : power_of_two(st.value_exponent);
#pragma unroll
  for (int i = 0; i < S; ++i) {  // coordinates j, j + 1 of heads 2 r and 2 r + 1: one 8-byte store per head
    const int j = g * (P / 8) + 2 * i;
    *reinterpret_cast<float2*>(&shared_acc[warp][2 * r][j]) =
        make_float2(st.acc[i][0] * value_scale, st.acc[i][2] * value_scale);
    *reinterpret_cast<float2*>(&shared_acc[warp][2 * r + 1][j]) =
        make_float2(st.acc[i][1] * value_scale, st.acc[i][3] * value_scale);
  }
  __syncthreads();
  write_block_partials<P, G>(a, shared_m, shared_l, shared_acc, b, hq0, nh, split);
  if (split == 0 && a.fp_lengths == nullptr) {
    // no full-precision launch: its slot holds "no token"
    const int slots = slots_per_row(a);
    for (int hh = threadIdx.x; hh < nh; hh += blockDim.x) {
      const std::int64_t slot = (static_cast<std::int64_t>(b) * a.q_heads + hq0 + hh) * slots + a.num_splits;
      a.partial_ml[2 * slot] = -INFINITY;
      a.partial_ml[2 * slot + 1] = 0.0f;
    }
  }
}

}  // namespace attention
}  // namespace cuda
}  // namespace rotorquant
