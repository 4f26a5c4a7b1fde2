// The decoder step of a LLaMA-family model (Llama, Mistral, Qwen2): n new tokens through every block and the LM
// head in one call, over a KV cache the caller owns, (batch, layers, Hk, max_len, D): row i of the step is
// token tokens[i] of sequence seq[i] at position pos[i] (a prompt: one sequence, consecutive positions; a
// batched decode step: one token of each sequence). Included by sparse_cpu.cpp inside its internal namespace,
// after the kernels (run_linear, parallel_for, Post).
//
// Per block, for the n rows (x: the hidden states, (n, E)):
//   h = rmsnorm(x) * attn_norm
//   q, k, v = h Wq^T + bq, h Wk^T + bk, h Wv^T + bv        (any layout of run_linear; biases optional; one token:
//                                                          the three in one run_gemvs, as gate and up below)
//   q, k = rotary(q, k) with the caller's cos / sin tables (rows by position: every rotary scaling the caller's
//          model computes, this step reads)
//   K[seq[i], pos[i]], V[seq[i], pos[i]] = k, v            (fp32)
//   a = softmax(scale q K^T) V over keys 0 .. pos[i] of seq[i] (a sliding window keeps the last `window`), head h
//       reading key head h / (H / Hk) (grouped-query attention)
//   x = a Wo^T + bo + x                                    (the residual added by run_linear's post-op)
//   h = rmsnorm(x) * mlp_norm
//   x = (act(h Wg^T + bg) * (h Wu^T + bu)) Wd^T + bd + x
// then logits = rmsnorm(x) * final_norm Wlm^T for the last row (or every row). Norms, rotary and softmax
// in fp32 as transformers computes them (the norm in fp32, then its weight); results match its logits to
// rounding, not bit for bit.
//
// A Decoder is not for concurrent steps: one step at a time (the Python side holds a lock).
#pragma once

enum DecoderSlot { D_Q, D_K, D_V, D_O, D_GATE, D_UP, D_DOWN, D_SLOTS };

struct Decoder {
  int64_t layers, E, H, Hk, D, I, vocab, max_len, window, batch;
  float eps, scale;
  int act;
  const float *cos, *sin, *embed, *final_norm;
  float *kc, *vc;
  int64_t single_gemv, single_batch, single_attention;  // below this work one thread (ours_cpu.py's thresholds)
  struct Layer {
    LinearRef lin[D_SLOTS];
    const float *attn_norm = nullptr, *mlp_norm = nullptr;
  };
  std::vector<Layer> blocks;
  LinearRef head;
  std::vector<float> x, y, h, q, k, v, a, g, u, scores;  // per-step buffers, grown to the largest n
  int64_t linear_ns = 0, step_ns = 0, steps = 0;  // time in the linear layers and in whole steps (decoder_time)

  // stored values nnz times n rows of work: one thread below the thresholds
  int threads_for(int64_t nnz, int64_t n, int nthreads) const {
    return nnz * n < (n == 1 ? single_gemv : single_batch) ? 1 : nthreads;
  }
  int threads_for(const LinearRef& w, int64_t n, int nthreads) const { return threads_for(w.nnz, n, nthreads); }

  int linear(const LinearRef& w, const float* in, int64_t n, float* out, int nthreads, int act_code,
             const float* residual) {
    const Post post{residual ? POST_ADD : POST_NONE, residual, nullptr, nullptr, 0.0f};
    return run_linear(w, in, n, out, threads_for(w, n, nthreads), act_code, post);
  }

  void rmsnorm(const float* src, const float* weight, float* dst, int64_t n) const {
    for (int64_t i = 0; i < n; ++i) {
      const float* s = src + i * E;
      float* d = dst + i * E;
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < E; ++c) sq += s[c] * s[c];
      const float inv = 1.0f / std::sqrt(sq / static_cast<float>(E) + eps);
#pragma omp simd
      for (int64_t c = 0; c < E; ++c) d[c] = weight[c] * (s[c] * inv);
    }
  }

  // rotate_half form: t[j] = t[j] cos[j] - t[j + D/2] sin[j], t[j + D/2] = t[j + D/2] cos[j + D/2] + t[j] sin[..]
  void rotary(float* t, int64_t heads, int64_t p) const {
    const float *c = cos + p * D, *s = sin + p * D;
    const int64_t half = D / 2;
    for (int64_t hh = 0; hh < heads; ++hh) {
      float* r = t + hh * D;
      for (int64_t j = 0; j < half; ++j) {
        const float lo = r[j], hi = r[j + half];
        r[j] = lo * c[j] - hi * s[j];
        r[j + half] = hi * c[j + half] + lo * s[j + half];
      }
    }
  }

  // Where position p of key head kh of block l of sequence b lives in the cache.
  int64_t at(int64_t b, int64_t l, int64_t kh, int64_t p) const {
    return (((b * layers + l) * Hk + kh) * max_len + p) * D;
  }

  // a[i, head] for the n rows of block l, keys 0 .. pos[i] of sequence seq[i].
  void attention(int64_t l, int64_t n, const int64_t* seq, const int64_t* pos, int nthreads) {
    const int64_t group = H / Hk;
    int64_t keys_total = 0;
    for (int64_t i = 0; i < n; ++i) keys_total += pos[i] + 1;
    const int threads = 2 * H * keys_total * D < single_attention ? 1 : nthreads;
    scores.resize(static_cast<size_t>(threads * max_len));
    parallel_for(n * H, threads, [&](int64_t item, int thread) {
      const int64_t i = item / H, hh = item % H, keys = pos[i] + 1;
      const int64_t first = window > 0 ? std::max<int64_t>(0, keys - window) : 0;
      const float* qv = q.data() + i * H * D + hh * D;
      const int64_t base = at(seq[i], l, hh / group, 0);
      const float *K = kc + base, *V = vc + base;
      float* s = scores.data() + thread * max_len;
      float m = -INFINITY;
      for (int64_t j = first; j < keys; ++j) {
        const float* kr = K + j * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < D; ++c) dot += qv[c] * kr[c];
        s[j] = dot * scale;
        m = std::max(m, s[j]);
      }
      float sum = 0.0f;
      for (int64_t j = first; j < keys; ++j) sum += (s[j] = std::exp(s[j] - m));
      float* out = a.data() + i * H * D + hh * D;
      std::fill(out, out + D, 0.0f);
      for (int64_t j = first; j < keys; ++j) {
        const float w = s[j] / sum, *vr = V + j * D;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) out[c] += w * vr[c];
      }
    });
  }

  int step(const int64_t* tokens, int64_t n, const int64_t* seq, const int64_t* pos, float* logits, bool all_logits,
           int nthreads) {
    if (n < 1) return ENTRY_BAD_ARGUMENT;
    for (int64_t i = 0; i < n; ++i)
      if (tokens[i] < 0 || tokens[i] >= vocab || seq[i] < 0 || seq[i] >= batch || pos[i] < 0 || pos[i] >= max_len)
        return ENTRY_BAD_ARGUMENT;
    for (auto* buf : {&x, &y, &h}) buf->resize(static_cast<size_t>(n * E));
    for (auto* buf : {&q, &a}) buf->resize(static_cast<size_t>(n * H * D));
    for (auto* buf : {&k, &v}) buf->resize(static_cast<size_t>(n * Hk * D));
    for (auto* buf : {&g, &u}) buf->resize(static_cast<size_t>(n * I));
    for (int64_t i = 0; i < n; ++i) std::memcpy(x.data() + i * E, embed + tokens[i] * E, E * sizeof(float));
    int status = ENTRY_OK;
    const int64_t start = work_pool::now_ns();
    int64_t in_linear = 0;
    const auto timed = [&](auto&& f) {  // f's status, its time counted in the linear layers'
      const int64_t t0 = work_pool::now_ns();
      if (status == ENTRY_OK) status = f();
      in_linear += work_pool::now_ns() - t0;
    };
    const auto run = [&](const LinearRef& w, const float* in, float* out, int act_code, const float* residual) {
      timed([&] { return linear(w, in, n, out, nthreads, act_code, residual); });
    };
    // layers sharing the input h: one token in one parallel_for (run_gemvs), more one layer at a time
    const auto run_group = [&](std::initializer_list<const LinearRef*> ws, std::initializer_list<float*> outs,
                               std::initializer_list<int> acts) {
      if (n > 1) {
        for (size_t i = 0; i < ws.size(); ++i) run(*ws.begin()[i], h.data(), outs.begin()[i], acts.begin()[i], nullptr);
        return;
      }
      int64_t nnz = 0;
      for (const LinearRef* w : ws) nnz += w->nnz;
      timed([&] {
        return run_gemvs(ws.begin(), static_cast<int>(ws.size()), h.data(), outs.begin(), acts.begin(),
                         threads_for(nnz, 1, nthreads));
      });
    };
    for (int64_t l = 0; l < layers && status == ENTRY_OK; ++l) {
      const Layer& b = blocks[l];
      rmsnorm(x.data(), b.attn_norm, h.data(), n);
      run_group({&b.lin[D_Q], &b.lin[D_K], &b.lin[D_V]}, {q.data(), k.data(), v.data()}, {ACT_NONE, ACT_NONE, ACT_NONE});
      for (int64_t i = 0; i < n; ++i) {
        rotary(q.data() + i * H * D, H, pos[i]);
        rotary(k.data() + i * Hk * D, Hk, pos[i]);
        for (int64_t kh = 0; kh < Hk; ++kh) {
          const int64_t to = at(seq[i], l, kh, pos[i]), from = (i * Hk + kh) * D;
          std::memcpy(kc + to, k.data() + from, D * sizeof(float));
          std::memcpy(vc + to, v.data() + from, D * sizeof(float));
        }
      }
      attention(l, n, seq, pos, nthreads);
      run(b.lin[D_O], a.data(), y.data(), ACT_NONE, x.data());
      std::swap(x, y);
      rmsnorm(x.data(), b.mlp_norm, h.data(), n);
      run_group({&b.lin[D_GATE], &b.lin[D_UP]}, {g.data(), u.data()}, {act, ACT_NONE});
      for (int64_t j = 0; j < n * I; ++j) g[j] *= u[j];
      run(b.lin[D_DOWN], g.data(), y.data(), ACT_NONE, x.data());
      std::swap(x, y);
    }
    if (status != ENTRY_OK) return status;
    const int64_t rows = all_logits ? n : 1;
    rmsnorm(x.data() + (n - rows) * E, final_norm, h.data(), rows);
    const int64_t t0 = work_pool::now_ns();
    status = run_linear(head, h.data(), rows, logits, threads_for(head, rows, nthreads), ACT_NONE,
                        Post{POST_NONE, nullptr, nullptr, nullptr, 0.0f});
    const int64_t end = work_pool::now_ns();
    linear_ns += in_linear + end - t0;
    step_ns += end - start;
    ++steps;
    return status;
  }

  // Whether every layer is set and its shapes fit the model's.
  bool complete() const {
    const int64_t shapes[D_SLOTS][2] = {{H * D, E}, {Hk * D, E}, {Hk * D, E}, {E, H * D}, {I, E}, {I, E}, {E, I}};
    for (const Layer& b : blocks) {
      if (!b.attn_norm || !b.mlp_norm) return false;
      for (int s = 0; s < D_SLOTS; ++s)
        if (b.lin[s].kind < 0 || b.lin[s].out != shapes[s][0] || b.lin[s].in != shapes[s][1]) return false;
    }
    return head.kind >= 0 && head.out == vocab && head.in == E;
  }
};
