//! xDS protocol: ADS server and client, type URLs, config dumps as JSON
