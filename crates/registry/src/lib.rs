//! The mesh as a model: services, hostnames, endpoints, protocols
