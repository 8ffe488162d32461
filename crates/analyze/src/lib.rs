//! Istio analyzers and their IST messages
