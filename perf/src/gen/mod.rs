//! The AF_XDP traffic generator (`mimiq-perf gen`).
