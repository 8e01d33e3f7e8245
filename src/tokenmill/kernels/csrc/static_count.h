// Run-time counts as compile-time constants, so loops over them unroll and their accumulators stay in registers.
#pragma once
#include <type_traits>

namespace tm {

// f(integral_constant<int, n>) for a run-time n in 1..N.
template <int N, typename F>
inline void with_count(int n, F f) {
  if constexpr (N >= 1) {
    if (n == N)
      f(std::integral_constant<int, N>{});
    else
      with_count<N - 1>(n, f);
  }
}

// Calls f(count, first) over `total` items in groups of up to G (count: a compile-time constant); a remainder is
// one smaller group.
template <int G, typename F>
inline void by_groups(int total, F f) {
  int first = 0;
  for (; first + G <= total; first += G) f(std::integral_constant<int, G>{}, first);
  if (first < total) with_count<G - 1>(total - first, [&](auto count) { f(count, first); });
}

}  // namespace tm
