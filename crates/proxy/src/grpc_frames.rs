//! gRPC messages in an HTTP body, counted as they pass for Istio's
//! `istio_request_messages_total` and `istio_response_messages_total` (Envoy's `grpc_stats`).
//! Each message is a flag byte, a 4-byte big-endian length, then that many bytes; a body
//! arrives in chunks that cut anywhere, so the position in the current message is kept.

use http::HeaderMap;

/// Whether a request or response is gRPC, by its content type.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"))
}

/// Where a body stands in its sequence of gRPC messages.
#[derive(Debug, Default)]
pub struct GrpcFrames {
    /// The prefix of the current message read so far (up to 5 bytes).
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to pass.
    rest: u64,
}

impl GrpcFrames {
    /// Reads a chunk: how many messages begin in it.
    pub fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut started = 0;
        while !data.is_empty() {
            if self.rest > 0 {
                let n = usize::try_from(self.rest)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.rest -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (self.prefix.len() - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == self.prefix.len() {
                started += 1;
                let [_, a, b, c, d] = self.prefix;
                self.rest = u64::from(u32::from_be_bytes([a, b, c, d]));
                self.have = 0;
            }
        }
        started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0];
        m.extend(len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    #[test]
    fn messages_are_counted_however_the_body_is_cut() {
        let body: Vec<u8> = [message(3), message(0), message(300), message(1)].concat();
        // Whole, then cut into every chunk size up to 7 bytes.
        assert_eq!(GrpcFrames::default().feed(&body), 4);
        for size in 1..=7 {
            let mut f = GrpcFrames::default();
            let n: u64 = body.chunks(size).map(|c| f.feed(c)).sum();
            assert_eq!(n, 4, "chunks of {size}");
        }
        // A message counts from its prefix, before its bytes have all come.
        assert_eq!(GrpcFrames::default().feed(&message(100)[..5]), 1);
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&headers));
        assert!(!is_grpc(&HeaderMap::new()));
    }
}
