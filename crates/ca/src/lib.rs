//! Certificate authority, Istio CA API, tokens, SPIFFE verifiers
