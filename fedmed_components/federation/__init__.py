"""The federation's pure math, free of FLARE: aggregation rules and server optimisers,
Byzantine-robust rules, update screening, privacy mechanisms and client sampling."""
