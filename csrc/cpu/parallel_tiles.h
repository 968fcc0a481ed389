#pragma once
// How the CPU ops split a [M rows] x [16-column blocks] output over at::parallel_for threads
// (so torch.set_num_threads governs them). Included only by the op files, which link torch.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace sparseq::cpu {

// Column chunks per thread for many-row problems: threads claim them from a shared counter, so
// a thread slowed by another process on its core does not hold up the rest.
constexpr int64_t kChunksPerThread = 4;

// Calls fn(m_begin, m_end, nb_begin, nb_end) over disjoint chunks covering the whole output.
// Column blocks are split into kChunksPerThread chunks per thread (one when M < row_multiple);
// rows into chunks of at most `max_chunk_rows` (activation chunk fits in L2) and, when there are
// too few column blocks to feed every thread, into one chunk per thread. Problems under
// `serial_macs` multiply-adds run on the calling thread. Column chunks are a multiple of
// `block_multiple` blocks (a kernel's panel width) wherever there are enough blocks for that.
template <typename Fn>
void parallel_tiles(int64_t m, int64_t n_blocks, int64_t k, int64_t max_chunk_rows, int64_t row_multiple,
                    const Fn& fn, int64_t block_multiple = 1) {
  if (m <= 0 || n_blocks <= 0) return;
  constexpr int64_t kSerialMacs = 1 << 17;
  if (m * n_blocks * 16 * std::max<int64_t>(k, 1) <= kSerialMacs) {
    fn(int64_t{0}, m, int64_t{0}, n_blocks);
    return;
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  auto round_up = [&](int64_t v) { return (v + row_multiple - 1) / row_multiple * row_multiple; };
  int64_t rows = std::max<int64_t>(row_multiple, std::min(m, max_chunk_rows));
  if (n_blocks < 2 * threads) rows = std::min(rows, round_up((m + threads - 1) / threads));
  rows = std::max<int64_t>(1, rows);
  const int64_t row_chunks = (m + rows - 1) / rows;
  // Decode-sized M streams the weight: one contiguous share per thread suits the prefetchers.
  const int64_t chunks_per_thread = m < row_multiple ? 1 : kChunksPerThread;
  int64_t col_chunk = std::max<int64_t>(1, (n_blocks + threads * chunks_per_thread - 1) / (threads * chunks_per_thread));
  col_chunk = (col_chunk + block_multiple - 1) / block_multiple * block_multiple;
  const int64_t col_chunks = (n_blocks + col_chunk - 1) / col_chunk;
  const int64_t tasks = row_chunks * col_chunks;
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
    for (int64_t t = next_task.fetch_add(1, std::memory_order_relaxed); t < tasks;
         t = next_task.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t rc = t % row_chunks, cc = t / row_chunks;
      fn(rc * rows, std::min(m, (rc + 1) * rows), cc * col_chunk, std::min(n_blocks, (cc + 1) * col_chunk));
    }
  });
}

}  // namespace sparseq::cpu
