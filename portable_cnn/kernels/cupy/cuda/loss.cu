// Per row n: logp = shifted - log(sum(exp(shifted))), shifted = logits - max (a NaN
// propagates, as max does); probs = exp(logp); nll[n] = -logp[label] (0 for a label
// outside [0, K), as the reference's one-hot row of zeros gives).
template <typename T, typename I>
__global__ void softmax_cross_entropy_forward(const T* __restrict__ logits, const long long* __restrict__ labels,
                                              T* __restrict__ probs, T* __restrict__ nll, const I total, const int K,
                                              const long long sN, const long long sK) {
    GRID_LOOP(n, total) {
        const T* row = logits + (long long)n * sN;
        T m = row[0];
        for (int k = 1; k < K; ++k) {
            const T value = row[k * sK];
            if (value > m || (value != value && m == m)) m = value;
        }
        T sum = (T)0;
        for (int k = 0; k < K; ++k) sum += exp(row[k * sK] - m);
        const T log_sum = log(sum);
        T* out = probs + (long long)n * K;
        for (int k = 0; k < K; ++k) out[k] = exp((row[k * sK] - m) - log_sum);
        const long long label = labels[n];
        nll[n] = (label >= 0 && label < K) ? -((row[label * sK] - m) - log_sum) : (T)0;
    }
}
