/* The thread team of compressdit's C++ CPU ops (int8_linear.cpp, bf16_gemm.cpp): one OpenMP fork and join a
 * layer, each thread a contiguous block of the work, torch at one intra-op thread inside (ATen and oneDNN do not
 * nest parallel regions). */
#ifndef COMPRESSDIT_TEAM_H
#define COMPRESSDIT_TEAM_H

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <exception>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace compressdit_team {

/* torch at one intra-op thread while it lives (the count it had restored after, also when an exception leaves) */
struct OneThread {
    const int previous = at::get_num_threads();
    OneThread() {
        if (previous != 1) at::set_num_threads(1);
    }
    ~OneThread() {
        if (previous != 1) at::set_num_threads(previous);
    }
};

/* Runs block(r0, r1) over `rows` units (rows, column blocks): split in contiguous chunks over a team of
 * min(threads, rows) OpenMP threads (the first on the calling thread), an exception in any block rethrown after the
 * team joins; a team of one runs block(0, rows) on the calling thread with torch at one thread, whatever torch's
 * count. */
template <typename Block>
void on_team(int64_t rows, int64_t threads, const char *name, Block block) {
    const int team = (int)std::max<int64_t>(1, std::min<int64_t>(threads, rows));
    if (team == 1) {
        OneThread one;
        block(0, rows);
        return;
    }
    bool failed = false;
    std::string error;
#pragma omp parallel num_threads(team)
    {
#ifdef _OPENMP
        const int index = omp_get_thread_num(), size = omp_get_num_threads();
#else
        const int index = 0, size = 1;
#endif
        const int64_t chunk = (rows + size - 1) / size, r0 = std::min(rows, index * chunk),
                      r1 = std::min(rows, r0 + chunk);
        if (r0 < r1) {
            try {
                block(r0, r1);
            } catch (const std::exception &e) { /* an exception must not leave the parallel region */
#pragma omp critical(compressdit_native_team)
                {
                    failed = true;
                    error = e.what();
                }
            }
        }
    }
    TORCH_CHECK(!failed, name, ": ", error);
}

}  // namespace compressdit_team

#endif
