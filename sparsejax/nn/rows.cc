// y = x @ W for a sparse W stored as compressed rows per output unit, as XLA FFI handlers.
//
// sparsejax compiles this file on first use (sparsejax/nn/native.py) against the installed
// jaxlib's FFI headers and calls it from jitted code on the CPU. Operands:
//   x         f32 [batch, fan_in]
//   values    f32 [nnz]            unit u's weights are values[offsets[u]:offsets[u + 1]]
//   positions u16 or s32 [nnz]   their input positions (< fan_in; checked by the caller)
//   offsets   s32 [units + 1]
// and the result y f32 [batch, units].
//
// Small batches (< kGatherBatch rows) walk each unit's weights once per row of x, reading
// x by position; the unit's weights stay in L1 between rows. Larger batches transpose x
// tile by tile into [fan_in, kTile] so that each weight reads one contiguous vector of
// kTile rows. The work is split over XLA's intra-op threads (the calling thread included):
// by units of equal non-zero counts for small batches, by tiles and units for larger ones;
// small products stay on the calling thread.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 16;        // batch rows per tile: one 64-byte vector of floats
// Batches below this read x by position; from 3 rows on, one 16-row tile costs less.
constexpr int64_t kGatherBatch = 3;
constexpr int64_t kPartsPerThread = 8;
// Products with fewer multiply-adds run on the calling thread alone: waking a pool thread
// costs more than it saves (measured on LeNet-300-100 at batch 1).
constexpr int64_t kParallelWork = 1 << 15;

typedef float Tile __attribute__((vector_size(kTile * sizeof(float))));

// Runs work(i) for every i in [0, items), on the calling thread and XLA's pool threads.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t threads, int64_t items, const F& work) {
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto run = [progress, items, &work] {
    for (int64_t i; (i = progress->next.fetch_add(1)) < items;) {
      work(i);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  // A helper that starts after every item was taken returns at once without touching
  // `work`, so it may outlive this call.
  const int64_t helpers = std::min(threads - 1, items - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([progress, items, run] {
      if (progress->next.load() < items) run();
    });
  }
  run();
  while (progress->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

// Unit boundaries that split the non-zeros into `parts` nearly equal parts.
std::vector<int64_t> SplitByWeights(const int32_t* offsets, int64_t units, int64_t parts) {
  std::vector<int64_t> bounds(parts + 1, units);
  bounds[0] = 0;
  for (int64_t k = 1; k < parts; ++k) {
    const int64_t target = static_cast<int64_t>(offsets[units]) * k / parts;
    bounds[k] = std::lower_bound(offsets, offsets + units + 1, target) - offsets;
    bounds[k] = std::max(bounds[k], bounds[k - 1]);
  }
  return bounds;
}

// One unit's weights against one row of x. Four scalar accumulators: on the CPUs measured,
// this beat vector gathers, most of all for short rows.
template <typename Pos>
__attribute__((optimize("no-tree-vectorize"))) float RowDot(const float* values,
                                                             const Pos* positions,
                                                             const float* x, int64_t begin,
                                                             int64_t end) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  int64_t p = begin;
  for (; p + 4 <= end; p += 4) {
    a0 += values[p] * x[positions[p]];
    a1 += values[p + 1] * x[positions[p + 1]];
    a2 += values[p + 2] * x[positions[p + 2]];
    a3 += values[p + 3] * x[positions[p + 3]];
  }
  for (; p < end; ++p) a0 += values[p] * x[positions[p]];
  return (a0 + a1) + (a2 + a3);
}

template <ffi::DataType kPos>
ffi::Error Rows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> values_buf,
                ffi::Buffer<kPos> positions_buf, ffi::Buffer<ffi::S32> offsets_buf,
                ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("x must be [batch, fan_in]");
  const int64_t batch = dims[0], fan_in = dims[1];
  const int64_t units = offsets_buf.element_count() - 1;
  const int64_t nnz = values_buf.element_count();
  const float* xs = x.typed_data();
  const float* values = values_buf.typed_data();
  const auto* positions = positions_buf.typed_data();
  const int32_t* offsets = offsets_buf.typed_data();
  float* out = y->typed_data();
  if (units < 0 || static_cast<int64_t>(positions_buf.element_count()) != nnz || offsets[0] != 0 ||
      offsets[units] != nnz) {
    return ffi::Error::InvalidArgument("offsets do not describe the values");
  }
  for (int64_t u = 0; u < units; ++u) {
    if (offsets[u] > offsets[u + 1]) return ffi::Error::InvalidArgument("offsets decrease");
  }
  const int64_t threads =
      nnz * batch < kParallelWork ? 1 : std::max<int64_t>(1, pool.num_threads());
  if (batch < kGatherBatch) {
    const int64_t parts = std::max<int64_t>(1, std::min(units, kPartsPerThread * threads));
    const std::vector<int64_t> bounds = SplitByWeights(offsets, units, parts);
    ParallelFor(pool, threads, parts, [&](int64_t k) {
      for (int64_t u = bounds[k]; u < bounds[k + 1]; ++u) {
        for (int64_t b = 0; b < batch; ++b) {
          out[b * units + u] = RowDot(values, positions, xs + b * fan_in, offsets[u],
                                      offsets[u + 1]);
        }
      }
    });
    return ffi::Error::Success();
  }
  const int64_t tiles = (batch + kTile - 1) / kTile;
  // Enough items for every thread; a tile's units are split when tiles are few.
  const int64_t parts = std::max<int64_t>(1, std::min(units, (2 * threads + tiles - 1) / tiles));
  const std::vector<int64_t> bounds = SplitByWeights(offsets, units, parts);
  ParallelFor(pool, threads, tiles * parts, [&](int64_t item) {
    const int64_t b0 = item / parts * kTile, width = std::min(kTile, batch - b0);
    const int64_t part = item % parts;
    std::vector<float> x_t(fan_in * kTile, 0.f);  // [fan_in, kTile]; rows past the batch 0
    for (int64_t b = 0; b < width; ++b) {
      const float* row = xs + (b0 + b) * fan_in;
      for (int64_t i = 0; i < fan_in; ++i) x_t[i * kTile + b] = row[i];
    }
    for (int64_t u = bounds[part]; u < bounds[part + 1]; ++u) {
      Tile acc = {};
      for (int64_t p = offsets[u]; p < offsets[u + 1]; ++p) {
        Tile column;
        std::memcpy(&column, x_t.data() + static_cast<int64_t>(positions[p]) * kTile,
                    sizeof(column));
        acc += values[p] * column;
      }
      for (int64_t b = 0; b < width; ++b) out[(b0 + b) * units + u] = acc[b];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define SPARSEJAX_ROWS_HANDLER(NAME, POS)                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, Rows<POS>,                 \
                                ffi::Ffi::Bind()                 \
                                    .Ctx<ffi::ThreadPool>()      \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<POS>>()     \
                                    .Arg<ffi::Buffer<ffi::S32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>());

SPARSEJAX_ROWS_HANDLER(SparsejaxRowsU16, ffi::U16)
SPARSEJAX_ROWS_HANDLER(SparsejaxRowsS32, ffi::S32)
