//! Idle timeouts of downstream connections: Envoy's `tcp_proxy` `idle_timeout` and the HTTP
//! connection manager's `common_http_protocol_options.idle_timeout`, one hour unless the
//! configuration says otherwise (zero: none). A peer that goes quiet, or that never finishes
//! what it started to send, does not hold a connection and its task forever.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::cluster::now_ms;

/// Envoy's default for both.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// The timeout a configuration field asks for: unset is the default, zero is none.
pub fn timeout(field: Option<Duration>) -> Option<Duration> {
    match field {
        None => Some(DEFAULT_TIMEOUT),
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
    }
}

/// What a connection has moved: when it last moved a byte (in [`now_ms`] time), and how many
/// each way, for whoever reports on it while it lasts.
#[derive(Clone, Debug)]
pub struct Activity(Arc<Moved>);

#[derive(Debug)]
struct Moved {
    last: AtomicU64,
    read: AtomicU64,
    written: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity(Arc::new(Moved {
            last: AtomicU64::new(now_ms()),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }))
    }
}

impl Activity {
    fn moved(&self, count: &AtomicU64, n: usize) {
        count.fetch_add(n as u64, Ordering::Relaxed);
        self.0.last.store(now_ms(), Ordering::Relaxed);
    }

    /// Bytes (read, written) so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.0.read.load(Ordering::Relaxed),
            self.0.written.load(Ordering::Relaxed),
        )
    }

    /// Ends once no byte has moved for `timeout`; never without one.
    pub async fn expired(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else {
            return std::future::pending().await;
        };
        let limit = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            let due = self.0.last.load(Ordering::Relaxed).saturating_add(limit);
            let now = now_ms();
            if now >= due {
                return;
            }
            tokio::time::sleep(Duration::from_millis(due - now)).await;
        }
    }
}

/// A stream whose reads and writes count in its [`Activity`].
pub struct Watched<S> {
    inner: S,
    activity: Activity,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Activity) -> Watched<S> {
        Watched { inner, activity }
    }

    fn wrote(&mut self, r: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = r
            && *n > 0
        {
            self.activity.moved(&self.activity.0.written, *n);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.activity.moved(&this.activity.0.read, n);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn unset_is_an_hour_and_zero_is_none() {
        assert_eq!(timeout(None), Some(DEFAULT_TIMEOUT));
        assert_eq!(timeout(Some(Duration::ZERO)), None);
        assert_eq!(
            timeout(Some(Duration::from_secs(5))),
            Some(Duration::from_secs(5))
        );
    }

    #[tokio::test]
    async fn bytes_moved_put_the_expiry_off() {
        let (a, mut b) = tokio::io::duplex(64);
        let activity = Activity::default();
        let mut a = Watched::new(a, activity.clone());
        let limit = Some(Duration::from_millis(300));
        let started = std::time::Instant::now();
        // Traffic every 100 ms for 600 ms: not idle, though the whole is twice the limit.
        let traffic = async {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                b.write_all(b"x").await.expect("write");
                let mut byte = [0u8; 1];
                a.read_exact(&mut byte).await.expect("read");
            }
        };
        tokio::select! {
            () = traffic => {}
            () = activity.expired(limit) => panic!("expired while bytes moved"),
        }
        // Then quiet: it expires.
        tokio::time::timeout(Duration::from_secs(5), activity.expired(limit))
            .await
            .expect("expires once quiet");
        assert!(started.elapsed() >= Duration::from_millis(900));
    }
}
