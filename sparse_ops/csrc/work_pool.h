// The kernels' parallel loops: parallel_for(n, threads, f) runs f(item, thread) for every item, items handed
// out one at a time (a running thread takes the share of one that has not started), on one of three backends.
//
// OPENMP (torch's own thread team) while the machine is quiet. Its parallel region ends in a join that waits
// for every thread of the team to arrive, even one with nothing left to do: beside a competing process one of
// our threads is often descheduled for a time slice (milliseconds) while a call takes tens of microseconds, and
// the call then waits for the scheduler, not for work (a 4096x4096 CSR at 90% and 1 token took 8 ms instead
// of 0.55 beside a process doing small matmuls on 2 threads, and 1.2 ms on one thread; AMD EPYC Zen 3,
// 2 cores).
// POOL, a work pool of ours that never waits for a thread that has not started: the caller publishes a job,
// takes items itself, and waits only for items another thread has claimed and not finished; a worker that
// wakes late finds nothing left. Not used on a quiet machine: torch's OpenMP threads spin for milliseconds
// after each of torch's own parallel ops, on the cores our workers would need (the pool alone was slower than
// OpenMP there: benchmarks/results/contention/quiet_ab.txt).
// SOLO, the caller alone: a worker descheduled while it holds an item still makes the pool's caller wait, and
// beside a process that keeps every core busy one thread has about the CPU two would share.
//
// Each job times the caller's wait for the other threads against its own work; a wait longer than both the
// work and WAIT_LIMIT_NS is slow, and a second slow one within RECENT_NS moves the following jobs a level up
// (OPENMP -> POOL -> SOLO) for a hold that doubles while they stay slow (a quiet machine has a slow wait now and
// then: a timer interrupt, a daemon waking; a busy one has them back to back). Off OpenMP, what other processes
// do with the cores is read from /proc/stat every 100 ms (Mode::sample): jobs run SOLO while they keep all but
// one core busy, and return to OpenMP only once they leave the cores quiet (by the clock where /proc/stat
// cannot be read), so a busy machine is not probed with OpenMP jobs that wait for the scheduler.
//
// Results never depend on the backend or on which thread ran an item (each item writes its own outputs), so
// they are identical at every thread count. After fork() the child starts a fresh pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <unistd.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>

namespace work_pool {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// The claim word: epoch (20 bits) | threads (8) | next claim (18) | claims (18). A claim is taken by a CAS of
// the whole word, so it is valid only for the job (epoch) and thread count it was made for. Jobs of more items
// claim chunks of consecutive items (parallel_for), so a job never has more than MAX_CLAIMS claims.
constexpr int ITEM_BITS = 18, JOB_SHIFT = 2 * ITEM_BITS;  // epoch and threads: the job, above the items
constexpr uint64_t MAX_CLAIMS = (uint64_t{1} << ITEM_BITS) - 1, ITEM_MASK = MAX_CLAIMS;
constexpr uint64_t JOB_MASK = (uint64_t{1} << 28) - 1;
constexpr int MAX_THREADS = 255;
inline uint64_t pack(uint64_t epoch, uint64_t threads, uint64_t next, uint64_t n) {
  return ((epoch << 8 | threads) & JOB_MASK) << JOB_SHIFT | next << ITEM_BITS | n;
}
inline uint64_t job_of(uint64_t v) { return v >> JOB_SHIFT; }
inline int threads_of(uint64_t v) { return static_cast<int>(job_of(v) & 0xFF); }

// CPU time the whole machine has been busy (all cores, /proc/stat), or -1 where it cannot be read.
inline int64_t machine_busy_ns() {
  FILE* f = std::fopen("/proc/stat", "r");
  if (!f) return -1;
  unsigned long long t[8] = {};  // user nice system idle iowait irq softirq steal
  const int got = std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &t[0], &t[1], &t[2], &t[3], &t[4],
                              &t[5], &t[6], &t[7]);
  std::fclose(f);
  if (got < 4) return -1;
  const unsigned long long busy = t[0] + t[1] + t[2] + t[5] + t[6] + t[7];
  return static_cast<int64_t>(busy * (1'000'000'000ULL / static_cast<unsigned long long>(sysconf(_SC_CLK_TCK))));
}

inline int64_t process_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Worker spin before sleeping, in pause instructions (~20-60 us): consecutive kernel calls of one model find
// the workers awake; longer would take CPU time from other threads of the process between calls.
constexpr int SPIN = 2000;

class Pool {
 public:
  typedef void (*Fn)(void* ctx, int64_t claim, int slot);

  // Runs fn(ctx, c, slot) for every claim c < nclaims (> 1) on up to nthreads (> 1) threads (the caller is slot
  // 0, worker slots are 1 .. nthreads - 1); returns when every claim is done, `free` set to when the caller found none
  // left to claim.
  void run(int64_t nclaims, int nthreads, Fn fn, void* ctx, int64_t& free) {
    std::unique_lock<std::mutex> one(call_, std::try_to_lock);
    nthreads = std::min(nthreads, MAX_THREADS);
    if (!one.owns_lock()) {  // another thread of the process is running a job: this one runs alone
      for (int64_t c = 0; c < nclaims; ++c) fn(ctx, c, 0);
      free = now_ns();
      return;
    }
    grow(nthreads - 1);
    fn_ = fn;
    ctx_ = ctx;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t job = job_of(pack(++epoch_, static_cast<uint64_t>(nthreads), 0, 0));
    claim_.store(pack(epoch_, static_cast<uint64_t>(nthreads), 0, static_cast<uint64_t>(nclaims)),
                 std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lock(sleep_); }  // a worker between its check and its wait holds sleep_
      wake_.notify_all();
    }
    work(job, 0);
    free = now_ns();
    // Only claimed items remain, on threads that are running them (or were descheduled inside one).
    for (int spins = 0; done_.load(std::memory_order_acquire) < nclaims; ++spins) {
      if (spins < SPIN) cpu_relax();
      else sched_yield();
    }
  }

  static Pool& get() {  // the process's pool: after fork(), the child's own
    static const bool made = [] {
      current() = new Pool();
      pthread_atfork(nullptr, nullptr, [] { current() = new Pool(); });  // the parent's pool is leaked in the child
      return true;
    }();
    (void)made;
    return *current();
  }

 private:
  static Pool*& current() {
    static Pool* p = nullptr;
    return p;
  }

  // Claims and runs items of `job` until none is left (or another job has started: then none of ours is).
  void work(uint64_t job, int slot) {
    uint64_t v = claim_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t n = v & ITEM_MASK, next = (v >> ITEM_BITS) & ITEM_MASK;
      if (job_of(v) != job || next >= n) return;
      if (!claim_.compare_exchange_weak(v, v + (uint64_t{1} << ITEM_BITS), std::memory_order_acq_rel,
                                        std::memory_order_acquire))
        continue;
      fn_(ctx_, static_cast<int64_t>(next), slot);  // the job is alive: its caller waits for this item
      done_.fetch_add(1, std::memory_order_release);
      v = claim_.load(std::memory_order_acquire);
    }
  }

  void grow(int workers) {
    while (static_cast<int>(threads_) < workers) {
      const int slot = static_cast<int>(++threads_);
      std::thread([this, slot] { loop(slot); }).detach();  // never joined: the pool lives as long as the process
    }
  }

  void loop(int slot) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t v = claim_.load(std::memory_order_acquire);
      for (int spins = 0; job_of(v) == seen && spins < SPIN; ++spins) {
        cpu_relax();
        v = claim_.load(std::memory_order_acquire);
      }
      if (job_of(v) == seen) {
        std::unique_lock<std::mutex> lock(sleep_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        while (job_of(v = claim_.load(std::memory_order_seq_cst)) == seen) wake_.wait(lock);
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
      }
      seen = job_of(v);
      if (slot < threads_of(v)) work(seen, slot);  // the job's thread count is part of every claim
    }
  }

  std::mutex call_;                   // held by the caller of the running job
  std::atomic<uint64_t> claim_{0};    // pack(epoch, next, n) of the current job
  std::atomic<int64_t> done_{0};      // claims of the current job finished
  std::atomic<int> sleepers_{0};
  std::atomic<unsigned> threads_{0};  // workers started
  uint64_t epoch_ = 0;                // the current job's, counting from 1 (written by its caller only)
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  std::mutex sleep_;
  std::condition_variable wake_;
};

// A wait slower than this (and than the caller's own work in the job) is the scheduler's, not the work's.
constexpr int64_t WAIT_LIMIT_NS = 200'000;
constexpr int64_t RECENT_NS = 100'000'000, HOLD_NS = 250'000'000, MAX_HOLD_NS = 8'000'000'000;

// How jobs run: OPENMP, POOL, SOLO (the caller alone); AUTO picks by what the waits showed.
enum Backend { AUTO = 0, OPENMP = 1, POOL = 2, SOLO = 3 };

// Process-wide: which backend runs the next job, and what the waits showed (sparse_cpu_threading reports it).
// Levels OPENMP < POOL < SOLO: two slow waits within RECENT_NS at a level send jobs one level up for a hold
// (HOLD_NS, doubled while they stay slow, up to MAX_HOLD_NS); when it ends, jobs drop back a level.
struct Mode {
  std::atomic<int> forced{AUTO};  // tests and benchmarks pin a backend
  struct Level {
    std::atomic<int64_t> until{0};            // now_ns() before which AUTO runs jobs above this level
    std::atomic<int64_t> hold{HOLD_NS};
    std::atomic<int64_t> last_slow{-RECENT_NS};  // now_ns() of the last slow wait at this level
  } levels[2];                                // OPENMP's (jobs go to the pool), POOL's (jobs run solo)
  std::atomic<int64_t> jobs[4] = {}, slow[3] = {};  // jobs per backend; slow waits per level

  int backend() {
    const int f = forced.load(std::memory_order_relaxed);
    if (f != AUTO) return f;
    const int64_t now = now_ns();
    if (now < levels[1].until.load(std::memory_order_relaxed)) return SOLO;
    const int64_t pool_until = levels[0].until.load(std::memory_order_relaxed);
    if (pool_until == 0) return OPENMP;  // never contended
    const int others = sample(now);
    if (now >= pool_until) {
      if (others == QUIET || others == UNKNOWN) return OPENMP;  // quiet again (unreadable: back by the clock)
      levels[0].until.store(now + HOLD_NS, std::memory_order_relaxed);  // still busy: stay off OpenMP
    }
    return others == CROWDED ? SOLO : POOL;
  }

  // What other processes did with the cores over the last SAMPLE_NS (from /proc/stat; read at most that
  // often, and only once jobs have left OpenMP): QUIET (under a quarter of a core), CROWDED (all but at most
  // one core busy: our threads can have one core between them, which one thread has without waiting for
  // another; ours_1t against ours in benchmarks/contention.py), BUSY between, UNKNOWN where /proc/stat cannot
  // be read.
  enum Others { UNKNOWN = 0, QUIET = 1, BUSY = 2, CROWDED = 3 };
  int sample(int64_t now) {
    constexpr int64_t SAMPLE_NS = 100'000'000;
    int64_t last = sampled.load(std::memory_order_relaxed);
    if (now - last >= SAMPLE_NS && sampled.compare_exchange_strong(last, now, std::memory_order_relaxed)) {
      const int64_t machine = machine_busy_ns(), mine = process_cpu_ns();
      const int64_t m0 = machine_at.exchange(machine), p0 = process_at.exchange(mine);
      const long cores = sysconf(_SC_NPROCESSORS_ONLN);
      int seen = UNKNOWN;
      if (machine >= 0 && m0 >= 0) {  // the mean since the last reading, however long ago
        const double other = static_cast<double>(machine - m0 - (mine - p0)) / static_cast<double>(now - last);
        seen = other < 0.25 ? QUIET : cores > 1 && other >= 0.9 * static_cast<double>(cores - 1) ? CROWDED : BUSY;
      }
      others_now.store(seen, std::memory_order_relaxed);
    }
    return others_now.load(std::memory_order_relaxed);
  }
  std::atomic<int64_t> sampled{0}, machine_at{-1}, process_at{0};
  std::atomic<int> others_now{UNKNOWN};

  // A job at `backend` (OPENMP or POOL) whose caller worked `busy` ns and waited `wait` ns for the other
  // threads; returns whether the following jobs go a level up.
  bool waited(int backend, int64_t wait, int64_t busy) {
    Level& level = levels[backend - OPENMP];
    const int64_t now = now_ns();
    if (wait <= std::max(WAIT_LIMIT_NS, busy)) {
      if (now >= level.until.load(std::memory_order_relaxed)) level.hold.store(HOLD_NS, std::memory_order_relaxed);
      return false;
    }
    slow[backend].fetch_add(1, std::memory_order_relaxed);
    if (now - level.last_slow.exchange(now, std::memory_order_relaxed) > RECENT_NS) return false;  // one alone
    const int64_t h = level.hold.load(std::memory_order_relaxed);
    level.until.store(now + h, std::memory_order_relaxed);
    level.hold.store(std::min(2 * h, MAX_HOLD_NS), std::memory_order_relaxed);
    return true;
  }
  static Mode& get() {
    static Mode m;
    return m;
  }
};

// Runs f(item, thread) for every item < n on up to nthreads threads; thread < nthreads names the thread (its
// scratch). chunk > 1 hands out runs of consecutive items (a thread keeps state across a run's items).
template <typename F>
void parallel_for(int64_t n, int nthreads, F&& f, int64_t chunk = 1) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(chunk, (n + static_cast<int64_t>(MAX_CLAIMS) - 1) / static_cast<int64_t>(MAX_CLAIMS));
  const int64_t claims = (n + chunk - 1) / chunk;
  const auto claim = [&](int64_t c, int thread) {
    for (int64_t i = c * chunk, e = std::min(n, i + chunk); i < e; ++i) f(i, thread);
  };
  Mode& mode = Mode::get();
  const int backend = nthreads <= 1 || claims <= 1 ? SOLO : mode.backend();
  if (nthreads > 1 && claims > 1) mode.jobs[backend].fetch_add(1, std::memory_order_relaxed);
  if (backend == SOLO) {
    for (int64_t c = 0; c < claims; ++c) claim(c, 0);
    return;
  }
  const int64_t start = now_ns();
  int64_t begun = start, free = 0;  // when the caller started on the claims and when it found none left
  if (backend == POOL) {
    const Pool::Fn call = [](void* p, int64_t c, int thread) { (*static_cast<decltype(claim)*>(p))(c, thread); };
    Pool::get().run(claims, nthreads, call, const_cast<void*>(static_cast<const void*>(&claim)), free);
  } else {
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nthreads)
    {
      const int thread = omp_get_thread_num();
      if (thread == 0) begun = now_ns();  // libgomp's fork can wait for a thread still leaving the last region
      for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < claims;) claim(c, thread);
      if (thread == 0) free = now_ns();
    }
  }
  mode.waited(backend, begun - start + now_ns() - free, free - begun);
}

}  // namespace work_pool
