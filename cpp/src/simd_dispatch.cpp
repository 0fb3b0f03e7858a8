// Run-time choice of the CPU kernel build (detail/kernels.hpp) and the word-at-a-time bit-plane packing.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "rotorquant/detail/kernels.hpp"
#include "rotorquant/error.hpp"

namespace rotorquant {
namespace detail {

const Kernels& portable_kernel_table();
const Kernels* avx2_kernel_table();    // nullptr when not built (not x86-64)
const Kernels* avx512_kernel_table();  // nullptr when not built (not x86-64)

namespace {

bool cpu_has(KernelIsa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(ROTORQUANT_NO_X86_KERNELS)
  switch (isa) {
    case KernelIsa::kPortable: return true;
    case KernelIsa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case KernelIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi2");
  }
  return false;
#else
  return isa == KernelIsa::kPortable;
#endif
}

const Kernels* table_of(KernelIsa isa) {
  switch (isa) {
    case KernelIsa::kPortable: return &portable_kernel_table();
    case KernelIsa::kAvx2: return avx2_kernel_table();
    case KernelIsa::kAvx512: return avx512_kernel_table();
  }
  return nullptr;
}

KernelIsa initial_isa() {
  if (const char* forced = std::getenv("ROTORQUANT_CPU_KERNELS")) {
    const std::string name(forced);
    for (KernelIsa isa : {KernelIsa::kPortable, KernelIsa::kAvx2, KernelIsa::kAvx512}) {
      if (name == kernel_isa_name(isa) && kernel_isa_supported(isa)) return isa;
    }
  }
  for (KernelIsa isa : {KernelIsa::kAvx512, KernelIsa::kAvx2}) {
    if (kernel_isa_supported(isa)) return isa;
  }
  return KernelIsa::kPortable;
}

std::atomic<const Kernels*>& active() {
  static std::atomic<const Kernels*> table{table_of(initial_isa())};
  return table;
}

}  // namespace

const char* kernel_isa_name(KernelIsa isa) {
  switch (isa) {
    case KernelIsa::kPortable: return "portable";
    case KernelIsa::kAvx2: return "avx2";
    case KernelIsa::kAvx512: return "avx512";
  }
  return "unknown";
}

bool kernel_isa_supported(KernelIsa isa) { return table_of(isa) != nullptr && cpu_has(isa); }

KernelIsa kernel_isa() { return active().load()->isa; }

void set_kernel_isa(KernelIsa isa) { active().store(&kernels_for(isa)); }

const Kernels& kernels() { return *active().load(); }

const Kernels& kernels_for(KernelIsa isa) {
  if (!kernel_isa_supported(isa)) {
    throw ValueError(expected_got("CPU kernels", "an instruction set this build and CPU support",
                                  kernel_isa_name(isa)));
  }
  return *table_of(isa);
}

// ---- bit planes, 8 indices per 64-bit word -------------------------------------------------------------
// A plane of width w (1, 2, 4) packs 8 indices into w bytes: the 8 plane values (one per byte of the word)
// are merged pairwise: bytes -> 16-bit lanes of 2w bits -> 32-bit lanes of 4w bits -> 8w bits.
namespace {

constexpr std::uint64_t repeat_bytes(std::uint64_t byte) { return byte * 0x0101010101010101ull; }

std::uint64_t load_word(const std::uint8_t* p, std::int64_t bytes) {
  std::uint64_t word = 0;
  std::memcpy(&word, p, static_cast<std::size_t>(bytes));  // little-endian hosts (x86-64, aarch64)
  return word;
}

std::uint64_t compress_word(std::uint64_t v, int w) {
  const std::uint64_t m2 = (1ull << (2 * w)) - 1, m4 = (1ull << (4 * w)) - 1, m8 = (1ull << (8 * w)) - 1;
  v = (v | (v >> (8 - w))) & (m2 * 0x0001000100010001ull);
  v = (v | (v >> (16 - 2 * w))) & (m4 * 0x0000000100000001ull);
  v = (v | (v >> (32 - 4 * w))) & m8;
  return v;
}

std::uint64_t expand_word(std::uint64_t v, int w) {
  const std::uint64_t m1 = (1ull << w) - 1, m2 = (1ull << (2 * w)) - 1, m4 = (1ull << (4 * w)) - 1;
  v = (v | (v << (32 - 4 * w))) & (m4 * 0x0000000100000001ull);
  v = (v | (v << (16 - 2 * w))) & (m2 * 0x0001000100010001ull);
  v = (v | (v << (8 - w))) & repeat_bytes(m1);
  return v;
}

bool little_endian() {
  const std::uint16_t probe = 1;
  std::uint8_t first;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

// Expansion tables: one packed byte of a plane of width w -> its 8 / w values, one per byte of a word.
struct ExpandTables {
  std::uint64_t w1[256];
  std::uint32_t w2[256];
  std::uint16_t w4[256];
  ExpandTables() {
    for (unsigned b = 0; b < 256; ++b) {
      w1[b] = expand_word(b, 1);
      w2[b] = static_cast<std::uint32_t>(expand_word(b, 2));
      w4[b] = static_cast<std::uint16_t>(expand_word(b, 4));
    }
  }
};

const ExpandTables& expand_tables() {
  static const ExpandTables tables;
  return tables;
}

template <int W>
void pack_plane_words(const std::uint8_t* idx, std::int64_t count, int shift, std::uint8_t* plane) {
  const std::uint64_t mask = repeat_bytes((1u << W) - 1u);
  const std::int64_t full = count / 8, rest = count % 8;
  for (std::int64_t g = 0; g < full; ++g) {
    std::uint64_t word;
    std::memcpy(&word, idx + 8 * g, 8);
    const std::uint64_t packed = compress_word((word >> shift) & mask, W);
    std::memcpy(plane + g * W, &packed, W);  // little-endian: the low W bytes
  }
  if (rest > 0) {
    const std::uint64_t word = (load_word(idx + 8 * full, rest) >> shift) & mask & ((1ull << (8 * rest)) - 1);
    const std::uint64_t packed = compress_word(word, W);
    std::memcpy(plane + full * W, &packed, static_cast<std::size_t>((rest * W + 7) / 8));
  }
}

// idx (OR-ed into when `accumulate`, else overwritten) <- plane values << shift; idx has room for whole bytes
// of the plane (the caller's buffer is rounded up to a multiple of 8 entries).
template <int W>
void unpack_plane_table(const std::uint8_t* plane, std::int64_t bytes, int shift, bool accumulate,
                        std::uint8_t* idx) {
  const ExpandTables& t = expand_tables();
  for (std::int64_t b = 0; b < bytes; ++b) {
    const unsigned byte = plane[b];
    if (W == 1) {
      std::uint64_t v = t.w1[byte] << shift, old = 0;
      if (accumulate) std::memcpy(&old, idx + 8 * b, 8);
      v |= old;
      std::memcpy(idx + 8 * b, &v, 8);
    } else if (W == 2) {
      std::uint32_t v = t.w2[byte] << shift, old = 0;
      if (accumulate) std::memcpy(&old, idx + 4 * b, 4);
      v |= old;
      std::memcpy(idx + 4 * b, &v, 4);
    } else {
      std::uint16_t v = static_cast<std::uint16_t>(t.w4[byte] << shift), old = 0;
      if (accumulate) std::memcpy(&old, idx + 2 * b, 2);
      v = static_cast<std::uint16_t>(v | old);
      std::memcpy(idx + 2 * b, &v, 2);
    }
  }
}

}  // namespace

void pack_indices_fast(const PlaneLayout& layout, std::int64_t padded_dim, const std::uint8_t* idx,
                       std::uint8_t* out) {
  static const bool fast = little_endian();
  if (!fast) {
    pack_indices(layout, padded_dim, idx, out);
    return;
  }
  for (int p = 0; p < layout.num_planes; ++p) {
    std::uint8_t* plane = out + layout.plane_offset[p];
    const int shift = layout.shift[p];
    switch (layout.width[p]) {
      case 1: pack_plane_words<1>(idx, padded_dim, shift, plane); break;
      case 2: pack_plane_words<2>(idx, padded_dim, shift, plane); break;
      case 4: pack_plane_words<4>(idx, padded_dim, shift, plane); break;
      default: std::memcpy(plane, idx, static_cast<std::size_t>(padded_dim)); break;
    }
  }
}

void unpack_indices_fast(const PlaneLayout& layout, std::int64_t padded_dim, const std::uint8_t* in,
                         std::uint8_t* idx) {
  static const bool fast = little_endian();
  if (!fast || layout.num_planes == 0) {
    unpack_indices(layout, padded_dim, in, idx);
    return;
  }
  if (layout.width[0] == 8) {
    std::memcpy(idx, in, static_cast<std::size_t>(padded_dim));
    return;
  }
  // Whole bytes of every plane go through a buffer rounded up to 8 entries; the tail is copied out.
  const std::int64_t whole = padded_dim / 8 * 8;
  for (int p = 0; p < layout.num_planes; ++p) {
    const std::uint8_t* plane = in + layout.plane_offset[p];
    const int w = layout.width[p], shift = layout.shift[p];
    const std::int64_t bytes = whole * w / 8;
    switch (w) {
      case 1: unpack_plane_table<1>(plane, bytes, shift, p > 0, idx); break;
      case 2: unpack_plane_table<2>(plane, bytes, shift, p > 0, idx); break;
      default: unpack_plane_table<4>(plane, bytes, shift, p > 0, idx); break;
    }
  }
  if (whole < padded_dim) {  // the last partial group of 8 entries
    std::uint64_t word = 0;
    const std::int64_t rest = padded_dim - whole;
    for (int p = 0; p < layout.num_planes; ++p) {
      const int w = layout.width[p];
      const std::uint8_t* plane = in + layout.plane_offset[p] + whole * w / 8;
      word |= expand_word(load_word(plane, (rest * w + 7) / 8), w) << layout.shift[p];
    }
    word &= (rest == 8 ? ~0ull : ((1ull << (8 * rest)) - 1));
    std::memcpy(idx + whole, &word, static_cast<std::size_t>(rest));
  }
}

}  // namespace detail
}  // namespace rotorquant
