//! The control plane server: config sources, pushes, debug and metrics HTTP
